//! The admin endpoint of `xskgate run` and its clients (`xskgate status`,
//! `xskgate explain --gateway`, `xskgate capture`).
//!
//! Bound to loopback by default (`--admin-bind-address 127.0.0.1:10261`): it
//! shows the whole table and copies dropped packets, so it is not for the
//! network. Every answer is computed from the live tables, which it never
//! writes:
//! - `GET /status`: a [`Status`] as JSON (what `xskgate status` prints);
//! - `GET /explain?packet=P`: an [`Explanation`] as JSON (400 with the
//!   syntax for a bad packet); `POST /explain?text=T` with an Ethernet frame
//!   as the body (at most [`MAX_FRAME`] bytes): that frame's (`--pcap`);
//! - `GET /capture?seconds=S[&reasons=R1,R2][&rate=N]`: the frames dropped
//!   for those reasons during S seconds (at most [`MAX_CAPTURE_SECONDS`]), as
//!   a pcapng file with each drop's reason in the packet's comment; 409
//!   while another capture (or `--capture-drops`) runs.
//!
//! Status and explain need the control loop's state, so the endpoint asks
//! the loop ([`Request`]) and waits for its answer; a capture and the
//! conntrack count of a status run beside it.

use crate::explain::{Explanation, PacketSpec};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use xskgate_conntrack::{Addr, FlowTable};
use xskgate_fastpath::io::capture::{CaptureStats, Captured, DEFAULT_RATE, DropCapture, reason_mask};
use xskgate_fastpath::{Counters, DropReason, FrontendKind, ServiceTable};

/// `--admin-bind-address`'s default, and where the clients look.
pub const DEFAULT_BIND: &str = "127.0.0.1:10261";
/// The largest frame `POST /explain` takes.
pub const MAX_FRAME: usize = 65_535;
/// The longest capture one request may ask for.
pub const MAX_CAPTURE_SECONDS: u64 = 300;

/// What the endpoint asks of the control loop.
pub enum Request {
    Status(oneshot::Sender<Status>),
    /// Explain this Ethernet frame, named `text` in the answer.
    Explain {
        frame: Vec<u8>,
        text: String,
        reply: oneshot::Sender<Explanation>,
    },
}

/// What the endpoint holds besides the way to the loop.
#[derive(Clone)]
pub struct Admin {
    pub requests: mpsc::Sender<Request>,
    pub capture: Arc<DropCapture>,
    /// Set while a capture runs (one reader at a time).
    pub capturing: Arc<AtomicBool>,
    pub conntrack: Arc<FlowTable>,
    /// (ifindex, name) of the served interfaces, for the capture's
    /// interface blocks.
    pub interfaces: Vec<(u32, String)>,
}

/// The reasons `names` (comma-separated drop reason names); empty: all.
///
/// # Errors
/// A name that is no drop reason (the message lists them).
pub fn parse_reasons(names: &str) -> Result<Vec<DropReason>, String> {
    names
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| {
            DropReason::ALL.iter().copied().find(|r| r.name() == n).ok_or_else(|| {
                let all: Vec<&str> = DropReason::ALL.iter().map(|r| r.name()).collect();
                format!("{n:?} is not a drop reason (reasons: {})", all.join(", "))
            })
        })
        .collect()
}

/// A pcapng stream of captured drops: one interface block per served
/// interface, then one Enhanced Packet Block per frame, its comment the
/// drop reason's name (`tshark -T fields -e frame.comment` prints it).
pub struct PcapNg<W: std::io::Write> {
    writer: pcap_file::pcapng::PcapNgWriter<W>,
    /// ifindex → interface block index.
    ids: BTreeMap<u32, u32>,
}

