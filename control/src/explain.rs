//! `xskgate explain`: one packet through the real pipeline, every decision
//! printed.
//!
//! The packet (`PROTO SRC[:PORT] > DST[:PORT] [flags=…]`) becomes a real
//! Ethernet frame, which [`process_batch_traced`] runs against the service
//! table that `xskgate run` would publish for the manifests, with a
//! [`Recorder`]: the stages and their decisions are the pipeline's own, not a
//! second implementation. The control plane's translation adds what the
//! fast path does not keep: each endpoint of the Service port, and why it is
//! in or out of the set the policy uses.
//!
//! Against a running gateway (`--gateway`, answered by [`crate::admin`]) the
//! table is the live one, and a conntrack entry the packet belongs to is
//! copied into the scratch table first, so the trace is the tracked
//! path the real packet would take; the live tables are never written.

use crate::object::Key;
use crate::publish::Publisher;
use crate::state::ClusterState;
use crate::translate::{EndpointInfo, NodeIdentity, PortEntry, collect_endpoints, endpoint_string};
use serde::Serialize;
use std::net::IpAddr;
use std::sync::Arc;
use xskgate_conntrack::{Addr, Config, Dir, FlowKey, FlowTable, NewFlow};
use xskgate_fastpath::trace::{Recorder, Step};
use xskgate_fastpath::{
    AffinityTable, Frame, FrontendKind, MasqueradeRule, NodeConfig, ServiceTable, ServiceTableHandle, Tables,
    TrafficPolicy, Verdict, WorkerState, process_batch_traced,
};

/// The syntax `--packet` takes.
pub const SYNTAX: &str = "PROTO SRC[:PORT] > DST[:PORT] [flags=S|SA|A|F|R|P…], PROTO one of tcp, udp, icmp, icmp6; \
                          IPv6 with a port in brackets: [2001:db8::1]:80";

/// The source port when the packet names none.
pub const DEFAULT_SOURCE_PORT: u16 = 40_000;

/// A packet to explain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketSpec {
    pub proto: PacketProto,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    /// TCP flags (default SYN).
    pub tcp_flags: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketProto {
    Tcp,
    Udp,
    /// An echo request (ICMP or ICMPv6 by the addresses' family).
    Echo,
}

