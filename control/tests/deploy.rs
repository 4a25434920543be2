//! The shipped `control/deploy/` manifests are real Kubernetes YAML: they
//! parse into the API types, the DaemonSet runs in the host network on
//! gateway nodes with the capabilities XDP and AF_XDP need, the RBAC grants
//! what the watchers list and watch, every flag the DaemonSet passes is
//! one `xskgate run` accepts, it uses the pod's service account (no
//! kubeconfig), and what a restart keeps is on the host.

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::rbac::v1::ClusterRole;
use serde::Deserialize;

fn docs(path: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|d| serde_json::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn of_kind(docs: &[serde_json::Value], kind: &str) -> serde_json::Value {
    docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind}")).clone()
}

#[test]
fn daemonset_is_a_gateway_daemonset_with_valid_flags() {
    let d = docs(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/daemonset.yaml"));
    let ds: DaemonSet = serde_json::from_value(of_kind(&d, "DaemonSet")).expect("a DaemonSet");
    let pod = ds.spec.template.spec.expect("a pod spec");
    assert_eq!(pod.host_network, Some(true));
    assert!(pod.node_selector.unwrap().contains_key("node-role.kubernetes.io/gateway"));
    let c = &pod.containers[0];
    let caps = c.security_context.as_ref().unwrap().capabilities.as_ref().unwrap().add.clone().unwrap();
    for needed in ["BPF", "NET_ADMIN", "NET_RAW"] {
        assert!(caps.iter().any(|c| c == needed), "capability {needed} missing");
    }
    let args = c.args.clone().unwrap();
    assert_eq!(args[0], "run");
    // The service account, not a kubeconfig: in-cluster configuration.
    assert!(!args.iter().any(|a| a.starts_with("--kubeconfig") || a.starts_with("--manifests")), "{args:?}");
    assert!(d.iter().all(|doc| doc["kind"] != "ConfigMap"), "no hand-made kubeconfig ConfigMap");
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_xskgate")).args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for a in &args[1..] {
        let flag = a.split('=').next().unwrap();
        assert!(help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")), "xskgate run has no {flag}");
    }
    // What outlives a restart is on the host: --state-dir and --bpf-pin-dir
    // are inside hostPath mounts (else a new pod would start empty).
    let mounts = c.volume_mounts.clone().unwrap();
    let volumes = pod.volumes.clone().unwrap();
    for flag in ["--state-dir", "--bpf-pin-dir"] {
        let dir = args.iter().find_map(|a| a.strip_prefix(&format!("{flag}="))).unwrap_or_else(|| panic!("no {flag}"));
        let m = mounts
            .iter()
            .find(|m| dir.starts_with(&m.mount_path))
            .unwrap_or_else(|| panic!("{flag} {dir} is not mounted"));
        let v = volumes.iter().find(|v| v.name == m.name).unwrap();
        assert!(v.host_path.is_some(), "{flag} {dir} is on volume {}, not a hostPath", v.name);
    }
    let probe = c.liveness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
    assert_eq!(probe.path.as_deref(), Some("/livez"));
}

#[test]
fn rbac_grants_what_the_watchers_read() {
    let d = docs(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/rbac.yaml"));
    let role: ClusterRole = serde_json::from_value(of_kind(&d, "ClusterRole")).expect("a ClusterRole");
    let rules = role.rules.unwrap();
    for (group, resource) in [("", "services"), ("", "nodes"), ("discovery.k8s.io", "endpointslices")] {
        let ok = rules.iter().any(|r| {
            r.api_groups.as_ref().is_some_and(|g| g.iter().any(|g| g == group))
                && r.resources.as_ref().is_some_and(|x| x.iter().any(|x| x == resource))
                && ["list", "watch"].iter().all(|v| r.verbs.iter().any(|x| x == v))
        });
        assert!(ok, "no list/watch on {group}/{resource}");
    }
}
