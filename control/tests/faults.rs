//! Fault tests under load: real `xskgate run` workers on real AF_XDP
//! sockets and veths in namespaces the test makes, real kernel TCP and UDP
//! sockets as clients and pods. Each pushes one limit of the gateway past
//! its end and asserts what must stay true: flows that were working keep
//! working, what is refused is counted by reason, service comes back.
//! Needs root; fails loudly without it.
//!
//! ```text
//!  client 198.18.0.100 ── g0 198.18.0.1 [gw: xskgate on g0,g1] g1 198.19.1.1 ── pod-a 198.19.1.10
//! ```

#[path = "support/apiserver.rs"]
mod apiserver;

use apiserver::ApiServer;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};
use xskgate_tests::single::{Lab, VIP, connect_all, line_server};
use xskgate_tests::{Topology, UdpStream, ask_udp, in_ns};

const XSKGATE: &str = env!("CARGO_BIN_EXE_xskgate");

fn lab() -> Lab {
    Lab::new(Path::new(XSKGATE))
}

/// Sends one line on each connection and counts those whose answer is that
/// line.
fn round_trips(conns: &[TcpStream], tag: &str) -> usize {
    conns
        .iter()
        .enumerate()
        .filter(|(i, c)| {
            let line = format!("{tag} {i}");
            let _ = c.set_read_timeout(Some(Duration::from_secs(3)));
            let mut w: &TcpStream = c;
            if writeln!(w, "{line}").is_err() {
                return false;
            }
            let mut got = String::new();
            let mut r = BufReader::new(*c);
            r.read_line(&mut got).is_ok() && got.trim_end() == line
        })
        .count()
}

/// Closes each connection as an application does (FIN), and waits until
/// the pod's FIN came back, so that each flow has closed both ways
/// (TIME_WAIT on the client and in the gateway's conntrack).
fn close_both_ways(conns: Vec<TcpStream>) -> usize {
    conns
        .into_iter()
        .filter(|c| {
            let _ = c.shutdown(std::net::Shutdown::Write);
            let _ = c.set_read_timeout(Some(Duration::from_secs(3)));
            let mut rest = String::new();
            BufReader::new(c).read_line(&mut rest).is_ok_and(|n| n == 0)
        })
        .count()
}

/// SNAT ports exhausted, then freed by closing flows, as a user tried it
/// against Linux: 200 SNAT ports, more connections to one backend than
/// ports, then half of them closed. Every established connection keeps
/// working throughout; the connections that find no port are refused and
/// counted as `snat_exhausted`, never by taking a live flow's port; and a
/// port whose flow has closed both ways is reusable at once, as Linux's
/// NAT reuses it: 20 of 20 new connections open right after the close.
#[test]
fn snat_ports_exhausted_keep_established_flows_and_closed_ports_are_reused_at_once() {
    xskgate_tests::require_root();
    let lab = lab();
    line_server(&lab.t, 8080, Instant::now() + Duration::from_secs(120));
    let gw = lab.start(&["--snat-ports", "40000-40199"], "xskgate.log");
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();

    // 200 connections take every SNAT port toward pod-a:8080.
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.extend(connect_all(&lab.t, vip, 50, Duration::from_secs(3)));
    }
    assert_eq!(conns.len(), 200, "200 connections for 200 ports\n{}", gw.log_text());
    assert_eq!(round_trips(&conns, "first"), 200, "every connection answers");

    // 20 more find no port: refused (dropped, so connect times out), counted.
    let exhausted = "xskgate_drops_total{reason=\"snat_exhausted\"}";
    let before = lab.metric(exhausted);
    let extra = connect_all(&lab.t, vip, 20, Duration::from_millis(1500));
    assert_eq!(extra.len(), 0, "no port is free, yet {} connected", extra.len());
    let refused = lab.metric(exhausted) - before;
    assert!(refused >= 20, "each refused SYN is counted as snat_exhausted: {refused}");
    assert_eq!(round_trips(&conns, "during"), 200, "no live flow lost its port to a new one");

    // Half of them close both ways; their ports are free at once.
    let rest = conns.split_off(100);
    assert_eq!(close_both_ways(conns), 100, "each close completes both ways");
    let reused_before = lab.metric("xskgate_conntrack_events_total{event=\"closed_reused\"}");
    std::thread::sleep(Duration::from_millis(200));
    let fresh = connect_all(&lab.t, vip, 20, Duration::from_secs(2));
    assert_eq!(fresh.len(), 20, "20 of 20 new connections after the close (Linux: 20 of 20)");
    assert_eq!(round_trips(&fresh, "fresh"), 20);
    let reused = lab.metric("xskgate_conntrack_events_total{event=\"closed_reused\"}") - reused_before;
    assert!(reused >= 20, "each took a closed flow's port: {reused}");
    assert_eq!(round_trips(&rest, "after"), 100, "the 100 still open are untouched");
    drop(gw);
}

