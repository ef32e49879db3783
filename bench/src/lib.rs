//! NanoBot's benchmarks, behind `nanobot bench`: every figure printed beside a baseline measured
//! in the same run (raw Zenoh for the bus, pyarrow for Parquet, one robot at a time for the
//! fleet's batching, ...), because these machines are noisy. One module per bench; the helpers
//! they share are here; their Python baselines are in `bench/python/`. Benches that run a fleet
//! start the calling executable (the `nanobot` CLI) as their nodes.

mod bus;
mod fleet;
mod learning;
mod log;
mod policy;
mod python;
mod replay;
mod sequence;
mod soak;
mod train;
mod transport;

use clap::Subcommand;

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
        /// Only two processes over tcp (`two`), over TLS with mutual authentication (`tls`), or
        /// one process (`one`); default all three.
        #[arg(long)]
        only: Option<String>,
        /// The share of messages that carry a trace context (the bus's default unless given).
        #[arg(long, default_value_t = nanobot_actors::bus::DEFAULT_TRACE_SAMPLE_RATIO)]
        trace_sample_ratio: f64,
    },
    /// Action-chunk latency of the policy (encoder once, DDIM steps), f32 beside MXFP4.
    Policy {
        /// Policy config.
        #[arg(long, default_value = "configs/policy/small.toml")]
        config: std::path::PathBuf,
        /// Timed action chunks per setting.
        #[arg(long, default_value_t = 50)]
        runs: usize,
    },
    /// Logger Parquet throughput beside pyarrow, ingest frames/s, and logger memory.
    Log {
        /// Rows per throughput run.
        #[arg(long, default_value_t = 50_000)]
        rows: u64,
        /// Rows per data file.
        #[arg(long, default_value_t = 16_384)]
        per_file: u64,
        /// Gigabytes of row data to log while measuring peak memory (0: skip).
        #[arg(long, default_value_t = 1.0)]
        memory_gb: f64,
        /// Scratch directory (default: the system temp dir).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
    /// Training samples/s, LoRA beside full fine-tuning (PyTorch's figures as a labelled reference).
    Train {
        #[arg(long, default_value = "configs/policy/small.toml")]
        config: std::path::PathBuf,
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Timed steps per setting.
        #[arg(long, default_value_t = 10)]
        steps: usize,
    },
    /// Training windows/s out of replay (cold, cache warm, through Zenoh) beside the trainer's
    /// samples/s in the same run.
    Replay {
        #[arg(long, default_value = "configs/policy/small.toml")]
        config: std::path::PathBuf,
        /// Rows of simulated fleet data to sample from.
        #[arg(long, default_value_t = 8000)]
        rows: u64,
        #[arg(long, default_value_t = 32)]
        batch: u32,
        /// Timed batches per setting.
        #[arg(long, default_value_t = 60)]
        batches: u64,
        /// Scratch directory (default: the system temp dir).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
    /// The main job measured: launch/sim.toml with a shift to condition B; success before and
    /// after adaptation, minutes to recover, interventions per hour, retention, adapter bytes,
    /// promotion latency.
    Loop(learning::LoopArgs),
    /// The fleet's messages between two processes over each link (tcp, TLS, a unix socket;
    /// tcp and TLS between two network namespaces), beside raw Zenoh on the same link.
    Transport(transport::TransportArgs),
    /// The main job for a long time with a fault every few minutes (kill -9 of each node, a
    /// partition), memory, open files, disk and success sampled each minute; at the end every
    /// dataset verifies and every row is stored once.
    Soak(soak::SoakArgs),
    /// Many simulated robots driven by the trained policy on one node, the node's policy worker
    /// batching their chunks, beside one robot at a time: chunk latency, observation to action,
    /// missed deadlines, CPU per fleet size.
    Fleet(fleet::FleetArgs),
    /// The far side of `bench bus` between two processes (started by it).
    #[command(hide = true)]
    BusPeer {
        #[arg(long)]
        connect: String,
        #[arg(long, value_delimiter = ',')]
        sizes: Vec<usize>,
        /// Connect over TLS with the certificate `node.bench-peer` from this key directory.
        #[arg(long)]
        keys_dir: Option<std::path::PathBuf>,
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
            trace_sample_ratio,
        } => rt.block_on(bus::bench_bus(
            secs,
            round_trips,
            &sizes,
            only.as_deref(),
            trace_sample_ratio,
        )),
        BenchCmd::Loop(args) => learning::run(&rt, args),
        BenchCmd::Soak(args) => soak::run(&rt, args),
        BenchCmd::Transport(args) => rt.block_on(transport::run(args)),
        BenchCmd::Fleet(args) => fleet::run(&rt, args),
        BenchCmd::BusPeer {
            connect,
            sizes,
            keys_dir,
        } => rt.block_on(bus::peer(&connect, &sizes, keys_dir.as_deref())),
        BenchCmd::Policy { config, runs } => policy::run(&config, runs),
        BenchCmd::Train { config, batch, steps } => train::run(&config, batch, steps),
        BenchCmd::Replay {
            config,
            rows,
            batch,
            batches,
            dir,
        } => replay::run(&config, rows, batch, batches, dir.as_deref()),
        BenchCmd::Log {
            rows,
            per_file,
            memory_gb,
            dir,
        } => log::run(rows, per_file, memory_gb, dir.as_deref()),
    }
}

/// (parent pid, utime + stime in clock ticks) of a process, from /proc.
fn stat(pid: u32) -> Option<(u32, f64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command's closing parenthesis: ppid is the 2nd, utime and stime
    // the 12th and 13th.
    let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
    Some((
        f.get(1)?.parse().ok()?,
        f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?,
    ))
}

/// CPU seconds used so far by `pid` and every process under it (a launcher and its nodes, a
/// bench and its peer), counting threads that have exited; clock-tick resolution (10 ms).
pub fn cpu_seconds(pid: u32) -> f64 {
    let procs: Vec<(u32, u32, f64)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| stat(p).map(|(pp, t)| (p, pp, t)))
        .collect();
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(procs.iter().filter(|(_, pp, _)| *pp == parent).map(|(p, _, _)| *p));
        i += 1;
    }
    let ticks: f64 = procs
        .iter()
        .filter(|(p, _, _)| tree.contains(p))
        .map(|(_, _, t)| t)
        .sum();
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// The `p` quantile (0..=1) of `sorted` (ascending); 0 for no samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The `p` quantile of unsorted samples.
pub fn quantile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    percentile(&s, p)
}

/// A field of /proc/self/status in MB (`VmHWM:` the peak resident set, `VmRSS:` the current).
pub fn rss_mb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// The peak resident set so far, MB.
pub fn peak_rss_mb() -> f64 {
    rss_mb("VmHWM:")
}

/// Start measuring the peak resident set afresh (Linux: 5 into clear_refs resets VmHWM).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
