//! The training core: the optimizer is candle's AdamW step for step, LoRA training moves only
//! the adapter, a run resumed from its saved state is bit-identical to one never interrupted,
//! windows are padded and masked at episode edges, and weights decide what trains.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, ParamsAdamW, VarBuilder, VarMap};
use nanobot_policy::checkpoint::NormStats;
use nanobot_policy::model::seeded_init;
use nanobot_policy::rng::Normal;
use nanobot_policy::train::{AdamParams, AdamW, LrSchedule, Row, TrainBatch, TrainConfig, Trainer, Windows};
use nanobot_policy::{Policy, PolicyConfig};

fn tiny() -> PolicyConfig {
    PolicyConfig::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/policy/tiny.toml")).unwrap()
}

/// `episodes` episodes of `len` rows: smooth actions that depend on the state, random pixels.
fn windows(episodes: u64, len: usize, seed: u64) -> Windows {
    let mut rng = Normal::new(seed);
    let mut rows = Vec::new();
    for e in 0..episodes {
        let (tx, ty) = (rng.unit() as f32, rng.unit() as f32);
        for k in 0..len {
            let x = k as f32 / len as f32;
            rows.push(Row {
                episode: (0, e),
                task: (e % 2) as u32,
                rgb: (0..64 * 64 * 3).map(|_| (rng.unit() * 255.0) as u8).collect(),
                state: vec![x, x * 0.5, 0.0, 0.0, tx, ty],
                action: vec![tx - x, ty - x * 0.5],
                surface: vec![0.25; 64],
            });
        }
    }
    Windows::new(rows).unwrap()
}

fn norm(w: &Windows) -> NormStats {
    w.fit_norm()
}

fn base(cfg: &PolicyConfig, seed: u64) -> VarMap {
    let vars = VarMap::new();
    Policy::new(cfg, VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu), None).unwrap();
    seeded_init(&vars, seed).unwrap();
    vars
}

/// The base loaded read-only beside a fresh adapter.
fn with_adapter(cfg: &PolicyConfig, base: &VarMap) -> (Policy, VarMap) {
    let adapter = VarMap::new();
    let dev = Device::Cpu;
    let p = Policy::new(
        cfg,
        VarBuilder::from_varmap(base, DType::F32, &dev),
        Some(VarBuilder::from_varmap(&adapter, DType::F32, &dev)),
    )
    .unwrap();
    // A fresh adapter: A seeded, B zero (so it starts as the base).
    seeded_init(&adapter, 77).unwrap();
    (p, adapter)
}

fn bits(vars: &VarMap) -> Vec<(String, Vec<u32>)> {
    Trainer::named(vars)
        .into_iter()
        .map(|(n, v)| {
            let b = v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (n, b.iter().map(|x| x.to_bits()).collect())
        })
        .collect()
}

fn lora_cfg(seed: u64) -> TrainConfig {
    TrainConfig {
        batch: 8,
        lr: 3e-3,
        warmup: 3,
        weight_decay: 0.0,
        seed,
        grad_clip: Some(1.0),
        schedule: LrSchedule::Cosine {
            total: 40,
            min_ratio: 0.1,
        },
        shards: 1,
    }
}

#[test]
fn our_adamw_is_candles_step_for_step() {
    let cfg = tiny();
    let data = windows(2, 20, 1);
    let n = norm(&data);
    let (a, b) = (base(&cfg, 5), base(&cfg, 5));
    let dev = Device::Cpu;
    let pa = Policy::new(&cfg, VarBuilder::from_varmap(&a, DType::F32, &dev), None).unwrap();
    let pb = Policy::new(&cfg, VarBuilder::from_varmap(&b, DType::F32, &dev), None).unwrap();
    let params = ParamsAdamW {
        lr: 2e-3,
        weight_decay: 1e-4,
        ..Default::default()
    };
    let mut theirs = candle_nn::AdamW::new(a.all_vars(), params.clone()).unwrap();
    let mut ours = AdamW::new(
        Trainer::named(&b),
        AdamParams {
            lr: 2e-3,
            weight_decay: 1e-4,
            ..AdamParams::default()
        },
    )
    .unwrap();
    for step in 0..3u64 {
        let idx = [0, 5, 19, 30];
        let t = [3u32, 40, 77, 99];
        let (oa, acts) = data.batch(&idx, &cfg, &n).unwrap();
        let eps = nanobot_policy::model::seeded_randn(step, acts.dims(), &dev).unwrap();
        theirs.backward_step(&pa.loss(&oa, &acts, &eps, &t).unwrap()).unwrap();
        let grads = pb.loss(&oa, &acts, &eps, &t).unwrap().backward().unwrap();
        ours.step(&grads).unwrap();
    }
    assert_eq!(bits(&a), bits(&b));
}

