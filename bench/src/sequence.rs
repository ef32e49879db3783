//! `nanobot bench loop --sequence none,icy_floor,brightness,none`: the main job (launch/sim.toml)
//! taken through conditions in turn, `--phase-s` each, with replay, the LoRA trainer and the
//! promoter learning all along. It reports, per phase, the live fleet's autonomous success per
//! minute (an episode the onboard expert finished is a failure), the minutes to ≥ 80 %, and
//! interventions per robot-hour; then, in shadow simulation on worlds no part of the system used
//! (3000–3003), the success of the policy the fleet ran at the end of each phase under each
//! phase's condition: the matrix the continual-learning figures come from (LIBERO's, Liu et al.
//! 2023: forward transfer, negative backward transfer, area under the success curve).

use anyhow::bail;
use nanobot_actors::shadow::{evaluate, Driver};
use nanobot_policy::runner::Runner;
use nanobot_sim::Shift;

use crate::learning::{
    child_kill, find_adapter, minutes_to_80, pct, per_robot_hour, rate, shadow_settings, watch_loop, LoopArgs, MainJob,
    Watch,
};

/// The continual-learning figures of a success matrix `c[i][k]`: success on phase k's condition
/// with the policy the fleet ran at the end of phase i (LIBERO's definitions, over phases).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transfer {
    /// Mean of `c[k][k]`: how well each condition is done right after its phase.
    pub forward: f64,
    /// Mean over k of the mean drop `c[k][k] − c[τ][k]` over the later phases τ: forgetting
    /// (negative backward transfer; below 0, later phases helped).
    pub backward_drop: f64,
    /// Mean over k of the mean of `c[k][k], c[k+1][k], …`: area under the success curve.
    pub auc: f64,
}

pub fn transfer(c: &[Vec<f64>]) -> Transfer {
    let k_n = c.len();
    let forward = (0..k_n).map(|k| c[k][k]).sum::<f64>() / k_n as f64;
    let drops: Vec<f64> = (0..k_n.saturating_sub(1))
        .map(|k| ((k + 1)..k_n).map(|t| c[k][k] - c[t][k]).sum::<f64>() / (k_n - k - 1) as f64)
        .collect();
    let backward_drop = if drops.is_empty() {
        0.0
    } else {
        drops.iter().sum::<f64>() / drops.len() as f64
    };
    let auc = (0..k_n)
        .map(|k| (k..k_n).map(|t| c[t][k]).sum::<f64>() / (k_n - k) as f64)
        .sum::<f64>()
        / k_n as f64;
    Transfer {
        forward,
        backward_drop,
        auc,
    }
}

pub fn run(rt: &tokio::runtime::Runtime, a: LoopArgs) -> anyhow::Result<u8> {
    let phases: Vec<Shift> = a.sequence.iter().map(|s| s.parse()).collect::<Result<_, _>>()?;
    if a.phase_s.is_nan() || a.phase_s < 60.0 {
        bail!("--phase-s {} : a phase needs at least a minute", a.phase_s);
    }
    let job = MainJob::prepare(&a, "sequence")?;
    // The first phase from the first tick; the others through the robots' `sequence`.
    let rest: Vec<String> = phases
        .iter()
        .enumerate()
        .skip(1)
        .map(|(k, s)| format!("{}@{:.1}", s.name(), k as f64 * a.phase_s))
        .collect();
    let end = phases.len() as f64 * a.phase_s;
    println!(
        "bench loop --sequence: launch/sim.toml in {}, base {}, observing {}, {} for {:.0} s each",
        job.work.display(),
        job.checkpoint.display(),
        a.observe.name(),
        a.sequence.join(" → "),
        a.phase_s
    );
    let mut fleet = job.spawn(&[
        ("NB_SHIFT", phases[0].name().to_string()),
        ("NB_SHIFT_AFTER_S", "0.0".to_string()),
        ("NB_SEQUENCE", rest.join(",")),
    ])?;
    let (checkpoint, work, port) = (job.checkpoint.clone(), job.work.clone(), job.port);
    let phase_s = a.phase_s;
    let label = |t: f64| {
        let k = ((t / phase_s) as usize).min(phases.len() - 1);
        format!("{} {}", k + 1, phases[k].name())
    };
    let result = rt.block_on(watch_loop(port, &work, end, &label));
    child_kill(&mut fleet);
    let w = result?;
    report(&w, &phases, &a, &checkpoint, &work)
}

