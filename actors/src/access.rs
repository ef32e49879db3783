//! Who may do what on a secured fleet: Zenoh's access control, generated from the launch file.
//!
//! Every party holds a certificate whose common name says who it is (`node.sim`,
//! `operator.alice`, `engineer.bob`: see [`crate::pki`]). Every node enforces, on what reaches
//! it from each party (Zenoh's ingress flow), default deny plus:
//!
//! | party | may |
//! | --- | --- |
//! | every listed party | subscribe to everything, ask who is alive |
//! | a node | put what its actors declare ([`NodeActor::grants`](crate::runtime::NodeActor::grants)) and its own Stats; query and answer on the keys its actors declare; announce its own actors |
//! | an operator | query anything, `ckpt promote` and `rollback` included |
//! | an engineer | query anything but `ckpt promote` and `rollback` |
//!
//! Anyone else (no certificate, another authority's, or a name the launch file does not
//! list) gets nothing. Access control acts per hop: a node forwards what a party it admitted
//! sent, as itself. So `ckpt promote` reaches the promoter only from an operator connected to
//! the promoter's node (`nanobot ckpt --launch` connects there), and the promoter still checks
//! the operator's signature.

use std::collections::BTreeSet;

use nanobot_messages::topics;
use serde_json::{json, Value};

use crate::launch::LaunchFile;
use crate::pki::{Identity, Role};

/// What an actor sends on the bus: key expressions it puts on, queries, and answers queries on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grants {
    pub put: Vec<String>,
    pub query: Vec<String>,
    pub reply: Vec<String>,
}

impl Grants {
    pub fn put(mut self, keys: impl IntoIterator<Item = String>) -> Grants {
        self.put.extend(keys);
        self
    }
    pub fn query(mut self, keys: impl IntoIterator<Item = String>) -> Grants {
        self.query.extend(keys);
        self
    }
    pub fn reply(mut self, keys: impl IntoIterator<Item = String>) -> Grants {
        self.reply.extend(keys);
        self
    }
}

/// What one party may send to a node, beyond subscribing (which every listed party may).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rights {
    pub identity: Identity,
    /// Put and delete.
    pub put: BTreeSet<String>,
    pub query: BTreeSet<String>,
    /// Queries refused even where `query` allows them.
    pub deny_query: BTreeSet<String>,
    /// Answer queries (and declare the queryable).
    pub reply: BTreeSet<String>,
    /// Liveliness tokens.
    pub tokens: BTreeSet<String>,
}

impl Rights {
    fn new(identity: Identity) -> Rights {
        Rights {
            identity,
            put: BTreeSet::new(),
            query: BTreeSet::new(),
            deny_query: BTreeSet::new(),
            reply: BTreeSet::new(),
            tokens: BTreeSet::new(),
        }
    }
}

/// Every party of a launch file and what it may do: its nodes (from their actors), then the
/// operators and engineers its `[security]` table lists.
pub fn rights(lf: &LaunchFile, operators: &[String], engineers: &[String]) -> Vec<Rights> {
    let fleet = &lf.fleet;
    let mut out = Vec::new();
    for node in &lf.nodes {
        let Ok(id) = Identity::node(&node.name) else { continue };
        let mut r = Rights::new(id);
        let own = topics::node_actor(fleet, &node.name, "**");
        r.put.insert(own.clone());
        r.tokens.insert(own.clone());
        r.reply.insert(own);
        for actor in &node.actors {
            let Some(kind) = crate::registry::ACTORS.iter().find(|k| k.name == actor.kind) else {
                continue;
            };
            let robots = match &actor.robot {
                Some(robot) => vec![robot.clone()],
                None => lf.robots.clone(),
            };
            let g = (kind.grants)(fleet, &robots);
            r.put.extend(g.put);
            r.query.extend(g.query);
            r.reply.extend(g.reply);
        }
        out.push(r);
    }
    for (role, names) in [(Role::Operator, operators), (Role::Engineer, engineers)] {
        for name in names {
            let Ok(id) = Identity::new(role, name) else { continue };
            let mut r = Rights::new(id);
            r.query.insert("**".into());
            if role == Role::Engineer {
                r.deny_query
                    .extend(topics::CKPT_CHANGES.iter().map(|op| topics::ckpt_control(fleet, op)));
            }
            out.push(r);
        }
    }
    out
}

/// Zenoh's `access_control` block for these parties: default deny, rules per party, matched on
/// the certificate's common name.
pub fn access_control(parties: &[Rights]) -> Value {
    const ALL: [&str; 9] = [
        "put",
        "delete",
        "declare_subscriber",
        "query",
        "reply",
        "declare_queryable",
        "liveliness_token",
        "liveliness_query",
        "declare_liveliness_subscriber",
    ];
    let mut rules = vec![
        json!({
            "id": "watch", "permission": "allow", "flows": ["ingress"],
            "messages": ["declare_subscriber", "declare_liveliness_subscriber", "liveliness_query"],
            "key_exprs": ["**"],
        }),
        // What a node sends a party it admitted is decided where that party's requests came in.
        json!({
            "id": "send", "permission": "allow", "flows": ["egress"],
            "messages": ALL, "key_exprs": ["**"],
        }),
    ];
    let mut subjects = Vec::new();
    let mut policies = Vec::new();
    for p in parties {
        let cn = p.identity.common_name();
        let mut mine = vec!["watch".to_string(), "send".to_string()];
        let mut rule = |what: &str, permission: &str, messages: &[&str], keys: &BTreeSet<String>| {
            if keys.is_empty() {
                return;
            }
            let id = format!("{cn}/{what}");
            rules.push(json!({
                "id": id, "permission": permission, "flows": ["ingress"],
                "messages": messages, "key_exprs": keys,
            }));
            mine.push(id);
        };
        rule("put", "allow", &["put", "delete"], &p.put);
        rule("query", "allow", &["query"], &p.query);
        rule("deny-query", "deny", &["query"], &p.deny_query);
        rule("reply", "allow", &["reply", "declare_queryable"], &p.reply);
        rule("token", "allow", &["liveliness_token"], &p.tokens);
        subjects.push(json!({ "id": cn, "cert_common_names": [cn] }));
        policies.push(json!({ "id": cn, "rules": mine, "subjects": [cn] }));
    }
    json!({
        "enabled": true,
        "default_permission": "deny",
        "rules": rules,
        "subjects": subjects,
        "policies": policies,
    })
}

/// The rights as a table a person reads (`nanobot doctor`).
pub fn describe(parties: &[Rights]) -> String {
    let list = |s: &BTreeSet<String>| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.iter().cloned().collect::<Vec<_>>().join(" ")
        }
    };
    let mut out = String::from("party: may put | may query (not) | may answer\n");
    for p in parties {
        let not = if p.deny_query.is_empty() {
            String::new()
        } else {
            format!(" (not {})", list(&p.deny_query))
        };
        out.push_str(&format!(
            "  {}: {} | {}{} | {}\n",
            p.identity,
            list(&p.put),
            list(&p.query),
            not,
            list(&p.reply)
        ));
    }
    out.push_str("  everyone listed may subscribe to everything; anyone else gets nothing\n");
    out
}
