//! `/metrics` in the Prometheus text exposition format (0.0.4): kube-proxy's
//! `kubeproxy_*` names where they apply, and `xskgate_*` for the data path.
//!
//! Contract: every drop reason of the pipeline and every I/O counter is
//! always present (zero included), so an alert can be written before the
//! first drop; per-Service counters carry `namespace`, `name` and
//! `port_name` labels of the service ports in the current table.
//! Latencies are recorded in hdrhistograms (microseconds) and exposed as
//! Prometheus histograms with kube-proxy's bucket layout.

use hdrhistogram::Histogram;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use xskgate_conntrack::FlowTable;
use xskgate_fastpath::io::steer::SteerStats;
use xskgate_fastpath::io::xsk::{IoCounters, WorkerSnapshot};
use xskgate_fastpath::{Counters, DropReason, ServiceTable};

/// A latency histogram (microseconds, 1 µs .. 1 h, 3 significant digits).
pub struct Latency(Mutex<Histogram<u64>>);

impl Default for Latency {
    fn default() -> Latency {
        Latency(Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")))
    }
}

impl Latency {
    pub fn record(&self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, 3_600_000_000);
        let mut h = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = h.record(us);
    }

    pub fn count(&self) -> u64 {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    /// The `q` quantile in seconds.
    pub fn quantile(&self, q: f64) -> f64 {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).value_at_quantile(q) as f64 / 1e6
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let h = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        // kube-proxy: exponential buckets from 1 ms, factor 2, 15 buckets.
        for i in 0..15 {
            let le_us = 1000u64 << i;
            let c = if h.is_empty() { 0 } else { h.count_between(0, le_us) };
            let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {c}", le_us as f64 / 1e6);
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.len());
        let _ = writeln!(out, "{name}_sum {}", h.mean() * h.len() as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {}", h.len());
    }
}

/// What the control plane records.
#[derive(Default)]
pub struct ControlMetrics {
    /// Translation + publication of one change (kube-proxy's sync).
    pub sync_duration: Latency,
    /// From receiving a change to the data path having it.
    pub network_programming: Latency,
    /// The atomic publication of a new table (swap + steering maps).
    pub publication: Latency,
    pub service_changes: AtomicU64,
    pub endpoint_changes: AtomicU64,
    pub last_sync_unix_seconds: AtomicU64,
    pub steering_errors: AtomicU64,
    /// When the change being applied was received (network programming
    /// latency counts from here).
    received: Mutex<Option<Instant>>,
}

impl ControlMetrics {
    /// A change was received at `at`.
    pub fn set_received(&self, at: Instant) {
        *self.received.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(at);
    }

    /// Time since the change being applied was received (zero before any).
    pub fn since_received(&self) -> Duration {
        self.received.lock().unwrap_or_else(std::sync::PoisonError::into_inner).map(|t| t.elapsed()).unwrap_or_default()
    }
}

/// Everything `/metrics` reads.
pub struct Sources {
    pub control: Arc<ControlMetrics>,
    pub services: Arc<xskgate_fastpath::ServiceTableHandle>,
    /// `None` without a data path (`xskgate watch`): the pipeline's and the
    /// I/O layer's counters are then all zero.
    pub data_path: Option<DataPathSources>,
}

/// What `/metrics` reads of a running data path.
pub struct DataPathSources {
    pub workers: Vec<Arc<Mutex<WorkerSnapshot>>>,
    pub conntrack: Arc<FlowTable>,
    pub steer: Arc<dyn Fn() -> SteerStats + Send + Sync>,
}

/// Serves `/metrics` (`render` of `sources`) on `bind` until the task is
/// aborted; any other path answers 503. Returns the bound address.
///
/// # Errors
/// The address cannot be bound.
pub async fn serve(
    bind: std::net::SocketAddr,
    sources: Sources,
) -> std::io::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    let sources = Arc::new(sources);
    let task = crate::health::spawn_server_as(
        listener,
        "text/plain; version=0.0.4; charset=utf-8",
        Arc::new(move |path: &str| match path.split('?').next() {
            Some("/metrics") => (200, render(&sources)),
            _ => (503, String::new()),
        }),
    );
    Ok((addr, task))
}

fn counter(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
}

fn gauge(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
}

/// A label value as the text format wants it (backslash, quote and newline
/// escaped); borrowed when there is nothing to escape, as for every valid
/// Kubernetes name, so that 10,000 Services render without 30,000 copies.
fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains(['\\', '"', '\n']) {
        return std::borrow::Cow::Borrowed(s);
    }
    std::borrow::Cow::Owned(s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n"))
}

