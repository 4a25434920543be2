//! `xskgate-bench pipeline`: the packet pipeline in memory, one core.
//!
//! Two service tables are measured side by side: 1 Service and 10,000
//! Services (32 endpoints each, all addresses in 198.18.0.0/15, a LoadBalancer IP per Service, external
//! policy Cluster so every new flow takes the SNAT path). For each, in
//! alternating rounds on a fresh conntrack table:
//! - new flows: 1M 64-byte UDP packets, each the first of its flow (parse,
//!   service lookup, Maglev, SNAT port allocation, conntrack insert, NAT);
//! - established: packets of those 1M flows in random order (parse,
//!   conntrack lookup, NAT, counters).
//!
//! Frames are refilled from prepared templates before every batch of 64, as
//! an RX ring would deliver them; that copy is part of the measured cost.
//! The median round is reported. `cost_ratio_10k_vs_1` is the established
//! per-packet cost with 10,000 Services over the cost with one.
//!
//! A third case, 1 Service with only 4,096 flows (a table that stays in
//! the CPU caches), is the compute-only ceiling: how far the 1M-flow figure
//! is from it says how much memory latency the batch's prefetching leaves.
//!
//! A fourth case is the first one with its conntrack table in a file on
//! /dev/shm, as `xskgate run --state-dir` keeps it (a shared mapping of
//! tmpfs, in 4 KiB pages where the shared memory file system has no huge
//! pages), against the anonymous huge-page mapping of the others.
//!
//! The memory floor is the other bound, measured in the same rounds: the
//! same packets, batches and refill, but per packet only a hash of the
//! frame's addresses and ports and a read-modify-write of one random 64-byte
//! line (two for a new flow, which stores both of its tuples) of a table as
//! large as the 1M-flow conntrack table, prefetched a batch ahead. No parse,
//! no NAT: what any flow table too large for the caches pays per packet on
//! the machine at hand, however little it computes.
//!
//! The core's clock is measured in every round too ([`clock_ghz`]), because
//! a shared host's clock moves from hour to hour: cycles per packet
//! (ns × GHz, with the median clock) compare runs that the host clocked
//! differently. They are exact for computing and only approximate where
//! memory latency, which does not scale with the clock, dominates.

use crate::report::{Args, Rng, median, progress, r3};
use serde_json::json;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;
use xskgate_conntrack::mem::{AllZeroValid, ZeroedArray};
use xskgate_conntrack::{Addr, Config, FlowTable, Proto};
use xskgate_fastpath::{
    AffinityTable, BATCH, Endpoint, EndpointSet, Frame, Frontend, FrontendKind, NodeConfig, ServicePort,
    ServicePortName, ServiceTable, ServiceTableBuilder, Tables, TrafficPolicy, Verdict, WorkerState, process_batch,
};

const FRAME: usize = 64;
const FLOWS: usize = 1 << 20;
/// Flows of the cache-resident case.
const FEW_FLOWS: usize = 4096;
/// Endpoints per Service. With one SNAT address each endpoint offers 64,512
/// reply tuples, so 1M flows through one Service need more than 16 of them;
/// 32 keeps each endpoint's SNAT port space about half used.
const ENDPOINTS: u32 = 32;

fn services(n: usize) -> ServiceTable {
    let gw = Addr::from(Ipv4Addr::new(198, 18, 0, 1));
    let node = NodeConfig { addresses: vec![gw], snat_v4: Some(gw), ..NodeConfig::default() };
    let mut b = ServiceTableBuilder::new(node, 1);
    for s in 0..n {
        let endpoints = (0..ENDPOINTS)
            // One address per Service (198.19.0.0/16 holds 10,000), one port per endpoint.
            .map(|e| Endpoint {
                addr: Addr::from(Ipv4Addr::from(0xC613_0000 + s as u32)),
                port: 8080 + e as u16,
                id: e,
            })
            .collect::<Vec<_>>();
        b.add(Arc::new(ServicePort {
            id: s as u32,
            name: ServicePortName { namespace: "bench".into(), name: format!("svc-{s}"), port_name: String::new() },
            proto: Proto::UDP,
            frontends: vec![Frontend { kind: FrontendKind::LoadBalancer, addr: vip(s), port: 80 }],
            external_policy: TrafficPolicy::Cluster,
            internal_policy: TrafficPolicy::Cluster,
            cluster: EndpointSet::new(endpoints.clone()),
            local: EndpointSet::new(endpoints),
            affinity_timeout: None,
            source_ranges: vec![],
            health_check_node_port: None,
            dsr: false,
        }))
        .expect("distinct frontends");
    }
    b.build()
}

