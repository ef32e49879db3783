//! `nanobot collect`: the telemetry collector. Device frames from a UDP socket or a serial port
//! go through the ingest checks and alignment straight into one LeRobot dataset per robot
//! (`OUT/{robot}`), with no fleet and no Zenoh. `nanobot verify DIR` checks datasets.
//!
//! Sizes and limits come from `--ingest-config` (the `ingest` actor's fields: `state_dim`,
//! `action_dim`, `surface`, `image`, `rate_hz`, ...) and the dataset's features from
//! `--logger-config` (the `logger` actor's: `robot_type`, `state_names`, `action_names`, `fps`,
//! rotation). Without them a device gets the simulator's defaults: a 6-float state, 2-float
//! action, 8×8 surface, 64×64 camera, `robot_type = "nanobot_sim"` and the simulator's feature
//! names. Paths are relative to the working directory.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use nanobot_actors::ingest::{self, IngestConfig, IngestCore, Produced, RejectLog, SerialConfig, SerialReader};
use nanobot_actors::logger::{frame_of, LoggerConfig};
use nanobot_dataset::DatasetWriter;
use nanobot_messages::device::{DeviceError, DeviceFrame};

#[derive(Args)]
pub struct CollectArgs {
    /// Listen for device frames on this UDP address (e.g. 0.0.0.0:9870).
    #[arg(long, required_unless_present = "serial")]
    udp: Option<String>,
    /// Read device frames from this serial port.
    #[arg(long)]
    serial: Option<String>,
    #[arg(long, default_value_t = 115200)]
    baud: u32,
    /// Output directory: one LeRobot dataset per robot under it.
    #[arg(long)]
    out: PathBuf,
    /// Ingest config (TOML, the `ingest` actor's fields): the sizes frames are checked against
    /// (state_dim, action_dim, surface, image), rate_hz, staleness_ms, max_abs. Default: the
    /// simulator's (6-float state, 2-float action, 8×8 surface, 64×64 camera).
    #[arg(long, verbatim_doc_comment)]
    ingest_config: Option<PathBuf>,
    /// Logger config (TOML, the `logger` actor's fields): the dataset's features (robot_type,
    /// state_names, action_names, fps), file rotation, max_pending_rows. Default: the
    /// simulator's (robot_type "nanobot_sim").
    #[arg(long, verbatim_doc_comment)]
    logger_config: Option<PathBuf>,
    /// Stop after this many seconds (default: until SIGINT/SIGTERM).
    #[arg(long)]
    duration: Option<f64>,
}

fn load_toml<T: serde::de::DeserializeOwned + Default>(path: &Option<PathBuf>) -> anyhow::Result<T> {
    let Some(p) = path else { return Ok(T::default()) };
    let text = std::fs::read_to_string(p).with_context(|| format!("{}", p.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
}

type DeviceResult = Result<DeviceFrame, (String, DeviceError)>;

pub fn collect(args: CollectArgs) -> anyhow::Result<u8> {
    let icfg: IngestConfig = load_toml(&args.ingest_config)?;
    let lcfg: LoggerConfig = load_toml(&args.logger_config)?;
    icfg.validate().map_err(|e| anyhow::anyhow!("ingest config: {e}"))?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("{}", args.out.display()))?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<DeviceResult>(65536);
    if let Some(addr) = &args.udp {
        let sock = std::net::UdpSocket::bind(addr).with_context(|| format!("udp {addr}"))?;
        eprintln!("collect: listening on udp {}", sock.local_addr()?);
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                for r in nanobot_messages::device::decode_datagram(&bytes::Bytes::copy_from_slice(&buf[..n])) {
                    if tx.send(r.map_err(|e| (from.to_string(), e))).is_err() {
                        return;
                    }
                }
            }
        });
    }
    let mut serial = None;
    if let Some(dev) = &args.serial {
        let cfg = SerialConfig {
            device: dev.clone(),
            baud: args.baud,
        };
        let port = ingest::open_serial(&cfg).with_context(|| format!("serial {dev}"))?;
        eprintln!("collect: reading {dev} at {} baud", args.baud);
        let tx = tx.clone();
        serial = Some(SerialReader::spawn(port, dev.clone(), move |f| tx.send(f).is_ok())?);
    }
    drop(tx);
    let stop = crate::signals::install()?;
    let deadline = args.duration.map(|d| Instant::now() + Duration::from_secs_f64(d));
    let mut core = IngestCore::new(icfg);
    let mut writers: BTreeMap<String, DatasetWriter> = BTreeMap::new();
    let mut log = RejectLog::default();
    // Rows waiting in memory while a disk fails are bounded like the logger's; newer rows
    // beyond the bound are dropped and counted per robot.
    let mut over_budget: BTreeMap<String, u64> = BTreeMap::new();
    let flush_every = Duration::from_millis(lcfg.flush_ms.max(1));
    let mut last_flush = Instant::now();
    // Progress once a second while it changes: observations and rejects so far.
    let (mut last_progress, mut reported) = (Instant::now(), (0u64, 0u64));
    let open = |robot: &str| -> anyhow::Result<DatasetWriter> {
        let root = args.out.join(robot);
        DatasetWriter::open(&root, lcfg.spec(), lcfg.writer_config())
            .with_context(|| format!("dataset {}", root.display()))
    };
    loop {
        if stop.load(std::sync::atomic::Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(r) => {
                let out = core.on_device(r);
                match out {
                    Some(Produced::Observation {
                        robot,
                        seq,
                        stamp_ns,
                        obs,
                        ..
                    }) => {
                        if !writers.contains_key(&robot) {
                            writers.insert(robot.clone(), open(&robot)?);
                        }
                        let w = writers.get_mut(&robot).expect("inserted above");
                        if w.pending_rows() >= lcfg.max_pending_rows {
                            *over_budget.entry(robot).or_default() += 1;
                        } else if let Err(e) = w.push(frame_of(seq, stamp_ns, obs)) {
                            tracing::warn!(robot, "observation not logged: {e}");
                        }
                    }
                    Some(Produced::Reject { robot, reject }) => log.warn(&robot, &reject, Duration::from_secs(1)),
                    None => {}
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            let now = core.counts.values().fold((0, 0), |(o, r), c| {
                (o + c.observations, r + c.rejects.values().sum::<u64>())
            });
            if now != reported {
                reported = now;
                eprintln!("collect: {} observations, {} rejects so far", now.0, now.1);
            }
        }
        if last_flush.elapsed() >= flush_every {
            last_flush = Instant::now();
            for (robot, w) in writers.iter_mut() {
                if let Err(e) = w.flush().and_then(|_| w.rotate_if_due()) {
                    tracing::error!(robot, "dataset write failed: {e}");
                }
            }
        }
    }
    drop(serial);
    let mut failed = false;
    for (robot, w) in writers.iter_mut() {
        if let Err(e) = w.finish_file() {
            eprintln!("collect: {robot}: {e}");
            failed = true;
        }
    }
    for (robot, c) in &core.counts {
        let rows = writers.get(robot).map(|w| w.durable().1).unwrap_or(0);
        eprintln!(
            "collect: {robot}: {rows} rows, {} frames accepted, {} observations, {} lost, {} stale, {} dropped over budget, rejects {:?}",
            c.accepted,
            c.observations,
            c.lost,
            c.stale,
            over_budget.get(robot).copied().unwrap_or(0),
            c.rejects
        );
    }
    Ok(if failed { 1 } else { 0 })
}