#[test]
fn lora_training_lowers_the_loss_and_leaves_the_base_bit_identical() {
    let cfg = tiny();
    let data = windows(4, 24, 2);
    let n = norm(&data);
    let base_vars = base(&cfg, 7);
    let before = bits(&base_vars);
    let (policy, adapter) = with_adapter(&cfg, &base_vars);
    let held_out = data.batch_padded(&[0, 10, 30, 50, 70, 90], &cfg, &n).unwrap();
    let loss0 = Trainer::eval(&policy, &held_out, &cfg, 3).unwrap();
    let mut t = Trainer::new(Trainer::named(&adapter), lora_cfg(1)).unwrap();
    let mut losses = Vec::new();
    for _ in 0..40 {
        let idx = t.draw(8, data.len());
        let batch = data.batch_padded(&idx, &cfg, &n).unwrap();
        losses.push(t.step_on(&policy, &batch, &cfg).unwrap());
    }
    let loss1 = Trainer::eval(&policy, &held_out, &cfg, 3).unwrap();
    assert!(
        loss1 < 0.8 * loss0,
        "the adapter learns: {loss0} → {loss1} ({losses:?})"
    );
    assert_eq!(bits(&base_vars), before, "LoRA leaves the base untouched");
    assert!(t.learning_rate() < 3e-3 * 0.2, "cosine decayed: {}", t.learning_rate());
}

/// Train `steps` LoRA steps from scratch, or in two legs with the state saved, everything
/// dropped and resumed in between; returns the adapter's bits.
fn run(steps: usize, split: Option<usize>, dir: &Path) -> Vec<(String, Vec<u32>)> {
    let cfg = tiny();
    let data = windows(3, 20, 4);
    let n = norm(&data);
    let base_vars = base(&cfg, 9);
    let one_leg = |t: &mut Trainer, policy: &Policy, k: usize| {
        for _ in 0..k {
            let idx = t.draw(6, data.len());
            let batch = data.batch_padded(&idx, &cfg, &n).unwrap();
            t.step_on(policy, &batch, &cfg).unwrap();
        }
    };
    let (policy, adapter) = with_adapter(&cfg, &base_vars);
    let mut t = Trainer::new(Trainer::named(&adapter), lora_cfg(11)).unwrap();
    match split {
        None => {
            one_leg(&mut t, &policy, steps);
            bits(&adapter)
        }
        Some(k) => {
            one_leg(&mut t, &policy, k);
            let state = dir.join("trainer.state");
            t.save_state(&state).unwrap();
            drop((t, policy, adapter));
            // A new process, as after kill -9: the base again, a fresh adapter, the state.
            let (policy, adapter) = with_adapter(&cfg, &base_vars);
            let mut t = Trainer::resume(Trainer::named(&adapter), &state).unwrap();
            assert_eq!(t.steps_done(), k);
            one_leg(&mut t, &policy, steps - k);
            bits(&adapter)
        }
    }
}

#[test]
fn a_resumed_run_is_bit_identical_to_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let straight = run(10, None, dir.path());
    let resumed = run(10, Some(4), dir.path());
    assert_eq!(straight, resumed);
    // And it is a real check: resuming with the wrong step count differs.
    let other = run(9, None, dir.path());
    assert_ne!(straight, other);
}

#[test]
fn a_state_file_that_is_not_one_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("x.state");
    std::fs::write(&bad, b"not safetensors").unwrap();
    let cfg = tiny();
    let (_, adapter) = with_adapter(&cfg, &base(&cfg, 1));
    let e = Trainer::resume(Trainer::named(&adapter), &bad)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("x.state"), "{e}");
}

