//! `xskgate lab`: the embedded default. It builds seed 003/004's reference
//! topology on this machine (namespaces and veths under a unique prefix,
//! from `xskgate_tests::reference`), runs two gateways with this very
//! binary (`xskgate run`), replays scenarios 1–3 and prints what a person
//! checks in ten seconds: per policy and gateway, whether the Service
//! answers, which source address the pod saw, each pod's share of the
//! flows, and the health check's answer. Then it removes everything.
//!
//! The topology and its Services are dual-stack: every scenario runs in
//! IPv4 and in IPv6, the client reaching the Services' addresses of that
//! family through the gateways' addresses of that family.
//!
//! `--json` prints one object: `{"scenarios": [...]}`, each entry with
//! `case`, `family` (`ipv4`/`ipv6`), `policy`, `mode` (`snat` for
//! Cluster, `local`, `dsr` for direct server return), `gateway`,
//! `gateways` (the gateways the row's flows went through), `reachable`,
//! `source_seen`, `client_address`, `gateway_address`, `shares` (pod →
//! fraction of the answered flows) and `health_status` (the
//! healthCheckNodePort's HTTP status asked over that family; `null` for
//! Cluster, which has none); and `puzzles`, the seeds'
//! puzzles each answered by one real command against the running gateways
//! (`xskgate status`, `xskgate explain --gateway`, `ping`): `puzzle`,
//! `command` and `answer` (the command's output).

use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use xskgate_fastpath::TrafficPolicy;
use xskgate_tests::reference::{
    Family, Gw, LB_CLUSTER, LB_DSR, LB_LOCAL, PodState, Reference, ReferenceError, Tally, http_get, udp_flows,
};

/// UDP flows per (family, policy, gateway): 2 × 750 = 1,500 per policy, so each
/// share is within about ±3 points of its expectation (3 standard deviations).
const FLOWS: usize = 750;

/// One row of the lab's table.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub case: String,
    #[serde(serialize_with = "family_name")]
    pub family: Family,
    #[serde(serialize_with = "policy_name")]
    pub policy: TrafficPolicy,
    pub mode: Mode,
    pub gateway: &'static str,
    pub gateways: Vec<&'static str>,
    pub reachable: bool,
    /// "client", "gateway", "none" when unreachable, or "mixed" when the
    /// gateways of a "both" row disagree.
    pub source_seen: String,
    pub client_address: String,
    pub gateway_address: String,
    pub shares: BTreeMap<String, f64>,
    pub health_status: Option<u16>,
}

fn policy_name<S: serde::Serializer>(p: &TrafficPolicy, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(p.name())
}

fn family_name<S: serde::Serializer>(f: &Family, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(f.name())
}

/// The reference topology's Service of each policy: its LoadBalancer IP
/// and UDP NodePort.
fn lb_of(policy: TrafficPolicy) -> &'static str {
    match policy {
        TrafficPolicy::Local => LB_LOCAL,
        TrafficPolicy::Cluster => LB_CLUSTER,
    }
}

fn udp_node_port_of(policy: TrafficPolicy) -> u16 {
    match policy {
        TrafficPolicy::Local => 30053,
        TrafficPolicy::Cluster => 30054,
    }
}

/// How a row's Service reaches its pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Cluster, masqueraded to the gateway.
    Snat,
    /// Local: this gateway's own pods, the client's address kept.
    Local,
    /// Cluster by direct server return (`whoami-dsr`).
    Dsr,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Snat => "snat",
            Mode::Local => "local",
            Mode::Dsr => "dsr",
        }
    }
}

/// A seed's puzzle and the command that answers it.
#[derive(Clone, Debug, Serialize)]
pub struct Puzzle {
    pub puzzle: &'static str,
    pub command: String,
    /// What the command printed (trimmed).
    pub answer: String,
}

/// What the lab found.
#[derive(Clone, Debug, Serialize)]
pub struct Lab {
    pub scenarios: Vec<Row>,
    pub puzzles: Vec<Puzzle>,
}

/// `xskgate ARGS` in gateway `gw`'s namespace (against its admin endpoint):
/// the puzzle with the command as an operator types it and its output.
fn ask_gateway(r: &Reference, xskgate: &Path, gw: Gw, puzzle: &'static str, args: &[&str]) -> Puzzle {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &r.topo.ns_name(gw.name())])
        .arg(xskgate)
        .args(args)
        .output();
    let answer = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim_end().to_string(),
        Ok(o) => format!("failed: {}", String::from_utf8_lossy(&o.stderr).trim_end()),
        Err(e) => format!("cannot run xskgate: {e}"),
    };
    let quoted: Vec<String> =
        args.iter().map(|a| if a.contains(' ') { format!("'{a}'") } else { a.to_string() }).collect();
    Puzzle { puzzle, command: format!("(on {}) xskgate {}", gw.name(), quoted.join(" ")), answer }
}

