//! End-to-end: `nanobot foxglove` against a running fleet, and a real client speaking Foxglove's
//! WebSocket protocol (Python `websockets`) that decodes a camera image and an observation.

use crate::common;

use std::time::Duration;

use common::*;

#[test]
fn a_foxglove_client_sees_the_fleets_channels_and_decodes_a_camera_image() {
    let (port, ws_port) = (free_port(), free_port());
    let file = one_robot_fleet("foxglove", port);
    let mut fleet = Proc::launch(&file, &[]);
    fleet.expect_actors(3, Duration::from_secs(30));
    let mut bridge = {
        let mut c = nanobot();
        c.args(["foxglove", "--listen", &format!("127.0.0.1:{ws_port}"), "-e"])
            .arg(format!("tcp/127.0.0.1:{port}"));
        Proc::spawn(c)
    };
    bridge.expect_line("Foxglove bridge for nb/**", Duration::from_secs(20));

    let client = std::process::Command::new("python3")
        .arg(repo().join("foxglove/tests/foxglove_client.py"))
        .arg(format!("ws://127.0.0.1:{ws_port}"))
        .args(["nb/r0/raw/camera/image", "nb/r0/obs"])
        .output()
        .unwrap();
    assert!(
        client.status.success(),
        "foxglove_client.py (needs the websockets package; .ci/run installs it):\n{}{}",
        text(&client.stdout),
        text(&client.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&client.stdout).unwrap();
    let image = &v["image"];
    assert_eq!(image["schema"], "foxglove.CompressedImage", "{v}");
    assert_eq!(
        (image["encoding"].as_str(), image["format"].as_str()),
        (Some("json"), Some("jpeg")),
        "{v}"
    );
    assert_eq!(image["jpeg_magic"], "ffd8", "{v}");
    assert_eq!(
        image["stamp_matches"], true,
        "the message time is the frame's stamp: {v}"
    );
    let obs = &v["obs"];
    assert_eq!(
        (obs["schema"].as_str(), obs["schema_encoding"].as_str()),
        (Some("Observation"), Some("jsonschema")),
        "{v}"
    );
    assert_eq!(obs["state_in_schema"], true, "{v}");
    assert_eq!(
        (obs["kind"].as_str(), obs["robot"].as_str()),
        (Some("Observation"), Some("r0")),
        "{v}"
    );
    assert_eq!(obs["state"].as_array().map(Vec::len), Some(6), "plottable state: {v}");
    // Every topic of the fleet is advertised: actions and the raw sensors too.
    let channels: Vec<&str> = v["channels"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    for t in ["nb/r0/act", "nb/r0/raw/state", "nb/r0/obs/image"] {
        assert!(channels.contains(&t), "{t} not advertised: {channels:?}");
    }

    bridge.signal(libc::SIGINT);
    assert!(bridge.wait(Duration::from_secs(20)).success());
    let summary = bridge.expect_line("bridged ", Duration::from_secs(5));
    assert!(summary.contains("0 not NanoBot messages"), "{summary}");
}

#[test]
fn the_bridge_refuses_to_listen_beyond_loopback() {
    // No fleet needed: the address is refused before the bridge joins any.
    for listen in ["0.0.0.0:0", "[::]:0", "192.0.2.1:8765"] {
        let out = nanobot()
            .args(["foxglove", "--listen", listen, "--duration", "1"])
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{listen}: {err}");
        assert!(err.contains("loopback only") && err.contains(listen), "{listen}: {err}");
    }
}
