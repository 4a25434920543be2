//! The XDP steering program (`bpf/steer.c`): loaded with aya, attached
//! through a BPF link (so it goes away with the process, even after
//! SIGKILL), and programmed from the published service table.
//!
//! Contract: after [`Steering::program`] with the [`SteerSet`] of a table,
//! the sockets receive exactly the frames that the program's rules select
//! (frontends, replies to SNAT addresses on SNAT ports, replies from
//! endpoints, ICMP errors about them, echo requests to VIPs unless
//! `--vip-echo never`); every other frame goes to the
//! kernel. Map updates are diffs: a change of one Service touches only its
//! keys.

use crate::service::{FrontendKind, NodeConfig, ServicePort, ServiceTable, VipEcho};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, XskMap};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::XdpLink;
use aya::programs::{Xdp, XdpFlags};
use std::collections::HashMap;
use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use xskgate_conntrack::{Addr, Proto};

/// The compiled program, aligned for the ELF parser.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/steer.o"));

/// Sockets per interface slot in the XSKMAP (the highest queue index + 1).
pub const QUEUES_PER_INTERFACE: u32 = 64;

/// `struct svc_key` of the program.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct SvcKey {
    addr: [u8; 16],
    port_be: u16,
    proto: u8,
    pad: u8,
}

// SAFETY: plain old data, `repr(C)`, no padding (16 + 2 + 1 + 1 bytes).
unsafe impl aya::Pod for SvcKey {}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct AddrKey {
    addr: [u8; 16],
}

// SAFETY: plain old data, `repr(C)`, no padding.
unsafe impl aya::Pod for AddrKey {}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct ConfigValue {
    snat_lo: u16,
    snat_hi: u16,
    /// `CONFIG_HOLD`: drop owned frames that have no socket.
    flags: u32,
}

const CONFIG_HOLD: u32 = 1;

// SAFETY: plain old data, `repr(C)`, no implicit padding (2 + 2 + 4 bytes).
unsafe impl aya::Pod for ConfigValue {}

fn svc_key(addr: &Addr, proto: Proto, port: u16) -> SvcKey {
    SvcKey { addr: addr.0, port_be: port.to_be(), proto: proto.0, pad: 0 }
}

/// What the program should steer, derived from a table and the node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SteerSet {
    /// (address, protocol, port) of every frontend; NodePorts once per node
    /// address of their family.
    pub frontends: HashSet<(Addr, Proto, u16)>,
    /// (address, protocol, port) of every endpoint of every service port.
    pub endpoints: HashSet<(Addr, Proto, u16)>,
    /// Addresses of this node, each with "is a SNAT address".
    pub local: std::collections::HashMap<Addr, bool>,
    pub snat_ports: (u16, u16),
}

impl SteerSet {
    /// The set for `table` on a node whose own addresses are `local`
    /// (the table's node addresses and SNAT addresses are added).
    pub fn of(table: &ServiceTable, local: &[Addr]) -> SteerSet {
        let node = table.node();
        let mut s = SteerSet { snat_ports: node.snat_ports, ..SteerSet::default() };
        for a in local.iter().chain(node.addresses.iter()) {
            s.local.insert(*a, false);
        }
        for a in [node.snat_v4, node.snat_v6].into_iter().flatten().chain(node.snat_routes.iter().map(|r| r.1)) {
            s.local.insert(a, true);
        }
        for p in table.ports() {
            let (fe, ep) = contributions(p, node);
            s.frontends.extend(fe);
            s.endpoints.extend(ep);
        }
        s
    }
}

/// (address, protocol, port) of a frontend or an endpoint.
pub type SteerKey = (Addr, Proto, u16);

