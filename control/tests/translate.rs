//! Every translation rule of kube-proxy's `CategorizeEndpoints`, checked on
//! YAML fixtures in `kubectl get -o yaml` shape (`tests/fixtures/rules`)
//! through the `xskgate table --json` contract, for node `gw1` in `zone-a`.

use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;
use xskgate_control::{manifest, node, state::ClusterState, table_cmd};

fn fixtures(dir: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(dir)
}

fn table(dir: &str, node_name: &str) -> (Value, Vec<String>) {
    let loaded = manifest::load_dir(&fixtures(dir)).unwrap();
    let (state, mut warnings) = ClusterState::from_objects(loaded.objects);
    warnings.extend(loaded.warnings);
    let id = node::identity(node_name.to_string(), None, &state);
    let t = state.translate(&id);
    warnings.extend(t.warnings);
    (table_cmd::to_json(&id.name, &t.entries), warnings)
}

fn entry<'a>(t: &'a Value, name: &str, port_name: &str) -> &'a Value {
    t["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name && s["port_name"] == port_name)
        .unwrap_or_else(|| panic!("no entry for {name}:{port_name}"))
}

fn eps(list: &[&str]) -> Value {
    json!(list)
}

#[test]
fn cluster_policy_named_target_ports_dedup_and_ingress_modes() {
    let (t, _) = table("rules", "gw1");
    let e = entry(&t, "cluster-lb", "web");
    assert_eq!(e["protocol"], "TCP");
    assert_eq!(e["cluster_ip"], "198.19.128.1");
    assert_eq!(
        e["frontends"],
        json!([
            {"kind": "ClusterIP", "address": "198.19.128.1", "port": 80},
            {"kind": "NodePort", "address": "*", "port": 30080},
            {"kind": "LoadBalancer", "address": "198.18.100.1", "port": 80},
        ]),
        "the ipMode: Proxy ingress IP is left to the load balancer"
    );
    assert_eq!((&e["external_traffic_policy"], &e["internal_traffic_policy"]), (&json!("Cluster"), &json!("Cluster")));
    // Port 9090 in slice b: the named targetPort resolves per slice; the
    // not-ready duplicate of 198.19.1.10:8080 in slice c does not hide the ready one.
    assert_eq!(e["cluster_endpoints"], eps(&["198.19.1.10:8080", "198.19.2.10:8080", "198.19.3.10:9090"]));
    assert_eq!(e["local_endpoints"], Value::Null, "never uses Local: kube-proxy's nil");
    assert_eq!(e["health_check_node_port"], Value::Null);
    assert_eq!(e["session_affinity_timeout_seconds"], Value::Null);
}

#[test]
fn local_policy_sets_health_check_and_terminating_fallback() {
    let (t, _) = table("rules", "gw1");
    let e = entry(&t, "local-lb", "web");
    assert_eq!(e["external_traffic_policy"], "Local");
    assert_eq!(e["cluster_endpoints"], eps(&["198.19.1.20:8080", "198.19.2.20:8080"]));
    assert_eq!(e["local_endpoints"], eps(&["198.19.1.20:8080"]), "ready local endpoints only");
    assert_eq!(e["health_check_node_port"], 32000);
    assert_eq!(e["local_ready_endpoint_count"], 1);

    // No ready local endpoint: Local falls back to serving ∧ terminating
    // on its own, while Cluster keeps the ready remote one.
    let e = entry(&t, "local-terminating", "web");
    assert_eq!(e["local_endpoints"], eps(&["198.19.1.30:8080"]));
    assert_eq!(e["cluster_endpoints"], eps(&["198.19.2.30:8080"]));
    assert_eq!(e["local_ready_endpoint_count"], 0, "a terminating endpoint is not counted as healthy");

    // Used but empty: [] not null.
    let e = entry(&t, "local-empty", "");
    assert_eq!((&e["cluster_endpoints"], &e["local_endpoints"]), (&json!([]), &json!([])));
    assert_eq!(e["health_check_node_port"], 32001);
    assert_eq!(e["local_ready_endpoint_count"], 0);

    // internalTrafficPolicy Local on a ClusterIP: only the Local set is used.
    let e = entry(&t, "itp-local", "");
    assert_eq!(e["internal_traffic_policy"], "Local");
    assert_eq!(e["cluster_endpoints"], Value::Null);
    assert_eq!(e["local_endpoints"], eps(&["198.19.1.50:8080"]));
}

#[test]
fn condition_defaults_and_cluster_terminating_fallback() {
    let (t, _) = table("rules", "gw1");
    // No ready endpoint: serving ∧ terminating ones; `ready: false` with
    // serving unset means not serving.
    assert_eq!(entry(&t, "all-terminating", "")["cluster_endpoints"], eps(&["198.19.1.60:8080"]));
    // Conditions unset (or empty) mean ready.
    assert_eq!(entry(&t, "defaults", "")["cluster_endpoints"], eps(&["198.19.1.70:8080", "198.19.1.71:8080"]));
}

