//! Hosts for tests that cross machines: Linux network namespaces joined by a bridge, one per
//! "host", with a veth pair each; the test's own process stays in the root namespace and
//! reaches every host through the bridge. Cutting a host's link (its veth set down at the
//! bridge) is a partition: no reset, no error, packets just stop, as when a robot drives out of
//! Wi-Fi range. Needs root (CI runs as root); set NB_NO_NETNS=1 to skip these tests elsewhere.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct Net {
    hosts: Vec<String>,
    id: String,
    prefix: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("the ip command runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Net {
    /// One namespace per host name, at `.1`, `.2`, … of a /24 of its own; the root namespace is
    /// `.254` on the bridge. None when NB_NO_NETNS is set.
    pub fn new(hosts: &[&str]) -> Option<Net> {
        if std::env::var_os("NB_NO_NETNS").is_some() {
            eprintln!("skipped: NB_NO_NETNS is set");
            return None;
        }
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id() as usize;
        let id = format!("{}{}", pid % 100_000, n % 10);
        let prefix = format!("10.{}.{}", 200 + pid % 50, (pid / 50 + n) % 250);
        let net = Net {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            id,
            prefix,
        };
        let bridge = net.bridge();
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("{}.254/24", net.prefix), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        for (k, h) in hosts.iter().enumerate() {
            let (ns, veth) = (net.ns(h), net.veth(h));
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            ip(&["link", "set", &veth, "master", &bridge, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}.{}/24", net.prefix, k + 1),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        }
        Some(net)
    }

    fn bridge(&self) -> String {
        format!("nb{}br", self.id)
    }

    fn index(&self, host: &str) -> usize {
        self.hosts.iter().position(|h| h == host).expect("a host of this net")
    }

    pub fn ns(&self, host: &str) -> String {
        format!("nb{}-{host}", self.id)
    }

    fn veth(&self, host: &str) -> String {
        format!("nb{}v{}", self.id, self.index(host))
    }

    /// The host's address.
    pub fn addr(&self, host: &str) -> String {
        format!("{}.{}", self.prefix, self.index(host) + 1)
    }

    /// `cmd` run inside the host's namespace (`ip netns exec`), with its environment.
    pub fn inside(&self, host: &str, cmd: &Command) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(host)])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        if let Some(d) = cmd.get_current_dir() {
            c.current_dir(d);
        }
        c
    }

    /// Cut the host off: its link goes down at the bridge.
    pub fn cut(&self, host: &str) {
        ip(&["link", "set", &self.veth(host), "down"]);
    }

    pub fn heal(&self, host: &str) {
        ip(&["link", "set", &self.veth(host), "up"]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(h)]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge()]).output();
    }
}
