//! The reference topology of seeds 003 and 004, with two real gateways
//! running `xskgate run`:
//!
//! ```text
//!             c1 198.18.1.100 ── 198.18.1.1 gw1 ── 198.19.1.1 ── pod-a 198.19.1.10
//!   client                         │ 198.18.3.1
//!                                  │ 198.18.3.2
//!             c2 198.18.2.100 ── 198.18.2.1 gw2 ── 198.19.2.1 ── pod-b 198.19.2.10
//!                                               ── 198.19.3.1 ── pod-c 198.19.3.10
//! ```
//!
//! Every link is dual-stack: each IPv4 address `198.X.Y.Z` has the IPv6
//! address `2001:db8:X:Y::Z` beside it ([`v6_of`]), so pod-a is also
//! 2001:db8:19:1::10 and gw1 also 2001:db8:18:1::1. Both gateways are
//! reachable from the client; each routes to the other's pods over the link
//! between them. The Services (all in `default`, all dual-stack, IPv4
//! first, with an IPv4 and an IPv6 EndpointSlice each):
//! - `whoami-local`: LoadBalancer 198.18.100.10 and 2001:db8:18:100::10,
//!   NodePort 30080 (TCP 80, UDP 53), `externalTrafficPolicy: Local`,
//!   healthCheckNodePort 32080, `ipFamilyPolicy: PreferDualStack`;
//! - `whoami-cluster`: LoadBalancer 198.18.100.11 and 2001:db8:18:100::11,
//!   NodePort 30081, Cluster, `RequireDualStack`;
//! - `whoami-none`: LoadBalancer 198.18.100.12 and 2001:db8:18:100::12,
//!   NodePort 30082, no endpoints;
//! - `whoami-dsr`: LoadBalancer 198.18.100.13 and 2001:db8:18:100::13, port
//!   8080 (TCP and UDP, the pods' own port), Cluster, annotated
//!   `xskgate.io/lb-mode: dsr`: each pod holds both VIPs and takes the
//!   encapsulated packets ([`crate::dsr::Decapsulator`]), and replies to the
//!   client straight through its node's kernel (the gateways route each
//!   other's client links for that).
//!
//! The client reaches a LoadBalancer IP through one gateway at a time, in
//! both families ([`Reference::via`]); NodePorts are reached on each
//! gateway's address of either family.
//! Endpoint conditions are changed by rewriting the manifest directory that
//! both gateways watch ([`Reference::set_pods`]).

use crate::{Daemon, DaemonError, Topology};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const LB_LOCAL: &str = "198.18.100.10";
pub const LB_CLUSTER: &str = "198.18.100.11";
pub const LB_NONE: &str = "198.18.100.12";
pub const LB_DSR: &str = "198.18.100.13";
pub const NODEPORT_LOCAL: u16 = 30080;
pub const NODEPORT_CLUSTER: u16 = 30081;
pub const NODEPORT_NONE: u16 = 30082;
pub const HEALTH_PORT: u16 = 32080;
pub const POD_PORT: u16 = 8080;

/// An IP family of the dual-stack topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::Ipv4, Family::Ipv6];

    /// `ipv4` or `ipv6` (the lab's JSON).
    pub fn name(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        }
    }

    /// An address of the topology (written as its IPv4 form) in this family.
    pub fn of(self, v4: &str) -> String {
        match self {
            Family::Ipv4 => v4.to_string(),
            Family::Ipv6 => v6_of(v4),
        }
    }

    /// `addr:port`, bracketed for IPv6 (for URLs and `SocketAddr`).
    pub fn host_port(self, v4: &str, port: u16) -> String {
        match self {
            Family::Ipv4 => format!("{v4}:{port}"),
            Family::Ipv6 => format!("[{}]:{port}", v6_of(v4)),
        }
    }
}

