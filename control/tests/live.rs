//! The manifest directory is live: creating, changing and deleting files
//! changes the published table; a file that stops parsing keeps its last
//! good version, so an editing mistake never drops a Service.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use xskgate_conntrack::{Addr, Proto};
use xskgate_control::controller::Controller;
use xskgate_control::manifest::DirWatcher;
use xskgate_control::publish::Publisher;
use xskgate_fastpath::{NodeConfig, ServiceTable, ServiceTableHandle};

/// A temporary directory removed on drop, also when the test fails.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let p = std::env::temp_dir().join(format!("xskgate-live-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn service(name: &str, ip: &str, endpoints: &[&str]) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("{{addresses: [{e}], nodeName: gw1}}")).collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: live}}\n\
         spec: {{clusterIP: {ip}, ports: [{{port: 80, targetPort: 8080}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}-x, namespace: live, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{}]\n",
        eps.join(", ")
    )
}

fn endpoints(handle: &ServiceTableHandle, ip: [u8; 4]) -> Option<usize> {
    handle.load().lookup(&Addr::from_v4(ip), Proto::TCP, 80).map(|(p, _)| p.cluster.len())
}

fn write(dir: &Path, file: &str, text: &str) {
    std::fs::write(dir.join(file), text).unwrap();
}

#[test]
fn files_created_changed_broken_and_deleted_take_effect_live() {
    let dir = TempDir::new();
    let handle = Arc::new(ServiceTableHandle::new(ServiceTable::default()));
    let publisher = Publisher::new(handle.clone(), None, NodeConfig::default());
    let mut c = Controller::new(publisher, "gw1".into(), None);
    let mut w = DirWatcher::new(&dir.0);
    let mut step = |c: &mut Controller| w.poll().unwrap().map(|l| c.reset(l));

    write(&dir.0, "a.yaml", &service("a", "198.19.128.1", &["198.19.1.1"]));
    assert!(step(&mut c).is_some_and(|o| o.published));
    assert_eq!(endpoints(&handle, [198, 19, 128, 1]), Some(1));
    assert!(step(&mut c).is_none(), "nothing changed, nothing reloaded");

    write(&dir.0, "a.yaml", &service("a", "198.19.128.1", &["198.19.1.1", "198.19.1.22"]));
    let out = step(&mut c).expect("a changed file is reloaded");
    assert_eq!((out.published, out.services_translated), (true, 1));
    assert_eq!(endpoints(&handle, [198, 19, 128, 1]), Some(2));

    // A half-written file: its last good version stays in force.
    write(&dir.0, "a.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: li");
    let generation = handle.load().generation();
    let out = step(&mut c).expect("the change is seen");
    assert!(!out.published, "nothing the fast path sees changed");
    assert_eq!(endpoints(&handle, [198, 19, 128, 1]), Some(2));
    assert_eq!(handle.load().generation(), generation);

    write(
        &dir.0,
        "b.json",
        &serde_json::to_string(&serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "b", "namespace": "live"},
            "spec": {"clusterIP": "198.19.128.2", "ports": [{"port": 80}]}
        }))
        .unwrap(),
    );
    step(&mut c).expect("a new file is loaded");
    assert_eq!(endpoints(&handle, [198, 19, 128, 2]), Some(0));

    std::fs::remove_file(dir.0.join("a.yaml")).unwrap();
    step(&mut c).expect("a deleted file is seen");
    assert_eq!(endpoints(&handle, [198, 19, 128, 1]), None, "its Service is gone");
    assert_eq!(endpoints(&handle, [198, 19, 128, 2]), Some(0), "the other stays");
}

/// After the first poll, `poll_changes` reports object by object: an edited
/// EndpointSlice is one applied object (one Service translated), a deleted
/// file's objects are deletions, and an object defined in two files falls
/// back to a full reload. The table ends the same as with full reloads.
#[test]
fn changes_are_reported_object_by_object() {
    use xskgate_control::object::Change;
    let dir = TempDir::new();
    let handle = Arc::new(ServiceTableHandle::new(ServiceTable::default()));
    let mut c = Controller::new(Publisher::new(handle.clone(), None, NodeConfig::default()), "gw1".into(), None);
    let mut w = DirWatcher::new(&dir.0);
    let apply = |c: &mut Controller, u: Change| c.handle(u);
    write(&dir.0, "a.yaml", &service("a", "198.19.128.1", &["198.19.1.1"]));
    write(&dir.0, "b.yaml", &service("b", "198.19.128.2", &["198.19.1.2"]));
    let first = w.poll_changes().unwrap().expect("the first poll loads everything");
    assert!(matches!(first, Change::All(_)));
    apply(&mut c, first);
    assert_eq!(endpoints(&handle, [198, 19, 128, 1]), Some(1));

    // Mtime granularity: make sure the size changes too.
    write(&dir.0, "a.yaml", &service("a", "198.19.128.1", &["198.19.1.1", "198.19.1.11"]));
    let u = w.poll_changes().unwrap().expect("a change");
    match &u {
        Change::Edit { applied, deleted, .. } => {
            assert_eq!(applied.len(), 1, "only the EndpointSlice changed: {applied:?}");
            assert!(deleted.is_empty());
        }
        other => panic!("an edit of one file is reported object by object: {other:?}"),
    }
    let out = apply(&mut c, u);
    assert_eq!(out.services_translated, 1);
    assert_eq!(endpoints(&handle, [198, 19, 128, 1]), Some(2));

    std::fs::remove_file(dir.0.join("b.yaml")).unwrap();
    match w.poll_changes().unwrap().expect("a deletion") {
        Change::Edit { applied, deleted, warnings } => {
            assert!(applied.is_empty());
            assert_eq!(deleted.len(), 2, "the Service and its slice: {deleted:?}");
            c.apply_all(applied, deleted, warnings);
        }
        other => panic!("a deleted file is reported object by object: {other:?}"),
    }
    assert_eq!(endpoints(&handle, [198, 19, 128, 2]), None);

    // The same Service in two files: no object-by-object answer; full reload.
    write(&dir.0, "c.yaml", &service("a", "198.19.128.1", &["198.19.1.1"]));
    assert!(matches!(w.poll_changes().unwrap(), Some(Change::All(_))));
    assert_eq!(w.poll_changes().unwrap().map(|_| ()), None, "nothing changed since");
}