/// Why `--packet` is not a packet; each names the field that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("--packet {text:?}: expected `PROTO SRC > DST`, got {got} words (syntax: {SYNTAX})")]
    Shape { text: String, got: usize },
    #[error("--packet: protocol {0:?} is not tcp, udp, icmp or icmp6 (syntax: {SYNTAX})")]
    Proto(String),
    #[error("--packet: {field} {value:?} is not an address[:port] (syntax: {SYNTAX})")]
    Address { field: &'static str, value: String },
    #[error("--packet: {field} port {value:?} is not a port 1-65535")]
    Port { field: &'static str, value: String },
    #[error("--packet: the destination needs a port for {0}")]
    NoPort(&'static str),
    #[error("--packet: source and destination are of different families")]
    Family,
    #[error("--packet: {0}")]
    Flags(String),
}

fn address(field: &'static str, s: &str) -> Result<(IpAddr, Option<u16>), PacketError> {
    let bad = || PacketError::Address { field, value: s.to_string() };
    let port = |p: &str| match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(PacketError::Port { field, value: p.to_string() }),
        Ok(n) => Ok(Some(n)),
    };
    if let Some(rest) = s.strip_prefix('[') {
        let (ip, tail) = rest.split_once(']').ok_or_else(bad)?;
        let ip: IpAddr = ip.parse().map_err(|_| bad())?;
        return match tail.strip_prefix(':') {
            Some(p) => Ok((ip, port(p)?)),
            None if tail.is_empty() => Ok((ip, None)),
            None => Err(bad()),
        };
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok((ip, None));
    }
    let (ip, p) = s.rsplit_once(':').ok_or_else(bad)?;
    let ip: std::net::Ipv4Addr = ip.parse().map_err(|_| bad())?;
    Ok((IpAddr::V4(ip), port(p)?))
}

fn flags(s: &str) -> Result<u8, PacketError> {
    let mut f = 0u8;
    for c in s.chars() {
        f |= match c.to_ascii_uppercase() {
            'F' => 0x01,
            'S' => 0x02,
            'R' => 0x04,
            'P' => 0x08,
            'A' => 0x10,
            other => return Err(PacketError::Flags(format!("flag {other:?} is not one of S, A, F, R, P"))),
        };
    }
    if f == 0 {
        return Err(PacketError::Flags("flags= names no flag".into()));
    }
    Ok(f)
}

impl std::str::FromStr for PacketSpec {
    type Err = PacketError;

    fn from_str(text: &str) -> Result<PacketSpec, PacketError> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let (proto, src, dst, rest) = match words.as_slice() {
            [proto, src, ">", dst, rest @ ..] if rest.len() <= 1 => (*proto, *src, *dst, rest),
            _ => return Err(PacketError::Shape { text: text.to_string(), got: words.len() }),
        };
        let proto = match proto.to_ascii_lowercase().as_str() {
            "tcp" => PacketProto::Tcp,
            "udp" => PacketProto::Udp,
            "icmp" | "icmp6" => PacketProto::Echo,
            _ => return Err(PacketError::Proto(proto.to_string())),
        };
        let (src, sport) = address("source", src)?;
        let (dst, dport) = address("destination", dst)?;
        if src.is_ipv4() != dst.is_ipv4() {
            return Err(PacketError::Family);
        }
        let tcp_flags = match rest.first() {
            Some(f) => match f.strip_prefix("flags=") {
                Some(f) if proto == PacketProto::Tcp => flags(f)?,
                Some(_) => return Err(PacketError::Flags("flags= is for tcp only".into())),
                None => return Err(PacketError::Shape { text: text.to_string(), got: words.len() }),
            },
            None if proto == PacketProto::Tcp => 0x02,
            None => 0,
        };
        let dport = match (proto, dport) {
            (PacketProto::Echo, _) => 0,
            (_, Some(p)) => p,
            (PacketProto::Tcp, None) => return Err(PacketError::NoPort("tcp")),
            (PacketProto::Udp, None) => return Err(PacketError::NoPort("udp")),
        };
        let sport = if proto == PacketProto::Echo { 0 } else { sport.unwrap_or(DEFAULT_SOURCE_PORT) };
        Ok(PacketSpec { proto, src, sport, dst, dport, tcp_flags })
    }
}

impl PacketSpec {
    /// The packet as an Ethernet frame (TTL 64, no payload).
    pub fn frame(&self) -> Vec<u8> {
        let eth = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let ip = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
            (s, d) => eth.ipv6(to_v6(s).octets(), to_v6(d).octets(), 64),
        };
        let mut out = Vec::new();
        let written = match self.proto {
            PacketProto::Udp => ip.udp(self.sport, self.dport).write(&mut out, &[]),
            PacketProto::Echo if self.src.is_ipv4() => ip.icmpv4_echo_request(1, 1).write(&mut out, &[]),
            PacketProto::Echo => ip.icmpv6_echo_request(1, 1).write(&mut out, &[]),
            PacketProto::Tcp => {
                let mut tcp = ip.tcp(self.sport, self.dport, 1, 64_240);
                let f = self.tcp_flags;
                if f & 0x01 != 0 {
                    tcp = tcp.fin();
                }
                if f & 0x02 != 0 {
                    tcp = tcp.syn();
                }
                if f & 0x04 != 0 {
                    tcp = tcp.rst();
                }
                if f & 0x08 != 0 {
                    tcp = tcp.psh();
                }
                if f & 0x10 != 0 {
                    tcp = tcp.ack(1);
                }
                tcp.write(&mut out, &[])
            }
        };
        written.expect("a Vec takes any frame");
        out
    }
}

fn to_v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V6(v6) => v6,
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
    }
}

/// Who the gateway is, for a table built from manifests.
#[derive(Clone, Debug, Default)]
pub struct Gateway {
    pub node: NodeIdentity,
    /// The node's addresses (NodePorts answer on them); the first of a
    /// family is its SNAT address unless `snat` names one.
    pub addresses: Vec<IpAddr>,
    pub pod_cidrs: Vec<xskgate_fastpath::Cidr>,
    pub snat: Vec<IpAddr>,
    pub vip_echo: xskgate_fastpath::VipEcho,
}

/// One endpoint of the Service port, in or out of the set the policy uses.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct EndpointRow {
    pub address: String,
    pub node: Option<String>,
    pub usable: bool,
    pub why: String,
}

