//! The seeds' experiments end to end: the reference topology of
//! `xskgate_tests::reference` (client, gw1 with pod-a, gw2 with pods b and
//! c), two real `xskgate run` daemons on real AF_XDP sockets and veths,
//! real clients (ureq for HTTP, UDP sockets), in namespaces the test makes
//! and removes. Needs root; fails loudly without it, never skips.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};
use xskgate_tests::reference::{
    Family, Gw, LB_CLUSTER, LB_DSR, LB_LOCAL, LB_NONE, NAMESPACES, PodState, Reference, http_get, udp_flows,
};
use xskgate_tests::{UdpStream, in_ns};

const XSKGATE: &str = env!("CARGO_BIN_EXE_xskgate");
const NO_LOCAL: &str = "xskgate_drops_total{reason=\"no_local_endpoints\"}";
const SYNCS: &str = "kubeproxy_sync_proxy_rules_duration_seconds_count";

fn start() -> Reference {
    Reference::start(Path::new(XSKGATE)).unwrap_or_else(|e| panic!("{e}"))
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One HTTP request from the client: (pod, the source address it saw).
fn http(r: &Reference, url: &str) -> Result<(String, String), String> {
    let (status, body) = http_get(&r.topo.ns_name("client"), url.to_string())?;
    if status != 200 {
        return Err(format!("{url}: status {status}: {body}"));
    }
    let (pod, peer) = body.trim().split_once(' ').ok_or(format!("answer {body:?}"))?;
    let peer: SocketAddr = peer.parse().map_err(|e| format!("{peer}: {e}"))?;
    Ok((pod.to_string(), peer.ip().to_string()))
}

/// Every non-zero xskgate counter of both gateways, their neighbours, the
/// kernel's drops in every namespace and the gateways' warnings, for
/// failure messages.
fn counters(r: &Reference) -> String {
    let mut out = String::new();
    for gw in Gw::BOTH {
        for l in r.metrics(gw).lines() {
            if l.starts_with("xskgate_") && !l.ends_with(" 0") && !l.contains("_bucket") {
                out.push_str(&format!("{}: {l}\n", gw.name()));
            }
        }
    }
    for gw in Gw::BOTH {
        let n = r.topo.exec(gw.name(), &["ip", "neigh"]);
        out.push_str(&format!("{} neigh: {}\n", gw.name(), String::from_utf8_lossy(&n.stdout).replace('\n', " | ")));
    }
    for ns in NAMESPACES {
        out.push_str(&r.topo.kernel_drops(ns));
        out.push('\n');
    }
    for g in &r.gateways {
        for l in g.daemon.log_text().lines().filter(|l| l.contains("WARN") || l.contains("ERROR")) {
            out.push_str(&format!("{} log: {l}\n", g.gw.name()));
        }
    }
    out
}

/// Waits until `gw` has published another table after `before` syncs
/// (polled every 5 ms: the manifest directory is read every 50 ms).
fn wait_publication(r: &Reference, gw: Gw, before: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while r.metric(gw, SYNCS) <= before {
        assert!(Instant::now() < deadline, "no table publication within 5 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Scenario 1 (seed 003), in both families of the dual-stack Services:
/// Cluster through either gateway reaches a pod that sees the gateway's
/// address of that family; Local keeps the client's address and stays on
/// the gateway's own pods; with pod-a scaled away, Local through gw1 times
/// out and counts `no_local_endpoints` while Cluster through gw1 still works.
#[test]
fn s1_seed_003_policies_and_a_gateway_without_local_pods() {
    let mut r = start();
    let url = |f: Family, lb: &str| format!("http://{}/", f.host_port(lb, 80));
    for family in Family::BOTH {
        for gw in Gw::BOTH {
            r.via(gw);
            let (pod, src) = http(&r, &url(family, LB_CLUSTER)).unwrap_or_else(|e| panic!("{family:?}: {e}"));
            assert!(gw.addresses_in(family).contains(&src), "Cluster via {gw:?} ({family:?}): {pod} saw {src}");
            let (pod, src) = http(&r, &url(family, LB_LOCAL)).unwrap_or_else(|e| panic!("{family:?}: {e}"));
            assert_eq!(src, gw.client_address_in(family), "Local via {gw:?} ({family:?}) keeps the client address");
            let local_pods: &[&str] = if gw == Gw::Gw1 { &["pod-a"] } else { &["pod-b", "pod-c"] };
            assert!(local_pods.contains(&pod.as_str()), "Local via {gw:?} ({family:?}) answered by {pod}");
        }
    }
    r.set_pod("pod-a", PodState::Deleted);
    wait_for("gw1's health check to say 503 in both families", Duration::from_secs(5), || {
        Family::BOTH.iter().all(|&f| r.health_in(Gw::Gw1, f).is_ok_and(|(code, _)| code == 503))
    });
    r.via(Gw::Gw1);
    for family in Family::BOTH {
        let before = r.metric(Gw::Gw1, NO_LOCAL);
        let local = http(&r, &url(family, LB_LOCAL));
        assert!(local.is_err(), "Local ({family:?}) through a gateway without local pods must time out: {local:?}");
        wait_for("no_local_endpoints to rise on gw1", Duration::from_secs(3), || r.metric(Gw::Gw1, NO_LOCAL) > before);
        let (pod, src) = http(&r, &url(family, LB_CLUSTER)).expect("Cluster through gw1 still works");
        let gw1 = Gw::Gw1.addresses_in(family);
        assert!(["pod-b", "pod-c"].contains(&pod.as_str()) && gw1.contains(&src), "{family:?}: {pod} {src}");
    }
}

/// Scenario 2: healthCheckNodePort says 200 with the local count on each
/// gateway, asked over either family, and gw1's flips to 503 as pod-a
/// becomes not ready, terminating, or deleted — and back to 200.
#[test]
fn s2_health_check_follows_the_local_endpoints() {
    let mut r = start();
    let on = |r: &Reference, gw: Gw, want: (u16, u64)| Family::BOTH.iter().all(|&f| r.health_in(gw, f) == Ok(want));
    assert!(on(&r, Gw::Gw1, (200, 1)), "{:?}", r.health_in(Gw::Gw1, Family::Ipv6));
    assert!(on(&r, Gw::Gw2, (200, 2)), "{:?}", r.health_in(Gw::Gw2, Family::Ipv6));
    for state in [PodState::NotReady, PodState::Terminating, PodState::Deleted] {
        r.set_pod("pod-a", state);
        wait_for(&format!("503 with pod-a {state:?}"), Duration::from_secs(5), || on(&r, Gw::Gw1, (503, 0)));
        assert!(on(&r, Gw::Gw2, (200, 2)), "gw2 is not affected");
        r.set_pod("pod-a", PodState::Ready);
        wait_for("200 again", Duration::from_secs(5), || on(&r, Gw::Gw1, (200, 1)));
    }
    r.set_pod("pod-b", PodState::NotReady);
    wait_for("gw2 counts one local endpoint", Duration::from_secs(5), || on(&r, Gw::Gw2, (200, 1)));
}

/// Scenario 3 (seed 004): 3,000 flows spread evenly over the two gateways.
/// Local gives pod-a half (it is alone on gw1) and b, c a quarter each;
/// Cluster gives each pod a third. Tolerance: ±5 points (about six standard
/// deviations of a fair split of 3,000 flows).
#[test]
fn s3_seed_004_imbalance() {
    let r = start();
    for (udp_nodeport, expected) in
        [(30053u16, [("pod-a", 0.5), ("pod-b", 0.25), ("pod-c", 0.25)]), (30054, [("pod-a", 1.0 / 3.0); 3])]
    {
        let mut tally = xskgate_tests::reference::Tally::default();
        for gw in Gw::BOTH {
            let to: SocketAddr = format!("{}:{udp_nodeport}", gw.address()).parse().unwrap();
            let t = udp_flows(&r.topo.ns_name("client"), to, 1500, Duration::from_secs(2));
            assert_eq!(t.unanswered, 0, "every flow through {gw:?} is answered: {t:?}\n{}", counters(&r));
            for (pod, n) in t.per_pod {
                *tally.per_pod.entry(pod).or_default() += n;
            }
        }
        let shares = tally.shares();
        let names = ["pod-a", "pod-b", "pod-c"];
        for (i, (_, want)) in expected.iter().enumerate() {
            let got = shares.get(names[i]).copied().unwrap_or(0.0);
            assert!((got - want).abs() <= 0.05, "NodePort {udp_nodeport}: {} has {got:.3}, want {want:.3}", names[i]);
        }
    }
}

/// Scenario 10 (seed 004 fixed by direct server return, and its MTU):
/// `whoami-dsr`,
/// through each gateway in each family, 1,500 UDP flows to its
/// LoadBalancer IP each: every pod answers with the client's own address
/// (no SNAT), and the shares are a third each (±5 points over 3,000 flows
/// per family), where Local gives 50/25/25. The pods' replies never pass
/// through xskgate: the gateways forward only the client's side. An HTTP
/// GET (a real client) gets its answer the same way, and `explain
/// --gateway` names the encapsulation. The pods' receiving side is the
/// user-space stand-in for the kernel's tunnel devices
/// (`xskgate_tests::dsr`: this kernel has no `ipip`/`ip6tnl`).
#[test]
fn s10_dsr_keeps_the_client_address_and_balances() {
    let r = start();
    for family in Family::BOTH {
        let mut tally = xskgate_tests::reference::Tally::default();
        for gw in Gw::BOTH {
            r.via(gw);
            let to: SocketAddr = family.host_port(LB_DSR, 8080).parse().unwrap();
            let t = udp_flows(&r.topo.ns_name("client"), to, 1500, Duration::from_secs(2));
            assert_eq!(t.unanswered, 0, "{family:?} via {gw:?}: {t:?}\n{}", counters(&r));
            let client = gw.client_address_in(family);
            assert_eq!(t.sources.keys().collect::<Vec<_>>(), [&client], "{family:?} via {gw:?}: the client's address");
            tally.merge(&t);
            let (pod, seen) = http(&r, &format!("http://{}/", family.host_port(LB_DSR, 8080)))
                .unwrap_or_else(|e| panic!("{family:?} via {gw:?}: {e}\n{}", counters(&r)));
            assert_eq!(seen, client, "{family:?} via {gw:?}: {pod} saw {seen}");
        }
        for (pod, share) in tally.shares() {
            assert!((share - 1.0 / 3.0).abs() <= 0.05, "{family:?}: {pod} has {share:.3} of the flows: {tally:?}");
        }
        assert_eq!(tally.per_pod.len(), 3, "every pod answers: {tally:?}");
    }
    assert!(r.decapsulators.iter().all(|d| d.packets.load(std::sync::atomic::Ordering::Relaxed) > 0));
    // The tunnel's 20 (40) bytes: a full-size segment no longer fits the
    // gateway's 1500-byte links, so it answers with fragmentation-needed /
    // Packet Too Big about the client's packet; the client's kernel lowers
    // its path MTU and a 1 MB upload (one line the pod reads whole) arrives.
    r.via(Gw::Gw1);
    for family in Family::BOTH {
        let to: SocketAddr = family.host_port(LB_DSR, 8080).parse().unwrap();
        let answer = in_ns(&r.topo.ns_name("client"), move || -> Result<String, String> {
            use std::io::{Read, Write};
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3)).map_err(|e| e.to_string())?;
            s.set_write_timeout(Some(Duration::from_secs(20))).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(20))).map_err(|e| e.to_string())?;
            let mut line = vec![b'x'; 1 << 20];
            line.push(b'\n');
            s.write_all(&line).map_err(|e| format!("upload stalled: {e}"))?;
            let mut got = String::new();
            s.read_to_string(&mut got).map_err(|e| e.to_string())?;
            Ok(got)
        });
        let answer = answer.unwrap_or_else(|e| panic!("{family:?}: 1 MB through DSR: {e}\n{}", counters(&r)));
        assert!(answer.starts_with("pod-"), "{family:?}: {answer:?}");
        let fam = if family == Family::Ipv4 { "-4" } else { "-6" };
        let route =
            String::from_utf8_lossy(&r.topo.exec("client", &["ip", fam, "route", "get", &family.of(LB_DSR)]).stdout)
                .into_owned();
        let want = if family == Family::Ipv4 { "mtu 1480" } else { "mtu 1460" };
        assert!(route.contains(want), "{family:?}: the tunnel's overhead in the client's path MTU: {route}");
    }
    // Workers publish their counters every 100 ms.
    wait_for("gw1's too-big answers (one per family) in /metrics", Duration::from_secs(3), || {
        r.metric(Gw::Gw1, "xskgate_io_too_big_sent_total") >= 2
    });
    let packet = format!("udp 198.18.1.100:45001 > {LB_DSR}:8080");
    let (code, text, err) = xskgate_in(&r, "gw1", &["explain", "--gateway", "--packet", &packet]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("encapsulate   ") && text.contains("ipip 198.18."), "{text}");
}

