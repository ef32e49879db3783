//! `nanobot bench bus`: throughput and round-trip latency through the NanoBot bus (envelope +
//! codec + typed pub/sub), printed beside raw Zenoh pub/sub measured in the same run, between
//! two processes (tcp on loopback) and within one process (one session).
//!
//! Both sides are built alike, as Zenoh's own z_pub_thr / z_sub_thr / z_ping / z_pong are, so
//! the ratio isolates what NanoBot adds: publishers put in a tight synchronous loop (the same
//! payload bytes, shared into each publication), subscribers count in a callback on Zenoh's
//! receive thread — raw Zenoh counts samples, NanoBot decodes each envelope into a typed,
//! borrowed `RawFrameView` first (the owned `RawFrame` where the echo publishes it again);
//! echoes answer from the callback. Blocking congestion control and batching
//! for throughput, express publications for latency.
//!
//! Beside each rate, the CPU time both processes spent per message sent (`/proc`, clock-tick
//! resolution over a run of seconds): the two processes share the machine's cores, so the
//! rate ratio follows the CPU ratio, and the CPU figure says where a difference comes from.

use std::any::Any;
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::percentile;
use bytes::Bytes;
use nanobot_actors::bus::{Bus, BusConfig, PubQos};
use nanobot_actors::pki;
use nanobot_messages::{Blob, Encoding, RawFrame};
use serde_json::json;
use zenoh::qos::CongestionControl;
use zenoh::Wait;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Raw,
    NanoBot,
}