/// UDP flows of one client socket each, opened in the client namespace;
/// each has asked once and been answered (so the flow is replied, as Linux
/// calls it assured, and early drop may not evict it).
fn udp_flows(t: &Topology, to: SocketAddr, n: usize, timeout: Duration) -> (Vec<UdpSocket>, usize) {
    in_ns(&t.ns_name("client"), move || {
        let socks: Vec<UdpSocket> = (0..n).map(|_| UdpSocket::bind("198.18.0.100:0").expect("bind")).collect();
        let answered = socks.iter().filter(|s| ask(s, to, timeout)).count();
        (socks, answered)
    })
}

/// One datagram to `to` and its answer within `timeout`.
fn ask(s: &UdpSocket, to: SocketAddr, timeout: Duration) -> bool {
    let _ = s.set_read_timeout(Some(timeout));
    let mut buf = [0u8; 256];
    s.send_to(b"who", to).is_ok() && s.recv_from(&mut buf).is_ok_and(|(n, _)| buf[..n].starts_with(b"pod-a"))
}

/// The conntrack table full: a 64-flow table, 64 replied UDP flows in it,
/// then new flows. Every packet of every old flow is delivered while new
/// flows are refused and counted as `conntrack_full` (replied flows are not
/// early-dropped, as Linux keeps assured ones); once the old flows go idle
/// past `--conntrack-udp-timeout-stream`, the sweeper expires them and new
/// flows are served again.
#[test]
fn conntrack_full_keeps_established_flows_and_resumes_when_flows_expire() {
    xskgate_tests::require_root();
    let mut lab = lab();
    lab.t.echo_thread("pa", "pod-a", 8080);
    let gw = lab.start(
        &["--conntrack-max", "64", "--conntrack-udp-timeout", "2s", "--conntrack-udp-timeout-stream", "3s"],
        "xskgate.log",
    );
    let vip: SocketAddr = format!("{VIP}:53").parse().unwrap();
    let timeout = Duration::from_secs(2);

    let (old, answered) = udp_flows(&lab.t, vip, 64, timeout);
    assert_eq!(answered, 64, "64 flows fit in a 64-flow table\n{}", gw.log_text());
    assert_eq!(lab.metric("xskgate_conntrack_entries"), 64);

    let full = "xskgate_drops_total{reason=\"conntrack_full\"}";
    let before = lab.metric(full);
    let mut delivered = 0;
    let mut refused_new = 0;
    for round in 0..10 {
        delivered += old.iter().filter(|s| ask(s, vip, timeout)).count();
        // A new flow between rounds: refused.
        let (_, answered) = udp_flows(&lab.t, vip, 1, Duration::from_millis(300));
        refused_new += 1 - answered;
        assert_eq!(answered, 0, "round {round}: a new flow got in while the table was full");
    }
    assert_eq!(delivered, 640, "every packet of every old flow is delivered");
    assert_eq!(refused_new, 10);
    let counted = lab.metric(full) - before;
    assert!(counted >= 10, "each refused new flow is counted as conntrack_full: {counted}");

    // Idle past the replied-UDP timeout (3 s) and a sweep (every second).
    let deadline = Instant::now() + Duration::from_secs(15);
    while lab.metric("xskgate_conntrack_entries") > 0 {
        assert!(Instant::now() < deadline, "the idle flows did not expire");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(lab.metric("xskgate_conntrack_events_total{event=\"expired\"}") >= 64);
    let (_, answered) = udp_flows(&lab.t, vip, 20, timeout);
    assert_eq!(answered, 20, "service resumes once the old flows expired");
    drop(gw);
}

/// A Local LoadBalancer Service (TCP 80, UDP 53 → 8080, health check on
/// 32100) and its EndpointSlice with pod-a on gw1, as the API serves them.
fn api_objects(name: &str, cluster_ip: &str, lb: &str) -> [Value; 2] {
    [
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "prod"},
               "spec": {"type": "LoadBalancer", "clusterIP": cluster_ip, "externalTrafficPolicy": "Local",
                        "healthCheckNodePort": if name == "web" { 32100 } else { 32101 },
                        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
                                  {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 8080}]},
               "status": {"loadBalancer": {"ingress": [{"ip": lb}]}}}),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": format!("{name}-x"), "namespace": "prod",
                            "labels": {"kubernetes.io/service-name": name}},
               "addressType": "IPv4",
               "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 8080, "protocol": "UDP"}],
               "endpoints": [{"addresses": ["198.19.1.10"], "nodeName": "gw1", "conditions": {"ready": true}}]}),
    ]
}