/// A veth pair (as [`Topology::link`]) with the IPv6 twin ([`v6_of`]) of
/// each end's IPv4 address beside it.
pub fn dual_stack_link(t: &mut Topology, (a, a_if, a_addr, b, b_if, b_addr): (&str, &str, &str, &str, &str, &str)) {
    t.link(a, a_if, a_addr, b, b_if, b_addr);
    t.add_address(a, a_if, &v6_of(a_addr));
    t.add_address(b, b_if, &v6_of(b_addr));
}

/// A route in namespace `ns` (`0.0.0.0/0` for the default) and its IPv6 twin.
pub fn dual_stack_route(t: &Topology, ns: &str, dst: &str, via: &str) {
    t.route(ns, dst, via);
    let dst6 = if dst == "0.0.0.0/0" { "::/0".to_string() } else { v6_of(dst) };
    t.route(ns, &dst6, &v6_of(via));
}

/// The IPv6 twin of one of the topology's IPv4 addresses or prefixes:
/// `198.X.Y.Z` → `2001:db8:X:Y::Z` (the octets' decimal digits read as
/// hex groups), `/24` → `/64`, `/16` → `/48`.
pub fn v6_of(v4: &str) -> String {
    let (addr, len) = match v4.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (v4, None),
    };
    let o: Vec<&str> = addr.split('.').collect();
    assert!(o.len() == 4 && o[0] == "198", "{v4} is not one of the topology's addresses");
    let host = match (o[2], o[3]) {
        ("0", "0") => format!("2001:db8:{}::", o[1]),
        (y, "0") => format!("2001:db8:{}:{y}::", o[1]),
        ("0", z) => format!("2001:db8:{}::{z}", o[1]),
        (y, z) => format!("2001:db8:{}:{y}::{z}", o[1]),
    };
    match len {
        Some("24") => format!("{host}/64"),
        Some("16") => format!("{host}/48"),
        Some(l) => panic!("no IPv6 twin for prefix length {l} ({v4})"),
        None => host,
    }
}

/// One of the two gateways.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Gw {
    Gw1,
    Gw2,
}

impl Gw {
    pub const BOTH: [Gw; 2] = [Gw::Gw1, Gw::Gw2];

    pub fn name(self) -> &'static str {
        match self {
            Gw::Gw1 => "gw1",
            Gw::Gw2 => "gw2",
        }
    }

    /// The gateway's address on the client's side (where NodePorts and the
    /// health check are reached).
    pub fn address(self) -> &'static str {
        match self {
            Gw::Gw1 => "198.18.1.1",
            Gw::Gw2 => "198.18.2.1",
        }
    }

    /// The client's address on its link to this gateway.
    pub fn client_address(self) -> &'static str {
        match self {
            Gw::Gw1 => "198.18.1.100",
            Gw::Gw2 => "198.18.2.100",
        }
    }

    /// Addresses of this gateway a masqueraded flow may carry.
    pub fn addresses(self) -> &'static [&'static str] {
        match self {
            Gw::Gw1 => &["198.18.1.1", "198.18.3.1", "198.19.1.1"],
            Gw::Gw2 => &["198.18.2.1", "198.18.3.2", "198.19.2.1", "198.19.3.1"],
        }
    }

    /// [`Gw::address`] in `family`.
    pub fn address_in(self, family: Family) -> String {
        family.of(self.address())
    }

    /// [`Gw::client_address`] in `family`.
    pub fn client_address_in(self, family: Family) -> String {
        family.of(self.client_address())
    }

    /// [`Gw::addresses`] in `family`.
    pub fn addresses_in(self, family: Family) -> Vec<String> {
        self.addresses().iter().map(|a| family.of(a)).collect()
    }
}

/// A pod of the whoami Deployment and its endpoint's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodState {
    Ready,
    NotReady,
    /// Terminating: not ready, still serving.
    Terminating,
    /// Gone from the EndpointSlices.
    Deleted,
}

/// The topology's namespaces (short names).
pub const NAMESPACES: [&str; 6] = ["client", "gw1", "gw2", "pa", "pb", "pc"];

/// (pod name, address, node).
pub const PODS: [(&str, &str, &str); 3] =
    [("pod-a", "198.19.1.10", "gw1"), ("pod-b", "198.19.2.10", "gw2"), ("pod-c", "198.19.3.10", "gw2")];

