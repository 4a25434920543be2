//! The kube-rs source against a wire-level stand-in for kube-apiserver
//! (`support/apiserver.rs`: no kube-apiserver binary can be installed on
//! these machines). The real kube-rs client and watchers talk to it; only
//! the server side is a stand-in.

#[path = "support/apiserver.rs"]
mod apiserver;

use apiserver::{ApiServer, NODES, SERVICES, SLICES};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use xskgate_conntrack::{Addr, Proto};
use xskgate_control::controller::{ControlLoop, Controller};
use xskgate_control::health::ProxyHealth;
use xskgate_control::metrics::ControlMetrics;
use xskgate_control::publish::Publisher;
use xskgate_control::source::Source;
use xskgate_fastpath::{NodeConfig, ServiceTable, ServiceTableHandle};

fn service(name: &str, ip: &str, lb: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "prod", "labels": labels},
           "spec": {"type": "LoadBalancer", "clusterIP": ip, "externalTrafficPolicy": "Local", "healthCheckNodePort": 32100,
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30090}]},
           "status": {"loadBalancer": {"ingress": [{"ip": lb}]}}})
}

fn slice(service: &str, endpoints: &[(&str, &str)]) -> Value {
    let eps: Vec<Value> = endpoints.iter().map(|(ip, node)| json!({"addresses": [ip], "nodeName": node})).collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{service}-x"), "namespace": "prod", "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}], "endpoints": eps})
}

fn node(name: &str, zone: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}}})
}

