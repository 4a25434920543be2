//! A wire-level stand-in for kube-apiserver, shared by the tests that need
//! one (no kube-apiserver binary can be installed on these machines): a
//! small HTTP/1.1 server that speaks the API's list and watch protocol:
//! lists with a resourceVersion, watches as chunked JSON lines from a
//! resourceVersion, BOOKMARK events, `410 Gone` (an ERROR event with reason
//! Expired) for a resourceVersion older than its history, field selectors
//! (`metadata.name=`) and `!label` selectors, dropped connections, and
//! downtime (503). Over TLS ([`ApiServer::start_tls`], a certificate from
//! a test CA, [`TestCa`]) it checks bearer tokens as the real one checks a
//! service account's: a request without an accepted token is answered 401.
//! The real kube-rs client and watchers talk to it; only the server side is
//! a stand-in.
#![allow(dead_code)] // each test file uses part of it

use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::broadcast;

pub const SERVICES: &str = "/api/v1/services";
pub const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
pub const NODES: &str = "/api/v1/nodes";

#[derive(Default)]
pub struct State {
    rv: u64,
    objects: BTreeMap<&'static str, BTreeMap<(String, String), Value>>,
    /// (resourceVersion, event type, object) per resource path.
    history: BTreeMap<&'static str, Vec<(u64, &'static str, Value)>>,
    /// Watches from a resourceVersion below this get 410 Gone.
    oldest: u64,
    down: bool,
    pub requests: Vec<String>,
    /// The bearer token of each request, in order ("" without one).
    pub tokens: Vec<String>,
    /// `Some`: only these bearer tokens are let in.
    accepted_tokens: Option<Vec<String>>,
}

/// A certificate authority made for one test, and a server certificate it
/// signed for 127.0.0.1.
pub struct TestCa {
    /// The CA's certificate, PEM (a pod's `ca.crt`).
    pub ca_pem: String,
    pub server: Arc<rustls::ServerConfig>,
}

impl TestCa {
    pub fn new() -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        ca.distinguished_name.push(rcgen::DnType::CommonName, "xskgate test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "kubernetes.default.svc".to_string()]).unwrap();
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone(), ca_cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        TestCa { ca_pem: ca_cert.pem(), server: Arc::new(server) }
    }
}

#[derive(Clone)]
pub struct ApiServer {
    pub url: String,
    pub state: Arc<Mutex<State>>,
    events: broadcast::Sender<()>,
    /// Bumped to make every open watch drop its connection.
    kill: Arc<std::sync::atomic::AtomicU64>,
}

fn path_of(kind: &str) -> &'static str {
    match kind {
        "Service" => SERVICES,
        "EndpointSlice" => SLICES,
        _ => NODES,
    }
}

fn key(v: &Value) -> (String, String) {
    let m = &v["metadata"];
    (m["namespace"].as_str().unwrap_or("").to_string(), m["name"].as_str().unwrap_or("").to_string())
}

fn decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap_or(b'?'));
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `metadata.name=X` field selectors and `!label` label selectors.
fn selected(v: &Value, query: &BTreeMap<String, String>) -> bool {
    if let Some(f) = query.get("fieldSelector")
        && let Some(name) = f.strip_prefix("metadata.name=")
        && v["metadata"]["name"] != name
    {
        return false;
    }
    if let Some(l) = query.get("labelSelector")
        && let Some(absent) = l.strip_prefix('!')
        && v["metadata"]["labels"].get(absent).is_some()
    {
        return false;
    }
    true
}

