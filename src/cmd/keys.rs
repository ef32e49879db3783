//! `nanobot keys init [DIR] [--operator NAME] [--engineer NAME] [--node NAME] [--launch FILE]`:
//! the fleet's ed25519 signing key pair and its TLS authority, an operator's signing pair, and
//! the certificates of people and nodes (`nanobot_actors::pki`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use nanobot_actors::keys::{key_paths, operator_key_paths, SigningKey};
use nanobot_actors::launch::LaunchFile;
use nanobot_actors::pki::{self, Identity};
use nanobot_actors::{launch, registry};

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Make the fleet key pair: DIR/fleet.key (secret, stays on the promoter's node) and
    /// DIR/fleet.pub (copy it to every robot), and the fleet's TLS authority in DIR/tls/. With
    /// --operator, --engineer, --node or --launch: those parties' files instead (the authority
    /// is made first if missing). Secrets are written readable by their owner only; nothing
    /// that exists is ever overwritten.
    Init {
        /// The fleet key directory (default: the launch file's `[security] keys`, else
        /// state/nb/keys).
        dir: Option<PathBuf>,
        /// An operator: NAME's signing pair in DIR/operators/ (the promoter's `operators` lists
        /// the public half) and the TLS certificate `operator.NAME` (repeatable).
        #[arg(long)]
        operator: Vec<String>,
        /// An engineer who watches: the TLS certificate `engineer.NAME` (repeatable).
        #[arg(long)]
        engineer: Vec<String>,
        /// A node: the TLS certificate `node.NAME` (repeatable).
        #[arg(long)]
        node: Vec<String>,
        /// Every node and person a secured launch file names.
        #[arg(long)]
        launch: Option<PathBuf>,
        /// The fleet the authority is named after (default: the launch file's, else nb).
        #[arg(long)]
        fleet: Option<String>,
    },
}

pub fn keys_cmd(cmd: KeysCmd) -> anyhow::Result<u8> {
    let KeysCmd::Init {
        dir,
        operator,
        engineer,
        node,
        launch: launch_file,
        fleet,
    } = cmd;
    let lf = match &launch_file {
        Some(path) => Some(launch::load(path, &registry::names()).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let security = lf.as_ref().and_then(|l| l.security.as_ref());
    let dir = dir
        .or_else(|| security.map(|s| s.keys.clone()))
        .unwrap_or_else(|| PathBuf::from("state/nb/keys"));
    let fleet = fleet
        .or_else(|| lf.as_ref().map(|l| l.fleet.clone()))
        .unwrap_or_else(|| nanobot_messages::topics::DEFAULT_FLEET.to_string());
    if let (Some(path), None) = (&launch_file, security) {
        anyhow::bail!(
            "{}: no [security] table, so its fleet needs no certificates",
            path.display()
        );
    }
    let parties = operator.len() + engineer.len() + node.len() + usize::from(launch_file.is_some());
    if parties == 0 {
        let key = SigningKey::generate(&dir)?;
        let (secret, public) = key_paths(&dir);
        println!("fleet key {}", key.public_hex());
        println!("  secret: {} (keep it on the promoter's node)", secret.display());
        println!("  public: {} (every robot's policy trusts it)", public.display());
        say_authority(&dir, &fleet)?;
        return Ok(0);
    }
    say_authority(&dir, &fleet)?;
    let mut ids = Vec::new();
    for name in &operator {
        let key = SigningKey::load_or_generate_operator(&dir, name)?;
        let (secret, public) = operator_key_paths(&dir, name);
        println!("operator {name} key {}", key.public_hex());
        println!(
            "  secret: {} (the operator keeps it: `nanobot ckpt … --operator {name} --key FILE`)",
            secret.display()
        );
        println!(
            "  public: {} (list it in the promoter's config: operators = {{ {name} = \"…\" }})",
            public.display()
        );
        ids.push(Identity::operator(name)?);
    }
    for name in &engineer {
        ids.push(Identity::engineer(name)?);
    }
    for name in &node {
        ids.push(Identity::node(name)?);
    }
    if let Some(s) = security {
        ids.extend(s.identities());
    }
    for id in ids {
        let (files, made) = pki::issue(&dir, &fleet, &id)?;
        println!(
            "certificate {id}: {} and {} ({})",
            files.cert.display(),
            files.key.display(),
            if made { "made" } else { "kept: it exists" }
        );
    }
    Ok(0)
}

fn say_authority(dir: &Path, fleet: &str) -> anyhow::Result<()> {
    let made = pki::init_ca(dir, fleet)?;
    let tls = pki::tls_dir(dir);
    println!(
        "fleet authority: {} ({}; its secret {} signs certificates: keep it where you make them)",
        tls.join("ca.pem").display(),
        if made { "made" } else { "kept: it exists" },
        tls.join("ca.key").display()
    );
    Ok(())
}

/// A secured launch file's certificates: made where missing if it says `generate = true`;
/// otherwise an error naming the first missing file and how to make it.
pub fn prepare_security(lf: &LaunchFile, nodes: &[String]) -> anyhow::Result<()> {
    let Some(s) = &lf.security else { return Ok(()) };
    if s.generate {
        let made = pki::ensure(&s.keys, &lf.fleet, &s.identities())
            .with_context(|| format!("making the fleet's certificates in {}", s.keys.display()))?;
        if !made.is_empty() {
            eprintln!(
                "nanobot: made TLS certificates in {}: {}",
                pki::tls_dir(&s.keys).display(),
                made.join(", ")
            );
        }
        return Ok(());
    }
    for node in lf.nodes.iter().filter(|n| nodes.is_empty() || nodes.contains(&n.name)) {
        if let Some(missing) = node.bus.tls.as_ref().and_then(|t| t.missing()) {
            anyhow::bail!(
                "node {}: {} does not exist (make the fleet's certificates with `nanobot keys init --launch {}`)",
                node.name,
                missing.display(),
                lf.path.display()
            );
        }
    }
    Ok(())
}
