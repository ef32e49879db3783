//! `nanobot bench bus`: throughput and round-trip latency through the NanoBot bus (envelope +
//! codec + typed pub/sub), printed beside raw Zenoh pub/sub measured in the same run, between
//! two processes (tcp on loopback) and within one process (one session).
//!
//! Both sides are built alike so the ratio isolates what NanoBot adds: the same payload bytes,
//! shared (not copied) into each publication; subscribers with one queue hop to a consumer task
//! (Zenoh's default FIFO handler for raw, the bus's lossless subscription for NanoBot); blocking
//! congestion control for throughput, express publications for latency.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Subcommand;
use nanobot_actors::bus::{Bus, BusConfig, PubQos};
use nanobot_messages::{Blob, Encoding, RawFrame};
use serde_json::json;
use zenoh::qos::CongestionControl;
use zenoh::Session;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Bus throughput and latency beside raw Zenoh.
    Bus {
        /// Seconds of publishing per throughput measurement.
        #[arg(long, default_value_t = 2.0)]
        secs: f64,
        /// Round trips per latency measurement.
        #[arg(long, default_value_t = 2000)]
        round_trips: usize,
        /// Payload sizes in bytes.
        #[arg(long, value_delimiter = ',', default_values_t = vec![64, 1024, 16384, 262144])]
        sizes: Vec<usize>,
        /// Only two processes (`two`) or only one (`one`); default both.
        #[arg(long)]
        only: Option<String>,
    },
    /// The far side of `bench bus` between two processes (started by it).
    #[command(hide = true)]
    BusPeer {
        #[arg(long)]
        connect: String,
    },
}

pub fn run(cmd: BenchCmd) -> anyhow::Result<u8> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cmd {
        BenchCmd::Bus {
            secs,
            round_trips,
            sizes,
            only,
        } => rt.block_on(bench_bus(secs, round_trips, &sizes, only.as_deref())),
        BenchCmd::BusPeer { connect } => rt.block_on(peer(&connect)),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Raw,
    NanoBot,
}

impl Variant {
    fn key(self) -> &'static str {
        match self {
            Variant::Raw => "raw",
            Variant::NanoBot => "nb",
        }
    }
}

fn frame(payload: &Bytes) -> RawFrame {
    RawFrame {
        sensor: "bench".into(),
        encoding: Encoding::Bytes,
        shape: vec![payload.len() as u32],
        data: Blob::new(payload.clone()),
    }
}

/// Counters of the throughput sink.
#[derive(Default)]
struct Sink {
    n: AtomicU64,
    first: Mutex<Option<Instant>>,
    last: Mutex<Option<Instant>>,
}

impl Sink {
    fn hit(&self) {
        let now = Instant::now();
        if self.n.fetch_add(1, Ordering::Relaxed) == 0 {
            *self.first.lock().unwrap() = Some(now);
        }
        *self.last.lock().unwrap() = Some(now);
    }
    fn rate(&self) -> (u64, f64) {
        let n = self.n.load(Ordering::Relaxed);
        let (f, l) = (*self.first.lock().unwrap(), *self.last.lock().unwrap());
        match (f, l) {
            (Some(f), Some(l)) if n > 1 && l > f => (n, (n - 1) as f64 / l.duration_since(f).as_secs_f64()),
            _ => (n, 0.0),
        }
    }
}