/// Scenario 4: a pod reaching the LoadBalancer IP of the Local Service is
/// internal traffic: it uses the Cluster set (pods on gw2 answer too), and
/// its own address is kept.
#[test]
fn s4_pod_to_loadbalancer_ip_is_internal() {
    let r = start();
    let to: SocketAddr = format!("{LB_LOCAL}:53").parse().unwrap();
    let t = udp_flows(&r.topo.ns_name("pa"), to, 200, Duration::from_secs(2));
    assert_eq!(t.unanswered, 0, "{t:?}\n{}", counters(&r));
    let pods: BTreeSet<_> = t.per_pod.keys().cloned().collect();
    assert!(pods.contains("pod-b") && pods.contains("pod-c"), "the Cluster set answers: {t:?}");
    // pod-a reaching itself is hairpin (masqueraded); every other pod sees pod-a.
    let from_pod_a = t.sources.get("198.19.1.10").copied().unwrap_or(0);
    assert_eq!(from_pod_a, t.answered() - t.per_pod.get("pod-a").copied().unwrap_or(0), "{t:?}");
}

/// Scenario 5: no endpoints anywhere: TCP is refused (RST), UDP gets ICMP
/// port unreachable — no silent timeout.
#[test]
fn s5_no_endpoints_is_refused_not_silent() {
    let r = start();
    let (tcp, udp) = in_ns(&r.topo.ns_name("client"), || {
        let tcp = TcpStream::connect_timeout(&format!("{LB_NONE}:80").parse().unwrap(), Duration::from_secs(2));
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(format!("{LB_NONE}:53")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.send(b"who").unwrap();
        let mut buf = [0u8; 64];
        (tcp.map(|_| ()), s.recv(&mut buf).map(|_| ()))
    });
    assert_eq!(tcp.map_err(|e| e.kind()), Err(std::io::ErrorKind::ConnectionRefused), "TCP gets a RST");
    assert_eq!(udp.map_err(|e| e.kind()), Err(std::io::ErrorKind::ConnectionRefused), "UDP gets port unreachable");
}

/// Scenario 6: a UDP flow whose endpoint is removed reaches a live endpoint
/// with its next datagram (its conntrack entry was flushed).
#[test]
fn s6_udp_flow_moves_when_its_endpoint_goes() {
    let mut r = start();
    let sock = in_ns(&r.topo.ns_name("client"), || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(format!("{LB_CLUSTER}:53")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    });
    let ask = |s: &UdpSocket, r: &Reference| -> String {
        s.send(b"who").unwrap();
        let mut buf = [0u8; 128];
        let n = s.recv(&mut buf).unwrap_or_else(|e| panic!("no answer ({e}):\n{}", counters(r)));
        String::from_utf8_lossy(&buf[..n]).split(' ').next().unwrap().to_string()
    };
    let first = ask(&sock, &r);
    assert_eq!(ask(&sock, &r), first, "the flow sticks to its endpoint");
    let pod: &'static str = ["pod-a", "pod-b", "pod-c"].into_iter().find(|p| *p == first).expect("a known pod");
    let before = r.metric(Gw::Gw1, SYNCS);
    r.set_pod(pod, PodState::Deleted);
    wait_publication(&r, Gw::Gw1, before);
    let next = ask(&sock, &r);
    assert_ne!(next, first, "the next datagram reached a live endpoint");
}

/// Scenario 7: a bounded continuous UDP stream loses nothing while 1,000
/// table updates that leave its endpoint in place are published, one
/// publication each.
#[test]
fn s7_no_loss_across_1000_table_updates() {
    let mut r = start();
    let to: SocketAddr = format!("{LB_CLUSTER}:53").parse().unwrap();
    // At most 240 s and 400,000 datagrams, about 2,000 per second.
    let stream = UdpStream::start(&r.topo.ns_name("client"), to, Duration::from_secs(240), 400_000)
        .expect("the flow answers before the stream starts");
    std::thread::sleep(Duration::from_millis(200));
    let published_before = r.metric(Gw::Gw1, SYNCS);
    for _ in 0..1000 {
        let before = r.metric(Gw::Gw1, SYNCS);
        r.churn();
        wait_publication(&r, Gw::Gw1, before);
    }
    let published = r.metric(Gw::Gw1, SYNCS) - published_before;
    let (sent, got) = stream.finish();
    assert!(published >= 1000, "{published} publications");
    assert!(sent > 500, "the stream ran ({sent} datagrams)");
    assert_eq!(got, sent, "datagrams lost across {published} table updates:\n{}", counters(&r));
}

/// Scenario 8: 1,000 sequential HTTP requests (a real client, one
/// connection each) all succeed through the gateway, in each policy.
#[test]
fn s8_a_thousand_http_requests_per_policy() {
    let r = start();
    r.via(Gw::Gw1);
    for lb in [LB_LOCAL, LB_CLUSTER] {
        let url = format!("http://{lb}/");
        let failures = in_ns(&r.topo.ns_name("client"), move || {
            let agent: ureq::Agent =
                ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(3))).build().into();
            let mut failures = Vec::new();
            for i in 0..1000 {
                match agent.get(&url).call() {
                    Ok(mut resp) => {
                        let status = resp.status();
                        let body = resp.body_mut().read_to_string();
                        if status != 200 || !body.as_deref().is_ok_and(|b| b.starts_with("pod-")) {
                            failures.push(format!("#{i}: status {status}, body {body:?}"));
                        }
                    }
                    Err(e) => failures.push(format!("#{i}: {e}")),
                }
            }
            failures
        });
        assert!(
            failures.is_empty(),
            "{lb}: {} of 1000 failed: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
    }
}

