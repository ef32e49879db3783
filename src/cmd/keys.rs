//! `nanobot keys init DIR`: the fleet's ed25519 signing key pair.

use std::path::PathBuf;

use clap::Subcommand;
use nanobot_actors::keys::{key_paths, SigningKey};

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Make the fleet key pair: DIR/fleet.key (secret, stays on the promoter's node) and
    /// DIR/fleet.pub (copy it to every robot). An existing key is never overwritten.
    Init {
        #[arg(default_value = "state/nb/keys")]
        dir: PathBuf,
    },
}

pub fn keys_cmd(cmd: KeysCmd) -> anyhow::Result<u8> {
    match cmd {
        KeysCmd::Init { dir } => {
            let key = SigningKey::generate(&dir)?;
            let (secret, public) = key_paths(&dir);
            println!("fleet key {}", key.public_hex());
            println!("  secret: {} (keep it on the promoter's node)", secret.display());
            println!("  public: {} (every robot's policy trusts it)", public.display());
            Ok(0)
        }
    }
}
