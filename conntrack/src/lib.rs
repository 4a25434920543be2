//! xskgate's connection-tracking table.
//!
//! The fast-path workers of a gateway share one [`FlowTable`]: a reply can
//! arrive on another queue, and so another worker, than its flow's first
//! packet, and a background sweeper expires idle flows at the same time. The
//! table is therefore shared and lock-free: lookups never wait, and no lookup,
//! insert, update or removal takes a lock, allocates or makes a system call.
//! Its memory is allocated once, at creation, for a fixed number of flows.
//!
//! - [`key`]: the 5-tuple ([`FlowKey`]), IPv4 and IPv6 in one 16-byte form.
//! - [`state`]: flow states, the TCP transitions that drive them, timeouts.
//! - [`table`]: the table and its slot protocol (read its module docs for the
//!   concurrency argument).
//! - [`mem`]: the zeroed, huge-page, pre-faulted arrays the table lives in.
//! - [`persist`]: the table in a file that outlives the process (a gateway
//!   restarted, even by `kill -9`, keeps its flows).
//!
//! A flow is stored under both of its tuples: the original one (client →
//! service) and the reply one (endpoint → client, or → gateway after SNAT),
//! so a reply finds its reverse-NAT action with one lookup of its own tuple.
//!
//! ```
//! use xskgate_conntrack::{Config, FlowKey, FlowState, FlowTable, Inserted, NewFlow, Proto};
//! use std::net::Ipv4Addr;
//!
//! let table = FlowTable::new(Config { capacity: 1024, ..Config::default() }).unwrap();
//! let client = Ipv4Addr::new(198, 18, 0, 10);
//! let vip = Ipv4Addr::new(198, 18, 1, 1);
//! let pod = Ipv4Addr::new(198, 19, 0, 5);
//! let gw = Ipv4Addr::new(198, 18, 0, 1);
//! let orig = FlowKey::new(Proto::TCP, client, 40000, vip, 80);
//! // Cluster policy: DNAT to the pod, SNAT to the gateway (port 61000).
//! let reply = FlowKey::new(Proto::TCP, pod, 8080, gw, 61000);
//! let flow = NewFlow { orig, reply, backend: 7, service: 3, state: FlowState::Udp { replied: false } };
//! assert!(matches!(table.insert(&flow, 0), Ok(Inserted::New(_))));
//!
//! // The pod's answer finds the reverse translation with one lookup.
//! let back = table.lookup(&reply).unwrap();
//! assert_eq!(back.rewrite(), orig.reversed()); // vip:80 -> client:40000
//! ```

pub mod key;
pub mod mem;
#[cfg(not(loom))]
pub mod persist;
pub mod state;
pub mod table;

pub use key::{Addr, FlowKey, Proto};
pub use state::{Dir, FlowState, TcpState, Timeouts, tcp_flags};
pub use table::{
    Candidate, Config, FirstPacket, FlowInfo, FlowTable, FlowView, InsertError, Inserted, KeyHash, MAX_CAPACITY,
    NewFlow, TableError, TableStats, fold_checksum, prefetch_line,
};

/// Atomics and spin hints, swapped for loom's under `--cfg loom`.
mod sync {
    #[cfg(loom)]
    pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};
    #[cfg(not(loom))]
    pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};

    #[cfg(loom)]
    pub(crate) fn spin_loop() {
        loom::thread::yield_now();
    }
    #[cfg(not(loom))]
    pub(crate) use std::hint::spin_loop;
}