#[test]
fn topology_hints_filter_only_when_opted_in_complete_and_matching() {
    let (t, _) = table("rules", "gw1");
    let cluster = |name: &str| entry(&t, name, "")["cluster_endpoints"].clone();
    assert_eq!(cluster("topo-zone"), eps(&["198.19.1.80:8080"]), "zone-a hint only");
    assert_eq!(
        cluster("topo-incomplete"),
        eps(&["198.19.1.90:8080", "198.19.2.90:8080"]),
        "a ready endpoint lacks hints"
    );
    assert_eq!(cluster("topo-other-zone"), eps(&["198.19.2.100:8080", "198.19.2.101:8080"]), "no hint for our zone");
    assert_eq!(cluster("topo-old-annotation"), eps(&["198.19.1.110:8080"]), "topology-aware-hints: auto");
    assert_eq!(cluster("topo-not-opted"), eps(&["198.19.1.120:8080", "198.19.2.120:8080"]), "Disabled");
    // PreferSameNode: node hints win over zone hints (both endpoints are in
    // zone-a); Local ignores hints.
    let e = entry(&t, "same-node", "");
    assert_eq!(e["cluster_endpoints"], eps(&["198.19.1.130:8080"]));
    assert_eq!(e["local_endpoints"], eps(&["198.19.1.130:8080"]));
}

#[test]
fn multiport_affinity_dual_stack_external_ips() {
    let (t, warnings) = table("rules", "gw1");
    let http = entry(&t, "multiport", "http");
    let dns = entry(&t, "multiport", "dns");
    assert_eq!((&http["protocol"], &dns["protocol"]), (&json!("TCP"), &json!("UDP")));
    assert_eq!(http["cluster_endpoints"], eps(&["198.19.1.140:8080"]));
    assert_eq!(dns["cluster_endpoints"], eps(&["198.19.1.140:5353"]));
    assert_eq!(http["session_affinity_timeout_seconds"], 10_800, "kube-proxy's default");
    assert_eq!(entry(&t, "affinity-60", "")["session_affinity_timeout_seconds"], 60);

    let ds = entry(&t, "dual-stack", "");
    assert_eq!(ds["frontends"][1], json!({"kind": "ClusterIP", "address": "2001:db8:128::16", "port": 80}));
    assert_eq!(
        ds["cluster_endpoints"],
        eps(&["198.19.1.160:8080", "[2001:db8:1::160]:8080"]),
        "both families; an IPv4 address in an IPv6 slice is skipped"
    );
    let mismatch =
        "EndpointSlice t/dual-stack-6: addressType IPv6 but endpoint 198.19.9.9 is IPv4; that endpoint is skipped";
    assert!(warnings.iter().any(|w| w == mismatch), "{warnings:?}");

    // SingleStack with two families: its primary family only, said once.
    let single = entry(&t, "single-stack-two", "");
    assert_eq!(single["frontends"], json!([{"kind": "ClusterIP", "address": "2001:db8:128::18", "port": 80}]));
    assert_eq!(single["cluster_endpoints"], eps(&["[2001:db8:1::180]:8080"]));
    let said: Vec<&String> = warnings.iter().filter(|w| w.starts_with("Service t/single-stack-two:")).collect();
    assert_eq!(said.len(), 1, "{warnings:?}");
    assert!(
        said[0].contains("ipFamilyPolicy SingleStack with 2 ipFamilies")
            && said[0].ends_with("served as IPv6 only; IPv4 skipped")
    );

    let ext = entry(&t, "external-ip", "");
    assert_eq!(ext["frontends"][1], json!({"kind": "ExternalIP", "address": "198.18.200.1", "port": 80}));
    assert_eq!(ext["external_traffic_policy"], "Cluster", "Local applies to NodePort and LoadBalancer only");
    assert!(warnings.iter().any(|w| w.contains("Service t/external-ip") && w.contains("\"bogus\"")), "{warnings:?}");
}