/// One stage's line.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StepRow {
    pub stage: &'static str,
    pub decision: String,
    pub why: String,
}

/// Everything `explain` says about one packet (the `--json` object).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Explanation {
    pub packet: String,
    /// `forward`, `drop`, `pass` or `reply`.
    pub verdict: &'static str,
    /// The drop reason's metric name.
    pub reason: Option<&'static str>,
    /// `namespace/name:port`.
    pub service: Option<String>,
    /// `Cluster` or `Local`.
    pub policy: Option<&'static str>,
    /// `external` or `internal`.
    pub traffic: Option<&'static str>,
    pub endpoints: Vec<EndpointRow>,
    /// The chosen `ip:port`.
    pub endpoint: Option<String>,
    pub snat: bool,
    /// The tuple after the rewrite.
    pub translated: Option<Translated>,
    /// The live conntrack entry the packet belongs to (`--gateway` only).
    pub conntrack: Option<ConntrackMatch>,
    pub steps: Vec<StepRow>,
}

/// A live conntrack entry the packet belongs to.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ConntrackMatch {
    /// `original` (client → Service) or `reply` (endpoint → client).
    pub direction: &'static str,
    pub state: &'static str,
    /// Seconds since either direction was last seen.
    pub idle_seconds: u32,
    pub original: String,
    pub reply: String,
    /// What a packet of this direction is rewritten to.
    pub rewrite: String,
}

/// The live tables of a running gateway that `explain` reads besides the
/// service table.
pub struct Live<'a> {
    pub conntrack: &'a FlowTable,
    /// The conntrack clock now (whole seconds since the daemon started).
    pub now: u32,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Translated {
    pub src: String,
    pub dst: String,
}

fn tuple(k: &FlowKey) -> String {
    let (src, dst) = (k.src.to_ip(), k.dst.to_ip());
    format!(
        "{} {} > {}",
        k.proto.name().to_ascii_lowercase(),
        endpoint_string(src, k.sport),
        endpoint_string(dst, k.dport)
    )
}

/// The service table `xskgate run` would publish for `state` on `gw`.
pub fn table(state: &ClusterState, gw: &Gateway) -> (Arc<ServiceTable>, Vec<PortEntry>) {
    let family = |v4: bool| -> Option<Addr> {
        gw.snat.iter().chain(&gw.addresses).find(|a| a.is_ipv4() == v4).map(|a| Addr::from(*a))
    };
    let node = NodeConfig {
        addresses: gw.addresses.iter().map(|a| Addr::from(*a)).collect(),
        pod_cidrs: gw.pod_cidrs.clone(),
        snat_v4: family(true),
        snat_v6: family(false),
        snat_ports: (1024, 29_999),
        snat_routes: Vec::new(),
        vip_echo: gw.vip_echo,
    };
    let handle = Arc::new(ServiceTableHandle::new(ServiceTable::default()));
    let mut publisher = Publisher::new(handle.clone(), None, node);
    publisher.full_sync(state, &gw.node);
    let entries = publisher.entries().cloned().collect();
    (handle.load_full(), entries)
}

/// Why an endpoint is in or out of the set `policy` uses on node `ours`.
fn endpoint_row(
    e: &EndpointInfo,
    set: Option<&Vec<EndpointInfo>>,
    policy: TrafficPolicy,
    ours: &NodeIdentity,
) -> EndpointRow {
    let usable = set.is_some_and(|s| s.iter().any(|x| x.ip == e.ip && x.port == e.port));
    let node = e.node_name.clone();
    let on_other_node = policy == TrafficPolicy::Local && node.as_deref() != Some(ours.name.as_str());
    let why = if usable && !e.ready {
        "serving and terminating (no ready endpoint: the fallback)".to_string()
    } else if usable && policy == TrafficPolicy::Local {
        "ready, on this node".to_string()
    } else if usable {
        "ready".to_string()
    } else if on_other_node {
        format!("on node {}, not this node ({})", node.as_deref().unwrap_or("(none)"), ours.name)
    } else if !(e.ready || e.serving && e.terminating) {
        "not ready".to_string()
    } else if !e.ready {
        "terminating (ready endpoints exist)".to_string()
    } else if !e.zone_hints.is_empty() || !e.node_hints.is_empty() {
        let hints: Vec<&str> = e.zone_hints.iter().chain(&e.node_hints).map(String::as_str).collect();
        format!("topology hint for {}, not ours ({})", hints.join(","), ours.zone.as_deref().unwrap_or("no zone"))
    } else {
        "not in the set".to_string()
    };
    EndpointRow { address: e.display(), node, usable, why }
}

