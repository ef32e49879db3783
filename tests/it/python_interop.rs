//! The wire format as documented in the README: a Python client with eclipse-zenoh and
//! `struct` decodes a live fleet's messages.

use crate::common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

#[test]
fn python_decodes_the_envelope_with_struct_alone() {
    let probe = Command::new("python3").args(["-c", "import zenoh"]).output();
    match probe {
        Ok(o) if o.status.success() => {}
        _ => panic!(
            "this test needs Python 3 with eclipse-zenoh: `python3 -m pip install eclipse-zenoh==1.10.2` \
             (.ci/run installs it)"
        ),
    }
    let port = free_port();
    let file = write_launch(
        "python",
        &format!(
            "[zenoh]\ntrace_sample_ratio = 1.0\n[robots]\ncount = 1\n[[node]]\nname = \"sim\"\nlisten = [\"tcp/127.0.0.1:{port}\"]\n\
             [[node.actor]]\ntype = \"sim_robot\"\nfor_each_robot = true\nset = {{ sim = {{ seed = 7 }} }}\n"
        ),
    );
    let mut fleet = Proc::launch(&file, &[]);
    fleet.expect_line("actor started", Duration::from_secs(10));
    let out = Command::new("python3")
        .arg(repo().join("tests/python/decode_envelope.py"))
        .args([&format!("tcp/127.0.0.1:{port}"), "nb/r0/raw/state", "3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let msgs: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(msgs.len(), 3);
    let mut last_seq = None;
    for m in &msgs {
        assert_eq!(m["version"], 1);
        assert_eq!(m["kind"], "RawFrame");
        assert_eq!(m["robot"], "r0");
        assert_eq!(m["sensor"], "state");
        assert_eq!(m["encoding"], "F32Le");
        assert_eq!(m["shape"], serde_json::json!([6]));
        let v: Vec<f64> = m["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(v.len(), 6);
        // Position and target lie in the unit arena.
        for i in [0, 1, 4, 5] {
            assert!((0.0..=1.0).contains(&v[i]), "{v:?}");
        }
        assert!(m["traceparent"].as_str().unwrap().starts_with("00-"));
        let seq = m["seq"].as_u64().unwrap();
        if let Some(prev) = last_seq {
            assert!(seq > prev, "sequence numbers increase");
        }
        last_seq = Some(seq);
    }
}
