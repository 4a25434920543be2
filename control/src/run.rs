//! `xskgate run`: the daemon a gateway node runs.
//!
//! Start-up, in order, each step failing with a plain message (never a
//! panic): read the interfaces, addresses and routes over rtnetlink; check
//! that every `--interfaces` entry exists; choose the node and SNAT
//! addresses; load the XDP steering program (needs root: CAP_BPF,
//! CAP_NET_ADMIN, CAP_SYS_ADMIN on older kernels) and attach it to each
//! interface through a BPF link (it goes away with the process, also after
//! SIGKILL); open one AF_XDP socket per (interface, queue); start one worker
//! thread per queue; open `/healthz`, `/livez`, `/metrics` and the admin
//! endpoint ([`crate::admin`]); then follow the manifest directory or the
//! Kubernetes API. With `--capture-drops FILE`, dropped frames are written
//! to FILE as pcapng (flushed every 100 ms and at exit).
//!
//! Every published table is followed by the steering maps and the
//! healthCheckNodePort servers. The FIB follows rtnetlink notifications
//! (neighbours patched at once; links, addresses and routes re-read within
//! 50 ms; a full re-read every 2 s in case one was lost). The next hops of
//! all endpoints are kept resolved as managed neighbour entries, and a next
//! hop a worker could not resolve is looked up and requested at once.
//! SIGINT or SIGTERM stops the workers, detaches the program and exits 0.

use crate::controller::{ControlLoop, Controller};
use crate::health::{ProxyHealth, ServiceHealth, spawn_proxy_health, wanted};
use crate::kube_source::ClientError;
use crate::metrics::{self, ControlMetrics, DataPathSources, Sources};
use crate::netlink::{InterfaceAddress, Mirror, NetlinkError};
use crate::publish::Publisher;
use crate::source::Source;
use arc_swap::ArcSwap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{error, info, warn};
use xskgate_conntrack::{Addr, FlowTable};
use xskgate_fastpath::io::capture::{DropCapture, reason_mask};
use xskgate_fastpath::io::route::{Fib, NextHop};
use xskgate_fastpath::io::steer::{SteerError, Steering};
use xskgate_fastpath::io::xsk::{IoError, Port, Shared, Worker};
use xskgate_fastpath::{AffinityTable, Cidr, Counters, NodeConfig, ServiceTable, ServiceTableHandle, VipEcho};

/// Everything `xskgate run` is told.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub manifests: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub node_name: String,
    pub zone: Option<String>,
    pub interfaces: Vec<String>,
    pub cluster_cidrs: Vec<Cidr>,
    /// `--nodeport-addresses`: NodePorts answer only on node addresses
    /// within these (empty: on every node address).
    pub nodeport_cidrs: Vec<Cidr>,
    pub snat_addresses: Vec<IpAddr>,
    pub snat_ports: (u16, u16),
    pub cpus: Vec<usize>,
    pub healthz_bind: SocketAddr,
    pub metrics_bind: SocketAddr,
    pub conntrack_capacity: usize,
    /// Idle timeouts per state (`--conntrack-*-timeout*`).
    pub conntrack_timeouts: xskgate_conntrack::Timeouts,
    pub poll: Duration,
    pub admin_bind: SocketAddr,
    pub vip_echo: VipEcho,
    /// `--lb-mode`: the mode of Services without the annotation.
    pub lb_mode: crate::translate::LbMode,
    /// `--capture-drops`: where to write dropped frames (pcapng).
    pub capture_drops: Option<PathBuf>,
    /// Which reasons to capture (empty: all).
    pub capture_reasons: Vec<xskgate_fastpath::DropReason>,
    /// Captured packets per second, over all workers.
    pub capture_rate: u32,
    /// `--state-dir`: what outlives the process, for a restart that keeps
    /// the flows.
    pub restart: Option<RestartState>,
}