/// The API server gone for 60 s, with `xskgate run --kubeconfig` against
/// the wire-level stand-in (`support/apiserver.rs`: no kube-apiserver
/// binary can be installed here; the kube-rs client and watchers are the
/// real ones), the stand-in listening inside the gateway's namespace. A
/// UDP stream through the gateway loses nothing during the outage, the
/// health check keeps answering 200 with its local endpoint, and a Service
/// created during the outage is served within 1 s of the API server's
/// return (the watchers retry at most 500 ms apart).
#[test]
fn api_server_gone_60_s_forwarding_and_health_unchanged_changes_applied_on_return() {
    xskgate_tests::require_root();
    let mut lab = lab();
    lab.t.echo_thread("pa", "pod-a", 8080);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let listener = in_ns(&lab.t.ns_name("gw"), || std::net::TcpListener::bind("127.0.0.1:0").expect("bind"));
    listener.set_nonblocking(true).unwrap();
    let api = {
        let _in_runtime = runtime.enter();
        ApiServer::start_on(tokio::net::TcpListener::from_std(listener).unwrap())
    };
    api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "gw1"}}));
    for o in api_objects("web", "198.19.128.11", VIP) {
        api.apply(o);
    }
    let kubeconfig = lab.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let gw = lab.start_from(&["--kubeconfig", kubeconfig.to_str().unwrap()], "xskgate.log");
    let health = || {
        xskgate_tests::reference::http_get(&lab.t.ns_name("client"), "http://198.18.0.1:32100/".into())
            .unwrap_or_else(|e| panic!("the health check did not answer: {e}"))
    };
    let (code, body) = health();
    assert!(code == 200 && body.contains("\"localEndpoints\": 1"), "{code} {body}\n{}", gw.log_text());

    let to: SocketAddr = format!("{VIP}:53").parse().unwrap();
    let stream = UdpStream::start(&lab.t.ns_name("client"), to, Duration::from_secs(90), 200_000)
        .unwrap_or_else(|e| panic!("the stream's first datagram: {e}\n{}", gw.log_text()));
    std::thread::sleep(Duration::from_secs(1));

    // 60 s without an API server; halfway, a new Service is created.
    api.set_down(true);
    let outage = Instant::now();
    let mut checks = 0;
    let mut created = false;
    while outage.elapsed() < Duration::from_secs(60) {
        let (code, body) = health();
        assert!(code == 200 && body.contains("\"localEndpoints\": 1"), "during the outage: {code} {body}");
        checks += 1;
        if !created && outage.elapsed() > Duration::from_secs(30) {
            for o in api_objects("late", "198.19.128.12", "198.18.100.12") {
                api.apply(o);
            }
            created = true;
        }
        std::thread::sleep(Duration::from_secs(5));
    }
    let late: SocketAddr = "198.18.100.12:53".parse().unwrap();
    let served = |timeout| in_ns(&lab.t.ns_name("client"), move || ask_udp(late, timeout).is_ok());
    assert!(!served(Duration::from_millis(300)), "the Service created during the outage is not served yet");
    let back = Instant::now();
    api.set_down(false);
    while !served(Duration::from_millis(50)) {
        assert!(back.elapsed() < Duration::from_secs(10), "the change never arrived\n{}", gw.log_text());
        std::thread::sleep(Duration::from_millis(10));
    }
    let applied = back.elapsed();
    let (sent, got) = stream.finish();
    eprintln!(
        "API server gone {:.1} s: {sent} datagrams sent, {got} answered, {checks} health checks 200, \
         the change served {} ms after the return",
        back.duration_since(outage).as_secs_f64(),
        applied.as_millis()
    );
    assert!(sent > 50_000, "the stream ran through the outage ({sent} datagrams)");
    assert_eq!(got, sent, "datagrams lost while the API server was gone");
    assert!(applied < Duration::from_secs(1), "the change made during the outage took {applied:?} after the return");
    assert!(gw.log_text().contains("watching"), "the outage is logged:\n{}", gw.log_text());
    drop(gw);
    drop(runtime);
}

