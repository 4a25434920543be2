//! The `xskgate` binary.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tracing::warn;
use xskgate_control::{manifest, node, state::ClusterState, table_cmd};
use xskgate_fastpath::Cidr;

#[derive(Parser)]
#[command(name = "xskgate", version, about = "Kubernetes Service fast path for gateway nodes")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the service table computed from manifests, without touching the network.
    Table {
        /// Directory of Service, EndpointSlice and Node manifests (YAML or JSON).
        #[arg(long)]
        manifests: PathBuf,
        /// This gateway's node name (default: $NODE_NAME, else the hostname).
        #[arg(long)]
        node_name: Option<String>,
        /// Zone, when no Node object gives topology.kubernetes.io/zone.
        #[arg(long)]
        zone: Option<String>,
        /// The cluster's pod CIDR(s), comma-separated (used by the data path for the
        /// internal-traffic rule; checked here).
        #[arg(long, value_delimiter = ',')]
        cluster_cidr: Vec<String>,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run the control loop without a data path: follow the manifest directory or
    /// the Kubernetes API, publish the table, log every change (a dry run of `run`).
    Watch {
        /// Directory of manifests, watched live.
        #[arg(long, conflicts_with = "kubeconfig", required_unless_present = "kubeconfig")]
        manifests: Option<PathBuf>,
        /// Kubeconfig of the cluster to watch (in-cluster config when neither flag is given
        /// is not attempted: say which source you mean).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// This gateway's node name (default: $NODE_NAME, else the hostname).
        #[arg(long)]
        node_name: Option<String>,
        /// Zone, when the Node object gives none.
        #[arg(long)]
        zone: Option<String>,
        /// How often the manifest directory is checked, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        poll_ms: u64,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    match Cli::parse().cmd {
        Cmd::Table { manifests, node_name, zone, cluster_cidr, json } => {
            table(&manifests, node_name.as_deref(), zone.as_deref(), &cluster_cidr, json)
        }
        Cmd::Watch { manifests, kubeconfig, node_name, zone, poll_ms } => {
            let Some(name) = node::node_name(node_name.as_deref()) else {
                eprintln!("xskgate: no node name: pass --node-name or set NODE_NAME");
                return ExitCode::from(2);
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("xskgate: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(watch(manifests, kubeconfig, name, zone, std::time::Duration::from_millis(poll_ms)))
        }
    }
}

async fn watch(
    manifests: Option<PathBuf>,
    kubeconfig: Option<PathBuf>,
    name: String,
    zone: Option<String>,
    poll: std::time::Duration,
) -> ExitCode {
    use xskgate_control::{controller::Controller, kube_source, manifest::DirWatcher, publish::Publisher};
    use xskgate_fastpath::{NodeConfig, ServiceTable, ServiceTableHandle};
    let handle = std::sync::Arc::new(ServiceTableHandle::new(ServiceTable::default()));
    let mut c = Controller::new(Publisher::new(handle, None, NodeConfig::default()), name.clone(), zone);
    tracing::info!(node = %name, source = ?manifests.as_ref().or(kubeconfig.as_ref()), "watching; Ctrl-C to stop");
    if let Some(dir) = manifests {
        let mut w = DirWatcher::new(&dir);
        let mut failed = false;
        loop {
            match w.poll() {
                Ok(Some(loaded)) => {
                    c.reset(loaded);
                    failed = false;
                }
                Ok(None) => {}
                Err(e) if !failed => {
                    warn!("cannot read {}: {e}; keeping the last table", dir.display());
                    failed = true;
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
                _ = tokio::time::sleep(poll) => {}
            }
        }
    }
    let client = match kube_source::client(kubeconfig.as_deref()).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("xskgate: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stream = kube_source::changes(client, &name);
    futures::pin_mut!(stream);
    let mut last_error = None;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
            change = futures::StreamExt::next(&mut stream) => match change {
                Some(change) => kube_source::handle(&mut c, change, &mut last_error, std::time::Duration::from_secs(30)),
                None => return ExitCode::FAILURE,
            },
        }
    }
}

fn table(dir: &std::path::Path, name: Option<&str>, zone: Option<&str>, cidrs: &[String], json: bool) -> ExitCode {
    for c in cidrs {
        if let Err(e) = c.parse::<Cidr>() {
            eprintln!("xskgate: --cluster-cidr {c:?}: {e}");
            return ExitCode::from(2);
        }
    }
    let Some(name) = node::node_name(name) else {
        eprintln!("xskgate: no node name: pass --node-name or set NODE_NAME");
        return ExitCode::from(2);
    };
    let loaded = match manifest::load_dir(dir) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("xskgate: cannot read manifest directory {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
    };
    for w in &loaded.warnings {
        warn!("{w}");
    }
    let (state, warnings) = ClusterState::from_objects(loaded.objects);
    for w in &warnings {
        warn!("{w}");
    }
    let identity = node::identity(name, zone, &state);
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