#[test]
fn windows_at_episode_edges_are_padded_and_masked() {
    let cfg = tiny(); // n_obs_steps 2, horizon 16
    let data = windows(2, 10, 3);
    let n = norm(&data);
    // Row 0 starts episode 0: its previous observation is padding. Row 5 has 5 real actions
    // (rows 5..9), then padding. Row 10 starts episode 1.
    let b = data.batch_padded(&[0, 5, 10, 3], &cfg, &n).unwrap();
    let mask = b.action_mask.to_vec2::<f32>().unwrap();
    let real = |row: &Vec<f32>| row.iter().filter(|v| **v == 1.0).count();
    assert_eq!(real(&mask[0]), 10);
    assert_eq!(real(&mask[1]), 5);
    assert_eq!(real(&mask[2]), 10);
    assert_eq!(real(&mask[3]), 7);
    assert!(mask[1][..5].iter().all(|v| *v == 1.0) && mask[1][5..].iter().all(|v| *v == 0.0));
    let pad = b.obs_pad.to_vec2::<u8>().unwrap();
    assert_eq!(pad, vec![vec![1, 0], vec![0, 0], vec![1, 0], vec![0, 0]]);
    // Padding repeats the edge row: episode 0's last action fills the rest of row 5's window.
    let acts = b.actions.to_vec3::<f32>().unwrap();
    assert_eq!(acts[1][4], acts[1][15]);
}

#[test]
fn weights_decide_what_trains_and_padding_does_not_count() {
    let cfg = tiny();
    let data = windows(2, 10, 5);
    let n = norm(&data);
    let base_vars = base(&cfg, 2);
    let (policy, _) = with_adapter(&cfg, &base_vars);
    let dev = Device::Cpu;
    let eps_seed = 8;
    // Window 3 alone, and windows 3 and 12 with 12's weight 0: the same loss.
    let alone = data.batch_padded(&[3], &cfg, &n).unwrap();
    let mut pair = data.batch_padded(&[3, 12], &cfg, &n).unwrap();
    pair.weights = Tensor::new(&[1f32, 0.0], &dev).unwrap();
    let eps = nanobot_policy::model::seeded_randn(eps_seed, &[2, 16, 2], &dev).unwrap();
    let t = [40u32, 40];
    let l_pair = policy
        .loss_weighted(&pair.obs, &pair.actions, &eps, &t, &pair.weights, &pair.action_mask)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let l_alone = policy
        .loss_weighted(
            &alone.obs,
            &alone.actions,
            &eps.narrow(0, 0, 1).unwrap(),
            &t[..1],
            &alone.weights,
            &alone.action_mask,
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((l_pair - l_alone).abs() < 1e-5, "{l_pair} vs {l_alone}");
    // The masked mean is the mean of the real actions' squared errors only: check it against
    // the errors computed by hand from the denoiser's prediction.
    let one = data.batch_padded(&[5], &cfg, &n).unwrap(); // 5 real actions of 16
    let e1 = eps.narrow(0, 0, 1).unwrap();
    let l = policy
        .loss_weighted(&one.obs, &one.actions, &e1, &t[..1], &one.weights, &one.action_mask)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let (wa, wb) = policy.schedule.noise_weights(40).unwrap();
    let noisy = ((&one.actions * wa).unwrap() + (&e1 * wb).unwrap()).unwrap();
    let pred = policy
        .denoise(
            &noisy,
            &Tensor::new(&[40f32], &dev).unwrap(),
            &policy.encode(&one.obs).unwrap(),
        )
        .unwrap();
    let err = (pred - &e1).unwrap().sqr().unwrap().to_vec3::<f32>().unwrap();
    let real: f32 = err[0][..5].iter().flatten().sum::<f32>() / 10.0;
    let all: f32 = err[0].iter().flatten().sum::<f32>() / 32.0;
    assert!(
        (l - real).abs() < 1e-5,
        "masked loss {l}, the real actions' mean {real}"
    );
    assert!((l - all).abs() > 1e-4, "padding would have counted: {all}");
}

#[test]
fn the_learning_rate_warms_up_then_follows_its_schedule() {
    let c = LrSchedule::Cosine {
        total: 110,
        min_ratio: 0.1,
    };
    assert!((c.lr(1.0, 10, 5) - 0.5).abs() < 1e-12);
    assert!((c.lr(1.0, 10, 10) - 1.0).abs() < 1e-12);
    assert!(
        (c.lr(1.0, 10, 60) - 0.55).abs() < 1e-12,
        "half way: {}",
        c.lr(1.0, 10, 60)
    );
    assert!((c.lr(1.0, 10, 110) - 0.1).abs() < 1e-12);
    assert!((c.lr(1.0, 10, 500) - 0.1).abs() < 1e-12);
    assert_eq!(LrSchedule::Constant.lr(2.0, 4, 100), 2.0);
}

#[test]
fn every_weight_of_the_policy_and_of_its_adapter_gets_a_gradient() {
    // candle's fast layer norm has no backward pass: through it, only the diffusion head
    // trained and the encoder kept its random weights. Every variable must be reached.
    let cfg = tiny();
    let data = windows(2, 10, 5);
    let n = norm(&data);
    let base_vars = base(&cfg, 2);
    let dev = Device::Cpu;
    let batch = data.batch_padded(&[3, 12], &cfg, &n).unwrap();
    let eps = nanobot_policy::model::seeded_randn(8, &[2, 16, 2], &dev).unwrap();
    let full = Policy::new(&cfg, VarBuilder::from_varmap(&base_vars, DType::F32, &dev), None).unwrap();
    let g = full
        .loss(&batch.obs, &batch.actions, &eps, &[40, 70])
        .unwrap()
        .backward()
        .unwrap();
    let missing: Vec<String> = Trainer::named(&base_vars)
        .into_iter()
        .filter(|(_, v)| g.get(v).is_none())
        .map(|(n, _)| n)
        .collect();
    assert!(missing.is_empty(), "no gradient for {missing:?}");
    let (adapted, adapter) = with_adapter(&cfg, &base_vars);
    let g = adapted
        .loss_weighted(
            &batch.obs,
            &batch.actions,
            &eps,
            &[40, 70],
            &batch.weights,
            &batch.action_mask,
        )
        .unwrap()
        .backward()
        .unwrap();
    let dead: Vec<String> = Trainer::named(&adapter)
        .into_iter()
        .filter(|(n, v)| {
            n.ends_with("lora_b")
                && g.get(v)
                    .is_none_or(|g| g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() == 0.0)
        })
        .map(|(n, _)| n)
        .collect();
    assert!(dead.is_empty(), "adapters that cannot learn: {dead:?}");
}

#[test]
fn a_batch_trained_as_two_shards_gives_what_one_gives_up_to_rounding() {
    let cfg = tiny();
    let data = windows(3, 20, 4);
    let n = norm(&data);
    let base_vars = base(&cfg, 9);
    let train = |shards: usize| {
        let (policy, adapter) = with_adapter(&cfg, &base_vars);
        let mut t = Trainer::new(Trainer::named(&adapter), TrainConfig { shards, ..lora_cfg(5) }).unwrap();
        let mut losses = Vec::new();
        for _ in 0..6 {
            let idx = t.draw(9, data.len());
            let batch = data.batch_padded(&idx, &cfg, &n).unwrap();
            losses.push(t.step_on(&policy, &batch, &cfg).unwrap());
        }
        let weights: Vec<f32> = Trainer::named(&adapter)
            .iter()
            .flat_map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect();
        (losses, weights)
    };
    let ((l1, w1), (l2, w2)) = (train(1), train(2));
    for (a, b) in l1.iter().zip(&l2) {
        assert!((a - b).abs() < 1e-4 * a.abs().max(1.0), "losses {l1:?} vs {l2:?}");
    }
    let worst = w1.iter().zip(&w2).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-4, "adapters differ by {worst}");
    let (_, fresh) = with_adapter(&cfg, &base_vars);
    let init: Vec<f32> = Trainer::named(&fresh)
        .iter()
        .flat_map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect();
    assert!(
        w1.iter().zip(&init).any(|(a, b)| (a - b).abs() > 1e-3),
        "the steps trained"
    );
}

