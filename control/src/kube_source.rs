//! The Kubernetes API as a source, through kube-rs watchers: Services (all
//! namespaces, without those labelled `service.kubernetes.io/service-proxy-name`,
//! as kube-proxy filters them), EndpointSlices (all namespaces) and this node's
//! Node (by field selector).
//!
//! Each watcher lists, then watches from the list's resourceVersion. A
//! (re)list arrives as `Init`, `InitApply`…, `InitDone`: the objects are
//! buffered and replace that kind at once (a resync). When the API server
//! goes away the watchers retry with back-off while the last published table
//! stays in force; when it comes back they resume from the last
//! resourceVersion, or relist if it expired (410 Gone).

use crate::controller::Controller;
use crate::manifest::Object;
use crate::state::Kind;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use std::time::Duration;
use tracing::{info, warn};

/// One thing a watcher saw, in the source's terms.
#[derive(Debug)]
pub enum Change {
    /// Every object of a kind (after `InitDone`).
    Reset(Kind, Vec<Object>),
    Apply(Object),
    Delete(Kind, (String, String)),
    /// A watcher error (connection lost, API error): logged, nothing lost.
    Error(Kind, String),
}

fn key(meta: &kube::api::ObjectMeta) -> (String, String) {
    (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default())
}

/// Builds a client from a kubeconfig file, or infers one (in-cluster
/// service account, else `$KUBECONFIG` / `~/.kube/config`).
///
/// # Errors
/// A message saying what could not be read or inferred.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<Client, String> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| format!("{}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => kube::Config::infer().await.map_err(|e| format!("no Kubernetes configuration: {e}"))?,
    };
    Client::try_from(config).map_err(|e| format!("cannot build a Kubernetes client: {e}"))
}

/// The merged stream of changes of the three watchers.
pub fn changes(client: Client, node_name: &str) -> impl futures::Stream<Item = Change> + Send {
    fn watch<K, F>(api: Api<K>, cfg: watcher::Config, kind: Kind, wrap: F) -> impl futures::Stream<Item = Change> + Send
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
        F: Fn(K) -> Object + Send + 'static,
    {
        let mut buffer: Vec<Object> = Vec::new();
        watcher::watcher(api, cfg).default_backoff().filter_map(move |ev| {
            let out = match ev {
                Ok(Event::Init) => {
                    buffer.clear();
                    None
                }
                Ok(Event::InitApply(o)) => {
                    buffer.push(wrap(o));
                    None
                }
                Ok(Event::InitDone) => Some(Change::Reset(kind, std::mem::take(&mut buffer))),
                Ok(Event::Apply(o)) => Some(Change::Apply(wrap(o))),
                Ok(Event::Delete(o)) => Some(Change::Delete(kind, key(o.meta()))),
                Err(e) => Some(Change::Error(kind, e.to_string())),
            };
            futures::future::ready(out)
        })
    }
    let services = watch(
        Api::<Service>::all(client.clone()),
        watcher::Config::default().labels(&format!("!{}", crate::translate::SERVICE_PROXY_NAME)),
        Kind::Service,
        |s| Object::Service(Box::new(s)),
    );
    let slices =
        watch(Api::<EndpointSlice>::all(client.clone()), watcher::Config::default(), Kind::EndpointSlice, |s| {
            Object::EndpointSlice(Box::new(s))
        });
    let nodes = watch(
        Api::<Node>::all(client),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
        Kind::Node,
        |n| Object::Node(Box::new(n)),
    );
    futures::stream::select_all([services.boxed(), slices.boxed(), nodes.boxed()])
}

/// Feeds one change to the controller. Errors are logged at most once per
/// kind every `quiet` (a dead API server must not flood the log).
pub fn handle(c: &mut Controller, change: Change, last_error: &mut Option<std::time::Instant>, quiet: Duration) {
    match change {
        Change::Reset(kind, objects) => {
            info!(?kind, objects = objects.len(), "resynced from the API server");
            c.reset_kind(kind, objects);
            *last_error = None;
        }
        Change::Apply(o) => {
            c.apply(o);
        }
        Change::Delete(kind, k) => {
            c.delete(kind, &k);
        }
        Change::Error(kind, e) => {
            if last_error.is_none_or(|t| t.elapsed() >= quiet) {
                warn!(?kind, error = %e, "watch failed; keeping the last table and retrying");
                *last_error = Some(std::time::Instant::now());
            }
        }
    }
}
