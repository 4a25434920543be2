//! `control/deploy/grafana-dashboard.json` queries only metrics the daemon
//! exports: every metric name in every panel's PromQL is one that
//! `metrics::render` writes (a histogram's `_bucket`, `_sum` and `_count`
//! included), rendered with a data path so that every family is present.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use xskgate_conntrack::{Config, FlowTable};
use xskgate_control::metrics::{ControlMetrics, DataPathSources, Sources, render};
use xskgate_fastpath::io::steer::SteerStats;
use xskgate_fastpath::io::xsk::WorkerSnapshot;
use xskgate_fastpath::{ServiceTable, ServiceTableHandle};

fn exported() -> BTreeSet<String> {
    let conntrack = Arc::new(FlowTable::new(Config { capacity: 1024, ..Config::default() }).unwrap());
    let sources = Sources {
        control: Arc::new(ControlMetrics::default()),
        services: Arc::new(ServiceTableHandle::new(ServiceTable::default())),
        data_path: Some(DataPathSources {
            workers: vec![Arc::new(Mutex::new(WorkerSnapshot::default()))],
            conntrack,
            steer: Arc::new(SteerStats::default),
        }),
    };
    let mut names = BTreeSet::new();
    for line in render(&sources).lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            names.insert(name.to_string());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

/// Metric names in a PromQL expression: identifiers of ours, not labels,
/// functions or keywords.
fn metrics_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut in_braces = 0;
    for c in expr.chars().chain([' ']) {
        match c {
            '{' => in_braces += 1,
            '}' => in_braces -= 1,
            _ => {}
        }
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
            continue;
        }
        if (in_braces == 0 || c == '{') && (word.starts_with("xskgate_") || word.starts_with("kubeproxy_")) {
            out.push(std::mem::take(&mut word));
        }
        word.clear();
    }
    out
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let exported = exported();
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 6, "drops, traffic, per Service, conntrack, SNAT, latency");
    let mut queried = BTreeSet::new();
    for panel in panels {
        let targets = panel["targets"].as_array().unwrap_or_else(|| panic!("a panel without targets: {panel}"));
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for t in targets {
            let expr = t["expr"].as_str().expect("a PromQL expr");
            let names = metrics_in(expr);
            assert!(!names.is_empty(), "{expr} queries no xskgate metric");
            for name in names {
                assert!(exported.contains(&name), "the dashboard queries {name}, which /metrics does not export");
                queried.insert(name);
            }
        }
    }
    for wanted in [
        "xskgate_drops_total",
        "xskgate_service_packets_total",
        "xskgate_conntrack_entries",
        "xskgate_snat_port_retries_total",
        "xskgate_table_publication_seconds_bucket",
    ] {
        assert!(queried.contains(wanted), "the dashboard has no panel over {wanted}");
    }
}

#[test]
fn metric_names_are_found_outside_label_matchers() {
    assert_eq!(
        metrics_in("sum by (le) (rate(xskgate_a_bucket{x=\"xskgate_not\"}[5m])) / kubeproxy_b"),
        ["xskgate_a_bucket", "kubeproxy_b"]
    );
}
