//! What a rollout's signature covers: every field but the signature itself.

use nanobot_messages::{AdapterManifest, Promoted};

fn manifest(id: &str) -> AdapterManifest {
    AdapterManifest {
        adapter_id: id.into(),
        base_version: "base-1".into(),
        sha256: "ab".repeat(32),
        bytes: 42,
        metrics: vec![],
        signature: "00".repeat(64),
    }
}

#[test]
fn changing_any_signed_field_changes_the_signed_text() {
    let mut p = Promoted::unsigned(7, Some(manifest("a1")), Some(manifest("c1")), vec!["r0".into()]);
    p.revoked = vec!["old".into()];
    p.expires_ms = 1_000;
    let text = p.signed_text();
    type Change = Box<dyn Fn(&mut Promoted)>;
    let changes: Vec<(&str, Change)> = vec![
        ("generation", Box::new(|p| p.generation = u64::MAX)),
        ("fleet", Box::new(|p| p.fleet = None)),
        (
            "fleet's sha",
            Box::new(|p| p.fleet.as_mut().unwrap().sha256 = "cd".repeat(32)),
        ),
        (
            "fleet's signature",
            Box::new(|p| p.fleet.as_mut().unwrap().signature = "11".repeat(64)),
        ),
        ("canary", Box::new(|p| p.canary = Some(manifest("a1")))),
        ("canary robots", Box::new(|p| p.canary_robots.push("r1".into()))),
        ("canary robots regrouped", Box::new(|p| p.canary_robots = vec![])),
        ("revoked", Box::new(|p| p.revoked.clear())),
        ("expiry", Box::new(|p| p.expires_ms = u64::MAX)),
    ];
    for (what, change) in changes {
        let mut q = p.clone();
        change(&mut q);
        assert_ne!(q.signed_text(), text, "{what} is not covered");
    }
    // The signature itself is not.
    let mut q = p.clone();
    q.signature = "ff".into();
    assert_eq!(q.signed_text(), text);
}
