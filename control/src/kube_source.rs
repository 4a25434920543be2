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
//!
//! Events become [`Change`]s: a list is `Change::Kind`, an added, modified or
//! deleted object a `Change::Edit` of one object.

use crate::object::{Change, Kind, Object};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use std::path::{Path, PathBuf};

/// Why no Kubernetes client could be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{}: {source}", path.display())]
    Kubeconfig { path: PathBuf, source: kube::config::KubeconfigError },
    #[error("no Kubernetes configuration: {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("cannot build a Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A watcher's failure (connection lost, API error): the watcher retries
/// with back-off; nothing already known is lost.
#[derive(Debug, thiserror::Error)]
#[error("watching {kind:?}s failed: {message}")]
pub struct WatchError {
    pub kind: Kind,
    pub message: String,
}

/// Builds a client from a kubeconfig file, or infers one (in-cluster
/// service account, else `$KUBECONFIG` / `~/.kube/config`).
///
/// # Errors
/// What could not be read or inferred.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, ClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let at = |source| ClientError::Kubeconfig { path: path.to_path_buf(), source };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(at)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await.map_err(at)?
        }
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// The merged stream of the three watchers' changes.
pub fn changes(
    client: Client,
    node_name: &str,
) -> impl futures::Stream<Item = Result<Change, WatchError>> + Send + use<> {
    fn watch<K, F>(
        api: Api<K>,
        cfg: watcher::Config,
        kind: Kind,
        wrap: F,
    ) -> impl futures::Stream<Item = Result<Change, WatchError>> + Send
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
        F: Fn(K) -> Object + Send + 'static,
    {
        let mut buffer: Vec<Object> = Vec::new();
        watcher::watcher(api, cfg).default_backoff().filter_map(move |ev| {
            let edit = |applied, deleted| Change::Edit { applied, deleted, warnings: Vec::new() };
            let out = match ev {
                Ok(Event::Init) => {
                    buffer.clear();
                    None
                }
                Ok(Event::InitApply(o)) => {
                    buffer.push(wrap(o));
                    None
                }
                Ok(Event::InitDone) => Some(Ok(Change::Kind(kind, std::mem::take(&mut buffer)))),
                Ok(Event::Apply(o)) => Some(Ok(edit(vec![wrap(o)], Vec::new()))),
                Ok(Event::Delete(o)) => Some(Ok(edit(Vec::new(), vec![(kind, wrap(o).key())]))),
                Err(e) => Some(Err(WatchError { kind, message: e.to_string() })),
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
