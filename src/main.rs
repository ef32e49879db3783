//! `nanobot`: the one CLI — launch a fleet, run a node, and look at any topic.

mod cmd;
mod conn;
mod signals;
mod tls;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cmd::{
    ckpt, collect, dashboard, demos, doctor, eval, export, foxglove, keys, launcher, node, record, schema, serve,
    topic, train, tune, verify,
};

#[derive(Parser)]
#[command(
    name = "nanobot",
    version,
    about = "NanoBot: a fleet of robots that learns while it works, over Zenoh"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start every node of a launch file as child processes; restart crashed ones.
    Launch {
        file: PathBuf,
        /// Start only these nodes (repeatable).
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// Seconds a node gets to stop after SIGTERM before SIGKILL.
        #[arg(long, default_value_t = 10.0)]
        grace: f64,
        /// Serve the web dashboard too, on this address (e.g. 127.0.0.1:8080).
        #[arg(long)]
        dashboard: Option<String>,
    },
    /// Run one node of a launch file in this process (the multi-machine case).
    Run {
        #[arg(long)]
        launch: PathBuf,
        #[arg(long)]
        node: String,
    },
    /// Inspect and publish topics of a running fleet.
    Topic {
        #[command(subcommand)]
        cmd: topic::TopicCmd,
    },
    /// Record topics of a running fleet into an MCAP file (Foxglove opens it), like rosbag.
    Record(record::RecordArgs),
    /// Play an MCAP recording back onto the bus: same messages, order and pace.
    Play(record::PlayArgs),
    /// The fleet in a browser: nodes, topics, cameras, actions, training, promotions, success.
    Dashboard(dashboard::DashboardArgs),
    /// Serve the fleet's live topics to Foxglove (its WebSocket protocol), camera frames as images.
    Foxglove(foxglove::FoxgloveArgs),
    /// Nodes and actors of a running fleet.
    Node {
        #[command(subcommand)]
        cmd: node::NodeCmd,
    },
    /// Check config, endpoints, connectivity and data flow.
    Doctor {
        #[command(flatten)]
        conn: conn::ConnectArgs,
    },
    /// Collect device frames (UDP or serial) straight into LeRobot datasets, without a fleet.
    Collect(collect::CollectArgs),
    /// Check datasets against their manifests: every file present, intact and as listed.
    Verify {
        /// Dataset directories, or directories holding datasets.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
    },
    /// Record the scripted expert's demonstrations in the simulator, as LeRobot datasets.
    Demos(demos::DemosArgs),
    /// Pretrain the policy's base from LeRobot datasets (AdamW, warmup, checkpoints).
    Train(train::TrainArgs),
    /// Closed-loop success of a checkpoint in the simulator, beside the expert's, per condition.
    Eval(eval::EvalArgs),
    /// Measure this machine's best settings (policy worker threads and batch, DDIM steps,
    /// weight precision, trainer batch and learning rate) and write them for launch files.
    Tune(tune::TuneArgs),
    /// Export a checkpoint (adapter merged) to safetensors or GGUF (f32, f16, q8_0, mxfp4).
    Export(export::ExportArgs),
    /// Serve a policy over HTTP: POST /v1/act, GET /v1/model, /healthz, /metrics.
    Serve(serve::ServeArgs),
    /// The body layout of every message kind: fields, types, widths, enum values.
    Schema(schema::SchemaArgs),
    /// The fleet's signing keys.
    Keys {
        #[command(subcommand)]
        cmd: keys::KeysCmd,
    },
    /// A running fleet's candidates, decisions and rollout (its promoter's ledger).
    Ckpt {
        #[command(subcommand)]
        cmd: ckpt::CkptCmd,
    },
    /// Benchmarks, each printed beside a baseline measured in the same run.
    Bench {
        #[command(subcommand)]
        cmd: nanobot_bench::BenchCmd,
    },
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi)
        .init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// Process-wide settings for candle's CPU math, made before any thread starts (measured with
/// `nanobot bench train` and `nanobot bench policy`):
/// - candle's element-wise ops run on the calling thread (`CANDLE_NUM_THREADS=1`, unless set):
///   its spinning pool costs more than it saves on this model's small tensors, and it serializes
///   threads that each do their own math (training shards, robots' policies);
/// - glibc keeps freed memory for reuse instead of handing it back and faulting it in again on
///   the next training step.
fn tune_process() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

fn main() -> ExitCode {
    tune_process();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Launch {
            file,
            nodes,
            grace,
            dashboard,
        } => {
            init_tracing("info");
            launcher::launch(&file, &nodes, grace, dashboard.as_deref())
        }
        Cmd::Run {
            launch: file,
            node: name,
        } => {
            init_tracing("info,zenoh=warn");
            cmd::run::run_node(&file, &name)
        }
        Cmd::Topic { cmd } => {
            init_tracing("warn,zenoh=error");
            runtime().and_then(|rt| rt.block_on(topic::run(cmd)))
        }
        Cmd::Record(args) => {
            init_tracing("warn,zenoh=error");
            runtime().and_then(|rt| rt.block_on(record::record(args)))
        }
        Cmd::Play(args) => {
            init_tracing("warn,zenoh=error");
            runtime().and_then(|rt| rt.block_on(record::play(args)))
        }
        Cmd::Dashboard(args) => {
            init_tracing("warn,zenoh=error");
            runtime().and_then(|rt| rt.block_on(dashboard::dashboard(args)))
        }
        Cmd::Foxglove(args) => {
            init_tracing("warn,zenoh=error");
            runtime().and_then(|rt| rt.block_on(foxglove::foxglove(args)))
        }
        Cmd::Node { cmd } => {
            init_tracing("warn,zenoh=error");
            runtime().and_then(|rt| rt.block_on(node::node_cmd(cmd)))
        }
        Cmd::Doctor { conn } => {
            init_tracing("warn,zenoh=error");
            runtime().and_then(|rt| rt.block_on(doctor::doctor(conn)))
        }
        Cmd::Collect(args) => {
            init_tracing("info");
            collect::collect(args)
        }
        Cmd::Verify { dirs } => {
            init_tracing("warn");
            verify::verify_cmd(&dirs)
        }
        Cmd::Train(args) => {
            init_tracing("warn");
            train::train(args)
        }
        Cmd::Demos(args) => {
            init_tracing("warn");
            demos::demos(args)
        }
        Cmd::Eval(args) => {
            init_tracing("warn");
            eval::eval(args)
        }
        Cmd::Tune(args) => {
            init_tracing("warn");
            tune::tune(args)
        }
        Cmd::Export(args) => {
            init_tracing("warn");
            export::export(args)
        }
        Cmd::Serve(args) => {
            init_tracing("info");
            runtime().and_then(|rt| rt.block_on(serve::serve(args)))
        }
        Cmd::Schema(args) => {
            init_tracing("warn");
            schema::schema_cmd(args)
        }
        Cmd::Keys { cmd } => {
            init_tracing("warn");
            keys::keys_cmd(cmd)
        }
        Cmd::Ckpt { cmd } => {
            init_tracing("warn,zenoh=error");
            runtime().and_then(|rt| rt.block_on(ckpt::ckpt_cmd(cmd)))
        }
        Cmd::Bench { cmd } => {
            init_tracing("warn,zenoh=error");
            nanobot_bench::run(cmd)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("nanobot: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_tree_is_consistent() {
        // clap checks every command, argument, default and conflict of the whole tree.
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