/// `xskgate <args>` in namespace `ns`: (exit code, stdout, stderr).
fn xskgate_in(r: &Reference, ns: &str, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &r.topo.ns_name(ns), XSKGATE])
        .args(args)
        .output()
        .expect("xskgate runs");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// A JSON answer of `xskgate ... --json` in `ns`.
fn xskgate_json(r: &Reference, ns: &str, args: &[&str]) -> serde_json::Value {
    let (code, out, err) = xskgate_in(r, ns, args);
    assert_eq!(code, 0, "xskgate {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("xskgate {args:?}: {e}: {out}"))
}

/// Whether one of two pings (real `ping`) from the client to `vip` is answered.
fn ping(r: &Reference, vip: &str) -> bool {
    let ns = r.topo.ns_name("client");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns, "ping", "-n", "-q", "-c", "2", "-i", "0.2", "-W", "1", vip])
        .output()
        .expect("ping (iputils-ping) runs");
    out.status.success()
}

/// One UDP datagram from the client's `sport` to `to`: the answer, if any.
fn udp_from(r: &Reference, sport: u16, to: &str) -> Option<String> {
    let to: SocketAddr = to.parse().unwrap();
    in_ns(&r.topo.ns_name("client"), move || {
        let s = UdpSocket::bind(("198.18.1.100", sport)).ok()?;
        s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
        s.send_to(b"who", to).ok()?;
        let mut buf = [0u8; 256];
        let n = s.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

/// The IPv4 status row of a Service port (`namespace/name:port`).
fn service_row<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    let rows = status["services"].as_array().expect("services");
    rows.iter()
        .find(|s| s["service"] == name && s["family"] == "IPv4")
        .unwrap_or_else(|| panic!("no IPv4 row {name} in {status:#}"))
}

/// Scenario 9 (issue 27), the operator's tools against the running gateways
/// (their admin endpoints, on each namespace's loopback): seed 000's ping
/// answered by gw1 for the Local Service while pod-a is there and not after,
/// while gw2 keeps answering; `xskgate status` with endpoint counts, health
/// and per-Service counters; `xskgate explain --gateway` for a tracked flow
/// (its live conntrack entry) and for a Local drop (pod-b and pod-c on the
/// other node); `xskgate capture` read back by real tshark and tcpdump with
/// `no_local_endpoints` in each packet's comment; and bad input that says
/// what is wrong.
#[test]
fn s9_status_explain_capture_and_ping_on_running_gateways() {
    let mut r = start();
    r.via(Gw::Gw1);
    assert!(ping(&r, LB_LOCAL), "gw1 answers a ping of the Local VIP while pod-a is local:\n{}", counters(&r));
    assert!(!ping(&r, LB_NONE), "a VIP without endpoints is not answered");
    assert!(r.metric(Gw::Gw1, "xskgate_echo_replies_total") >= 1);
    assert!(r.metric(Gw::Gw1, "xskgate_drops_total{reason=\"echo_not_served\"}") >= 1);

    // A tracked UDP flow, explained from the live conntrack.
    let answer = udp_from(&r, 45_000, &format!("{LB_LOCAL}:53")).expect("UDP through gw1 is answered");
    assert!(answer.starts_with("pod-a"), "{answer}");
    let packet = format!("udp 198.18.1.100:45000 > {LB_LOCAL}:53");
    let x = xskgate_json(&r, "gw1", &["explain", "--gateway", "127.0.0.1:10261", "--packet", &packet, "--json"]);
    assert_eq!(x["verdict"], "forward", "{x:#}");
    assert_eq!(x["conntrack"]["direction"], "original", "{x:#}");
    assert_eq!(x["translated"]["dst"], "198.19.1.10:8080", "{x:#}");
    assert_eq!(x["service"], "default/whoami-local:dns", "{x:#}");

    // Workers publish their counters every 100 ms.
    let mut status = serde_json::Value::Null;
    wait_for("the flow's packets in gw1's status", Duration::from_secs(3), || {
        status = xskgate_json(&r, "gw1", &["status", "--json"]);
        service_row(&status, "default/whoami-local:dns")["packets"].as_u64() >= Some(2)
    });
    assert_eq!(status["node"], "gw1");
    let dns = service_row(&status, "default/whoami-local:dns");
    assert_eq!((dns["cluster_endpoints"].as_u64(), dns["local_endpoints"].as_u64()), (Some(3), Some(1)), "{dns:#}");
    assert_eq!(dns["health"]["status"], 200, "{dns:#}");
    assert!(status["conntrack"]["entries"].as_u64() >= Some(1), "{status:#}");
    let (code, text, err) = xskgate_in(&r, "gw1", &["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("default/whoami-local:dns") && text.contains(":32080 200 (1 local)"), "{text}");

    // pod-a goes: gw1 stops answering the Local VIP, gw2 goes on.
    r.set_pod("pod-a", PodState::Deleted);
    wait_for("gw1's health check to say 503", Duration::from_secs(5), || {
        r.health(Gw::Gw1).is_ok_and(|(code, _)| code == 503)
    });
    assert!(!ping(&r, LB_LOCAL), "gw1 must not answer for a Service it would not serve");
    r.via(Gw::Gw2);
    assert!(ping(&r, LB_LOCAL), "gw2 still serves the Local Service");
    r.via(Gw::Gw1);

    // A capture of the Local drops, read by tshark and tcpdump.
    let file = std::env::temp_dir().join(format!("{}-drops.pcapng", r.topo.prefix()));
    let path = file.to_string_lossy().into_owned();
    let capture = std::process::Command::new("ip")
        .args(["netns", "exec", &r.topo.ns_name("gw1"), XSKGATE, "capture", "--seconds", "3"])
        .args(["--reasons", "no_local_endpoints", "-w", &path])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("xskgate capture starts");
    let sender = {
        let ns = r.topo.ns_name("client");
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1000));
            udp_flows(&ns, format!("{LB_LOCAL}:53").parse().unwrap(), 20, Duration::from_millis(300))
        })
    };
    let capture = capture.wait_with_output().expect("xskgate capture runs");
    let sent = sender.join().expect("the sender");
    assert_eq!(sent.answered(), 0, "Local through gw1 without pod-a is dropped: {sent:?}");
    assert!(capture.status.success(), "xskgate capture: {}", String::from_utf8_lossy(&capture.stderr));
    let tshark = std::process::Command::new("tshark")
        .args(["-r", &path, "-T", "fields", "-e", "frame.comment", "-e", "ip.dst", "-e", "udp.dstport"])
        .output()
        .expect("tshark (scripts/install-deps installs it) runs");
    let tcpdump = std::process::Command::new("tcpdump").args(["-n", "-r", &path]).output().expect("tcpdump runs");
    // The capture explained frame by frame against the live tables.
    let (code, explained, err) = xskgate_in(&r, "gw1", &["explain", "--gateway", "--pcap", &path, "--json"]);
    let _ = std::fs::remove_file(&file);
    let lines = String::from_utf8_lossy(&tshark.stdout).into_owned();
    assert!(tshark.status.success(), "tshark: {}", String::from_utf8_lossy(&tshark.stderr));
    let rows: Vec<&str> = lines.lines().collect();
    assert!(rows.len() >= 10, "most of the 20 dropped datagrams are captured: {lines}");
    assert!(rows.iter().all(|l| *l == format!("no_local_endpoints\t{LB_LOCAL}\t53")), "{lines}");
    let dump = String::from_utf8_lossy(&tcpdump.stdout).into_owned();
    assert!(tcpdump.status.success(), "tcpdump: {}", String::from_utf8_lossy(&tcpdump.stderr));
    assert_eq!(code, 0, "{err}");
    let explained: Vec<serde_json::Value> = explained.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(explained.len(), rows.len());
    assert!(explained.iter().all(|x| x["reason"] == "no_local_endpoints"), "{explained:?}");
    assert!(dump.lines().count() == rows.len() && dump.contains(&format!("> {LB_LOCAL}.53: ")), "{dump}");

    // The Local drop, explained and counted.
    let packet = format!("udp 198.18.1.100:45001 > {LB_LOCAL}:53");
    let x = xskgate_json(&r, "gw1", &["explain", "--gateway", "127.0.0.1:10261", "--packet", &packet, "--json"]);
    assert_eq!((&x["verdict"], &x["reason"]), (&"drop".into(), &"no_local_endpoints".into()), "{x:#}");
    let endpoints = x["endpoints"].as_array().expect("endpoints");
    assert_eq!(endpoints.len(), 2, "pod-b and pod-c: {x:#}");
    assert!(endpoints.iter().all(|e| e["usable"] == false && e["why"] == "on node gw2, not this node (gw1)"), "{x:#}");
    wait_for("the drops in gw1's status", Duration::from_secs(3), || {
        status = xskgate_json(&r, "gw1", &["status", "--json"]);
        service_row(&status, "default/whoami-local:dns")["drops"]["no_local_endpoints"].as_u64() >= Some(20)
    });
    let dns = service_row(&status, "default/whoami-local:dns");
    assert_eq!((dns["local_endpoints"].as_u64(), dns["health"]["status"].as_u64()), (Some(0), Some(503)), "{dns:#}");
    assert_eq!(service_row(&status, "default/whoami-dsr:http")["dsr"], true, "{status:#}");

    // Bad input is named; an unreachable gateway is said to be one.
    let (code, _, err) =
        xskgate_in(&r, "gw1", &["explain", "--gateway", "127.0.0.1:10261", "--packet", "udp 1.2.3 > 4.5.6.7:53"]);
    assert_eq!(code, 2);
    assert!(err.contains("source \"1.2.3\""), "{err}");
    let (code, _, err) = xskgate_in(&r, "gw1", &["status", "--gateway", "127.0.0.1:1"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach the gateway's admin endpoint at 127.0.0.1:1"), "{err}");
    let (code, _, err) = xskgate_in(&r, "gw1", &["capture", "--reasons", "no_such", "-w", "/dev/null"]);
    assert_eq!(code, 2);
    assert!(err.contains("\"no_such\" is not a drop reason"), "{err}");
}
