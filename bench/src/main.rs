//! xskgate's benchmarks. Every figure is measured side by side in one run,
//! because the machines are shared and noisy; ratios come first.
//!
//! - `conntrack`: the flow table against papaya, scc and dashmap on the same
//!   workload (lookups and inserts, hit and miss, 1 and 2 threads).

mod alloc_count;
mod conntrack;
mod report;

use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOC: alloc_count::CountingAlloc = alloc_count::CountingAlloc;

#[derive(Parser)]
#[command(name = "xskgate-bench", about = "xskgate benchmarks (ratios measured side by side in one run)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Conntrack table vs papaya, scc and dashmap: lookups/s and inserts/s.
    Conntrack(conntrack::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Conntrack(args) => conntrack::run(&args),
    };
    if let Err(e) = result {
        eprintln!("xskgate-bench: {e}");
        std::process::exit(1);
    }
}
