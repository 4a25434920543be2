//! `e2e`: the gateway operator's question, measured side by side in one run
//! on one veth topology (needs root):
//!
//! ```text
//!  gen 198.18.0.2 ── g0 198.18.0.1 [gw] g1 198.19.1.1 ── sink 198.19.1.10-12 (the pods)
//! ```
//!
//! A generator of our own on AF_XDP (64-byte UDP, N flows, as fast as
//! possible or at a fixed rate, bounded in packets and time) sends to the
//! Service; the sink drops the load in netfilter's raw table (counted by its
//! interface) and echoes the latency probes (a kernel UDP socket). The
//! gateway namespace takes each mode in turn:
//! - `routing`: plain forwarding to the pod, no NAT (reference);
//! - `iptables_{cluster,local}`: kube-proxy's iptables rules, written as
//!   kube-proxy writes them (KUBE-SERVICES, KUBE-EXT, KUBE-SVC with
//!   `statistic random`, KUBE-SEP DNAT, KUBE-MARK-MASQ and MASQUERADE);
//! - `nftables_{cluster,local}`: kube-proxy's nftables rules (the
//!   `service-ips` verdict map, `numgen random`, masquerade);
//! - `xskgate_{cluster,local}`: `xskgate run` on both interfaces;
//! - `reflector`: a bare AF_XDP reflector on the generator's side of the
//!   gateway (rx, swap MACs, tx): the ceiling of any AF_XDP design here.
//!
//! Figures: forwarded Mpps for established flows (64 flows) and for all-new
//! flows (every packet a new source address and port), probe latency
//! p50/p99/p99.9 (hdrhistogram) at a fixed offered load every mode
//! sustains, machine CPU per forwarded packet, per-packet cost with 1, 1,000
//! and 10,000 Services, and the programming time of 10,000 Services with
//! 100,000 endpoints. Ratios first; absolute figures are context, since the
//! machine is shared.

use crate::report::{Args, median, progress, r3};
use hdrhistogram::Histogram;
use serde_json::json;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use xskgate_tests::{Daemon, Topology, spawn_in_ns};

const GEN: [u8; 4] = [198, 18, 0, 2];
const VIP: [u8; 4] = [198, 18, 100, 10];
const PROBE_VIP: &str = "198.18.100.20";
const PODS: [[u8; 4]; 3] = [[198, 19, 1, 10], [198, 19, 1, 11], [198, 19, 1, 12]];
/// The load goes to UDP port 80 of the Service, 9 (discard) on the pods.
const LOAD_PORT: u16 = 80;
const POD_LOAD_PORT: u16 = 9;
const PROBE_PORT: u16 = 81;
/// New-flow runs stop after this many packets (each a new flow).
const NEW_FLOWS_MAX: u64 = 150_000;
const POD_PROBE_PORT: u16 = 8080;

fn ip(a: [u8; 4]) -> String {
    format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])
}

/// Durations and sizes of one run.
struct Plan {
    load: Duration,
    latency_rate_pps: u64,
    probes: usize,
    scales: Vec<usize>,
    program_services: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                load: Duration::from_secs(2),
                latency_rate_pps: 20_000,
                probes: 500,
                scales: vec![1, 1000, 10_000],
                // nft -f of 10,000 Services × 10 endpoints takes minutes here.
                program_services: 1000,
            }
        } else {
            Plan {
                load: Duration::from_secs(5),
                latency_rate_pps: 20_000,
                probes: 2000,
                scales: vec![1, 1000, 10_000],
                program_services: 10_000,
            }
        }
    }
}

/// The fixed topology.
struct Lab {
    gen_mac: [u8; 6],
    gw_mac: [u8; 6],
    dir: PathBuf,
    generator: Option<Generator>,
    // Last: removed after the generator's socket closed.
    t: Topology,
}

fn sh(t: &Topology, ns: &str, cmd: &str) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", &t.ns_name(ns), "sh", "-c", cmd])
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn mac_of(t: &Topology, ns: &str, ifname: &str) -> Result<[u8; 6], String> {
    let out = sh(t, ns, &format!("cat /sys/class/net/{ifname}/address"))?;
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(out.trim().split(':')) {
        *m = u8::from_str_radix(p, 16).map_err(|e| format!("MAC {out:?}: {e}"))?;
    }
    Ok(mac)
}