fn vip(s: usize) -> Addr {
    Addr::from(Ipv4Addr::from(0xC612_8000 + s as u32))
}

/// The first packet of flow `i` (client address and port unique per flow),
/// spread over `n_services`.
fn packet(i: usize, n_services: usize) -> [u8; FRAME] {
    let client = Ipv4Addr::from(0xC612_0000 + (i / 50_000) as u32);
    let port = 10_000 + (i % 50_000) as u16;
    let dst = vip(i % n_services).as_v4().expect("v4");
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(client.octets(), dst, 64)
        .udp(port, 80);
    let mut v = Vec::with_capacity(FRAME);
    b.write(&mut v, &[0u8; FRAME - 42]).expect("write to Vec");
    v.try_into().expect("64-byte frame")
}

/// A frame buffer as an AF_XDP ring delivers one: a 2,048-byte UMEM chunk
/// whose frame starts on a cache line (the kernel puts it 256 bytes into a
/// page-aligned chunk). Plain `[u8; 2048]` elements of a `Vec` start
/// wherever the allocator put the vector, and a 64-byte frame then spans
/// two lines.
#[repr(C, align(64))]
struct Chunk([u8; 2048]);

/// Runs `packets` through the pipeline in batches; returns (Mpps, verdict check).
fn run(packets: &[[u8; FRAME]], t: &Tables<'_>, worker: &mut WorkerState, bufs: &mut [Chunk]) -> f64 {
    let mut verdicts = [Verdict::Pass; BATCH];
    let start = Instant::now();
    for chunk in packets.chunks(BATCH) {
        let mut it = bufs.iter_mut();
        let mut frames: [Frame<'_>; BATCH] =
            std::array::from_fn(|_| Frame { buf: &mut it.next().expect("BATCH").0, len: 0 });
        for (f, p) in frames.iter_mut().zip(chunk) {
            f.buf[..FRAME].copy_from_slice(p);
            f.len = FRAME;
        }
        process_batch(&mut frames[..chunk.len()], t, worker, 1, &mut verdicts[..chunk.len()]);
    }
    packets.len() as f64 / start.elapsed().as_secs_f64() / 1e6
}

/// One 64-byte line of the floor's table (and of `host`'s arrays), which
/// is mapped as the conntrack table's memory is ([`ZeroedArray`]: huge
/// pages, faulted in).
#[derive(Default)]
#[repr(C, align(64))]
pub(crate) struct Line(pub(crate) [AtomicU64; 8]);

// SAFETY: atomics of integers only; all-zero is a valid value.
unsafe impl AllZeroValid for Line {}

/// `bytes` (rounded up to whole lines) mapped as [`Line`]s.
pub(crate) fn map_lines(bytes: usize) -> Result<ZeroedArray<Line>, String> {
    ZeroedArray::new(bytes.div_ceil(64)).map_err(|e| format!("mapping {bytes} bytes: {e}"))
}

/// The memory of the conntrack table that holds the measured 1M flows.
pub(crate) fn million_flow_table_bytes() -> Result<usize, String> {
    Ok(FlowTable::new(Config { capacity: FLOWS + FLOWS / 4, ..Config::default() })
        .map_err(|e| e.to_string())?
        .memory_bytes())
}

/// The memory floor (see the module doc): `lines_per_packet` random lines
/// of `table` read and written per packet. Returns Mpps.
fn memory_floor(packets: &[[u8; FRAME]], lines: &[Line], lines_per_packet: usize, bufs: &mut [Chunk]) -> f64 {
    let n = lines.len() as u128;
    let mut picked = [0usize; 2 * BATCH];
    let start = Instant::now();
    for chunk in packets.chunks(BATCH) {
        // The whole batch is refilled first, as `run` does: a frame read
        // straight after its copy waits for the copy's stores (its 8-byte
        // address load spans two of them), and with a batch of misses in
        // flight that wait was most of this loop's time (37 ns a packet on
        // the Zen 3 host against 16.6 ns when refilled first; bench/README.md).
        for (buf, p) in bufs.iter_mut().zip(chunk) {
            buf.0[..FRAME].copy_from_slice(p);
        }
        for ((buf, _), pick) in bufs.iter_mut().zip(chunk).zip(picked.chunks_mut(2)) {
            // The IPv4 addresses and the ports: the flow's identity.
            let addrs = u64::from_le_bytes(buf.0[26..34].try_into().expect("8 bytes"));
            let ports = u64::from(u32::from_le_bytes(buf.0[34..38].try_into().expect("4 bytes")));
            let h = (u128::from(addrs ^ 0xa076_1d64_78bd_642f) * u128::from(ports ^ 0xe703_7ed1_a0b4_28db)) as u64;
            let h2 = h.rotate_left(32).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            pick[0] = ((u128::from(h) * n) >> 64) as usize;
            pick[1] = ((u128::from(h2) * n) >> 64) as usize;
            for &line in &pick[..lines_per_packet] {
                xskgate_conntrack::prefetch_line(lines[line].0.as_ptr().cast());
            }
        }
        for pick in picked.chunks(2).take(chunk.len()) {
            for &line in &pick[..lines_per_packet] {
                // A plain load and store (no locked instruction), as one
                // worker's update of its own line would be.
                let word = &lines[line].0[0];
                word.store(word.load(Relaxed).wrapping_add(1), Relaxed);
            }
        }
    }
    std::hint::black_box(lines[0].0[0].load(Relaxed));
    packets.len() as f64 / start.elapsed().as_secs_f64() / 1e6
}

/// Latency of one 64-bit multiply in cycles: 3 on the x86-64 cores of the
/// last decade (Intel since Sandy Bridge, AMD since Zen). Elsewhere the
/// clock reading (and the cycles derived from it) is only as good as this.
const MUL_LATENCY_CYCLES: f64 = 3.0;

/// The core's clock in GHz, now: the time of a chain of dependent 64-bit
/// multiplies, each of which waits for the one before. A chain of squarings
/// is used because the compiler cannot shorten it (a chain of multiplies by
/// one constant it could regroup into one multiply by a power of it).
fn clock_ghz() -> f64 {
    const STEPS: u64 = 20_000_000;
    let mut x = std::hint::black_box(0x9e37_79b9_7f4a_7c15_u64);
    let start = Instant::now();
    for _ in 0..STEPS / 8 {
        for _ in 0..8 {
            x = x.wrapping_mul(x);
        }
    }
    std::hint::black_box(x);
    MUL_LATENCY_CYCLES * STEPS as f64 / start.elapsed().as_secs_f64() / 1e9
}

pub fn run_bench(args: &Args) -> Result<(), String> {
    // (Services, flows): the two measured cases, the cache-resident one,
    // and the first again with its conntrack table in a file on /dev/shm
    // (`--state-dir`; the last case).
    let cases = [(1usize, FLOWS), (10_000, FLOWS), (1, FEW_FLOWS), (1, FLOWS)];
    let state_case = cases.len() - 1;
    let state_dir = std::path::Path::new("/dev/shm").join(format!("xskgate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&state_dir).map_err(|e| format!("{}: {e}", state_dir.display()))?;
    let state_file = state_dir.join("conntrack");
    let result = measure_cases(args, &cases, state_case, &state_file);
    let _ = std::fs::remove_dir_all(&state_dir);
    result
}

fn measure_cases(
    args: &Args,
    cases: &[(usize, usize)],
    state_case: usize,
    state_file: &std::path::Path,
) -> Result<(), String> {
    let rounds = if args.quick { 2 } else { 5 };
    let established_packets = if args.quick { 2_000_000 } else { 5_000_000 };
    progress("building service tables (1 and 10,000 Services) and packets");
    let tables: Vec<ServiceTable> = [1, 10_000].iter().map(|&n| services(n)).collect();
    let table_of = |services: usize| &tables[usize::from(services != 1)];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let new_packets: Vec<Vec<[u8; FRAME]>> =
        cases.iter().map(|&(n, flows)| (0..flows).map(|i| packet(i, n)).collect()).collect();
    let est_packets: Vec<Vec<[u8; FRAME]>> = cases
        .iter()
        .zip(&new_packets)
        .map(|(&(_, flows), pk)| (0..established_packets).map(|_| pk[rng.below(flows)]).collect())
        .collect();
    let affinity = AffinityTable::new(1024);
    let mut bufs: Vec<Chunk> = (0..BATCH).map(|_| Chunk([0; 2048])).collect();
    let mut new_mpps = vec![Vec::new(); cases.len()];
    let mut est_mpps = vec![Vec::new(); cases.len()];
    // One random line per packet (established), two (new flows).
    let mut floor_mpps = [Vec::new(), Vec::new()];
    let mut clock = Vec::new();
    let table_bytes = million_flow_table_bytes()?;
    let floor_table = map_lines(table_bytes).map_err(|e| format!("memory floor: {e}"))?;
    for round in 0..rounds {
        clock.push(clock_ghz());
        progress(&format!("round {}/{rounds}: memory floor, {} MB", round + 1, table_bytes >> 20));
        floor_mpps[0].push(memory_floor(&est_packets[0], &floor_table, 1, &mut bufs));
        floor_mpps[1].push(memory_floor(&new_packets[0], &floor_table, 2, &mut bufs));
        for (k, &(n, flows)) in cases.iter().enumerate() {
            progress(&format!("round {}/{rounds}: {n} service(s), {flows} flows", round + 1));
            let config = Config { capacity: flows + flows / 4, ..Config::default() };
            let conntrack = if k == state_case {
                // A fresh file each round (an existing one would be resumed).
                let _ = std::fs::remove_file(state_file);
                FlowTable::open_file(config, state_file).map_err(|e| e.to_string())?.0
            } else {
                FlowTable::new(config).map_err(|e| e.to_string())?
            };
            let t = Tables { services: table_of(n), conntrack: &conntrack, affinity: &affinity };
            let mut worker = WorkerState::new();
            new_mpps[k].push(run(&new_packets[k], &t, &mut worker, &mut bufs));
            let created = worker.counters.flows_created;
            if created != flows as u64 {
                return Err(format!("{n} services: {created} flows created of {flows}: {:?}", worker.counters.drops));
            }
            est_mpps[k].push(run(&est_packets[k], &t, &mut worker, &mut bufs));
            clock.push(clock_ghz());
            let forwarded = worker.counters.forwarded;
            if forwarded != (flows + established_packets) as u64 {
                return Err(format!("{n} services: {forwarded} packets forwarded, expected all"));
            }
        }
    }
    let new: Vec<f64> = new_mpps.into_iter().map(median).collect();
    let est: Vec<f64> = est_mpps.into_iter().map(median).collect();
    let [floor_est, floor_new] = floor_mpps.map(median);
    let ratio = est[0] / est[1];
    let readings = clock.len();
    let ghz = median(clock);
    // Mpps → cycles per packet at the run's median clock.
    let cycles = |mpps: f64| 1e3 * ghz / mpps;
    if args.json {
        println!(
            "{}",
            json!({
                "established_mpps": r3(est[0]),
                "new_flow_mpps": r3(new[0]),
                "cost_ratio_10k_vs_1": r3(ratio),
                "established_ns_per_packet": r3(1e3 / est[0]),
                "new_flow_ns_per_packet": r3(1e3 / new[0]),
                "established_mpps_10k_services": r3(est[1]),
                "new_flow_mpps_10k_services": r3(new[1]),
                "established_mpps_cache_resident": r3(est[2]),
                "memory_floor_mpps": r3(floor_est),
                "memory_floor_two_lines_mpps": r3(floor_new),
                "flows_in_table": FLOWS,
                "clock_ghz": r3(ghz),
                "established_cycles_per_packet": cycles(est[0]).round(),
                "new_flow_cycles_per_packet": cycles(new[0]).round(),
                "established_cycles_per_packet_cache_resident": cycles(est[2]).round(),
                "established_mpps_state_file": r3(est[state_case]),
                "new_flow_mpps_state_file": r3(new[state_case]),
                "state_file_vs_memory_established": r3(est[state_case] / est[0]),
                "state_file_vs_memory_new_flow": r3(new[state_case] / new[0]),
            })
        );
        return Ok(());
    }
    println!("## pipeline: one core, in memory, 64-byte UDP\n");
    println!(
        "| services | flows in conntrack | established Mpps | ns/packet | cycles | new-flow Mpps | ns/packet | cycles |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (k, (n, flows)) in cases.iter().enumerate() {
        let flows = if k == state_case { format!("{flows} (--state-dir file)") } else { flows.to_string() };
        println!(
            "| {n} | {flows} | {:.2} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} |",
            est[k],
            1e3 / est[k],
            cycles(est[k]),
            new[k],
            1e3 / new[k],
            cycles(new[k])
        );
    }
    println!("\ncore clock (median of {readings} readings, dependent multiplies): {ghz:.2} GHz");
    println!("\nestablished cost with 10,000 services / with 1: {ratio:.3}x");
    println!("established with {FLOWS} flows / with {FEW_FLOWS} (cache-resident): {:.3}x", est[0] / est[2]);
    println!(
        "table in a /dev/shm file (--state-dir) / in anonymous memory: established {:.3}x, new flows {:.3}x",
        est[state_case] / est[0],
        new[state_case] / new[0]
    );
    println!(
        "memory floor ({} MB table): one random line per packet {floor_est:.2} Mpps (established reaches {:.0} %), \
         two lines {floor_new:.2} Mpps (new flows reach {:.0} %)",
        table_bytes >> 20,
        100.0 * est[0] / floor_est,
        100.0 * new[0] / floor_new
    );
    Ok(())
}
