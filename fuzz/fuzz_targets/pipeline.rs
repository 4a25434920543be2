//! Arbitrary frames, up to 16 in a batch, through `process_batch` against a
//! fixed table of Cluster, Local, affinity, source-range, reject and IPv6
//! Services (`xskgate_fuzz::table`), with a conntrack table emptied before
//! each input so that a crash reproduces from its input alone. Checks: no panic; no
//! frame grows past its buffer; every forwarded frame parses again; a
//! forwarded TCP or UDP frame whose checksums were right still has right
//! checksums (etherparse recomputes them in full); a frame dropped is left
//! as it came.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use xskgate_conntrack::{Config, FlowTable};
use xskgate_fastpath::{AffinityTable, Frame, ServiceTable, Tables, Verdict, WorkerState, process_batch, wire};
use xskgate_fuzz::{BUFFER, checksums_ok, frames, table};

static TABLE: OnceLock<ServiceTable> = OnceLock::new();
static CONNTRACK: OnceLock<FlowTable> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let services = TABLE.get_or_init(table);
    let conntrack = CONNTRACK.get_or_init(|| {
        FlowTable::new(Config { capacity: 256, seed: Some(1), ..Config::default() }).expect("small table")
    });
    conntrack.flush(|_| true);
    let affinity = AffinityTable::new(64);
    let tables = Tables { services, conntrack, affinity: &affinity };
    // Twice: the second round meets the flows the first one created (replies,
    // tracked packets, ICMP errors about them).
    let inputs = frames(data);
    // One worker state for all inputs (its counters are 8 MB to allocate).
    WORKER.with_borrow_mut(|worker| run(&inputs, &tables, worker));
});

thread_local! {
    static WORKER: std::cell::RefCell<WorkerState> = std::cell::RefCell::new(WorkerState::new());
}

fn run(inputs: &[&[u8]], tables: &Tables<'_>, worker: &mut WorkerState) {
    for round in 0..2u32 {
        let mut bufs: Vec<Vec<u8>> = inputs
            .iter()
            .map(|f| {
                let mut b = vec![0u8; BUFFER];
                b[..f.len()].copy_from_slice(f);
                b
            })
            .collect();
        let mut batch: Vec<Frame<'_>> =
            bufs.iter_mut().zip(inputs).map(|(buf, f)| Frame { buf, len: f.len() }).collect();
        let mut verdicts = vec![Verdict::Pass; batch.len()];
        process_batch(&mut batch, tables, worker, 100 + round, &mut verdicts);
        for ((f, v), input) in batch.iter().zip(&verdicts).zip(inputs) {
            assert!(f.len <= BUFFER, "a frame grew past its buffer: {} bytes", f.len);
            let out = &f.buf[..f.len];
            match v {
                Verdict::Forward { .. } => {
                    let p = wire::parse(out);
                    assert!(p.is_ok(), "a forwarded frame does not parse: {p:?} {out:02x?}");
                    if checksums_ok(input) == Some(true) {
                        assert_ne!(
                            checksums_ok(out),
                            Some(false),
                            "checksums broken by the rewrite: {input:02x?} → {out:02x?}"
                        );
                    }
                }
                Verdict::Drop(_) => assert_eq!(out, *input, "a dropped frame was changed"),
                Verdict::Pass | Verdict::Reply => {}
            }
        }
    }
}
