//! The control loop's state machine, independent of where objects come
//! from: a whole new set of objects (a reloaded manifest directory, a relist
//! after the API server came back) or single changes (watch events). Each
//! step updates the cluster state, re-translates the Services it touched
//! and publishes through the [`Publisher`]. Every warning is logged once.

use crate::manifest::{Loaded, Object};
use crate::node;
use crate::publish::{Outcome, Publisher};
use crate::state::{ClusterState, Key, Kind};
use crate::translate::NodeIdentity;
use std::collections::BTreeSet;
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

    /// Replaces everything (a reloaded directory, a relist).
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

    /// One added or modified object (a watch event).
    pub fn apply(&mut self, o: Object) -> Outcome {
        let changed = self.state.apply(o);
        self.publish(changed)
    }

    /// Several changes at once (a file of the manifest directory edited),
    /// published as one table.
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

    /// One deleted Service, EndpointSlice or Node (a Node's key is
    /// `("", name)`).
    pub fn delete(&mut self, kind: Kind, key: &Key) -> Outcome {
        let changed = match kind {
            Kind::Service => self.state.delete_service(key),
            Kind::EndpointSlice => self.state.delete_slice(key),
            Kind::Node => self.state.delete_node(&key.1),
        };
        self.publish(changed)
    }
}
