//! The manifest directory: Services, EndpointSlices and Nodes as
//! `kubectl get -o yaml` prints them (YAML or JSON, several documents per
//! file, `kind: List` accepted). This is the embedded source that needs no
//! cluster.
//!
//! Loading never fails as a whole because of one bad object: a document that
//! does not parse, or an object of a known kind that does not fit its schema,
//! is skipped with a warning that names the file and the object, and
//! everything else is kept.

use crate::object::{Change, Key, Kind, Loaded, Object};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;
use std::path::{Path, PathBuf};

fn describe(v: &serde_json::Value) -> String {
    let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or("object");
    let meta = v.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(|n| n.as_str()).unwrap_or("<no name>");
    match meta.and_then(|m| m.get("namespace")).and_then(|n| n.as_str()) {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

fn take(v: serde_json::Value, source: &str, out: &mut Loaded) {
    let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_string();
    let api = v.get("apiVersion").and_then(|k| k.as_str()).unwrap_or_default().to_string();
    let what = describe(&v);
    let parsed = match (kind.as_str(), api.as_str()) {
        _ if kind == "List" || kind.ends_with("List") => {
            match v.get("items").and_then(|i| i.as_array()) {
                Some(items) => {
                    for item in items.clone() {
                        take(item, source, out);
                    }
                }
                None => out.warnings.push(format!("{source}: {what} has no items; skipped")),
            }
            return;
        }
        ("Service", "v1") => serde_json::from_value::<Service>(v).map(|s| Object::Service(Box::new(s))),
        ("EndpointSlice", "discovery.k8s.io/v1") => {
            serde_json::from_value::<EndpointSlice>(v).map(|s| Object::EndpointSlice(Box::new(s)))
        }
        ("Node", "v1") => serde_json::from_value::<Node>(v).map(|n| Object::Node(Box::new(n))),
        ("Service" | "EndpointSlice" | "Node", _) => {
            out.warnings.push(format!("{source}: {what}: unsupported apiVersion {api:?}; skipped"));
            return;
        }
        _ => return, // other kinds (Deployments, Pods, ...) are not ours
    };
    match parsed {
        Ok(o) => out.objects.push(o),
        Err(e) => out.warnings.push(format!("{source}: {what} is invalid: {e}; skipped")),
    }
}

/// Parses the documents of one file's text.
pub fn parse(text: &str, source: &str) -> Loaded {
    let mut out = Loaded::default();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        match serde_json::Value::deserialize(doc) {
            Ok(serde_json::Value::Null) => {} // empty document
            Ok(v) => take(v, source, &mut out),
            Err(e) => {
                out.warnings.push(format!("{source}: document {} is not valid YAML/JSON: {e}; skipped", i + 1));
                // A syntax error ends the stream: later documents cannot be trusted.
                break;
            }
        }
    }
    out
}

/// The manifest files of a directory (`*.yaml`, `*.yml`, `*.json`, not
/// hidden), sorted by name so that loading is deterministic.
///
/// # Errors
/// The directory cannot be read.
pub fn files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            !name.starts_with('.')
                && p.is_file()
                && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Loads every manifest file of a directory.
///
/// # Errors
/// The directory cannot be read. Unreadable files and bad objects are
/// warnings, not errors.
pub fn load_dir(dir: &Path) -> std::io::Result<Loaded> {
    Ok(DirWatcher::new(dir).poll()?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_yaml_lists_and_json() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: {name: a, namespace: ns}
spec: {ports: [{port: 80}]}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Node
  metadata: {name: gw1}
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: ignored}
---
{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "a-x", "namespace": "ns"}, "addressType": "IPv4", "endpoints": []}
"#;
        let l = parse(text, "t.yaml");
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        let kinds: Vec<&str> = l
            .objects
            .iter()
            .map(|o| match o {
                Object::Service(_) => "Service",
                Object::EndpointSlice(_) => "EndpointSlice",
                Object::Node(_) => "Node",
            })
            .collect();
        assert_eq!(kinds, ["Service", "Node", "EndpointSlice"]);
    }

    #[test]
    fn bad_objects_are_skipped_with_a_warning_naming_them() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: {name: good, namespace: ns}