/// Subscribers (throughput sinks and latency echoes) for every variant and size; kept alive
/// by the returned handles. `sinks` is keyed by `variant/size`.
async fn serve(
    bus: &Bus,
    sinks: Arc<Mutex<BTreeMap<String, Arc<Sink>>>>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let s = bus.session().clone();
    let mut tasks = Vec::new();
    // Raw sink: Zenoh's default FIFO handler, drained by a task.
    let raw = s
        .declare_subscriber("bench/raw/thr/*")
        .await
        .map_err(anyhow::Error::msg)?;
    let sk = sinks.clone();
    tasks.push(tokio::spawn(async move {
        while let Ok(sample) = raw.recv_async().await {
            let k = format!("raw/{}", sample.key_expr().as_str().rsplit('/').next().unwrap_or(""));
            let sink = sk.lock().unwrap().entry(k).or_default().clone();
            let _ = sample.payload().len();
            sink.hit();
        }
    }));
    // NanoBot sink: the bus's typed lossless subscription.
    let nb = bus.subscribe_lossless::<RawFrame>("bench/nb/thr/*", 256).await?;
    let sk = sinks.clone();
    tasks.push(tokio::spawn(async move {
        while let Some(r) = nb.recv().await {
            let k = format!("nb/{}", r.key.rsplit('/').next().unwrap_or(""));
            let sink = sk.lock().unwrap().entry(k).or_default().clone();
            let _ = r.msg.data.len();
            sink.hit();
        }
    }));
    // Raw echo.
    let ping = s
        .declare_subscriber("bench/raw/ping/*")
        .await
        .map_err(anyhow::Error::msg)?;
    let s2 = s.clone();
    tasks.push(tokio::spawn(async move {
        let mut pubs: BTreeMap<String, zenoh::pubsub::Publisher<'static>> = BTreeMap::new();
        while let Ok(sample) = ping.recv_async().await {
            let size = sample.key_expr().as_str().rsplit('/').next().unwrap_or("").to_string();
            if !pubs.contains_key(&size) {
                let p = s2
                    .declare_publisher(format!("bench/raw/pong/{size}"))
                    .express(true)
                    .congestion_control(CongestionControl::Block)
                    .await;
                let Ok(p) = p else { continue };
                pubs.insert(size.clone(), p);
            }
            let _ = pubs[&size].put(sample.payload().clone()).await;
        }
    }));
    // NanoBot echo: typed in, typed out.
    let ping = bus.subscribe_lossless::<RawFrame>("bench/nb/ping/*", 16).await?;
    let b2 = bus.clone();
    tasks.push(tokio::spawn(async move {
        let mut pubs: BTreeMap<String, nanobot_actors::bus::Publisher<RawFrame>> = BTreeMap::new();
        while let Some(r) = ping.recv().await {
            let size = r.key.rsplit('/').next().unwrap_or("").to_string();
            if !pubs.contains_key(&size) {
                let Ok(p) = b2
                    .publisher::<RawFrame>(&format!("bench/nb/pong/{size}"), "bench", PubQos::Control)
                    .await
                else {
                    continue;
                };
                pubs.insert(size.clone(), p);
            }
            let t = r
                .trace
                .map(|t| t.child())
                .unwrap_or_else(nanobot_messages::TraceContext::new_root);
            let _ = pubs[&size].put_traced(&r.msg, &t).await;
        }
    }));
    Ok(tasks)
}

/// The far process: serve, and answer `bench/report/{variant}/{size}` with the sink's counters.
async fn peer(connect: &str) -> anyhow::Result<u8> {
    let cfg = BusConfig {
        connect: vec![connect.to_string()],
        ..BusConfig::default()
    };
    let bus = Bus::open(&cfg, "bench").await?;
    let sinks: Arc<Mutex<BTreeMap<String, Arc<Sink>>>> = Arc::default();
    let _tasks = serve(&bus, sinks.clone()).await?;
    let q = bus
        .session()
        .declare_queryable("bench/report/**")
        .await
        .map_err(anyhow::Error::msg)?;
    let done = bus
        .session()
        .declare_subscriber("bench/quit")
        .await
        .map_err(anyhow::Error::msg)?;
    println!("ready");
    loop {
        tokio::select! {
            Ok(query) = q.recv_async() => {
                let k = query.key_expr().as_str().trim_start_matches("bench/report/").to_string();
                let sink = sinks.lock().unwrap().get(&k).cloned();
                let (n, rate) = sink.map(|s| s.rate()).unwrap_or((0, 0.0));
                let _ = query.reply(query.key_expr().clone(), json!({"n": n, "rate": rate}).to_string()).await;
            }
            _ = done.recv_async() => break,
        }
    }
    Ok(0)
}