impl ApiServer {
    /// On 127.0.0.1, a free port.
    pub async fn start() -> ApiServer {
        ApiServer::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    /// On a listener bound elsewhere (in a test namespace, say).
    pub fn start_on(listener: TcpListener) -> ApiServer {
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (events, _) = broadcast::channel(1024);
        let s = ApiServer { url, state: Arc::default(), events, kill: Arc::default() };
        let server = s.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let server = server.clone();
                tokio::spawn(async move {
                    let _ = server.serve(conn).await;
                });
            }
        });
        s
    }

    /// HTTPS with `ca`'s server certificate, letting in only requests that
    /// carry one of `tokens` as `Authorization: Bearer`.
    pub fn start_tls(listener: TcpListener, ca: &TestCa, tokens: &[&str]) -> ApiServer {
        let url = format!("https://{}", listener.local_addr().unwrap());
        let (events, _) = broadcast::channel(1024);
        let s = ApiServer { url, state: Arc::default(), events, kill: Arc::default() };
        s.accept_tokens(tokens);
        let acceptor = tokio_rustls::TlsAcceptor::from(ca.server.clone());
        let server = s.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (server, acceptor) = (server.clone(), acceptor.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(conn).await {
                        let _ = server.serve(tls).await;
                    }
                });
            }
        });
        s
    }

    /// From now on only these bearer tokens are let in (a token revoked,
    /// another issued).
    pub fn accept_tokens(&self, tokens: &[&str]) {
        self.state.lock().unwrap().accepted_tokens = Some(tokens.iter().map(|t| t.to_string()).collect());
    }

    pub fn apply(&self, v: Value) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let mut v = v;
        v["metadata"]["resourceVersion"] = json!(rv.to_string());
        let path = path_of(v["kind"].as_str().unwrap());
        let existed = st.objects.entry(path).or_default().insert(key(&v), v.clone()).is_some();
        st.history.entry(path).or_default().push((rv, if existed { "MODIFIED" } else { "ADDED" }, v));
        drop(st);
        let _ = self.events.send(());
    }

    pub fn delete(&self, kind: &str, ns: &str, name: &str) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let path = path_of(kind);
        if let Some(mut v) = st.objects.entry(path).or_default().remove(&(ns.to_string(), name.to_string())) {
            v["metadata"]["resourceVersion"] = json!(rv.to_string());
            st.history.entry(path).or_default().push((rv, "DELETED", v));
        }
        drop(st);
        let _ = self.events.send(());
    }

    /// Writes a kubeconfig file that points at this server (no credentials).
    pub fn write_kubeconfig(&self, path: &std::path::Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: stand-in, cluster: {{server: \"{}\"}}}}]\n\
             users: [{{name: u, user: {{}}}}]\ncontexts: [{{name: c, context: {{cluster: stand-in, user: u}}}}]\n\
             current-context: c\n",
            self.url
        );
        std::fs::write(path, text).expect("write the kubeconfig");
    }

    /// Forgets all history: resuming watches must relist (410 Gone).
    pub fn compact(&self) {
        let mut st = self.state.lock().unwrap();
        st.oldest = st.rv + 1;
        st.history.clear();
    }

    pub fn drop_connections(&self) {
        self.kill.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let _ = self.events.send(());
    }

    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
        if down {
            self.drop_connections();
        }
    }

    pub fn requests(&self, path: &str, watch: bool) -> usize {
        let st = self.state.lock().unwrap();
        st.requests.iter().filter(|r| r.starts_with(path) && r.contains("watch=true") == watch).count()
    }

    async fn serve(&self, conn: impl AsyncRead + AsyncWrite + Send + Unpin) -> std::io::Result<()> {
        let (r, mut w) = tokio::io::split(conn);
        let mut r = BufReader::new(r);
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            let mut token = String::new();
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).await? == 0 || h == "\r\n" {
                    break;
                }
                if let Some((name, value)) = h.split_once(':')
                    && name.eq_ignore_ascii_case("authorization")
                    && let Some(t) = value.trim().strip_prefix("Bearer ")
                {
                    token = t.to_string();
                }
            }
            let (path, q) = target.split_once('?').unwrap_or((&target, ""));
            let query: BTreeMap<String, String> =
                q.split('&').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), decode(v))).collect();
            let resource = [SERVICES, SLICES, NODES].into_iter().find(|p| *p == path);
            let (down, unauthorized) = {
                let mut st = self.state.lock().unwrap();
                st.requests.push(decode(&target));
                let unauthorized = st.accepted_tokens.as_ref().is_some_and(|ok| !ok.contains(&token));
                st.tokens.push(token);
                (st.down, unauthorized)
            };
            let Some(resource) = resource.filter(|_| !down && !unauthorized) else {
                let (code, text) = if unauthorized {
                    (401, "Unauthorized")
                } else if down {
                    (503, "Service Unavailable")
                } else {
                    (404, "Not Found")
                };
                let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code}).to_string();
                w.write_all(
                    format!(
                        "HTTP/1.1 {code} {text}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await?;
                continue;
            };
            if query.get("watch").map(String::as_str) != Some("true") {
                let body = {
                    let st = self.state.lock().unwrap();
                    let items: Vec<Value> = st
                        .objects
                        .get(resource)
                        .into_iter()
                        .flat_map(|m| m.values())
                        .filter(|v| selected(v, &query))
                        .cloned()
                        .collect();
                    json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}).to_string()
                };
                w.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await?;
                continue;
            }
            // A watch: stream events after the requested resourceVersion.
            w.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
                .await?;
            let mut sent: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
            let bookmarks = query.get("allowWatchBookmarks").is_some_and(|v| v == "true");
            let mut wake = self.events.subscribe();
            let killed_at = self.kill.load(std::sync::atomic::Ordering::SeqCst);
            loop {
                if self.kill.load(std::sync::atomic::Ordering::SeqCst) != killed_at {
                    return Ok(()); // drop the connection without ending the stream
                }
                let lines: Vec<String> = {
                    let st = self.state.lock().unwrap();
                    if sent + 1 < st.oldest {
                        let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "message": "too old resource version", "reason": "Expired", "code": 410}});
                        vec![gone.to_string()]
                    } else {
                        let mut out: Vec<String> = st
                            .history
                            .get(resource)
                            .into_iter()
                            .flatten()
                            .filter(|(rv, _, v)| *rv > sent && selected(v, &query))
                            .map(|(_, t, v)| json!({"type": t, "object": v}).to_string())
                            .collect();
                        let latest = st.rv;
                        if bookmarks && latest > sent {
                            let kind = match resource {
                                SERVICES => "Service",
                                SLICES => "EndpointSlice",
                                _ => "Node",
                            };
                            out.push(json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": latest.to_string()}}}).to_string());
                        }
                        sent = latest.max(sent);
                        out
                    }
                };
                let expired = lines.first().is_some_and(|l| l.contains("\"ERROR\""));
                for l in lines {
                    let data = format!("{l}\n");
                    w.write_all(format!("{:x}\r\n{data}\r\n", data.len()).as_bytes()).await?;
                }
                if expired {
                    w.write_all(b"0\r\n\r\n").await?;
                    break;
                }
                let _ = tokio::time::timeout(Duration::from_millis(500), wake.recv()).await;
            }
        }
    }
}