/// Stands in for the packet of a frame that is not TCP, UDP or an echo
/// request (the stages that read it never run for such a frame).
const NOT_A_FLOW: PacketSpec = PacketSpec {
    proto: PacketProto::Udp,
    src: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    sport: 0,
    dst: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    dport: 0,
    tcp_flags: 0,
};

impl PacketSpec {
    /// The packet a frame carries, as the pipeline parses it: `None` for
    /// a frame that is not TCP, UDP or an echo request (or not parsable).
    pub fn of_frame(frame: &[u8]) -> Option<PacketSpec> {
        use xskgate_fastpath::wire::{self, L4};
        let p = wire::parse(frame).ok()?;
        let proto = match p.l4_kind {
            L4::Tcp => PacketProto::Tcp,
            L4::Udp => PacketProto::Udp,
            L4::EchoRequest => PacketProto::Echo,
            L4::IcmpError | L4::Other => return None,
        };
        Some(PacketSpec {
            proto,
            src: p.src.to_ip(),
            sport: p.sport,
            dst: p.dst.to_ip(),
            dport: p.dport,
            tcp_flags: p.tcp_flags,
        })
    }

    /// The flow key the pipeline parses from the frame (`None` for echo).
    pub fn key(&self) -> Option<FlowKey> {
        let proto = match self.proto {
            PacketProto::Tcp => xskgate_conntrack::Proto::TCP,
            PacketProto::Udp => xskgate_conntrack::Proto::UDP,
            PacketProto::Echo => return None,
        };
        Some(FlowKey {
            proto,
            src: Addr::from(self.src),
            sport: self.sport,
            dst: Addr::from(self.dst),
            dport: self.dport,
        })
    }
}

/// Runs `packet` through the pipeline against `table` on the node `node`
/// and explains it; with `live`, the packet's live conntrack entry (if
/// any) is copied into the scratch table first.
pub fn explain(
    packet: &PacketSpec,
    text: &str,
    table: &ServiceTable,
    entries: &[PortEntry],
    state: &ClusterState,
    node: &NodeIdentity,
    live: Option<&Live<'_>>,
) -> Explanation {
    explain_frame(&packet.frame(), text, table, entries, state, node, live)
}

