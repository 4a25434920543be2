//! Health servers, byte-compatible with kube-proxy's:
//! - one per Service with `externalTrafficPolicy: Local` and a
//!   `healthCheckNodePort`: any path answers 200 when the Service has local
//!   ready endpoints of the family it is asked over (IPv4 or IPv6: kube-proxy
//!   runs a server per family) and the proxy is healthy, else 503, with the body
//!   `{"service":{"namespace","name"},"localEndpoints","serviceProxyHealthy"}`
//!   laid out exactly as kube-proxy prints it;
//! - `/healthz` and `/livez` with kube-proxy's bodies and staleness rule:
//!   unhealthy when an update was queued more than the health timeout ago
//!   and not yet applied; `/healthz` also says 503 while the Node is being
//!   deleted or carries the cluster autoscaler's `ToBeDeletedByClusterAutoscaler`
//!   taint (so load balancers drain it first).
//!
//! Listeners open and close as Services come and go ([`ServiceHealth::sync`]).
//! The servers are hyper's HTTP/1.1 on tokio; every method is answered, as
//! kube-proxy's Go handlers answer them.

use crate::translate::LocalReady;
use k8s_openapi::api::core::v1::Node;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::net::TcpListener;
use tracing::{error, info};

/// kube-proxy's node-deletion taint.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

#[derive(Debug)]
struct ProxyState {
    last_updated: Option<SystemTime>,
    oldest_pending: Option<SystemTime>,
    node_eligible: bool,
}

/// The proxy's own health, as kube-proxy's `ProxyHealthServer` defines it.
#[derive(Debug)]
pub struct ProxyHealth {
    state: Mutex<ProxyState>,
    timeout: Duration,
    started: SystemTime,
}

impl ProxyHealth {
    /// `timeout`: how long a queued update may wait before the proxy is
    /// unhealthy (kube-proxy: twice its sync period, 60 s by default).
    pub fn new(timeout: Duration) -> ProxyHealth {
        ProxyHealth {
            state: Mutex::new(ProxyState { last_updated: None, oldest_pending: None, node_eligible: true }),
            timeout,
            started: SystemTime::now(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProxyState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A change arrived that the data path does not have yet.
    pub fn queued(&self) {
        let mut s = self.lock();
        s.oldest_pending.get_or_insert_with(SystemTime::now);
    }

    /// The data path has everything that arrived.
    pub fn updated(&self) {
        let mut s = self.lock();
        s.oldest_pending = None;
        s.last_updated = Some(SystemTime::now());
    }

    /// Follows this node's Node object (deletion, autoscaler taint).
    pub fn sync_node(&self, node: &Node) {
        let deleting = node.metadata.deletion_timestamp.is_some();
        let tainted = node.spec.iter().flat_map(|s| s.taints.iter().flatten()).any(|t| t.key == TO_BE_DELETED_TAINT);
        self.lock().node_eligible = !(deleting || tainted);
    }

    /// (healthy, last updated) ignoring the node's eligibility.
    pub fn is_healthy(&self) -> (bool, Option<SystemTime>) {
        let s = self.lock();
        let late = s.oldest_pending.is_some_and(|t| t.elapsed().unwrap_or_default() >= self.timeout);
        (!late, s.last_updated)
    }

    pub fn node_eligible(&self) -> bool {
        self.lock().node_eligible
    }

    /// Go's `time.Time.String()` of a wall time, with the monotonic reading
    /// (`m=+…`) that Go's `time.Now()` carries, as kube-proxy prints it.
    fn go_time(&self, t: Option<SystemTime>) -> String {
        let Some(t) = t else { return "0001-01-01 00:00:00 +0000 UTC".into() };
        let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let (secs, nanos) = (d.as_secs() as i64, d.subsec_nanos());
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let (y, m, day) = civil_from_days(days);
        let mut frac = if nanos == 0 { String::new() } else { format!(".{nanos:09}") };
        while frac.ends_with('0') {
            frac.pop();
        }
        // Go's monotonic reading counts from the process start.
        let mono = t.duration_since(self.started).unwrap_or_default();
        format!(
            "{y:04}-{m:02}-{day:02} {:02}:{:02}:{:02}{frac} +0000 UTC m=+{}.{:09}",
            rem / 3600,
            rem / 60 % 60,
            rem % 60,
            mono.as_secs(),
            mono.subsec_nanos()
        )
    }

    /// Status and body of `/healthz`.
    pub fn healthz(&self) -> (u16, String) {
        let eligible = self.node_eligible();
        let (healthy, last) = self.is_healthy();
        let now = SystemTime::now();
        let healthy = healthy && eligible;
        // kube-proxy reports "now" as lastUpdated while healthy.
        let last = if healthy { Some(now) } else { last };
        let body = format!(
            "{{\"lastUpdated\": {:?},\"currentTime\": {:?}, \"nodeEligible\": {eligible}}}",
            self.go_time(last),
            self.go_time(Some(now))
        );
        (if healthy { 200 } else { 503 }, body)
    }

    /// Status and body of `/livez`.
    pub fn livez(&self) -> (u16, String) {
        let (healthy, last) = self.is_healthy();
        let now = SystemTime::now();
        let last = if healthy { Some(now) } else { last };
        let body =
            format!("{{\"lastUpdated\": {:?},\"currentTime\": {:?}}}", self.go_time(last), self.go_time(Some(now)));
        (if healthy { 200 } else { 503 }, body)
    }
}

/// Days since 1970-01-01 → (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The body kube-proxy's service health handler writes.
pub fn service_body(namespace: &str, name: &str, local_endpoints: usize, healthy: bool) -> String {
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {namespace:?},\n\t\t\"name\": {name:?}\n\t}},\n\t\"localEndpoints\": {local_endpoints},\n\t\"serviceProxyHealthy\": {healthy}\n}}"
    )
}

/// Answers a request path (with its query) with a status and a body.
pub type Responder = Arc<dyn Fn(&str) -> (u16, String) + Send + Sync>;

/// Serves one connection with hyper (HTTP/1.1, keep-alive): every request,
/// whatever its method, gets `respond(path)` with `content_type`, kube-proxy's
/// `X-Content-Type-Options: nosniff`, and hyper's `Date` and
/// `Content-Length`. Header names are written as Go's server writes them.
async fn serve(conn: tokio::net::TcpStream, content_type: &'static str, respond: Responder) {
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let (status, body) = respond(path);
        let response = hyper::Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, content_type)
            .header("x-content-type-options", "nosniff")
            .body(http_body_util::Full::new(hyper::body::Bytes::from(body)));
        std::future::ready(response)
    });
    let served = hyper::server::conn::http1::Builder::new()
        .title_case_headers(true)
        .serve_connection(hyper_util::rt::TokioIo::new(conn), service)
        .await;
    if let Err(e) = served {
        tracing::debug!("health/metrics connection: {e}");
    }
}

