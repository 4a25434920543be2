//! Small helpers shared by the benchmarks: progress lines, resident memory.

use std::time::Instant;

/// A progress line on stderr (stdout stays clean for `--json`).
pub fn progress(msg: &str) {
    eprintln!("[bench] {msg}");
}

/// Resident set size of this process in bytes, from `/proc/self/statm`.
pub fn rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<usize>().ok()))
        .map_or(0, |pages| pages * 4096)
}

/// Millions of operations per second.
pub fn mops(ops: usize, started: Instant) -> f64 {
    ops as f64 / started.elapsed().as_secs_f64() / 1e6
}

/// Rounds to 3 decimals for output.
pub fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
