//! The objects currently known (from a manifest directory or the API), the
//! whole-table translation, and the node-name diagnosis.

use crate::object::{Key, Kind, Object, key};
use crate::translate::{NodeIdentity, PortEntry, SERVICE_NAME_LABEL, Skip, translate_service};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use xskgate_fastpath::TrafficPolicy;

/// Services, EndpointSlices and Nodes by namespace and name, with an index
/// of slices by the Service they belong to. Every change reports the
/// Services it affects, so that only those are translated again.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    services: BTreeMap<Key, Service>,
    slices: BTreeMap<Key, EndpointSlice>,
    nodes: BTreeMap<String, Node>,
    slices_of: BTreeMap<Key, BTreeSet<Key>>,
}

/// The translated table and what was skipped on the way.
#[derive(Clone, Debug, Default)]
pub struct Translation {
    pub entries: Vec<PortEntry>,
    pub warnings: Vec<String>,
    /// Services kube-proxy would not proxy either, with the reason.
    pub skipped: Vec<(String, Skip)>,
}

impl ClusterState {
    /// Builds the state from loaded objects; a later duplicate replaces an
    /// earlier one, with a warning.
    pub fn from_objects(objects: Vec<Object>) -> (ClusterState, Vec<String>) {
        let mut s = ClusterState::default();
        let mut warnings = Vec::new();
        let mut seen = BTreeSet::new();
        for o in objects {
            let what = match &o {
                Object::Service(svc) => format!("Service {}/{}", key(&svc.metadata).0, key(&svc.metadata).1),
                Object::EndpointSlice(sl) => format!("EndpointSlice {}/{}", key(&sl.metadata).0, key(&sl.metadata).1),
                Object::Node(n) => format!("Node {}", n.metadata.name.as_deref().unwrap_or_default()),
            };
            if !seen.insert(what.clone()) {
                warnings.push(format!("{what} is defined more than once; the last definition wins"));
            }
            s.apply(o);
        }
        (s, warnings)
    }

    /// The Service a slice belongs to (its `kubernetes.io/service-name` label).
    fn owner(sl: &EndpointSlice) -> Option<Key> {
        let svc = sl.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
        Some((key(&sl.metadata).0, svc.clone()))
    }

    /// Adds or replaces an object. Returns the Services whose translation
    /// may change (empty when the object is identical to the one known).
    pub fn apply(&mut self, o: Object) -> BTreeSet<Key> {
        let mut changed = BTreeSet::new();
        match o {
            Object::Service(svc) => {
                let k = key(&svc.metadata);
                if self.services.get(&k) != Some(&*svc) {
                    self.services.insert(k.clone(), *svc);
                    changed.insert(k);
                }
            }
            Object::EndpointSlice(sl) => {
                let k = key(&sl.metadata);
                if self.slices.get(&k) == Some(&*sl) {
                    return changed;
                }
                changed.extend(self.delete_slice(&k));
                if let Some(owner) = Self::owner(&sl) {
                    self.slices_of.entry(owner.clone()).or_default().insert(k.clone());
                    changed.insert(owner);
                }
                self.slices.insert(k, *sl);
            }
            Object::Node(n) => {
                let name = n.metadata.name.clone().unwrap_or_default();
                if self.nodes.get(&name) != Some(&*n) {
                    self.nodes.insert(name, *n);
                    // A node's zone or addresses can change any Service's view.
                    changed.extend(self.services.keys().cloned());
                }
            }
        }
        changed
    }

    /// Removes a Service. Returns it as changed if it was known.
    pub fn delete_service(&mut self, k: &Key) -> BTreeSet<Key> {
        self.services.remove(k).map(|_| k.clone()).into_iter().collect()
    }

    /// Removes an EndpointSlice. Returns its Service as changed.
    pub fn delete_slice(&mut self, k: &Key) -> BTreeSet<Key> {
        let Some(old) = self.slices.remove(k) else { return BTreeSet::new() };
        let Some(owner) = Self::owner(&old) else { return BTreeSet::new() };
        if let Some(set) = self.slices_of.get_mut(&owner) {
            set.remove(k);
            if set.is_empty() {
                self.slices_of.remove(&owner);
            }
        }
        BTreeSet::from([owner])
    }

    /// Removes a Node. Every Service may change.
    pub fn delete_node(&mut self, name: &str) -> BTreeSet<Key> {
        match self.nodes.remove(name) {
            Some(_) => self.services.keys().cloned().collect(),
            None => BTreeSet::new(),
        }
    }

    /// Replaces the whole state (a relist or a reloaded directory) and
    /// returns every Service whose inputs differ.
    pub fn replace(&mut self, new: ClusterState) -> BTreeSet<Key> {
        let mut changed: BTreeSet<Key> = BTreeSet::new();
        if self.nodes != new.nodes {
            changed.extend(self.services.keys().cloned());
            changed.extend(new.services.keys().cloned());
        }
        for k in self.services.keys().chain(new.services.keys()) {
            if self.services.get(k) != new.services.get(k) || self.service_slices(k) != new.service_slices(k) {
                changed.insert(k.clone());
            }
        }
        // Slices of Services that do not exist (yet) change nothing visible.
        *self = new;
        changed
    }

