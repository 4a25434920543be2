//! `xskgate table`: the computed table, without touching the network.
//!
//! The `--json` shape is a conformance contract (keep it stable):
//! `{"node": NAME, "services": [ {namespace, name, port_name, protocol,
//! cluster_ip, frontends: [{kind, address, port}], external_traffic_policy,
//! internal_traffic_policy, cluster_endpoints, local_endpoints,
//! health_check_node_port, local_ready_endpoint_count,
//! local_ready_endpoints: {ipv4, ipv6}, session_affinity_timeout_seconds} ]
//! }`, one entry per Service port (both families of a dual-stack Service in
//! one; `local_ready_endpoint_count` is over both, `local_ready_endpoints`
//! per family, `null` for a family the Service does not have);
//! endpoints are sorted `"ip:port"` strings (`"[ip]:port"` for IPv6), `null`
//! for a set the Service never uses and `[]` for a used, empty one; a
//! NodePort frontend's address is `"*"`.
//!
//! The text has a row per Service port and family (FAMILY `IPv4`/`IPv6`):
//! that family's frontends (a NodePort's in each), endpoints and the health
//! check's local count as a check asked over that family answers it.

use crate::translate::{EndpointInfo, PortEntry};
use serde_json::{Value, json};

fn endpoints(set: &Option<Vec<EndpointInfo>>) -> Value {
    match set {
        None => Value::Null,
        Some(v) => {
            let mut s: Vec<String> = v.iter().map(EndpointInfo::display).collect();
            s.sort();
            json!(s)
        }
    }
}

/// The `--json` object.
pub fn to_json(node: &str, entries: &[PortEntry]) -> Value {
    let services: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!({
                "namespace": e.namespace,
                "name": e.name,
                "port_name": e.port_name,
                "protocol": e.proto.name().to_ascii_uppercase(),
                "cluster_ip": e.cluster_ips.first().map(|ip| ip.to_string()),
                "frontends": e.frontends.iter().map(|f| json!({
                    "kind": f.kind.name(),
                    "address": f.address.map_or_else(|| "*".to_string(), |a| a.to_string()),
                    "port": f.port,
                })).collect::<Vec<_>>(),
                "external_traffic_policy": e.external_policy.name(),
                "internal_traffic_policy": e.internal_policy.name(),
                "cluster_endpoints": endpoints(&e.cluster),
                "local_endpoints": endpoints(&e.local),
                "health_check_node_port": e.health_check_node_port,
                "local_ready_endpoint_count": e.local_ready.total(),
                "local_ready_endpoints": {"ipv4": e.local_ready.ipv4, "ipv6": e.local_ready.ipv6},
                "session_affinity_timeout_seconds": e.affinity_timeout,
            })
        })
        .collect();
    json!({ "node": node, "services": services })
}

fn set_text(set: &Option<Vec<EndpointInfo>>, v6: bool) -> String {
    match set {
        None => "-".into(),
        Some(v) => {
            let of_family: Vec<String> = v.iter().filter(|e| e.ip.is_ipv6() == v6).map(EndpointInfo::display).collect();
            if of_family.is_empty() { "(none)".into() } else { of_family.join(" ") }
        }
    }
}

/// The families an entry has rows for: those of its addressed frontends,
/// else of its endpoints, else IPv4.
fn families(e: &PortEntry) -> Vec<bool> {
    let addressed: Vec<bool> = e.frontends.iter().filter_map(|f| f.address.map(|a| a.is_ipv6())).collect();
    let endpoints: Vec<bool> = e.cluster.iter().chain(&e.local).flatten().map(|ep| ep.ip.is_ipv6()).collect();
    let from = if addressed.is_empty() { endpoints } else { addressed };
    let found: Vec<bool> = [false, true].into_iter().filter(|v6| from.contains(v6)).collect();
    if found.is_empty() { vec![false] } else { found }
}

/// The table a person reads.
pub fn to_text(node: &str, entries: &[PortEntry]) -> String {
    let mut rows = vec![[
        "SERVICE".to_string(),
        "PROTO".into(),
        "FAMILY".into(),
        "FRONTENDS".into(),
        "POLICY ext/int".into(),
        "CLUSTER ENDPOINTS".into(),
        "LOCAL ENDPOINTS".into(),
        "HEALTH".into(),
    ]];
    for e in entries {
        let name = if e.port_name.is_empty() {
            format!("{}/{}", e.namespace, e.name)
        } else {
            format!("{}/{}:{}", e.namespace, e.name, e.port_name)
        };
        for v6 in families(e) {
            let frontends = e
                .frontends
                .iter()
                .filter(|f| f.address.is_none_or(|a| a.is_ipv6() == v6))
                .map(|f| match f.address {
                    Some(a) => format!("{}={}", f.kind.name(), crate::translate::endpoint_string(a, f.port)),
                    None => format!("{}=*:{}", f.kind.name(), f.port),
                })
                .collect::<Vec<_>>()
                .join(" ");
            let health = match e.health_check_node_port {
                Some(p) => format!(":{p} ({} local)", e.local_ready.asked_over(v6)),
                None => "-".into(),
            };
            rows.push([
                name.clone(),
                e.proto.name().to_ascii_uppercase(),
                if v6 { "IPv6" } else { "IPv4" }.into(),
                frontends,
                format!("{}/{}", e.external_policy.name(), e.internal_policy.name()),
                set_text(&e.cluster, v6),
                set_text(&e.local, v6),
                health,
            ]);
        }
    }
    let widths: Vec<usize> = (0..8).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    let mut out = format!("node {node}: {} service port(s)\n", entries.len());
    for r in &rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
