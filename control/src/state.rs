//! The objects currently known (from a manifest directory or the API), the
//! whole-table translation, and the node-name diagnosis.

use crate::manifest::Object;
use crate::translate::{NodeIdentity, PortEntry, SERVICE_NAME_LABEL, Skip, translate_service};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use std::collections::BTreeMap;
use std::net::IpAddr;
use xskgate_fastpath::TrafficPolicy;

type Key = (String, String);

fn key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
    (meta.namespace.clone().unwrap_or_else(|| "default".into()), meta.name.clone().unwrap_or_default())
}

/// Services, EndpointSlices and Nodes by namespace and name.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pub services: BTreeMap<Key, Service>,
    pub slices: BTreeMap<Key, EndpointSlice>,
    pub nodes: BTreeMap<String, Node>,
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
        for o in objects {
            let (what, dup) = match o {
                Object::Service(svc) => {
                    let k = key(&svc.metadata);
                    (format!("Service {}/{}", k.0, k.1), s.services.insert(k, *svc).is_some())
                }
                Object::EndpointSlice(sl) => {
                    let k = key(&sl.metadata);
                    (format!("EndpointSlice {}/{}", k.0, k.1), s.slices.insert(k, *sl).is_some())
                }
                Object::Node(n) => {
                    let name = n.metadata.name.clone().unwrap_or_default();
                    (format!("Node {name}"), s.nodes.insert(name, *n).is_some())
                }
            };
            if dup {
                warnings.push(format!("{what} is defined more than once; the last definition wins"));
            }
        }
        (s, warnings)
    }

    /// EndpointSlices by the Service they belong to.
    fn slices_by_service(&self) -> BTreeMap<Key, Vec<&EndpointSlice>> {
        let mut m: BTreeMap<Key, Vec<&EndpointSlice>> = BTreeMap::new();
        for ((ns, _), sl) in &self.slices {
            if let Some(svc) = sl.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) {
                m.entry((ns.clone(), svc.clone())).or_default().push(sl);
            }
        }
        m
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
        let slices = self.slices_by_service();
        let mut t = Translation::default();
        for (k, svc) in &self.services {
            let own: &[&EndpointSlice] = slices.get(k).map(Vec::as_slice).unwrap_or_default();
            match translate_service(svc, own, node) {
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
    pub fn diagnose_node_name(&self, node: &NodeIdentity, entries: &[PortEntry]) -> Option<String> {
        let uses_local =
            |e: &PortEntry| e.external_policy == TrafficPolicy::Local || e.internal_policy == TrafficPolicy::Local;
        let slices = self.slices_by_service();
        let mut names: Vec<String> = Vec::new();
        for e in entries.iter().filter(|e| uses_local(e)) {
            for sl in slices.get(&(e.namespace.clone(), e.name.clone())).into_iter().flatten() {
                names.extend(sl.endpoints.iter().flatten().filter_map(|ep| ep.node_name.clone()));
            }
        }
        if names.is_empty() || names.iter().any(|n| *n == node.name) {
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