/// What one service port adds to the frontends and endpoints maps.
fn contributions(p: &ServicePort, node: &NodeConfig) -> (Vec<SteerKey>, Vec<SteerKey>) {
    let mut fe = Vec::with_capacity(p.frontends.len());
    for f in &p.frontends {
        if f.kind == FrontendKind::NodePort {
            for a in node.addresses.iter().filter(|a| a.is_v4() == f.addr.is_v4()) {
                fe.push((*a, p.proto, f.port));
            }
        } else {
            fe.push((f.addr, p.proto, f.port));
        }
        // Echo requests to the VIP, for the pipeline to answer or drop.
        if matches!(f.kind, FrontendKind::LoadBalancer | FrontendKind::ExternalIp) && node.vip_echo != VipEcho::Never {
            fe.push((f.addr, if f.addr.is_v4() { Proto::ICMP } else { Proto::ICMPV6 }, 0));
        }
    }
    let ep = p.cluster.endpoints().iter().chain(p.local.endpoints()).map(|e| (e.addr, p.proto, e.port)).collect();
    (fe, ep)
}

/// What [`Steering::follow`] remembers between tables: the ports it saw
/// and how many ports use each key.
#[derive(Default)]
struct Followed {
    /// The generation of the table followed last.
    generation: Option<u64>,
    node: Option<NodeConfig>,
    local: Vec<Addr>,
    ports: HashMap<u32, Arc<ServicePort>>,
    frontends: HashMap<SteerKey, u32>,
    endpoints: HashMap<SteerKey, u32>,
}

/// Whether `p` itself (not just a port with its id) is the one followed.
fn already_followed(ports: &HashMap<u32, Arc<ServicePort>>, p: &Arc<ServicePort>) -> bool {
    ports.get(&p.id).is_some_and(|old| Arc::ptr_eq(old, p))
}

/// `e` and its sources, `: `-separated (aya keeps the errno in the source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Why the program could not be loaded or attached.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SteerError(pub String);

/// Counters of the program (summed over CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteerStats {
    pub steered: u64,
    pub passed: u64,
    pub no_interface: u64,
    /// Owned frames dropped because their queue had no socket while the
    /// program holds ([`Steering::pin_links`]).
    pub held: u64,
}

/// The loaded program and what it has been told.
pub struct Steering {
    ebpf: aya::Ebpf,
    attached: Vec<String>,
    current: SteerSet,
    followed: Followed,
    /// Where the links are pinned, when they outlive the process.
    pin_dir: Option<std::path::PathBuf>,
    /// Links of a predecessor, taken over by [`Steering::take_over`].
    pending: Vec<(String, XdpLink)>,
    /// Frames the predecessor's program held (its `stats` map, pinned as
    /// `dir/stats`), added to this one's [`SteerStats::held`].
    held_before: u64,
}

/// What [`Steering::take_over`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TakeOver {
    /// Interfaces whose predecessor's program this one replaced.
    pub replaced: Vec<String>,
    /// Interfaces whose pinned link could not be updated (gone with its
    /// interface): attached afresh, with the reason.
    pub attached_afresh: Vec<(String, String)>,
    /// Owned frames the predecessor's program dropped for want of a socket
    /// (the frames of the gap between the two processes).
    pub held: u64,
    /// Interfaces a predecessor was attached to and this process is not:
    /// their pins removed, their program detached.
    pub released: Vec<String>,
}

impl Steering {
    /// Loads the program into the kernel (not attached yet).
    pub fn load() -> Result<Steering, SteerError> {
        let mut ebpf =
            aya::Ebpf::load(PROGRAM).map_err(|e| SteerError(format!("loading the XDP program: {}", chain(&e))))?;
        let prog: &mut Xdp = ebpf
            .program_mut("xskgate_steer")
            .ok_or_else(|| SteerError("the XDP object has no program xskgate_steer".into()))?
            .try_into()
            .map_err(|e| SteerError(format!("xskgate_steer is not an XDP program: {e}")))?;
        prog.load().map_err(|e| SteerError(format!("the kernel refused the XDP program: {}", chain(&e))))?;
        Ok(Steering {
            ebpf,
            attached: Vec::new(),
            current: SteerSet::default(),
            followed: Followed::default(),
            pin_dir: None,
            pending: Vec::new(),
            held_before: 0,
        })
    }