    /// The state with every object of one kind replaced by `objects` (a
    /// relist of that kind), the other kinds kept.
    pub fn with_kind_replaced(&self, kind: Kind, objects: Vec<Object>) -> ClusterState {
        let keep = |k: Kind| k != kind;
        let mut all: Vec<Object> = Vec::new();
        if keep(Kind::Service) {
            all.extend(self.services.values().map(|s| Object::Service(Box::new(s.clone()))));
        }
        if keep(Kind::EndpointSlice) {
            all.extend(self.slices.values().map(|s| Object::EndpointSlice(Box::new(s.clone()))));
        }
        if keep(Kind::Node) {
            all.extend(self.nodes.values().map(|n| Object::Node(Box::new(n.clone()))));
        }
        all.extend(objects);
        ClusterState::from_objects(all).0
    }

    pub fn services(&self) -> &BTreeMap<Key, Service> {
        &self.services
    }

    /// The EndpointSlices of a Service.
    pub fn service_slices(&self, k: &Key) -> Vec<&EndpointSlice> {
        self.slices_of.get(k).into_iter().flatten().filter_map(|s| self.slices.get(s)).collect()
    }

    /// Translates one Service (empty when it is unknown or not proxied).
    pub fn translate_one(&self, k: &Key, node: &NodeIdentity) -> (Vec<PortEntry>, Vec<String>) {
        let Some(svc) = self.services.get(k) else { return (Vec::new(), Vec::new()) };
        translate_service(svc, &self.service_slices(k), node).unwrap_or_default()
    }

    /// The zone of the node named `name`, from its `topology.kubernetes.io/zone` label.
    pub fn node_zone(&self, name: &str) -> Option<String> {
        self.nodes.get(name)?.metadata.labels.as_ref()?.get("topology.kubernetes.io/zone").cloned()
    }

    /// The addresses of the node named `name`.
    pub fn node_addresses(&self, name: &str) -> Vec<IpAddr> {
        let Some(n) = self.nodes.get(name) else { return Vec::new() };
        n.status.iter().flat_map(|s| s.addresses.iter().flatten()).filter_map(|a| a.address.parse().ok()).collect()
    }

    /// Translates every Service (sorted by namespace, name, port name).
    pub fn translate(&self, node: &NodeIdentity) -> Translation {
        let mut t = Translation::default();
        for (k, svc) in &self.services {
            match translate_service(svc, &self.service_slices(k), node) {
                Ok((entries, warnings)) => {
                    t.entries.extend(entries);
                    t.warnings.extend(warnings);
                }
                Err(skip) => t.skipped.push((format!("{}/{}", k.0, k.1), skip)),
            }
        }
        t.entries.sort_by(|a, b| (&a.namespace, &a.name, &a.port_name).cmp(&(&b.namespace, &b.name, &b.port_name)));
        if let Some(w) = self.diagnose_node_name(node, &t.entries) {
            t.warnings.push(w);
        }
        t
    }

    /// Seed 001's outage: Local Services have endpoints, none of them on a
    /// node with our name, and one names a node that looks like us (same name
    /// up to case or a domain suffix, our hostname, or one of our addresses).
    /// Returns a warning naming both and the flag that fixes it.
    pub fn diagnose_node_name<'a>(
        &self,
        node: &NodeIdentity,
        entries: impl IntoIterator<Item = &'a PortEntry>,
    ) -> Option<String> {
        let uses_local =
            |e: &PortEntry| e.external_policy == TrafficPolicy::Local || e.internal_policy == TrafficPolicy::Local;
        let mut names: Vec<String> = Vec::new();
        for e in entries.into_iter().filter(|e| uses_local(e)) {
            for sl in self.service_slices(&(e.namespace.clone(), e.name.clone())) {
                names.extend(sl.endpoints.iter().flatten().filter_map(|ep| ep.node_name.clone()));
            }
        }
        if names.is_empty() || names.contains(&node.name) {
            return None;
        }
        names.sort();
        names.dedup();
        let ours = node.name.as_str();
        let looks_like_us = |theirs: &str| -> Option<&'static str> {
            let (a, b) = (theirs.to_ascii_lowercase(), ours.to_ascii_lowercase());
            if a == b {
                Some("differs from ours only in case")
            } else if a.strip_prefix(&b).is_some_and(|rest| rest.starts_with('.'))
                || b.strip_prefix(&a).is_some_and(|rest| rest.starts_with('.'))
            {
                Some("differs from ours only by a domain suffix")
            } else if node.hostname.as_deref().is_some_and(|h| h.eq_ignore_ascii_case(theirs)) {
                Some("is this machine's hostname")
            } else if theirs.parse::<IpAddr>().is_ok_and(|ip| node.addresses.contains(&ip)) {
                Some("is one of this machine's addresses")
            } else {
                None
            }
        };
        let (theirs, why) = names.iter().find_map(|n| looks_like_us(n).map(|why| (n, why)))?;
        Some(format!(
            "Services with traffic policy Local have endpoints, but none on node {ours:?}, so this gateway \
             drops their traffic (no_local_endpoints). Endpoints name node {theirs:?}, which {why}. If this \
             gateway is {theirs:?}, run with --node-name={theirs} (or NODE_NAME={theirs}), as kube-proxy's \
             --hostname-override."
        ))
    }
}