impl<W: std::io::Write> PcapNg<W> {
    /// Writes the section header and the interface blocks.
    ///
    /// # Errors
    /// The writer failed.
    pub fn new(w: W, interfaces: &[(u32, String)]) -> Result<PcapNg<W>, pcap_file::PcapError> {
        use pcap_file::pcapng::blocks::interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption};
        let mut writer = pcap_file::pcapng::PcapNgWriter::new(w)?;
        let mut ids = BTreeMap::new();
        // An "unknown interface" block first, for a frame of an interface
        // the list does not hold.
        let all = std::iter::once((0u32, "unknown".to_string())).chain(interfaces.iter().cloned());
        for (n, (ifindex, name)) in all.enumerate() {
            writer.write_pcapng_block(InterfaceDescriptionBlock {
                linktype: pcap_file::DataLink::ETHERNET,
                snaplen: xskgate_fastpath::io::capture::SNAPLEN as u32,
                options: vec![
                    InterfaceDescriptionOption::IfName(name.into()),
                    // Nanoseconds: the writer stores timestamps as such.
                    InterfaceDescriptionOption::IfTsResol(9),
                ],
            })?;
            ids.insert(ifindex, n as u32);
        }
        Ok(PcapNg { writer, ids })
    }

    /// Writes one captured frame.
    ///
    /// # Errors
    /// The writer failed.
    pub fn write(&mut self, c: &Captured) -> Result<(), pcap_file::PcapError> {
        use pcap_file::pcapng::blocks::enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption};
        self.writer.write_pcapng_block(EnhancedPacketBlock {
            interface_id: self.ids.get(&c.ifindex).copied().unwrap_or(0),
            timestamp: c.time,
            original_len: c.original_len,
            data: c.bytes().into(),
            options: vec![EnhancedPacketOption::Comment(c.reason.name().into())],
        })?;
        Ok(())
    }

    pub fn get_mut(&mut self) -> &mut W {
        self.writer.get_mut()
    }

    pub fn into_inner(self) -> W {
        self.writer.into_inner()
    }
}