/// Where the state a successor takes over lives.
#[derive(Clone, Debug)]
pub struct RestartState {
    /// The conntrack table's file is `state_dir/conntrack` (a memory file
    /// system: the table is read and written at packet rate).
    pub state_dir: PathBuf,
    /// The XDP links and counters, on a BPF file system.
    pub bpf_pin_dir: PathBuf,
}

/// `statfs` magic of a BPF file system.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `dir` (or, when it does not exist yet, its parent) is on a BPF
/// file system.
fn on_bpffs(dir: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let probe = if dir.exists() { dir } else { dir.parent().unwrap_or(dir) };
    let Ok(c) = std::ffi::CString::new(probe.as_os_str().as_bytes()) else { return false };
    // SAFETY: a NUL-terminated path and a zeroed, writable statfs.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the result is checked.
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == BPF_FS_MAGIC
}

/// The node's addresses and SNAT choice, from the interfaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Addressing {
    pub node_addresses: Vec<Addr>,
    pub snat_v4: Option<Addr>,
    pub snat_v6: Option<Addr>,
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
        IpAddr::V4(v4) => v4.is_link_local(),
    }
}

/// Node addresses are the (non-link-local) addresses of the interfaces;
/// the fallback SNAT address of a family (used when no route of
/// [`snat_routes`] holds the endpoint) is `--snat-address` if given, else
/// the address of the interface by which the route to the cluster CIDR
/// leaves (the side the endpoints are on), else the first node address.
pub fn addressing(
    interfaces: &[u32],
    addrs: &[InterfaceAddress],
    fib: &Fib,
    cluster_cidrs: &[Cidr],
    snat_flag: &[IpAddr],
) -> Addressing {
    let node_addresses: Vec<Addr> = addrs
        .iter()
        .filter(|a| interfaces.contains(&a.ifindex) && !is_link_local(&a.addr))
        .map(|a| Addr::from(a.addr))
        .collect();
    let pick = |v4: bool| -> Option<Addr> {
        if let Some(ip) = snat_flag.iter().find(|ip| ip.is_ipv4() == v4) {
            return Some(Addr::from(*ip));
        }
        // The interface of the first route into the cluster CIDR (the
        // CIDR itself, or a part of it such as a node's pod range).
        let toward_pods = cluster_cidrs
            .iter()
            .filter(|c| c.network().is_v4() == v4)
            .filter_map(|c| {
                fib.next_hop(&c.network()).or_else(|| {
                    fib.routes()
                        .iter()
                        .find(|r| c.contains(&r.dst.network()))
                        .map(|r| NextHop { oif: r.oif, via: r.dst.network() })
                })
            })
            .find_map(|hop| {
                addrs
                    .iter()
                    .find(|a| a.ifindex == hop.oif && a.addr.is_ipv4() == v4 && !is_link_local(&a.addr))
                    .map(|a| Addr::from(a.addr))
            });
        toward_pods.or_else(|| node_addresses.iter().copied().find(|a| a.is_v4() == v4))
    };
    Addressing { snat_v4: pick(true), snat_v6: pick(false), node_addresses }
}

/// Masquerade by egress: for every route that leaves by one of the
/// interfaces, that interface's first (non-link-local) address of the
/// route's family, longest prefix first (the FIB's order).
pub fn snat_routes(interfaces: &[u32], addrs: &[InterfaceAddress], fib: &Fib) -> Vec<(Cidr, Addr)> {
    fib.routes()
        .iter()
        .filter(|r| interfaces.contains(&r.oif))
        .filter_map(|r| {
            let v4 = r.dst.network().is_v4();
            addrs
                .iter()
                .find(|a| a.ifindex == r.oif && a.addr.is_ipv4() == v4 && !is_link_local(&a.addr))
                .map(|a| (r.dst, Addr::from(a.addr)))
        })
        .collect()
}

/// How long to wait after asking for neighbours before re-reading them.
const RESOLVE_WAIT: Duration = Duration::from_millis(20);