impl Variant {
    const BOTH: [Variant; 2] = [Variant::Raw, Variant::NanoBot];
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

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ns() -> u64 {
    EPOCH.elapsed().as_nanos() as u64
}

/// Counters of one throughput sink.
#[derive(Default)]
struct Counter {
    n: AtomicU64,
    first_ns: AtomicU64,
    last_ns: AtomicU64,
}

impl Counter {
    fn hit(&self) {
        let t = now_ns();
        if self.n.fetch_add(1, Ordering::Relaxed) == 0 {
            self.first_ns.store(t, Ordering::Relaxed);
        }
        self.last_ns.store(t, Ordering::Relaxed);
    }
    fn reset(&self) {
        self.n.store(0, Ordering::Relaxed);
    }
    /// (messages, messages/s between the first and the last).
    fn rate(&self) -> (u64, f64) {
        let n = self.n.load(Ordering::Relaxed);
        let span = self
            .last_ns
            .load(Ordering::Relaxed)
            .saturating_sub(self.first_ns.load(Ordering::Relaxed));
        if n > 1 && span > 0 {
            (n, (n - 1) as f64 * 1e9 / span as f64)
        } else {
            (n, 0.0)
        }
    }
}

type Counters = BTreeMap<String, Arc<Counter>>;

/// Throughput sinks and latency echoes for every variant and size. Returns the counters and
/// the handles that keep the subscriptions alive.
async fn serve(bus: &Bus, sizes: &[usize]) -> anyhow::Result<(Counters, Vec<Box<dyn Any + Send>>)> {
    let s = bus.session();
    let mut counters = Counters::new();
    let mut keep: Vec<Box<dyn Any + Send>> = Vec::new();
    for &size in sizes {
        let c = Arc::new(Counter::default());
        counters.insert(format!("raw/{size}"), c.clone());
        let sub = s
            .declare_subscriber(format!("bench/raw/thr/{size}"))
            .callback(move |sample| {
                std::hint::black_box(sample.payload().len());
                c.hit();
            })
            .await
            .map_err(anyhow::Error::msg)?;
        keep.push(Box::new(sub));
        let c = Arc::new(Counter::default());
        counters.insert(format!("nb/{size}"), c.clone());
        let sub = bus
            .subscribe_view::<RawFrame>(&format!("bench/nb/thr/{size}"), move |r| {
                std::hint::black_box(r.msg.data.len());
                c.hit();
            })
            .await?;
        keep.push(Box::new(sub));

        let pong = s
            .declare_publisher(format!("bench/raw/pong/{size}"))
            .express(true)
            .congestion_control(CongestionControl::Block)
            .await
            .map_err(anyhow::Error::msg)?;
        let sub = s
            .declare_subscriber(format!("bench/raw/ping/{size}"))
            .callback(move |sample| {
                let _ = pong.put(sample.payload().clone()).wait();
            })
            .await
            .map_err(anyhow::Error::msg)?;
        keep.push(Box::new(sub));
        let pong = bus
            .publisher::<RawFrame>(&format!("bench/nb/pong/{size}"), "bench", PubQos::Control)
            .await?;
        let sub = bus
            .subscribe_callback::<RawFrame>(&format!("bench/nb/ping/{size}"), move |r| {
                let trace = r.trace.map(|t| t.child());
                let _ = pong.put_wait(&r.msg, trace.as_ref());
            })
            .await?;
        keep.push(Box::new(sub));
    }
    Ok((counters, keep))
}

/// The far process: serve, and answer `bench/ctl/{report,reset}/{variant}/{size}`.
pub async fn peer(connect: &str, sizes: &[usize], keys_dir: Option<&std::path::Path>) -> anyhow::Result<u8> {
    let cfg = BusConfig {
        connect: vec![connect.to_string()],
        tls: keys_dir.map(|d| pki::files(d, &pki::Identity::node("bench-peer").expect("a valid name"))),
        ..BusConfig::default()
    };
    let bus = Bus::open(&cfg, "bench").await?;
    let (counters, _keep) = serve(&bus, sizes).await?;
    let q = bus
        .session()
        .declare_queryable("bench/ctl/**")
        .await
        .map_err(anyhow::Error::msg)?;
    let quit = bus
        .session()
        .declare_subscriber("bench/quit")
        .await
        .map_err(anyhow::Error::msg)?;
    println!("ready");
    loop {
        tokio::select! {
            Ok(query) = q.recv_async() => {
                let key = query.key_expr().as_str().to_string();
                let rest = key.trim_start_matches("bench/ctl/");
                let (op, which) = rest.split_once('/').unwrap_or((rest, ""));
                let c = counters.get(which).cloned();
                let (n, rate) = c.as_ref().map(|c| c.rate()).unwrap_or((0, 0.0));
                if op == "reset" {
                    if let Some(c) = &c { c.reset() }
                }
                let _ = query.reply(query.key_expr().clone(), json!({"n": n, "rate": rate}).to_string()).await;
            }
            _ = quit.recv_async() => break,
        }
    }
    Ok(0)
}

/// Where the sinks are: in this process, or behind the peer's control queryable.
enum Sinks<'a> {
    Local(&'a Counters),
    Remote(&'a Bus),
}

impl Sinks<'_> {
    async fn ctl(&self, op: &str, which: &str) -> anyhow::Result<(u64, f64)> {
        match self {
            Sinks::Local(c) => {
                let c = c.get(which).context("no such sink")?;
                let r = c.rate();
                if op == "reset" {
                    c.reset();
                }
                Ok(r)
            }
            Sinks::Remote(bus) => {
                let replies = bus
                    .session()
                    .get(format!("bench/ctl/{op}/{which}"))
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
        }
    }
}

/// Publish in a tight loop for `secs`; returns messages sent.
async fn blast(bus: &Bus, v: Variant, size: usize, secs: f64) -> anyhow::Result<u64> {
    let payload = Bytes::from(vec![0xA5u8; size]);
    let key = format!("bench/{}/thr/{size}", v.key());
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let sent = match v {
        Variant::Raw => {
            let p = bus
                .session()
                .declare_publisher(key)
                .congestion_control(CongestionControl::Block)
                .await
                .map_err(anyhow::Error::msg)?;
            tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
                let mut sent = 0;
                while Instant::now() < deadline {
                    for _ in 0..64 {
                        p.put(payload.clone()).wait().map_err(anyhow::Error::msg)?;
                    }
                    sent += 64;
                }
                Ok(sent)
            })
            .await??
        }
        Variant::NanoBot => {
            let p = bus.publisher::<RawFrame>(&key, "bench", PubQos::Data).await?;
            tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
                let msg = frame(&payload);
                let mut sent = 0;
                while Instant::now() < deadline {
                    for _ in 0..64 {
                        p.put_wait(&msg, p.new_trace().as_ref())?;
                    }
                    sent += 64;
                }
                Ok(sent)
            })
            .await??
        }
    };
    Ok(sent)
}