/// [`explain`] for a frame as it was captured (`--pcap`): the pipeline
/// runs on these very bytes; `text` names the packet in the output.
pub fn explain_frame(
    frame: &[u8],
    text: &str,
    table: &ServiceTable,
    entries: &[PortEntry],
    state: &ClusterState,
    node: &NodeIdentity,
    live: Option<&Live<'_>>,
) -> Explanation {
    let spec = PacketSpec::of_frame(frame);
    let packet = spec.as_ref().unwrap_or(&NOT_A_FLOW);
    let conntrack = FlowTable::new(Config { capacity: 64, ..Config::default() }).expect("a small table");
    let mut tracked = None;
    if let (Some(live), Some(key)) = (live, spec.as_ref().and_then(PacketSpec::key))
        && let Some(view) = live.conntrack.lookup(&key)
        && let Some(info) = live.conntrack.info(&view)
    {
        let copy = NewFlow {
            orig: info.orig,
            reply: info.reply,
            backend: info.backend,
            service: info.service,
            state: info.state,
        };
        // A table of 64 takes one flow; a refusal only loses the copy.
        let _ = conntrack.insert(&copy, 1);
        tracked = Some(ConntrackMatch {
            direction: if view.dir == Dir::Original { "original" } else { "reply" },
            state: info.state.name(),
            idle_seconds: live.now.saturating_sub(info.last_seen),
            original: tuple(&info.orig),
            reply: tuple(&info.reply),
            rewrite: tuple(&view.rewrite()),
        });
    }
    let affinity = AffinityTable::new(64);
    let tables = Tables { services: table, conntrack: &conntrack, affinity: &affinity };
    // Room for what the pipeline may write (a reject quotes the packet).
    let len = frame.len();
    let mut bytes = frame.to_vec();
    bytes.resize(len.max(2048), 0);
    let mut frames = [Frame { buf: &mut bytes, len }];
    let mut verdicts = [Verdict::Pass];
    let mut recorder = Recorder::default();
    process_batch_traced(&mut frames, &tables, &mut WorkerState::new(), 1, &mut verdicts, &mut recorder);

    let live_match = tracked.clone();
    let mut x = Explanation {
        packet: text.to_string(),
        verdict: "pass",
        reason: None,
        service: None,
        policy: None,
        traffic: None,
        endpoints: Vec::new(),
        endpoint: None,
        snat: false,
        translated: None,
        conntrack: tracked,
        steps: Vec::new(),
    };
    let mut line = |stage: &'static str, decision: String, why: String| x.steps.push(StepRow { stage, decision, why });
    let mut entry: Option<&PortEntry> = None;
    let mut kind = None;
    let mut policy = None;
    let mut traffic = None;
    let mut endpoints = Vec::new();
    let mut endpoint = None;
    let mut snat = false;
    let mut translated = None;
    let mut verdict = Verdict::Pass;
    for step in recorder.of(0) {
        match *step {
            Step::Parsed { key } => line("parse", tuple(&key), "a TCP or UDP packet: its flow is looked up".into()),
            Step::Tracked { service } => {
                let port = table.ports().iter().find(|p| p.id == service);
                let name = port.map(|p| p.name.to_string());
                entry = port.and_then(|p| find_entry(entries, p));
                let why = match &live_match {
                    Some(m) => format!(
                        "{} direction of a flow of {}, state {}, idle {} s",
                        m.direction,
                        name.unwrap_or_default(),
                        m.state,
                        m.idle_seconds
                    ),
                    None => format!("of {}", name.unwrap_or_default()),
                };
                line("conntrack", "a tracked flow".into(), why);
            }
            Step::Echo { service } => {
                let vip = packet.dst;
                match service.and_then(|id| table.port(id)) {
                    Some(p) => {
                        entry = find_entry(entries, p);
                        line("echo", format!("answered for {vip}"), format!("Service port {} is served here", p.name));
                    }
                    None => line(
                        "echo",
                        format!("not answered for {vip}"),
                        "no Service of this VIP has a usable endpoint for its policy here".into(),
                    ),
                }
            }
            Step::Frontend { service: None } => {
                line("frontend", "no Service has this frontend".into(), nearest(packet, entries));
            }
            Step::Frontend { service: Some((id, k)) } => {
                kind = Some(k);
                let port = table.ports().iter().find(|p| p.id == id);
                entry = port.and_then(|p| find_entry(entries, p));
                let name = port.map(|p| p.name.to_string()).unwrap_or_default();
                line(
                    "frontend",
                    format!("{} {}", k.name(), endpoint_string(packet.dst, packet.dport)),
                    format!("Service port {name}"),
                );
            }
            Step::SourceRanges { allowed } => {
                let ranges = entry.map(|e| e.source_ranges.iter().map(|c| c.to_string()).collect::<Vec<_>>());
                let ranges = ranges.unwrap_or_default();
                let why = if kind != Some(FrontendKind::LoadBalancer) {
                    "they apply to LoadBalancer IPs only".to_string()
                } else if ranges.is_empty() {
                    "none set: every client".to_string()
                } else {
                    format!("{} against {}", packet.src, ranges.join(", "))
                };
                line("source ranges", if allowed { "allowed" } else { "refused" }.into(), why);
            }
            Step::Class { external, from_pod, policy: p, endpoints: n } => {
                traffic = Some(if external { "external" } else { "internal" });
                policy = Some(p);
                let why = match (external, from_pod, kind) {
                    (true, _, _) => {
                        format!("to a {} frontend, from outside the pod CIDRs", kind.map_or("Service", |k| k.name()))
                    }
                    (false, true, Some(k)) if k != FrontendKind::ClusterIp => {
                        format!("from a pod ({}) to a {}: treated as the ClusterIP (kube-proxy)", packet.src, k.name())
                    }
                    _ => "to a ClusterIP".to_string(),
                };
                line("traffic", traffic.unwrap_or_default().into(), why);
                let which = if external { "externalTrafficPolicy" } else { "internalTrafficPolicy" };
                line("policy", p.name().into(), format!("{which}: {} usable endpoint(s) in its set", n));
                if let Some(e) = entry {
                    let set = match p {
                        TrafficPolicy::Cluster => e.cluster.as_ref(),
                        TrafficPolicy::Local => e.local.as_ref(),
                    };
                    let key: Key = (e.namespace.clone(), e.name.clone());
                    let slices = state.service_slices(&key);
                    // The table has a port per family: this packet's family's endpoints.
                    let of_family = |info: &EndpointInfo| info.ip.is_ipv6() == packet.src.is_ipv6();
                    for info in collect_endpoints(&slices, &e.port_name, e.proto).into_iter().filter(of_family) {
                        let row = endpoint_row(&info, set, p, node);
                        let mark = if row.usable { "in" } else { "out" };
                        line("endpoint set", format!("{} {mark}", row.address), row.why.clone());
                        endpoints.push(row);
                    }
                }
            }
            Step::Affinity { hit } => line(
                "affinity",
                if hit { "hit" } else { "miss" }.into(),
                if hit {
                    "the client's recorded endpoint is still usable"
                } else {
                    "no endpoint recorded for this client"
                }
                .into(),
            ),
            Step::Endpoint { addr, port, .. } => {
                let a = endpoint_string(addr.to_ip(), port);
                line("endpoint", a.clone(), "Maglev's pick for the flow's hash (the same on every gateway)".into());
                endpoint = Some(a);
            }
            Step::Masquerade { rule, snat: address } => {
                snat = rule.is_some();
                let why = match rule {
                    Some(MasqueradeRule::Hairpin) => "the client is the endpoint itself (hairpin)".to_string(),
                    Some(MasqueradeRule::ExternalCluster) => {
                        "external traffic under policy Cluster: replies must come back through this gateway".into()
                    }
                    Some(MasqueradeRule::ClusterIpFromOutside) => {
                        "a ClusterIP reached from outside the pod CIDRs (! -s clusterCIDR)".into()
                    }
                    None if policy == Some(TrafficPolicy::Local) => "policy Local keeps the client's address".into(),
                    None => "internal traffic keeps the client's address".into(),
                };
                let decision = match (rule, address) {
                    (Some(_), Some(a)) => format!("yes, to {a}"),
                    (Some(_), None) => "yes, but no SNAT address of this family".into(),
                    (None, _) => "no".into(),
                };
                line("masquerade", decision, why);
            }
            Step::Encapsulated { outer_src, outer_dst } => line(
                "encapsulate",
                format!("{} {outer_src} > {outer_dst}", if outer_dst.is_v4() { "ipip" } else { "ip6ip6" }),
                "direct server return: the client's packet, unchanged, to the endpoint, whose reply goes straight \
                 to the client (the client's address is kept; nothing is stored here)"
                    .into(),
            ),
            Step::Rewrite { before, after } => {
                let (src, dst) = (after.src.to_ip(), after.dst.to_ip());
                translated =
                    Some(Translated { src: endpoint_string(src, after.sport), dst: endpoint_string(dst, after.dport) });
                line("rewrite", format!("{} → {}", tuple(&before), tuple(&after)), "DNAT/SNAT in place".into());
            }
            Step::Verdict(v) => verdict = v,
        }
    }
    let (name, reason, decision, why) = match verdict {
        Verdict::Forward { next_hop } => ("forward", None, format!("forward towards {next_hop}"), String::new()),
        Verdict::Pass => (
            "pass",
            None,
            "pass".to_string(),
            "not a Service's packet: the kernel's (ping of the node, SSH, …)".to_string(),
        ),
        Verdict::Reply if packet.proto == PacketProto::Echo => {
            ("reply", None, "reply".to_string(), "an echo reply from the VIP goes back to the client".to_string())
        }
        Verdict::Reply => (
            "reply",
            None,
            "reply".to_string(),
            "no endpoint anywhere: a TCP RST or ICMP port unreachable goes back to the client".to_string(),
        ),
        Verdict::Drop(r) => {
            ("drop", Some(r.name()), format!("drop: {}", r.name()), r.description().trim_end_matches('.').to_string())
        }
    };
    line("verdict", decision, why);
    x.verdict = name;
    x.reason = reason;
    x.policy = policy.map(TrafficPolicy::name);
    x.traffic = traffic;
    x.endpoints = endpoints;
    x.endpoint = endpoint;
    x.snat = snat;
    x.translated = translated;
    if x.service.is_none() {
        x.service = entry.map(|e| format!("{}/{}:{}", e.namespace, e.name, e.port_name));
    }
    x
}