async fn refresh_fib(mirror: &Mirror, fib: &ArcSwap<Fib>) {
    match mirror.fib().await {
        Ok((f, _)) => fib.store(Arc::new(f)),
        Err(e) => warn!("cannot re-read routes and neighbours: {e}"),
    }
}

/// Keeps the next hops of every endpoint resolved: each one without a
/// neighbour entry becomes a managed entry (the kernel resolves it and keeps
/// it resolved), so a flow's first packets do not meet `no_neighbor`.
async fn resolve_endpoints(mirror: &Mirror, fib: &ArcSwap<Fib>, table: &ServiceTable, interfaces: &[u32]) {
    let current = fib.load_full();
    let mut asked = std::collections::HashSet::new();
    for p in table.ports() {
        for e in p.cluster.endpoints().iter().chain(p.local.endpoints()) {
            let Some(hop) = current.next_hop(&e.addr) else { continue };
            if interfaces.contains(&hop.oif)
                && current.neighbour(hop.oif, &hop.via).is_none()
                && asked.insert((hop.oif, hop.via))
                && let Err(e) = mirror.resolve(hop.oif, hop.via).await
            {
                warn!("cannot ask for the neighbour {}: {e}", hop.via);
            }
        }
    }
    if !asked.is_empty() {
        tokio::time::sleep(RESOLVE_WAIT).await;
        refresh_fib(mirror, fib).await;
    }
}

/// Receive queues of an interface (sysfs), at least 1.
fn rx_queues(ifname: &str) -> u32 {
    std::fs::read_dir(format!("/sys/class/net/{ifname}/queues"))
        .map(|d| d.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().starts_with("rx-")).count() as u32)
        .unwrap_or(1)
        .max(1)
}

