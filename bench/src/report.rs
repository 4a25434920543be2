//! Helpers shared by the benchmarks: common flags, progress lines, resident
//! memory, medians and a small deterministic random generator.

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

/// The flags every benchmark takes.
#[derive(clap::Args)]
pub struct Args {
    /// Smaller and shorter run (reported figures are noisier).
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// The median of samples (the middle round; rounds alternate between the
/// things compared, so a noisy moment hurts them alike).
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// xorshift64: deterministic, so every run looks up the same keys.
pub struct Rng(pub u64);

impl Rng {
    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((u128::from(self.0) * n as u128) >> 64) as usize
    }
}