/// The manifests for the given pod states. An odd `churn` gives
/// `whoami-none` one endpoint (pod-z, 198.19.9.9, on gw2): a published table
/// update that leaves the whoami Services' endpoints in place.
pub fn manifests(pods: &BTreeMap<&str, PodState>, churn: u64) -> String {
    let mut out = String::from(
        r#"apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Node, metadata: {name: gw1, labels: {kubernetes.io/hostname: gw1}}, status: {addresses: [{type: InternalIP, address: 198.18.1.1}, {type: InternalIP, address: "2001:db8:18:1::1"}]}}
- {apiVersion: v1, kind: Node, metadata: {name: gw2, labels: {kubernetes.io/hostname: gw2}}, status: {addresses: [{type: InternalIP, address: 198.18.2.1}, {type: InternalIP, address: "2001:db8:18:2::1"}]}}
"#,
    );
    let services = [
        ("whoami-local", LB_LOCAL, "Local", NODEPORT_LOCAL, 30053, "198.19.128.10", true, "PreferDualStack"),
        ("whoami-cluster", LB_CLUSTER, "Cluster", NODEPORT_CLUSTER, 30054, "198.19.128.11", true, "RequireDualStack"),
        ("whoami-none", LB_NONE, "Cluster", NODEPORT_NONE, 30055, "198.19.128.12", false, "PreferDualStack"),
        ("whoami-dsr", LB_DSR, "Cluster", 30083, 30056, "198.19.128.13", true, "RequireDualStack"),
    ];
    for (name, lb, policy, np, np_udp, cip, has_pods, family_policy) in services {
        let (lb6, cip6) = (v6_of(lb), v6_of(cip));
        // The DSR Service is on the pods' own port: they answer from the VIP.
        let (port_http, port_dns, annotations) = if name == "whoami-dsr" {
            (POD_PORT, POD_PORT, "\n    annotations: {xskgate.io/lb-mode: dsr}")
        } else {
            (80, 53, "")
        };
        let hc = if policy == "Local" { format!("\n    healthCheckNodePort: {HEALTH_PORT}") } else { String::new() };
        out.push_str(&format!(
            r#"- apiVersion: v1
  kind: Service
  metadata:
    name: {name}
    namespace: default{annotations}
  spec:
    type: LoadBalancer
    clusterIP: {cip}
    clusterIPs: [{cip}, "{cip6}"]
    ipFamilyPolicy: {family_policy}
    ipFamilies: [IPv4, IPv6]
    externalTrafficPolicy: {policy}{hc}
    ports:
    - {{name: http, port: {port_http}, protocol: TCP, targetPort: {POD_PORT}, nodePort: {np}}}
    - {{name: dns, port: {port_dns}, protocol: UDP, targetPort: {POD_PORT}, nodePort: {np_udp}}}
  status: {{loadBalancer: {{ingress: [{{ip: {lb}}}, {{ip: "{lb6}"}}]}}}}
"#
        ));
        for family in Family::BOTH {
            let mut endpoints = String::new();
            if !has_pods {
                // pod-z is IPv4 only: the churn changes one slice.
                if churn % 2 == 1 && family == Family::Ipv4 {
                    endpoints.push_str("\n  - {addresses: [198.19.9.9], nodeName: gw2, conditions: {ready: true}}");
                } else {
                    continue;
                }
            }
            for (pod, addr, node) in PODS.into_iter().filter(|_| has_pods) {
                let (ready, serving, terminating) = match pods.get(pod).copied().unwrap_or(PodState::Ready) {
                    PodState::Ready => (true, true, false),
                    PodState::NotReady => (false, false, false),
                    PodState::Terminating => (false, true, true),
                    PodState::Deleted => continue,
                };
                let addr = family.of(addr);
                endpoints.push_str(&format!(
                    "\n  - {{addresses: [\"{addr}\"], nodeName: {node}, targetRef: {{kind: Pod, name: {pod}}}, conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}}}"
                ));
            }
            if endpoints.is_empty() {
                endpoints.push_str(" []");
            }
            let (suffix, address_type) = match family {
                Family::Ipv4 => ("1", "IPv4"),
                Family::Ipv6 => ("v6", "IPv6"),
            };
            out.push_str(&format!(
                r#"- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {{name: {name}-{suffix}, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
  addressType: {address_type}
  ports: [{{name: http, port: {POD_PORT}, protocol: TCP}}, {{name: dns, port: {POD_PORT}, protocol: UDP}}]
  endpoints:{endpoints}
"#
            ));
        }
    }
    out
}

