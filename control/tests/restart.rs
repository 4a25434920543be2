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
use xskgate_tests::restart::{Options, Report, State, Stop, measure};
use xskgate_tests::single::Lab;

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

/// A successor started on fewer interfaces than its predecessor detaches
/// the program it left pinned on the others (else they would hold their
/// frames for good), and takes over the rest.
#[test]
fn a_successor_detaches_from_interfaces_it_does_not_serve() {
    xskgate_tests::require_root();
    let lab = Lab::new(Path::new(XSKGATE));
    let state = State::new(lab.t.prefix()).unwrap_or_else(|e| panic!("{e}"));
    let extra = state.args();
    let mut args = vec!["--manifests", lab.dir.to_str().unwrap(), "--conntrack-max", "4096"];
    args.extend(extra.iter().map(String::as_str));
    let xdp_on = |short: &str| {
        let out = lab.t.exec("gw", &["ip", "link", "show", "dev", &lab.t.if_name(short)]);
        String::from_utf8_lossy(&out.stdout).contains("xdp")
    };
    let mut first = lab.try_start_on(&["g0", "g1"], &args, "first.log").unwrap_or_else(|e| panic!("{e}"));
    first.signal_and_wait("TERM").unwrap();
    assert!(xdp_on("g0") && xdp_on("g1"), "the program stays on both after the stop");
    let second = lab.try_start_on(&["g0"], &args, "second.log").unwrap_or_else(|e| panic!("{e}"));
    let log = second.log_text();
    assert!(log.contains("detached from interfaces a predecessor served"), "{log}");
    assert!(log.contains("took over from the predecessor"), "{log}");
    assert!(xdp_on("g0") && !xdp_on("g1"), "{log}");
}
