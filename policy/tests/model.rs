//! The policy network: shapes, determinism for a fixed seed, LoRA over the whole model, and
//! a tiny policy that overfits a handful of demonstration chunks.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use nanobot_policy::model::{seeded_init, seeded_randn};
use nanobot_policy::rng::Normal;
use nanobot_policy::{ObsBatch, Policy, PolicyConfig};

fn tiny() -> PolicyConfig {
    PolicyConfig::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/policy/tiny.toml")).unwrap()
}

fn build(cfg: &PolicyConfig, seed: u64, with_adapter: bool) -> (Policy, VarMap, VarMap) {
    let (base, adapter) = (VarMap::new(), VarMap::new());
    let dev = Device::Cpu;
    let p = Policy::new(
        cfg,
        VarBuilder::from_varmap(&base, DType::F32, &dev),
        with_adapter.then(|| VarBuilder::from_varmap(&adapter, DType::F32, &dev)),
    )
    .unwrap();
    seeded_init(&base, seed).unwrap();
    seeded_init(&adapter, seed + 1).unwrap();
    (p, base, adapter)
}

fn obs(cfg: &PolicyConfig, b: usize, seed: u64) -> ObsBatch {
    let t = cfg.trunk.n_obs_steps;
    let s = cfg.vision.image_size;
    let dev = Device::Cpu;
    ObsBatch {
        images: seeded_randn(seed, &[b, t, 3, s, s], &dev)
            .unwrap()
            .affine(0.25, 0.5)
            .unwrap(),
        state: seeded_randn(seed + 1, &[b, t, cfg.inputs.state_dim], &dev).unwrap(),
        surface: seeded_randn(
            seed + 2,
            &[b, t, cfg.inputs.surface_rows, cfg.inputs.surface_cols],
            &dev,
        )
        .unwrap(),
        task: Tensor::from_vec(
            (0..b as u32).map(|i| i % cfg.inputs.n_tasks as u32).collect::<Vec<_>>(),
            b,
            &dev,
        )
        .unwrap(),
    }
}

fn obs_repeat(o: &ObsBatch, reps: usize) -> ObsBatch {
    ObsBatch {
        images: o.images.repeat((reps, 1, 1, 1, 1)).unwrap(),
        state: o.state.repeat((reps, 1, 1)).unwrap(),
        surface: o.surface.repeat((reps, 1, 1, 1)).unwrap(),
        task: o.task.repeat(reps).unwrap(),
    }
}

/// Sampled actions, flattened.
fn act(p: &Policy, o: &ObsBatch, noise: &Tensor) -> Vec<f32> {
    p.sample(o, noise)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn mean_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|f| f.to_bits())
        .collect()
}

#[test]
fn shapes_and_determinism_for_a_fixed_seed() {
    let cfg = tiny();
    let (p, _, _) = build(&cfg, 7, false);
    let o = obs(&cfg, 3, 1);
    let cond = p.encode(&o).unwrap();
    assert_eq!(cond.dims(), &[3, cfg.trunk.width]);
    let noise = seeded_randn(9, &[3, cfg.head.horizon, cfg.head.action_dim], &Device::Cpu).unwrap();
    let a = p.sample(&o, &noise).unwrap();
    assert_eq!(a.dims(), &[3, 16, 2]);
    let max = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(max <= 1.0, "samples are clipped to the normalized range");
    let (q, _, _) = build(&cfg, 7, false);
    assert_eq!(
        bits(&q.sample(&o, &noise).unwrap()),
        bits(&a),
        "same seed, same actions"
    );
    let (r, _, _) = build(&cfg, 8, false);
    assert_ne!(bits(&r.sample(&o, &noise).unwrap()), bits(&a));
}

#[test]
fn a_fresh_adapter_leaves_the_whole_policy_unchanged() {
    let cfg = tiny();
    let (without, base, _) = build(&cfg, 3, false);
    // The adapter exactly as `Policy::new` makes it (no seeded_init, which zeroes B itself),
    // over the same base weights.
    let adapter = VarMap::new();
    let dev = Device::Cpu;
    let with = Policy::new(
        &cfg,
        VarBuilder::from_varmap(&base, DType::F32, &dev),
        Some(VarBuilder::from_varmap(&adapter, DType::F32, &dev)),
    )
    .unwrap();
    assert!(
        adapter.all_vars().len() >= 4 * (cfg.trunk.depth + cfg.head.depth),
        "adapters on trunk and head"
    );
    let o = obs(&cfg, 2, 5);
    let noise = seeded_randn(4, &[2, 16, 2], &Device::Cpu).unwrap();
    let out = bits(&without.sample(&o, &noise).unwrap());
    assert_eq!(bits(&with.sample(&o, &noise).unwrap()), out);
    // And the comparison can fail: once B moves, the adapted policy acts differently.
    for (name, var) in adapter.data().lock().unwrap().iter() {
        if name.ends_with("lora_b") {
            var.set(
                &Tensor::ones(var.shape(), DType::F32, &dev)
                    .unwrap()
                    .affine(0.05, 0.0)
                    .unwrap(),
            )
            .unwrap();
        }
    }
    assert_ne!(bits(&with.sample(&o, &noise).unwrap()), out);
}

