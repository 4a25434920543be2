//! Who this gateway is: the node name (`--node-name`, else `NODE_NAME`, else
//! the hostname, like kube-proxy's `--hostname-override`), its zone (the
//! Node's `topology.kubernetes.io/zone` label, else `--zone`) and its
//! addresses (the Node's, for the node-name diagnosis).

use crate::state::ClusterState;
use crate::translate::NodeIdentity;

/// The machine's hostname, if it has one.
pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()).filter(|h| !h.is_empty())
}

/// The node name: the flag, else `NODE_NAME`, else the hostname.
pub fn node_name(flag: Option<&str>) -> Option<String> {
    flag.map(str::to_string).or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty())).or_else(hostname)
}

/// The full identity, completed from the Node object if one is known.
pub fn identity(name: String, zone_flag: Option<&str>, state: &ClusterState) -> NodeIdentity {
    NodeIdentity {
        zone: state.node_zone(&name).or_else(|| zone_flag.map(str::to_string)),
        addresses: state.node_addresses(&name),
        hostname: hostname(),
        name,
    }
}