/// Why a `--pcap` file gave no frames.
#[derive(Debug, thiserror::Error)]
pub enum PcapError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is not a pcap or pcapng file: {reason}")]
    Format { path: String, reason: String },
    #[error("{path}: link type {linktype:?} is not Ethernet; xskgate sees Ethernet frames")]
    LinkType { path: String, linktype: pcap_file::DataLink },
}

/// The Ethernet frames of a pcap or pcapng file (tcpdump's, tshark's, or
/// `xskgate capture`'s), in order; a frame cut by the capture's snaplen
/// is given as captured.
///
/// # Errors
/// The file cannot be read, is neither format, or is not Ethernet.
pub fn read_pcap(path: &std::path::Path) -> Result<Vec<Vec<u8>>, PcapError> {
    use pcap_file::pcapng::Block;
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| PcapError::Read { path: name.clone(), source })?;
    let format = |e: pcap_file::PcapError| PcapError::Format { path: name.clone(), reason: e.to_string() };
    let ethernet = |l: pcap_file::DataLink| {
        if l == pcap_file::DataLink::ETHERNET {
            Ok(())
        } else {
            Err(PcapError::LinkType { path: name.clone(), linktype: l })
        }
    };
    let mut frames = Vec::new();
    if bytes.starts_with(&[0x0a, 0x0d, 0x0d, 0x0a]) {
        let mut r = pcap_file::pcapng::PcapNgReader::new(&bytes[..]).map_err(format)?;
        let mut links = Vec::new();
        while let Some(block) = r.next_block() {
            match block.map_err(format)? {
                Block::InterfaceDescription(i) => links.push(i.linktype),
                Block::EnhancedPacket(p) => {
                    if let Some(l) = links.get(p.interface_id as usize) {
                        ethernet(*l)?;
                    }
                    frames.push(p.data.into_owned());
                }
                Block::SimplePacket(p) => frames.push(p.data.into_owned()),
                _ => {}
            }
        }
    } else {
        let mut r = pcap_file::pcap::PcapReader::new(&bytes[..]).map_err(format)?;
        ethernet(r.header().datalink)?;
        while let Some(p) = r.next_packet() {
            frames.push(p.map_err(format)?.data.into_owned());
        }
    }
    Ok(frames)
}