/// Round trips with one message in flight; returns sorted RTTs in µs.
async fn ping_pong(bus: &Bus, v: Variant, size: usize, n: usize) -> anyhow::Result<Vec<f64>> {
    let payload = Bytes::from(vec![0x5Au8; size]);
    let (tx, rx) = sync_channel::<()>(4);
    let warmup = 100;
    let mut keep: Vec<Box<dyn Any + Send>> = Vec::new();
    let ping: Box<dyn Fn() -> anyhow::Result<()> + Send> = match v {
        Variant::Raw => {
            let s = bus.session();
            keep.push(Box::new(
                s.declare_subscriber(format!("bench/raw/pong/{size}"))
                    .callback(move |_| {
                        let _ = tx.try_send(());
                    })
                    .await
                    .map_err(anyhow::Error::msg)?,
            ));
            let p = s
                .declare_publisher(format!("bench/raw/ping/{size}"))
                .express(true)
                .congestion_control(CongestionControl::Block)
                .await
                .map_err(anyhow::Error::msg)?;
            Box::new(move || p.put(payload.clone()).wait().map_err(anyhow::Error::msg))
        }
        Variant::NanoBot => {
            keep.push(Box::new(
                bus.subscribe_view::<RawFrame>(&format!("bench/nb/pong/{size}"), move |_| {
                    let _ = tx.try_send(());
                })
                .await?,
            ));
            let p = bus
                .publisher::<RawFrame>(&format!("bench/nb/ping/{size}"), "bench", PubQos::Control)
                .await?;
            let msg = frame(&payload);
            Box::new(move || {
                p.put_wait(&msg, p.new_trace().as_ref())
                    .map(|_| ())
                    .map_err(anyhow::Error::from)
            })
        }
    };
    // Wait for the route: ping until the first pong comes back.
    let ready = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<f64>> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            ping()?;
            if rx.recv_timeout(Duration::from_millis(100)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!("no pong within 5 s");
            }
        }
        while rx.try_recv().is_ok() {}
        let mut rtts = Vec::with_capacity(n);
        for i in 0..n + warmup {
            let t0 = Instant::now();
            ping()?;
            rx.recv_timeout(Duration::from_secs(5)).context("pong timed out")?;
            if i >= warmup {
                rtts.push(t0.elapsed().as_secs_f64() * 1e6);
            }
        }
        rtts.sort_by(f64::total_cmp);
        Ok(rtts)
    })
    .await??;
    drop(keep);
    Ok(ready)
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

/// Throughput runs per variant and size (alternating; the best counts).
const THROUGHPUT_ROUNDS: usize = 2;

