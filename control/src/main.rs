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
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    match Cli::parse().cmd {
        Cmd::Table { manifests, node_name, zone, cluster_cidr, json } => {
            table(&manifests, node_name.as_deref(), zone.as_deref(), &cluster_cidr, json)
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
