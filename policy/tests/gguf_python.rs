//! GGUF files that llama.cpp's own Python reader (`gguf`) reads, with MXFP4 and Q8_0 bytes
//! identical to its reference quantizers.

use std::process::Command;

use nanobot_policy::gguf::{Gguf, Tensor, Value};
use nanobot_policy::quant::DType;
use serde_json::Value as Json;

#[test]
fn the_gguf_package_reads_our_files_and_agrees_on_quantized_bytes() {
    let probe = Command::new("python3").args(["-c", "import gguf, numpy"]).output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        panic!("this test needs Python 3 with the gguf package: `python3 -m pip install gguf==0.19.0` (.ci/run installs it)");
    }
    let mut g = Gguf::default();
    g.metadata
        .insert("general.architecture".into(), Value::String("nanobot-policy".into()));
    g.metadata.insert("nanobot.trunk.width".into(), Value::U32(64));
    g.metadata
        .insert("nanobot.diffusion.train_steps".into(), Value::U32(100));
    g.metadata.insert("nanobot.action.horizon".into(), Value::U32(16));
    let w: Vec<f32> = (0..64 * 3)
        .map(|i| (i as f32 * 0.37).sin() * (1.0 + (i % 7) as f32))
        .collect();
    for dt in [DType::F32, DType::F16, DType::Q8_0, DType::Mxfp4] {
        g.tensors
            .push(Tensor::quantized(&format!("w.{}", dt.name()), &[3, 64], dt, &w).unwrap());
    }
    // Removed when dropped, a failing test's unwinding too.
    let scratch = tempfile::Builder::new().prefix("nanobot-gguf-").tempdir().unwrap();
    let dir = scratch.path();
    let path = dir.join("policy.gguf");
    std::fs::write(&path, g.to_bytes().unwrap()).unwrap();

    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/gguf_check.py"))
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["metadata"]["general.architecture"], "nanobot-policy");
    assert_eq!(v["metadata"]["nanobot.trunk.width"], 64);
    assert_eq!(v["metadata"]["general.alignment"], 32);
    for dt in [DType::F32, DType::F16, DType::Q8_0, DType::Mxfp4] {
        let t = &v["tensors"][format!("w.{}", dt.name())];
        assert_eq!(t["type"], dt.ggml_type(), "{}", dt.name());
        assert_eq!(t["ne"], serde_json::json!([64, 3]), "ggml order, innermost first");
        let theirs: Vec<f32> = t["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let ours = g.tensor(&format!("w.{}", dt.name())).unwrap().values().unwrap();
        assert_eq!(theirs, ours, "{}: gguf dequantizes to our values", dt.name());
    }
    assert_eq!(v["tensors"]["w.mxfp4"]["type_name"], "MXFP4");
    assert_eq!(v["same_bytes_as_gguf"]["w.mxfp4"], true);
    assert_eq!(v["same_bytes_as_gguf"]["w.q8_0"], true);
}