    /// Makes the attachments outlive the process, for a restart without
    /// loss: each interface's link is pinned as `dir/link-<interface>` (`dir`
    /// on a BPF file system), and the program holds (drops, counted as
    /// [`SteerStats::held`]) owned frames that have no socket, so that
    /// between this process and its successor the kernel never answers a
    /// flow's packets. An interface that already has a pinned link (a
    /// predecessor's) keeps its program until [`Steering::take_over`]. To
    /// detach for good, remove the pins (`rm dir/link-*`) once no process
    /// runs.
    pub fn pin_links(&mut self, dir: &std::path::Path) -> Result<(), SteerError> {
        std::fs::create_dir_all(dir).map_err(|e| SteerError(format!("creating {}: {e}", dir.display())))?;
        self.pin_dir = Some(dir.to_path_buf());
        Ok(())
    }

    fn pin_path(&self, ifname: &str) -> Option<std::path::PathBuf> {
        self.pin_dir.as_ref().map(|d| d.join(format!("link-{ifname}")))
    }

    /// Replaces each predecessor's program by this one (atomically, one
    /// link update per interface), detaches it from interfaces this process
    /// does not serve, reads what the predecessor's program held, and pins
    /// this program's counters for the next successor. Call
    /// once, when the maps are programmed from the first table, so that
    /// the successor owns exactly what the predecessor did. An interface
    /// whose pinned link cannot be updated is attached afresh.
    pub fn take_over(&mut self) -> Result<TakeOver, SteerError> {
        let mut done = TakeOver { released: self.release_other_links(), ..TakeOver::default() };
        if self.pending.is_empty() {
            self.pin_stats()?;
            return Ok(done);
        }
        for (ifname, link) in std::mem::take(&mut self.pending) {
            let prog = self.program_ref();
            match prog.attach_to_link(link) {
                Ok(_) => done.replaced.push(ifname),
                Err(e) => {
                    let why = chain(&e);
                    if let Some(path) = self.pin_path(&ifname) {
                        let _ = std::fs::remove_file(&path);
                    }
                    self.attach_new(&ifname)?;
                    done.attached_afresh.push((ifname, why));
                }
            }
        }
        // The predecessor's program is gone from every interface: its
        // count is final.
        done.held = self.predecessor_held().unwrap_or(0);
        self.held_before = done.held;
        self.pin_stats()?;
        Ok(done)
    }