/// What a running gateway serves (`GET /status`, `xskgate status`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub node: String,
    pub interfaces: Vec<String>,
    pub source: String,
    pub uptime_seconds: u64,
    pub vip_echo: String,
    pub table: TableStatus,
    pub conntrack: ConntrackStatus,
    pub snat: SnatStatus,
    pub totals: Totals,
    pub capture: Option<CaptureStatus>,
    pub services: Vec<ServiceStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TableStatus {
    pub generation: u64,
    /// Seconds since the table was last published.
    pub age_seconds: u64,
    pub service_ports: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ConntrackStatus {
    pub entries: usize,
    pub capacity: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SnatStatus {
    pub addresses: Vec<String>,
    /// `LO-HI`.
    pub ports: String,
    /// Ports one (SNAT address, endpoint, protocol) can use.
    pub ports_per_endpoint: u32,
    /// Flows masqueraded now (each holds one SNAT port).
    pub in_use: u64,
    pub port_retries: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Totals {
    pub forwarded: u64,
    pub passed: u64,
    pub rejected: u64,
    pub echo_replies: u64,
    pub flows_created: u64,
    /// Every reason, zero included.
    pub drops: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CaptureStatus {
    pub captured: u64,
    pub rate_limited: u64,
    pub overflow: u64,
}

/// One Service port.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ServiceStatus {
    /// `namespace/name:port_name`.
    pub service: String,
    pub protocol: String,
    /// `IPv4` or `IPv6`: the table has a port per family of a Service.
    #[serde(default)]
    pub family: String,
    /// `Kind=address:port` (a NodePort's address is `*`).
    pub frontends: Vec<String>,
    pub external_policy: String,
    pub internal_policy: String,
    /// External Cluster traffic to its LoadBalancer IPs and externalIPs goes
    /// by direct server return (`xskgate.io/lb-mode: dsr`).
    #[serde(default)]
    pub dsr: bool,
    /// Usable endpoints for policy Cluster (anywhere) and Local (this node).
    pub cluster_endpoints: usize,
    pub local_endpoints: usize,
    pub health: Option<HealthStatus>,
    pub packets: u64,
    pub bytes: u64,
    /// Non-zero drop counts of this Service port, by reason.
    pub drops: BTreeMap<String, u64>,
}

/// A Service's healthCheckNodePort as the load balancer sees it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HealthStatus {
    pub port: u16,
    /// 200 (serve here) or 503 (drain); 0 if the port is not open.
    pub status: u16,
    pub local_endpoints: usize,
}

/// What [`status`] reads.
pub struct StatusInput<'a> {
    pub node: &'a str,
    pub interfaces: &'a [String],
    pub source: &'a str,
    pub uptime: Duration,
    pub table: &'a ServiceTable,
    pub table_age: Duration,
    pub entries: &'a [crate::translate::PortEntry],
    /// The workers' counters, summed.
    pub counters: &'a Counters,
    pub conntrack: &'a FlowTable,
    /// Health check ports that are open, by (namespace, name).
    pub health_open: &'a BTreeMap<(String, String), u16>,
    pub proxy_healthy: bool,
    pub capture: Option<CaptureStats>,
}

fn frontend_text(kind: FrontendKind, addr: &Addr, port: u16) -> String {
    if kind == FrontendKind::NodePort {
        return format!("{}=*:{port}", kind.name());
    }
    format!("{}={}", kind.name(), crate::translate::endpoint_string(addr.to_ip(), port))
}

/// The status of the gateway, without the conntrack scan
/// (`snat.in_use` is 0: [`count_masqueraded`] fills it).
pub fn status(i: &StatusInput<'_>) -> Status {
    let node = i.table.node();
    let local_ready: BTreeMap<(&str, &str), crate::translate::LocalReady> =
        i.entries.iter().map(|e| ((e.namespace.as_str(), e.name.as_str()), e.local_ready)).collect();
    let mut ports: Vec<_> = i.table.ports().iter().collect();
    ports.sort_by(|a, b| {
        let key = |p: &xskgate_fastpath::ServicePort| {
            (p.name.namespace.clone(), p.name.name.clone(), p.name.port_name.clone(), p.proto.0)
        };
        key(a).cmp(&key(b))
    });
    let services = ports
        .into_iter()
        .map(|p| {
            let c = i.counters.service(p.id);
            let drops = DropReason::ALL
                .iter()
                .zip(i.counters.service_drops(p.id))
                .filter(|(_, n)| **n > 0)
                .map(|(r, n)| (r.name().to_string(), *n))
                .collect();
            // A port is of one family (the table has one per family).
            let v6 = p.frontends.first().is_some_and(|f| !f.addr.is_v4());
            let health = p.health_check_node_port.map(|port| {
                let key = (p.name.namespace.clone(), p.name.name.clone());
                // Its health check as asked over the port's family answers it.
                let local =
                    local_ready.get(&(p.name.namespace.as_str(), p.name.name.as_str())).map_or(0, |r| r.asked_over(v6));
                let status = match i.health_open.get(&key) {
                    Some(open) if *open == port && local > 0 && i.proxy_healthy => 200,
                    Some(open) if *open == port => 503,
                    _ => 0,
                };
                HealthStatus { port, status, local_endpoints: local }
            });
            ServiceStatus {
                service: p.name.to_string(),
                protocol: p.proto.name().to_ascii_uppercase(),
                family: if v6 { "IPv6" } else { "IPv4" }.into(),
                frontends: p.frontends.iter().map(|f| frontend_text(f.kind, &f.addr, f.port)).collect(),
                external_policy: p.external_policy.name().into(),
                internal_policy: p.internal_policy.name().into(),
                dsr: p.dsr,
                cluster_endpoints: p.cluster.len(),
                local_endpoints: p.local.len(),
                health,
                packets: c.packets,
                bytes: c.bytes,
                drops,
            }
        })
        .collect();
    let mut snat: Vec<Addr> = [node.snat_v4, node.snat_v6].into_iter().flatten().collect();
    snat.extend(node.snat_routes.iter().map(|r| r.1));
    snat.sort_unstable();
    snat.dedup();
    let c = i.counters;
    Status {
        node: i.node.to_string(),
        interfaces: i.interfaces.to_vec(),
        source: i.source.to_string(),
        uptime_seconds: i.uptime.as_secs(),
        vip_echo: node.vip_echo.name().into(),
        table: TableStatus {
            generation: i.table.generation(),
            age_seconds: i.table_age.as_secs(),
            service_ports: i.table.ports().len(),
        },
        conntrack: ConntrackStatus { entries: i.conntrack.len(), capacity: i.conntrack.capacity() },
        snat: SnatStatus {
            addresses: snat.iter().map(ToString::to_string).collect(),
            ports: format!("{}-{}", node.snat_ports.0, node.snat_ports.1),
            ports_per_endpoint: u32::from(node.snat_ports.1 - node.snat_ports.0) + 1,
            in_use: 0,
            port_retries: c.snat_port_retries,
        },
        totals: Totals {
            forwarded: c.forwarded,
            passed: c.passed,
            rejected: c.rejected,
            echo_replies: c.echo_replies,
            flows_created: c.flows_created,
            drops: DropReason::ALL.iter().map(|r| (r.name().to_string(), c.drop_count(*r))).collect(),
        },
        capture: i.capture.map(|s| CaptureStatus {
            captured: s.captured,
            rate_limited: s.rate_limited,
            overflow: s.overflow,
        }),
        services,
    }
}

/// Flows whose reply goes to one of `snat` (masqueraded: each holds a SNAT
/// port). Scans the table: on demand only.
pub fn count_masqueraded(conntrack: &FlowTable, snat: &[Addr]) -> u64 {
    let mut n = 0;
    conntrack.for_each(|f| {
        if snat.contains(&f.reply.dst) {
            n += 1;
        }
    });
    n
}

/// The text `xskgate status` prints.
pub fn to_text(s: &Status) -> String {
    let mut out = format!(
        "node {}  interfaces {}  source {}  up {} s  vip-echo {}\n",
        s.node,
        s.interfaces.join(","),
        s.source,
        s.uptime_seconds,
        s.vip_echo
    );
    out.push_str(&format!(
        "table generation {} ({} s old, {} service ports)  conntrack {} / {}\n",
        s.table.generation, s.table.age_seconds, s.table.service_ports, s.conntrack.entries, s.conntrack.capacity
    ));
    out.push_str(&format!(
        "snat {} ports {} ({} per endpoint)  in use {}  port retries {}\n",
        if s.snat.addresses.is_empty() { "none".to_string() } else { s.snat.addresses.join(",") },
        s.snat.ports,
        s.snat.ports_per_endpoint,
        s.snat.in_use,
        s.snat.port_retries
    ));
    let drops: Vec<String> = s.totals.drops.iter().filter(|(_, n)| **n > 0).map(|(r, n)| format!("{r} {n}")).collect();
    out.push_str(&format!(
        "forwarded {}  passed {}  rejected {}  echo replies {}  new flows {}  drops: {}\n",
        s.totals.forwarded,
        s.totals.passed,
        s.totals.rejected,
        s.totals.echo_replies,
        s.totals.flows_created,
        if drops.is_empty() { "none".to_string() } else { drops.join(", ") }
    ));
    if let Some(c) = &s.capture {
        out.push_str(&format!(
            "capture: {} captured, {} over the rate, {} overflow\n",
            c.captured, c.rate_limited, c.overflow
        ));
    }
    let mut rows = vec![[
        "SERVICE".to_string(),
        "PROTO".into(),
        "FAMILY".into(),
        "FRONTENDS".into(),
        "POLICY ext/int".into(),
        "USABLE cluster/local".into(),
        "HEALTH".into(),
        "PACKETS".into(),
        "BYTES".into(),
        "DROPS".into(),
    ]];
    for r in &s.services {
        let health = match &r.health {
            Some(h) if h.status == 0 => format!(":{} not open", h.port),
            Some(h) => format!(":{} {} ({} local)", h.port, h.status, h.local_endpoints),
            None => "-".into(),
        };
        let drops: Vec<String> = r.drops.iter().map(|(k, v)| format!("{k}={v}")).collect();
        rows.push([
            r.service.clone(),
            r.protocol.clone(),
            r.family.clone(),
            r.frontends.join(" "),
            format!("{}/{}{}", r.external_policy, r.internal_policy, if r.dsr { " dsr" } else { "" }),
            format!("{}/{}", r.cluster_endpoints, r.local_endpoints),
            health,
            r.packets.to_string(),
            r.bytes.to_string(),
            if drops.is_empty() { "-".into() } else { drops.join(" ") },
        ]);
    }
    let widths: Vec<usize> = (0..10).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    for r in &rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

type Response = hyper::Response<Full<Bytes>>;

fn respond(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response {
    hyper::Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .header("x-content-type-options", "nosniff")
        .body(Full::new(body.into()))
        .expect("a valid response")
}

fn text(status: u16, body: String) -> Response {
    respond(status, "text/plain; charset=utf-8", format!("{body}\n"))
}

fn json(value: &impl Serialize) -> Response {
    respond(200, "application/json", serde_json::to_vec_pretty(value).expect("serializable"))
}

const PATHS: &str = "paths: /status, /explain?packet=PACKET, /capture?seconds=S[&reasons=R1,R2][&rate=N]";

async fn ask<T>(admin: &Admin, make: impl FnOnce(oneshot::Sender<T>) -> Request) -> Result<T, Response> {
    let (tx, rx) = oneshot::channel();
    if admin.requests.send(make(tx)).await.is_err() {
        return Err(text(503, "the gateway is stopping".into()));
    }
    rx.await.map_err(|_| text(503, "the gateway is stopping".into()))
}

async fn handle(admin: &Admin, req: hyper::Request<hyper::body::Incoming>) -> Response {
    let query: BTreeMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()).into_owned().collect();
    if req.method() == hyper::Method::POST && req.uri().path() == "/explain" {
        let name = query.get("text").cloned().unwrap_or_else(|| "frame".into());
        let body = match http_body_util::Limited::new(req.into_body(), MAX_FRAME).collect().await {
            Ok(b) => b.to_bytes().to_vec(),
            Err(e) => return text(413, format!("the frame: {e} (at most {MAX_FRAME} bytes)")),
        };
        return match ask(admin, |reply| Request::Explain { frame: body, text: name, reply }).await {
            Ok(x) => json(&x),
            Err(r) => r,
        };
    }
    if req.method() != hyper::Method::GET {
        return text(405, format!("GET, or POST /explain with a frame; {PATHS}"));
    }
    match req.uri().path() {
        "/status" => {
            let mut status = match ask(admin, Request::Status).await {
                Ok(s) => s,
                Err(r) => return r,
            };
            let (conntrack, snat) = (admin.conntrack.clone(), status.snat.addresses.clone());
            let snat: Vec<Addr> =
                snat.iter().filter_map(|a| a.parse::<std::net::IpAddr>().ok()).map(Addr::from).collect();
            status.snat.in_use =
                tokio::task::spawn_blocking(move || count_masqueraded(&conntrack, &snat)).await.unwrap_or(0);
            json(&status)
        }
        "/explain" => {
            let Some(text_packet) = query.get("packet") else {
                return text(400, format!("/explain needs ?packet= ({})", crate::explain::SYNTAX));
            };
            let packet: PacketSpec = match text_packet.parse() {
                Ok(p) => p,
                Err(e) => return text(400, e.to_string()),
            };
            let (frame, name) = (packet.frame(), text_packet.clone());
            match ask(admin, |reply| Request::Explain { frame, text: name, reply }).await {
                Ok(x) => json(&x),
                Err(r) => r,
            }
        }
        "/capture" => capture(admin, &query).await,
        _ => text(404, PATHS.into()),
    }
}

async fn capture(admin: &Admin, query: &BTreeMap<String, String>) -> Response {
    let seconds = match query.get("seconds").map(|s| s.parse::<u64>()) {
        None => 5,
        Some(Ok(s)) if (1..=MAX_CAPTURE_SECONDS).contains(&s) => s,
        Some(_) => return text(400, format!("seconds: 1 to {MAX_CAPTURE_SECONDS}")),
    };
    let reasons = match parse_reasons(query.get("reasons").map_or("", String::as_str)) {
        Ok(r) => r,
        Err(e) => return text(400, format!("reasons: {e}")),
    };
    let rate = match query.get("rate").map(|s| s.parse::<u32>()) {
        None => DEFAULT_RATE,
        Some(Ok(r)) if r > 0 => r,
        Some(_) => return text(400, "rate: packets per second, at least 1".into()),
    };
    if admin.capturing.swap(true, Ordering::AcqRel) {
        return text(409, "a capture is running already (another request, or --capture-drops)".into());
    }
    let mut out = match PcapNg::new(Vec::new(), &admin.interfaces) {
        Ok(w) => w,
        Err(e) => {
            admin.capturing.store(false, Ordering::Release);
            return text(500, format!("pcapng: {e}"));
        }
    };
    admin.capture.drain(|_| {});
    admin.capture.start(reason_mask(&reasons), rate);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let mut failed = None;
    loop {
        let done = tokio::time::Instant::now() >= deadline;
        if done {
            admin.capture.stop();
        }
        admin.capture.drain(|c| {
            if let Err(e) = out.write(c) {
                failed.get_or_insert(e.to_string());
            }
        });
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50).min(deadline - tokio::time::Instant::now())).await;
    }
    admin.capturing.store(false, Ordering::Release);
    match failed {
        Some(e) => text(500, format!("pcapng: {e}")),
        None => respond(200, "application/x-pcapng", out.into_inner()),
    }
}

