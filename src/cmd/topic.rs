//! `nanobot topic list|echo|hz|bw|pub`: look at any topic of a running fleet, decoded.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Subcommand;
use nanobot_actors::bus::{payload_bytes, sample_trace};
use nanobot_messages::{codec, decode_any, from_json, json, topics};
use serde_json::{json, Value};
use zenoh::sample::Sample;

use crate::conn::{connected_count, ConnectArgs};

#[derive(Subcommand)]
pub enum TopicCmd {
    /// Topics seen on the bus for a while, with their kind and rate.
    List {
        /// Key expression to watch (default: `{fleet}/**`).
        keyexpr: Option<String>,
        #[arg(long, default_value_t = 2.0)]
        duration: f64,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Print messages, decoded.
    Echo {
        keyexpr: String,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Stop after N messages.
        #[arg(long)]
        count: Option<u64>,
        /// Print blobs in full (default: their size).
        #[arg(long)]
        full: bool,
        /// Fail if no message arrives within this many seconds (0: wait forever).
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Message rate per key.
    Hz {
        keyexpr: String,
        /// Stop after this many seconds (default: run until interrupted).
        #[arg(long)]
        duration: Option<f64>,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Bandwidth per key.
    Bw {
        keyexpr: String,
        #[arg(long)]
        duration: Option<f64>,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Publish a message given in its JSON view (as `echo --json` prints it).
    Pub {
        keyexpr: String,
        /// `{"kind":"ActionChunk","msg":{…}}` (`robot` and `seq` optional).
        json: String,
        /// Robot id in the envelope (default: from the JSON or the key).
        #[arg(long)]
        robot: Option<String>,
        #[arg(long, default_value_t = 1)]
        count: u64,
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// Wait up to this many seconds for a matching subscriber before publishing (as
        /// `ros2 topic pub --wait-matching-subscriptions`); publish anyway after it.
        #[arg(long, default_value_t = 2.0)]
        wait: f64,
        #[command(flatten)]
        conn: ConnectArgs,
    },
}

/// The JSON view of one sample, or of why it does not decode.
pub fn sample_json(sample: &Sample, full: bool) -> Value {
    let key = sample.key_expr().as_str();
    let bytes = payload_bytes(sample.payload());
    let mut v = match decode_any(bytes.clone()) {
        Ok((header, msg)) => json::to_json(&header, &msg),
        Err(e) => json!({
            "error": e.to_string(),
            "bytes": bytes.len(),
            "text": std::str::from_utf8(&bytes).ok().filter(|s| s.len() <= 256),
        }),
    };
    if !full {
        summarize_blobs(&mut v);
    }
    let obj = v.as_object_mut().expect("the JSON view is an object");
    obj.insert("key".into(), json!(key));
    if let Some(t) = sample_trace(sample) {
        obj.insert("traceparent".into(), json!(t.to_string()));
    }
    v
}

/// Replace long base64 strings by their decoded size.
fn summarize_blobs(v: &mut Value) {
    match v {
        Value::String(s) if s.len() > 96 => *s = format!("<{} bytes>", s.len() / 4 * 3),
        Value::Array(a) if a.len() > 64 => {
            let n = a.len();
            a.truncate(8);
            a.push(json!(format!("… {n} values")));
        }
        Value::Array(a) => a.iter_mut().for_each(summarize_blobs),
        Value::Object(o) => o.values_mut().for_each(summarize_blobs),
        _ => {}
    }
}

fn default_key(conn: &ConnectArgs) -> anyhow::Result<String> {
    Ok(format!("{}/**", conn.resolve()?.1))
}

#[derive(Default)]
struct KeyStats {
    kind: String,
    count: u64,
    bytes: u64,
    first: Option<Instant>,
    last: Option<Instant>,
    periods: Vec<f64>,
    sizes_min: usize,
    sizes_max: usize,
}

type Table = Arc<Mutex<BTreeMap<String, KeyStats>>>;

async fn watch(
    conn: &ConnectArgs,
    key: &str,
) -> anyhow::Result<(nanobot_actors::bus::Bus, zenoh::pubsub::Subscriber<()>, Table)> {
    let bus = conn.open().await?;
    let table: Table = Arc::default();
    let t = table.clone();
    let sub = bus
        .session()
        .declare_subscriber(key.to_string())
        .callback(move |sample| {
            let now = Instant::now();
            let len = sample.payload().len();
            let kind = codec::peek_header(&sample.payload().to_bytes())
                .map(|(h, _)| h.kind.name().to_string())
                .unwrap_or_else(|e| format!("(not NanoBot: {e})"));
            let mut map = t.lock().unwrap();
            let s = map.entry(sample.key_expr().as_str().to_string()).or_default();
            if let Some(last) = s.last {
                s.periods.push(now.duration_since(last).as_secs_f64());
                if s.periods.len() > 10_000 {
                    s.periods.drain(..5_000);
                }
            }
            s.kind = kind;
            s.count += 1;
            s.bytes += len as u64;
            s.first.get_or_insert(now);
            s.last = Some(now);
            s.sizes_min = if s.count == 1 { len } else { s.sizes_min.min(len) };
            s.sizes_max = s.sizes_max.max(len);
        })
        .await
        .map_err(|e| anyhow::anyhow!("subscribing to {key}: {e}"))?;
    Ok((bus, sub, table))
}

/// Messages per second from the mean period between arrivals.
fn rate(s: &KeyStats) -> f64 {
    let mean = s.periods.iter().sum::<f64>() / s.periods.len().max(1) as f64;
    if mean > 0.0 {
        1.0 / mean
    } else {
        0.0
    }
}

async fn run_for(duration: Option<f64>) {
    match duration {
        Some(d) => tokio::time::sleep(Duration::from_secs_f64(d)).await,
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

pub async fn run(cmd: TopicCmd) -> anyhow::Result<u8> {
    match cmd {
        TopicCmd::List {
            keyexpr,
            duration,
            conn,
        } => {
            let key = match keyexpr {
                Some(k) => k,
                None => default_key(&conn)?,
            };
            let (bus, _sub, table) = watch(&conn, &key).await?;
            tokio::time::sleep(Duration::from_secs_f64(duration)).await;
            let map = table
                .lock()
                .unwrap()
                .iter()
                .map(|(k, s)| (k.clone(), s.kind.clone(), s.count))
                .collect::<Vec<_>>();
            if map.is_empty() {
                bail!(
                    "connected to {} Zenoh node(s), but no message on {key} within {duration}s",
                    connected_count(&bus).await
                );
            }
            println!("{:<40} {:<18} {:>9}", "KEY", "KIND", "RATE Hz");
            for (k, kind, count) in &map {
                println!("{k:<40} {kind:<18} {:>9.1}", *count as f64 / duration);
            }
            Ok(0)
        }
        TopicCmd::Echo {
            keyexpr,
            json,
            count,
            full,
            timeout,
            conn,
        } => echo(&conn, &keyexpr, json, count, full, timeout).await,
        TopicCmd::Hz {
            keyexpr,
            duration,
            conn,
        } => {
            let (bus, _sub, table) = watch(&conn, &keyexpr).await?;
            stats_loop(&table, duration, |k, s| {
                let n = s.periods.len().max(1) as f64;
                let mean = s.periods.iter().sum::<f64>() / n;
                let sd = (s.periods.iter().map(|p| (p - mean).powi(2)).sum::<f64>() / n).sqrt();
                let min = s.periods.iter().copied().fold(f64::INFINITY, f64::min);
                let max = s.periods.iter().copied().fold(0.0, f64::max);
                format!(
                    "{k}: average rate {:.2} Hz\n    min {:.4}s max {:.4}s std dev {:.5}s window {}",
                    rate(s),
                    if min.is_finite() { min } else { 0.0 },
                    max,
                    sd,
                    s.count
                )
            })
            .await;
            finish(&bus, &table, &keyexpr).await
        }
        TopicCmd::Bw {
            keyexpr,
            duration,
            conn,
        } => {
            let (bus, _sub, table) = watch(&conn, &keyexpr).await?;
            stats_loop(&table, duration, |k, s| {
                let secs = match (s.first, s.last) {
                    (Some(a), Some(b)) if b > a => b.duration_since(a).as_secs_f64(),
                    _ => 1.0,
                };
                format!(
                    "{k}: {:.1} KB/s mean {:.1} KB min {:.1} KB max {:.1} KB n {}",
                    s.bytes as f64 / secs / 1e3,
                    s.bytes as f64 / s.count.max(1) as f64 / 1e3,
                    s.sizes_min as f64 / 1e3,
                    s.sizes_max as f64 / 1e3,
                    s.count
                )
            })
            .await;
            finish(&bus, &table, &keyexpr).await
        }
        TopicCmd::Pub {
            keyexpr,
            json,
            robot,
            count,
            rate,
            wait,
            conn,
        } => publish(&conn, &keyexpr, &json, robot, count, rate, wait).await,
    }
}

async fn stats_loop(table: &Table, duration: Option<f64>, line: impl Fn(&str, &KeyStats) -> String) {
    let print = |table: &Table| {
        let map = table.lock().unwrap();
        let mut out = std::io::stdout().lock();
        for (k, s) in map.iter() {
            let _ = writeln!(out, "{}", line(k, s));
        }
        let _ = out.flush();
    };
    let stop = run_for(duration);
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => print(table),
        }
    }
    print(table);
}

async fn finish(bus: &nanobot_actors::bus::Bus, table: &Table, key: &str) -> anyhow::Result<u8> {
    if table.lock().unwrap().is_empty() {
        bail!(
            "connected to {} Zenoh node(s), but no message on {key}",
            connected_count(bus).await
        );
    }
    Ok(0)
}

async fn echo(
    conn: &ConnectArgs,
    key: &str,
    as_json: bool,
    count: Option<u64>,
    full: bool,
    timeout: f64,
) -> anyhow::Result<u8> {
    let bus = conn.open().await?;
    let sub = bus
        .session()
        .declare_subscriber(key.to_string())
        .with(flume::bounded::<Sample>(1024))
        .await
        .map_err(|e| anyhow::anyhow!("subscribing to {key}: {e}"))?;
    let mut printed = 0u64;
    let first_deadline = (timeout > 0.0).then(|| tokio::time::Instant::now() + Duration::from_secs_f64(timeout));
    loop {
        if count.is_some_and(|n| printed >= n) {
            return Ok(0);
        }
        let sample = match (printed, first_deadline) {
            (0, Some(deadline)) => match tokio::time::timeout_at(deadline, sub.recv_async()).await {
                Ok(s) => s,
                Err(_) => bail!(
                    "connected to {} Zenoh node(s), but no message on {key} within {timeout}s",
                    connected_count(&bus).await
                ),
            },
            _ => tokio::select! {
                s = sub.recv_async() => s,
                _ = tokio::signal::ctrl_c() => return Ok(0),
            },
        };
        let sample = sample.context("subscription closed")?;
        let v = sample_json(&sample, full);
        let mut out = std::io::stdout().lock();
        if as_json {
            writeln!(out, "{v}")?;
        } else {
            let head = format!(
                "{} {} robot={} seq={}",
                v["key"].as_str().unwrap_or(""),
                v["kind"].as_str().unwrap_or("?"),
                v["robot"].as_str().unwrap_or(""),
                v["seq"]
            );
            let body = v.get("msg").or(v.get("error")).cloned().unwrap_or(Value::Null);
            writeln!(out, "{head}\n  {body}")?;
        }
        out.flush()?;
        printed += 1;
    }
}

async fn publish(
    conn: &ConnectArgs,
    key: &str,
    text: &str,
    robot: Option<String>,
    count: u64,
    rate: f64,
    wait: f64,
) -> anyhow::Result<u8> {
    let value: Value = serde_json::from_str(text).context("the message is not JSON")?;
    let parsed = from_json(&value).map_err(|e| anyhow::anyhow!("the message does not match its kind: {e}"))?;
    let (_, fleet) = conn.resolve()?;
    let robot = robot
        .or(parsed.robot)
        .or_else(|| topics::robot_of(&fleet, key).map(str::to_string))
        .unwrap_or_default();
    let bus = conn.open().await?;
    let publisher = bus
        .session()
        .declare_publisher(key.to_string())
        .await
        .map_err(|e| anyhow::anyhow!("publishing on {key}: {e}"))?;
    // Give subscriptions a moment to propagate so that a one-shot publication is not lost.
    let deadline = Instant::now() + Duration::from_secs_f64(wait.max(0.0));
    while Instant::now() < deadline {
        if publisher.matching_status().await.map(|m| m.matching()).unwrap_or(true) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let period = Duration::from_secs_f64(1.0 / rate.max(1e-3));
    let first_seq = parsed.seq.unwrap_or(0);
    for i in 0..count {
        let enc = codec::encode_any(&robot, first_seq + i, codec::now_ns(), &parsed.msg)?;
        let trace = nanobot_messages::TraceContext::new_root();
        publisher
            .put(enc.to_vec())
            .attachment(trace.to_string())
            .await
            .map_err(|e| anyhow::anyhow!("publishing on {key}: {e}"))?;
        if i + 1 < count {
            tokio::time::sleep(period).await;
        }
    }
    // Let the last message leave before the session closes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    bus.close().await;
    Ok(0)
}