/// An interface's MAC address, as trafgen writes it.
fn mac(t: &Topology, ns: &str, ifname: &str) -> String {
    let out = t.exec(ns, &["cat", &format!("/sys/class/net/{ifname}/address")]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The gateway's counters that account for a garbage frame, summed.
fn garbage_counters(lab: &Lab) -> [u64; 3] {
    let m = |s: &str| lab.metric(s);
    [
        m("xskgate_drops_total{reason=\"malformed\"}"),
        m("xskgate_drops_total{reason=\"ttl_expired\"}"),
        m("xskgate_io_xsk_rx_ring_full_total") + m("xskgate_io_xsk_rx_dropped_total"),
    ]
}

/// A garbage flood at the generator's full rate: netsniff-ng's trafgen (a
/// real PF_PACKET generator, one `sendto` per frame as fast as it goes,
/// bounded by `--num` and a timeout) sends six
/// kinds of bad frame round-robin into the gateway while a UDP stream
/// flows through it. Three kinds reach the pipeline (the steering program
/// sees a Service's frontend): an IPv4 total length past the frame's end
/// and an IPv4 header whose version says 6 are `malformed`, a TTL of 1 is
/// `ttl_expired`. Three do not (a fragment, a frame cut inside the IP
/// header, random bytes after an IPv4 EtherType) and are passed to the
/// kernel, counted as passed by the steering program. Every steered bad
/// frame is counted by reason, or as dropped at the socket's ring when the
/// worker fell behind; the stream keeps at least 90 % of its datagrams.
#[test]
fn garbage_flood_is_counted_by_reason_and_the_valid_stream_keeps_going() {
    xskgate_tests::require_root();
    let mut lab = lab();
    lab.t.echo_thread("pa", "pod-a", 8080);
    let gw = lab.start(&["--cpus", "1"], "xskgate.log");
    let (gw_mac, client_mac) = (mac(&lab.t, "gw", &lab.t.if_name("g0")), mac(&lab.t, "client", &lab.t.if_name("c0")));
    let head = format!("eth(da={gw_mac}, sa={client_mac}, type=0x0800)");
    let to_vip = "sa=198.18.0.100, da=198.18.100.11, proto=17";
    let udp = "udp(sp=40000, dp=53, len=26), fill(0x61, 18)";
    let conf = lab.dir.join("garbage.cfg");
    std::fs::write(
        &conf,
        [
            format!("{{ {head}, ipv4({to_vip}, len=1000, ttl=64), {udp} }}"),
            format!("{{ {head}, ipv4({to_vip}, ver=6, ttl=64), {udp} }}"),
            format!("{{ {head}, ipv4({to_vip}, ttl=1), {udp} }}"),
            format!("{{ {head}, ipv4({to_vip}, mf, ttl=64), {udp} }}"),
            format!("{{ {head}, fill(0x45, 1), fill(0x00, 9) }}"),
            format!("{{ {head}, drnd(46) }}"),
        ]
        .join("\n"),
    )
    .unwrap();
    const FRAMES: u64 = 1_200_000;
    let to: SocketAddr = format!("{VIP}:53").parse().unwrap();
    let (before, passed_before) = (garbage_counters(&lab), lab.metric("xskgate_xdp_frames_total{decision=\"passed\"}"));
    let stream = UdpStream::start(&lab.t.ns_name("client"), to, Duration::from_secs(60), 200_000)
        .unwrap_or_else(|e| panic!("the stream's first datagram: {e}\n{}", gw.log_text()));
    std::thread::sleep(Duration::from_millis(500));
    // `-t 0`: one sendto per frame (as fast as it goes); the TX ring's bulk
    // flush fails outright when the gateway's veth queue is full.
    let flood = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.t.ns_name("client"), "timeout", "-s", "INT", "30", "taskset", "-c", "0"])
        .args(["trafgen", "--dev", &lab.t.if_name("c0"), "--conf", conf.to_str().unwrap(), "--cpus", "1", "-t", "0"])
        .args(["--num", &FRAMES.to_string()])
        .output()
        .expect("trafgen runs (scripts/install-deps installs netsniff-ng)");
    let trafgen_out = String::from_utf8_lossy(&flood.stderr).to_string() + &String::from_utf8_lossy(&flood.stdout);
    assert!(flood.status.success(), "trafgen failed:\n{trafgen_out}");
    assert!(trafgen_out.contains(&format!("{FRAMES} packets outgoing")), "trafgen sent them all:\n{trafgen_out}");
    std::thread::sleep(Duration::from_millis(500));
    let (sent, got) = stream.finish();
    let after = garbage_counters(&lab);
    let passed = lab.metric("xskgate_xdp_frames_total{decision=\"passed\"}") - passed_before;
    let [malformed, ttl, ring] = [0, 1, 2].map(|i| after[i] - before[i]);
    eprintln!(
        "garbage flood: {FRAMES} frames; malformed {malformed}, ttl_expired {ttl}, dropped at the ring {ring}, \
         passed {passed}; the stream: {got} of {sent} answered"
    );
    let (steered, kernel) = (FRAMES / 2, FRAMES / 2);
    assert!(malformed > 0 && ttl > 0, "each steered kind is counted by its reason");
    let lost = sent - got;
    let counted = malformed + ttl + ring;
    assert!(
        counted >= steered && counted <= steered + lost,
        "{counted} steered bad frames counted (malformed, ttl_expired, ring drops) for {steered} sent \
         ({lost} of the stream lost)"
    );
    assert!(passed >= kernel && passed <= kernel + 1000, "{passed} passed to the kernel for {kernel} sent");
    if ring == 0 {
        assert_eq!((malformed, ttl), (2 * FRAMES / 6, FRAMES / 6), "each kind by its own reason");
    }
    assert!(got * 10 >= sent * 9, "the stream kept {got} of {sent} datagrams");
    drop(gw);
}