/// Serves `respond` on an already bound listener until the task is aborted.
pub fn spawn_server(listener: TcpListener, respond: Responder) -> tokio::task::JoinHandle<()> {
    spawn_server_as(listener, "application/json", respond)
}

/// [`spawn_server`] with another `Content-Type`.
pub fn spawn_server_as(
    listener: TcpListener,
    content_type: &'static str,
    respond: Responder,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(serve(conn, content_type, respond.clone()));
        }
    })
}

/// `/healthz` and `/livez`; any other path gets an empty 503.
///
/// # Errors
/// The address cannot be bound.
pub async fn spawn_proxy_health(
    addr: SocketAddr,
    health: Arc<ProxyHealth>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let respond = Arc::new(move |path: &str| match path.split('?').next().unwrap_or("") {
        "/healthz" => health.healthz(),
        "/livez" => health.livez(),
        _ => (503, String::new()),
    });
    Ok((bound, spawn_server(listener, respond)))
}

struct Instance {
    port: u16,
    local_endpoints: Arc<Mutex<LocalReady>>,
    task: tokio::task::JoinHandle<()>,
}

/// A listener on `ip:port`; for `::`, one that takes IPv4 too
/// (IPv4-mapped) whatever `net.ipv6.bindv6only` says, or `0.0.0.0` where
/// the host has no IPv6.
fn bind(ip: IpAddr, port: u16) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let open = |ip: IpAddr| -> std::io::Result<Socket> {
        let s = Socket::new(if ip.is_ipv6() { Domain::IPV6 } else { Domain::IPV4 }, Type::STREAM, None)?;
        if ip == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
            s.set_only_v6(false)?;
        }
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::new(ip, port).into())?;
        Ok(s)
    };
    let socket = match open(ip) {
        Err(e) if ip == IpAddr::V6(Ipv6Addr::UNSPECIFIED) && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            open(IpAddr::V4(Ipv4Addr::UNSPECIFIED))?
        }
        r => r?,
    };
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

/// The per-Service health check servers. Each answers with the
/// local ready endpoints of the family it was asked over
/// ([`LocalReady::asked_over`]): a load balancer checking the IPv4 address
/// learns whether this node serves the Service's IPv4 frontends.
pub struct ServiceHealth {
    bind_ip: IpAddr,
    proxy: Arc<ProxyHealth>,
    servers: BTreeMap<(String, String), Instance>,
}

impl ServiceHealth {
    /// Servers will listen on `bind_ip`; `::` is every address of both
    /// families (what `xskgate run` uses).
    pub fn new(bind_ip: IpAddr, proxy: Arc<ProxyHealth>) -> ServiceHealth {
        ServiceHealth { bind_ip, proxy, servers: BTreeMap::new() }
    }