#[test]
fn invalid_objects_are_skipped_with_a_line_naming_them_and_the_rest_stays() {
    let (t, warnings) = table("rules", "gw1");
    let bad = entry(&t, "bad-ports", "ok");
    assert_eq!(bad["frontends"][0]["port"], 83);
    for (port, why) in [("huge", "out of range"), ("sctp", "SCTP"), ("foo", "unknown protocol")] {
        assert!(
            warnings.iter().any(|w| w.contains("Service t/bad-ports") && w.contains(port) && w.contains(why)),
            "no warning for {port}: {warnings:?}"
        );
    }
    assert!(warnings.iter().any(|w| w.contains("60-broken.yaml") && w.contains("not valid YAML")), "{warnings:?}");
    let names: Vec<&str> = t["services"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    for skipped in ["headless", "other-proxy", "ext-name", "broken"] {
        assert!(!names.contains(&skipped), "{skipped} must not be proxied");
    }
    assert_eq!(names.len(), 20, "{names:?}");
    assert_eq!(t["node"], "gw1");
}

#[test]
fn node_name_mismatch_is_diagnosed_with_the_fix() {
    let (t, warnings) = table("misnamed", "gw1");
    let e = entry(&t, "web", "");
    assert_eq!(e["local_endpoints"], json!([]), "nothing is local under the wrong name");
    let w = warnings.iter().find(|w| w.contains("none on node \"gw1\"")).expect("a diagnosis");
    assert!(w.contains("gw1.cluster.internal") && w.contains("domain suffix"), "{w}");
    assert!(w.contains("--node-name=gw1.cluster.internal"), "{w}");
    // Under the right name: local endpoints, no warning.
    let (t, warnings) = table("misnamed", "gw1.cluster.internal");
    assert_eq!(entry(&t, "web", "")["local_endpoints"], eps(&["198.19.1.200:8080"]));
    assert!(warnings.iter().all(|w| !w.contains("none on node")), "{warnings:?}");
    // An unrelated name gives no false alarm.
    let (_, warnings) = table("misnamed", "edge-7");
    assert!(warnings.iter().all(|w| !w.contains("none on node")), "{warnings:?}");
}

/// The real binary, as an operator runs it.
#[test]
fn xskgate_table_cli_prints_json_and_text() {
    let bin = env!("CARGO_BIN_EXE_xskgate");
    let out = Command::new(bin)
        .args(["table", "--manifests"])
        .arg(fixtures("rules"))
        .args(["--node-name", "gw1", "--cluster-cidr", "198.19.0.0/17", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    assert_eq!(entry(&v, "local-lb", "web")["local_endpoints"], eps(&["198.19.1.20:8080"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad-ports"), "warnings go to stderr: {stderr}");

    let out = Command::new(bin)
        .args(["table", "--manifests"])
        .arg(fixtures("rules"))
        .args(["--node-name", "gw1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("node gw1: 20 service port(s)"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("t/local-lb:web") && l.contains("Local/Cluster") && l.contains(":32000 (1 local)")),
        "{text}"
    );

    let out =
        Command::new(bin).args(["table", "--manifests", "/nonexistent/xskgate", "--node-name", "x"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read manifest directory"));
    let out = Command::new(bin)
        .args(["table", "--manifests"])
        .arg(fixtures("rules"))
        .args(["--node-name", "gw1", "--cluster-cidr", "300.0.0.0/8"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// The README's first command runs on this example: it must load cleanly and
/// show seed 004's picture (pod-a local to gw1, pods b and c to gw2) in both
/// families of its dual-stack Services; the text has a row per family.
#[test]
fn reference_example_loads_cleanly_and_shows_both_policies() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/reference");
    let loaded = manifest::load_dir(&dir).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let (state, warnings) = ClusterState::from_objects(loaded.objects);
    assert!(warnings.is_empty(), "{warnings:?}");
    let gw1 = vec!["198.19.1.10:8080", "[2001:db8:19:1::10]:8080"];
    let gw2 = vec!["198.19.2.10:8080", "198.19.2.11:8080", "[2001:db8:19:2::10]:8080", "[2001:db8:19:2::11]:8080"];
    for (gw, local, count) in [("gw1", gw1, 1), ("gw2", gw2, 2)] {
        let id = node::identity(gw.to_string(), None, &state);
        assert_eq!(id.zone.as_deref(), Some("zone-a"), "zone from the Node object");
        let t = state.translate(&id);
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
        let v = table_cmd::to_json(gw, &t.entries);
        let e = entry(&v, "whoami-local", "http");
        assert_eq!(e["local_endpoints"], json!(local));
        assert_eq!(e["local_ready_endpoints"], json!({"ipv4": count, "ipv6": count}));
        assert_eq!(e["local_ready_endpoint_count"], 2 * count);
        let addresses: Vec<&str> =
            e["frontends"].as_array().unwrap().iter().map(|f| f["address"].as_str().unwrap()).collect();
        assert_eq!(addresses, ["198.19.128.10", "2001:db8:19:128::10", "*", "198.18.100.10", "2001:db8:18:100::10"]);
        assert_eq!(entry(&v, "whoami-cluster", "http")["cluster_endpoints"].as_array().unwrap().len(), 6);
        let text = table_cmd::to_text(gw, &t.entries);
        let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("default/whoami-local:http")).collect();
        assert_eq!(rows.len(), 2, "a row per family:\n{text}");
        assert!(rows[0].contains(" IPv4 ") && rows[0].contains("LoadBalancer=198.18.100.10:80"), "{text}");
        assert!(!rows[0].contains("2001:db8"), "the IPv4 row has IPv4 only: {text}");
        assert!(rows[1].contains(" IPv6 ") && rows[1].contains("LoadBalancer=[2001:db8:18:100::10]:80"), "{text}");
        assert!(rows[1].contains("NodePort=*:30080") && !rows[1].contains("198.19."), "{text}");
        assert!(rows[1].ends_with(&format!(":32080 ({count} local)")), "{text}");
    }
}