/// One of an interface's kernel counters (`rx_packets`, `tx_packets`, ...).
fn if_counter(t: &Topology, ns: &str, ifname: &str, counter: &str) -> u64 {
    sh(t, ns, &format!("cat /sys/class/net/{ifname}/statistics/{counter}"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Packets received by an interface.
fn rx_packets(t: &Topology, ns: &str, ifname: &str) -> u64 {
    if_counter(t, ns, ifname, "rx_packets")
}

/// Busy CPU time of the machine, in seconds (/proc/stat, read only).
fn busy_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().next() else { return 0.0 };
    let v: Vec<f64> = cpu.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if v.len() < 5 {
        return 0.0;
    }
    // user nice system idle iowait irq softirq steal: busy = all - idle - iowait.
    let total: f64 = v.iter().take(8).sum();
    (total - v[3] - v[4]) / 100.0
}

impl Lab {
    fn build() -> Result<Lab, String> {
        let mut t = Topology::new();
        for ns in ["gen", "gw", "sink"] {
            t.add_ns(ns);
        }
        t.link("gen", "e0", "198.18.0.2/24", "gw", "g0", "198.18.0.1/24");
        t.link("gw", "g1", "198.19.1.1/24", "sink", "s0", "198.19.1.10/24");
        for extra in &PODS[1..] {
            t.exec("sink", &["ip", "addr", "add", &format!("{}/24", ip(*extra)), "dev", &t.if_name("s0")]);
        }
        t.forwarding("gw");
        t.route("gen", "198.18.100.0/24", "198.18.0.1");
        t.route("gen", "198.19.0.0/16", "198.18.0.1");
        t.route("sink", "default", "198.19.1.1");
        // The sink drops the load before any socket (no ICMP back), after
        // its interface counted it.
        sh(
            &t,
            "sink",
            "nft add table ip sink && nft add chain ip sink pre '{ type filter hook prerouting priority -300; }' \
             && nft add rule ip sink pre udp dport 9 drop",
        )?;
        t.echo_thread("sink", "pod", POD_PROBE_PORT);
        let gen_mac = mac_of(&t, "gen", &t.if_name("e0"))?;
        let gw_mac = mac_of(&t, "gw", &t.if_name("g0"))?;
        // The gateway learns the generator's MAC (and the pods') before any run.
        sh(&t, "gen", "ping -c1 -W1 198.18.0.1 >/dev/null")?;
        sh(
            &t,
            "gw",
            "ping -c1 -W1 198.19.1.10 >/dev/null; ping -c1 -W1 198.19.1.11 >/dev/null; ping -c1 -W1 198.19.1.12 >/dev/null",
        )?;
        let dir = std::env::temp_dir().join(format!("{}-bench", t.prefix()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut lab = Lab { t, gen_mac, gw_mac, dir, generator: None };
        lab.generator = Some(Generator::start(&lab)?);
        Ok(lab)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the generator sends.
#[derive(Clone, Copy)]
struct Load {
    dst: [u8; 4],
    dport: u16,
    /// Distinct flows: established (small) or, with `new_flows`, every packet new.
    flows: u32,
    new_flows: bool,
    /// With `new_flows`: every other packet is of the `flows` established
    /// ones instead, sent to this address (a mix of both, as under a flood
    /// of new flows).
    mixed: Option<[u8; 4]>,
    /// Packets per second, or 0 for as fast as possible.
    rate: u64,
    duration: Duration,
    max_packets: u64,
}

impl Load {
    /// 64 established flows to `dst:dport`, as fast as possible, for
    /// `duration` (at most 50M packets).
    fn established(dst: [u8; 4], dport: u16, duration: Duration) -> Load {
        Load { dst, dport, flows: 64, new_flows: false, mixed: None, rate: 0, duration, max_packets: 50_000_000 }
    }
}

/// 300 ms of `l`'s flows at 10 kpps, so that they exist and their
/// neighbours are resolved before a measurement.
fn warm_up(lab: &Lab, l: Load) -> Result<(), String> {
    generate(lab, Load { duration: Duration::from_millis(300), rate: 10_000, ..l }, 0).map(|_| ())
}

/// A 64-byte (60 + FCS) Ethernet/IPv4/UDP frame; UDP checksum 0 (valid for
/// IPv4 and kept zero by NAT); the payload carries a timestamp.
fn write_frame(buf: &mut [u8], lab_macs: ([u8; 6], [u8; 6]), src: [u8; 4], sport: u16, l: &Load) -> usize {
    let len = 60;
    buf[..len].fill(0);
    buf[0..6].copy_from_slice(&lab_macs.1);
    buf[6..12].copy_from_slice(&lab_macs.0);
    buf[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ipl = len - 14;
    let h = &mut buf[14..34];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&(ipl as u16).to_be_bytes());
    h[8] = 64;
    h[9] = 17;
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&l.dst);
    let c = xskgate_fastpath::checksum::finish(xskgate_fastpath::checksum::sum(h));
    h[10..12].copy_from_slice(&c.to_be_bytes());
    let u = &mut buf[34..42];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&l.dport.to_be_bytes());
    u[4..6].copy_from_slice(&((ipl - 20) as u16).to_be_bytes());
    len
}

/// The generator: one AF_XDP socket on the generator's veth, opened once
/// (a socket closed and reopened at once may find the queue still busy) and
/// kept by a thread in the gen namespace that runs one [`Load`] at a time.
struct Generator {
    jobs: std::sync::mpsc::Sender<Job>,
}

/// A load to send, its packet budget, and where to report the packets sent.
type Job = (Load, u64, std::sync::mpsc::Sender<Result<u64, String>>);

impl Generator {
    fn start(lab: &Lab) -> Result<Generator, String> {
        let ns = lab.t.ns_name("gen");
        let ifname = lab.t.if_name("e0");
        let macs = (lab.gen_mac, lab.gw_mac);
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        spawn_in_ns(&ns, move || {
            pin(0);
            let ifindex = ifindex_here(&ifname);
            let mut port = match xskgate_fastpath::io::xsk::Port::open(&ifname, ifindex, 0) {
                Ok(p) => {
                    let _ = ready_tx.send(Ok(()));
                    p
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            while let Ok((l, first_flow, reply)) = rx.recv() {
                let start = Instant::now();
                let mut sent = 0u64;
                let mut flow = first_flow;
                while start.elapsed() < l.duration && sent < l.max_packets {
                    if l.rate > 0 {
                        let due = (start.elapsed().as_secs_f64() * l.rate as f64) as u64;
                        if sent >= due {
                            std::hint::spin_loop();
                            continue;
                        }
                    }
                    let n = port.send_with(if l.rate > 0 { 1 } else { 64 }, |_, buf| {
                        if let Some(dst) = l.mixed.filter(|_| flow % 2 == 0) {
                            flow += 1;
                            let sport = 10_000 + ((flow / 2) % u64::from(l.flows)) as u16;
                            return write_frame(buf, macs, GEN, sport, &Load { dst, ..l });
                        }
                        let (src, sport) = if l.new_flows {
                            // 2^15 source addresses in 198.18.128.0/17 × 60,000 ports.
                            let f = flow;
                            flow += 1;
                            let a = 0xc612_8000u32 | (f % 32_768) as u32;
                            (a.to_be_bytes(), 1024 + ((f / 32_768) % 60_000) as u16)
                        } else {
                            flow += 1;
                            (GEN, 10_000 + (flow % u64::from(l.flows)) as u16)
                        };
                        write_frame(buf, macs, src, sport, &l)
                    });
                    sent += n as u64;
                }
                let _ = reply.send(Ok(sent));
            }
        });
        ready_rx.recv().map_err(|_| "the generator thread died".to_string())??;
        Ok(Generator { jobs })
    }

    /// Runs `l`; returns packets sent.
    fn run(&self, l: Load, first_flow: u64) -> Result<u64, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.jobs.send((l, first_flow, tx)).map_err(|_| "the generator thread died".to_string())?;
        rx.recv().map_err(|_| "the generator thread died".to_string())?
    }
}

fn generate(lab: &Lab, l: Load, first_flow: u64) -> Result<u64, String> {
    lab.generator.as_ref().ok_or("no generator")?.run(l, first_flow)
}

/// The index of `ifname` in this thread's network namespace (sysfs would
/// show the namespace it was mounted in, not the thread's).
fn ifindex_here(ifname: &str) -> u32 {
    let Ok(c) = std::ffi::CString::new(ifname) else { return 0 };
    // SAFETY: `c` is a valid NUL-terminated string for the call's duration.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, passed with its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// One throughput measurement: Mpps forwarded (counted at `count_at`).
struct Throughput {
    mpps: f64,
    offered_mpps: f64,
    cpu_ns_per_packet: f64,
}

fn throughput(lab: &Lab, l: Load, count_at: (&str, &str), first_flow: u64) -> Result<Throughput, String> {
    let ifname = lab.t.if_name(count_at.1);
    let before = rx_packets(&lab.t, count_at.0, &ifname);
    let cpu0 = busy_cpu_seconds();
    let start = Instant::now();
    let sent = generate(lab, l, first_flow)?;
    let elapsed = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(200));
    let got = rx_packets(&lab.t, count_at.0, &ifname).saturating_sub(before);
    let cpu = busy_cpu_seconds() - cpu0;
    Ok(Throughput {
        mpps: got as f64 / elapsed / 1e6,
        offered_mpps: sent as f64 / elapsed / 1e6,
        cpu_ns_per_packet: if got > 0 { cpu * 1e9 / got as f64 } else { 0.0 },
    })
}

/// Probe RTTs (µs) through the gateway while the generator offers
/// `rate` pps of established load.
fn latency(lab: &Lab, plan: &Plan, probe_to: String, load: Load) -> Result<(Histogram<u64>, usize), String> {
    let stop = Arc::new(AtomicBool::new(false));
    let probes = plan.probes;
    let s2 = stop.clone();
    let prober = spawn_in_ns(&lab.t.ns_name("gen"), move || -> Result<(Histogram<u64>, usize), String> {
        let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).map_err(|e| e.to_string())?;
        let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        s.connect(&probe_to).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_millis(200))).map_err(|e| e.to_string())?;
        let mut lost = 0;
        let mut buf = [0u8; 128];
        // Warm-up: the flow exists before timing.
        let _ = s.send(b"warm");
        let _ = s.recv(&mut buf);
        for _ in 0..probes {
            let t0 = Instant::now();
            if s.send(b"probe").is_err() || s.recv(&mut buf).is_err() {
                lost += 1;
            } else {
                let _ = h.record((t0.elapsed().as_micros() as u64).max(1));
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        s2.store(true, Ordering::Relaxed);
        Ok((h, lost))
    });
    // Background load for as long as the probes run (bounded).
    let mut bg = load;
    bg.duration = Duration::from_millis(200 + probes as u64 * 2);
    let _ = generate(lab, bg, 0);
    let _ = stop;
    prober.join().map_err(|_| "prober panicked".to_string())?
}

// ---------------------------------------------------------------- modes

/// kube-proxy's endpoint chain suffix: 16 characters of a hash.
fn sep_name(i: usize, e: usize) -> String {
    format!("{:016X}", ((i as u64) << 8 | (e as u64 + 1)).wrapping_mul(0xD6E8_FEB8_6659_FD93))
}

fn svc_name(i: usize) -> String {
    format!("{:016X}", (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// The Services of a run: `n - 1` others first (ClusterIPs and LB IPs in
/// 198.18.128+/198.19.128+, endpoints that do not exist), then the measured
/// one (LB `VIP`, 3 pods) and the probe Service (one pod).
struct SvcSpec {
    cluster_ip: String,
    lb_ip: String,
    port: u16,
    target: u16,
    endpoints: Vec<String>,
}

fn services(n: usize, endpoints_per_other: usize) -> Vec<SvcSpec> {
    let mut v = Vec::with_capacity(n + 1);
    for i in 0..n.saturating_sub(1) {
        v.push(SvcSpec {
            cluster_ip: format!("198.19.{}.{}", 128 + i / 250 % 64, 1 + i % 250),
            lb_ip: format!("198.18.{}.{}", 128 + i / 250 % 64, 1 + i % 250),
            port: LOAD_PORT,
            target: POD_LOAD_PORT,
            endpoints: (0..endpoints_per_other)
                .map(|e| format!("198.19.{}.{}", 64 + e / 250 % 64, 1 + (i + e) % 250))
                .collect(),
        });
    }
    v.push(SvcSpec {
        cluster_ip: "198.19.255.10".into(),
        lb_ip: ip(VIP),
        port: LOAD_PORT,
        target: POD_LOAD_PORT,
        endpoints: PODS.iter().map(|p| ip(*p)).collect(),
    });
    v.push(SvcSpec {
        cluster_ip: "198.19.255.20".into(),
        lb_ip: PROBE_VIP.into(),
        port: PROBE_PORT,
        target: POD_PROBE_PORT,
        endpoints: vec![ip(PODS[0])],
    });
    v
}

/// kube-proxy's iptables-restore input for `svcs` (UDP, LoadBalancer IP and
/// ClusterIP), policy Cluster or Local.
fn iptables_rules(svcs: &[SvcSpec], local: bool) -> String {
    let mut s = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    for (i, _) in svcs.iter().enumerate() {
        let h = svc_name(i);
        let _ = writeln!(s, ":KUBE-SVC-{h} - [0:0]\n:KUBE-EXT-{h} - [0:0]");
        if local {
            let _ = writeln!(s, ":KUBE-SVL-{h} - [0:0]");
        }
        for e in 0..svcs[i].endpoints.len() {
            let _ = writeln!(s, ":KUBE-SEP-{} - [0:0]", sep_name(i, e));
        }
    }
    s.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    for (i, v) in svcs.iter().enumerate() {
        let h = svc_name(i);
        let name = format!("bench/svc-{i}:p");
        let _ = writeln!(
            s,
            "-A KUBE-SERVICES -d {}/32 -p udp -m comment --comment \"{name} cluster IP\" -m udp --dport {} -j KUBE-SVC-{h}",
            v.cluster_ip, v.port
        );
        let _ = writeln!(
            s,
            "-A KUBE-SERVICES -d {}/32 -p udp -m comment --comment \"{name} loadbalancer IP\" -m udp --dport {} -j KUBE-EXT-{h}",
            v.lb_ip, v.port
        );
        if local {
            let _ = writeln!(
                s,
                "-A KUBE-EXT-{h} -s 198.19.0.0/16 -m comment --comment \"pod traffic for {name} external destinations\" -j KUBE-SVC-{h}"
            );
            let _ = writeln!(
                s,
                "-A KUBE-EXT-{h} -m comment --comment \"masquerade LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(
                s,
                "-A KUBE-EXT-{h} -m comment --comment \"route LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j KUBE-SVC-{h}"
            );
            let _ = writeln!(s, "-A KUBE-EXT-{h} -j KUBE-SVL-{h}");
        } else {
            let _ = writeln!(
                s,
                "-A KUBE-EXT-{h} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(s, "-A KUBE-EXT-{h} -j KUBE-SVC-{h}");
        }
        let _ = writeln!(
            s,
            "-A KUBE-SVC-{h} ! -s 198.19.0.0/16 -d {}/32 -p udp -m comment --comment \"{name} cluster IP\" -m udp --dport {} -j KUBE-MARK-MASQ",
            v.cluster_ip, v.port
        );
        let n = v.endpoints.len();
        for chain in if local { vec!["SVC", "SVL"] } else { vec!["SVC"] } {
            for (e, ep) in v.endpoints.iter().enumerate() {
                let target = format!("KUBE-SEP-{}", sep_name(i, e));
                if e + 1 < n {
                    let p = 1.0 / (n - e) as f64;
                    let _ = writeln!(
                        s,
                        "-A KUBE-{chain}-{h} -m comment --comment \"{name} -> {ep}:{}\" -m statistic --mode random --probability {p:.11} -j {target}",
                        v.target
                    );
                } else {
                    let _ = writeln!(
                        s,
                        "-A KUBE-{chain}-{h} -m comment --comment \"{name} -> {ep}:{}\" -j {target}",
                        v.target
                    );
                }
            }
        }
        for (e, ep) in v.endpoints.iter().enumerate() {
            let sep = sep_name(i, e);
            let _ = writeln!(s, "-A KUBE-SEP-{sep} -s {ep}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ");
            let _ = writeln!(
                s,
                "-A KUBE-SEP-{sep} -p udp -m comment --comment \"{name}\" -m udp -j DNAT --to-destination {ep}:{}",
                v.target
            );
        }
    }
    s.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT\n");
    s
}

/// kube-proxy's nftables ruleset (`nft -f` input) for `svcs`.
fn nft_rules(svcs: &[SvcSpec], local: bool) -> String {
    let mut s = String::from(
        "table ip kube-proxy {\n\
         \tchain mark-for-masquerade { meta mark set meta mark | 0x4000 }\n\
         \tchain masquerading { meta mark & 0x4000 == 0 return; meta mark set meta mark ^ 0x4000; masquerade fully-random }\n\
         \tchain nat-prerouting { type nat hook prerouting priority dstnat; policy accept; jump services }\n\
         \tchain nat-output { type nat hook output priority -100; policy accept; jump services }\n\
         \tchain nat-postrouting { type nat hook postrouting priority srcnat; policy accept; jump masquerading }\n",
    );
    let mut elements = Vec::with_capacity(svcs.len() * 2);
    for (i, v) in svcs.iter().enumerate() {
        let h = svc_name(i);
        elements.push(format!("{} . udp . {} : goto service-{h}", v.cluster_ip, v.port));
        elements.push(format!("{} . udp . {} : goto external-{h}", v.lb_ip, v.port));
        let n = v.endpoints.len();
        let vmap: Vec<String> = (0..n).map(|e| format!("{e} : goto endpoint-{h}-{e}")).collect();
        let _ = writeln!(
            s,
            "\tchain service-{h} {{ ip daddr {} udp dport {} ip saddr != 198.19.0.0/16 jump mark-for-masquerade; numgen random mod {n} vmap {{ {} }} }}",
            v.cluster_ip,
            v.port,
            vmap.join(", ")
        );
        if local {
            let _ = writeln!(
                s,
                "\tchain external-{h} {{ ip saddr 198.19.0.0/16 goto service-{h}; fib saddr type local jump mark-for-masquerade; fib saddr type local goto service-{h}; numgen random mod {n} vmap {{ {} }} }}",
                vmap.join(", ")
            );
        } else {
            let _ = writeln!(s, "\tchain external-{h} {{ jump mark-for-masquerade; goto service-{h} }}");
        }
        for (e, ep) in v.endpoints.iter().enumerate() {
            let _ = writeln!(
                s,
                "\tchain endpoint-{h}-{e} {{ ip saddr {ep} jump mark-for-masquerade; meta l4proto udp dnat to {ep}:{} }}",
                v.target
            );
        }
    }
    let _ = writeln!(
        s,
        "\tmap service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict; elements = {{ {} }} }}",
        elements.join(", ")
    );
    s.push_str("\tchain services { ip daddr . meta l4proto . th dport vmap @service-ips }\n}\n");
    // nft 1.0 wants a separator before a block's closing brace.
    s.lines()
        .map(|l| {
            if (l.starts_with("\tchain ") || l.starts_with("\tmap ")) && l.ends_with(" }") {
                format!("{}; }}\n", &l[..l.len() - 2])
            } else {
                format!("{l}\n")
            }
        })
        .collect()
}

/// Manifests for xskgate: one file per 500 Services.
fn write_manifests(dir: &Path, svcs: &[SvcSpec], local: bool) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let policy = if local { "Local" } else { "Cluster" };
    for (chunk_i, chunk) in svcs.chunks(500).enumerate() {
        let mut y = String::new();
        for (j, v) in chunk.iter().enumerate() {
            let i = chunk_i * 500 + j;
            let eps: Vec<String> = v
                .endpoints
                .iter()
                .map(|e| format!("  - {{addresses: [{e}], nodeName: gw, conditions: {{ready: true}}}}"))
                .collect();
            let _ = write!(
                y,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\nspec:\n  type: LoadBalancer\n  clusterIP: {}\n  externalTrafficPolicy: {policy}\n  ports: [{{name: p, port: {}, protocol: UDP, targetPort: {}}}]\nstatus: {{loadBalancer: {{ingress: [{{ip: {}}}]}}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{i}-1, namespace: bench, labels: {{kubernetes.io/service-name: svc-{i}}}}}\naddressType: IPv4\nports: [{{name: p, port: {}, protocol: UDP}}]\nendpoints:\n{}\n",
                v.cluster_ip,
                v.port,
                v.target,
                v.lb_ip,
                v.target,
                eps.join("\n")
            );
        }
        std::fs::write(dir.join(format!("svc-{chunk_i:03}.yaml")), y).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A mode's gateway state; undone on drop.
enum Gateway {
    Routing,
    Kernel {
        flush: &'static str,
    },
    /// Stopped when dropped.
    Xskgate {
        _daemon: Daemon,
    },
    Reflector(Arc<AtomicBool>, Option<std::thread::JoinHandle<Result<u64, String>>>),
}

pub fn xskgate_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe.with_file_name("xskgate");
    if !bin.exists() {
        progress("building the xskgate binary (cargo build --release -p xskgate-control)");
        let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "-p", "xskgate-control", "--bin", "xskgate"])
            .status()
            .map_err(|e| e.to_string())?;
        if !st.success() || !bin.exists() {
            return Err(format!("no xskgate binary at {}", bin.display()));
        }
    }
    Ok(bin)
}

impl Gateway {
    fn start(lab: &Lab, mode: &str, svcs: &[SvcSpec]) -> Result<Gateway, String> {
        let local = mode.ends_with("local");
        match mode {
            "routing" => Ok(Gateway::Routing),
            m if m.starts_with("iptables") => {
                let path = lab.dir.join("rules.iptables");
                std::fs::write(&path, iptables_rules(svcs, local)).map_err(|e| e.to_string())?;
                sh(&lab.t, "gw", &format!("iptables-restore < {}", path.display()))?;
                Ok(Gateway::Kernel { flush: "iptables -t nat -F; iptables -t nat -X" })
            }
            m if m.starts_with("nftables") => {
                let path = lab.dir.join("rules.nft");
                std::fs::write(&path, nft_rules(svcs, local)).map_err(|e| e.to_string())?;
                sh(&lab.t, "gw", &format!("nft -f {}", path.display()))?;
                Ok(Gateway::Kernel { flush: "nft delete table ip kube-proxy" })
            }
            m if m.starts_with("xskgate") => {
                let dir = lab.dir.join("manifests");
                write_manifests(&dir, svcs, local)?;
                let log = lab.dir.join("xskgate.log");
                let ifs = format!("{},{}", lab.t.if_name("g0"), lab.t.if_name("g1"));
                let manifests = dir.to_string_lossy();
                let args = [
                    ["--manifests", &manifests, "--node-name", "gw", "--interfaces", &ifs].as_slice(),
                    &["--cluster-cidr", "198.19.0.0/16", "--cpus", "1", "--conntrack-max", "4194304"],
                    &["--snat-ports", "1024-65535"],
                ]
                .concat();
                let daemon =
                    Daemon::start(&xskgate_binary()?, &lab.t.ns_name("gw"), &args, &log, Duration::from_secs(60))
                        .map_err(|e| e.to_string())?;
                Ok(Gateway::Xskgate { _daemon: daemon })
            }
            "reflector" => {
                let stop = Arc::new(AtomicBool::new(false));
                let s = stop.clone();
                let ifname = lab.t.if_name("g0");
                let (ready_tx, ready_rx) = std::sync::mpsc::channel();
                let h = spawn_in_ns(&lab.t.ns_name("gw"), move || -> Result<u64, String> {
                    use xskgate_fastpath::io::steer::{SteerSet, Steering};
                    pin(1);
                    let ifindex = ifindex_here(&ifname);
                    let setup = || -> Result<(Steering, xskgate_fastpath::io::xsk::Port), String> {
                        let mut st = Steering::load().map_err(|e| e.to_string())?;
                        st.attach(&ifname, ifindex, 0).map_err(|e| e.to_string())?;
                        let port =
                            xskgate_fastpath::io::xsk::Port::open(&ifname, ifindex, 0).map_err(|e| e.to_string())?;
                        st.add_socket(0, 0, &port.fd()).map_err(|e| e.to_string())?;
                        let mut set = SteerSet::default();
                        set.frontends.insert((
                            xskgate_conntrack::Addr::from_v4(VIP),
                            xskgate_conntrack::Proto::UDP,
                            LOAD_PORT,
                        ));
                        st.program(&set).map_err(|e| e.to_string())?;
                        Ok((st, port))
                    };
                    let (st, mut port) = match setup() {
                        Ok(x) => {
                            let _ = ready_tx.send(Ok(()));
                            x
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.clone()));
                            return Err(e);
                        }
                    };
                    let mut reflected = 0u64;
                    while !s.load(Ordering::Relaxed) {
                        reflected += port.reflect_with(|buf, len| {
                            let mut tmp = [0u8; 6];
                            tmp.copy_from_slice(&buf[0..6]);
                            buf.copy_within(6..12, 0);
                            buf[6..12].copy_from_slice(&tmp);
                            Some(len)
                        }) as u64;
                    }
                    drop(st);
                    Ok(reflected)
                });
                ready_rx.recv().map_err(|_| "reflector died".to_string())??;
                Ok(Gateway::Reflector(stop, Some(h)))
            }
            other => Err(format!("unknown mode {other}")),
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        match self {
            Gateway::Routing => {}
            Gateway::Kernel { .. } => {}
            Gateway::Xskgate { .. } => {}
            Gateway::Reflector(stop, h) => {
                stop.store(true, Ordering::Relaxed);
                if let Some(h) = h.take() {
                    match h.join() {
                        Ok(Ok(n)) => progress(&format!("reflector: {n} frames reflected")),
                        Ok(Err(e)) => progress(&format!("reflector failed: {e}")),
                        Err(_) => progress("reflector panicked"),
                    }
                }
            }
        }
    }
}

fn stop_gateway(lab: &Lab, g: Gateway) {
    if let Gateway::Kernel { flush } = &g {
        let _ = sh(&lab.t, "gw", flush);
        let _ = sh(&lab.t, "gw", "conntrack -F 2>/dev/null || true");
    }
    drop(g);
}

/// One mode's figures.
#[derive(Clone, Debug, Default)]
struct ModeResult {
    established_mpps: f64,
    offered_mpps: f64,
    new_flow_mpps: f64,
    cpu_ns_per_packet: f64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    p999_us: Option<f64>,
    probes_lost: usize,
}

fn measure_mode(lab: &Lab, plan: &Plan, mode: &str, flow_base: &mut u64) -> Result<ModeResult, String> {
    progress(&format!("{mode}: setting up"));
    let svcs = services(1, 3);
    let g = Gateway::start(lab, mode, &svcs)?;
    let (dst, dport) = if mode == "routing" { (PODS[0], POD_LOAD_PORT) } else { (VIP, LOAD_PORT) };
    let count_at = if mode == "reflector" { ("gen", "e0") } else { ("sink", "s0") };
    let est = Load::established(dst, dport, plan.load);
    warm_up(lab, est)?;
    progress(&format!("{mode}: established flows, as fast as possible for {:?}", plan.load));
    let e = throughput(lab, est, count_at, 0)?;
    progress(&format!("{mode}: {:.3} Mpps established (offered {:.3})", e.mpps, e.offered_mpps));
    // Bounded below every mode's SNAT space (65,535 ports × 3 endpoints):
    // beyond it any masquerading gateway can only drop.
    let new = Load { new_flows: true, max_packets: NEW_FLOWS_MAX, ..est };
    let n = throughput(lab, new, count_at, *flow_base)?;
    *flow_base += (n.offered_mpps * 1e6 * plan.load.as_secs_f64()) as u64 + 1_000_000;
    progress(&format!("{mode}: {:.3} Mpps with every packet a new flow", n.mpps));
    let mut r = ModeResult {
        established_mpps: r3(e.mpps),
        offered_mpps: r3(e.offered_mpps),
        new_flow_mpps: r3(n.mpps),
        cpu_ns_per_packet: r3(e.cpu_ns_per_packet),
        ..ModeResult::default()
    };
    if mode != "reflector" {
        let probe_to = if mode == "routing" {
            format!("{}:{POD_PROBE_PORT}", ip(PODS[0]))
        } else {
            format!("{PROBE_VIP}:{PROBE_PORT}")
        };
        let bg = Load { rate: plan.latency_rate_pps, ..est };
        let (h, lost) = latency(lab, plan, probe_to, bg)?;
        if !h.is_empty() {
            r.p50_us = Some(h.value_at_quantile(0.5) as f64);
            r.p99_us = Some(h.value_at_quantile(0.99) as f64);
            r.p999_us = Some(h.value_at_quantile(0.999) as f64);
        }
        r.probes_lost = lost;
        progress(&format!(
            "{mode}: probe RTT p50 {:?} µs, p99 {:?} µs at {} pps offered ({lost} lost)",
            r.p50_us, r.p99_us, plan.latency_rate_pps
        ));
    }
    stop_gateway(lab, g);
    Ok(r)
}

/// One sample of the running xskgate's `/metrics` (0 when absent).
fn xskgate_metric(lab: &Lab, name: &str) -> f64 {
    Command::new("ip")
        .args(["netns", "exec", &lab.t.ns_name("gw"), "bash", "-c"])
        .arg("exec 3<>/dev/tcp/127.0.0.1/10249; printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// One mode's figures under SNAT port exhaustion.
#[derive(Clone, Copy, Debug, Default)]
struct SnatRow {
    /// 64 established flows at [`SNAT_ESTABLISHED_PPS`], alone.
    before_mpps: f64,
    /// The same flows at the same rate, mixed 1:1 with new flows after
    /// every SNAT port of the measured Service's endpoints was taken.
    after_mpps: f64,
    /// Flows the gateway holds after the fill: xskgate's conntrack entries,
    /// or the kernel's `nf_conntrack_count` (shows that the ports filled).
    flows_after_fill: u64,
    /// xskgate: new flows of the mixed phase refused as `snat_exhausted`.
    refused: Option<u64>,
}

/// The established flows' offered rate in the SNAT exhaustion row: well
/// below every mode's saturation, so that what the flood of new flows costs
/// shows as lost established packets.
const SNAT_ESTABLISHED_PPS: u64 = 100_000;
/// The established flows' Service in that row: one pod, on its own pod port
/// (so the sink counts its packets apart, and its SNAT space is its own).
const SNAT_EST_VIP: [u8; 4] = [198, 18, 100, 30];
const SNAT_EST_POD_PORT: u16 = 10;

/// SNAT port exhaustion, side by side (nftables masquerade and xskgate,
/// both over ports 1024–65535): 64 established flows to a Service of their
/// own, counted at the sink by their pod port, alone; then mixed 1:1 with
/// new flows to the measured Service after its 3 pods' SNAT space was
/// filled (400,000 new flows first, twice 3 × 64,512 ports), so that the
/// new flows are refused (or, where the gateway evicts unreplied flows to
/// make room, as Linux's full conntrack table does, NATed at a cost).
/// `after / before` is what the flood costs the established flows.
fn snat_exhaustion(lab: &Lab, plan: &Plan, mode: &str, flow_base: &mut u64) -> Result<SnatRow, String> {
    progress(&format!("snat exhaustion: {mode}"));
    let mut svcs = services(1, 3);
    svcs.push(SvcSpec {
        cluster_ip: "198.19.255.30".into(),
        lb_ip: ip(SNAT_EST_VIP),
        port: LOAD_PORT,
        target: SNAT_EST_POD_PORT,
        endpoints: vec![ip(PODS[0])],
    });
    let g = Gateway::start(lab, mode, &svcs)?;
    sh(&lab.t, "sink", &format!("nft add rule ip sink pre udp dport {SNAT_EST_POD_PORT} counter drop"))?;
    let counted = || -> Result<u64, String> {
        let out = sh(&lab.t, "sink", "nft list chain ip sink pre")?;
        let line = out.lines().find(|l| l.contains(&format!("dport {SNAT_EST_POD_PORT}"))).unwrap_or("");
        let n = line.split_whitespace().skip_while(|w| *w != "packets").nth(1);
        n.and_then(|n| n.parse().ok()).ok_or_else(|| format!("no counter in the sink's chain:\n{out}"))
    };
    let est = Load { rate: SNAT_ESTABLISHED_PPS, ..Load::established(SNAT_EST_VIP, LOAD_PORT, plan.load) };
    warm_up(lab, est)?;
    let rate = |run: &dyn Fn() -> Result<u64, String>| -> Result<f64, String> {
        let (c0, start) = (counted()?, Instant::now());
        run()?;
        let elapsed = start.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(200));
        Ok(r3((counted()? - c0) as f64 / elapsed / 1e6))
    };
    let before_mpps = rate(&|| generate(lab, est, 0))?;
    // At 200,000 new flows a second: a gateway that is slow to refuse must
    // not lose the fill itself at its rings.
    let fill = Load {
        dst: VIP,
        new_flows: true,
        rate: 200_000,
        max_packets: 400_000,
        duration: Duration::from_secs(30),
        ..est
    };
    let filled = generate(lab, fill, *flow_base)?;
    *flow_base += filled + 1_000_000;
    std::thread::sleep(Duration::from_millis(500));
    let xskgate = mode.starts_with("xskgate");
    let flows_after_fill = if xskgate {
        xskgate_metric(lab, "xskgate_conntrack_entries") as u64
    } else {
        sh(&lab.t, "gw", "cat /proc/sys/net/netfilter/nf_conntrack_count")?.trim().parse().unwrap_or(0)
    };
    let exhausted = "xskgate_drops_total{reason=\"snat_exhausted\"}";
    let refused_before = xskgate_metric(lab, exhausted);
    let mixed = Load { dst: VIP, new_flows: true, mixed: Some(SNAT_EST_VIP), rate: 2 * SNAT_ESTABLISHED_PPS, ..est };
    let first = *flow_base;
    let after_mpps = rate(&|| generate(lab, mixed, first))?;
    *flow_base += (mixed.rate as f64 * plan.load.as_secs_f64()) as u64 + 1_000_000;
    let refused = xskgate.then(|| (xskgate_metric(lab, exhausted) - refused_before) as u64);
    let row = SnatRow { before_mpps, after_mpps, flows_after_fill, refused };
    progress(&format!(
        "snat exhaustion: {mode}: {before_mpps} Mpps established alone, {after_mpps} Mpps of them with the ports full \
         and new flows arriving ({filled} sent to fill them, {flows_after_fill} flows held, {refused:?} refused)"
    ));
    stop_gateway(lab, g);
    let _ = sh(
        &lab.t,
        "sink",
        &format!(
            "nft -a list chain ip sink pre | grep 'dport {SNAT_EST_POD_PORT}' | sed 's/.*handle //' | xargs -r -I{{}} nft delete rule ip sink pre handle {{}}"
        ),
    );
    Ok(row)
}

/// Per-packet cost (ns, from established Mpps) with `n` Services.
fn scaling(lab: &Lab, plan: &Plan, mode: &str, n: usize) -> Result<f64, String> {
    progress(&format!("scaling: {mode} with {n} Services"));
    let svcs = services(n, 3);
    let g = Gateway::start(lab, mode, &svcs)?;
    let l = Load::established(VIP, LOAD_PORT, plan.load);
    warm_up(lab, l)?;
    let t = throughput(lab, l, ("sink", "s0"), 0)?;
    stop_gateway(lab, g);
    Ok(if t.mpps > 0.0 { 1e3 / t.mpps } else { f64::INFINITY })
}

/// Programming time of `n` Services × 10 endpoints: xskgate's measured
/// change-to-data-path time for one endpoint change, against a full
/// `iptables-restore` and `nft -f` of the same Services.
fn programming(lab: &Lab, n: usize) -> Result<BTreeMap<&'static str, f64>, String> {
    let svcs = services(n, 10);
    let mut out = BTreeMap::new();
    // (metric, file, rules, load command before the file's path, undo)
    let kernel = [
        (
            "iptables_restore_ms",
            "big.iptables",
            iptables_rules(&svcs, false),
            "iptables-restore <",
            "iptables -t nat -F; iptables -t nat -X",
        ),
        ("nft_f_ms", "big.nft", nft_rules(&svcs, false), "nft -f", "nft delete table ip kube-proxy"),
    ];
    for (metric, file, rules, load, undo) in kernel {
        progress(&format!("programming: {} of {n} Services × 10 endpoints", load.trim_end_matches(" <")));
        let path = lab.dir.join(file);
        std::fs::write(&path, rules).map_err(|e| e.to_string())?;
        let t = Instant::now();
        sh(&lab.t, "gw", &format!("{load} {}", path.display()))?;
        out.insert(metric, r3(t.elapsed().as_secs_f64() * 1e3));
        let _ = sh(&lab.t, "gw", undo);
    }
    progress(&format!("programming: xskgate with {n} Services, five endpoint changes"));
    let g = Gateway::start(lab, "xskgate_cluster", &svcs)?;
    let metric = |name: &str| xskgate_metric(lab, name);
    // Five changes, one at a time: the first endpoint of the first Service
    // is replaced and put back. Each change's time is the growth of the
    // network-programming histogram's sum. The metrics endpoint is read
    // sparsely (rendering 10,000 Services' counters costs the control
    // plane's core real time, and a tight poll would slow what it measures).
    let sum = "kubeproxy_network_programming_duration_seconds_sum";
    let count = "kubeproxy_network_programming_duration_seconds_count";
    let file = lab.dir.join("manifests").join("svc-000.yaml");
    let original = std::fs::read_to_string(&file).map_err(|e| e.to_string())?;
    let changed = original.replacen(&svcs[0].endpoints[0], "198.19.63.250", 1);
    let mut changes_ms = Vec::new();
    for i in 0..5 {
        let (sum0, count0) = (metric(sum), metric(count));
        std::fs::write(&file, if i % 2 == 0 { &changed } else { &original }).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            std::thread::sleep(Duration::from_millis(500));
            if metric(count) > count0 || Instant::now() > deadline {
                break;
            }
        }
        let dcount = metric(count) - count0;
        if dcount < 1.0 {
            stop_gateway(lab, g);
            return Err("xskgate did not publish the endpoint change".into());
        }
        changes_ms.push((metric(sum) - sum0) / dcount * 1e3);
    }
    stop_gateway(lab, g);
    progress(&format!("programming: xskgate changes took {changes_ms:.3?} ms"));
    out.insert("xskgate_one_change_ms", r3(median(changes_ms)));
    Ok(out)
}

/// One generator's figures in the cross-check.
#[derive(Clone, Copy, Debug, Default)]
struct GeneratorRun {
    /// Frames the generator's interface sent, per second.
    offered_mpps: f64,
    /// Frames the sink received through the routing gateway, per second.
    delivered_mpps: f64,
}

/// Our AF_XDP generator against netsniff-ng's `trafgen` (PF_PACKET with a
/// TX ring, an independent implementation), in `routing` mode: the same
/// 64-byte UDP frames to a pod over 64 flows, from the same core, for the
/// same time, counted by the same kernel counters.
fn generator_crosscheck(lab: &Lab, plan: &Plan) -> Result<BTreeMap<&'static str, GeneratorRun>, String> {
    progress("generator cross-check: our AF_XDP generator, then trafgen, through plain routing");
    let g = Gateway::start(lab, "routing", &services(1, 3))?;
    let (gen_if, sink_if) = (lab.t.if_name("e0"), lab.t.if_name("s0"));
    let counters = || (if_counter(&lab.t, "gen", &gen_if, "tx_packets"), rx_packets(&lab.t, "sink", &sink_if));
    let mut out = BTreeMap::new();
    let load = Load::established(PODS[0], POD_LOAD_PORT, plan.load);
    let mut measure = |name: &'static str, run: &dyn Fn() -> Result<(), String>| -> Result<(), String> {
        let (tx0, rx0) = counters();
        let start = Instant::now();
        run()?;
        let elapsed = start.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(200));
        let (tx1, rx1) = counters();
        let r = GeneratorRun {
            offered_mpps: r3(tx1.saturating_sub(tx0) as f64 / elapsed / 1e6),
            delivered_mpps: r3(rx1.saturating_sub(rx0) as f64 / elapsed / 1e6),
        };
        progress(&format!(
            "generator cross-check: {name}: offered {} Mpps, delivered {} Mpps",
            r.offered_mpps, r.delivered_mpps
        ));
        out.insert(name, r);
        Ok(())
    };
    let ours = measure("xskgate_pktgen", &|| generate(lab, load, 0).map(|_| ()));
    // trafgen: the same frame (60 bytes before the FCS), source ports
    // counting through 64 values; bounded by --num and by timeout.
    let conf = lab.dir.join("trafgen.cfg");
    let [a, b, c, d] = PODS[0];
    let mac = |m: [u8; 6]| m.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(":");
    let text = format!(
        "{{\n  eth(da={}, sa={}, type=0x0800),\n  ipv4(sa={}, da={a}.{b}.{c}.{d}, ttl=64),\n  \
         udp(sp=dinc(10000, 10063), dp={POD_LOAD_PORT}),\n  fill(0x00, 18)\n}}\n",
        mac(lab.gw_mac),
        mac(lab.gen_mac),
        ip(GEN),
    );
    let theirs = std::fs::write(&conf, text).map_err(|e| e.to_string()).and_then(|()| {
        measure("trafgen", &|| {
            let secs = plan.load.as_secs_f64();
            sh(
                &lab.t,
                "gen",
                &format!(
                    "timeout -s INT {secs} taskset -c 0 trafgen --dev {gen_if} --conf {} --cpus 1 --num 50000000 \
                     --no-cpu-stats >/dev/null 2>&1; true",
                    conf.display()
                ),
            )
            .map(|_| ())
        })
    });
    stop_gateway(lab, g);
    ours.and(theirs)?;
    if out.get("trafgen").is_none_or(|r| r.offered_mpps == 0.0) {
        return Err("trafgen sent nothing (is netsniff-ng installed? scripts/install-deps)".into());
    }
    Ok(out)
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { r3(a / b) } else { 0.0 }
}

pub fn run(args: &Args) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("e2e needs root: it creates network namespaces and veths and attaches XDP".into());
    }
    for tool in ["iptables-restore", "nft", "ip", "trafgen"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            return Err(format!("{tool} is missing: scripts/install-deps (iptables nftables iproute2 netsniff-ng)"));
        }
    }
    let plan = Plan::new(args.quick);
    let started = Instant::now();
    let lab = Lab::build()?;
    progress(&format!("topology {} ready", lab.t.prefix()));
    let modes = [
        "routing",
        "iptables_cluster",
        "iptables_local",
        "nftables_cluster",
        "nftables_local",
        "xskgate_cluster",
        "xskgate_local",
        "reflector",
    ];
    // E2E_MODES=routing,reflector runs a subset (and skips scaling, SNAT
    // exhaustion, the generator cross-check and programming unless
    // E2E_MODES names "scaling", "snat", "crosscheck" or "programming").
    let only: Option<Vec<String>> =
        std::env::var("E2E_MODES").ok().map(|v| v.split(',').map(|m| m.trim().to_string()).collect());
    let wanted = |m: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == m));
    let mut results: BTreeMap<&str, ModeResult> = BTreeMap::new();
    let mut flow_base = 0u64;
    for m in modes.into_iter().filter(|m| wanted(m)) {
        results.insert(m, measure_mode(&lab, &plan, m, &mut flow_base)?);
    }
    let mut scale: BTreeMap<&str, Vec<(usize, f64)>> = BTreeMap::new();
    for m in ["xskgate_cluster", "iptables_cluster", "nftables_cluster"].into_iter().filter(|_| wanted("scaling")) {
        for &n in &plan.scales {
            let ns = scaling(&lab, &plan, m, n)?;
            scale.entry(m).or_default().push((n, r3(ns)));
        }
    }
    let mut snat: BTreeMap<&str, SnatRow> = BTreeMap::new();
    for m in ["nftables_cluster", "xskgate_cluster"].into_iter().filter(|_| wanted("snat")) {
        snat.insert(m, snat_exhaustion(&lab, &plan, m, &mut flow_base)?);
    }
    let crosscheck = if wanted("crosscheck") { generator_crosscheck(&lab, &plan)? } else { BTreeMap::new() };
    let prog = if wanted("programming") { programming(&lab, plan.program_services)? } else { BTreeMap::new() };
    let none = ModeResult::default();

    let get = |m: &str| results.get(m).unwrap_or(&none);
    let x = get("xskgate_cluster");
    let nft = get("nftables_cluster");
    let refl = get("reflector");
    let route = get("routing");
    let scale_ratio = |m: &str| {
        let Some(v) = scale.get(m) else { return 0.0 };
        ratio(v.last().map_or(0.0, |x| x.1), v.first().map_or(0.0, |x| x.1))
    };
    let ratios = json!({
        "xskgate_vs_nftables": ratio(x.established_mpps, nft.established_mpps),
        "xskgate_vs_iptables": ratio(x.established_mpps, get("iptables_cluster").established_mpps),
        "xskgate_vs_reflector": ratio(x.established_mpps, refl.established_mpps),
        "xskgate_vs_routing": ratio(x.established_mpps, route.established_mpps),
        "xskgate_new_flows_vs_nftables": ratio(x.new_flow_mpps, nft.new_flow_mpps),
        "cost_10k_vs_1": { "xskgate": scale_ratio("xskgate_cluster"), "iptables": scale_ratio("iptables_cluster"), "nftables": scale_ratio("nftables_cluster") },
        "snat_exhaustion_after_vs_before": snat.iter().map(|(m, r)| ((*m).to_string(), json!(ratio(r.after_mpps, r.before_mpps)))).collect::<serde_json::Map<_, _>>(),
    });
    if args.json {
        let mut modes_json = serde_json::Map::new();
        for (m, r) in &results {
            modes_json.insert(
                (*m).to_string(),
                json!({
                    "established_mpps": r.established_mpps,
                    "offered_mpps": r.offered_mpps,
                    "new_flow_mpps": r.new_flow_mpps,
                    "p50_us": r.p50_us, "p99_us": r.p99_us, "p999_us": r.p999_us,
                    "probes_lost": r.probes_lost,
                    "cpu_ns_per_packet": r.cpu_ns_per_packet,
                }),
            );
        }
        let out = json!({
            "quick": args.quick,
            "modes": modes_json,
            "xskgate_vs_nftables": ratios["xskgate_vs_nftables"],
            "xskgate_vs_reflector": ratios["xskgate_vs_reflector"],
            "ratios": ratios,
            "scaling_ns_per_packet": scale.iter().map(|(m, v)| ((*m).to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "programming": prog,
            "snat_exhaustion": snat
                .iter()
                .map(|(m, r)| ((*m).to_string(), json!({ "before_mpps": r.before_mpps, "after_mpps": r.after_mpps, "after_vs_before": ratio(r.after_mpps, r.before_mpps), "flows_after_fill": r.flows_after_fill, "refused": r.refused })))
                .collect::<serde_json::Map<_, _>>(),
            "generator_crosscheck": crosscheck
                .iter()
                .map(|(g, r)| ((*g).to_string(), json!({ "offered_mpps": r.offered_mpps, "delivered_mpps": r.delivered_mpps })))
                .collect::<serde_json::Map<_, _>>(),
            "seconds": r3(started.elapsed().as_secs_f64()),
        });
        println!("{}", serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?);
    } else {
        println!("{}", markdown(&results, &ratios, &scale, &prog, &plan));
        if !snat.is_empty() {
            println!(
                "\n| SNAT exhaustion ({} kpps established) | established alone, Mpps | with every port taken and new flows refused, Mpps | after / before |\n|---|---|---|---|",
                SNAT_ESTABLISHED_PPS / 1000
            );
            for (m, r) in &snat {
                println!("| {m} | {} | {} | {} |", r.before_mpps, r.after_mpps, ratio(r.after_mpps, r.before_mpps));
            }
        }
        if !crosscheck.is_empty() {
            println!("\n| generator (routing mode) | offered Mpps | delivered Mpps |\n|---|---|---|");
            for (name, r) in &crosscheck {
                println!("| {name} | {} | {} |", r.offered_mpps, r.delivered_mpps);
            }
        }
    }
    let chart = std::env::current_dir().map_err(|e| e.to_string())?.join("target").join("e2e.svg");
    match crate::chart::bars(
        &chart,
        &results.iter().map(|(m, r)| (m.to_string(), r.established_mpps, r.new_flow_mpps)).collect::<Vec<_>>(),
    ) {
        Ok(()) => progress(&format!("chart: {}", chart.display())),
        Err(e) => progress(&format!("no chart: {e}")),
    }
    progress(&format!("done in {:.0} s", started.elapsed().as_secs_f64()));
    Ok(())
}

fn markdown(
    results: &BTreeMap<&str, ModeResult>,
    ratios: &serde_json::Value,
    scale: &BTreeMap<&str, Vec<(usize, f64)>>,
    prog: &BTreeMap<&'static str, f64>,
    plan: &Plan,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## Ratios (same run)\n");
    let _ = writeln!(s, "| ratio | value |\n|---|---|");
    for k in [
        "xskgate_vs_nftables",
        "xskgate_vs_iptables",
        "xskgate_vs_reflector",
        "xskgate_vs_routing",
        "xskgate_new_flows_vs_nftables",
    ] {
        let _ = writeln!(s, "| {k} (established unless named) | {} |", ratios[k]);
    }
    for m in ["xskgate", "iptables", "nftables"] {
        let _ = writeln!(s, "| per-packet cost, 10,000 vs 1 Service: {m} | {} |", ratios["cost_10k_vs_1"][m]);
    }
    let _ =
        writeln!(s, "\n## Per mode ({:?} per load run; latency at {} pps offered)\n", plan.load, plan.latency_rate_pps);
    let _ = writeln!(
        s,
        "| mode | established Mpps | offered Mpps | new-flow Mpps | p50 µs | p99 µs | p99.9 µs | CPU ns/pkt (machine) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.0}"));
    for (m, r) in results {
        let _ = writeln!(
            s,
            "| {m} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {:.0} |",
            r.established_mpps,
            r.offered_mpps,
            r.new_flow_mpps,
            f(r.p50_us),
            f(r.p99_us),
            f(r.p999_us),
            r.cpu_ns_per_packet
        );
    }
    let _ = writeln!(s, "\n## Per-packet cost by number of Services (ns per packet, established)\n");
    let _ = writeln!(
        s,
        "| mode | {} |",
        plan.scales.iter().map(|n| format!("{n} Services")).collect::<Vec<_>>().join(" | ")
    );
    let _ = writeln!(s, "|---|{}", "---|".repeat(plan.scales.len()));
    for (m, v) in scale {
        let _ = writeln!(s, "| {m} | {} |", v.iter().map(|(_, ns)| format!("{ns:.0}")).collect::<Vec<_>>().join(" | "));
    }
    let _ = writeln!(s, "\n## Programming {} Services × 10 endpoints\n", plan.program_services);
    for (k, v) in prog {
        let _ = writeln!(s, "- {k}: {v}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kube-proxy-shaped rule sets are accepted by the real tools
    /// (`iptables-restore --test`, `nft -c -f`) in a namespace of the test's
    /// own. Needs root; fails loudly without it.
    #[test]
    fn rules_are_valid_for_iptables_restore_and_nft() {
        let mut t = Topology::new();
        t.add_ns("gw");
        let dir = std::env::temp_dir().join(format!("{}-rules", t.prefix()));
        std::fs::create_dir_all(&dir).unwrap();
        for local in [false, true] {
            let svcs = services(50, 3);
            let ipt = dir.join("r.iptables");
            std::fs::write(&ipt, iptables_rules(&svcs, local)).unwrap();
            sh(&t, "gw", &format!("iptables-restore --test < {}", ipt.display()))
                .unwrap_or_else(|e| panic!("iptables (local={local}): {e}"));
            let nft = dir.join("r.nft");
            std::fs::write(&nft, nft_rules(&svcs, local)).unwrap();
            sh(&t, "gw", &format!("nft -c -f {}", nft.display()))
                .unwrap_or_else(|e| panic!("nft (local={local}): {e}"));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rule_sets_have_kube_proxy_shape() {
        let svcs = services(3, 3);
        let ipt = iptables_rules(&svcs, false);
        // One `statistic random` rule per endpoint but the last, per Service.
        let want: usize = svcs.iter().map(|v| v.endpoints.len() - 1).sum();
        assert_eq!(ipt.matches("-m statistic --mode random").count(), want, "{ipt}");
        assert!(ipt.contains("-j MASQUERADE --random-fully"));
        assert!(ipt.contains(&format!("-d {}/32 -p udp", ip(VIP))));
        let local = iptables_rules(&svcs, true);
        assert!(local.contains("-j KUBE-SVL-"), "Local goes to the local endpoints chain");
        let nft = nft_rules(&svcs, false);
        assert!(nft.contains("map service-ips") && nft.contains("numgen random mod 3") && nft.contains("masquerade"));
    }
}