#[test]
fn a_replay_batch_that_does_not_fit_the_policy_is_refused_by_tensor() {
    use nanobot_messages::{Blob, DType as D, ReplayBatch, TensorView};
    let cfg = tiny();
    let view = |name: &str, dtype: D, shape: Vec<u32>, offset: u64| TensorView {
        name: name.into(),
        dtype,
        shape,
        offset,
    };
    let batch = |tensors: Vec<TensorView>, bytes: usize| ReplayBatch {
        windows: 1,
        wait: String::new(),
        tensors,
        rows: 1,
        mean_age_s: 0.0,
        newest_stamp_ns: 0,
        intervention_share: 0.0,
        data: Blob::new(vec![0u8; bytes]),
    };
    let n = norm(&windows(1, 4, 1));
    let image = 2 * 3 * 64 * 64;
    let err = |b: &ReplayBatch| TrainBatch::from_replay(b, &cfg, &n).err().unwrap().to_string();
    // No tensors at all.
    assert!(err(&batch(vec![], 0)).contains("no tensor `image`"));
    // An image of the wrong size.
    let e = err(&batch(vec![view("image", D::U8, vec![1, 2, 3, 32, 32], 0)], image));
    assert!(e.contains("`image` is U8 [1, 2, 3, 32, 32]"), "{e}");
    // A tensor that runs past the blob.
    let e = err(&batch(vec![view("image", D::U8, vec![1, 2, 3, 64, 64], 8)], image));
    assert!(e.contains("overruns"), "{e}");
}