fn pin_to(cpu: usize) -> std::io::Result<()> {
    // SAFETY: `set` is a zeroed cpu_set_t on the stack, passed with its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Why `xskgate run` could not start, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}{hint}", hint = privilege_hint(.0))]
    Netlink(#[from] NetlinkError),
    #[error("interface {name:?} does not exist here (interfaces: {})", have.join(", "))]
    NoInterface { name: String, have: Vec<String> },
    #[error("cannot allocate the conntrack table ({capacity} flows): {source}")]
    Conntrack { capacity: usize, source: xskgate_conntrack::TableError },
    #[error("{0}{hint}", hint = privilege_hint(.0))]
    Steering(#[from] SteerError),
    #[error("{0}{hint}", hint = privilege_hint(.0))]
    Socket(#[from] IoError),
    #[error("cannot start a worker thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot listen on --{flag} {addr}: {source}")]
    Listen { flag: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("cannot write the drop capture {}: {source}", path.display())]
    Capture { path: PathBuf, source: std::io::Error },
    #[error("cannot install the SIGTERM handler: {0}")]
    Signal(std::io::Error),
    #[error("--bpf-pin-dir {} is not on a BPF file system (mount one: mount -t bpf bpf {})", .0.display(), .0.parent().unwrap_or(.0).display())]
    NotBpffs(PathBuf),
    #[error("cannot create --state-dir {}: {source}", path.display())]
    StateDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Kubernetes(#[from] ClientError),
}

/// What to add to a start-up error that looks like missing privileges.
fn privilege_hint(e: &dyn std::fmt::Display) -> &'static str {
    let e = e.to_string();
    if e.contains("Operation not permitted") || e.contains("EPERM") || e.contains("permission") {
        " (xskgate run needs root, or CAP_BPF, CAP_NET_ADMIN, CAP_NET_RAW, CAP_PERFMON and CAP_IPC_LOCK)"
    } else {
        ""
    }
}

/// Programs the steering maps for `table` (a diff of what they hold).
fn program_steering(steering: &Mutex<Steering>, local: &[Addr], table: &ServiceTable, m: &ControlMetrics) {
    let mut s = steering.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Err(e) = s.follow(table, local) {
        m.steering_errors.fetch_add(1, Ordering::Relaxed);
        error!("steering map update: {e}; frames of the affected Services may go to the kernel");
    }
}

/// Writes the frames captured so far to the `--capture-drops` file and
/// flushes it; a write error is logged (the capture goes on).
fn write_captured(
    capture: &DropCapture,
    path: &std::path::Path,
    w: &mut crate::admin::PcapNg<std::io::BufWriter<std::fs::File>>,
) {
    let mut failed = None;
    capture.drain(|c| {
        if let Err(e) = w.write(c) {
            failed.get_or_insert(e.to_string());
        }
    });
    if let Err(e) = std::io::Write::flush(w.get_mut()) {
        failed.get_or_insert(e.to_string());
    }
    if let Some(e) = failed {
        warn!(file = %path.display(), "cannot write the drop capture: {e}");
    }
}

/// The data path's running pieces.
struct DataPath {
    steering: Arc<Mutex<Steering>>,
    local: Vec<Addr>,
    stop: Arc<AtomicBool>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl DataPath {
    fn shutdown(self) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            let _ = w.join();
        }
        // Dropping the Steering detaches the program (the BPF links close).
        drop(self.steering);
    }
}

/// Runs the daemon until SIGINT/SIGTERM. Errors are start-up failures,
/// worded for the operator.
pub async fn run(cfg: RunConfig) -> Result<(), RunError> {
    let started = Instant::now();
    // Subscribe first, then dump: no change falls between the two.
    let mut fib_events = crate::netlink::events()?;
    let mirror = Mirror::new()?;
    let (fib, addrs) = mirror.fib().await?;
    let mut ifindexes = Vec::new();
    for name in &cfg.interfaces {
        match fib.links().find(|l| &l.name == name) {
            Some(l) => ifindexes.push(l.ifindex),
            None => {
                let mut have: Vec<String> = fib.links().map(|l| l.name.clone()).collect();
                have.sort_unstable();
                return Err(RunError::NoInterface { name: name.clone(), have });
            }
        }
    }
    let addressing = addressing(&ifindexes, &addrs, &fib, &cfg.cluster_cidrs, &cfg.snat_addresses);
    let nodeport_addresses: Vec<Addr> = addressing
        .node_addresses
        .iter()
        .copied()
        .filter(|a| cfg.nodeport_cidrs.is_empty() || cfg.nodeport_cidrs.iter().any(|c| c.contains(a)))
        .collect();
    if nodeport_addresses.is_empty() && !cfg.nodeport_cidrs.is_empty() {
        warn!(
            nodeport_addresses = %cfg.nodeport_cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(","),
            "no address of --interfaces is within --nodeport-addresses: NodePorts answer nowhere"
        );
    }
    let node = NodeConfig {
        addresses: nodeport_addresses,
        pod_cidrs: cfg.cluster_cidrs.clone(),
        snat_v4: addressing.snat_v4,
        snat_v6: addressing.snat_v6,
        snat_ports: cfg.snat_ports,
        snat_routes: if cfg.snat_addresses.is_empty() { snat_routes(&ifindexes, &addrs, &fib) } else { Vec::new() },
        vip_echo: cfg.vip_echo,
    };
    let ms = |since: Instant| since.elapsed().as_millis() as u64;
    let (fib_ms, phase) = (ms(started), Instant::now());
    let ct_config = xskgate_conntrack::Config {
        capacity: cfg.conntrack_capacity,
        timeouts: cfg.conntrack_timeouts,
        ..xskgate_conntrack::Config::default()
    };
    let conntrack_err = |source| RunError::Conntrack { capacity: cfg.conntrack_capacity, source };
    // Whether the table holds a predecessor's flows (checked against the
    // first table published).
    let mut resumed = false;
    let conntrack = Arc::new(match &cfg.restart {
        None => FlowTable::new(ct_config).map_err(conntrack_err)?,
        Some(r) => {
            if !on_bpffs(&r.bpf_pin_dir) {
                return Err(RunError::NotBpffs(r.bpf_pin_dir.clone()));
            }
            std::fs::create_dir_all(&r.state_dir)
                .map_err(|source| RunError::StateDir { path: r.state_dir.clone(), source })?;
            let path = r.state_dir.join("conntrack");
            let (table, resume) = FlowTable::open_file(ct_config, &path).map_err(conntrack_err)?;
            use xskgate_conntrack::persist::Resume;
            resumed = matches!(resume, Resume::Resumed { .. });
            match resume {
                Resume::Created => info!(file = %path.display(), "conntrack table created"),
                Resume::Resumed { flows, dropped } => {
                    info!(file = %path.display(), flows, dropped_half_written = dropped, "conntrack table resumed")
                }
                Resume::Replaced { reason } => {
                    warn!(file = %path.display(), "conntrack table replaced by an empty one: {reason}")
                }
            }
            table
        }
    });
    let affinity = Arc::new(AffinityTable::new(1 << 16));
    let handle = Arc::new(ServiceTableHandle::new(ServiceTable::default()));
    let fib_handle = Arc::new(ArcSwap::from_pointee(fib));

    let (conntrack_ms, phase) = (ms(phase), Instant::now());
    let mut steering = Steering::load()?;
    if let Some(r) = &cfg.restart {
        steering.pin_links(&r.bpf_pin_dir)?;
    }
    for (slot, (name, ifindex)) in cfg.interfaces.iter().zip(&ifindexes).enumerate() {
        steering.attach(name, *ifindex, slot as u32)?;
    }
    let (program_ms, phase) = (ms(phase), Instant::now());
    let queues = cfg.interfaces.iter().map(|i| rx_queues(i)).max().unwrap_or(1);
    let mut per_queue: Vec<Vec<Port>> = (0..queues).map(|_| Vec::new()).collect();
    for (slot, (name, ifindex)) in cfg.interfaces.iter().zip(&ifindexes).enumerate() {
        for q in 0..rx_queues(name) {
            let port = Port::open(name, *ifindex, q)?;
            steering.add_socket(slot as u32, q, &port.fd())?;
            per_queue[q as usize].push(port);
        }
    }
    let sockets_ms = ms(phase);
    let steering = Arc::new(Mutex::new(steering));
    let (resolve_tx, mut resolve_rx) = tokio::sync::mpsc::channel::<(u32, Addr)>(1024);
    let stop = Arc::new(AtomicBool::new(false));
    let capture = Arc::new(DropCapture::new());
    let shared = Shared {
        capture: capture.clone(),
        services: handle.clone(),
        conntrack: conntrack.clone(),
        affinity,
        fib: fib_handle.clone(),
        resolve: Arc::new(move |ifindex, addr| {
            // Full: requests are already waiting; this one will come again.
            let _ = resolve_tx.try_send((ifindex, addr));
        }),
        stop: stop.clone(),
        epoch: conntrack.epoch(),
    };
    let mut snapshots = Vec::new();
    let mut workers = Vec::new();
    for (q, ports) in per_queue.into_iter().enumerate() {
        if ports.is_empty() {
            continue;
        }
        let (worker, snapshot) = Worker::new(ports, shared.clone());
        snapshots.push(snapshot);
        let cpu = (!cfg.cpus.is_empty()).then(|| cfg.cpus[q % cfg.cpus.len()]);
        let t = std::thread::Builder::new()
            .name(format!("xsk-q{q}"))
            .spawn(move || {
                if let Some(cpu) = cpu
                    && let Err(e) = pin_to(cpu)
                {
                    warn!(queue = q, cpu, "cannot pin the worker: {e}");
                }
                worker.run();
            })
            .map_err(RunError::Thread)?;
        workers.push(t);
    }
    let worker_counters = snapshots.clone();
    let local: Vec<Addr> = addrs.iter().map(|a| Addr::from(a.addr)).collect();
    let dp = DataPath { steering: steering.clone(), local, stop, workers };

    let control_metrics = Arc::new(ControlMetrics::default());
    let proxy_health = Arc::new(ProxyHealth::new(Duration::from_secs(60)));
    let (healthz_addr, _healthz) = spawn_proxy_health(cfg.healthz_bind, proxy_health.clone())
        .await
        .map_err(|source| RunError::Listen { flag: "healthz-bind-address", addr: cfg.healthz_bind, source })?;
    let sources = Sources {
        control: control_metrics.clone(),
        services: handle.clone(),
        data_path: Some(DataPathSources {
            workers: snapshots,
            conntrack: conntrack.clone(),
            steer: {
                let s = steering.clone();
                Arc::new(move || s.lock().unwrap_or_else(std::sync::PoisonError::into_inner).stats())
            },
        }),
    };
    let (metrics_addr, _metrics) = metrics::serve(cfg.metrics_bind, sources)
        .await
        .map_err(|source| RunError::Listen { flag: "metrics-bind-address", addr: cfg.metrics_bind, source })?;
    let interfaces: Vec<(u32, String)> = ifindexes.iter().copied().zip(cfg.interfaces.iter().cloned()).collect();
    let capturing = Arc::new(AtomicBool::new(false));
    let mut capture_file = match &cfg.capture_drops {
        Some(path) => {
            let file =
                std::fs::File::create(path).map_err(|source| RunError::Capture { path: path.clone(), source })?;
            let w = crate::admin::PcapNg::new(std::io::BufWriter::new(file), &interfaces)
                .map_err(|e| RunError::Capture { path: path.clone(), source: std::io::Error::other(e.to_string()) })?;
            capturing.store(true, Ordering::Release);
            capture.start(reason_mask(&cfg.capture_reasons), cfg.capture_rate);
            Some((path.clone(), w))
        }
        None => None,
    };
    let (admin_tx, mut admin_rx) = tokio::sync::mpsc::channel(16);
    let admin = crate::admin::Admin {
        requests: admin_tx,
        capture: capture.clone(),
        capturing,
        conntrack: conntrack.clone(),
        interfaces,
    };
    let (admin_addr, _admin) = crate::admin::serve(cfg.admin_bind, admin).await.map_err(|source| RunError::Listen {
        flag: "admin-bind-address",
        addr: cfg.admin_bind,
        source,
    })?;
    let mut service_health = ServiceHealth::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), proxy_health.clone());

    let mut publisher = Publisher::new(handle.clone(), Some(conntrack.clone()), node.clone());
    publisher.set_default_lb_mode(cfg.lb_mode);
    // The steering maps follow each publication at once (before the UDP
    // flush); network programming ends there: the change is live.
    {
        let (steering, local, m) = (dp.steering.clone(), dp.local.clone(), control_metrics.clone());
        // With --state-dir, the first table's maps programmed, this
        // program takes the interfaces over from a predecessor's.
        let mut take_over = cfg.restart.is_some();
        let started_at = started;
        publisher.on_publish(Box::new(move |table| {
            program_steering(&steering, &local, table, &m);
            m.network_programming.record(m.since_received());
            if std::mem::take(&mut take_over) {
                let mut s = steering.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                match s.take_over() {
                    Ok(t) => {
                        if !t.released.is_empty() {
                            warn!(interfaces = %t.released.join(","), "detached from interfaces a predecessor served and --interfaces does not name");
                        }
                        for (ifname, why) in &t.attached_afresh {
                            warn!(interface = %ifname, "the predecessor's XDP link could not be taken over ({why}): attached afresh");
                        }
                        if t.replaced.is_empty() && t.attached_afresh.is_empty() {
                            info!("XDP links pinned: a restart keeps the flows");
                        } else {
                            info!(
                                interfaces = %t.replaced.join(","),
                                held_frames = t.held,
                                since_start_ms = started_at.elapsed().as_millis() as u64,
                                "took over from the predecessor (its frames of the gap were dropped, not passed to the kernel)"
                            );
                        }
                    }
                    Err(e) => error!("taking over the predecessor's XDP links: {e}; the predecessor's program stays"),
                }
            }
        }));
    }
    let source = match &cfg.manifests {
        Some(dir) => Source::manifests(dir, cfg.poll),
        None => Source::kubernetes(cfg.kubeconfig.as_deref(), &cfg.node_name).await?,
    };
    let controller = Controller::new(publisher, cfg.node_name.clone(), cfg.zone.clone());
    let mut control = ControlLoop::new(source, controller, control_metrics.clone(), proxy_health.clone());
    info!(
        node = %cfg.node_name,
        interfaces = %cfg.interfaces.join(","),
        queues,
        source = control.source_name(),
        nodeport_addresses = %node.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(","),
        snat_v4 = %node.snat_v4.map(|a| a.to_string()).unwrap_or_else(|| "none".into()),
        snat_v6 = %node.snat_v6.map(|a| a.to_string()).unwrap_or_else(|| "none".into()),
        snat_ports = %format!("{}-{}", cfg.snat_ports.0, cfg.snat_ports.1),
        snat_by_egress = %node.snat_routes.iter().map(|(c, a)| format!("{c}->{a}")).collect::<Vec<_>>().join(","),
        healthz = %healthz_addr,
        metrics = %metrics_addr,
        admin = %admin_addr,
        vip_echo = cfg.vip_echo.name(),
        lb_mode = cfg.lb_mode.name(),
        conntrack_max = cfg.conntrack_capacity,
        conntrack_timeouts = %format!(
            "tcp_established={}s,tcp_close_wait={}s,udp={}s,udp_stream={}s",
            cfg.conntrack_timeouts.tcp_established,
            cfg.conntrack_timeouts.tcp_close_wait,
            cfg.conntrack_timeouts.udp_unreplied,
            cfg.conntrack_timeouts.udp_replied
        ),
        capture_drops = %cfg.capture_drops.as_ref().map_or_else(|| "off".into(), |p| p.display().to_string()),
        start_ms = started.elapsed().as_millis() as u64,
        fib_ms,
        conntrack_ms,
        program_ms,
        sockets_ms,
        "xskgate running"
    );

    let mut sigterm =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(RunError::Signal)?;
    let mut fib_tick = tokio::time::interval(Duration::from_millis(50));
    let mut fib_dirty = false;
    let mut fib_tick_count = 0u64;
    let mut sweep_tick = tokio::time::interval(Duration::from_secs(1));
    let mut sweep_cursor = 0usize;
    let epoch = shared.epoch;
    let mut services_summary_logged = false;
    let mut published_at = Instant::now();
    let mut capture_tick = tokio::time::interval(Duration::from_millis(100));

    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { info!("SIGINT: stopping"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break; }
            out = control.step() => {
                let Some(out) = out else { error!("the {} source ended", control.source_name()); break; };
                service_health.sync(&wanted(control.controller().publisher().entries())).await;
                if out.published {
                    published_at = Instant::now();
                    if std::mem::take(&mut resumed) {
                        let removed = control.controller().publisher().flush_udp_to_unknown_endpoints();
                        info!(udp_flows_flushed = removed, "resumed flows checked against the first table: UDP flows to endpoints it does not have removed");
                    }
                    resolve_endpoints(&mirror, &fib_handle, &handle.load(), &ifindexes).await;
                }
            }
            Some(request) = admin_rx.recv() => {
                let table = handle.load_full();
                let entries: Vec<_> = control.controller().publisher().entries().cloned().collect();
                match request {
                    crate::admin::Request::Status(reply) => {
                        let mut counters = Counters::default();
                        for w in &worker_counters {
                            counters.add(&w.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pipeline);
                        }
                        let status = crate::admin::status(&crate::admin::StatusInput {
                            node: &cfg.node_name,
                            interfaces: &cfg.interfaces,
                            source: control.source_name(),
                            uptime: started.elapsed(),
                            table: &table,
                            table_age: published_at.elapsed(),
                            entries: &entries,
                            counters: &counters,
                            conntrack: &conntrack,
                            health_open: &service_health.ports(),
                            proxy_healthy: proxy_health.is_healthy().0,
                            capture: capture_file.is_some().then(|| capture.stats()),
                        });
                        let _ = reply.send(status);
                    }
                    crate::admin::Request::Explain { frame, text, reply } => {
                        let live = crate::explain::Live { conntrack: &conntrack, now: epoch.elapsed().as_secs() as u32 };
                        let c = control.controller();
                        let x = crate::explain::explain_frame(&frame, &text, &table, &entries, c.state(), c.identity(), Some(&live));
                        let _ = reply.send(x);
                    }
                }
            }
            _ = capture_tick.tick(), if capture_file.is_some() => {
                if let Some((path, w)) = capture_file.as_mut() {
                    write_captured(&capture, path, w);
                }
            }
            Some(first) = resolve_rx.recv() => {
                // The kernel may know it already (learnt from an ARP request
                // or a neighbour advertisement); else ask for a managed entry.
                let mut wanted = vec![first];
                while let Ok(more) = resolve_rx.try_recv() {
                    if !wanted.contains(&more) {
                        wanted.push(more);
                    }
                }
                refresh_fib(&mirror, &fib_handle).await;
                let fib = fib_handle.load_full();
                let mut asked = false;
                for (ifindex, addr) in wanted.into_iter().filter(|(i, a)| fib.neighbour(*i, a).is_none()) {
                    asked = true;
                    if let Err(e) = mirror.resolve(ifindex, addr).await {
                        warn!("cannot ask for the neighbour {addr}: {e}");
                    }
                }
                if asked {
                    tokio::time::sleep(RESOLVE_WAIT).await;
                    refresh_fib(&mirror, &fib_handle).await;
                }
            }
            Some(event) = fib_events.recv() => {
                use crate::netlink::FibEvent;
                match event {
                    FibEvent::Neighbour { ifindex, addr, mac } => {
                        let fib = fib_handle.load_full();
                        if fib.neighbour(ifindex, &addr) != Some(mac) {
                            fib_handle.store(Arc::new(fib.with_neighbour(ifindex, addr, Some(mac))));
                        }
                    }
                    FibEvent::NeighbourGone { ifindex, addr } => {
                        let fib = fib_handle.load_full();
                        if fib.neighbour(ifindex, &addr).is_some() {
                            fib_handle.store(Arc::new(fib.with_neighbour(ifindex, addr, None)));
                        }
                    }
                    FibEvent::Other => fib_dirty = true,
                }
            }
            _ = fib_tick.tick() => {
                // Links, addresses and routes changed (or a periodic
                // re-read, in case a notification was lost).
                if fib_dirty || fib_tick_count.is_multiple_of(40) {
                    refresh_fib(&mirror, &fib_handle).await;
                    fib_dirty = false;
                }
                fib_tick_count += 1;
            }
            _ = sweep_tick.tick() => {
                let now = epoch.elapsed().as_secs() as u32;
                let budget = (conntrack.capacity() / 30).max(4096);
                conntrack.sweep(now, &mut sweep_cursor, budget);
                if !services_summary_logged && control.controller().publisher().generation() > 0 {
                    services_summary_logged = true;
                    info!(service_ports = handle.load().ports().len(), "first table published");
                }
            }
        }
    }
    drop(service_health);
    dp.shutdown();
    if let Some((path, mut w)) = capture_file {
        capture.stop();
        write_captured(&capture, &path, &mut w);
        let s = capture.stats();
        info!(file = %path.display(), captured = s.captured, rate_limited = s.rate_limited, overflow = s.overflow, "drop capture closed");
    }
    match &cfg.restart {
        None => info!("stopped; XDP program detached"),
        Some(r) => info!(
            bpf_pin_dir = %r.bpf_pin_dir.display(),
            state_dir = %r.state_dir.display(),
            "stopped; the XDP program stays attached and holds this node's flows for the next xskgate run (remove the pins to detach)"
        ),
    }
    Ok(())
}
