//! The health servers through a real HTTP client: a healthCheckNodePort says
//! 200 with the local endpoint count, 503 when the last local endpoint goes,
//! 200 again when one comes back, and closes with its Service; `/healthz`
//! and `/livez` answer as kube-proxy's do. Byte-level body equality with
//! kube-proxy's layout is checked against the translation of real fixtures.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use xskgate_control::health::{self, ProxyHealth, ServiceHealth};
use xskgate_control::translate::LocalReady;
use xskgate_control::{manifest, node, state::ClusterState};

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into()
}

/// (status, content-type, nosniff, body) of a GET.
fn get(url: &str) -> Result<(u16, String, String, String), ureq::Error> {
    let mut r = agent().get(url).call()?;
    let h = |n: &str| r.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let (ct, nosniff) = (h("content-type"), h("x-content-type-options"));
    Ok((r.status().as_u16(), ct, nosniff, r.body_mut().read_to_string()?))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn health_check_node_port_follows_local_endpoints() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let proxy = Arc::new(ProxyHealth::new(Duration::from_millis(200)));
    let mut servers = ServiceHealth::new(IpAddr::V4(Ipv4Addr::LOCALHOST), proxy.clone());

    // The wanted set comes from the translation of a real fixture.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rules");
    let (state, _) = ClusterState::from_objects(manifest::load_dir(&dir).unwrap().objects);
    let t = state.translate(&node::identity("gw1".into(), None, &state));
    let from_fixtures = health::wanted(t.entries.iter());
    let v4 = |n| LocalReady { ipv4: Some(n), ipv6: None };
    assert_eq!(from_fixtures.get(&("t".to_string(), "local-lb".to_string())), Some(&(32000, v4(1))));
    assert_eq!(from_fixtures.get(&("t".to_string(), "local-empty".to_string())), Some(&(32001, v4(0))));

    // Serve one of them on a free port of 127.0.0.1.
    let port = free_port();
    let key = ("t".to_string(), "local-lb".to_string());
    let mut wanted = BTreeMap::from([(key.clone(), (port, v4(1)))]);
    rt.block_on(servers.sync(&wanted));
    let url = format!("http://127.0.0.1:{port}/any/path?x=1");
    let (status, ct, nosniff, body) = get(&url).unwrap();
    assert_eq!((status, ct.as_str(), nosniff.as_str()), (200, "application/json", "nosniff"));
    assert_eq!(
        body,
        "{\n\t\"service\": {\n\t\t\"namespace\": \"t\",\n\t\t\"name\": \"local-lb\"\n\t},\n\t\"localEndpoints\": 1,\n\t\"serviceProxyHealthy\": true\n}"
    );

    // The local endpoint goes: 503, so the load balancer stops sending here.
    wanted.insert(key.clone(), (port, v4(0)));
    rt.block_on(servers.sync(&wanted));
    let (status, _, _, body) = get(&url).unwrap();
    assert_eq!(status, 503);
    assert!(body.contains("\"localEndpoints\": 0"), "{body}");

    // It comes back: 200.
    wanted.insert(key.clone(), (port, v4(2)));
    rt.block_on(servers.sync(&wanted));
    assert_eq!(get(&url).unwrap().0, 200);

    // The proxy falls behind (a queued update older than the timeout): 503
    // with serviceProxyHealthy false, though endpoints exist.
    proxy.queued();
    std::thread::sleep(Duration::from_millis(250));
    let (status, _, _, body) = get(&url).unwrap();
    assert_eq!(status, 503);
    assert!(body.contains("\"serviceProxyHealthy\": false"), "{body}");
    proxy.updated();
    assert_eq!(get(&url).unwrap().0, 200);

    // The Service goes (or stops being Local): its port closes.
    rt.block_on(servers.sync(&BTreeMap::new()));
    std::thread::sleep(Duration::from_millis(50));
    assert!(get(&url).is_err(), "the health check port is closed");
    assert!(servers.ports().is_empty());
}

