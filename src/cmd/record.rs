//! `nanobot record` and `nanobot play`: MCAP recordings of any topics, like rosbag.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use nanobot_record::{PlayOptions, Recording, Remap};

use crate::conn::{connected_count, ConnectArgs};

#[derive(Args)]
pub struct RecordArgs {
    /// Key expressions to record (default: `{fleet}/**`, everything of the fleet).
    keyexprs: Vec<String>,
    /// The MCAP file to write (replaced if it exists).
    #[arg(short, long)]
    output: PathBuf,
    /// Stop after this many seconds (default: at SIGINT or SIGTERM).
    #[arg(long)]
    duration: Option<f64>,
    /// Messages that may wait for the writer; arrivals beyond are dropped and counted.
    #[arg(long, default_value_t = 16384)]
    queue: usize,
    #[command(flatten)]
    conn: ConnectArgs,
}

#[derive(Args)]
pub struct PlayArgs {
    /// An MCAP file written by `nanobot record`.
    file: PathBuf,
    /// Playback speed: 2 plays twice as fast as recorded.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Start over at the end, until interrupted.
    #[arg(long = "loop")]
    looped: bool,
    /// Play keys under FROM under TO instead (repeatable): `--remap nb=lab`.
    #[arg(long)]
    remap: Vec<Remap>,
    /// Seconds to wait for every played key to have a subscriber before starting.
    #[arg(long, default_value_t = 2.0)]
    wait: f64,
    #[command(flatten)]
    conn: ConnectArgs,
}

/// Completes at SIGINT or SIGTERM, or after `duration` seconds.
pub async fn interrupted(duration: Option<f64>) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let term = async {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    let timer = async {
        match duration {
            Some(d) => tokio::time::sleep(Duration::from_secs_f64(d)).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
        _ = timer => {}
    }
}

pub async fn record(args: RecordArgs) -> anyhow::Result<u8> {
    let (_, fleet) = args.conn.resolve()?;
    let keys = if args.keyexprs.is_empty() {
        vec![format!("{fleet}/**")]
    } else {
        args.keyexprs.clone()
    };
    // A peer may be what the fleet connects to, so it starts recording before anyone answers
    // (like `rosbag record`, which waits for its topics).
    let bus = if args.conn.peer {
        args.conn.open_peer().await?
    } else {
        args.conn.open().await?
    };
    let out = args.output.display().to_string();
    let stats = nanobot_record::record(
        bus.session(),
        &keys,
        &args.output,
        args.queue,
        || eprintln!("recording {} to {out} (SIGINT or SIGTERM stops)", keys.join(" ")),
        interrupted(args.duration),
    )
    .await?;
    eprintln!(
        "recorded {} messages ({:.1} MB, {} as raw bytes) on {} channels, {} camera images beside them, {} dropped: {out}",
        stats.messages,
        stats.bytes as f64 / 1e6,
        stats.raw,
        stats.channels,
        stats.images,
        stats.dropped
    );
    if stats.messages == 0 {
        eprintln!(
            "nothing arrived on {} (connected to {} Zenoh node(s))",
            keys.join(" "),
            connected_count(&bus).await
        );
    }
    Ok(0)
}

pub async fn play(args: PlayArgs) -> anyhow::Result<u8> {
    let recording = Recording::open(&args.file)?;
    let topics = recording.topics();
    anyhow::ensure!(
        !topics.is_empty(),
        "{}: the recording has no messages to play",
        args.file.display()
    );
    let bus = args.conn.open().await?;
    let opts = PlayOptions {
        rate: args.rate,
        looped: args.looped,
        remaps: args.remap,
        wait_matched: Duration::from_secs_f64(args.wait.max(0.0)),
    };
    eprintln!(
        "playing {} topics from {} at {}×",
        topics.len(),
        args.file.display(),
        opts.rate
    );
    let stats = nanobot_record::play(bus.session(), recording, &opts, interrupted(None))
        .await
        .with_context(|| format!("playing {}", args.file.display()))?;
    if !stats.unmatched.is_empty() {
        eprintln!("no subscriber when playback started: {}", stats.unmatched.join(" "));
    }
    eprintln!("played {} messages ({} full passes)", stats.messages, stats.loops);
    Ok(0)
}