/// How `--pcap` names frame `i` (from 1, as tshark numbers them) in the output.
pub fn frame_text(i: usize, frame: &[u8]) -> String {
    match PacketSpec::of_frame(frame) {
        Some(p) => {
            let proto = match (p.proto, p.src.is_ipv4()) {
                (PacketProto::Tcp, _) => "tcp",
                (PacketProto::Udp, _) => "udp",
                (PacketProto::Echo, true) => "icmp",
                (PacketProto::Echo, false) => "icmp6",
            };
            if p.proto == PacketProto::Echo {
                format!("frame {i}: {proto} {} > {}", p.src, p.dst)
            } else {
                let (src, dst) = (endpoint_string(p.src, p.sport), endpoint_string(p.dst, p.dport));
                format!("frame {i}: {proto} {src} > {dst}")
            }
        }
        None => format!("frame {i}: {} bytes, not TCP, UDP or an echo request", frame.len()),
    }
}

/// The translated entry of a service port of the table.
fn find_entry<'a>(entries: &'a [PortEntry], p: &xskgate_fastpath::ServicePort) -> Option<&'a PortEntry> {
    entries.iter().find(|e| {
        e.namespace == p.name.namespace
            && e.name == p.name.name
            && e.port_name == p.name.port_name
            && e.proto == p.proto
    })
}

