//! Hitless restart: 200 long-lived TCP connections (real kernel sockets,
//! a request every 10 ms each) through a Cluster (SNAT) Service of a real
//! `xskgate run` on AF_XDP sockets and veths, while the gateway is stopped
//! and started again. With `--state-dir` (the conntrack table in a file on
//! /dev/shm, the XDP links pinned on a BPF file system the test mounts)
//! every connection continues, after SIGTERM and after `kill -9`; without
//! it, a restart loses connections (the baseline that shows the test can
//! fail).
//! Needs root; fails loudly without it. Measurement:
//! `xskgate_tests::restart`.

use std::path::Path;
use xskgate_tests::restart::{Options, Report, Stop, measure};

const XSKGATE: &str = env!("CARGO_BIN_EXE_xskgate");

fn run(stop: Stop, keep_state: bool) -> Report {
    xskgate_tests::require_root();
    let o = Options { stop, keep_state, ..Options::default() };
    let r = measure(Path::new(XSKGATE), &o).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{} (state {keep_state}): {r:?}", stop.name());
    r
}

fn assert_hitless(r: &Report) {
    assert_eq!(r.survived, r.connections, "connections reset or stalled across the restart: {r:?}");
    assert!(r.resumed_flows >= Some(r.connections as u64), "the successor resumed every flow: {r:?}");
    assert!(r.max_gap_ms < 10_000, "{r:?}");
}

#[test]
fn sigterm_then_start_keeps_every_connection() {
    assert_hitless(&run(Stop::Term, true));
}

#[test]
fn kill_9_then_start_keeps_every_connection() {
    let r = run(Stop::Kill, true);
    assert_hitless(&r);
}

/// Without `--state-dir` the successor knows none of the flows, and in the
/// gap the kernel answers the pod's packets to the SNAT address with
/// resets: connections are lost (some survive, by chance: no packet in
/// flight in the gap, and the same SNAT port picked again for the flow the
/// successor takes up mid-stream). What the test above would see if the
/// state were not kept.
#[test]
fn without_state_a_restart_loses_connections() {
    let r = run(Stop::Term, false);
    assert!(r.survived < r.connections, "{r:?}");
    assert!(r.first_failure.is_some(), "{r:?}");
}
