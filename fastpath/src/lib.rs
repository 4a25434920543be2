//! xskgate's packet pipeline.
//!
//! - [`wire`]: parsing at the boundary (etherparse, zero-copy, offsets kept).
//! - [`checksum`]: RFC 1071 sums and RFC 1624 incremental updates.
//! - [`service`]: the service table the control plane publishes (builder,
//!   atomic swap) and the fast path reads.
//! - [`maglev`]: consistent endpoint choice, identical on every gateway.
//! - [`affinity`]: `sessionAffinity: ClientIP`, shared and lock-free.
//! - [`nat`]: in-place DNAT/SNAT, ICMP error translation, generated rejects.
//! - [`pipeline`]: `process_batch(frames, tables, worker, now)`, the pure
//!   function the AF_XDP loop calls: a packet's stages and a batch's passes.
//! - [`trace`]: each stage's decision for a frame, reported as it is made
//!   (`xskgate explain`); nothing when off.
//! - [`verdict`]: what the pipeline decides per frame (`Verdict`, with a
//!   `DropReason` an operator can see) and a worker's `Counters`.
//! - [`io`]: the XDP steering program, AF_XDP sockets and workers, the FIB.

pub mod affinity;
pub mod checksum;
mod frontend;
pub mod io;
pub mod maglev;
pub mod nat;
pub mod pipeline;
pub mod service;
pub mod trace;
pub mod verdict;
pub mod wire;

pub use affinity::AffinityTable;
pub use pipeline::{
    BATCH, Frame, MasqueradeRule, Tables, WorkerState, flush_udp_flows_to, process, process_batch, process_batch_traced,
};
pub use service::{
    BuildError, Cidr, Echo, Endpoint, EndpointSet, Found, Frontend, FrontendKind, NodeConfig, PortChange, ServicePort,
    ServicePortName, ServiceTable, ServiceTableBuilder, ServiceTableHandle, TrafficPolicy, VipEcho,
};
pub use verdict::{Counters, DropReason, MAX_SERVICE_IDS, ServiceCounters, Verdict};
