//! `xskgate-bench control`: translation and publication at scale.
//!
//! 10,000 Services (LoadBalancer, alternating Cluster and Local policy) with
//! one EndpointSlice of 10 endpoints each, spread over 4 nodes, built as
//! k8s-openapi objects in memory:
//! - `full_sync_ms`: translate every Service and publish the table
//!   (start-up, or a relist after the API server came back);
//! - `one_change_ms`: one EndpointSlice gains an endpoint, from the object
//!   arriving to the new table being published (state update, translation
//!   of that one Service, table build, atomic swap).
//!
//! Medians of several rounds; each round starts from a fresh publisher.

use crate::report::{Args, median, progress, r3};
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;
use xskgate_conntrack::Addr;
use xskgate_control::object::Object;
use xskgate_control::publish::Publisher;
use xskgate_control::state::ClusterState;
use xskgate_control::translate::NodeIdentity;
use xskgate_fastpath::{NodeConfig, ServiceTable, ServiceTableHandle};

const SERVICES: usize = 10_000;
const ENDPOINTS: usize = 10;

/// The n-th address of 198.18.0.0/15 (131,072 addresses): endpoints take
/// the first 100,000, ClusterIPs and LoadBalancer IPs the next 2 × 10,000.
fn ip(n: usize) -> String {
    assert!(n < 1 << 17, "outside 198.18.0.0/15");
    std::net::Ipv4Addr::from(0xC612_0000 + n as u32).to_string()
}

fn service(i: usize) -> Object {
    let policy = if i.is_multiple_of(2) { "Cluster" } else { "Local" };
    let v = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
        "spec": {
            "type": "LoadBalancer",
            "clusterIP": ip(SERVICES * ENDPOINTS + i),
            "externalTrafficPolicy": policy,
            "healthCheckNodePort": if policy == "Local" && i < 2000 { Some(32000 + (i / 2) as u16) } else { None },
            // NodePorts are unique cluster-wide (30000-32767): at this scale
            // most LoadBalancers run with allocateLoadBalancerNodePorts: false.
            "allocateLoadBalancerNodePorts": i < 2000,
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080,
                       "nodePort": if i < 2000 { Some(30000 + i as u16) } else { None }}],
        },
        "status": {"loadBalancer": {"ingress": [{"ip": ip(SERVICES * ENDPOINTS + SERVICES + i)}]}},
    });
    Object::Service(Box::new(serde_json::from_value(v).expect("valid Service")))
}

/// Service `i`'s slice with `endpoints` endpoints over 4 nodes. An 11th
/// endpoint (the one a change adds) takes an address from the top of the
/// range, above every ClusterIP and LoadBalancer IP.
fn slice(i: usize, endpoints: usize) -> Object {
    let eps: Vec<serde_json::Value> = (0..endpoints)
        .map(|e| {
            let n = if e < ENDPOINTS { i * ENDPOINTS + e } else { (1 << 17) - 1 - i };
            json!({"addresses": [ip(n)], "nodeName": format!("gw{}", e % 4 + 1), "conditions": {"ready": true}})
        })
        .collect();
    let v = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-x"), "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps,
    });
    Object::EndpointSlice(Box::new(serde_json::from_value(v).expect("valid EndpointSlice")))
}

pub fn run(args: &Args) -> Result<(), String> {
    let rounds = if args.quick { 3 } else { 9 };
    progress(&format!("building {SERVICES} Services x {ENDPOINTS} endpoints"));
    let mut objects: Vec<Object> = (0..SERVICES).map(service).collect();
    objects.extend((0..SERVICES).map(|i| slice(i, ENDPOINTS)));
    let (base, warnings) = ClusterState::from_objects(objects);
    if !warnings.is_empty() {
        return Err(format!("bench objects: {warnings:?}"));
    }
    let node = NodeIdentity { name: "gw1".into(), ..NodeIdentity::default() };
    let gw = Addr::from_v4([198, 18, 0, 1]);
    let node_cfg = NodeConfig { addresses: vec![gw], snat_v4: Some(gw), ..NodeConfig::default() };
    let (mut full, mut one) = (Vec::new(), Vec::new());
    let mut translated = 0;
    for round in 0..rounds {
        progress(&format!("round {}/{rounds}", round + 1));
        let handle = Arc::new(ServiceTableHandle::new(ServiceTable::default()));
        let mut p = Publisher::new(handle.clone(), None, node_cfg.clone());
        let mut state = base.clone();
        let t = Instant::now();
        let out = p.full_sync(&state, &node);
        full.push(t.elapsed().as_secs_f64() * 1e3);
        if !out.published || handle.load().ports().len() != SERVICES {
            return Err(format!("full sync published {} ports", handle.load().ports().len()));
        }
        let changed_slice = slice(round * 7 % SERVICES, ENDPOINTS + 1);
        let t = Instant::now();
        let changed = state.apply(changed_slice);
        let out = p.update(&state, &node, &changed);
        one.push(t.elapsed().as_secs_f64() * 1e3);
        if !out.published {
            return Err("the change was not published".into());
        }
        translated = out.services_translated;
    }
    let (full_ms, one_ms) = (median(full), median(one));
    if args.json {
        println!(
            "{}",
            json!({"full_sync_ms": r3(full_ms), "one_change_ms": r3(one_ms), "services": SERVICES,
                   "endpoints_per_service": ENDPOINTS, "services_translated_per_change": translated})
        );
    } else {
        println!("## control: {SERVICES} Services x {ENDPOINTS} endpoints\n");
        println!("| step | median ms | target |");
        println!("|---|---|---|");
        println!("| full sync (translate all, publish) | {full_ms:.2} | < 100 |");
        println!("| one EndpointSlice change to a published table | {one_ms:.3} | < 1 |");
        println!("\nServices translated for one change: {translated}");
    }
    Ok(())
}
