//! The control loop, the same for `xskgate run` and `xskgate watch` and
//! for every [`Source`]: [`ControlLoop::step`] takes the source's next
//! [`Change`] and gives it to the [`Controller`], records it in the
//! [`ControlMetrics`] and tells the [`ProxyHealth`].
//!
//! The [`Controller`] is the loop's state machine, independent of where
//! objects come from: a change updates the cluster state, re-translates
//! the Services it touched and publishes through the [`Publisher`]. Every
//! warning is logged once.

use crate::health::ProxyHealth;
use crate::metrics::ControlMetrics;
use crate::node;
use crate::object::{Change, Key, Kind, Loaded, Object};
use crate::publish::{Outcome, Publisher};
use crate::source::Source;
use crate::state::ClusterState;
use crate::translate::NodeIdentity;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};
use tracing::{info, warn};

pub struct Controller {
    state: ClusterState,
    publisher: Publisher,
    node_name: String,
    zone_flag: Option<String>,
    identity: NodeIdentity,
    warned: BTreeSet<String>,
}

impl Controller {
    pub fn new(publisher: Publisher, node_name: String, zone_flag: Option<String>) -> Controller {
        let state = ClusterState::default();
        let identity = node::identity(node_name.clone(), zone_flag.as_deref(), &state);
        Controller { state, publisher, node_name, zone_flag, identity, warned: BTreeSet::new() }
    }

    pub fn identity(&self) -> &NodeIdentity {
        &self.identity
    }

    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    pub fn publisher_mut(&mut self) -> &mut Publisher {
        &mut self.publisher
    }

    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    fn log(&mut self, warnings: impl IntoIterator<Item = String>) {
        for w in warnings {
            if self.warned.insert(w.clone()) {
                warn!("{w}");
            }
        }
    }

    /// Publishes the Services in `changed` (all of them if this node's
    /// identity changed, e.g. its zone label).
    fn publish(&mut self, mut changed: BTreeSet<Key>) -> Outcome {
        let identity = node::identity(self.node_name.clone(), self.zone_flag.as_deref(), &self.state);
        if identity != self.identity {
            self.identity = identity;
            changed.extend(self.state.services().keys().cloned());
        }
        let out = self.publisher.update(&self.state, &self.identity, &changed);
        self.log(out.warnings.clone());
        if let Some(w) = self.state.diagnose_node_name(&self.identity, self.publisher.entries()) {
            self.log([w]);
        }
        if out.published {
            info!(
                generation = self.publisher.generation(),
                services_translated = out.services_translated,
                udp_flows_flushed = out.udp_flows_flushed,
                build_us = out.build_time.as_micros() as u64,
                flush_us = out.flush_time.as_micros() as u64,
                "published service table"
            );
        }
        out
    }

    /// Applies one change from a source and publishes the result as one
    /// table.
    pub fn handle(&mut self, change: Change) -> Outcome {
        match change {
            Change::All(loaded) => self.reset(loaded),
            Change::Kind(kind, objects) => self.reset_kind(kind, objects),
            Change::Edit { applied, deleted, warnings } => self.apply_all(applied, deleted, warnings),
        }
    }

    /// Replaces everything (a reloaded directory).
    pub fn reset(&mut self, loaded: Loaded) -> Outcome {
        self.log(loaded.warnings);
        let (new, warnings) = ClusterState::from_objects(loaded.objects);
        self.log(warnings);
        let changed = self.state.replace(new);
        self.publish(changed)
    }

    /// Replaces every object of one kind (a relist of that kind).
    pub fn reset_kind(&mut self, kind: Kind, objects: Vec<Object>) -> Outcome {
        let new = self.state.with_kind_replaced(kind, objects);
        let changed = self.state.replace(new);
        self.publish(changed)
    }

    /// Objects added, changed and deleted (watch events, edited files),
    /// published as one table. A deleted Node's key is `("", name)`.
    pub fn apply_all(&mut self, applied: Vec<Object>, deleted: Vec<(Kind, Key)>, warnings: Vec<String>) -> Outcome {
        self.log(warnings);
        let mut changed = BTreeSet::new();
        for (kind, key) in &deleted {
            changed.extend(match kind {
                Kind::Service => self.state.delete_service(key),
                Kind::EndpointSlice => self.state.delete_slice(key),
                Kind::Node => self.state.delete_node(&key.1),
            });
        }
        for o in applied {
            changed.extend(self.state.apply(o));
        }
        self.publish(changed)
    }
}

/// A source feeding a controller, with what the loop reports to.
pub struct ControlLoop {
    source: Source,
    controller: Controller,
    metrics: Arc<ControlMetrics>,
    health: Arc<ProxyHealth>,
}

impl ControlLoop {
    pub fn new(
        source: Source,
        controller: Controller,
        metrics: Arc<ControlMetrics>,
        health: Arc<ProxyHealth>,
    ) -> ControlLoop {
        ControlLoop { source, controller, metrics, health }
    }

    pub fn controller(&self) -> &Controller {
        &self.controller
    }

    pub fn source_name(&self) -> &'static str {
        self.source.name()
    }

    /// Waits for the source's next change and applies it: the health is
    /// told an update is queued, the controller publishes, the metrics
    /// record the sync (kube-proxy's sync duration, service and endpoint
    /// changes, last sync time; the table's build time), and the health is
    /// told the data path has it. `None` when the source has ended.
    /// Cancel-safe: it awaits nothing but the source.
    pub async fn step(&mut self) -> Option<Outcome> {
        let change = self.source.next().await?;
        let received = Instant::now();
        self.metrics.set_received(received);
        self.health.queued();
        if let Some(n) = change.node(&self.controller.node_name) {
            self.health.sync_node(n);
        }
        let slices = change.endpoint_slice_edits() as u64;
        self.metrics.endpoint_changes.fetch_add(slices, Ordering::Relaxed);
        let out = self.controller.handle(change);
        if out.published {
            let m = &self.metrics;
            m.publication.record(out.build_time);
            m.sync_duration.record(received.elapsed());
            m.service_changes.fetch_add(out.services_translated as u64, Ordering::Relaxed);
            let unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            m.last_sync_unix_seconds.store(unix, Ordering::Relaxed);
        }
        self.health.updated();
        Some(out)
    }
}