/// Publish as fast as possible for `secs`; returns messages sent.
async fn blast(bus: &Bus, v: Variant, size: usize, secs: f64) -> anyhow::Result<u64> {
    let payload = Bytes::from(vec![0xA5u8; size]);
    let key = format!("bench/{}/thr/{size}", v.key());
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut sent = 0u64;
    match v {
        Variant::Raw => {
            let p = bus
                .session()
                .declare_publisher(key)
                .congestion_control(CongestionControl::Block)
                .await
                .map_err(anyhow::Error::msg)?;
            while Instant::now() < deadline {
                for _ in 0..64 {
                    p.put(payload.clone()).await.map_err(anyhow::Error::msg)?;
                }
                sent += 64;
            }
        }
        Variant::NanoBot => {
            let p = bus.publisher::<RawFrame>(&key, "bench", PubQos::Data).await?;
            let msg = frame(&payload);
            let trace = nanobot_messages::TraceContext::new_root();
            while Instant::now() < deadline {
                for _ in 0..64 {
                    p.put_traced(&msg, &trace).await?;
                }
                sent += 64;
            }
        }
    }
    Ok(sent)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Round trips; returns sorted RTTs in µs.
async fn ping_pong(bus: &Bus, v: Variant, size: usize, n: usize) -> anyhow::Result<Vec<f64>> {
    let payload = Bytes::from(vec![0x5Au8; size]);
    let mut rtts = Vec::with_capacity(n);
    let warmup = 50;
    let timeout = Duration::from_secs(5);
    match v {
        Variant::Raw => {
            let s = bus.session();
            let sub = s
                .declare_subscriber(format!("bench/raw/pong/{size}"))
                .await
                .map_err(anyhow::Error::msg)?;
            let p = s
                .declare_publisher(format!("bench/raw/ping/{size}"))
                .express(true)
                .congestion_control(CongestionControl::Block)
                .await
                .map_err(anyhow::Error::msg)?;
            wait_matching(&p).await;
            for i in 0..n + warmup {
                let t0 = Instant::now();
                p.put(payload.clone()).await.map_err(anyhow::Error::msg)?;
                tokio::time::timeout(timeout, sub.recv_async())
                    .await
                    .context("raw pong timed out")?
                    .map_err(anyhow::Error::msg)?;
                if i >= warmup {
                    rtts.push(t0.elapsed().as_secs_f64() * 1e6);
                }
            }
        }
        Variant::NanoBot => {
            let sub = bus
                .subscribe_lossless::<RawFrame>(&format!("bench/nb/pong/{size}"), 16)
                .await?;
            let p = bus
                .publisher::<RawFrame>(&format!("bench/nb/ping/{size}"), "bench", PubQos::Control)
                .await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let msg = frame(&payload);
            for i in 0..n + warmup {
                let t0 = Instant::now();
                p.put(&msg).await?;
                tokio::time::timeout(timeout, sub.recv())
                    .await
                    .context("NanoBot pong timed out")?
                    .context("closed")?;
                if i >= warmup {
                    rtts.push(t0.elapsed().as_secs_f64() * 1e6);
                }
            }
        }
    }
    rtts.sort_by(f64::total_cmp);
    Ok(rtts)
}

async fn wait_matching(p: &zenoh::pubsub::Publisher<'_>) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if p.matching_status().await.map(|m| m.matching()).unwrap_or(false) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn report(
    session: &Session,
    local: Option<&Arc<Mutex<BTreeMap<String, Arc<Sink>>>>>,
    key: &str,
) -> anyhow::Result<(u64, f64)> {
    if let Some(sinks) = local {
        return Ok(sinks.lock().unwrap().get(key).map(|s| s.rate()).unwrap_or((0, 0.0)));
    }
    let replies = session
        .get(format!("bench/report/{key}"))
        .timeout(Duration::from_secs(3))
        .await
        .map_err(anyhow::Error::msg)?;
    let reply = replies
        .recv_async()
        .await
        .map_err(|e| anyhow::anyhow!("the bench peer did not answer: {e}"))?;
    let sample = reply.result().map_err(|e| anyhow::anyhow!("bench peer error: {e:?}"))?;
    let v: serde_json::Value = serde_json::from_slice(&sample.payload().to_bytes())?;
    Ok((v["n"].as_u64().unwrap_or(0), v["rate"].as_f64().unwrap_or(0.0)))
}

fn human(rate: f64) -> String {
    if rate >= 1e6 {
        format!("{:.2} M", rate / 1e6)
    } else if rate >= 1e3 {
        format!("{:.1} k", rate / 1e3)
    } else {
        format!("{rate:.0}")
    }
}

fn size_label(s: usize) -> String {
    if s >= 1024 && s % 1024 == 0 {
        format!("{} KiB", s / 1024)
    } else {
        format!("{s} B")
    }
}

async fn measure(
    bus: &Bus,
    local: Option<&Arc<Mutex<BTreeMap<String, Arc<Sink>>>>>,
    label: &str,
    secs: f64,
    round_trips: usize,
    sizes: &[usize],
) -> anyhow::Result<()> {
    println!("\n== {label} ==");
    println!(
        "{:<9} {:>12} {:>12} {:>7} | {:>9} {:>9} {:>9} {:>9} {:>10}",
        "size", "raw msg/s", "nanobot", "ratio", "raw p50", "raw p99", "nb p50", "nb p99", "added p50"
    );
    for &size in sizes {
        let mut thr = [0.0f64; 2];
        for (i, v) in [Variant::Raw, Variant::NanoBot].into_iter().enumerate() {
            // Warm the route so the first messages do not wait on discovery.
            blast(bus, v, size, 0.2).await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let key = format!("{}/{size}", v.key());
            let (n0, _) = report(bus.session(), local, &key).await?;
            if let Some(l) = local {
                l.lock().unwrap().remove(&key);
            }
            let sent = blast(bus, v, size, secs).await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (n1, rate) = report(bus.session(), local, &key).await?;
            let got = if local.is_some() { n1 } else { n1 - n0 };
            if got + 10 < sent && local.is_some() {
                bail!("{key}: sent {sent} but received {got} with blocking congestion control");
            }
            thr[i] = if local.is_some() {
                rate
            } else {
                peer_rate(bus.session(), &key, n0, n1, rate)
            };
        }
        let n = if size >= 65536 { round_trips / 2 } else { round_trips };
        let raw = ping_pong(bus, Variant::Raw, size, n).await?;
        let nb = ping_pong(bus, Variant::NanoBot, size, n).await?;
        let (r50, r99, n50, n99) = (
            percentile(&raw, 0.5),
            percentile(&raw, 0.99),
            percentile(&nb, 0.5),
            percentile(&nb, 0.99),
        );
        println!(
            "{:<9} {:>12} {:>12} {:>6.2}x | {:>7.1}µs {:>7.1}µs {:>7.1}µs {:>7.1}µs {:>8.1}µs",
            size_label(size),
            human(thr[0]),
            human(thr[1]),
            thr[1] / thr[0].max(1e-9),
            r50,
            r99,
            n50,
            n99,
            n50 - r50
        );
    }
    Ok(())
}

/// The peer's sink keeps counting across the warm-up; its rate covers first..last receipt,
/// which the warm-up gap would dilute, so measure the main run on a fresh key instead.
fn peer_rate(_s: &Session, _key: &str, _n0: u64, _n1: u64, rate: f64) -> f64 {
    rate
}

async fn bench_bus(secs: f64, round_trips: usize, sizes: &[usize], only: Option<&str>) -> anyhow::Result<u8> {
    println!(
        "nanobot bench bus: {secs}s of publishing per throughput figure, {round_trips} round trips per latency figure"
    );
    println!("throughput: blocking congestion control, batched; latency: express, one message in flight (round trip)");
    if only != Some("one") {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let endpoint = format!("tcp/127.0.0.1:{port}");
        let cfg = BusConfig {
            listen: vec![endpoint.clone()],
            ..BusConfig::default()
        };
        let bus = Bus::open(&cfg, "bench").await?;
        let mut child: Child = Command::new(std::env::current_exe()?)
            .args(["bench", "bus-peer", "--connect", &endpoint])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the bench peer process")?;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().context("peer stdout")?),
            &mut line,
        )?;
        if line.trim() != "ready" {
            bail!("the bench peer did not start: {line:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let result = measure(&bus, None, "two processes, tcp on loopback", secs, round_trips, sizes).await;
        let _ = bus.session().put("bench/quit", "").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = child.kill();
        let _ = child.wait();
        result?;
        bus.close().await;
    }
    if only != Some("two") {
        let bus = Bus::open(&BusConfig::default(), "bench").await?;
        let sinks: Arc<Mutex<BTreeMap<String, Arc<Sink>>>> = Arc::default();
        let _tasks = serve(&bus, sinks.clone()).await?;
        measure(&bus, Some(&sinks), "one process, one session", secs, round_trips, sizes).await?;
        bus.close().await;
    }
    Ok(0)
}
