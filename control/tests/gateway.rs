//! `xskgate run` end to end on real AF_XDP sockets, real veths, real
//! namespaces made by the test (the harness in `xskgate-tests`), with real
//! clients: TCP through ureq (HTTP), UDP datagrams, ping, and the health
//! and metrics servers read with ureq. Needs root; fails loudly without it.
//!
//! ```text
//!  client 198.18.0.100 ── g0 198.18.0.1 [gw1: xskgate on g0,g1,g2] g1 198.19.1.1 ── pod-a 198.19.1.10 (node gw1)
//!                                                                 g2 198.19.2.1 ── pod-b 198.19.2.10 (node gw2)
//! ```
//! pod-b is declared on another node (gw2) but routed through gw1, so the
//! Cluster policy reaches it and the Local policy must not.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use xskgate_tests::{Daemon, Topology, ask_udp, in_ns};

const XSKGATE: &str = env!("CARGO_BIN_EXE_xskgate");
const CLIENT: &str = "198.18.0.100";
const GW_CLIENT_SIDE: &str = "198.18.0.1";

fn services(pod_a_ready: bool) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: web-local, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 198.19.128.10
  externalTrafficPolicy: Local
  healthCheckNodePort: 32080
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30080}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: 8080, nodePort: 30053}}
status: {{loadBalancer: {{ingress: [{{ip: 198.18.100.10}}]}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: web-cluster, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 198.19.128.11
  externalTrafficPolicy: Cluster
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30081}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: 8080, nodePort: 30054}}
status: {{loadBalancer: {{ingress: [{{ip: 198.18.100.11}}]}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: remote-only, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 198.19.128.12
  externalTrafficPolicy: Local
  healthCheckNodePort: 32082
  ports: [{{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30082}}]
status: {{loadBalancer: {{ingress: [{{ip: 198.18.100.12}}]}}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-local-1, namespace: default, labels: {{kubernetes.io/service-name: web-local}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}, {{name: dns, port: 8080, protocol: UDP}}]
endpoints:
- {{addresses: [198.19.1.10], nodeName: gw1, targetRef: {{kind: Pod, name: pod-a}}, conditions: {{ready: {pod_a_ready}}}}}
- {{addresses: [198.19.2.10], nodeName: gw2, targetRef: {{kind: Pod, name: pod-b}}, conditions: {{ready: true}}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-cluster-1, namespace: default, labels: {{kubernetes.io/service-name: web-cluster}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}, {{name: dns, port: 8080, protocol: UDP}}]
endpoints:
- {{addresses: [198.19.1.10], nodeName: gw1, targetRef: {{kind: Pod, name: pod-a}}, conditions: {{ready: true}}}}
- {{addresses: [198.19.2.10], nodeName: gw2, targetRef: {{kind: Pod, name: pod-b}}, conditions: {{ready: true}}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: remote-only-1, namespace: default, labels: {{kubernetes.io/service-name: remote-only}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
- {{addresses: [198.19.2.10], nodeName: gw2, targetRef: {{kind: Pod, name: pod-b}}, conditions: {{ready: true}}}}
"#
    )
}

/// Writes the manifest atomically (the watcher never sees half a file).
fn write_manifest(dir: &Path, text: &str) {
    let tmp = dir.join(".services.yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("services.yaml")).unwrap();
}

/// `xskgate run ARGS` in namespace `ns` of `t`, up and serving (the test
/// fails with its log if not).
fn start_daemon(t: &Topology, ns: &str, args: &[&str], log: std::path::PathBuf) -> Daemon {
    Daemon::start(Path::new(XSKGATE), &t.ns_name(ns), args, &log, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn topology() -> Topology {
    let mut t = Topology::new();
    for ns in ["client", "gw", "pa", "pb"] {
        t.add_ns(ns);
    }
    t.link("client", "c0", &format!("{CLIENT}/24"), "gw", "g0", &format!("{GW_CLIENT_SIDE}/24"));
    t.link("gw", "g1", "198.19.1.1/24", "pa", "a0", "198.19.1.10/24");
    t.link("gw", "g2", "198.19.2.1/24", "pb", "b0", "198.19.2.10/24");
    t.forwarding("gw");
    t.route("client", "198.18.100.0/24", GW_CLIENT_SIDE);
    t.route("pa", "default", "198.19.1.1");
    t.route("pb", "default", "198.19.2.1");
    t.echo_thread("pa", "pod-a", 8080);
    t.echo_thread("pb", "pod-b", 8080);
    t
}

/// An HTTP GET with a real client (ureq) from inside namespace `ns`.
fn http_get(t: &Topology, ns: &str, url: String) -> Result<(u16, String), String> {
    xskgate_tests::reference::http_get(&t.ns_name(ns), url)
}

/// The echo server's answer line over HTTP: (pod, source address it saw).
fn who_http(t: &Topology, url: &str) -> Result<(String, String), String> {
    let (status, body) = http_get(t, "client", url.to_string())?;
    assert_eq!(status, 200, "{url}: {body}");
    let (pod, peer) = body.trim().split_once(' ').ok_or(format!("answer {body:?}"))?;
    let peer: SocketAddr = peer.parse().map_err(|e| format!("{peer}: {e}"))?;
    Ok((pod.to_string(), peer.ip().to_string()))
}

fn who_udp(t: &Topology, to: &str) -> Result<(String, String), String> {
    let to: SocketAddr = to.parse().unwrap();
    in_ns(&t.ns_name("client"), move || ask_udp(to, Duration::from_secs(2)))
        .map(|a| (a.pod, a.peer.ip().to_string()))
        .map_err(|e| e.to_string())
}

fn metric(t: &Topology, name: &str) -> u64 {
    let (_, text) = http_get(t, "gw", "http://127.0.0.1:10249/metrics".into()).expect("metrics answer");
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn xdp_attached(t: &Topology) -> bool {
    let out = t.exec("gw", &["ip", "link", "show"]);
    String::from_utf8_lossy(&out.stdout).contains(" xdp")
}

#[test]
fn both_policies_health_metrics_and_kill_9() {
    let t = topology();
    let dir = tempdir(&t);
    write_manifest(&dir, &services(true));
    let interfaces = [t.if_name("g0"), t.if_name("g1"), t.if_name("g2")].join(",");
    let args = [
        "--manifests",
        dir.to_str().unwrap(),
        "--node-name",
        "gw1",
        "--interfaces",
        &interfaces,
        "--cluster-cidr",
        "198.19.0.0/16",
        "--poll-ms",
        "100",
    ];
    let gw = start_daemon(&t, "gw", &args, dir.join("xskgate.log"));
    assert!(xdp_attached(&t), "the steering program is attached");
    let gw_addresses = ["198.19.1.1", "198.19.2.1"];

    // Local: pod-a only, the client's address kept (LoadBalancer IP and NodePort, TCP and UDP).
    for url in ["http://198.18.100.10/", "http://198.18.0.1:30080/"] {
        let (pod, seen) = who_http(&t, url).unwrap_or_else(|e| panic!("{url}: {e}\n{}", gw.log_text()));
        assert_eq!((pod.as_str(), seen.as_str()), ("pod-a", CLIENT), "{url}");
    }
    for to in ["198.18.100.10:53", "198.18.0.1:30053"] {
        let (pod, seen) = who_udp(&t, to).unwrap_or_else(|e| panic!("{to}: {e}"));
        assert_eq!((pod.as_str(), seen.as_str()), ("pod-a", CLIENT), "{to}");
    }

    // Cluster: both pods reachable, the source is the gateway's.
    let mut pods = std::collections::BTreeSet::new();
    for i in 0..40 {
        let url = if i % 2 == 0 { "http://198.18.100.11/" } else { "http://198.18.0.1:30081/" };
        let (pod, seen) = who_http(&t, url).unwrap_or_else(|e| panic!("{url}: {e}"));
        // Masquerade to the address of the interface the packet leaves by.
        let egress = if pod == "pod-a" { "198.19.1.1" } else { "198.19.2.1" };
        assert_eq!(seen, egress, "Cluster: {pod} saw {seen}, not the gateway's egress address");
        pods.insert(pod);
    }
    assert_eq!(pods.into_iter().collect::<Vec<_>>(), ["pod-a", "pod-b"], "Cluster spreads over both pods");
    for to in ["198.18.100.11:53", "198.18.0.1:30054"] {
        let (_, seen) = who_udp(&t, to).unwrap_or_else(|e| panic!("{to}: {e}"));
        assert!(gw_addresses.contains(&seen.as_str()), "Cluster UDP: the pod saw {seen}");
    }

    // Local without a local endpoint: dropped (a timeout, not a reject), counted.
    let before = metric(&t, "xskgate_drops_total{reason=\"no_local_endpoints\"}");
    let r = http_get(&t, "client", "http://198.18.100.12/".into());
    assert!(r.is_err(), "remote-only Local Service answered: {r:?}");
    wait_for("no_local_endpoints to rise", Duration::from_secs(3), || {
        metric(&t, "xskgate_drops_total{reason=\"no_local_endpoints\"}") > before
    });

    // healthCheckNodePort: 200 with the count, 503 without local endpoints.
    let health = |port: u16| http_get(&t, "client", format!("http://{GW_CLIENT_SIDE}:{port}/")).expect("health answer");
    let (code, body) = health(32080);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"localEndpoints\": 1"), "{body}");
    let (code, body) = health(32082);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"localEndpoints\": 0"), "{body}");
    // pod-a not ready: 503, then ready again: 200.
    write_manifest(&dir, &services(false));
    wait_for("health 503 after pod-a became not ready", Duration::from_secs(5), || health(32080).0 == 503);
    write_manifest(&dir, &services(true));
    wait_for("health 200 after pod-a is ready again", Duration::from_secs(5), || health(32080).0 == 200);
    assert!(health(32080).1.contains("\"localEndpoints\": 1"));

    // The kernel still answers ping and ARP for the node's own address.
    let ping = Command::new("ip")
        .args(["netns", "exec", &t.ns_name("client"), "ping", "-c", "2", "-W", "1", GW_CLIENT_SIDE])
        .output()
        .expect("ping");
    assert!(ping.status.success(), "ping of the gateway: {}", String::from_utf8_lossy(&ping.stdout));
    t.exec("client", &["ip", "neigh", "flush", "dev", &t.if_name("c0")]);
    let ping = Command::new("ip")
        .args(["netns", "exec", &t.ns_name("client"), "ping", "-c", "1", "-W", "1", GW_CLIENT_SIDE])
        .output()
        .expect("ping");
    assert!(ping.status.success(), "ARP then ping after the neighbour cache was flushed");

    // SIGKILL: the BPF link closes with the process; nothing stays attached.
    let mut gw = gw;
    gw.signal_and_wait("KILL").unwrap();
    wait_for("no XDP program after kill -9", Duration::from_secs(3), || !xdp_attached(&t));

    // SIGTERM: a clean stop, exit status 0, program detached.
    let mut gw = start_daemon(&t, "gw", &args, dir.join("xskgate2.log"));
    assert!(xdp_attached(&t));
    let (pod, _) = who_http(&t, "http://198.18.100.10/").expect("serving again after a restart");
    assert_eq!(pod, "pod-a");
    let status = gw.signal_and_wait("TERM").unwrap();
    assert!(status.success(), "exit after SIGTERM: {status}\n{}", gw.log_text());
    assert!(gw.log_text().contains("stopped; XDP program detached"), "{}", gw.log_text());
    assert!(!xdp_attached(&t), "program left attached after SIGTERM");
}

#[test]
fn run_fails_clearly_for_a_missing_interface() {
    let mut t = Topology::new();
    t.add_ns("gw");
    let dir = tempdir(&t);
    write_manifest(&dir, &services(true));
    let out = Command::new("ip")
        .args(["netns", "exec", &t.ns_name("gw"), XSKGATE, "run", "--manifests", dir.to_str().unwrap()])
        .args(["--node-name", "gw1", "--interfaces", "nosuch0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("interface \"nosuch0\" does not exist"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Without privileges (uid nobody, no capabilities, via util-linux
/// `setpriv`): a plain error that names what is missing, exit code 1.
#[test]
fn run_fails_clearly_without_privileges() {
    let mut t = Topology::new();
    t.add_ns("gw");
    t.add_ns("peer");
    t.link("gw", "g0", "198.18.0.1/24", "peer", "p0", "198.18.0.2/24");
    let dir = tempdir(&t);
    write_manifest(&dir, &services(true));
    let out = Command::new("ip")
        .args(["netns", "exec", &t.ns_name("gw"), "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["--inh-caps=-all", XSKGATE, "run", "--manifests", dir.to_str().unwrap(), "--node-name", "gw1"])
        .args(["--interfaces", &t.if_name("g0"), "--healthz-bind-address", "127.0.0.1:20256"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("needs root"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let links = t.exec("gw", &["ip", "link", "show"]);
    assert!(!String::from_utf8_lossy(&links.stdout).contains(" xdp"), "nothing attached");
}

/// A manifest directory removed on drop.
struct TempDir(std::path::PathBuf);

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir(t: &Topology) -> TempDir {
    let dir = std::env::temp_dir().join(format!("{}-manifests", t.prefix()));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

/// IPv6 through the gateway: a LoadBalancer IPv6 address in both policies
/// (TCP with a real HTTP client): Local keeps the client's IPv6 address,
/// Cluster masquerades to the gateway's address on the pod's side.
#[test]
fn ipv6_loadbalancer_in_both_policies() {
    let mut t = Topology::new();
    for ns in ["client", "gw", "pa"] {
        t.add_ns(ns);
    }
    t.link("client", "c6", "2001:db8::100/64", "gw", "h0", "2001:db8::1/64");
    t.link("gw", "h1", "2001:db8:1::1/64", "pa", "a6", "2001:db8:1::10/64");
    t.forwarding("gw");
    t.route("client", "2001:db8:100::/64", "2001:db8::1");
    t.route("pa", "::/0", "2001:db8:1::1");
    t.echo_thread("pa", "pod-a", 8080);
    let dir = tempdir(&t);
    let svc = |name: &str, policy: &str, cip: &str, lb: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec:\n  type: LoadBalancer\n  clusterIP: {cip}\n  ipFamilies: [IPv6]\n  externalTrafficPolicy: {policy}\n\
             \x20 ports: [{{name: http, port: 80, protocol: TCP, targetPort: 8080}}]\n\
             status: {{loadBalancer: {{ingress: [{{ip: \"{lb}\"}}]}}}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv6\nports: [{{name: http, port: 8080, protocol: TCP}}]\n\
             endpoints: [{{addresses: [\"2001:db8:1::10\"], nodeName: gw1, conditions: {{ready: true}}}}]\n---\n"
        )
    };
    let text = svc("web6-local", "Local", "2001:db8:ffff::10", "2001:db8:100::10")
        + &svc("web6-cluster", "Cluster", "2001:db8:ffff::11", "2001:db8:100::11");
    write_manifest(&dir, &text);
    let interfaces = [t.if_name("h0"), t.if_name("h1")].join(",");
    let gw = start_daemon(
        &t,
        "gw",
        &["--manifests", dir.to_str().unwrap(), "--node-name", "gw1", "--interfaces", &interfaces],
        dir.join("xskgate.log"),
    );
    let (pod, seen) =
        who_http(&t, "http://[2001:db8:100::10]/").unwrap_or_else(|e| panic!("Local v6: {e}\n{}", gw.log_text()));
    assert_eq!((pod.as_str(), seen.as_str()), ("pod-a", "2001:db8::100"), "Local keeps the client's IPv6 address");
    let (pod, seen) = who_http(&t, "http://[2001:db8:100::11]/").unwrap_or_else(|e| panic!("Cluster v6: {e}"));
    assert_eq!((pod.as_str(), seen.as_str()), ("pod-a", "2001:db8:1::1"), "Cluster masquerades to the egress address");
}