/// The whole exposition.
pub fn render(s: &Sources) -> String {
    let mut pipeline = Counters::default();
    let mut io = IoCounters::default();
    for w in s.data_path.iter().flat_map(|d| &d.workers) {
        let w = w.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        pipeline.add(&w.pipeline);
        io.add(&w.io);
    }
    let mut out = String::with_capacity(16 * 1024);
    let c = &s.control;
    c.sync_duration.render(
        &mut out,
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "SyncProxyRules latency in seconds (translation and publication of a change).",
    );
    c.network_programming.render(
        &mut out,
        "kubeproxy_network_programming_duration_seconds",
        "In-cluster network programming latency in seconds (change received to live in the data path).",
    );
    gauge(
        &mut out,
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "The last time the data path was successfully programmed.",
        c.last_sync_unix_seconds.load(Relaxed),
    );
    counter(
        &mut out,
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "Cumulative proxy rules Service changes.",
        c.service_changes.load(Relaxed),
    );
    counter(
        &mut out,
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "Cumulative proxy rules Endpoint changes.",
        c.endpoint_changes.load(Relaxed),
    );
    c.publication.render(
        &mut out,
        "xskgate_table_publication_seconds",
        "Time to translate the changed Services and publish the new service table (one atomic swap).",
    );
    counter(
        &mut out,
        "xskgate_steering_errors_total",
        "Steering map updates that failed (a full map).",
        c.steering_errors.load(Relaxed),
    );

    let _ = writeln!(out, "# HELP xskgate_drops_total Packets dropped by the pipeline, by reason.");
    let _ = writeln!(out, "# TYPE xskgate_drops_total counter");
    for r in DropReason::ALL {
        let _ = writeln!(out, "xskgate_drops_total{{reason=\"{}\"}} {}", r.name(), pipeline.drop_count(*r));
    }
    counter(&mut out, "xskgate_forwarded_packets_total", "Packets forwarded by the pipeline.", pipeline.forwarded);
    counter(&mut out, "xskgate_rejected_packets_total", "Rejects generated (TCP RST, ICMP port unreachable).", {
        pipeline.rejected
    });
    counter(
        &mut out,
        "xskgate_echo_replies_total",
        "Echo requests to a served LoadBalancer IP or externalIP answered by the gateway (--vip-echo).",
        pipeline.echo_replies,
    );
    counter(
        &mut out,
        "xskgate_time_exceeded_sent_total",
        "ICMP time exceeded sent for Service packets whose TTL (hop limit) ran out here (each also a ttl_expired drop).",
        pipeline.time_exceeded_sent,
    );
    counter(&mut out, "xskgate_passed_packets_total", "Packets the pipeline did not own.", pipeline.passed);
    counter(&mut out, "xskgate_flows_created_total", "Conntrack flows created.", pipeline.flows_created);
    counter(
        &mut out,
        "xskgate_snat_port_retries_total",
        "SNAT ports new flows passed over because their reply tuple was taken (rising: SNAT ports running out).",
        pipeline.snat_port_retries,
    );
    counter(&mut out, "xskgate_icmp_errors_translated_total", "ICMP errors translated.", {
        pipeline.icmp_errors_translated
    });
    for (name, help, v) in io.fields() {
        if name == "busy_polls" || name == "idle_polls" {
            continue;
        }
        counter(&mut out, &format!("xskgate_io_{name}_total"), help, v);
    }
    let _ = writeln!(out, "# HELP xskgate_worker_polls_total Worker rounds, busy (found frames) or idle.");
    let _ = writeln!(out, "# TYPE xskgate_worker_polls_total counter");
    let _ = writeln!(out, "xskgate_worker_polls_total{{state=\"busy\"}} {}", io.busy_polls);
    let _ = writeln!(out, "xskgate_worker_polls_total{{state=\"idle\"}} {}", io.idle_polls);
    let (entries, capacity) = s.data_path.as_ref().map_or((0, 0), |d| (d.conntrack.len(), d.conntrack.capacity()));
    gauge(
        &mut out,
        "xskgate_conntrack_entries",
        "Flows in the conntrack table (each both directions).",
        entries as u64,
    );
    gauge(
        &mut out,
        "xskgate_conntrack_capacity",
        "Capacity of the conntrack table in flows (--conntrack-max).",
        capacity as u64,
    );
    let ct = s.data_path.as_ref().map(|d| d.conntrack.stats()).unwrap_or_default();
    let _ = writeln!(
        out,
        "# HELP xskgate_conntrack_events_total Conntrack table events: inserts refused as full, flows evicted \
         early to make room, expired, flushed with their endpoint, closed TCP flows whose SNAT port a new flow took."
    );
    let _ = writeln!(out, "# TYPE xskgate_conntrack_events_total counter");
    for (event, v) in [
        ("full", ct.full),
        ("early_drop", ct.early_drops),
        ("expired", ct.expired),
        ("flushed", ct.flushed),
        ("closed_reused", ct.closed_reused),
    ] {
        let _ = writeln!(out, "xskgate_conntrack_events_total{{event=\"{event}\"}} {v}");
    }
    let st = s.data_path.as_ref().map(|d| (d.steer)()).unwrap_or_default();
    let _ = writeln!(
        out,
        "# HELP xskgate_xdp_frames_total Frames seen by the XDP steering program, by decision (held: dropped for want of a socket while a restart was under way)."
    );
    let _ = writeln!(out, "# TYPE xskgate_xdp_frames_total counter");
    let _ = writeln!(out, "xskgate_xdp_frames_total{{decision=\"steered\"}} {}", st.steered);
    let _ = writeln!(out, "xskgate_xdp_frames_total{{decision=\"passed\"}} {}", st.passed);
    let _ = writeln!(out, "xskgate_xdp_frames_total{{decision=\"no_interface\"}} {}", st.no_interface);
    let _ = writeln!(out, "xskgate_xdp_frames_total{{decision=\"held\"}} {}", st.held);

    let table: Arc<ServiceTable> = s.services.load_full();
    for (metric, help) in [
        ("xskgate_service_packets_total", "Packets forwarded per service port."),
        ("xskgate_service_bytes_total", "Bytes (IP) forwarded per service port."),
    ] {
        let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} counter");
        for p in table.ports() {
            let sc = pipeline.service(p.id);
            let v = if metric.ends_with("packets_total") { sc.packets } else { sc.bytes };
            let _ = writeln!(
                out,
                "{metric}{{namespace=\"{}\",name=\"{}\",port_name=\"{}\",family=\"{}\"}} {v}",
                escape(&p.name.namespace),
                escape(&p.name.name),
                escape(&p.name.port_name),
                if p.frontends.first().is_some_and(|f| f.addr.is_v4()) { "ipv4" } else { "ipv6" },
            );
        }
    }
    // Only the non-zero ones: 10,000 Services times every reason would be
    // 120,000 lines of zeros.
    let metric = "xskgate_service_drops_total";
    let _ = writeln!(out, "# HELP {metric} Packets of a service port dropped, by reason (non-zero only).");
    let _ = writeln!(out, "# TYPE {metric} counter");
    for p in table.ports() {
        for (r, n) in DropReason::ALL.iter().zip(pipeline.service_drops(p.id)) {
            if *n > 0 {
                let _ = writeln!(
                    out,
                    "{metric}{{namespace=\"{}\",name=\"{}\",port_name=\"{}\",reason=\"{}\"}} {n}",
                    escape(&p.name.namespace),
                    escape(&p.name.name),
                    escape(&p.name.port_name),
                    r.name(),
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_every_reason_is_present() {
        let control = Arc::new(ControlMetrics::default());
        control.sync_duration.record(Duration::from_micros(1500));
        control.sync_duration.record(Duration::from_millis(40));
        let conntrack = Arc::new(
            FlowTable::new(xskgate_conntrack::Config { capacity: 1024, ..xskgate_conntrack::Config::default() })
                .unwrap(),
        );
        let mut snap = WorkerSnapshot::default();
        snap.pipeline.drops[DropReason::NoLocalEndpoints as usize] = 7;
        snap.pipeline.snat_port_retries = 5;
        let s = Sources {
            control,
            services: Arc::new(xskgate_fastpath::ServiceTableHandle::new(ServiceTable::default())),
            data_path: Some(DataPathSources {
                workers: vec![Arc::new(Mutex::new(snap))],
                conntrack,
                steer: Arc::new(SteerStats::default),
            }),
        };
        let text = render(&s);
        assert!(text.contains("xskgate_drops_total{reason=\"no_local_endpoints\"} 7"), "{text}");
        assert!(text.contains("xskgate_snat_port_retries_total 5"), "{text}");
        for r in DropReason::ALL {
            assert!(text.contains(&format!("reason=\"{}\"", r.name())));
        }
        assert!(text.contains("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.001\"} 0"));
        assert!(text.contains("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.002\"} 1"));
        assert!(text.contains("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("xskgate_conntrack_capacity "));
        assert!(text.contains("xskgate_conntrack_events_total{event=\"closed_reused\"} 0"));
    }
}
