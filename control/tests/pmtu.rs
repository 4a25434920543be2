//! Path MTU through the gateway, with real tools, in both families.
//!
//! ```text
//!  client ── gw [xskgate run] ── r1 ══ MTU 1400 ══ r2 ── pod
//!  198.18.1.100   198.18.1.1      198.18.2.2        198.18.3.2   198.19.1.10
//!                 198.18.2.1      198.18.3.1        198.19.1.1
//! ```
//!
//! Every link is dual-stack (`2001:db8:X:Y::Z` beside `198.X.Y.Z`), and
//! in the first test every link but r1–r2 has a 1500-byte MTU, so the client and the pod
//! agree on a 1460-byte MSS that the r1–r2 link cannot carry: the path's
//! MTU is found only if r1's fragmentation-needed (IPv4) / Packet Too Big
//! (IPv6), sent to the client (Local) or to the gateway's masquerade address
//! (Cluster) about the translated packet, reaches the client translated
//! back (outer destination, embedded packet, every checksum). Through a Local
//! and a Cluster Service, in each family:
//! - a 10 MB upload over TCP (a real socket, the kernel's PMTU discovery)
//!   arrives whole: the pod answers with the length and a checksum of what
//!   it read, and the client compares them with what it sent;
//! - the client's kernel has recorded the lower path MTU for the VIP
//!   (`ip route get` shows `mtu 1400`), and a real `ping -M do -s 1472` of
//!   the VIP now fails in the client with `mtu=1400` (`mtu: 1400` for
//!   IPv6; the VIP's echo itself
//!   is answered by the gateway and never crosses the narrow link: before
//!   the transfer the same ping is answered);
//! - a real `tracepath` to the VIP shows the gateway, r1 and r2 as hops
//!   (the gateway's own time exceeded, the routers' translated back),
//!   `pmtu 1400` (found by its own UDP probes), and reaches the VIP (the
//!   pod's port unreachable translated back, from the VIP), with no hop
//!   unanswered;
//! - a capture on the client's link, read by real `tshark`, shows the
//!   translated ICMP errors with good checksums (outer IP, ICMP, embedded IP).
//!
//! The second test narrows the gateway's own link to r1 instead: the
//! gateway itself must answer what it cannot send with
//! fragmentation-needed / Packet Too Big (as the kernel's forwarding
//! does), and the same checks hold.
//!
//! Needs root (namespaces, veths, AF_XDP); fails loudly without it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};
use xskgate_tests::reference::{Family, dual_stack_link, dual_stack_route, v6_of};
use xskgate_tests::{Daemon, TempDir, Topology, in_ns, spawn_in_ns};

const XSKGATE: &str = env!("CARGO_BIN_EXE_xskgate");
const LB_LOCAL: &str = "198.18.100.10";
const LB_CLUSTER: &str = "198.18.100.11";
const POD: &str = "198.19.1.10";
/// tracepath's probes go to consecutive UDP ports from this one; the
/// Services have each of them, and the pod listens on none (so the last
/// hop answers with port unreachable, as tracepath expects).
const TRACE_PORT: u16 = 40000;
const TRACE_PORTS: u16 = 24;
const UPLOAD: usize = 10 * 1024 * 1024;

