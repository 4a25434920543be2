//! xskgate's control plane: Kubernetes objects to the service table.
//!
//! - [`object`]: the objects xskgate reads and a source's [`object::Change`].
//! - [`source`]: where changes come from, one interface for both sources:
//!   - [`manifest`]: the manifest directory (YAML/JSON, `kind: List`) and
//!     its watcher;
//!   - [`kube_source`]: the Kubernetes API through kube-rs watchers.
//! - [`kube_proxy_config`]: kube-proxy's configuration file (`run --config`).
//! - [`controller`]: the one control loop (`run` and `watch`) and its state
//!   machine.
//! - [`translate`]: one Service → its ports, as kube-proxy's
//!   `CategorizeEndpoints` computes them (pure).
//! - [`state`]: the known objects, the whole-table translation and the
//!   node-name diagnosis.
//! - [`publish`]: translated ports to the published fast-path table
//!   (incremental, never an unchanged table, UDP flushes).
//! - [`explain`]: `xskgate explain`, one packet through the real pipeline
//!   with every stage's decision.
//! - [`table_cmd`]: `xskgate table` output (text and the `--json` contract).
//! - [`node`]: who this gateway is (`--node-name`, `NODE_NAME`, hostname).
//! - [`health`]: healthCheckNodePort servers and `/healthz`, `/livez`, as
//!   kube-proxy answers them.
//! - [`metrics`]: `/metrics` (kube-proxy's names and `xskgate_*`).
//! - [`netlink`]: interfaces, addresses, routes and neighbours over rtnetlink.
//! - [`lab`]: `xskgate lab`, the reference topology on this machine.
//! - [`run`]: `xskgate run`, the daemon (data path, servers, control loop).
//! - [`admin`]: its admin endpoint (`/status`, `/explain`, `/capture`) and
//!   the clients `xskgate status`, `explain --gateway` and `capture`.

pub mod admin;
pub mod controller;
pub mod explain;
pub mod health;
pub mod kube_proxy_config;
pub mod kube_source;
pub mod lab;
pub mod manifest;
pub mod metrics;
pub mod netlink;
pub mod node;
pub mod object;
pub mod publish;
pub mod run;
pub mod source;
pub mod state;
pub mod table_cmd;
pub mod translate;