    /// Opens, keeps or closes servers so that exactly `wanted` run:
    /// (namespace, name) → (healthCheckNodePort, local ready endpoints).
    /// A port that cannot be bound is logged and tried again next sync.
    pub async fn sync(&mut self, wanted: &BTreeMap<(String, String), (u16, LocalReady)>) {
        self.servers.retain(|k, inst| {
            let keep = wanted.get(k).is_some_and(|(port, _)| *port == inst.port);
            if !keep {
                inst.task.abort();
                info!(service = %format!("{}/{}", k.0, k.1), port = inst.port, "closed health check");
            }
            keep
        });
        for (k, &(port, count)) in wanted {
            if let Some(inst) = self.servers.get(k) {
                *inst.local_endpoints.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = count;
                continue;
            }
            let listener = match bind(self.bind_ip, port) {
                Ok(l) => l,
                Err(e) => {
                    error!(service = %format!("{}/{}", k.0, k.1), port, error = %e, "cannot open health check port");
                    continue;
                }
            };
            let local_endpoints = Arc::new(Mutex::new(count));
            let (ns, name, proxy, n) = (k.0.clone(), k.1.clone(), self.proxy.clone(), local_endpoints.clone());
            let respond = move |asked_over_v6: bool| -> Responder {
                let (ns, name, proxy, n) = (ns.clone(), name.clone(), proxy.clone(), n.clone());
                Arc::new(move |_path: &str| {
                    let ready = *n.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    let count = ready.asked_over(asked_over_v6);
                    let healthy = proxy.is_healthy().0;
                    (if count > 0 && healthy { 200 } else { 503 }, service_body(&ns, &name, count, healthy))
                })
            };
            let task = tokio::spawn(async move {
                while let Ok((conn, _)) = listener.accept().await {
                    // The family the check came over: the address it reached.
                    let v6 = conn.local_addr().is_ok_and(|a| a.ip().to_canonical().is_ipv6());
                    tokio::spawn(serve(conn, "application/json", respond(v6)));
                }
            });
            info!(service = %format!("{}/{}", k.0, k.1), port, "opened health check");
            self.servers.insert(k.clone(), Instance { port, local_endpoints, task });
        }
    }

    /// Ports currently served, by Service.
    pub fn ports(&self) -> BTreeMap<(String, String), u16> {
        self.servers.iter().map(|(k, i)| (k.clone(), i.port)).collect()
    }
}

impl Drop for ServiceHealth {
    fn drop(&mut self) {
        for inst in self.servers.values() {
            inst.task.abort();
        }
    }
}

/// What the health servers need from a set of translated ports: per Service
/// with a health check port, that port and its local ready endpoint count.
pub fn wanted<'a>(
    entries: impl Iterator<Item = &'a crate::translate::PortEntry>,
) -> BTreeMap<(String, String), (u16, LocalReady)> {
    entries
        .filter_map(|e| e.health_check_node_port.map(|p| ((e.namespace.clone(), e.name.clone()), (p, e.local_ready))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_body_is_laid_out_like_kube_proxys() {
        assert_eq!(
            service_body("prod", "web", 2, true),
            "{\n\t\"service\": {\n\t\t\"namespace\": \"prod\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
    }

    #[test]
    fn dates_are_right() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
        let h = ProxyHealth::new(Duration::from_secs(60));
        assert_eq!(h.go_time(None), "0001-01-01 00:00:00 +0000 UTC");
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_795_000_000, 120_000_000);
        assert!(h.go_time(Some(t)).starts_with("2026-11-18 11:06:40.12 +0000 UTC m=+"), "{}", h.go_time(Some(t)));
    }

    #[test]
    fn staleness_and_node_eligibility() {
        let h = ProxyHealth::new(Duration::from_millis(30));
        assert!(h.is_healthy().0, "healthy while starting");
        h.queued();
        assert!(h.is_healthy().0, "a fresh queued update is not late");
        std::thread::sleep(Duration::from_millis(40));
        assert!(!h.is_healthy().0, "a queued update older than the timeout");
        assert_eq!(h.healthz().0, 503);
        h.updated();
        assert_eq!(h.healthz().0, 200);
        let tainted: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "gw1"},
            "spec": {"taints": [{"key": TO_BE_DELETED_TAINT, "effect": "NoSchedule"}]}
        }))
        .unwrap();
        h.sync_node(&tainted);
        let (code, body) = h.healthz();
        assert_eq!(code, 503);
        assert!(body.ends_with("\"nodeEligible\": false}"), "{body}");
        assert_eq!(h.livez().0, 200, "livez ignores the node");
    }
}
