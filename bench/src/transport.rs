//! `nanobot bench transport`: the fleet's messages between two processes over each link a
//! fleet can be joined by, each beside raw Zenoh on the same link in the same run (`bench bus`'s
//! measurement): tcp, TLS with mutual authentication and a unix socket on one host; tcp and TLS
//! between two network namespaces over a veth pair (another "host": its own stack, routes and
//! addresses; needs root, skipped otherwise). The sizes are the fleet's: 128 B (an action chunk,
//! a state frame), 4 KiB (a 64×64 JPEG camera frame, an observation), 420 KiB (a `small`
//! policy's LoRA adapter). Zenoh's quic, udp and shared-memory transports are not built into
//! this binary (see docs/benchmarks.md).

use std::process::Command;

use anyhow::bail;
use nanobot_actors::pki;

use crate::bus::{two_processes, Link};

#[derive(clap::Args)]
pub struct TransportArgs {
    /// Seconds of publishing per throughput figure.
    #[arg(long, default_value_t = 1.0)]
    pub secs: f64,
    /// Round trips per latency figure.
    #[arg(long, default_value_t = 1000)]
    pub round_trips: usize,
    #[arg(long, value_delimiter = ',', default_values_t = vec![128, 4096, 430080])]
    pub sizes: Vec<usize>,
    /// Only these links (tcp, tls, unix, netns-tcp, netns-tls); default all.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

/// A network namespace joined to this one by a veth pair: this side `.1`, the namespace `.2`.
struct Veth {
    ns: String,
    prefix: String,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl Veth {
    fn new() -> anyhow::Result<Veth> {
        let pid = std::process::id();
        let v = Veth {
            ns: format!("nbbench{}", pid % 100_000),
            prefix: format!("10.251.{}", pid % 250),
        };
        let host = format!("nbb{}h", pid % 100_000);
        ip(&["netns", "add", &v.ns])?;
        ip(&["-n", &v.ns, "link", "set", "lo", "up"])?;
        ip(&[
            "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &v.ns,
        ])?;
        ip(&["addr", "add", &format!("{}.1/24", v.prefix), "dev", &host])?;
        ip(&["link", "set", &host, "up"])?;
        ip(&["-n", &v.ns, "addr", "add", &format!("{}.2/24", v.prefix), "dev", "eth0"])?;
        ip(&["-n", &v.ns, "link", "set", "eth0", "up"])?;
        Ok(v)
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        // The veth pair goes with the namespace.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

pub async fn run(a: TransportArgs) -> anyhow::Result<u8> {
    println!(
        "nanobot bench transport: {}s of publishing per throughput figure, {} round trips per latency figure; \
         sizes: 128 B an action chunk or a state frame, 4 KiB a camera frame or an observation, 420 KiB a small policy's adapter",
        a.secs, a.round_trips
    );
    println!(
        "not built into this binary: Zenoh's quic, udp and shared-memory transports (docs/benchmarks.md says why)"
    );
    let want = |name: &str| a.only.is_empty() || a.only.iter().any(|o| o == name);
    let tmp = std::env::temp_dir().join(format!("nanobot-bench-transport-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let ids = [pki::Identity::node("bench")?, pki::Identity::node("bench-peer")?];
    pki::ensure(&tmp, "bench", &ids)?;
    let port = || nanobot_actors::bus::free_loopback_port();
    let mut links = Vec::new();
    if want("tcp") {
        links.push(Link::loopback("tcp", port()?, None));
    }
    if want("tls") {
        links.push(Link::loopback("tls", port()?, Some(tmp.clone())));
    }
    if want("unix") {
        let sock = format!("unixsock-stream/{}", tmp.join("bus.sock").display());
        links.push(Link {
            label: "two processes, a unix socket".into(),
            listen: sock.clone(),
            connect: sock,
            keys_dir: None,
            peer_prefix: Vec::new(),
        });
    }
    let veth = if want("netns-tcp") || want("netns-tls") {
        match Veth::new() {
            Ok(v) => Some(v),
            Err(e) => {
                println!("two namespaces: skipped ({e}); they need root and `ip netns`");
                None
            }
        }
    } else {
        None
    };
    if let Some(v) = &veth {
        for (name, proto) in [("netns-tcp", "tcp"), ("netns-tls", "tls")] {
            if !want(name) {
                continue;
            }
            let port = port()?;
            links.push(Link {
                label: format!("two network namespaces over a veth pair, {proto}"),
                listen: format!("{proto}/{}.1:{port}", v.prefix),
                connect: format!("{proto}/{}.1:{port}", v.prefix),
                keys_dir: (proto == "tls").then(|| tmp.clone()),
                peer_prefix: vec!["ip".into(), "netns".into(), "exec".into(), v.ns.clone()],
            });
        }
    }
    let ratio = nanobot_actors::bus::DEFAULT_TRACE_SAMPLE_RATIO;
    let mut result = Ok(());
    for link in &links {
        if let Err(e) = two_processes(link, a.secs, a.round_trips, &a.sizes, ratio).await {
            println!("{}: failed: {e:#}", link.label);
            result = Err(e);
        }
    }
    drop(veth);
    let _ = std::fs::remove_dir_all(&tmp);
    result.map(|_| 0)
}