/// Serves the endpoint on `bind` until the task is aborted. Returns the
/// bound address.
///
/// # Errors
/// The address cannot be bound.
pub async fn serve(bind: SocketAddr, admin: Admin) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let admin = admin.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(&admin, req).await) }
                });
                let served = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(conn), service)
                    .await;
                if let Err(e) = served {
                    tracing::debug!("admin connection: {e}");
                }
            });
        }
    });
    Ok((addr, task))
}

/// Why a client of the endpoint got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the gateway's admin endpoint at {addr}: {source} (is `xskgate run` running there, with \
         --admin-bind-address {addr}?)"
    )]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("the gateway at {addr} did not answer within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("HTTP with the gateway at {addr}: {source}")]
    Http { addr: SocketAddr, source: hyper::Error },
    #[error("the gateway at {addr} answered {status}: {body}")]
    Status { addr: SocketAddr, status: u16, body: String },
    #[error("the gateway at {addr} sent what is not a {what}: {source}")]
    Decode { addr: SocketAddr, what: &'static str, source: serde_json::Error },
}

/// `GET path` (with its query) from the endpoint at `addr`: the body of a
/// 200 answer.
///
/// # Errors
/// No connection, no answer within `timeout`, or another status (its body
/// is in the error).
pub async fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Bytes, ClientError> {
    request(addr, hyper::Method::GET, path, Bytes::new(), timeout).await
}

/// One request with `body` to the endpoint at `addr`: the body of a 200
/// answer. Errors as [`get`]'s.
async fn request(
    addr: SocketAddr,
    method: hyper::Method,
    path: &str,
    body: Bytes,
    timeout: Duration,
) -> Result<Bytes, ClientError> {
    let exchange = async {
        let stream =
            tokio::net::TcpStream::connect(addr).await.map_err(|source| ClientError::Connect { addr, source })?;
        let http = |source| ClientError::Http { addr, source };
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.map_err(http)?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(Full::new(body))
            .expect("a valid request");
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(http)?.to_bytes();
        if status != 200 {
            let body = String::from_utf8_lossy(&body).trim_end().to_string();
            return Err(ClientError::Status { addr, status, body });
        }
        Ok(body)
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| ClientError::Timeout { addr, timeout })?
}

/// The query string value of `v`, percent-encoded.
pub fn encode(v: &str) -> String {
    form_urlencoded::byte_serialize(v.as_bytes()).collect()
}

/// `xskgate status` against `addr`.
///
/// # Errors
/// See [`get`]; or the answer is not a status.
pub async fn fetch_status(addr: SocketAddr) -> Result<Status, ClientError> {
    let body = get(addr, "/status", Duration::from_secs(10)).await?;
    serde_json::from_slice(&body).map_err(|source| ClientError::Decode { addr, what: "status", source })
}

/// `xskgate explain --gateway` against `addr`: the explanation as JSON.
///
/// # Errors
/// See [`get`]; or the answer is not JSON.
pub async fn fetch_explain(addr: SocketAddr, packet: &str) -> Result<serde_json::Value, ClientError> {
    let body = get(addr, &format!("/explain?packet={}", encode(packet)), Duration::from_secs(10)).await?;
    serde_json::from_slice(&body).map_err(|source| ClientError::Decode { addr, what: "explanation", source })
}

/// `xskgate explain --gateway --pcap`: one captured frame, named `text`.
///
/// # Errors
/// See [`get`]; or the answer is not JSON.
pub async fn fetch_explain_frame(addr: SocketAddr, frame: &[u8], text: &str) -> Result<serde_json::Value, ClientError> {
    let path = format!("/explain?text={}", encode(text));
    let body =
        request(addr, hyper::Method::POST, &path, Bytes::copy_from_slice(frame), Duration::from_secs(10)).await?;
    serde_json::from_slice(&body).map_err(|source| ClientError::Decode { addr, what: "explanation", source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_parse_by_name_and_say_which_exist() {
        assert_eq!(parse_reasons("").unwrap(), vec![]);
        assert_eq!(
            parse_reasons("no_local_endpoints, source_range").unwrap(),
            vec![DropReason::NoLocalEndpoints, DropReason::SourceRange]
        );
        let e = parse_reasons("no_local_endpoint").unwrap_err();
        assert!(e.contains("\"no_local_endpoint\" is not a drop reason") && e.contains("echo_not_served"), "{e}");
    }

    #[test]
    fn a_capture_is_a_pcapng_file_with_the_reason_in_each_comment() {
        let capture = DropCapture::new();
        capture.start(reason_mask(&[]), 10);
        capture.offer(capture.reasons(), DropReason::NoLocalEndpoints, 7, &[0xaa; 60]);
        let mut out = PcapNg::new(Vec::new(), &[(7, "g1c".to_string())]).unwrap();
        capture.drain(|c| out.write(c).unwrap());
        let bytes = out.into_inner();
        let mut reader = pcap_file::pcapng::PcapNgReader::new(&bytes[..]).unwrap();
        let mut packets = Vec::new();
        while let Some(block) = reader.next_block() {
            if let pcap_file::pcapng::Block::EnhancedPacket(p) = block.unwrap() {
                packets.push((p.interface_id, p.data.len(), format!("{:?}", p.options)));
            }
        }
        assert_eq!(packets.len(), 1);
        assert_eq!((packets[0].0, packets[0].1), (1, 60), "the frame on interface block 1 (g1c)");
        assert!(packets[0].2.contains("no_local_endpoints"), "{packets:?}");
    }
}