/// A dual-stack Service's health check on `::` (as `xskgate run` opens
/// it), in a namespace of its own: asked over IPv4 it counts the IPv4 local
/// endpoints, over IPv6 the IPv6 ones (kube-proxy's two per-family
/// servers), so a node with only an IPv4 pod says 200 over IPv4 and 503 over
/// IPv6; a single-stack Service answers with its family's count over both.
/// Needs root (a network namespace); fails without it.
#[test]
fn a_dual_stack_health_check_answers_for_the_family_it_is_asked_over() {
    let mut t = xskgate_tests::Topology::new();
    let ns = t.add_ns("h");
    xskgate_tests::in_ns(&ns, || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let proxy = Arc::new(ProxyHealth::new(Duration::from_secs(60)));
        let mut servers = ServiceHealth::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), proxy);
        let (dual, single) = (("t".to_string(), "dual".to_string()), ("t".to_string(), "single".to_string()));
        let wanted = BTreeMap::from([
            (dual, (32100, LocalReady { ipv4: Some(1), ipv6: Some(0) })),
            (single, (32101, LocalReady { ipv4: Some(2), ipv6: None })),
        ]);
        rt.block_on(servers.sync(&wanted));
        let answer = |url: &str| {
            let (status, _, _, body) = get(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            let n: u64 = body.split("\"localEndpoints\": ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
            (status, n)
        };
        assert_eq!(answer("http://127.0.0.1:32100/"), (200, 1), "over IPv4: the IPv4 pod");
        assert_eq!(answer("http://[::1]:32100/"), (503, 0), "over IPv6: no IPv6 endpoint here");
        assert_eq!(answer("http://127.0.0.1:32101/"), (200, 2));
        assert_eq!(answer("http://[::1]:32101/"), (200, 2), "a single-stack Service's count over either family");
    });
}

#[test]
fn healthz_and_livez_answer_like_kube_proxy() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let proxy = Arc::new(ProxyHealth::new(Duration::from_millis(100)));
    let (addr, _task) = rt.block_on(health::spawn_proxy_health("127.0.0.1:0".parse().unwrap(), proxy.clone())).unwrap();
    let (status, ct, nosniff, body) = get(&format!("http://{addr}/healthz")).unwrap();
    assert_eq!((status, ct.as_str(), nosniff.as_str()), (200, "application/json", "nosniff"));
    assert!(
        body.starts_with("{\"lastUpdated\": \"")
            && body.contains(" +0000 UTC m=+")
            && body.ends_with("\"nodeEligible\": true}"),
        "{body}"
    );
    let (status, _, _, body) = get(&format!("http://{addr}/livez")).unwrap();
    assert_eq!(status, 200);
    assert!(
        body.starts_with("{\"lastUpdated\": \"")
            && body.contains(",\"currentTime\": \"")
            && !body.contains("nodeEligible"),
        "{body}"
    );
    proxy.queued();
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(get(&format!("http://{addr}/healthz")).unwrap().0, 503);
    assert_eq!(get(&format!("http://{addr}/livez")).unwrap().0, 503);
    assert_eq!(get(&format!("http://{addr}/other")).unwrap().0, 503);
}

/// The response as bytes on the wire, read with a plain socket: the
/// status line and header names as kube-proxy's Go server writes them, a
/// Date in RFC 7231 form, a Content-Length that matches the body, and a
/// second request answered on the same (kept-alive) connection.
#[test]
fn responses_on_the_wire_look_like_kube_proxys() {
    use std::io::{Read, Write};
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let proxy = Arc::new(ProxyHealth::new(Duration::from_secs(60)));
    let (addr, _task) = rt.block_on(health::spawn_proxy_health("127.0.0.1:0".parse().unwrap(), proxy)).unwrap();
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn.write_all(
        b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\nGET /nothing HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).unwrap();
    let (first, second) = raw.split_at(raw.find("HTTP/1.1 503").expect("the second request was answered"));
    let (head, body) = first.split_once("\r\n\r\n").expect("a header block");
    let mut lines = head.lines();
    assert_eq!(lines.next(), Some("HTTP/1.1 200 OK"), "{raw}");
    let headers: Vec<&str> = lines.collect();
    assert!(headers.contains(&"Content-Type: application/json"), "{headers:?}");
    assert!(headers.contains(&"X-Content-Type-Options: nosniff"), "{headers:?}");
    assert!(headers.contains(&format!("Content-Length: {}", body.len()).as_str()), "{headers:?} for {body:?}");
    let date = headers.iter().find_map(|h| h.strip_prefix("Date: ")).expect("a Date header");
    assert!(date.ends_with(" GMT") && date.len() == 29, "{date:?}");
    assert!(second.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{second}");
}
