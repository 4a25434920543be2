//! Where objects come from: the manifest directory (polled) or the
//! Kubernetes API (kube-rs watchers), as one stream of [`Change`]s, so that
//! the control loop is the same whatever the source.
//!
//! A source's failures are its own: it logs them and keeps trying, and the
//! last published table stays in force. An unreadable directory is logged
//! once until it can be read again; a failing watch at most once every
//! [`QUIET`] (a dead API server must not flood the log).

use crate::kube_source::{self, ClientError};
use crate::manifest::DirWatcher;
use crate::object::Change;
use futures::StreamExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How long a failing watch stays quiet in the log after a warning.
pub const QUIET: Duration = Duration::from_secs(30);

type Watch = Pin<Box<dyn futures::Stream<Item = Result<Change, kube_source::WatchError>> + Send>>;

/// One source of objects.
pub enum Source {
    /// A directory of manifests, read again every `tick` when it changed.
    Manifests { dir: PathBuf, watcher: DirWatcher, tick: tokio::time::Interval, failing: bool },
    /// The Kubernetes API's watchers.
    Kubernetes { watch: Watch, last_error: Option<Instant> },
}

impl Source {
    /// The manifest directory `dir`, checked every `poll`.
    pub fn manifests(dir: &Path, poll: Duration) -> Source {
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Source::Manifests { dir: dir.to_path_buf(), watcher: DirWatcher::new(dir), tick, failing: false }
    }

    /// The Kubernetes API, by `kubeconfig` (else inferred), watching this
    /// node's Node object `node_name`.
    ///
    /// # Errors
    /// No client could be built from the configuration.
    pub async fn kubernetes(kubeconfig: Option<&Path>, node_name: &str) -> Result<Source, ClientError> {
        Ok(Source::from_client(kube_source::client(kubeconfig).await?, node_name))
    }

    /// The Kubernetes API through `client`.
    pub fn from_client(client: kube::Client, node_name: &str) -> Source {
        Source::Kubernetes { watch: Box::pin(kube_source::changes(client, node_name)), last_error: None }
    }

    /// `manifests` or `kubernetes`, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Source::Manifests { .. } => "manifests",
            Source::Kubernetes { .. } => "kubernetes",
        }
    }

    /// The next change. `None` when the source has ended (the API's watch
    /// streams do not end while the process runs). Cancel-safe, as
    /// `tokio::select!` needs: a change is taken from the source only when
    /// this future returns it.
    pub async fn next(&mut self) -> Option<Change> {
        match self {
            Source::Manifests { dir, watcher, tick, failing } => loop {
                tick.tick().await;
                match watcher.poll_changes() {
                    Ok(Some(change)) => {
                        *failing = false;
                        return Some(change);
                    }
                    Ok(None) => *failing = false,
                    Err(e) => {
                        if !*failing {
                            warn!("cannot read the manifest directory {}: {e}; keeping the last table", dir.display());
                        }
                        *failing = true;
                    }
                }
            },
            Source::Kubernetes { watch, last_error } => loop {
                match watch.next().await? {
                    Ok(change) => {
                        if let Change::Kind(kind, objects) = &change {
                            info!(?kind, objects = objects.len(), "listed from the API server");
                            *last_error = None;
                        }
                        return Some(change);
                    }
                    Err(e) => {
                        if last_error.is_none_or(|t| t.elapsed() >= QUIET) {
                            warn!("{e}; keeping the last table and retrying");
                            *last_error = Some(Instant::now());
                        }
                    }
                }
            },
        }
    }
}
