//! The Kubernetes API as a source, through kube-rs watchers: Services (all
//! namespaces, without those labelled `service.kubernetes.io/service-proxy-name`,
//! as kube-proxy filters them), EndpointSlices (all namespaces) and this node's
//! Node (by field selector).
//!
//! Each watcher lists, then watches from the list's resourceVersion. A
//! (re)list arrives as `Init`, `InitApply`…, `InitDone`: the objects are
//! buffered and replace that kind at once (a resync). When the API server
//! goes away the watchers retry with back-off (at most 500 ms apart,
//! [`WatchBackoff`]) while the last published table stays in force; when it comes back they resume from the last
//! resourceVersion, or relist if it expired (410 Gone).
//!
//! Events become [`Change`]s: a list is `Change::Kind`, an added, modified or
//! deleted object a `Change::Edit` of one object.

use crate::object::{Change, Kind, Object};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where a pod's service account is mounted (kube-rs and client-go read
/// the same files).
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Why no Kubernetes client could be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{}: {source}", path.display())]
    Kubeconfig { path: PathBuf, source: kube::config::KubeconfigError },
    #[error(
        "no source of Services given: pass --manifests DIR, or --kubeconfig FILE, or run in a pod with a \
         service account (in-cluster: {missing})"
    )]
    NoSource { missing: String },
    #[error("in-cluster configuration: {0}")]
    InCluster(#[from] kube::config::InClusterError),
    #[error("cannot build a Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// What in-cluster configuration lacks here, worded for the operator, or
/// `None` when it is all there: `KUBERNETES_SERVICE_HOST` and
/// `KUBERNETES_SERVICE_PORT`, and the service account's token, CA and
/// namespace files.
pub fn in_cluster_missing() -> Option<String> {
    let mut missing: Vec<String> = ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"]
        .into_iter()
        .filter(|v| std::env::var_os(v).is_none_or(|x| x.is_empty()))
        .map(|v| format!("${v} is not set"))
        .collect();
    let files: Vec<&str> = ["token", "ca.crt", "namespace"]
        .into_iter()
        .filter(|f| !Path::new(SERVICE_ACCOUNT_DIR).join(f).is_file())
        .collect();
    if !files.is_empty() {
        missing.push(format!("no {} in {SERVICE_ACCOUNT_DIR}", files.join(", ")));
    }
    (!missing.is_empty()).then(|| missing.join("; "))
}

/// A watcher's failure (connection lost, API error): the watcher retries
/// with back-off; nothing already known is lost.
#[derive(Debug, thiserror::Error)]
#[error("watching {kind:?}s failed: {message}")]
pub struct WatchError {
    pub kind: Kind,
    pub message: String,
}

/// How a watcher retries while the API server is away: after 100 ms, then
/// doubling up to 500 ms apart; after 2 s without a failure, from 100 ms
/// again. A change made during an outage is therefore applied within about
/// half a second of the API server's return. client-go's informers back
/// off to 30 s, which a gateway would spend serving a stale table; a
/// gateway set is a handful of nodes, so the load this puts on a recovering
/// API server is small (three requests per gateway per half second).
///
/// The restart is by time, not by [`Backoff::reset`]: the watcher yields
/// `Init` before each relist attempt, which the stream's back-off takes for
/// a success, so a reset on success would retry every 100 ms.
#[derive(Clone, Copy, Debug)]
pub struct WatchBackoff {
    next: Duration,
    last_failure: Option<Instant>,
}

impl WatchBackoff {
    pub const FIRST: Duration = Duration::from_millis(100);
    pub const MAX: Duration = Duration::from_millis(500);
    /// Quiet time after which a failure counts as the first.
    pub const RESTART_AFTER: Duration = Duration::from_secs(2);
}

impl Default for WatchBackoff {
    fn default() -> WatchBackoff {
        WatchBackoff { next: WatchBackoff::FIRST, last_failure: None }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let now = Instant::now();
        if self.last_failure.is_some_and(|t| now.duration_since(t) > WatchBackoff::RESTART_AFTER) {
            self.next = WatchBackoff::FIRST;
        }
        self.last_failure = Some(now);
        let delay = self.next;
        self.next = (delay * 2).min(WatchBackoff::MAX);
        Some(delay)
    }
}

impl Backoff for WatchBackoff {
    /// Nothing: see the type's note; the delay restarts after
    /// [`WatchBackoff::RESTART_AFTER`] without a failure.
    fn reset(&mut self) {}
}

/// Builds a client from a kubeconfig file or, without one, from the pod's
/// service account as client-go's `rest.InClusterConfig` does
/// (`https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`, the
/// mounted CA and token). The token is read from its file again at least
/// once a minute (kube-rs's `TokenFile`, as client-go), so a rotated token
/// is used by the next request, and a watch reopened after the kubelet
/// rotated it carries the new one. `$KUBECONFIG` and `~/.kube/config` are
/// not read: a gateway uses the configuration it was given, never one that
/// happens to be in its home directory.
///
/// # Errors
/// What could not be read, or [`ClientError::NoSource`] naming the three
/// ways and what in-cluster configuration lacks.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, ClientError> {
    let mut config = match kubeconfig {
        Some(path) => {
            let at = |source| ClientError::Kubeconfig { path: path.to_path_buf(), source };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(at)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await.map_err(at)?
        }
        None => {
            if let Some(missing) = in_cluster_missing() {
                return Err(ClientError::NoSource { missing });
            }
            kube::Config::incluster()?
        }
    };
    tracing::info!(
        api_server = %config.cluster_url,
        by = if kubeconfig.is_some() { "kubeconfig" } else { "in-cluster service account" },
        "Kubernetes API"
    );
    // kube's own retry of 429/503/504 backs off to minutes within one
    // request (15 tries from 5 ms, doubling), so after an outage a change
    // could wait that long; the watchers' [`WatchBackoff`] retries instead.
    config.default_retry = false;
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
        watcher::watcher(api, cfg).backoff(WatchBackoff::default()).filter_map(move |ev| {
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

#[cfg(test)]
mod tests {
    use super::WatchBackoff;
    use kube::runtime::utils::Backoff;
    use std::time::{Duration, Instant};

    #[test]
    fn watch_retries_double_up_to_half_a_second_and_a_success_does_not_restart_them() {
        let mut b = WatchBackoff::default();
        let ms: Vec<u128> = b.by_ref().take(5).map(|d| d.as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next(), Some(Duration::from_millis(500)), "an Init between attempts is not a success");
        let mut quiet = WatchBackoff { last_failure: Some(Instant::now() - Duration::from_secs(3)), ..b };
        assert_eq!(quiet.next(), Some(WatchBackoff::FIRST), "after 2 s without a failure, from the start");
    }
}
