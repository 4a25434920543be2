//! The data path on real interfaces: the XDP steering program, AF_XDP
//! sockets and workers around the pure pipeline, and the forwarding
//! information they read.
//!
//! - [`steer`]: our XDP program (loaded with aya, attached by BPF link) and
//!   its maps, programmed from the service table.
//! - [`xsk`]: AF_XDP ports (xsk-rs) and the worker loop.
//! - [`route`]: the FIB snapshot (routes, neighbours, links) the workers
//!   read to rewrite L2 and choose the egress socket.

pub mod capture;
pub mod route;
pub mod steer;
pub mod xsk;
