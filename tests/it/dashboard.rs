//! End-to-end: `nanobot launch --dashboard` serves the web dashboard of a running simulated
//! fleet: its JSON and event-stream endpoints answer (with the bearer token only), the camera
//! is a JPEG, and headless Chromium shows the robot with a value that changes live.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const TOKEN: &str = "s3cret";

fn state(port: u16) -> Value {
    let (status, ctype, body) = http_with(port, "GET", "/api/state", &[("Authorization", "Bearer s3cret")], b"");
    assert_eq!((status, ctype.as_str()), (200, "application/json"));
    serde_json::from_slice(&body).unwrap()
}

/// The first `n` snapshots of the event stream (HTTP/1.0: the body is not chunked).
fn stream(port: u16, n: usize) -> Vec<Value> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET /api/stream HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    let mut buf = [0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let events: Vec<Value> = text
            .split("\n\n")
            .filter(|e| e.contains("event: state") && text.contains(&format!("{e}\n\n")))
            .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect();
        if events.len() >= n {
            return events;
        }
        assert!(Instant::now() < deadline, "{n} events did not come: {text}");
        let got = s.read(&mut buf).unwrap();
        assert!(got > 0, "the stream closed: {text}");
        text.push_str(&String::from_utf8_lossy(&buf[..got]));
    }
}

/// `POST /api/login` with the bearer token: its Set-Cookie header.
fn login_cookie(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST /api/login HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(
        reply.starts_with("HTTP/1.0 204") || reply.starts_with("HTTP/1.1 204"),
        "{reply}"
    );
    reply
        .lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or_else(|| l.strip_prefix("Set-Cookie: "))
        })
        .unwrap_or_else(|| panic!("no cookie: {reply}"))
        .to_string()
}

