//! `xskgate-bench host`: what this machine's memory allows a flow table,
//! whatever code runs on it. Three measurements, on one core:
//!
//! - **Load latency by working set**: a chain of dependent loads, each to a
//!   random 64-byte line of an array of the given size (one random cycle
//!   through all its lines), in huge pages where the kernel gives them, as
//!   the conntrack table is mapped ([`map_lines`]). Where the latency
//!   jumps is where this core's share of the caches ends.
//! - **A random line's cost**: the same access pattern as a flow lookup
//!   with the batch's prefetching: a read-modify-write of one random line
//!   of an array as large as the 1M-flow conntrack table per item, each line
//!   prefetched [`PREFETCH_AHEAD`] items before it is used. Nothing else per
//!   item, so this is the memory system's throughput for random lines
//!   (the loop is short, so the core also overlaps many of the loads).
//! - **Whether that cost hides behind computation**: a fixed amount of
//!   arithmetic per item (four independent dependency chains, about as
//!   much work as the pipeline's established packet: [`WORK_ROUNDS`]), alone
//!   and then with the prefetched random line. On a core that overlaps the
//!   prefetches with the arithmetic, the two together cost about as much as
//!   the larger of the two; where the line's cost is added to the
//!   arithmetic instead, a flow table too large for the caches costs at
//!   least the arithmetic plus one line per packet, however well it
//!   prefetches. `hidden_fraction` is the share of the line's cost that the
//!   arithmetic hid: 1 fully overlapped, 0 fully added (negative: worse
//!   than added).
//!
//! The three modes alternate within each round and the median round is
//! reported, as everywhere in this crate.

use crate::pipeline::{Line, map_lines, million_flow_table_bytes};
use crate::report::{Args, Rng, median, progress, r3};
use serde_json::json;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;
use xskgate_conntrack::prefetch_line;

/// How many items ahead a line is prefetched: at a few tens of
/// nanoseconds an item, well over a microsecond, longer than any DRAM
/// latency.
const PREFETCH_AHEAD: usize = 32;

/// Rounds of [`work`]: about 35 ns an item on the 3.2 GHz Zen 3 host this
/// was written on, near the pipeline's cache-resident established packet.
const WORK_ROUNDS: u32 = 20;

/// Working-set sizes of the latency measurement in bytes, before the
/// 1M-flow conntrack table's own size.
const LATENCY_BYTES: [usize; 4] = [256 << 10, 4 << 20, 16 << 20, 64 << 20];

/// Four independent dependency chains of shifts, adds, xors and a multiply
/// per round, seeded by `x`: computation with the instruction-level
/// parallelism of packet processing, and no memory access (an empty asm
/// block per round keeps the compiler from folding the rounds away).
#[inline(always)]
fn work(x: u64) -> u64 {
    let (mut a, mut b, mut c, mut d) = (x, x ^ 0x9e37_79b9_7f4a_7c15, x.wrapping_mul(3), x.wrapping_add(7));
    for i in 0..WORK_ROUNDS {
        a = (a ^ (a >> 7)).wrapping_add(b);
        b = (b << 3) ^ c;
        c = c.wrapping_add(d >> 5);
        d = (d ^ a).wrapping_add(0x1234);
        a = a.wrapping_mul(3).wrapping_add(1);
        b ^= c >> 2;
        c = c.wrapping_add(u64::from(i));
        d = d.rotate_left(1);
        // SAFETY: an empty asm block that only claims to change four registers.
        unsafe {
            std::arch::asm!("/* {0} {1} {2} {3} */", inout(reg) a, inout(reg) b, inout(reg) c, inout(reg) d, options(nomem, nostack, preserves_flags));
        }
    }
    a ^ b ^ c ^ d
}

/// What a measured round runs per item.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Work,
    Line,
    Both,
}

/// ns per item of `mode` over the random line indices `picks`.
fn per_item(mode: Mode, lines: &[Line], picks: &[u32]) -> f64 {
    let mut acc = 0u64;
    let start = Instant::now();
    let with_line = mode != Mode::Work;
    for (j, &pick) in picks.iter().enumerate() {
        if with_line && let Some(&ahead) = picks.get(j + PREFETCH_AHEAD) {
            prefetch_line(lines[ahead as usize].0.as_ptr().cast());
        }
        if mode != Mode::Line {
            acc = acc.wrapping_add(work(u64::from(pick)));
        }
        if with_line {
            // A plain load and store, as a worker's update of a flow's
            // last-seen time is.
            let word = &lines[pick as usize].0[0];
            word.store(word.load(Relaxed).wrapping_add(1), Relaxed);
        }
    }
    std::hint::black_box(acc);
    start.elapsed().as_secs_f64() * 1e9 / picks.len() as f64
}