    /// Removes the pins of links to interfaces this process does not
    /// serve (a predecessor's `--interfaces` had them): with no process
    /// holding them, their program is detached. Returns those interfaces.
    fn release_other_links(&self) -> Vec<String> {
        let Some(dir) = &self.pin_dir else { return Vec::new() };
        let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
        let mut released = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(ifname) = name.strip_prefix("link-")
                && !self.attached.iter().any(|a| a == ifname)
                && std::fs::remove_file(e.path()).is_ok()
            {
                released.push(ifname.to_string());
            }
        }
        released.sort_unstable();
        released
    }

    /// `held` of the program whose `stats` map is pinned in the pin
    /// directory.
    fn predecessor_held(&self) -> Option<u64> {
        let path = self.pin_dir.as_ref()?.join("stats");
        let data = MapData::from_pin(&path).ok()?;
        let arr = PerCpuArray::<_, u64>::try_from(aya::maps::Map::PerCpuArray(data)).ok()?;
        arr.get(&3, 0).ok().map(|v| v.iter().sum())
    }

    /// Pins this program's `stats` map as `dir/stats`, in place of a
    /// predecessor's, for the successor's [`TakeOver::held`].
    fn pin_stats(&self) -> Result<(), SteerError> {
        let Some(path) = self.pin_dir.as_ref().map(|d| d.join("stats")) else { return Ok(()) };
        let _ = std::fs::remove_file(&path);
        let stats = self.ebpf.map("stats").ok_or_else(|| SteerError("no map stats".into()))?;
        stats.pin(&path).map_err(|e| SteerError(format!("pinning {}: {}", path.display(), chain(&e))))
    }

    fn program_ref(&mut self) -> &mut Xdp {
        self.ebpf.program_mut("xskgate_steer").and_then(|p| p.try_into().ok()).expect("loaded in load()")
    }

    /// Attaches to `ifname` (driver mode, else generic mode) and maps its
    /// frames to XSKMAP keys `slot * QUEUES_PER_INTERFACE + queue`.
    pub fn attach(&mut self, ifname: &str, ifindex: u32, slot: u32) -> Result<(), SteerError> {
        let mut base: BpfHashMap<&mut MapData, u32, u32> = self.map("if_base")?;
        base.insert(ifindex, slot * QUEUES_PER_INTERFACE, 0).map_err(|e| SteerError(format!("if_base map: {e}")))?;
        if let Some(path) = self.pin_path(ifname).filter(|p| p.exists()) {
            let link = PinnedLink::from_pin(&path)
                .map_err(|e| SteerError(format!("the pinned link {}: {}", path.display(), chain(&e))))
                .and_then(|p| {
                    XdpLink::try_from(FdLink::from(p))
                        .map_err(|e| SteerError(format!("the pinned link {}: {}", path.display(), chain(&e))))
                })?;
            self.pending.push((ifname.to_string(), link));
        } else {
            self.attach_new(ifname)?;
        }
        self.attached.push(ifname.to_string());
        Ok(())
    }

    /// Attaches to `ifname` (driver mode, else generic mode), pinning the
    /// link in pin mode.
    fn attach_new(&mut self, ifname: &str) -> Result<(), SteerError> {
        let pin = self.pin_path(ifname);
        let prog = self.program_ref();
        let id = match prog.attach(ifname, XdpFlags::DRV_MODE) {
            Ok(id) => id,
            Err(drv) => {
                let id = prog.attach(ifname, XdpFlags::SKB_MODE).map_err(|skb| {
                    SteerError(format!(
                        "cannot attach XDP to {ifname}: driver mode: {}; generic mode: {}",
                        chain(&drv),
                        chain(&skb)
                    ))
                })?;
                tracing::warn!(interface = ifname, "XDP in generic (skb) mode: driver mode failed: {drv}");
                id
            }
        };
        if let Some(path) = pin {
            let pinned = prog
                .take_link(id)
                .map_err(|e| SteerError(format!("taking the link of {ifname}: {}", chain(&e))))
                .and_then(|l| {
                    FdLink::try_from(l).map_err(|e| SteerError(format!("the link of {ifname}: {}", chain(&e))))
                })
                .and_then(|l| {
                    l.pin(&path).map_err(|e| SteerError(format!("pinning {}: {}", path.display(), chain(&e))))
                })?;
            // The pin holds the link; this descriptor is not needed.
            drop(pinned);
        }
        Ok(())
    }

    /// Puts an AF_XDP socket at `slot`, `queue`.
    pub fn add_socket(&mut self, slot: u32, queue: u32, fd: &impl AsRawFd) -> Result<(), SteerError> {
        let mut xsks: XskMap<&mut MapData> = self
            .ebpf
            .map_mut("xsks")
            .ok_or_else(|| SteerError("no map xsks".into()))?
            .try_into()
            .map_err(|e| SteerError(format!("xsks: {e}")))?;
        xsks.set(slot * QUEUES_PER_INTERFACE + queue, fd.as_raw_fd(), 0)
            .map_err(|e| SteerError(format!("adding the socket of queue {queue} to xsks: {e}")))
    }

    fn map<K: aya::Pod, V: aya::Pod>(&mut self, name: &str) -> Result<BpfHashMap<&mut MapData, K, V>, SteerError> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| SteerError(format!("no map {name}")))?
            .try_into()
            .map_err(|e| SteerError(format!("map {name}: {e}")))
    }

    /// Brings the maps to `want`, touching only what differs. Returns the
    /// number of keys written or removed. A failed write (a full map) is
    /// reported after the rest was applied.
    pub fn program(&mut self, want: &SteerSet) -> Result<usize, SteerError> {
        let mut changed = 0;
        let mut first_error = None;
        let mut note = |r: Result<(), aya::maps::MapError>, what: &str| match r {
            Ok(()) => changed += 1,
            Err(e) => {
                if first_error.is_none() {
                    first_error = Some(SteerError(format!("{what}: {e}")));
                }
            }
        };
        let current = std::mem::take(&mut self.current);
        for (name, have, wanted) in
            [("frontends", &current.frontends, &want.frontends), ("endpoints", &current.endpoints, &want.endpoints)]
        {
            let mut m: BpfHashMap<&mut MapData, SvcKey, u8> = self.map(name)?;
            for k in have.difference(wanted) {
                note(m.remove(&svc_key(&k.0, k.1, k.2)), name);
            }
            for k in wanted.difference(have) {
                note(m.insert(svc_key(&k.0, k.1, k.2), 1, 0), name);
            }
        }
        let mut locals: BpfHashMap<&mut MapData, AddrKey, u8> = self.map("local_addrs")?;
        for a in current.local.keys().filter(|a| !want.local.contains_key(a)) {
            note(locals.remove(&AddrKey { addr: a.0 }), "local_addrs");
        }
        for (a, snat) in want.local.iter().filter(|(a, s)| current.local.get(a) != Some(s)) {
            note(locals.insert(AddrKey { addr: a.0 }, u8::from(*snat), 0), "local_addrs");
        }
        if current.snat_ports != want.snat_ports || current == SteerSet::default() {
            let mut cfg: Array<&mut MapData, ConfigValue> = self
                .ebpf
                .map_mut("config")
                .ok_or_else(|| SteerError("no map config".into()))?
                .try_into()
                .map_err(|e| SteerError(format!("config: {e}")))?;
            let flags = if self.pin_dir.is_some() { CONFIG_HOLD } else { 0 };
            let v = ConfigValue { snat_lo: want.snat_ports.0, snat_hi: want.snat_ports.1, flags };
            note(cfg.set(0, v, 0), "config");
        }
        self.current = want.clone();
        match first_error {
            Some(e) => Err(e),
            None => Ok(changed),
        }
    }

    /// Brings the maps to the set of `table` in time proportional to what
    /// changed since the last call: when `table` was made from the table
    /// followed last, only the ports it names as changed are looked at;
    /// otherwise service ports are compared by pointer (the publisher shares
    /// unchanged ones between tables). Only the keys of changed ports are
    /// written. A changed node configuration or address list falls back to
    /// [`program`](Self::program).
    pub fn follow(&mut self, table: &ServiceTable, local: &[Addr]) -> Result<usize, SteerError> {
        let node = table.node();
        if self.followed.node.as_ref() != Some(node) || self.followed.local != local {
            let set = SteerSet::of(table, local);
            let mut f = Followed {
                generation: Some(table.generation()),
                node: Some(node.clone()),
                local: local.to_vec(),
                ..Followed::default()
            };
            for p in table.ports() {
                let (fe, ep) = contributions(p, node);
                for k in fe {
                    *f.frontends.entry(k).or_default() += 1;
                }
                for k in ep {
                    *f.endpoints.entry(k).or_default() += 1;
                }
                f.ports.insert(p.id, p.clone());
            }
            self.followed = f;
            return self.program(&set);
        }
        let mut added: Vec<(bool, SteerKey)> = Vec::new();
        let mut removed: Vec<(bool, SteerKey)> = Vec::new();
        let followed = &mut self.followed;
        let mut count = |fe: Vec<SteerKey>, ep: Vec<SteerKey>, delta: i32| {
            for (is_fe, k) in fe.into_iter().map(|k| (true, k)).chain(ep.into_iter().map(|k| (false, k))) {
                let map = if is_fe { &mut followed.frontends } else { &mut followed.endpoints };
                let c = map.entry(k).or_default();
                if delta > 0 {
                    *c += 1;
                    if *c == 1 {
                        added.push((is_fe, k));
                    }
                } else {
                    *c = c.saturating_sub(1);
                    if *c == 0 {
                        map.remove(&k);
                        removed.push((is_fe, k));
                    }
                }
            }
        };
        let since_last = followed.generation.and_then(|g| table.changed_since(g));
        let changed: Vec<Arc<ServicePort>> = match since_last {
            // The table says which ports it changed: look at those only.
            Some(ids) => {
                for id in ids {
                    if table.port(*id).is_none()
                        && let Some(old) = followed.ports.remove(id)
                    {
                        let (fe, ep) = contributions(&old, node);
                        count(fe, ep, -1);
                    }
                }
                ids.iter()
                    .filter_map(|id| table.port(*id))
                    .filter(|p| !already_followed(&followed.ports, p))
                    .cloned()
                    .collect()
            }
            None => table.ports().iter().filter(|p| !already_followed(&followed.ports, p)).cloned().collect(),
        };
        for p in changed {
            if let Some(old) = followed.ports.insert(p.id, p.clone()) {
                let (fe, ep) = contributions(&old, node);
                count(fe, ep, -1);
            }
            let (fe, ep) = contributions(&p, node);
            count(fe, ep, 1);
        }
        followed.generation = Some(table.generation());
        // Ports that left the table (ids are unique per table).
        if followed.ports.len() > table.ports().len() {
            let ids: std::collections::HashSet<u32> = table.ports().iter().map(|p| p.id).collect();
            let gone: Vec<u32> = followed.ports.keys().filter(|id| !ids.contains(id)).copied().collect();
            for id in gone {
                if let Some(old) = followed.ports.remove(&id) {
                    let (fe, ep) = contributions(&old, node);
                    count(fe, ep, -1);
                }
            }
        }
        // A key removed and added back (moved between ports) stays.
        let readded: std::collections::HashSet<(bool, SteerKey)> = added.iter().copied().collect();
        removed.retain(|k| !readded.contains(k) || !self.current_has(k));
        added.retain(|k| !self.current_has(k));
        let mut written = 0;
        let mut first_error = None;
        for (name, is_fe) in [("frontends", true), ("endpoints", false)] {
            let mut m: BpfHashMap<&mut MapData, SvcKey, u8> = self.map(name)?;
            for (_, k) in removed.iter().filter(|(f, _)| *f == is_fe) {
                match m.remove(&svc_key(&k.0, k.1, k.2)) {
                    Ok(()) => written += 1,
                    Err(e) => {
                        first_error.get_or_insert(SteerError(format!("{name}: {e}")));
                    }
                }
            }
            for (_, k) in added.iter().filter(|(f, _)| *f == is_fe) {
                match m.insert(svc_key(&k.0, k.1, k.2), 1, 0) {
                    Ok(()) => written += 1,
                    Err(e) => {
                        first_error.get_or_insert(SteerError(format!("{name}: {e}")));
                    }
                }
            }
        }
        for (is_fe, k) in removed {
            if is_fe {
                self.current.frontends.remove(&k)
            } else {
                self.current.endpoints.remove(&k)
            };
        }
        for (is_fe, k) in added {
            if is_fe {
                self.current.frontends.insert(k)
            } else {
                self.current.endpoints.insert(k)
            };
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(written),
        }
    }

    /// The frontends and endpoints the kernel's maps hold now (read back
    /// from the maps, for diagnostics and tests).
    pub fn programmed(&self) -> (HashSet<SteerKey>, HashSet<SteerKey>) {
        let read = |name: &str| -> HashSet<SteerKey> {
            let Some(m) = self.ebpf.map(name) else { return HashSet::new() };
            let Ok(h) = BpfHashMap::<&MapData, SvcKey, u8>::try_from(m) else { return HashSet::new() };
            h.keys().filter_map(Result::ok).map(|k| (Addr(k.addr), Proto(k.proto), u16::from_be(k.port_be))).collect()
        };
        (read("frontends"), read("endpoints"))
    }

    fn current_has(&self, k: &(bool, SteerKey)) -> bool {
        if k.0 { self.current.frontends.contains(&k.1) } else { self.current.endpoints.contains(&k.1) }
    }

    /// The program's counters.
    pub fn stats(&self) -> SteerStats {
        let Some(m) = self.ebpf.map("stats") else { return SteerStats::default() };
        let Ok(arr) = PerCpuArray::<&MapData, u64>::try_from(m) else { return SteerStats::default() };
        let sum = |i: u32| arr.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0);
        SteerStats { steered: sum(0), passed: sum(1), no_interface: sum(2), held: self.held_before + sum(3) }
    }

    /// Interfaces the program is attached to.
    pub fn interfaces(&self) -> &[String] {
        &self.attached
    }
}
