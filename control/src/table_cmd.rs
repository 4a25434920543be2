//! `xskgate table`: the computed table, without touching the network.
//!
//! The `--json` shape is a conformance contract (keep it stable):
//! `{"node": NAME, "services": [ {namespace, name, port_name, protocol,
//! cluster_ip, frontends: [{kind, address, port}], external_traffic_policy,
//! internal_traffic_policy, cluster_endpoints, local_endpoints,
//! health_check_node_port, local_ready_endpoint_count,
//! session_affinity_timeout_seconds} ] }`, one entry per Service port;
//! endpoints are sorted `"ip:port"` strings (`"[ip]:port"` for IPv6), `null`
//! for a set the Service never uses and `[]` for a used, empty one; a
//! NodePort frontend's address is `"*"`.

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
                "local_ready_endpoint_count": e.local_ready_endpoint_count,
                "session_affinity_timeout_seconds": e.affinity_timeout,
            })
        })
        .collect();
    json!({ "node": node, "services": services })
}

fn set_text(set: &Option<Vec<EndpointInfo>>) -> String {
    match set {
        None => "-".into(),
        Some(v) if v.is_empty() => "(none)".into(),
        Some(v) => v.iter().map(EndpointInfo::display).collect::<Vec<_>>().join(" "),
    }
}

/// The table a person reads.
pub fn to_text(node: &str, entries: &[PortEntry]) -> String {
    let mut rows = vec![[
        "SERVICE".to_string(),
        "PROTO".into(),
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
        let frontends = e
            .frontends
            .iter()
            .map(|f| match f.address {
                Some(a) => format!("{}={}", f.kind.name(), crate::translate::endpoint_string(a, f.port)),
                None => format!("{}=*:{}", f.kind.name(), f.port),
            })
            .collect::<Vec<_>>()
            .join(" ");
        let health = match e.health_check_node_port {
            Some(p) => format!(":{p} ({} local)", e.local_ready_endpoint_count),
            None => "-".into(),
        };
        rows.push([
            name,
            e.proto.name().to_ascii_uppercase(),
            frontends,
            format!("{}/{}", e.external_policy.name(), e.internal_policy.name()),
            set_text(&e.cluster),
            set_text(&e.local),
            health,
        ]);
    }
    let widths: Vec<usize> = (0..7).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    let mut out = format!("node {node}: {} service port(s)\n", entries.len());
    for r in &rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