#[test]
fn the_dashboard_shows_a_running_fleet_live_in_a_browser() {
    let (port, web) = (free_port(), free_port());
    // One robot driven by the remote expert; after 25 s its drive turns 70° (which that expert
    // does not know), and an episode not done in 30 ticks is finished by the onboard expert:
    // the fleet's autonomous success falls, and the page must say so.
    let file = one_robot_fleet_with(
        "dashboard",
        port,
        r#"set = { intervene_after_steps = 30, shift_after_s = 25.0, shift_to = "actuator_rotation" }"#,
    );
    let mut cmd = nanobot();
    cmd.arg("launch")
        .arg(&file)
        .args(["--grace", "5", "--dashboard", &format!("127.0.0.1:{web}")])
        .env("NANOBOT_DASHBOARD_TOKEN", TOKEN);
    let mut fleet = Proc::spawn(cmd);
    fleet.expect_line("dashboard of fleet nb on http://127.0.0.1", Duration::from_secs(60));

    // Without the token, or with it in the URL, or a wrong one: refused. With it in the
    // header, the login answers with an HttpOnly cookie that opens the API too.
    for (path, headers) in [
        ("/api/state", vec![]),
        ("/api/state?token=s3cret", vec![]),
        ("/api/state", vec![("Authorization", "Bearer s3creT")]),
        ("/api/state", vec![("Cookie", "nb_dashboard=s3cre")]),
    ] {
        let (status, _, _) = http_with(web, "GET", path, &headers, b"");
        assert_eq!(status, 401, "{path} {headers:?}");
    }
    let (status, _, _) = http_with(web, "POST", "/api/login", &[("Authorization", "Bearer wrong")], b"");
    assert_eq!(status, 401);
    let login = login_cookie(web);
    assert!(
        login.contains("nb_dashboard=s3cret") && login.contains("HttpOnly") && login.contains("SameSite=Strict"),
        "{login}"
    );
    let (status, _, _) = http_with(web, "GET", "/api/state", &[("Cookie", "nb_dashboard=s3cret")], b"");
    assert_eq!(status, 200);
    // The page itself holds no data: it loads without the token, self-contained (no CDN).
    let (status, ctype, page) = http_with(web, "GET", "/", &[], b"");
    let page = text(&page);
    assert_eq!((status, ctype.as_str()), (200, "text/html; charset=utf-8"));
    assert!(page.contains("NanoBot fleet") && !page.contains("src=\"http") && !page.contains("href=\"http"));

    let mut s = Value::Null;
    // The first observation reaches the dashboard before the first action chunk that answers
    // it: wait for both.
    wait_until(
        "the robot, its node and its actions in /api/state",
        Duration::from_secs(30),
        || {
            s = state(web);
            s["robots"]["r0"]["observations"].as_u64().unwrap_or(0) > 0
                && s["nodes"]["sim"]["ingest_r0"]["alive"] == true
                && s["topics"]["nb/r0/obs"]["rate_hz"].as_f64().unwrap_or(0.0) > 0.0
                && s["robots"]["r0"]["source"] != ""
                && s["topics"]["nb/r0/act"].is_object()
        },
    );
    assert_eq!(s["fleet"], "nb");
    assert_eq!(s["robots"]["r0"]["source"], "Expert", "{s}");
    assert_eq!(s["robots"]["r0"]["state"].as_array().map(Vec::len), Some(6), "{s}");
    assert_eq!(s["topics"]["nb/r0/act"]["kind"], "ActionChunk", "{s}");

    // The stream: snapshots half a second apart, the observation count moving on.
    let events = stream(web, 2);
    let count = |e: &Value| e["topics"]["nb/r0/obs"]["count"].as_u64().unwrap();
    assert!(
        count(&events[1]) > count(&events[0]),
        "{:?}",
        events.iter().map(count).collect::<Vec<_>>()
    );

    let (status, ctype, jpeg) = http_with(web, "GET", "/api/camera/r0", &[("Authorization", "Bearer s3cret")], b"");
    assert_eq!((status, ctype.as_str()), (200, "image/jpeg"));
    assert_eq!(&jpeg[..2], &[0xff, 0xd8]);
    let (status, _, _) = http_with(web, "GET", "/api/camera/r9", &[("Authorization", "Bearer s3cret")], b"");
    assert_eq!(status, 404);

    // A real browser: the page loads, shows the robot and its camera, and a value changes live.
    let shot_dir = temp_dir("dashboard-shot");
    let shot = shot_dir.join("dashboard.png");
    let browser = std::process::Command::new("python3")
        .arg(repo().join("dashboard/tests/browser_check.py"))
        .arg(format!("http://127.0.0.1:{web}/"))
        .arg(&shot)
        .arg("r0")
        .arg(TOKEN)
        .arg("55")
        .output()
        .unwrap();
    assert!(
        browser.status.success(),
        "browser_check.py (needs chromium and chromium-driver; .ci/run installs them):\n{}{}",
        text(&browser.stdout),
        text(&browser.stderr)
    );
    let b: Value = serde_json::from_slice(&browser.stdout).unwrap();
    assert_eq!(b["robots"], serde_json::json!(["r0"]), "{b}");
    assert!(b["obs_after"].as_u64() > b["obs_before"].as_u64(), "{b}");
    assert_eq!(b["camera_width"], 64, "{b}");
    assert_eq!(b["live"], true, "{b}");
    assert_eq!(b["errors"], serde_json::json!([]), "no script error on the page: {b}");
    assert!(
        b["topic_rows"].as_u64().unwrap() >= 5 && b["node_rows"].as_u64().unwrap() >= 3,
        "{b}"
    );
    assert_eq!(&std::fs::read(&shot).unwrap()[..4], b"\x89PNG");
    // The headline, read in the browser second by second: high before the shift, well down
    // after it (rescued episodes are failures).
    let readings: Vec<f64> = b["success_readings"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r.as_str()?.split(' ').next()?.parse().ok())
        .collect();
    eprintln!(
        "autonomous success on the page, second by second: {}",
        b["success_readings"]
    );
    let peak = readings.iter().cloned().fold(0.0, f64::max);
    let peak_at = readings.iter().position(|&r| r == peak).unwrap_or(0);
    let low = readings[peak_at..].iter().cloned().fold(100.0, f64::min);
    assert!(
        peak >= 80.0 && low <= peak - 30.0,
        "autonomous success on the page: {:?}",
        b["success_readings"]
    );
    // Kept where a person can look at it (the test's own directory goes with the test).
    let kept = repo().join("target/dashboard-during-a-shift.png");
    let _ = std::fs::copy(&shot, &kept);
    eprintln!("dashboard screenshot: {}", kept.display());
}

#[test]
fn the_dashboard_refuses_to_listen_beyond_loopback_without_a_token() {
    let out = nanobot()
        .args(["dashboard", "--listen", "0.0.0.0:0"])
        .env_remove("NANOBOT_DASHBOARD_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("0.0.0.0:0") && err.contains("token"), "{err}");
}