/// Whether a real `ping` from the client to `vip` through `gw` is answered.
fn ping_via(r: &Reference, gw: Gw, vip: &str) -> bool {
    r.via(gw);
    std::process::Command::new("ip")
        .args(["netns", "exec", &r.topo.ns_name("client"), "ping", "-n", "-q", "-c", "2", "-i", "0.2", "-W", "1", vip])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The status rows of `whoami-local:dns` on both gateways, one line each.
fn local_endpoint_counts(r: &Reference, xskgate: &Path) -> Puzzle {
    let mut lines = Vec::new();
    for gw in Gw::BOTH {
        let p = ask_gateway(r, xskgate, gw, "", &["status"]);
        if lines.is_empty()
            && let Some(header) = p.answer.lines().find(|l| l.starts_with("SERVICE"))
        {
            lines.push(format!("     {header}"));
        }
        let row = p.answer.lines().find(|l| l.starts_with("default/whoami-local:dns")).unwrap_or(&p.answer);
        lines.push(format!("{}: {row}", gw.name()));
    }
    Puzzle {
        puzzle: "Why do clients split evenly over gw1 and gw2 give pod-a 50 % and pods b and c 25 % each (Local, seed 004)?",
        command: "(on gw1 and on gw2) xskgate status".into(),
        answer: lines.join("\n"),
    }
}

fn progress(json: bool, msg: &str) {
    if !json {
        eprintln!("lab: {msg}");
    }
}

/// Which address the pod saw, in words.
fn source_kind(gw: Gw, family: Family, seen: &str) -> String {
    if seen == gw.client_address_in(family) {
        "client".into()
    } else if gw.addresses_in(family).iter().any(|a| a == seen) {
        "gateway".into()
    } else {
        format!("other ({seen})")
    }
}

fn ask_http(r: &Reference, family: Family, lb: &str) -> Option<(String, String)> {
    ask_http_at(r, family, lb, 80)
}

fn ask_http_at(r: &Reference, family: Family, lb: &str, port: u16) -> Option<(String, String)> {
    let (status, body) = http_get(&r.topo.ns_name("client"), format!("http://{}/", family.host_port(lb, port))).ok()?;
    if status != 200 {
        return None;
    }
    let (pod, peer) = body.trim().split_once(' ')?;
    let peer: SocketAddr = peer.parse().ok()?;
    Some((pod.to_string(), peer.ip().to_string()))
}

fn row(r: &Reference, case: &str, family: Family, mode: Mode, gw: Gw, tally: &Tally) -> Row {
    r.via(gw);
    let policy = if mode == Mode::Local { TrafficPolicy::Local } else { TrafficPolicy::Cluster };
    let answer = match mode {
        Mode::Dsr => ask_http_at(r, family, LB_DSR, 8080),
        _ => ask_http(r, family, lb_of(policy)),
    };
    // Only Local has a healthCheckNodePort.
    let health_status =
        (policy == TrafficPolicy::Local).then(|| r.health_in(gw, family).map(|(code, _)| code).unwrap_or(0));
    Row {
        case: case.to_string(),
        family,
        policy,
        mode,
        gateway: gw.name(),
        gateways: vec![gw.name()],
        reachable: answer.is_some(),
        source_seen: answer.as_ref().map_or_else(|| "none".to_string(), |(_, seen)| source_kind(gw, family, seen)),
        client_address: gw.client_address_in(family),
        gateway_address: gw.address_in(family),
        shares: tally.shares(),
        health_status,
    }
}

/// `n` UDP flows from the client through `gw`: to the Service's NodePort
/// on `gw`, or for DSR (whose NodePort is masqueraded) to its LoadBalancer
/// IP routed through `gw`.
fn flows(r: &Reference, family: Family, mode: Mode, gw: Gw, n: usize) -> Tally {
    let to = match mode {
        Mode::Dsr => {
            r.via(gw);
            family.host_port(LB_DSR, 8080)
        }
        Mode::Local => family.host_port(gw.address(), udp_node_port_of(TrafficPolicy::Local)),
        Mode::Snat => family.host_port(gw.address(), udp_node_port_of(TrafficPolicy::Cluster)),
    };
    let to: SocketAddr = to.parse().expect("literal address");
    udp_flows(&r.topo.ns_name("client"), to, n, Duration::from_secs(1))
}

/// Runs the lab; what it found, or why it could not run.
pub fn run_lab(xskgate: &Path, json: bool) -> Result<Lab, ReferenceError> {
    progress(json, "building the reference topology (client, gw1 with pod-a, gw2 with pods b and c)");
    let mut r = Reference::start(xskgate)?;
    progress(json, &format!("gateways running (prefix {}); replaying seeds 003 and 004", r.topo.prefix()));
    let mut rows = Vec::new();
    for family in Family::BOTH {
        for mode in [Mode::Snat, Mode::Local, Mode::Dsr] {
            let per_gw: Vec<(Gw, Tally)> =
                Gw::BOTH.iter().map(|&gw| (gw, flows(&r, family, mode, gw, FLOWS))).collect();
            let mut both = Tally::default();
            for (gw, t) in &per_gw {
                rows.push(row(&r, "both gateways serving", family, mode, *gw, t));
                both.merge(t);
            }
            // What the pods saw through each gateway, if they agree.
            let seen: std::collections::BTreeSet<&str> =
                rows[rows.len() - per_gw.len()..].iter().map(|r| r.source_seen.as_str()).collect();
            let source_seen = if seen.len() == 1 { seen.into_iter().collect() } else { "mixed".to_string() };
            let reachable = rows[rows.len() - per_gw.len()..].iter().all(|r| r.reachable);
            rows.push(Row {
                case: if mode == Mode::Dsr {
                    "clients split evenly, direct server return (seed 004 fixed)".into()
                } else {
                    "clients split evenly over gw1 and gw2 (seed 004)".into()
                },
                family,
                policy: if mode == Mode::Local { TrafficPolicy::Local } else { TrafficPolicy::Cluster },
                mode,
                gateway: "both",
                gateways: Gw::BOTH.iter().map(|g| g.name()).collect(),
                reachable: both.answered() > 0 && reachable,
                source_seen,
                client_address: String::new(),
                gateway_address: String::new(),
                shares: both.shares(),
                health_status: None,
            });
        }
    }
    let mut puzzles = vec![local_endpoint_counts(&r, xskgate)];
    progress(json, "scaling pod-a away: gw1 has no local endpoint now (seed 003)");
    r.set_pod("pod-a", PodState::Deleted);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while Family::BOTH.iter().any(|&f| r.health_in(Gw::Gw1, f).map(|(c, _)| c) != Ok(503))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    for family in Family::BOTH {
        for mode in [Mode::Snat, Mode::Local] {
            // 64 flows (one group) are enough to show that none is answered.
            let t = flows(&r, family, mode, Gw::Gw1, 64);
            rows.push(row(&r, "pod-a scaled away", family, mode, Gw::Gw1, &t));
        }
    }
    progress(json, "asking the seeds' puzzles");
    let local = format!("tcp 198.18.1.100:40000 > {LB_LOCAL}:80");
    puzzles.push(ask_gateway(
        &r,
        xskgate,
        Gw::Gw1,
        "Some nodes reach the Local Service and others don't: why not through gw1, now that pod-a is gone?",
        &["explain", "--gateway", "--packet", &local],
    ));
    let cluster = format!("tcp 198.18.1.100:40000 > {LB_CLUSTER}:80");
    puzzles.push(ask_gateway(
        &r,
        xskgate,
        Gw::Gw1,
        "The pods behind the Cluster Service see the gateway, not the client: where is the client IP lost?",
        &["explain", "--gateway", "--packet", &cluster],
    ));
    let (via1, via2) = (ping_via(&r, Gw::Gw1, LB_LOCAL), ping_via(&r, Gw::Gw2, LB_LOCAL));
    let said = |answered: bool| if answered { "answered" } else { "no reply (dropped: echo_not_served)" };
    let echo = ask_gateway(
        &r,
        xskgate,
        Gw::Gw1,
        "",
        &["explain", "--gateway", "--packet", &format!("icmp 198.18.1.100 > {LB_LOCAL}")],
    );
    puzzles.push(Puzzle {
        puzzle: "Ping of the Local LoadBalancer IP works through one gateway and not the other: which tells the truth?",
        command: format!("(on the client) ping {LB_LOCAL} through gw1, then through gw2; (on gw1) xskgate explain --gateway --packet 'icmp 198.18.1.100 > {LB_LOCAL}'"),
        answer: format!("through gw1: {}\nthrough gw2: {}\n{}", said(via1), said(via2), echo.answer),
    });
    progress(json, "removing the topology");
    Ok(Lab { scenarios: rows, puzzles })
}

/// The table a person reads, then the puzzles.
pub fn to_text(lab: &Lab) -> String {
    let mut out = scenarios_text(&lab.scenarios);
    for p in &lab.puzzles {
        out.push_str(&format!("\n{}\n$ {}\n", p.puzzle, p.command));
        for l in p.answer.lines() {
            out.push_str(&format!("  {l}\n"));
        }
    }
    out
}

fn scenarios_text(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<60} {:<6} {:<8} {:<5} {:<8} {:<10} {:<27} {:<22} {}\n",
        "case",
        "family",
        "policy",
        "mode",
        "gateway",
        "reachable",
        "source the pod saw",
        "flows a / b / c",
        "health check"
    ));
    for r in rows {
        let share = |p: &str| r.shares.get(p).map_or("   -".to_string(), |s| format!("{:>3.0}%", s * 100.0));
        let source = match r.source_seen.as_str() {
            "client" if !r.client_address.is_empty() => format!("client {}", r.client_address),
            "gateway" => "gateway (SNAT)".to_string(),
            s => s.to_string(),
        };
        let health = match r.health_status {
            Some(200) => "200 (serve here)".to_string(),
            Some(503) => "503 (drain)".to_string(),
            Some(c) => c.to_string(),
            None => "-".to_string(),
        };
        out.push_str(&format!(
            "{:<60} {:<6} {:<8} {:<5} {:<8} {:<10} {:<27} {:<22} {}\n",
            r.case,
            if r.family == Family::Ipv4 { "IPv4" } else { "IPv6" },
            r.policy.name(),
            r.mode.name(),
            r.gateway,
            if r.reachable { "yes" } else { "NO" },
            source,
            format!("{} / {} / {}", share("pod-a"), share("pod-b"), share("pod-c")),
            health
        ));
    }
    out.push_str(
        "\nLocal keeps the client's address and serves only the gateway's own pods: 50/25/25 when clients \
         split evenly,\nand a gateway without local pods drops the traffic (its health check says 503 so a load \
         balancer drains it).\nCluster balances over every pod (33/33/33) and the pod sees the gateway's address.\n\
         Direct server return (dsr) balances over every pod and keeps the client's address: the pod answers the \
         client itself.\n",
    );
    out
}