/// One gateway's `xskgate run`, stopped on drop.
pub struct Gateway {
    pub gw: Gw,
    pub daemon: Daemon,
}

/// Why the reference topology could not be brought up.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("cannot create {}: {source}", path.display())]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("{gw}: {source}")]
    Gateway { gw: &'static str, source: DaemonError },
}

/// The running reference topology. Everything goes away on drop.
pub struct Reference {
    pub gateways: Vec<Gateway>,
    /// The pods' DSR receivers (pod-a, pod-b, pod-c).
    pub decapsulators: Vec<crate::dsr::Decapsulator>,
    pods: BTreeMap<&'static str, PodState>,
    churn: u64,
    dir: PathBuf,
    // Declared last: dropped after the gateways stopped.
    pub topo: Topology,
}

impl Reference {
    /// Builds the topology, starts the pods' echo servers and both gateways
    /// (the `xskgate` binary at `xskgate`), and waits until both serve.
    ///
    /// # Errors
    /// A gateway that does not start (its log is in the error).
    pub fn start(xskgate: &Path) -> Result<Reference, ReferenceError> {
        let mut t = Topology::new();
        for ns in NAMESPACES {
            t.add_ns(ns);
        }
        let links = [
            ("client", "c1", "198.18.1.100/24", "gw1", "g1c", "198.18.1.1/24"),
            ("client", "c2", "198.18.2.100/24", "gw2", "g2c", "198.18.2.1/24"),
            ("gw1", "g1x", "198.18.3.1/24", "gw2", "g2x", "198.18.3.2/24"),
            ("gw1", "g1a", "198.19.1.1/24", "pa", "a0", "198.19.1.10/24"),
            ("gw2", "g2b", "198.19.2.1/24", "pb", "b0", "198.19.2.10/24"),
            ("gw2", "g2p", "198.19.3.1/24", "pc", "c0", "198.19.3.10/24"),
        ];
        for link in links {
            dual_stack_link(&mut t, link);
        }
        for gw in ["gw1", "gw2"] {
            t.forwarding(gw);
        }
        let mut routes = vec![
            ("gw1", "198.19.2.0/24", "198.18.3.2"),
            ("gw1", "198.19.3.0/24", "198.18.3.2"),
            ("gw2", "198.19.1.0/24", "198.18.3.1"),
            // Direct server return: a pod's reply reaches the client by its
            // own node, whichever gateway the client sent through.
            ("gw1", "198.18.2.0/24", "198.18.3.2"),
            ("gw2", "198.18.1.0/24", "198.18.3.1"),
            ("pa", "0.0.0.0/0", "198.19.1.1"),
            ("pb", "0.0.0.0/0", "198.19.2.1"),
            ("pc", "0.0.0.0/0", "198.19.3.1"),
        ];
        routes.push(("client", "198.18.100.0/24", Gw::Gw1.address()));
        for (ns, dst, via) in routes {
            dual_stack_route(&t, ns, dst, via);
        }
        let dsr_vips = [LB_DSR.to_string(), v6_of(LB_DSR)];
        let dsr_vips: Vec<&str> = dsr_vips.iter().map(String::as_str).collect();
        let mut decapsulators = Vec::new();
        for (ns, (pod, _, _)) in ["pa", "pb", "pc"].into_iter().zip(PODS) {
            t.echo_thread(ns, pod, POD_PORT);
            decapsulators.push(crate::dsr::Decapsulator::start(&t, ns, &dsr_vips));
        }
        let dir = std::env::temp_dir().join(format!("{}-manifests", t.prefix()));
        std::fs::create_dir_all(&dir).map_err(|source| ReferenceError::Dir { path: dir.clone(), source })?;
        let mut r = Reference { gateways: Vec::new(), decapsulators, pods: BTreeMap::new(), churn: 0, dir, topo: t };
        r.write();
        for gw in Gw::BOTH {
            let interfaces = match gw {
                Gw::Gw1 => ["g1c", "g1x", "g1a"].map(|i| r.topo.if_name(i)).join(","),
                Gw::Gw2 => ["g2c", "g2x", "g2b", "g2p"].map(|i| r.topo.if_name(i)).join(","),
            };
            let log = r.dir.join(format!("{}.log", gw.name()));
            let args = [
                "--manifests",
                &r.dir.to_string_lossy(),
                "--node-name",
                gw.name(),
                "--interfaces",
                &interfaces,
                "--cluster-cidr",
                "198.19.0.0/16,2001:db8:19::/48",
                "--poll-ms",
                "50",
            ];
            let daemon = Daemon::start(xskgate, &r.topo.ns_name(gw.name()), &args, &log, Duration::from_secs(30))
                .map_err(|e| ReferenceError::Gateway { gw: gw.name(), source: e })?;
            r.gateways.push(Gateway { gw, daemon });
        }
        Ok(r)
    }