async fn measure(
    bus: &Bus,
    sinks: Sinks<'_>,
    label: &str,
    secs: f64,
    round_trips: usize,
    sizes: &[usize],
) -> anyhow::Result<()> {
    println!("\n== {label} ==");
    println!(
        "{:<9} {:>11} {:>11} {:>6} {:>14} {:>6} {:>9} | {:>8} {:>8} {:>8} {:>8} {:>9}",
        "size",
        "raw msg/s",
        "nanobot",
        "ratio",
        "CPU/msg raw/nb",
        "ratio",
        "nb MB/s",
        "raw p50",
        "raw p99",
        "nb p50",
        "nb p99",
        "added p50"
    );
    let me = std::process::id();
    for &size in sizes {
        // Rounds alternate the order (raw first, then NanoBot first) and each variant keeps
        // its best, so that neither gets the quieter stretch of a noisy machine.
        let mut thr = [0.0f64; 2];
        // CPU per message, publisher and subscriber processes together: what the two cores
        // were busy with, and steadier than the rate on a shared machine.
        let mut cpu = [f64::INFINITY; 2];
        for round in 0..THROUGHPUT_ROUNDS {
            for (i, v) in Variant::BOTH.into_iter().enumerate().cycle().skip(round).take(2) {
                let which = format!("{}/{size}", v.key());
                blast(bus, v, size, 0.3).await?; // warm the route
                tokio::time::sleep(Duration::from_millis(300)).await;
                sinks.ctl("reset", &which).await?;
                let cpu0 = crate::cpu_seconds(me);
                let sent = blast(bus, v, size, secs).await?;
                tokio::time::sleep(Duration::from_millis(300)).await;
                let cpu1 = crate::cpu_seconds(me);
                let (got, rate) = sinks.ctl("report", &which).await?;
                if got < sent {
                    bail!("{which}: sent {sent} but the sink counted {got} with blocking congestion control");
                }
                thr[i] = thr[i].max(rate);
                cpu[i] = cpu[i].min((cpu1 - cpu0) * 1e9 / sent.max(1) as f64);
            }
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
            "{:<9} {:>11} {:>11} {:>5.2}x {:>14} {:>5.2}x {:>9.1} | {:>6.1}µs {:>6.1}µs {:>6.1}µs {:>6.1}µs {:>7.1}µs",
            size_label(size),
            human(thr[0]),
            human(thr[1]),
            thr[1] / thr[0].max(1e-9),
            format!("{:.0}/{:.0} ns", cpu[0], cpu[1]),
            cpu[0] / cpu[1],
            thr[1] * size as f64 / 1e6,
            r50,
            r99,
            n50,
            n99,
            n50 - r50
        );
    }
    Ok(())
}

/// What the envelope itself costs, without the bus: encode and decode of one `RawFrame`.
fn codec_cost(sizes: &[usize]) {
    use nanobot_messages::codec;
    print!("codec per message (encode / decode owned / decode view):");
    for &size in sizes {
        let f = frame(&Bytes::from(vec![1u8; size]));
        let n = (200_000_000 / (size + 256)).clamp(20_000, 1_000_000) as u64;
        let t = Instant::now();
        for i in 0..n {
            std::hint::black_box(codec::encode("bench", i, 0, &f).expect("encodes"));
        }
        let enc = t.elapsed().as_nanos() as f64 / n as f64;
        let wire = Bytes::from(codec::encode("bench", 1, 0, &f).expect("encodes").to_vec());
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(codec::decode::<RawFrame>(wire.clone()).expect("decodes"));
        }
        let dec = t.elapsed().as_nanos() as f64 / n as f64;
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(
                nanobot_messages::decode_view::<nanobot_messages::RawFrameView>(&wire).expect("decodes"),
            );
        }
        let view = t.elapsed().as_nanos() as f64 / n as f64;
        print!("  {}: {enc:.0} / {dec:.0} / {view:.0} ns", size_label(size));
    }
    println!();
    // The envelope's stamp beside the system clock it stands in for (once the TSC's rate has
    // been measured: a process's first stamps read the system clock).
    nanobot_messages::clock::now_ns();
    std::thread::sleep(nanobot_messages::clock::CALIBRATE + Duration::from_millis(10));
    let n = 2_000_000u32;
    let time = |f: fn() -> u64| {
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(f());
        }
        t.elapsed().as_nanos() as f64 / n as f64
    };
    let (stamp, system) = (
        time(nanobot_messages::clock::now_ns),
        time(nanobot_messages::clock::system_now_ns),
    );
    println!("stamp per message: {stamp:.0} ns (the system real-time clock: {system:.0} ns)");
}

