//! The Kubernetes objects xskgate reads (Services, EndpointSlices, Nodes),
//! whichever source they come from, and how they are keyed. Both sources
//! (the manifest directory and the API) produce these; the cluster state
//! files them.

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// (namespace, name).
pub type Key = (String, String);

/// A namespaced object's key (`default` when the namespace is unset, as
/// `kubectl apply` assumes).
pub(crate) fn key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
    (meta.namespace.clone().unwrap_or_else(|| "default".into()), meta.name.clone().unwrap_or_default())
}

/// The kinds of object xskgate watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

/// An object xskgate reads.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Node(Box<Node>),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Node(_) => Kind::Node,
        }
    }

    /// Its key as the cluster state files it (a Node's is `("", name)`).
    pub fn key(&self) -> Key {
        match self {
            Object::Service(o) => key(&o.metadata),
            Object::EndpointSlice(o) => key(&o.metadata),
            Object::Node(o) => (String::new(), o.metadata.name.clone().unwrap_or_default()),
        }
    }
}

/// Objects read from one source, and what was skipped.
#[derive(Debug, Default)]
pub struct Loaded {
    pub objects: Vec<Object>,
    pub warnings: Vec<String>,
}

/// A change to the known objects, as a source delivers it.
#[derive(Debug)]
pub enum Change {
    /// Everything the source holds (the manifest directory read whole:
    /// its first read, or a change that cannot be told object by object,
    /// such as an object defined in two files).
    All(Loaded),
    /// Every object of one kind (the API's list, after a (re)connection).
    Kind(Kind, Vec<Object>),
    /// Objects added or changed, and objects gone (watch events, edited
    /// files), published as one table; with the warnings of the files
    /// read again.
    Edit { applied: Vec<Object>, deleted: Vec<(Kind, Key)>, warnings: Vec<String> },
}

impl Change {
    /// How many EndpointSlice changes it carries one by one (kube-proxy's
    /// `sync_proxy_rules_endpoint_changes_total` counts these).
    pub fn endpoint_slice_edits(&self) -> usize {
        match self {
            Change::Edit { applied, deleted, .. } => {
                applied.iter().filter(|o| o.kind() == Kind::EndpointSlice).count()
                    + deleted.iter().filter(|(k, _)| *k == Kind::EndpointSlice).count()
            }
            Change::All(_) | Change::Kind(..) => 0,
        }
    }

    /// The Node named `name`, if the change brings it.
    pub fn node(&self, name: &str) -> Option<&Node> {
        let objects = match self {
            Change::All(loaded) => &loaded.objects,
            Change::Kind(_, objects) => objects,
            Change::Edit { applied, .. } => applied,
        };
        objects.iter().find_map(|o| match o {
            Object::Node(n) if n.metadata.name.as_deref() == Some(name) => Some(n.as_ref()),
            _ => None,
        })
    }
}
