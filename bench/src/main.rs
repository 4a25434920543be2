//! xskgate's benchmarks. Every figure is measured side by side in one run,
//! because the machines are shared and noisy; ratios come first.
//!
//! - `conntrack`: the flow table against papaya, scc and dashmap on the same
//!   workload (lookups and inserts, hit and miss, 1 and 2 threads).
//! - `pipeline`: the packet pipeline in memory on one core (established and
//!   new-flow packets, 1 against 10,000 Services).
//! - `control`: translation and publication at 10,000 Services.
//! - `host`: what the machine's memory allows a flow table (load latency by
//!   working set, a random line's cost, whether it hides behind computation).
//! - `e2e`: the gateway on veths against kube-proxy's iptables and nftables
//!   rules, plain routing and a bare AF_XDP reflector (needs root).
//! - `restart`: long-lived connections across a restart of the gateway,
//!   with `--state-dir` and without (needs root).

mod chart;
mod conntrack;
mod control;
mod e2e;
mod host;
mod pipeline;
mod report;
mod restart;

use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOC: xskgate_tests::alloc::CountingAlloc = xskgate_tests::alloc::CountingAlloc;

#[derive(Parser)]
#[command(name = "xskgate-bench", about = "xskgate benchmarks (ratios measured side by side in one run)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Conntrack table vs papaya, scc and dashmap: lookups/s and inserts/s.
    Conntrack(report::Args),
    /// Packet pipeline in memory: established and new-flow Mpps, 1 vs 10,000 Services.
    Pipeline(report::Args),
    /// Control plane: full sync and one EndpointSlice change at 10,000 Services.
    Control(report::Args),
    /// This machine's memory: load latency by working set, a random line's cost,
    /// and whether prefetched lines hide behind computation.
    Host(report::Args),
    /// End to end on veths (root): xskgate vs kube-proxy's iptables and nftables rules,
    /// plain routing and an AF_XDP reflector; Mpps, latency, scaling, programming time.
    E2e(report::Args),
    /// Restart under load (root): long-lived TCP connections through a SNAT Service
    /// across SIGTERM and kill -9, with --state-dir and without.
    Restart(report::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Conntrack(args) => conntrack::run(&args),
        Cmd::Pipeline(args) => pipeline::run_bench(&args),
        Cmd::Control(args) => control::run(&args),
        Cmd::Host(args) => host::run(&args),
        Cmd::E2e(args) => e2e::run(&args),
        Cmd::Restart(args) => restart::run(&args),
    };
    if let Err(e) = result {
        eprintln!("xskgate-bench: {e}");
        std::process::exit(1);
    }
}