fn manifests() -> String {
    let mut out = String::from(
        "apiVersion: v1\nkind: Node\nmetadata: {name: gw1}\nstatus: {addresses: [{type: InternalIP, address: 198.18.1.1}, \
         {type: InternalIP, address: \"2001:db8:18:1::1\"}]}\n",
    );
    let trace_ports: String = (0..TRACE_PORTS)
        .map(|i| {
            let p = TRACE_PORT + i;
            format!("\n  - {{name: t{i}, port: {p}, protocol: UDP, targetPort: {p}}}")
        })
        .collect();
    let slice_ports: String =
        (0..TRACE_PORTS).map(|i| format!(", {{name: t{i}, port: {}, protocol: UDP}}", TRACE_PORT + i)).collect();
    for (name, policy, lb, cip) in
        [("web-local", "Local", LB_LOCAL, "198.19.128.10"), ("web-cluster", "Cluster", LB_CLUSTER, "198.19.128.11")]
    {
        let (lb6, cip6) = (v6_of(lb), v6_of(cip));
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  type: LoadBalancer\n  \
             clusterIP: {cip}\n  clusterIPs: [{cip}, \"{cip6}\"]\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  \
             externalTrafficPolicy: {policy}\n  ports:\n  - {{name: http, port: 80, protocol: TCP, targetPort: 8080}}{trace_ports}\n\
             status: {{loadBalancer: {{ingress: [{{ip: {lb}}}, {{ip: \"{lb6}\"}}]}}}}\n"
        ));
        for family in Family::BOTH {
            let (suffix, kind) = if family == Family::Ipv4 { ("v4", "IPv4") } else { ("v6", "IPv6") };
            out.push_str(&format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-{suffix}, namespace: default, \
                 labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: {kind}\n\
                 ports: [{{name: http, port: 8080, protocol: TCP}}{slice_ports}]\n\
                 endpoints:\n- {{addresses: [\"{}\"], nodeName: gw1, conditions: {{ready: true}}}}\n",
                family.of(POD)
            ));
        }
    }
    out
}

/// The topology above, with `xskgate run` on the gateway.
struct Path4 {
    // Dropped in this order: the gateway stops, then the namespaces go.
    gw: Daemon,
    t: Topology,
    dir: TempDir,
}

/// The topology with the links `narrow` ((namespace, interface) ends) at a
/// 1400-byte MTU.
fn start(narrow: &[(&str, &str)]) -> Path4 {
    let mut t = Topology::new();
    for ns in ["client", "gw", "r1", "r2", "pod"] {
        t.add_ns(ns);
    }
    let links = [
        ("client", "c0", "198.18.1.100/24", "gw", "g0", "198.18.1.1/24"),
        ("gw", "g1", "198.18.2.1/24", "r1", "r1a", "198.18.2.2/24"),
        ("r1", "r1b", "198.18.3.1/24", "r2", "r2a", "198.18.3.2/24"),
        ("r2", "r2b", "198.19.1.1/24", "pod", "p0", "198.19.1.10/24"),
    ];
    for link in links {
        dual_stack_link(&mut t, link);
    }
    for &(ns, i) in narrow {
        t.exec(ns, &["ip", "link", "set", "dev", &t.if_name(i), "mtu", "1400"]);
    }
    for ns in ["gw", "r1", "r2"] {
        t.forwarding(ns);
    }
    for ns in ["r1", "r2", "pod"] {
        // Every probe of tracepath gets its answer (the kernel's default
        // is one ICMP error a second per destination).
        t.exec(ns, &["sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"]);
        t.exec(ns, &["sysctl", "-qw", "net.ipv6.icmp.ratelimit=0"]);
    }
    let routes = [
        ("client", "198.18.100.0/24", "198.18.1.1"),
        ("gw", "198.19.0.0/16", "198.18.2.2"),
        ("gw", "198.18.3.0/24", "198.18.2.2"),
        ("r1", "198.19.0.0/16", "198.18.3.2"),
        ("r1", "198.18.1.0/24", "198.18.2.1"),
        ("r2", "0.0.0.0/0", "198.18.3.1"),
        ("pod", "0.0.0.0/0", "198.19.1.1"),
    ];
    for (ns, dst, via) in routes {
        dual_stack_route(&t, ns, dst, via);
    }
    let dir = TempDir::new(&format!("{}-pmtu", t.prefix()));
    std::fs::write(dir.0.join("services.yaml"), manifests()).expect("manifest");
    let interfaces = format!("{},{}", t.if_name("g0"), t.if_name("g1"));
    let args = [
        "--manifests",
        dir.0.to_str().expect("UTF-8 path"),
        "--node-name",
        "gw1",
        "--interfaces",
        &interfaces,
        "--cluster-cidr",
        "198.19.0.0/16,2001:db8:19::/48",
    ];
    let gw = Daemon::start(Path::new(XSKGATE), &t.ns_name("gw"), &args, &dir.0.join("gw.log"), Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    upload_server(&t);
    Path4 { gw, t, dir }
}

/// 64-bit FNV-1a: enough to tell a corrupted or reordered stream.
fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The pod's server on 8080 (both families): reads a connection to its end
/// and answers `<bytes> <fnv1a hex>\n`.
fn upload_server(t: &Topology) {
    let listener = in_ns(&t.ns_name("pod"), || TcpListener::bind(("::", 8080)).expect("bind [::]:8080"));
    listener.set_nonblocking(true).expect("non-blocking");
    let deadline = Instant::now() + Duration::from_secs(600);
    std::thread::spawn(move || {
        while Instant::now() < deadline {
            let Ok((mut conn, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            std::thread::spawn(move || {
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
                let (mut n, mut h, mut buf) = (0usize, FNV_OFFSET, vec![0u8; 65536]);
                while let Ok(k) = conn.read(&mut buf) {
                    if k == 0 {
                        let _ = writeln!(conn, "{n} {h:016x}");
                        return;
                    }
                    n += k;
                    h = fnv1a(h, &buf[..k]);
                }
            });
        }
    });
}

/// Uploads [`UPLOAD`] pseudo-random bytes to `to` from the client: Ok when
/// the pod read them all, unchanged.
fn upload(t: &Topology, to: SocketAddr) -> Result<(), String> {
    spawn_in_ns(&t.ns_name("client"), move || {
        let mut data = vec![0u8; UPLOAD];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for chunk in data.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        let want = format!("{UPLOAD} {:016x}", fnv1a(FNV_OFFSET, &data));
        let mut s =
            TcpStream::connect_timeout(&to, Duration::from_secs(5)).map_err(|e| format!("connect {to}: {e}"))?;
        s.set_write_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
        s.write_all(&data).map_err(|e| format!("upload to {to} stalled: {e} (a PMTU black hole?)"))?;
        s.shutdown(std::net::Shutdown::Write).map_err(|e| e.to_string())?;
        let mut got = String::new();
        s.read_to_string(&mut got).map_err(|e| format!("answer from {to}: {e}"))?;
        if got.trim() == want { Ok(()) } else { Err(format!("pod read {:?}, client sent {want}", got.trim())) }
    })
    .join()
    .expect("upload thread")
}

/// A command in namespace `ns` whose failure is an answer, not an error.
fn try_exec(t: &Topology, ns: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new("ip")
        .args(["netns", "exec", &t.ns_name(ns)])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"))
}

fn out(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// tcpdump, stopped when dropped (also when the test fails).
struct Capture(std::process::Child);

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `ping -M do -s SIZE` of `vip` (the largest size a 1500-byte MTU takes).
fn ping_df(p: &Path4, family: Family, vip: &str) -> std::process::Output {
    let size = if family == Family::Ipv4 { "1472" } else { "1452" };
    let fam = if family == Family::Ipv4 { "-4" } else { "-6" };
    try_exec(&p.t, "client", &["ping", fam, "-n", "-M", "do", "-s", size, "-c", "2", "-i", "0.2", "-W", "1", vip])
}

#[test]
fn path_mtu_is_discovered_through_local_and_cluster_services_in_both_families() {
    let p = start(&[("r1", "r1b"), ("r2", "r2a")]);
    check_path(&p);
}

/// The narrow link is the gateway's own: it answers the frames it cannot
/// send itself, and the path MTU is found all the same.
#[test]
fn the_gateway_answers_what_its_own_link_cannot_carry() {
    let p = start(&[("gw", "g1"), ("r1", "r1a")]);
    check_path(&p);
    let (_, metrics) = xskgate_tests::reference::http_get(&p.t.ns_name("gw"), "http://127.0.0.1:10249/metrics".into())
        .expect("metrics");
    let sent: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("xskgate_io_too_big_sent_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no too_big_sent in {metrics}"));
    assert!(sent >= 4, "the gateway sent its own too-big errors: {sent}");
}

/// Every check of the module doc, through both Services in both families.
fn check_path(p: &Path4) {
    // In the test's directory: removed with it, also when the test fails.
    let capture = p.dir.0.join("client.pcap");
    let pcap = capture.to_string_lossy().into_owned();
    let mut dump = std::process::Command::new("ip")
        .args(["netns", "exec", &p.t.ns_name("client"), "tcpdump", "-U", "-n", "-s", "2048", "-i"])
        .arg(p.t.if_name("c0"))
        .args(["-w", &pcap, "icmp or icmp6"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(Capture)
        .expect("tcpdump (scripts/install-deps installs it) starts");
    std::thread::sleep(Duration::from_millis(500));
    let mut report = Vec::new();
    for family in Family::BOTH {
        for (policy, lb) in [("Local", LB_LOCAL), ("Cluster", LB_CLUSTER)] {
            let vip = family.of(lb);
            let fam = if family == Family::Ipv4 { "-4" } else { "-6" };
            let before = ping_df(p, family, &vip);
            assert!(before.status.success(), "{policy} {family:?}: the VIP answers a full-size ping: {}", out(&before));
            // UDP probes find the path MTU (r1's error, translated back).
            let trace =
                try_exec(&p.t, "client", &["tracepath", fam, "-n", "-m", "8", "-p", &TRACE_PORT.to_string(), &vip]);
            let trace = out(&trace);
            let hops = [family.of("198.18.1.1"), family.of("198.18.2.2"), family.of("198.18.3.2")];
            for hop in &hops {
                assert!(trace.contains(&format!(" {hop} ")), "{policy} {family:?}: hop {hop} missing:\n{trace}");
            }
            assert!(trace.contains("pmtu 1400") && trace.contains("reached"), "{policy} {family:?}:\n{trace}");
            assert!(!trace.contains("no reply"), "{policy} {family:?}: a silent hop:\n{trace}");
            let reached = trace.lines().find(|l| l.ends_with("reached")).unwrap_or_default();
            assert!(reached.contains(&format!(" {vip} ")), "{policy} {family:?}: the VIP answers last:\n{trace}");
            // TCP finds it again, by itself.
            p.t.exec("client", &["ip", fam, "route", "flush", "cache"]);
            let to: SocketAddr = family.host_port(lb, 80).parse().expect("address");
            upload(&p.t, to).unwrap_or_else(|e| panic!("{policy} {family:?}: {e}\n{}", p.gw.log_text()));
            let route = out(&p.t.exec("client", &["ip", fam, "route", "get", &vip]));
            assert!(route.contains("mtu 1400"), "{policy} {family:?}: the client's kernel recorded the PMTU: {route}");
            let after = ping_df(p, family, &vip);
            let said = out(&after);
            assert!(
                !after.status.success() && (said.contains("mtu=1400") || said.contains("mtu: 1400")),
                "{policy} {family:?}: {said}"
            );
            report.push(format!("{policy} {family:?}: {}", route.trim()));
            report.push(trace);
            // The next Service starts from a fresh path MTU.
            p.t.exec("client", &["ip", fam, "route", "flush", "cache"]);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let _ = std::process::Command::new("kill").args(["-INT", &dump.0.id().to_string()]).status();
    let _ = dump.0.wait();
    let fields = ["-e", "icmp.type", "-e", "icmpv6.type", "-e", "ip.checksum.status", "-e", "icmp.checksum.status"];
    let more = ["-e", "icmpv6.checksum.status", "-e", "ip.dst"];
    let tshark = std::process::Command::new("tshark")
        .args(["-r", &pcap, "-o", "ip.check_checksum:TRUE", "-T", "fields"])
        .args(fields)
        .args(more)
        .output()
        .expect("tshark runs");
    let lines = String::from_utf8_lossy(&tshark.stdout).into_owned();
    assert!(tshark.status.success(), "tshark: {}", out(&tshark));
    // Fragmentation needed (3) / Packet Too Big (2) reached the client,
    // every checksum tshark can check good (status 1; the embedded
    // header's is in the same field as the outer one's).
    let too_big: Vec<&str> =
        lines.lines().filter(|l| l.starts_with("3\t") || l.split('\t').nth(1) == Some("2")).collect();
    assert!(too_big.len() >= 4, "a too-big error per Service and family:\n{lines}");
    for l in &too_big {
        let cols: Vec<&str> = l.split('\t').collect();
        let statuses = cols[2..5].iter().flat_map(|c| c.split(',')).filter(|s| !s.is_empty());
        assert!(statuses.clone().all(|s| s == "1") && statuses.count() >= 1, "a bad checksum: {l}\n{lines}");
    }
    eprintln!("{}", report.join("\n"));
}