#[test]
fn a_tiny_policy_overfits_a_handful_of_demonstrations() {
    let cfg = tiny();
    let (p, base, _) = build(&cfg, 11, false);
    let n = 4;
    let o = obs(&cfg, n, 21);
    // Four distinct smooth action chunks in the normalized range.
    let demos: Vec<f32> = (0..n)
        .flat_map(|i| {
            (0..16).flat_map(move |k| {
                let s = k as f32 / 15.0;
                [
                    0.7 * ((i as f32 + 1.0) * s).sin(),
                    0.6 * (1.0 - 2.0 * s) * if i % 2 == 0 { 1.0 } else { -1.0 },
                ]
            })
        })
        .collect();
    // Each step sees every demonstration `reps` times, at different noise levels.
    let reps = 4;
    let m = n * reps;
    let o_rep = obs_repeat(&o, reps);
    let actions = Tensor::from_vec(demos.clone(), (n, 16, 2), &Device::Cpu)
        .unwrap()
        .repeat((reps, 1, 1))
        .unwrap();
    let mut opt = AdamW::new(
        base.all_vars(),
        ParamsAdamW {
            lr: 3e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let mut rng = Normal::new(5);
    let mut losses = Vec::new();
    for step in 0..800u64 {
        let t: Vec<u32> = (0..m).map(|_| rng.below(cfg.head.train_steps as u32)).collect();
        let eps = seeded_randn(1000 + step, &[m, 16, 2], &Device::Cpu).unwrap();
        let loss = p.loss(&o_rep, &actions, &eps, &t).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        opt.backward_step(&loss).unwrap();
    }
    let first: f32 = losses[..20].iter().sum::<f32>() / 20.0;
    let last: f32 = losses[losses.len() - 20..].iter().sum::<f32>() / 20.0;
    assert!(last * 10.0 <= first, "loss fell from {first} to {last}");
    let noise = seeded_randn(77, &[n, 16, 2], &Device::Cpu).unwrap();
    let got = act(&p, &o, &noise);
    let err = mean_abs_diff(&got, &demos);
    eprintln!("loss {first} -> {last}, sample error {err}");
    assert!(
        err < 0.1,
        "sampled actions are off the demonstrations by {err} on average"
    );

    // The trained policy exported with MXFP4 weights acts close to the f32 one.
    use nanobot_policy::checkpoint::{Meta, NormStats, Role};
    use nanobot_policy::export::{load_gguf_into, to_gguf, weight_bytes};
    use nanobot_policy::gguf::Gguf;
    use nanobot_policy::quant::DType as Q;
    let meta = Meta {
        kind: Role::Base,
        version: "overfit".into(),
        config: cfg.clone(),
        norm: NormStats::fit(&[vec![0.0; 6]], &[vec![0.0; 2]]),
    };
    let g = Gguf::from_bytes(&to_gguf(&base, &meta, Q::Mxfp4).unwrap().to_bytes().unwrap()).unwrap();
    let (q, qbase, _) = build(&cfg, 1, false);
    load_gguf_into(&g, &qbase).unwrap();
    let qgot = act(&q, &o, &noise);
    let qerr = mean_abs_diff(&qgot, &got);
    let (f32_bytes, q_bytes) = weight_bytes(&qbase, Q::Mxfp4);
    eprintln!("mxfp4: {q_bytes} of {f32_bytes} weight bytes, mean action difference {qerr}");
    assert!(
        qerr < 0.1,
        "the MXFP4 policy's actions differ from the f32 policy's by {qerr} on average"
    );
    assert!(q_bytes * 3 < f32_bytes);
}

#[test]
fn exports_load_back_and_act_like_the_f32_policy() {
    use nanobot_policy::checkpoint::{Meta, NormStats, Role};
    use nanobot_policy::export::{gguf_config, load_gguf_into, to_gguf};
    use nanobot_policy::gguf::Gguf;
    use nanobot_policy::quant::DType as Q;

    let cfg = tiny();
    let (p, base, _) = build(&cfg, 13, false);
    let meta = Meta {
        kind: Role::Base,
        version: "base-13".into(),
        config: cfg.clone(),
        norm: NormStats::fit(&[vec![0.0; 6], vec![1.0; 6]], &[vec![-1.0; 2], vec![1.0; 2]]),
    };
    let o = obs(&cfg, 2, 3);
    let noise = seeded_randn(5, &[2, 16, 2], &Device::Cpu).unwrap();
    let reference = act(&p, &o, &noise);
    for (q, tol) in [(Q::F32, 0.0), (Q::F16, 0.01), (Q::Q8_0, 0.05)] {
        let bytes = to_gguf(&base, &meta, q).unwrap().to_bytes().unwrap();
        let g = Gguf::from_bytes(&bytes).unwrap();
        assert_eq!(gguf_config(&g).unwrap(), cfg);
        let (p2, base2, _) = build(&cfg, 99, false);
        load_gguf_into(&g, &base2).unwrap();
        let got = act(&p2, &o, &noise);
        let err = mean_abs_diff(&got, &reference);
        eprintln!("{}: mean action error {err}", q.name());
        assert!(err <= tol, "{}: actions differ by {err} on average", q.name());
    }
}

#[test]
fn an_adapter_saved_on_its_own_loads_beside_its_base_and_merges_for_export() {
    use nanobot_policy::checkpoint::{save, Meta, NormStats, Role};
    use nanobot_policy::runner::{Runner, Step};
    let cfg = tiny();
    let (_, base, adapter) = build(&cfg, 11, true);
    // A trained-looking adapter: B non-zero, so it changes the output.
    for var in adapter.all_vars() {
        let n = var.elem_count();
        let v: Vec<f32> = (0..n).map(|i| ((i * 7919 % 101) as f32 / 101.0 - 0.5) * 0.2).collect();
        var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let norm = NormStats::fit(&[vec![0.0; 6], vec![1.0; 6]], &[vec![-1.0, -1.0], vec![1.0, 1.0]]);
    // Removed when dropped, a failing test's unwinding too.
    let scratch = tempfile::Builder::new().prefix("nanobot-adapter-").tempdir().unwrap();
    let dir = scratch.path();
    let meta = |kind, version: &str| Meta {
        kind,
        version: version.into(),
        config: cfg.clone(),
        norm: norm.clone(),
    };
    let (bp, ap) = (dir.join("base.safetensors"), dir.join("adapter.safetensors"));
    save(&bp, &base, &meta(Role::Base, "base-1")).unwrap();
    save(&ap, &adapter, &meta(Role::Adapter, "lora-1")).unwrap();
    let adapter_bytes = std::fs::metadata(&ap).unwrap().len();
    let base_bytes = std::fs::metadata(&bp).unwrap().len();
    assert!(
        adapter_bytes * 5 < base_bytes,
        "the adapter ships on its own, small: {adapter_bytes} vs {base_bytes}"
    );
    // An adapter is refused where a base is expected, and the other way round.
    assert!(Runner::load(&ap, None).is_err());
    assert!(Runner::load(&bp, Some(&bp)).is_err());

    let with = Runner::load(&bp, Some(&ap)).unwrap();
    assert_eq!(with.adapter_version(), "lora-1");
    let plain = Runner::load(&bp, None).unwrap();
    let step = Step {
        rgb: (0..64 * 64 * 3).map(|i| (i % 251) as u8).collect(),
        state: vec![0.3, 0.6, 0.0, 0.1, 0.8, 0.2],
        surface: vec![0.5; 64],
    };
    let a_with = with.act(std::slice::from_ref(&step), 1, 5).unwrap();
    let a_plain = plain.act(std::slice::from_ref(&step), 1, 5).unwrap();
    assert!(
        mean_abs_diff(&a_with, &a_plain) > 1e-3,
        "the adapter changes the actions"
    );
    // Merged into the base (what export writes), the model acts as base + adapter.
    let merged = with.merged_base().unwrap();
    let mp = dir.join("merged.safetensors");
    save(&mp, &merged, &meta(Role::Base, "base-1+lora-1")).unwrap();
    let a_merged = Runner::load(&mp, None)
        .unwrap()
        .act(std::slice::from_ref(&step), 1, 5)
        .unwrap();
    let d = mean_abs_diff(&a_merged, &a_with);
    assert!(d < 1e-4, "merged acts like unmerged: {d}");
}
