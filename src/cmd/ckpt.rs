//! `nanobot ckpt list | show ID | promote ID | rollback`: ask a running fleet's promoter (the queryable `{fleet}/ckpt/control/{op}`) about
//! its candidates, decisions and rollout, or change the rollout by hand.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use nanobot_actors::keys::{operator_key_paths, validate_operator, SigningKey};
use nanobot_messages::{codec::now_ns, topics, CkptCommand, CkptReply};

use crate::conn::ConnectArgs;

#[derive(Subcommand)]
pub enum CkptCmd {
    /// Every candidate with the promoter's decision, and the rollout.
    List {
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Every ledger record about one candidate.
    Show {
        id: String,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Promote a candidate to every robot now (it must load on the base; the gates and the
    /// canary are skipped: an operator's decision, recorded with the operator's name).
    Promote {
        id: String,
        #[command(flatten)]
        operator: OperatorArgs,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Put the fleet back on the adapter it ran before the current one.
    Rollback {
        #[command(flatten)]
        operator: OperatorArgs,
        #[command(flatten)]
        conn: ConnectArgs,
    },
}

/// Who signs a command that changes the rollout.
#[derive(clap::Args)]
pub struct OperatorArgs {
    /// The operator's name, as the promoter's `operators` lists it (default:
    /// $NANOBOT_OPERATOR, else `dev`, the development fleet's operator).
    #[arg(long)]
    operator: Option<String>,
    /// The operator's secret key (default: $NANOBOT_OPERATOR_KEY, else
    /// `state/{fleet}/keys/operators/{NAME}.key`, where `nanobot keys init --operator NAME`
    /// and the development fleet put it).
    #[arg(long)]
    key: Option<PathBuf>,
}

impl OperatorArgs {
    /// `cmd`, signed by the operator for `fleet`.
    /// The operator's name: --operator, else $NANOBOT_OPERATOR, else `dev`.
    fn name(&self) -> String {
        self.operator
            .clone()
            .or_else(|| std::env::var("NANOBOT_OPERATOR").ok())
            .unwrap_or_else(|| "dev".into())
    }

    fn sign(self, mut cmd: CkptCommand, fleet: &str) -> anyhow::Result<CkptCommand> {
        let name = self.name();
        validate_operator(&name).map_err(anyhow::Error::msg)?;
        let path = self
            .key
            .or_else(|| std::env::var_os("NANOBOT_OPERATOR_KEY").map(PathBuf::from))
            .unwrap_or_else(|| operator_key_paths(&PathBuf::from(format!("state/{fleet}/keys")), &name).0);
        let key = SigningKey::load(&path).with_context(|| {
            format!("operator {name:?}'s key (make one with `nanobot keys init --operator {name}`, or give --key)")
        })?;
        cmd.operator = name;
        cmd.issued_ms = now_ns() / 1_000_000;
        cmd.signature = key.sign(&cmd.signed_text(fleet));
        Ok(cmd)
    }
}

pub async fn ckpt_cmd(cmd: CkptCmd) -> anyhow::Result<u8> {
    let (op, id, operator, conn) = match cmd {
        CkptCmd::List { conn } => ("list", String::new(), None, conn),
        CkptCmd::Show { id, conn } => ("show", id, None, conn),
        CkptCmd::Promote { id, operator, conn } => ("promote", id, Some(operator), conn),
        CkptCmd::Rollback { operator, conn } => ("rollback", String::new(), Some(operator), conn),
    };
    let mut conn = conn;
    // The promoter's own node: on a secured fleet it admits a command that changes the rollout
    // only from an operator connected to it.
    conn.near_actor = Some("promoter");
    if let Some(o) = &operator {
        conn.default_identity = Some(format!("operator.{}", o.name()));
    }
    let (_, fleet) = conn.resolve()?;
    let req = CkptCommand::read(op, &id);
    let req = match operator {
        Some(o) => o.sign(req, &fleet)?,
        None => req,
    };
    let bus = conn.open().await?;
    let key = topics::ckpt_control(bus.fleet(), op);
    let replies = bus
        .get::<CkptCommand, CkptReply>(&key, "", &req, Duration::from_secs(10))
        .await?;
    let Some(reply) = replies.into_iter().next() else {
        bail!(
            "no promoter answered on {key}: is one running in this fleet? (On a secured fleet, only an operator's \
             certificate may send promote and rollback, connected to the promoter's node: see `nanobot doctor`.)"
        );
    };
    let reply = reply?.msg;
    let value: serde_json::Value = serde_json::from_str(&reply.json)?;
    if !reply.ok {
        bail!("{}", value["error"].as_str().unwrap_or(&reply.json));
    }
    if op == "list" {
        print_list(&value);
    } else {
        println!("{}", serde_json::to_string_pretty(&value)?);
    }
    Ok(0)
}

fn print_list(v: &serde_json::Value) {
    let r = &v["rollout"];
    let name = |x: &serde_json::Value| x.as_str().unwrap_or("base").to_string();
    println!(
        "rollout generation {}: fleet {}, canary {} {}",
        r["generation"],
        name(&r["fleet"]),
        r["canary"].as_str().unwrap_or("none"),
        r["canary_robots"]
    );
    if let Some(robots) = r["robots"].as_object() {
        for (robot, s) in robots {
            println!(
                "  {robot:<8} runs {:<28} generation {} condition {}",
                s["adapter"].as_str().filter(|a| !a.is_empty()).unwrap_or("base"),
                s["generation"],
                s["condition"].as_str().unwrap_or("?")
            );
        }
    }
    println!(
        "{:<32} {:>7} {:>10} {:>10}  decision",
        "CANDIDATE", "STEP", "HELD-OUT", "BASE"
    );
    for c in v["candidates"].as_array().into_iter().flatten() {
        let m = &c["metrics"];
        println!(
            "{:<32} {:>7} {:>10.4} {:>10.4}  {} {}",
            c["id"].as_str().unwrap_or(""),
            c["step"],
            m["held_out_loss"].as_f64().unwrap_or(f64::NAN),
            m["held_out_loss_base"].as_f64().unwrap_or(f64::NAN),
            c["decision"].as_str().unwrap_or(""),
            c["reason"].as_str().unwrap_or("")
        );
    }
}