/// Frontends that share the packet's address or its port, for "no Service
/// has this frontend".
fn nearest(packet: &PacketSpec, entries: &[PortEntry]) -> String {
    let mut near = Vec::new();
    for e in entries {
        for f in &e.frontends {
            let (addr, port) = (f.address, f.port);
            if addr == Some(packet.dst) || port == packet.dport {
                let a = addr.map_or_else(|| format!("*:{port}"), |a| endpoint_string(a, port));
                let proto = e.proto.name().to_ascii_uppercase();
                near.push(format!("{} {a}/{proto} ({}/{})", f.kind.name(), e.namespace, e.name));
            }
        }
    }
    near.sort();
    near.dedup();
    match near.len() {
        0 => "nothing shares its address or port".to_string(),
        n => {
            let more = if n > 3 { format!(" and {} more", n - 3) } else { String::new() };
            format!("nearest: {}{more}", near.into_iter().take(3).collect::<Vec<_>>().join(", "))
        }
    }
}

/// The text an operator reads: one line per stage.
pub fn to_text(x: &Explanation) -> String {
    value_to_text(&serde_json::to_value(x).expect("serializable"))
}

/// [`to_text`] of the JSON form (what `--gateway` receives).
pub fn value_to_text(x: &serde_json::Value) -> String {
    let field = |v: &serde_json::Value, k: &str| v.get(k).and_then(|s| s.as_str()).unwrap_or("").to_string();
    let mut out = format!("packet         {}\n", field(x, "packet"));
    for s in x.get("steps").and_then(|s| s.as_array()).into_iter().flatten() {
        let (stage, decision, why) = (field(s, "stage"), field(s, "decision"), field(s, "why"));
        if why.is_empty() {
            out.push_str(&format!("{stage:<14} {decision}\n"));
        } else {
            out.push_str(&format!("{stage:<14} {decision}  ({why})\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_parse_with_defaults_and_brackets() {
        let p: PacketSpec = "tcp 198.18.1.100:40001 > 198.18.100.10:80".parse().unwrap();
        assert_eq!((p.proto, p.sport, p.dport, p.tcp_flags), (PacketProto::Tcp, 40_001, 80, 0x02));
        let p: PacketSpec = "udp 198.18.1.100 > 198.18.100.10:53".parse().unwrap();
        assert_eq!(p.sport, DEFAULT_SOURCE_PORT);
        let p: PacketSpec = "tcp [2001:db8::1]:5000 > [2001:db8:100::10]:443 flags=SA".parse().unwrap();
        assert_eq!((p.sport, p.dport, p.tcp_flags), (5000, 443, 0x12));
        assert!(p.src.is_ipv6() && p.dst.is_ipv6());
        let p: PacketSpec = "icmp6 2001:db8::1 > 2001:db8:100::10".parse().unwrap();
        assert_eq!(p.proto, PacketProto::Echo);
        // The frame is one the fast path parses, back into the same packet.
        let frame = p.frame();
        assert!(etherparse::SlicedPacket::from_ethernet(&frame).is_ok());
        for text in [
            "tcp 198.18.1.100:40001 > 198.18.100.10:80 flags=SA",
            "udp [2001:db8::1]:5 > [2001:db8::2]:53",
            "icmp 198.18.1.1 > 198.18.100.10",
        ] {
            let p: PacketSpec = text.parse().unwrap();
            assert_eq!(PacketSpec::of_frame(&p.frame()), Some(p), "{text}");
        }
        assert_eq!(PacketSpec::of_frame(&[0u8; 14]), None, "not IP");
    }

    #[test]
    fn bad_packets_name_the_field() {
        let err = |s: &str| s.parse::<PacketSpec>().unwrap_err().to_string();
        assert!(err("sctp 1.2.3.4:1 > 5.6.7.8:2").contains("protocol \"sctp\""));
        assert!(err("tcp 1.2.3 > 5.6.7.8:2").contains("source \"1.2.3\""));
        assert!(err("tcp 1.2.3.4:1 > 5.6.7.8:99999").contains("destination port \"99999\""));
        assert!(err("tcp 1.2.3.4:1 > 5.6.7.8").contains("needs a port for tcp"));
        assert!(err("tcp 1.2.3.4:1 -> 5.6.7.8:2").contains("syntax: PROTO SRC"));
        assert!(err("tcp 1.2.3.4:1 > [2001:db8::1]:2").contains("different families"));
        assert!(err("tcp 1.2.3.4:1 > 5.6.7.8:2 flags=SX").contains("flag 'X'"));
        assert!(err("udp 1.2.3.4:1 > 5.6.7.8:2 flags=S").contains("tcp only"));
    }
}