    fn write(&mut self) {
        let tmp = self.dir.join(".whoami.yaml.tmp");
        std::fs::write(&tmp, manifests(&self.pods, self.churn)).expect("write manifests");
        std::fs::rename(&tmp, self.dir.join("whoami.yaml")).expect("rename manifests");
    }

    /// Sets a pod's endpoint state (in both Services' EndpointSlices).
    pub fn set_pod(&mut self, pod: &'static str, state: PodState) {
        self.pods.insert(pod, state);
        self.write();
    }

    /// A table update that changes nothing the data path uses.
    pub fn churn(&mut self) {
        self.churn += 1;
        self.write();
    }

    /// Routes the client's traffic to the LoadBalancer IPs (of both
    /// families) through `gw`.
    pub fn via(&self, gw: Gw) {
        self.topo.exec("client", &["ip", "route", "replace", "198.18.100.0/24", "via", gw.address()]);
        let (lbs, via) = (v6_of("198.18.100.0/24"), gw.address_in(Family::Ipv6));
        self.topo.exec("client", &["ip", "-6", "route", "replace", &lbs, "via", &via]);
    }

    /// The gateway's metrics text.
    pub fn metrics(&self, gw: Gw) -> String {
        http_get(&self.topo.ns_name(gw.name()), "http://127.0.0.1:10249/metrics".into())
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// One sample of a gateway's metrics (0 when absent).
    pub fn metric(&self, gw: Gw, sample: &str) -> u64 {
        self.metrics(gw)
            .lines()
            .find(|l| l.starts_with(sample) && l[sample.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    }

    /// The health check of `whoami-local` on `gw`, from the client over
    /// IPv4: (status, localEndpoints).
    pub fn health(&self, gw: Gw) -> Result<(u16, u64), String> {
        self.health_in(gw, Family::Ipv4)
    }

    /// The health check of `whoami-local` on `gw`'s address of `family`,
    /// from the client: (status, localEndpoints of that family).
    pub fn health_in(&self, gw: Gw, family: Family) -> Result<(u16, u64), String> {
        let url = format!("http://{}/", family.host_port(gw.address(), HEALTH_PORT));
        let (status, body) = http_get(&self.topo.ns_name("client"), url)?;
        let n = body
            .split("\"localEndpoints\": ")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("health body {body:?}"))?;
        Ok((status, n))
    }
}

impl Drop for Reference {
    fn drop(&mut self) {
        self.gateways.clear();
        self.decapsulators.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An HTTP GET with a real client (ureq), from inside namespace `ns`.
///
/// # Errors
/// No answer within 2 s (or any transport error).
pub fn http_get(ns: &str, url: String) -> Result<(u16, String), String> {
    crate::in_ns(ns, move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(2)))
            .http_status_as_error(false)
            .build()
            .into();
        let mut resp = agent.get(&url).call().map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp.body_mut().read_to_string().map_err(|e| e.to_string())?;
        Ok((status, body))
    })
}

/// Flows from the client to `to`, each a new UDP socket (a new flow):
/// answers per pod, the source addresses the pods saw, and how many went
/// unanswered.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tally {
    pub per_pod: BTreeMap<String, usize>,
    pub sources: BTreeMap<String, usize>,
    pub unanswered: usize,
}