fn report(
    w: &Watch,
    phases: &[Shift],
    a: &LoopArgs,
    checkpoint: &std::path::Path,
    work: &std::path::Path,
) -> anyhow::Result<u8> {
    let (eps, p) = (&w.episodes, a.phase_s);
    println!();
    println!("per phase, the live fleet (4 robots; an episode the expert finished is a failure):");
    println!(
        "  {:<18} {:<42} {:>16} {:>22}",
        "phase", "success per minute", "minutes to ≥ 80 %", "interventions/robot-h"
    );
    // The adapter the fleet ran at each phase's end.
    let mut at_end = Vec::new();
    for (k, shift) in phases.iter().enumerate() {
        let (from, to) = (k as f64 * p, (k + 1) as f64 * p);
        let minutes: Vec<String> = (0..((p / 60.0) as usize))
            .map(|m| pct(rate(eps, from + 60.0 * m as f64, from + 60.0 * (m + 1) as f64).0))
            .collect();
        let reached = minutes_to_80(eps, from, to)
            .map(|m| format!("{m:.1}"))
            .unwrap_or_else(|| "not reached".into());
        println!(
            "  {:<18} {:<42} {:>16} {:>22.0}",
            format!("{} {}", k + 1, shift.name()),
            minutes.join(" "),
            reached,
            per_robot_hour(&w.interventions, 4.0, from, to)
        );
        at_end.push(
            w.rollouts
                .iter()
                .rev()
                .find(|r| r.0 < to)
                .map(|r| r.2.clone())
                .unwrap_or_default(),
        );
    }
    // Success matrix on unseen worlds.
    let cfg = shadow_settings(a.observe, vec![3000, 3001, 3002, 3003], 5);
    let base = Runner::load(checkpoint, None)?;
    println!();
    println!("shadow simulation, worlds 3000–3003 × 5 episodes of at most 60 ticks (no part of the system used them):");
    print!("  {:<34}", "policy at the end of phase");
    for (k, s) in phases.iter().enumerate() {
        print!(" {:>16}", format!("{} {}", k + 1, s.name()));
    }
    println!();
    // Each (policy, condition) is evaluated once: the fleet often keeps one adapter over
    // several phases, and a sequence may return to a condition. "" is the base.
    let mut rows: std::collections::HashMap<String, Vec<f64>> = std::collections::HashMap::new();
    let mut row = |id: &str| -> anyhow::Result<Vec<f64>> {
        if let Some(r) = rows.get(id) {
            return Ok(r.clone());
        }
        let runner = match find_adapter(work, id) {
            Some(f) => base.with_adapter_bytes(&std::fs::read(&f)?, id)?,
            None => base.without_adapter()?,
        };
        let mut by_condition: std::collections::HashMap<&str, f64> = std::collections::HashMap::new();
        let mut r = Vec::new();
        for &s in phases {
            let v = match by_condition.get(s.name()) {
                Some(v) => *v,
                None => evaluate(&Driver::Policy(&runner), s, &cfg)?.success_rate(),
            };
            by_condition.insert(s.name(), v);
            r.push(v);
        }
        rows.insert(id.to_string(), r.clone());
        Ok(r)
    };
    let print_row = |label: String, values: &[f64]| {
        print!("  {label:<34}");
        values.iter().for_each(|v| print!(" {:>16}", pct(*v)));
        println!();
    };
    print_row("(the base)".into(), &row("")?);
    let mut c = Vec::new();
    for (k, id) in at_end.iter().enumerate() {
        let values = row(id)?;
        print_row(
            format!("{} ({})", k + 1, if id.is_empty() { "the base" } else { id }),
            &values,
        );
        c.push(values);
    }
    let t = transfer(&c);
    println!();
    println!(
        "continual learning (LIBERO): forward transfer {}, backward transfer (forgetting, drop) {:+.0} points, area under the success curve {}",
        pct(t.forward),
        100.0 * t.backward_drop,
        pct(t.auc)
    );
    if phases.len() > 1 {
        let last = phases.len() - 1;
        let (r, n) = rate(eps, last as f64 * p, last as f64 * p + 60.0);
        println!(
            "first minute of the last phase ({}), live: {} of {n} episodes",
            phases[last].name(),
            pct(r)
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_figures_follow_libero() {
        // Learned each phase fully, forgot nothing.
        let perfect = vec![vec![1.0, 0.0], vec![1.0, 1.0]];
        assert_eq!(
            transfer(&perfect),
            Transfer {
                forward: 1.0,
                backward_drop: 0.0,
                auc: 1.0
            }
        );
        // Phase 1's condition lost after phase 2: a drop of 0.6, AUC ((0.9 + 0.3) / 2 + 0.9) / 2.
        let forgot = vec![vec![0.9, 0.1], vec![0.3, 0.9]];
        let t = transfer(&forgot);
        assert!((t.forward - 0.9).abs() < 1e-9);
        assert!((t.backward_drop - 0.6).abs() < 1e-9);
        assert!((t.auc - (0.6 + 0.9) / 2.0).abs() < 1e-9, "{t:?}");
    }
}