/// (local endpoints, cluster endpoints) the fast path has for the LB IP.
fn seen(handle: &ServiceTableHandle, lb: [u8; 4]) -> Option<(usize, usize)> {
    handle.load().lookup(&Addr::from_v4(lb), Proto::TCP, 80).map(|(p, _)| (p.local.len(), p.cluster.len()))
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_follow_changes_survive_outages_and_relist_after_410() {
    let api = ApiServer::start().await;
    api.apply(node("gw1", "zone-a"));
    api.apply(node("gw2", "zone-b"));
    api.apply(service("web", "198.19.128.30", "198.18.100.30", json!({})));
    api.apply(service(
        "theirs",
        "198.19.128.31",
        "198.18.100.31",
        json!({"service.kubernetes.io/service-proxy-name": "other"}),
    ));
    api.apply(slice("web", &[("198.19.1.200", "gw1"), ("198.19.2.200", "gw2")]));

    let client = kube::Client::try_from(kube::Config::new(api.url.parse().unwrap())).unwrap();
    let handle = Arc::new(ServiceTableHandle::new(ServiceTable::default()));
    let controller = Controller::new(Publisher::new(handle.clone(), None, NodeConfig::default()), "gw1".into(), None);
    let metrics = Arc::new(ControlMetrics::default());
    let health = Arc::new(ProxyHealth::new(Duration::from_secs(60)));
    let mut control = ControlLoop::new(Source::from_client(client, "gw1"), controller, metrics.clone(), health);
    let task = tokio::spawn(async move { while control.step().await.is_some() {} });

    // Initial list, then the watch.
    eventually("the initial list is published", || seen(&handle, [198, 18, 100, 30]) == Some((1, 2))).await;
    assert!(seen(&handle, [198, 18, 100, 31]).is_none(), "another proxy's Service is not ours");
    assert!(api.requests(NODES, false) >= 1);
    {
        let st = api.state.lock().unwrap();
        assert!(
            st.requests.iter().any(|r| r.starts_with(NODES) && r.contains("fieldSelector=metadata.name=gw1")),
            "only our Node is watched"
        );
        assert!(
            st.requests
                .iter()
                .any(|r| r.starts_with(SERVICES)
                    && r.contains("labelSelector=!service.kubernetes.io/service-proxy-name"))
        );
        assert!(st.requests.iter().any(|r| r.contains("watch=true") && r.contains("allowWatchBookmarks=true")));
    }

    // A watch event: a second local endpoint.
    api.apply(slice("web", &[("198.19.1.200", "gw1"), ("198.19.1.201", "gw1"), ("198.19.2.200", "gw2")]));
    eventually("a watch event is published", || seen(&handle, [198, 18, 100, 30]) == Some((2, 3))).await;
    // The loop recorded it as a sync: one EndpointSlice change, Services
    // translated, a table built in a measurable time.
    assert!(metrics.endpoint_changes.load(Ordering::Relaxed) >= 1);
    assert!(metrics.service_changes.load(Ordering::Relaxed) >= 2, "the list and the event each translate web");
    assert!(metrics.publication.count() >= 2 && metrics.publication.quantile(1.0) > 0.0);

    // The API server goes away: the last table stays in force.
    api.set_down(true);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(seen(&handle, [198, 18, 100, 30]), Some((2, 3)), "nothing is lost while the API server is down");
    // Changes made meanwhile arrive once it is back (the watch resumes).
    api.apply(slice("web", &[("198.19.1.200", "gw1")]));
    api.set_down(false);
    eventually("the watch resumes after the outage", || seen(&handle, [198, 18, 100, 30]) == Some((1, 1))).await;

    // A change made while the watchers were away, then history compacted:
    // resuming from their resourceVersion gets 410 Gone, so they relist.
    let lists_before = api.requests(SLICES, false);
    api.set_down(true);
    api.apply(slice("web", &[("198.19.1.200", "gw1"), ("198.19.1.202", "gw1")]));
    api.compact(); // the event the watchers have not seen is forgotten
    api.set_down(false);
    eventually("the relist after 410 is published", || seen(&handle, [198, 18, 100, 30]) == Some((2, 2))).await;
    assert!(api.requests(SLICES, false) > lists_before, "a relist happened");

    // A deleted Service leaves the table.
    api.delete("Service", "prod", "web");
    eventually("a deletion is published", || seen(&handle, [198, 18, 100, 30]).is_none()).await;
    task.abort();
}

/// `xskgate watch --kubeconfig` as an operator runs it: the real binary,
/// a kubeconfig file, the stand-in API server. After a change arrives
/// through the watch, `/metrics` (read over HTTP) shows it as a sync: the
/// table's build time is recorded and not zero, Services and an
/// EndpointSlice were counted as changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xskgate_watch_with_a_kubeconfig_publishes_follows_and_measures() {
    let api = ApiServer::start().await;
    api.apply(node("gw1", "zone-a"));
    api.apply(service("web", "198.19.128.30", "198.18.100.30", json!({})));
    api.apply(slice("web", &[("198.19.1.200", "gw1")]));
    let dir = std::env::temp_dir().join(format!("xskgate-kubeconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("config");
    api.write_kubeconfig(&kubeconfig);
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_xskgate"))
        .args(["watch", "--node-name", "gw1", "--metrics-bind-address", "127.0.0.1:0", "--kubeconfig"])
        .arg(&kubeconfig)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut listed = 0;
    let mut metrics_addr = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    // Once all three kinds are listed (and published), change the cluster:
    // the change then reaches xskgate as a watch event, not in a list.
    while listed < 3 {
        let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
            .await
            .expect("timed out")
            .unwrap()
            .expect("xskgate exited");
        if line.contains("serving /metrics") {
            let addr = line.split("metrics=").nth(1).and_then(|a| a.split_whitespace().next());
            metrics_addr = Some(addr.expect("the log line names the address").to_string());
        }
        listed += usize::from(line.contains("listed from the API server"));
    }
    api.apply(slice("web", &[("198.19.1.200", "gw1"), ("198.19.1.201", "gw1")]));
    // Keep reading the log, so that xskgate never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let url = format!("http://{}/metrics", metrics_addr.expect("xskgate logged its /metrics address"));
    let value = |text: &str, name: &str| -> f64 {
        let line = text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '));
        line.and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or_else(|| panic!("{name} missing:\n{text}"))
    };
    // Read until the figures show the watch event's sync.
    let text = loop {
        let url = url.clone();
        let text = tokio::task::spawn_blocking(move || ureq::get(&url).call()?.body_mut().read_to_string())
            .await
            .unwrap()
            .expect("GET /metrics");
        if value(&text, "kubeproxy_sync_proxy_rules_endpoint_changes_total") >= 1.0 || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(value(&text, "xskgate_table_publication_seconds_count") >= 2.0, "{text}");
    assert!(value(&text, "xskgate_table_publication_seconds_sum") > 0.0, "a build time of 0 is not a measurement");
    assert!(value(&text, "kubeproxy_sync_proxy_rules_service_changes_total") >= 2.0, "{text}");
    assert!(value(&text, "kubeproxy_sync_proxy_rules_endpoint_changes_total") >= 1.0, "{text}");
    assert!(value(&text, "kubeproxy_sync_proxy_rules_duration_seconds_count") >= 2.0, "{text}");
    child.kill().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