impl Tally {
    pub fn answered(&self) -> usize {
        self.per_pod.values().sum()
    }

    /// Each pod's share of the answered flows.
    pub fn shares(&self) -> BTreeMap<String, f64> {
        let n = self.answered().max(1) as f64;
        self.per_pod.iter().map(|(p, c)| (p.clone(), *c as f64 / n)).collect()
    }

    /// Adds another tally's flows to this one's.
    pub fn merge(&mut self, o: &Tally) {
        for (pod, n) in &o.per_pod {
            *self.per_pod.entry(pod.clone()).or_default() += n;
        }
        for (source, n) in &o.sources {
            *self.sources.entry(source.clone()).or_default() += n;
        }
        self.unanswered += o.unanswered;
    }
}

/// Sends `flows` UDP flows from namespace `ns` to `to`, 64 in flight at a
/// time; each group of 64 waits at most `timeout` for its answers.
pub fn udp_flows(ns: &str, to: SocketAddr, flows: usize, timeout: Duration) -> Tally {
    crate::in_ns(ns, move || {
        let mut tally = Tally::default();
        for chunk in 0..flows.div_ceil(64) {
            let n = (flows - chunk * 64).min(64);
            let socks: Vec<_> = (0..n)
                .filter_map(|_| {
                    let any: SocketAddr = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().expect("literal");
                    let s = std::net::UdpSocket::bind(any).ok()?;
                    s.connect(to).ok()?;
                    s.send(b"who").ok()?;
                    Some(s)
                })
                .collect();
            tally.unanswered += n - socks.len();
            let deadline = Instant::now() + timeout;
            for s in socks {
                let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
                let _ = s.set_read_timeout(Some(left));
                let mut buf = [0u8; 256];
                match s.recv(&mut buf) {
                    Ok(len) => {
                        let line = String::from_utf8_lossy(&buf[..len]);
                        let mut it = line.trim().split(' ');
                        let pod = it.next().unwrap_or("?").to_string();
                        let src = it
                            .next()
                            .and_then(|p| p.parse::<SocketAddr>().ok())
                            .map_or_else(|| "?".into(), |a| a.ip().to_string());
                        *tally.per_pod.entry(pod).or_default() += 1;
                        *tally.sources.entry(src).or_default() += 1;
                    }
                    Err(_) => tally.unanswered += 1,
                }
            }
        }
        tally
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_twins_keep_the_octets_as_groups() {
        assert_eq!(v6_of("198.19.1.10"), "2001:db8:19:1::10");
        assert_eq!(v6_of("198.18.100.0/24"), "2001:db8:18:100::/64");
        assert_eq!(v6_of("198.19.0.0/16"), "2001:db8:19::/48");
        assert_eq!(v6_of("198.18.0.1"), "2001:db8:18::1");
        for a in ["198.19.1.10", "198.18.100.0/24", "198.19.0.0/16", "198.18.0.1"] {
            let v6 = v6_of(a);
            let addr = v6.split('/').next().unwrap();
            assert!(addr.parse::<std::net::Ipv6Addr>().is_ok(), "{v6}");
        }
        assert_eq!(Family::Ipv6.host_port(LB_LOCAL, 80), "[2001:db8:18:100::10]:80");
        assert_eq!(Family::Ipv4.host_port(LB_LOCAL, 80), "198.18.100.10:80");
    }
}