/// ns per load of a chain of `loads` dependent loads through a random
/// cycle of all of `lines` (word 0 of each line holds the next line's index).
fn chase(lines: &[Line], loads: usize, rng: &mut Rng) -> f64 {
    // Sattolo's shuffle: one cycle through every line.
    let mut order: Vec<u32> = (0..lines.len() as u32).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i));
    }
    for (k, &line) in order.iter().enumerate() {
        let next = order[(k + 1) % order.len()];
        lines[line as usize].0[0].store(u64::from(next), Relaxed);
    }
    let mut at = 0usize;
    let start = Instant::now();
    for _ in 0..loads {
        at = lines[at].0[0].load(Relaxed) as usize;
    }
    std::hint::black_box(at);
    start.elapsed().as_secs_f64() * 1e9 / loads as f64
}

pub fn run(args: &Args) -> Result<(), String> {
    let rounds = if args.quick { 2 } else { 5 };
    let items = if args.quick { 1_000_000 } else { 4_000_000 };
    let loads = if args.quick { 300_000 } else { 2_000_000 };
    let table_bytes = million_flow_table_bytes()?;
    let table = map_lines(table_bytes)?;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let picks: Vec<u32> = (0..items).map(|_| rng.below(table.len()) as u32).collect();
    let sizes: Vec<usize> = LATENCY_BYTES.into_iter().chain([table_bytes]).collect();
    let mut latency = vec![Vec::new(); sizes.len()];
    let (mut work_ns, mut line_ns, mut both_ns) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        progress(&format!("round {}/{rounds}: computation, random lines, both", round + 1));
        work_ns.push(per_item(Mode::Work, &table, &picks));
        line_ns.push(per_item(Mode::Line, &table, &picks));
        both_ns.push(per_item(Mode::Both, &table, &picks));
        progress(&format!("round {}/{rounds}: load latency by working set", round + 1));
        for (k, &bytes) in LATENCY_BYTES.iter().enumerate() {
            latency[k].push(chase(&map_lines(bytes)?, loads, &mut rng));
        }
        latency[LATENCY_BYTES.len()].push(chase(&table, loads, &mut rng));
    }
    let latency: Vec<f64> = latency.into_iter().map(median).collect();
    let (work, line, both) = (median(work_ns), median(line_ns), median(both_ns));
    let hidden = (work + line - both) / line;
    if args.json {
        let by_size: serde_json::Map<String, serde_json::Value> =
            sizes.iter().zip(&latency).map(|(&b, &ns)| (format!("{}KiB", b >> 10), json!(r3(ns)))).collect();
        println!(
            "{}",
            json!({
                "load_latency_ns": by_size,
                "random_line_ns": r3(line),
                "work_ns": r3(work),
                "work_and_line_ns": r3(both),
                "hidden_fraction": r3(hidden),
                "table_bytes": table_bytes,
                "prefetch_ahead": PREFETCH_AHEAD,
            })
        );
        return Ok(());
    }
    println!("## host: what this machine's memory allows a flow table (one core)\n");
    println!("| working set | dependent random load, ns |");
    println!("|---|---|");
    for (&bytes, ns) in sizes.iter().zip(&latency) {
        let size = if bytes >= 1 << 20 { format!("{} MiB", bytes >> 20) } else { format!("{} KiB", bytes >> 10) };
        println!("| {size} | {ns:.1} |");
    }
    println!(
        "\nper item, {} MiB array, lines prefetched {PREFETCH_AHEAD} items ahead: \
         computation {work:.1} ns, one random line {line:.1} ns, both {both:.1} ns",
        table_bytes >> 20
    );
    println!(
        "share of the line's cost hidden behind the computation: {:.0} % \
         (100 % overlapped, 0 % added to it)",
        100.0 * hidden
    );
    Ok(())
}