spec: {ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: bad, namespace: ns}
spec: {ports: "not a list"}
---
apiVersion: v2
kind: Node
metadata: {name: odd}
"#;
        let l = parse(text, "t.yaml");
        assert_eq!(l.objects.len(), 1);
        assert_eq!(l.warnings.len(), 2);
        assert!(l.warnings[0].contains("Service ns/bad is invalid"), "{}", l.warnings[0]);
        assert!(l.warnings[1].contains("Node odd: unsupported apiVersion"), "{}", l.warnings[1]);
        let broken = parse("kind: Service\n  bad: [indent\n", "broken.yaml");
        assert!(broken.objects.is_empty());
        assert!(broken.warnings[0].contains("broken.yaml: document 1 is not valid YAML/JSON"), "{:?}", broken.warnings);
    }
}

/// Watches a manifest directory by polling file sizes and modification
/// times (cheap for the few files a gateway has; needs no inotify).
///
/// A changed file is parsed again. If it no longer parses as YAML (a
/// half-written file, a typo), its last good version stays in force, with a
/// warning: an editing mistake never removes Services from the table. A
/// deleted file's objects go away.
#[derive(Debug)]
pub struct DirWatcher {
    dir: PathBuf,
    files: std::collections::BTreeMap<PathBuf, (Option<std::time::SystemTime>, u64, Vec<Object>)>,
    primed: bool,
}

impl DirWatcher {
    pub fn new(dir: &Path) -> DirWatcher {
        DirWatcher { dir: dir.to_path_buf(), files: Default::default(), primed: false }
    }

    /// The directory's objects if anything changed since the last call (the
    /// first call always returns them), with warnings.
    ///
    /// # Errors
    /// The directory cannot be read (the caller keeps what it has).
    pub fn poll(&mut self) -> std::io::Result<Option<Loaded>> {
        let mut changed = !self.primed;
        let mut warnings = Vec::new();
        let present = files(&self.dir)?;
        let before = self.files.len();
        self.files.retain(|p, _| present.contains(p));
        changed |= self.files.len() != before;
        for path in present {
            let meta = std::fs::metadata(&path).ok();
            let stamp = (meta.as_ref().and_then(|m| m.modified().ok()), meta.as_ref().map_or(0, |m| m.len()));
            if self.files.get(&path).is_some_and(|(t, l, _)| (*t, *l) == stamp) {
                continue;
            }
            changed = true;
            let source = path.display().to_string();
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    warnings.push(format!("{source}: cannot read: {e}; keeping its last good version"));
                    continue;
                }
            };
            let l = parse(&text, &source);
            let syntax_error = l.warnings.iter().any(|w| w.contains("is not valid YAML/JSON"));
            warnings.extend(l.warnings);
            match self.files.get_mut(&path) {
                Some(old) if syntax_error => {
                    warnings.push(format!("{source}: keeping its last good version"));
                    old.0 = stamp.0;
                    old.1 = stamp.1;
                }
                _ => {
                    self.files.insert(path, (stamp.0, stamp.1, l.objects));
                }
            }
        }
        self.primed = true;
        if !changed {
            return Ok(None);
        }
        let objects = self.files.values().flat_map(|(_, _, o)| o.iter().cloned()).collect();
        Ok(Some(Loaded { objects, warnings }))
    }

    /// Like [`poll`](Self::poll), but after the first call it reports what
    /// changed object by object, so that one edited EndpointSlice costs one
    /// Service's translation, not a comparison of the whole directory.
    ///
    /// # Errors
    /// The directory cannot be read (the caller keeps what it has).
    pub fn poll_changes(&mut self) -> std::io::Result<Option<Change>> {
        if !self.primed {
            return Ok(self.poll()?.map(Change::All));
        }
        let before: std::collections::BTreeMap<(Kind, Key), Object> =
            self.files.values().flat_map(|(_, _, o)| o.iter()).map(|o| ((o.kind(), o.key()), o.clone())).collect();
        let defined_before: usize = self.files.values().map(|(_, _, o)| o.len()).sum();
        let Some(loaded) = self.poll()? else { return Ok(None) };
        if before.len() != defined_before || self.defined_twice() {
            return Ok(Some(Change::All(loaded)));
        }
        let mut after = std::collections::BTreeMap::new();
        for o in loaded.objects {
            after.insert((o.kind(), o.key()), o);
        }
        let deleted = before.keys().filter(|k| !after.contains_key(k)).cloned().collect();
        let applied = after.into_iter().filter(|(k, o)| before.get(k) != Some(o)).map(|(_, o)| o).collect();
        Ok(Some(Change::Edit { applied, deleted, warnings: loaded.warnings }))
    }

    /// True if some object is defined in more than one place.
    fn defined_twice(&self) -> bool {
        let mut seen = std::collections::BTreeSet::new();
        self.files.values().flat_map(|(_, _, o)| o.iter()).any(|o| !seen.insert((o.kind(), o.key())))
    }
}