/// The JSON object.
pub fn to_json(lab: &Lab) -> String {
    serde_json::to_string_pretty(lab).expect("serializable")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Lab {
        let scenarios = vec![Row {
            case: "both gateways serving".into(),
            family: Family::Ipv4,
            policy: TrafficPolicy::Local,
            mode: Mode::Local,
            gateway: "gw1",
            gateways: vec!["gw1"],
            reachable: true,
            source_seen: "client".into(),
            client_address: "198.18.1.100".into(),
            gateway_address: "198.18.1.1".into(),
            shares: [("pod-a".to_string(), 1.0)].into(),
            health_status: Some(200),
        }];
        let puzzles = vec![Puzzle {
            puzzle: "Why?",
            command: "(on gw1) xskgate explain --packet 'tcp …'".into(),
            answer: "verdict        drop: no_local_endpoints".into(),
        }];
        Lab { scenarios, puzzles }
    }

    #[test]
    fn json_has_the_documented_keys() {
        let v: serde_json::Value = serde_json::from_str(&to_json(&sample())).unwrap();
        let row = &v["scenarios"][0];
        for key in [
            "family",
            "policy",
            "mode",
            "gateways",
            "gateway",
            "reachable",
            "source_seen",
            "client_address",
            "gateway_address",
            "shares",
            "health_status",
        ] {
            assert!(!row[key].is_null(), "missing {key}: {row}");
        }
        assert_eq!(row["shares"]["pod-a"], 1.0);
        assert_eq!(row["family"], "ipv4");
        assert_eq!(row["health_status"], 200);
        let puzzle = &v["puzzles"][0];
        for key in ["puzzle", "command", "answer"] {
            assert!(puzzle[key].is_string(), "missing {key}: {puzzle}");
        }
    }

    #[test]
    fn text_reads_in_ten_seconds() {
        let t = to_text(&sample());
        assert!(t.contains("\nWhy?\n$ (on gw1) xskgate explain") && t.contains("  verdict        drop"), "{t}");
        let line = t.lines().nth(1).unwrap();
        for want in ["IPv4", "Local", "gw1", "yes", "client 198.18.1.100", "100%", "200 (serve here)"] {
            assert!(line.contains(want), "{want} missing from {line:?}");
        }
    }
}
