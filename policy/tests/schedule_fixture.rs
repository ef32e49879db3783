//! The schedules against reference values computed independently with numpy
//! (`tests/fixtures/make_schedule.py`, output committed as `schedule_100.json`).

use nanobot_policy::schedule::{DdimSampler, DdpmSchedule};
use serde_json::Value;

fn fixture() -> Value {
    serde_json::from_str(include_str!("fixtures/schedule_100.json")).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

#[test]
fn ddpm_betas_and_alphas_cumprod_match_numpy() {
    let f = fixture();
    let s = DdpmSchedule::squared_cosine(f["train_steps"].as_u64().unwrap() as usize).unwrap();
    for (name, ours, theirs) in [
        ("betas", &s.betas, floats(&f["betas"])),
        ("alphas_cumprod", &s.alphas_cumprod, floats(&f["alphas_cumprod"])),
    ] {
        assert_eq!(ours.len(), theirs.len(), "{name}");
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0), "{name}[{i}]: {a} vs {b}");
        }
    }
}

#[test]
fn ddim_timesteps_and_steps_match_numpy() {
    let f = fixture();
    let s = DdpmSchedule::squared_cosine(100).unwrap();
    let d = DdimSampler::new(s, f["ddim_steps"].as_u64().unwrap() as usize, Some(1.0)).unwrap();
    let want: Vec<usize> = f["ddim_timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(d.timesteps, want);
    for case in f["ddim"].as_array().unwrap() {
        let t = case["t"].as_u64().unwrap() as usize;
        let x: Vec<f32> = floats(&case["x"]).iter().map(|&v| v as f32).collect();
        let eps: Vec<f32> = floats(&case["eps"]).iter().map(|&v| v as f32).collect();
        let got = d.step(&x, &eps, t).unwrap();
        let want = floats(&case["prev"]);
        assert_eq!(got.len(), want.len(), "t={t}: step output length");
        assert!(!want.is_empty(), "t={t}: the fixture has values");
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-5, "t={t}: {g} vs {w}");
        }
    }
}
