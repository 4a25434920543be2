//! The `xskgate` binary.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tracing::warn;
use xskgate_control::{manifest, node, state::ClusterState, table_cmd};
use xskgate_fastpath::{Cidr, VipEcho};

/// mimalloc rather than glibc's malloc: after a manifest poll or a watch
/// event frees thousands of small objects, glibc's next allocation of an
/// uncached size sorts them all out of its unsorted bin (milliseconds at
/// 10,000 Services, measured inside the translation of one changed
/// Service). mimalloc frees into per-page lists and has no such step.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "xskgate", version, about = "Kubernetes Service fast path for gateway nodes")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once; `Run`'s many flags make it the largest variant, which is fine.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Build seed 003/004's reference topology here (namespaces and veths; needs
    /// root), run two gateways, replay the experiments, print what they show, and
    /// remove everything.
    Lab {
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the service table computed from manifests, without touching the network.
    Table {
        #[command(flatten)]
        from: Manifests,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run one packet through the real pipeline against the table the manifests give
    /// this gateway (--manifests), or against a running gateway's live tables
    /// (--gateway), and print every stage's decision.
    Explain {
        #[command(flatten)]
        from: Manifests,
        /// A running gateway's admin endpoint (`xskgate run --admin-bind-address`):
        /// explain against its live tables and conntrack instead of manifests.
        #[arg(long, conflicts_with = "manifests", num_args = 0..=1, default_missing_value = xskgate_control::admin::DEFAULT_BIND)]
        gateway: Option<std::net::SocketAddr>,
        /// Which echo requests to VIPs the gateway answers (as `run --vip-echo`).
        #[arg(long, default_value = "served")]
        vip_echo: VipEcho,
        /// This gateway's addresses (NodePorts answer on them; the first of a family is
        /// the SNAT address); default: the addresses of its Node object.
        #[arg(long, value_delimiter = ',')]
        node_address: Vec<std::net::IpAddr>,
        /// The packet: PROTO SRC[:PORT] > DST[:PORT] [flags=S|SA|A|F|R|P], e.g.
        /// 'tcp 198.18.1.100:40000 > 198.18.100.10:80'.
        #[arg(long, required_unless_present = "pcap", conflicts_with = "pcap")]
        packet: Option<String>,
        /// Every frame of a pcap or pcapng file (tcpdump's, tshark's, `xskgate capture`'s),
        /// as captured, instead of --packet.
        #[arg(long)]
        pcap: Option<PathBuf>,
        /// One JSON object instead of one line per stage (with --pcap, one per line).
        #[arg(long)]
        json: bool,
    },
    /// What a running gateway serves: one row per Service port (frontends, policy,
    /// usable endpoints, health check, packets, bytes, drops by reason) under a
    /// header (node, interfaces, conntrack, SNAT, table generation).
    Status {
        /// The gateway's admin endpoint.
        #[arg(long, default_value = xskgate_control::admin::DEFAULT_BIND)]
        gateway: std::net::SocketAddr,
        /// The JSON the gateway sends instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Capture the packets a running gateway drops, for some seconds, into a pcapng
    /// file with each drop's reason as the packet's comment (tshark -e frame.comment).
    Capture {
        /// The gateway's admin endpoint.
        #[arg(long, default_value = xskgate_control::admin::DEFAULT_BIND)]
        gateway: std::net::SocketAddr,
        /// How long to capture (1 to 300).
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Drop reasons to capture, comma-separated (default: all), e.g. no_local_endpoints.
        #[arg(long, default_value = "")]
        reasons: String,
        /// At most this many packets per second.
        #[arg(long, default_value_t = xskgate_fastpath::io::capture::DEFAULT_RATE)]
        rate: u32,
        /// The file to write.
        #[arg(short = 'w', long = "write")]
        write: PathBuf,
    },
    /// Run the control loop without a data path: follow the manifest directory or
    /// the Kubernetes API, publish the table, log every change (a dry run of `run`).
    Watch {
        #[command(flatten)]
        source: Source,
        /// Also serve `/metrics` (the control plane's figures; the data path's
        /// counters stay zero) on this address.
        #[arg(long)]
        metrics_bind_address: Option<std::net::SocketAddr>,
    },
    /// Run the gateway: the XDP steering program and AF_XDP workers on
    /// `--interfaces`, the health and metrics servers, and the control loop.
    Run(Box<RunArgs>),
}

/// `xskgate run`'s flags: xskgate's own, and kube-proxy's where the
/// meaning is the same (`--hostname-override`, `--cluster-cidr`,
/// `--healthz-bind-address`, `--metrics-bind-address`,
/// `--conntrack-max-per-core`, `--conntrack-min`, `--nodeport-addresses`, the
/// `--conntrack-*-timeout*` flags, `--kubeconfig`, `--config`).
#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    source: Source,
    /// Interfaces to serve, comma-separated (XDP and AF_XDP sockets on every queue).
    #[arg(long, value_delimiter = ',', required = true)]
    interfaces: Vec<String>,
    /// The cluster's pod CIDR(s): traffic from them is internal.
    #[arg(long, value_delimiter = ',')]
    cluster_cidr: Vec<String>,
    /// SNAT (masquerade) address per family; default: the address of the interface
    /// the endpoint is routed by (else the one toward --cluster-cidr, else the first
    /// address of --interfaces).
    #[arg(long, value_delimiter = ',')]
    snat_address: Vec<std::net::IpAddr>,
    /// SNAT source ports, LO-HI. Keep them out of the node's
    /// net.ipv4.ip_local_port_range: replies to these ports belong to xskgate.
    #[arg(long, default_value = "1024-29999")]
    snat_ports: String,
    /// CPUs to pin the workers to (worker q gets the q-th, cycling), e.g. 2,3.
    #[arg(long, value_delimiter = ',')]
    cpus: Vec<usize>,
    /// kube-proxy's configuration file (a KubeProxyConfiguration, as kubeadm writes it):
    /// the fields xskgate shares take effect, every other one is named in a log line;
    /// a flag given here overrides the file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The health server (/healthz, /livez): IP:PORT, or an IP (port 10256).
    #[arg(long, default_value = "0.0.0.0:10256", value_parser = |s: &str| xskgate_control::kube_proxy_config::bind_address(s, 10256))]
    healthz_bind_address: std::net::SocketAddr,
    /// The metrics server (/metrics): IP:PORT, or an IP (port 10249).
    #[arg(long, default_value = "127.0.0.1:10249", value_parser = |s: &str| xskgate_control::kube_proxy_config::bind_address(s, 10249))]
    metrics_bind_address: std::net::SocketAddr,
    /// Conntrack capacity in flows.
    #[arg(long, default_value_t = 1 << 20, conflicts_with = "conntrack_max_per_core")]
    conntrack_max: usize,
    /// Conntrack capacity per CPU, as kube-proxy sizes the kernel's: the capacity is
    /// max(this × CPUs, --conntrack-min); 0 keeps --conntrack-max.
    #[arg(long)]
    conntrack_max_per_core: Option<u32>,
    /// The least conntrack capacity (with --conntrack-max-per-core, default 131072).
    #[arg(long)]
    conntrack_min: Option<u32>,
    /// NodePorts answer only on the addresses of --interfaces within these CIDRs
    /// (comma-separated; default: every address), as kube-proxy's flag.
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Vec<String>,
    /// Idle timeout of an established TCP flow (a Go duration, as kube-proxy's flag).
    #[arg(long, default_value = "24h0m0s", value_parser = xskgate_control::kube_proxy_config::go_duration_secs)]
    conntrack_tcp_timeout_established: u32,
    /// Idle timeout of a TCP flow in CLOSE_WAIT.
    #[arg(long, default_value = "1h0m0s", value_parser = xskgate_control::kube_proxy_config::go_duration_secs)]
    conntrack_tcp_timeout_close_wait: u32,
    /// Idle timeout of a UDP flow that has not been replied to.
    #[arg(long, default_value = "30s", value_parser = xskgate_control::kube_proxy_config::go_duration_secs)]
    conntrack_udp_timeout: u32,
    /// Idle timeout of a UDP flow that has been replied to.
    #[arg(long, default_value = "2m0s", value_parser = xskgate_control::kube_proxy_config::go_duration_secs)]
    conntrack_udp_timeout_stream: u32,
    /// The admin endpoint (`xskgate status`, `explain --gateway`, `capture`);
    /// keep it on loopback: it shows the whole table and copies dropped packets.
    #[arg(long, default_value = xskgate_control::admin::DEFAULT_BIND)]
    admin_bind_address: std::net::SocketAddr,
    /// Echo requests to a LoadBalancer IP or externalIP: answered only where the
    /// Service is served (served), always, or left to the kernel (never).
    #[arg(long, default_value = "served")]
    vip_echo: VipEcho,
    /// External traffic to LoadBalancer IPs and externalIPs under policy
    /// Cluster: masqueraded (snat, kube-proxy's way) or by direct server
    /// return (dsr: IPIP / IP6IP6 to the endpoint, which replies to the client
    /// itself); a Service's `xskgate.io/lb-mode` annotation overrides it.
    #[arg(long, default_value = "snat")]
    lb_mode: xskgate_control::translate::LbMode,
    /// Write every dropped packet (within --capture-rate) to this pcapng file, the
    /// drop reason in each packet's comment.
    #[arg(long)]
    capture_drops: Option<PathBuf>,
    /// Drop reasons --capture-drops keeps, comma-separated (default: all).
    #[arg(long, default_value = "")]
    capture_reasons: String,
    /// At most this many captured packets per second.
    #[arg(long, default_value_t = xskgate_fastpath::io::capture::DEFAULT_RATE)]
    capture_rate: u32,
    /// Keep the flows across a restart (even `kill -9`): the conntrack table
    /// lives in DIR/conntrack (a memory file system, e.g. /dev/shm/xskgate), the
    /// XDP program stays attached (pinned in --bpf-pin-dir) and drops, rather
    /// than hands to the kernel, the frames of the gap; the next `xskgate run`
    /// with the same directories takes over.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Where --state-dir pins the XDP links and counters (on a BPF file system).
    #[arg(long, default_value = "/sys/fs/bpf/xskgate")]
    bpf_pin_dir: PathBuf,
}

/// A manifest directory and who this gateway is (`table` and `explain`).
#[derive(clap::Args)]
struct Manifests {
    /// Directory of Service, EndpointSlice and Node manifests (YAML or JSON).
    #[arg(long)]
    manifests: Option<PathBuf>,
    /// This gateway's node name (default: $NODE_NAME, else the hostname).
    #[arg(long)]
    node_name: Option<String>,
    /// Zone, when no Node object gives topology.kubernetes.io/zone.
    #[arg(long)]
    zone: Option<String>,
    /// The cluster's pod CIDR(s), comma-separated: traffic from them is internal.
    #[arg(long, value_delimiter = ',')]
    cluster_cidr: Vec<String>,
}

/// Where objects come from and who this gateway is (`watch` and `run`).
#[derive(clap::Args)]
struct Source {
    /// Directory of manifests, watched live.
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// Kubeconfig of the cluster to watch. Without it and without --manifests: the
    /// pod's service account (in-cluster configuration, as kube-proxy in a DaemonSet).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// This gateway's node name (default: $NODE_NAME, else the hostname).
    #[arg(long, visible_alias = "hostname-override")]
    node_name: Option<String>,
    /// Zone, when the Node object gives none.
    #[arg(long)]
    zone: Option<String>,
    /// How often the manifest directory is checked, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    poll_ms: u64,
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().map_err(|e| {
        eprintln!("xskgate: cannot start the runtime: {e}");
        ExitCode::FAILURE
    })
}

/// A `--snat-ports` value that is not a range.
#[derive(Debug, thiserror::Error)]
enum PortsError {
    #[error("--snat-ports {0:?}: expected LO-HI")]
    NotARange(String),
    #[error("--snat-ports {text:?}: {source}")]
    NotAPort { text: String, source: std::num::ParseIntError },
    #[error("--snat-ports {0:?}: need 1 <= LO <= HI")]
    Empty(String),
}

fn parse_ports(s: &str) -> Result<(u16, u16), PortsError> {
    let (lo, hi) = s.split_once('-').ok_or_else(|| PortsError::NotARange(s.to_string()))?;
    let port = |p: &str| p.trim().parse::<u16>().map_err(|source| PortsError::NotAPort { text: s.to_string(), source });
    let (lo, hi) = (port(lo)?, port(hi)?);
    if lo == 0 || lo > hi {
        return Err(PortsError::Empty(s.to_string()));
    }
    Ok((lo, hi))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,netlink_packet_route=error,kube_client::client::builder=off".into()),
        )
        .init();
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match cli.cmd {
        Cmd::Lab { json } => lab(json),
        Cmd::Explain { from, gateway, node_address, packet, pcap, json, vip_echo } => {
            let packets = match packets(packet.as_deref(), pcap.as_deref()) {
                Ok(p) => p,
                Err(code) => return code,
            };
            match gateway {
                Some(gateway) => {
                    if from.node_name.is_some() || from.zone.is_some() || !from.cluster_cidr.is_empty() {
                        eprintln!(
                            "xskgate: --gateway explains with the gateway's own node, zone and CIDRs; drop the others"
                        );
                        return ExitCode::from(2);
                    }
                    explain_live(gateway, &packets, json)
                }
                None => explain(&from, node_address, vip_echo, &packets, json),
            }
        }
        Cmd::Status { gateway, json } => status(gateway, json),
        Cmd::Capture { gateway, seconds, reasons, rate, write } => capture(gateway, seconds, &reasons, rate, &write),
        Cmd::Table { from, json } => table(&from, json),
        Cmd::Watch { source: Source { manifests, kubeconfig, node_name, zone, poll_ms }, metrics_bind_address } => {
            let name = match node_name_or_exit(node_name.as_deref()) {
                Ok(n) => n,
                Err(code) => return code,
            };
            let runtime = match runtime() {
                Ok(r) => r,
                Err(code) => return code,
            };
            let poll = std::time::Duration::from_millis(poll_ms);
            runtime.block_on(watch(manifests, kubeconfig, name, zone, poll, metrics_bind_address))
        }
        Cmd::Run(args) => {
            let given = matches.subcommand_matches("run").expect("the run subcommand's matches");
            let explicit = |id: &str| given.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
            let cfg = match run_config(*args, &explicit) {
                Ok(cfg) => cfg,
                Err(code) => return code,
            };
            let runtime = match runtime() {
                Ok(r) => r,
                Err(code) => return code,
            };
            match runtime.block_on(xskgate_control::run::run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("xskgate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Sets `slot` from the configuration file's `field`, unless the flag `id`
/// was given on the command line (then the flag wins, and says so).
fn from_file<T>(slot: &mut T, file: Option<T>, id: &str, field: &str, explicit: &dyn Fn(&str) -> bool) {
    if let Some(v) = file {
        if explicit(id) {
            tracing::info!("--{} overrides the configuration file's {field}", id.replace('_', "-"));
        } else {
            *slot = v;
        }
    }
}

/// `run`'s flags and `--config` file as one [`RunConfig`]; a flag given on
/// the command line overrides the file.
fn run_config(mut args: RunArgs, explicit: &dyn Fn(&str) -> bool) -> Result<xskgate_control::run::RunConfig, ExitCode> {
    use xskgate_control::kube_proxy_config as kpc;
    let mut conntrack = (args.conntrack_max_per_core, args.conntrack_min);
    if let Some(path) = &args.config {
        let file = std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|text| kpc::parse(&text).map_err(|e| e.to_string()))
            .map_err(|e| {
                eprintln!("xskgate: --config {}: {e}", path.display());
                ExitCode::from(2)
            })?;
        for u in &file.unused {
            warn!(field = %u.field, value = %u.value, "KubeProxyConfiguration field not used: {}", u.why);
        }
        if !file.unused_at_default.is_empty() {
            tracing::info!(
                fields = %file.unused_at_default.join(","),
                "KubeProxyConfiguration fields not used, at their defaults"
            );
        }
        let src = &mut args.source;
        if src.manifests.is_some() && file.kubeconfig.is_some() {
            tracing::info!("--manifests overrides the configuration file's clientConnection.kubeconfig");
        } else {
            from_file(
                &mut src.kubeconfig,
                file.kubeconfig.map(Some),
                "kubeconfig",
                "clientConnection.kubeconfig",
                explicit,
            );
        }
        from_file(&mut src.node_name, file.hostname_override.map(Some), "node_name", "hostnameOverride", explicit);
        let cidrs = Some(file.cluster_cidr).filter(|c| !c.is_empty());
        from_file(&mut args.cluster_cidr, cidrs, "cluster_cidr", "clusterCIDR", explicit);
        let h = file.healthz_bind_address;
        from_file(&mut args.healthz_bind_address, h, "healthz_bind_address", "healthzBindAddress", explicit);
        let m = file.metrics_bind_address;
        from_file(&mut args.metrics_bind_address, m, "metrics_bind_address", "metricsBindAddress", explicit);
        let np = Some(file.nodeport_addresses).filter(|c| !c.is_empty());
        from_file(&mut args.nodeport_addresses, np, "nodeport_addresses", "nodePortAddresses", explicit);
        // --conntrack-max given: the file's sizing does not apply.
        if explicit("conntrack_max") && file.conntrack_max_per_core.is_some() {
            tracing::info!("--conntrack-max overrides the configuration file's conntrack.maxPerCore");
        } else {
            let per_core = file.conntrack_max_per_core.map(Some);
            from_file(&mut conntrack.0, per_core, "conntrack_max_per_core", "conntrack.maxPerCore", explicit);
        }
        from_file(&mut conntrack.1, file.conntrack_min.map(Some), "conntrack_min", "conntrack.min", explicit);
        for (slot, value, id, field) in [
            (
                &mut args.conntrack_tcp_timeout_established,
                file.conntrack_tcp_timeout_established,
                "conntrack_tcp_timeout_established",
                "conntrack.tcpEstablishedTimeout",
            ),
            (
                &mut args.conntrack_tcp_timeout_close_wait,
                file.conntrack_tcp_timeout_close_wait,
                "conntrack_tcp_timeout_close_wait",
                "conntrack.tcpCloseWaitTimeout",
            ),
            (
                &mut args.conntrack_udp_timeout,
                file.conntrack_udp_timeout,
                "conntrack_udp_timeout",
                "conntrack.udpTimeout",
            ),
            (
                &mut args.conntrack_udp_timeout_stream,
                file.conntrack_udp_timeout_stream,
                "conntrack_udp_timeout_stream",
                "conntrack.udpStreamTimeout",
            ),
        ] {
            from_file(slot, value, id, field, explicit);
        }
    }
    let conntrack_capacity = match conntrack {
        // kube-proxy's sizing, with its default minimum.
        (Some(per_core), min) if per_core > 0 => {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            kpc::conntrack_capacity(per_core, min.unwrap_or(KUBE_PROXY_CONNTRACK_MIN), cpus)
        }
        (_, min) => args.conntrack_max.max(min.unwrap_or(0) as usize),
    };
    let capture_reasons = xskgate_control::admin::parse_reasons(&args.capture_reasons).map_err(|e| {
        eprintln!("xskgate: --capture-reasons: {e}");
        ExitCode::from(2)
    })?;
    if args.capture_rate == 0 {
        eprintln!("xskgate: --capture-rate: at least 1 packet per second");
        return Err(ExitCode::from(2));
    }
    let name = node_name_or_exit(args.source.node_name.as_deref())?;
    let cidrs = parse_cidrs("--cluster-cidr", &args.cluster_cidr)?;
    let nodeport_cidrs = parse_cidrs("--nodeport-addresses", &args.nodeport_addresses)?;
    let snat_ports = parse_ports(&args.snat_ports).map_err(|e| {
        eprintln!("xskgate: {e}");
        ExitCode::from(2)
    })?;
    let Source { manifests, kubeconfig, zone, poll_ms, .. } = args.source;
    Ok(xskgate_control::run::RunConfig {
        manifests,
        kubeconfig,
        node_name: name,
        zone,
        interfaces: args.interfaces,
        cluster_cidrs: cidrs,
        nodeport_cidrs,
        snat_addresses: args.snat_address,
        snat_ports,
        cpus: args.cpus,
        healthz_bind: args.healthz_bind_address,
        metrics_bind: args.metrics_bind_address,
        conntrack_capacity,
        conntrack_timeouts: xskgate_conntrack::Timeouts {
            tcp_established: args.conntrack_tcp_timeout_established,
            tcp_close_wait: args.conntrack_tcp_timeout_close_wait,
            udp_unreplied: args.conntrack_udp_timeout,
            udp_replied: args.conntrack_udp_timeout_stream,
            ..xskgate_conntrack::Timeouts::default()
        },
        poll: std::time::Duration::from_millis(poll_ms),
        admin_bind: args.admin_bind_address,
        vip_echo: args.vip_echo,
        lb_mode: args.lb_mode,
        capture_drops: args.capture_drops,
        capture_reasons,
        capture_rate: args.capture_rate,
        restart: args
            .state_dir
            .map(|state_dir| xskgate_control::run::RestartState { state_dir, bpf_pin_dir: args.bpf_pin_dir }),
    })
}

/// kube-proxy's default `conntrack.min`.
const KUBE_PROXY_CONNTRACK_MIN: u32 = 131_072;

async fn watch(
    manifests: Option<PathBuf>,
    kubeconfig: Option<PathBuf>,
    name: String,
    zone: Option<String>,
    poll: std::time::Duration,
    metrics_bind: Option<std::net::SocketAddr>,
) -> ExitCode {
    use std::sync::Arc;
    use xskgate_control::controller::{ControlLoop, Controller};
    use xskgate_control::health::ProxyHealth;
    use xskgate_control::metrics::{self, ControlMetrics, Sources};
    use xskgate_control::{publish::Publisher, source};
    use xskgate_fastpath::{NodeConfig, ServiceTable, ServiceTableHandle};
    let handle = Arc::new(ServiceTableHandle::new(ServiceTable::default()));
    let control_metrics = Arc::new(ControlMetrics::default());
    let _metrics = match metrics_bind {
        Some(bind) => {
            let sources = Sources { control: control_metrics.clone(), services: handle.clone(), data_path: None };
            match metrics::serve(bind, sources).await {
                Ok((addr, task)) => {
                    tracing::info!(metrics = %addr, "serving /metrics");
                    Some(task)
                }
                Err(e) => {
                    eprintln!("xskgate: cannot listen on --metrics-bind-address {bind}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        None => None,
    };
    let source = match &manifests {
        Some(dir) => source::Source::manifests(dir, poll),
        None => match source::Source::kubernetes(kubeconfig.as_deref(), &name).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("xskgate: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let controller = Controller::new(Publisher::new(handle, None, NodeConfig::default()), name.clone(), zone);
    let health = Arc::new(ProxyHealth::new(std::time::Duration::from_secs(60)));
    let mut control = ControlLoop::new(source, controller, control_metrics, health);
    tracing::info!(node = %name, source = control.source_name(), "watching; Ctrl-C to stop");
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
            out = control.step() => if out.is_none() {
                eprintln!("xskgate: the {} source ended", control.source_name());
                return ExitCode::FAILURE;
            },
        }
    }
}

fn lab(json: bool) -> ExitCode {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "xskgate lab needs root: it creates network namespaces and veth pairs and attaches XDP programs to them \
             (nothing outside its own namespaces is touched). Run it as root, e.g. with sudo."
        );
        return ExitCode::from(2);
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("xskgate: cannot find my own binary to run the gateways: {e}");
            return ExitCode::FAILURE;
        }
    };
    match xskgate_control::lab::run_lab(&exe, json) {
        Ok(lab) => {
            if json {
                println!("{}", xskgate_control::lab::to_json(&lab));
            } else {
                print!("{}", xskgate_control::lab::to_text(&lab));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("xskgate lab: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The manifest directory, or the exit code after saying it is missing.
fn manifests_or_exit<'a>(dir: Option<&'a std::path::Path>, alternative: &str) -> Result<&'a std::path::Path, ExitCode> {
    dir.ok_or_else(|| {
        eprintln!("xskgate: --manifests DIR is required{alternative}");
        ExitCode::from(2)
    })
}

/// Runs `f` on a fresh runtime.
fn block_on<F: std::future::Future<Output = ExitCode>>(f: F) -> ExitCode {
    match runtime() {
        Ok(r) => r.block_on(f),
        Err(code) => code,
    }
}

/// What `explain` is asked about: one `--packet`, or the frames of a `--pcap`.
enum Packets {
    One(String, xskgate_control::explain::PacketSpec),
    /// (how the output names it, the frame as captured)
    Frames(Vec<(String, Vec<u8>)>),
}

/// `--packet` parsed or `--pcap` read, or the exit code after saying why not.
fn packets(packet: Option<&str>, pcap: Option<&std::path::Path>) -> Result<Packets, ExitCode> {
    use xskgate_control::explain;
    match (packet, pcap) {
        (Some(text), _) => match text.parse() {
            Ok(spec) => Ok(Packets::One(text.to_string(), spec)),
            Err(e) => {
                eprintln!("xskgate: {e}");
                Err(ExitCode::from(2))
            }
        },
        (None, Some(path)) => match explain::read_pcap(path) {
            Ok(frames) => Ok(Packets::Frames(
                frames.into_iter().enumerate().map(|(i, f)| (explain::frame_text(i + 1, &f), f)).collect(),
            )),
            Err(e) => {
                eprintln!("xskgate: --pcap {e}");
                Err(ExitCode::FAILURE)
            }
        },
        (None, None) => {
            eprintln!("xskgate: give --packet or --pcap");
            Err(ExitCode::from(2))
        }
    }
}

/// Prints one explanation (JSON form): pretty for one packet, one line each
/// for the frames of a capture.
fn print_explanation(x: &serde_json::Value, json: bool, many: bool, first: bool) {
    match (json, many) {
        (true, false) => println!("{}", serde_json::to_string_pretty(x).expect("serializable")),
        (true, true) => println!("{x}"),
        (false, _) => {
            if !first {
                println!();
            }
            print!("{}", xskgate_control::explain::value_to_text(x));
        }
    }
}

fn explain_live(gateway: std::net::SocketAddr, packets: &Packets, json: bool) -> ExitCode {
    use xskgate_control::admin;
    block_on(async {
        let answers = match packets {
            Packets::One(text, _) => vec![admin::fetch_explain(gateway, text).await],
            Packets::Frames(frames) => {
                let mut out = Vec::new();
                for (text, frame) in frames {
                    out.push(admin::fetch_explain_frame(gateway, frame, text).await);
                }
                out
            }
        };
        for (i, a) in answers.iter().enumerate() {
            match a {
                Ok(x) => print_explanation(x, json, matches!(packets, Packets::Frames(_)), i == 0),
                Err(e) => {
                    eprintln!("xskgate: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        ExitCode::SUCCESS
    })
}

fn status(gateway: std::net::SocketAddr, json: bool) -> ExitCode {
    block_on(async {
        match xskgate_control::admin::fetch_status(gateway).await {
            Ok(s) if json => {
                println!("{}", serde_json::to_string_pretty(&s).expect("serializable"));
                ExitCode::SUCCESS
            }
            Ok(s) => {
                print!("{}", xskgate_control::admin::to_text(&s));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("xskgate: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn capture(gateway: std::net::SocketAddr, seconds: u64, reasons: &str, rate: u32, write: &std::path::Path) -> ExitCode {
    use xskgate_control::admin;
    if let Err(e) = admin::parse_reasons(reasons) {
        eprintln!("xskgate: --reasons: {e}");
        return ExitCode::from(2);
    }
    if !(1..=admin::MAX_CAPTURE_SECONDS).contains(&seconds) || rate == 0 {
        eprintln!("xskgate: --seconds 1 to {} and --rate at least 1", admin::MAX_CAPTURE_SECONDS);
        return ExitCode::from(2);
    }
    let path = format!("/capture?seconds={seconds}&reasons={}&rate={rate}", admin::encode(reasons));
    block_on(async {
        let timeout = std::time::Duration::from_secs(seconds + 10);
        match admin::get(gateway, &path, timeout).await {
            Ok(body) => match std::fs::write(write, &body) {
                Ok(()) => {
                    eprintln!("xskgate: {} bytes of pcapng written to {}", body.len(), write.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("xskgate: cannot write {}: {e}", write.display());
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                eprintln!("xskgate: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn explain(
    from: &Manifests,
    addresses: Vec<std::net::IpAddr>,
    vip_echo: VipEcho,
    packets: &Packets,
    json: bool,
) -> ExitCode {
    let Manifests { manifests: dir, node_name: name, zone, cluster_cidr: cidrs } = from;
    let dir = match manifests_or_exit(dir.as_deref(), " (or --gateway ADDR, to explain against a running gateway)") {
        Ok(d) => d,
        Err(code) => return code,
    };
    use xskgate_control::explain;
    let given = parse_cidrs("--cluster-cidr", cidrs)
        .and_then(|c| Ok((c, node_name_or_exit(name.as_deref())?, load_state(dir)?)));
    let (pod_cidrs, name, state) = match given {
        Ok(given) => given,
        Err(code) => return code,
    };
    let addresses = if addresses.is_empty() { state.node_addresses(&name) } else { addresses };
    let identity = node::identity(name, zone.as_deref(), &state);
    let gw = explain::Gateway { node: identity, addresses, pod_cidrs, snat: Vec::new(), vip_echo };
    let (table, entries) = explain::table(&state, &gw);
    let one = |text: &str, frame: &[u8]| {
        let x = explain::explain_frame(frame, text, &table, &entries, &state, &gw.node, None);
        serde_json::to_value(&x).expect("serializable")
    };
    match packets {
        Packets::One(text, spec) => print_explanation(&one(text, &spec.frame()), json, false, true),
        Packets::Frames(frames) => {
            for (i, (text, frame)) in frames.iter().enumerate() {
                print_explanation(&one(text, frame), json, true, i == 0);
            }
        }
    }
    ExitCode::SUCCESS
}

/// `--cluster-cidr` values, or the exit code after saying which is wrong.
fn parse_cidrs(flag: &str, cidrs: &[String]) -> Result<Vec<Cidr>, ExitCode> {
    cidrs
        .iter()
        .map(|c| {
            c.parse::<Cidr>().map_err(|e| {
                eprintln!("xskgate: {flag} {c:?}: {e}");
                ExitCode::from(2)
            })
        })
        .collect()
}

/// This gateway's node name (`--node-name`, `$NODE_NAME`, the hostname).
fn node_name_or_exit(name: Option<&str>) -> Result<String, ExitCode> {
    node::node_name(name).ok_or_else(|| {
        eprintln!("xskgate: no node name: pass --node-name or set NODE_NAME");
        ExitCode::from(2)
    })
}

/// The cluster state of a manifest directory, its warnings logged.
fn load_state(dir: &std::path::Path) -> Result<ClusterState, ExitCode> {
    let loaded = manifest::load_dir(dir).map_err(|e| {
        eprintln!("xskgate: cannot read manifest directory {}: {e}", dir.display());
        ExitCode::FAILURE
    })?;
    for w in &loaded.warnings {
        warn!("{w}");
    }
    let (state, warnings) = ClusterState::from_objects(loaded.objects);
    for w in &warnings {
        warn!("{w}");
    }
    Ok(state)
}

fn table(from: &Manifests, json: bool) -> ExitCode {
    let Manifests { manifests: dir, node_name: name, zone, cluster_cidr: cidrs } = from;
    let dir = match manifests_or_exit(dir.as_deref(), "") {
        Ok(d) => d,
        Err(code) => return code,
    };
    let given =
        parse_cidrs("--cluster-cidr", cidrs).and_then(|_| Ok((node_name_or_exit(name.as_deref())?, load_state(dir)?)));
    let (name, state) = match given {
        Ok(given) => given,
        Err(code) => return code,
    };
    let identity = node::identity(name, zone.as_deref(), &state);
    let t = state.translate(&identity);
    for w in &t.warnings {
        warn!("{w}");
    }
    if json {
        println!("{}", table_cmd::to_json(&identity.name, &t.entries));
    } else {
        print!("{}", table_cmd::to_text(&identity.name, &t.entries));
    }
    ExitCode::SUCCESS
}
