//! In-cluster configuration: `xskgate watch` with neither `--manifests` nor
//! `--kubeconfig` uses the pod's service account, as kube-proxy in a
//! DaemonSet does. The API server is the wire-level stand-in
//! (`support/apiserver.rs`; no kube-apiserver binary can be installed on
//! these machines) over TLS, with a certificate from a CA made for the test,
//! checking bearer tokens. The service account is mounted where a pod has
//! it, `/var/run/secrets/kubernetes.io/serviceaccount`, inside a private
//! mount namespace of the xskgate process only (`unshare --mount`; needs
//! root, fails without it), so kube-rs reads the real paths and the host's
//! file system is not touched.

#[path = "support/apiserver.rs"]
mod apiserver;

use apiserver::{ApiServer, TestCa};
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

fn service() -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "prod"},
           "spec": {"type": "LoadBalancer", "clusterIP": "198.19.128.30", "externalTrafficPolicy": "Cluster",
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30090}]},
           "status": {"loadBalancer": {"ingress": [{"ip": "198.18.100.30"}]}}})
}

fn slice(endpoints: &[&str]) -> Value {
    let eps: Vec<Value> = endpoints.iter().map(|ip| json!({"addresses": [ip], "nodeName": "gw1"})).collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "web-x", "namespace": "prod", "labels": {"kubernetes.io/service-name": "web"}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}], "endpoints": eps})
}

/// Writes `name` into `dir` as the kubelet does: a new file renamed over
/// the old, so a reader sees one or the other, whole.
fn write_atomically(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// xskgate's log lines, and the highest table generation they published.
struct Log {
    lines: mpsc::UnboundedReceiver<String>,
    generation: u64,
}

impl Log {
    /// The next line that contains `what`, within `deadline`.
    async fn line_with(&mut self, what: &str, deadline: Instant) -> String {
        loop {
            let line = tokio::time::timeout_at(deadline.into(), self.lines.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for a log line with {what:?}"))
                .unwrap_or_else(|| panic!("xskgate exited before logging {what:?}"));
            self.generation = self.generation.max(generation_of(&line));
            if line.contains(what) {
                return line;
            }
        }
    }

    /// Reads until a table newer than `than` is published.
    async fn published_after(&mut self, than: u64, deadline: Instant) {
        while self.generation <= than {
            self.line_with("published service table", deadline).await;
        }
    }
}

/// The `generation=N` of a "published service table" line, else 0.
fn generation_of(line: &str) -> u64 {
    if !line.contains("published service table") {
        return 0;
    }
    line.split("generation=").nth(1).and_then(|g| g.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_cluster_config_uses_the_service_account_over_tls_and_a_rotated_token() {
    xskgate_tests::require_root();
    let dir = xskgate_tests::TempDir::new("xskgate-incluster");
    let sa = dir.0.join("serviceaccount");
    std::fs::create_dir_all(&sa).unwrap();
    let ca = TestCa::new();
    write_atomically(&sa, "ca.crt", &ca.ca_pem);
    write_atomically(&sa, "namespace", "kube-system");
    write_atomically(&sa, "token", "token-1");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let api = ApiServer::start_tls(listener, &ca, &["token-1"]);
    api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "gw1"}}));
    api.apply(service());
    api.apply(slice(&["198.19.1.200"]));

    let started = Instant::now();
    let script = r#"set -e
mount -t tmpfs xskgate-test /run
mkdir -p /run/secrets/kubernetes.io/serviceaccount
mount --bind "$SA" /run/secrets/kubernetes.io/serviceaccount
exec "$XSKGATE" watch --node-name gw1"#;
    let mut child = tokio::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c", script])
        .env("SA", &sa)
        .env("XSKGATE", env!("CARGO_BIN_EXE_xskgate"))
        .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", port.to_string())
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("unshare (util-linux) runs");
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let (tx, lines) = mpsc::unbounded_channel();
    let mut log = Log { lines, generation: 0 };
    tokio::spawn(async move {
        while let Ok(Some(line)) = stderr.next_line().await {
            eprintln!("xskgate: {line}");
            let _ = tx.send(line);
        }
    });

    let deadline = Instant::now() + Duration::from_secs(30);
    let api_line = log.line_with("Kubernetes API", deadline).await;
    assert!(api_line.contains("in-cluster service account"), "{api_line}");
    assert!(api_line.contains(&format!("https://127.0.0.1:{port}")), "{api_line}");
    for _ in 0..3 {
        log.line_with("listed from the API server", deadline).await;
    }
    log.published_after(0, deadline).await;
    {
        let st = api.state.lock().unwrap();
        assert!(!st.tokens.is_empty());
        assert!(st.tokens.iter().all(|t| t == "token-1"), "every request carries the mounted token: {:?}", st.tokens);
    }

    // The kubelet rotates the token; the API server accepts both until the
    // old one expires. kube-rs reads the file again at least once a minute
    // (10 s before its minute is up), as client-go does.
    write_atomically(&sa, "token", "token-2");
    api.accept_tokens(&["token-1", "token-2"]);
    tokio::time::sleep_until((started + Duration::from_secs(52)).into()).await;
    // Now the old token expires and the watches are reopened (as the API
    // server's watch timeout does): only the new token lets them in.
    tokio::time::sleep(Duration::from_millis(200)).await;
    while let Ok(line) = log.lines.try_recv() {
        log.generation = log.generation.max(generation_of(&line));
    }
    let generation = log.generation;
    let before = api.state.lock().unwrap().tokens.len();
    api.accept_tokens(&["token-2"]);
    api.drop_connections();
    api.apply(slice(&["198.19.1.200", "198.19.1.201"]));
    let changed_at = Instant::now();
    log.published_after(generation, changed_at + Duration::from_secs(15)).await;
    let after = api.state.lock().unwrap().tokens[before..].to_vec();
    assert!(after.iter().any(|t| t == "token-2"), "the rotated token is used: {after:?}");
    assert!(after.last().is_some_and(|t| t == "token-2"), "{after:?}");
    child.kill().await.unwrap();
}

#[test]
fn without_a_source_the_error_names_the_three_ways() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xskgate"))
        .args(["watch", "--node-name", "gw1"])
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for way in ["--manifests DIR", "--kubeconfig FILE", "service account", "$KUBERNETES_SERVICE_HOST is not set"] {
        assert!(err.contains(way), "{way:?} missing from: {err}");
    }
}