pub async fn bench_bus(
    secs: f64,
    round_trips: usize,
    sizes: &[usize],
    only: Option<&str>,
    trace_sample_ratio: f64,
) -> anyhow::Result<u8> {
    println!(
        "nanobot bench bus: {secs}s of publishing per throughput figure, {round_trips} round trips per latency figure"
    );
    println!("throughput: tight put loop, blocking congestion control, batched, best of {THROUGHPUT_ROUNDS} alternating runs; latency: express, one message in flight (round trip)");
    println!(
        "nanobot: typed RawFrame publishers and subscribers, trace context on {:.0} % of messages (trace_sample_ratio {trace_sample_ratio}); \
         in one process the bus hands the message over typed, without encoding",
        trace_sample_ratio * 100.0
    );
    if let Some(o) = only.filter(|o| !["one", "two", "tls"].contains(o)) {
        bail!("--only {o}: say one, two or tls");
    }
    codec_cost(sizes);
    if only.is_none() || only == Some("two") {
        let port = nanobot_actors::bus::free_loopback_port()?;
        two_processes(
            &Link::loopback("tcp", port, None),
            secs,
            round_trips,
            sizes,
            trace_sample_ratio,
        )
        .await?;
    }
    if only.is_none() || only == Some("tls") {
        // The same over TLS with mutual authentication, as a secured fleet runs: certificates
        // from a throwaway authority, made here.
        let dir = std::env::temp_dir().join(format!("nanobot-bench-bus-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ids = [pki::Identity::node("bench")?, pki::Identity::node("bench-peer")?];
        pki::ensure(&dir, "bench", &ids)?;
        let port = nanobot_actors::bus::free_loopback_port()?;
        let link = Link::loopback("tls", port, Some(dir.clone()));
        let result = two_processes(&link, secs, round_trips, sizes, trace_sample_ratio).await;
        let _ = std::fs::remove_dir_all(&dir);
        result?;
    }
    if only.is_none() || only == Some("one") {
        let cfg = BusConfig {
            trace_sample_ratio,
            ..BusConfig::default()
        };
        let bus = Bus::open(&cfg, "bench").await?;
        let (counters, _keep) = serve(&bus, sizes).await?;
        measure(
            &bus,
            Sinks::Local(&counters),
            "one process, one session",
            secs,
            round_trips,
            sizes,
        )
        .await?;
        bus.close().await;
    }
    Ok(0)
}

/// How the two processes of a measurement are joined.
pub struct Link {
    /// What the table is headed with.
    pub label: String,
    /// The endpoint this process listens on, and the one the peer connects to.
    pub listen: String,
    pub connect: String,
    /// TLS with mutual authentication, certificates from this key directory.
    pub keys_dir: Option<std::path::PathBuf>,
    /// The peer's command runs under this prefix (`ip netns exec NS`).
    pub peer_prefix: Vec<String>,
}

impl Link {
    /// Both processes on this host's loopback (`proto` tcp or tls).
    pub fn loopback(proto: &str, port: u16, keys_dir: Option<std::path::PathBuf>) -> Link {
        let endpoint = format!("{proto}/127.0.0.1:{port}");
        Link {
            label: if keys_dir.is_some() {
                "two processes, TLS with mutual authentication on loopback".into()
            } else {
                format!("two processes, {proto} on loopback")
            },
            listen: endpoint.clone(),
            connect: endpoint,
            keys_dir,
            peer_prefix: Vec::new(),
        }
    }
}

/// Both sides in their own process, joined as `link` says.
pub async fn two_processes(
    link: &Link,
    secs: f64,
    round_trips: usize,
    sizes: &[usize],
    trace_sample_ratio: f64,
) -> anyhow::Result<()> {
    let size_list = sizes.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",");
    let keys_dir = link.keys_dir.as_deref();
    let cfg = BusConfig {
        listen: vec![link.listen.clone()],
        trace_sample_ratio,
        tls: keys_dir.map(|d| pki::files(d, &pki::Identity::node("bench").expect("a valid name"))),
        ..BusConfig::default()
    };
    let bus = Bus::open(&cfg, "bench").await?;
    let exe = std::env::current_exe()?;
    let mut peer = match link.peer_prefix.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    peer.args(["bench", "bus-peer", "--connect", &link.connect, "--sizes", &size_list]);
    if let Some(d) = keys_dir {
        peer.arg("--keys-dir").arg(d);
    }
    let mut child: Child = peer
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the bench peer process")?;
    // The peer's "ready" line, read off the async runtime (a blocking pipe read).
    let stdout = child.stdout.take().context("peer stdout")?;
    let line = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        Ok(line)
    })
    .await??;
    if line.trim() != "ready" {
        bail!("the bench peer did not start: {line:?}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let result = measure(&bus, Sinks::Remote(&bus), &link.label, secs, round_trips, sizes).await;
    let _ = bus.session().put("bench/quit", "").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = child.kill();
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    result?;
    bus.close().await;
    Ok(())
}
