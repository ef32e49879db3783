//! `nanobot keys init [DIR] [--operator NAME]`: the fleet's ed25519 signing key pair, or an
//! operator's.

use std::path::PathBuf;

use clap::Subcommand;
use nanobot_actors::keys::{key_paths, operator_key_paths, SigningKey};

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Make the fleet key pair: DIR/fleet.key (secret, stays on the promoter's node) and
    /// DIR/fleet.pub (copy it to every robot); or, with --operator NAME, an operator's pair in
    /// DIR/operators/ (the promoter's `operators` lists the public half). Secrets are written
    /// readable by their owner only; an existing key is never overwritten.
    Init {
        #[arg(default_value = "state/nb/keys")]
        dir: PathBuf,
        /// Make operator NAME's key pair instead of the fleet's.
        #[arg(long)]
        operator: Option<String>,
    },
}

pub fn keys_cmd(cmd: KeysCmd) -> anyhow::Result<u8> {
    match cmd {
        KeysCmd::Init { dir, operator: None } => {
            let key = SigningKey::generate(&dir)?;
            let (secret, public) = key_paths(&dir);
            println!("fleet key {}", key.public_hex());
            println!("  secret: {} (keep it on the promoter's node)", secret.display());
            println!("  public: {} (every robot's policy trusts it)", public.display());
            Ok(0)
        }
        KeysCmd::Init {
            dir,
            operator: Some(name),
        } => {
            let key = SigningKey::generate_operator(&dir, &name)?;
            let (secret, public) = operator_key_paths(&dir, &name);
            println!("operator {name} key {}", key.public_hex());
            println!(
                "  secret: {} (the operator keeps it: `nanobot ckpt … --operator {name} --key FILE`)",
                secret.display()
            );
            println!(
                "  public: {} (list it in the promoter's config: operators = {{ {name} = \"…\" }})",
                public.display()
            );
            Ok(0)
        }
    }
}
