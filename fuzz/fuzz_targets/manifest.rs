//! Arbitrary bytes as a manifest file (YAML or JSON, several documents, `kind:
//! List`) through everything a manifest goes through before the data path
//! sees it: parsing, the cluster state, kube-proxy's translation and the
//! publication into a service table. Checks: no panic; every warning names
//! the file (and, from the object's own fields, the object); a skipped
//! Service is named `namespace/name`; the publication serves only ports
//! the translation kept, and publishing the same state again serves the
//! same ports.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use xskgate_control::manifest;
use xskgate_control::publish::Publisher;
use xskgate_control::state::ClusterState;
use xskgate_control::translate::NodeIdentity;
use xskgate_fastpath::{ServiceTable, ServiceTableHandle};

const SOURCE: &str = "fuzz.yaml";

fuzz_target!(|data: &[u8]| {
    // The manifest directory reads files as UTF-8 text; other bytes are
    // refused before parsing (a warning naming the file).
    let Ok(text) = std::str::from_utf8(data) else { return };
    let loaded = manifest::parse(text, SOURCE);
    for w in &loaded.warnings {
        assert!(w.starts_with(&format!("{SOURCE}: ")), "a warning that does not name its file: {w}");
    }
    let (state, _duplicates) = ClusterState::from_objects(loaded.objects);
    let node = NodeIdentity { name: "gw1".into(), zone: Some("zone-a".into()), ..NodeIdentity::default() };
    let translation = state.translate(&node);
    for (name, _) in &translation.skipped {
        assert!(name.contains('/'), "a skipped Service named {name:?}, not namespace/name");
    }
    let handle = Arc::new(ServiceTableHandle::new(ServiceTable::default()));
    let mut publisher = Publisher::new(handle.clone(), None, xskgate_fuzz::table().node().clone());
    let _ = publisher.full_sync(&state, &node);
    // Every published port (one per family of a dual-stack Service) is
    // one the translation kept.
    let kept: std::collections::BTreeSet<(String, String, String)> =
        translation.entries.iter().map(|e| (e.namespace.clone(), e.name.clone(), e.port_name.clone())).collect();
    let table = handle.load_full();
    for p in table.ports() {
        let name = (p.name.namespace.to_string(), p.name.name.to_string(), p.name.port_name.to_string());
        assert!(kept.contains(&name), "published {name:?}, which the translation did not keep");
    }
    let published = table.ports().len();
    // Publishing again with nothing changed publishes the same ports.
    let _ = publisher.full_sync(&state, &node);
    assert_eq!(handle.load_full().ports().len(), published);
});
