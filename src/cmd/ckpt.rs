//! `nanobot ckpt list | show ID | promote ID | rollback`: ask a running fleet's promoter (the queryable `{fleet}/ckpt/control`) about
//! its candidates, decisions and rollout, or change the rollout by hand.

use std::time::Duration;

use anyhow::bail;
use clap::Subcommand;
use nanobot_messages::{topics, CkptCommand, CkptReply};

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
    /// canary are skipped: an operator's decision, recorded as such).
    Promote {
        id: String,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Put the fleet back on the adapter it ran before the current one.
    Rollback {
        #[command(flatten)]
        conn: ConnectArgs,
    },
}

pub async fn ckpt_cmd(cmd: CkptCmd) -> anyhow::Result<u8> {
    let (op, id, conn) = match cmd {
        CkptCmd::List { conn } => ("list", String::new(), conn),
        CkptCmd::Show { id, conn } => ("show", id, conn),
        CkptCmd::Promote { id, conn } => ("promote", id, conn),
        CkptCmd::Rollback { conn } => ("rollback", String::new(), conn),
    };
    let bus = conn.open().await?;
    let key = topics::ckpt_control(bus.fleet());
    let req = CkptCommand { op: op.into(), id };
    let replies = bus
        .get::<CkptCommand, CkptReply>(&key, "", &req, Duration::from_secs(10))
        .await?;
    let Some(reply) = replies.into_iter().next() else {
        bail!("no promoter answered on {key}: is one running in this fleet?");
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
