//! Restart under load (needs root): long-lived TCP connections through a
//! Cluster (SNAT) Service while `xskgate run` is stopped (SIGTERM, `kill
//! -9`) and started again, with `--state-dir` and, side by side, without
//! (the baseline: a gateway that keeps nothing). The measurement is
//! `xskgate_tests::restart`, the one the restart test asserts on.
//!
//! JSON: the totals of the runs with state (`connections`, `survived`,
//! `survived_fraction`, `max_gap_ms`), then every run.

use crate::report::Args;
use serde_json::json;
use std::time::Duration;
use xskgate_tests::restart::{Options, Report, Stop, measure};

fn row(stop: Stop, keep_state: bool, conntrack_max: usize, r: &Report) -> serde_json::Value {
    json!({
        "stop": stop.name(),
        "state": keep_state,
        "conntrack_max": conntrack_max,
        "connections": r.connections,
        "survived": r.survived,
        "survived_fraction": r.survived_fraction(),
        "max_gap_ms": r.max_gap_ms,
        "answered": r.answered,
        "restart_ms": r.restart_ms,
        "takeover_ms": r.takeover_ms,
        "resumed_flows": r.resumed_flows,
        "held_frames": r.held_frames,
        "first_failure": r.first_failure,
        "successor_startup_ms": r.startup_ms.iter().map(|(k, v)| (k.trim_end_matches("_ms").to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
    })
}

pub fn run(args: &Args) -> Result<(), String> {
    xskgate_tests::require_root();
    let xskgate = crate::e2e::xskgate_binary()?;
    let mut plan = vec![(Stop::Term, true, 65_536), (Stop::Kill, true, 65_536), (Stop::Term, false, 65_536)];
    if !args.quick {
        plan.extend([(Stop::Kill, false, 65_536), (Stop::Kill, true, 1 << 20)]);
    }
    let settle = Duration::from_secs(if args.quick { 2 } else { 4 });
    let mut rows = Vec::new();
    let (mut connections, mut survived, mut max_gap) = (0, 0, 0);
    for (stop, keep_state, conntrack_max) in plan {
        let o = Options { stop, keep_state, conntrack_max, settle, ..Options::default() };
        eprintln!(
            "restart: {} with{} state, --conntrack-max {conntrack_max}",
            stop.name(),
            if keep_state { "" } else { "out" }
        );
        let r = measure(&xskgate, &o)?;
        if keep_state {
            connections += r.connections;
            survived += r.survived;
            max_gap = max_gap.max(r.max_gap_ms);
        }
        rows.push((stop, keep_state, conntrack_max, r));
    }
    let fraction = if connections == 0 { 0.0 } else { survived as f64 / connections as f64 };
    if args.json {
        let runs: Vec<_> = rows.iter().map(|(s, k, c, r)| row(*s, *k, *c, r)).collect();
        let out = json!({
            "connections": connections,
            "survived": survived,
            "survived_fraction": fraction,
            "max_gap_ms": max_gap,
            "runs": runs,
        });
        println!("{}", serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?);
        return Ok(());
    }
    println!(
        "| stop | --state-dir | --conntrack-max | survived | longest gap | successor took over after | flows resumed | frames held |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (stop, keep_state, conntrack_max, r) in &rows {
        let opt = |v: Option<u64>, unit: &str| v.map_or("–".to_string(), |v| format!("{v}{unit}"));
        println!(
            "| {} | {} | {conntrack_max} | {}/{} | {} ms | {} | {} | {} |",
            stop.name(),
            if *keep_state { "yes" } else { "no" },
            r.survived,
            r.connections,
            r.max_gap_ms,
            opt(r.takeover_ms, " ms"),
            opt(r.resumed_flows, ""),
            opt(r.held_frames, ""),
        );
    }
    for (stop, keep_state, _, r) in &rows {
        let phases: Vec<String> =
            r.startup_ms.iter().map(|(k, v)| format!("{} {v} ms", k.trim_end_matches("_ms"))).collect();
        println!("successor start-up ({}, state {keep_state}): {}", stop.name(), phases.join(", "));
    }
    println!(
        "with --state-dir: {survived}/{connections} connections survived ({:.1} %), longest gap {max_gap} ms",
        fraction * 100.0
    );
    Ok(())
}
