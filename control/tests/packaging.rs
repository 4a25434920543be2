//! How xskgate is shipped: the container image's runtime stage against the
//! binary's libraries (`scripts/build-image --check`, ldd and dpkg), the
//! systemd unit for gateways outside the cluster (`systemd-analyze
//! verify`), and that the unit's capabilities are enough: `xskgate run` as
//! an unprivileged user with exactly those ambient capabilities serves, on
//! real veths in test namespaces (needs root to set up; fails without it).

use std::path::Path;
use std::process::Command;
use xskgate_tests::daemon::Daemon;
use xskgate_tests::reference::http_get;
use xskgate_tests::restart::State;
use xskgate_tests::single::Lab;

const XSKGATE: &str = env!("CARGO_BIN_EXE_xskgate");
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/systemd/xskgate.service");

/// `scripts/build-image --check XSKGATE` against `dockerfile`: (success, its log).
fn check_image(dockerfile: &Path) -> (bool, String) {
    let out = Command::new(format!("{ROOT}/scripts/build-image"))
        .args(["--check", XSKGATE])
        .env("DOCKERFILE", dockerfile)
        .output()
        .expect("scripts/build-image runs");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn the_image_installs_exactly_the_libraries_the_binary_needs() {
    let dockerfile = Path::new(ROOT).join("Dockerfile");
    let text = std::fs::read_to_string(&dockerfile).unwrap();
    let stages: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(stages.len(), 2, "a builder and a runtime stage: {stages:?}");
    assert!(stages[1].contains("-slim"), "a slim Debian runtime: {}", stages[1]);
    assert!(text.contains("scripts/build-image /out"), "the build stage runs the script CI runs");
    assert!(text.contains(r#"ENTRYPOINT ["xskgate"]"#));

    let (ok, log) = check_image(&dockerfile);
    assert!(ok, "{log}");
    assert!(log.contains("libelf.so.1: libelf1 (installed by the runtime stage)"), "{log}");
    assert!(log.contains("libc.so.6: libc6 (in the base image)"), "{log}");

    // The check fails both ways: a library missing, a package too many.
    let dir = xskgate_tests::TempDir::new("xskgate-image");
    let without = dir.0.join("Dockerfile.without");
    std::fs::write(&without, text.replace(" libelf1 ", " ")).unwrap();
    let (ok, log) = check_image(&without);
    assert!(!ok && log.contains("libelf1 is neither in the base image nor installed"), "{log}");
    let extra = dir.0.join("Dockerfile.extra");
    std::fs::write(&extra, text.replace(" libelf1 ", " libelf1 curl ")).unwrap();
    let (ok, log) = check_image(&extra);
    assert!(!ok && log.contains("installs curl, which no library of the binary needs"), "{log}");
}

/// `systemd-analyze verify` of `unit` with its binary at this build's
/// path: (success and silent, what it said).
fn verify_unit(unit: &str, dir: &Path) -> (bool, String) {
    let path = dir.join("xskgate.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/xskgate", XSKGATE)).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().expect("systemd-analyze runs");
    let said = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out.status.success() && said.trim().is_empty(), said)
}

/// The capabilities a unit's `key=` line names (`CAP_BPF` …).
fn caps(unit: &str, key: &str) -> Vec<String> {
    let line = unit.lines().find_map(|l| l.strip_prefix(key)).unwrap_or_else(|| panic!("no {key}"));
    let mut caps: Vec<String> = line.split_whitespace().map(str::to_string).collect();
    caps.sort();
    caps
}

#[test]
fn the_systemd_unit_verifies_and_has_the_daemonsets_capabilities() {
    let unit = std::fs::read_to_string(UNIT).unwrap();
    let dir = xskgate_tests::TempDir::new("xskgate-unit");
    let (ok, said) = verify_unit(&unit, &dir.0);
    assert!(ok, "systemd-analyze verify: {said}");
    // verify can fail: a bad directive is reported.
    let (ok, said) = verify_unit(&unit.replace("Restart=always", "Restart=sometimes"), &dir.0);
    assert!(!ok && said.contains("sometimes"), "{said}");

    for needed in ["Restart=always", "User=xskgate", "LimitMEMLOCK=infinity", "--kubeconfig ", "--state-dir "] {
        assert!(unit.contains(needed), "{needed} missing from the unit");
    }
    let ambient = caps(&unit, "AmbientCapabilities=");
    assert_eq!(ambient, caps(&unit, "CapabilityBoundingSet="));
    let ds = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/daemonset.yaml")).unwrap();
    let line = ds.lines().find_map(|l| l.trim().strip_prefix("add: [")).expect("the DaemonSet's capabilities");
    let mut daemonset: Vec<String> =
        line.trim_end_matches(']').split(',').map(|c| format!("CAP_{}", c.trim())).collect();
    daemonset.sort();
    assert_eq!(ambient, daemonset, "the unit and the DaemonSet grant the same capabilities");
}

#[test]
fn an_unprivileged_user_with_the_units_capabilities_runs_the_gateway() {
    xskgate_tests::require_root();
    let unit = std::fs::read_to_string(UNIT).unwrap();
    let wanted: Vec<String> = caps(&unit, "AmbientCapabilities=")
        .iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let lab = Lab::new(Path::new(XSKGATE));
    let state = State::new(lab.t.prefix()).unwrap();
    let args = state.args();
    // The directories belong to the service's user, as the unit's
    // ExecStartPre makes them.
    for dir in [&args[1], &args[3]] {
        let out =
            Command::new("install").args(["-d", "-o", "65534", "-g", "65534", "-m", "0700", dir]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let wrapper = lab.dir.join("as-nobody");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec setpriv --reuid 65534 --regid 65534 --clear-groups --inh-caps {caps} --ambient-caps {caps} {XSKGATE} \"$@\"\n",
            caps = wanted.join(",")
        ),
    )
    .unwrap();
    Command::new("chmod").arg("755").arg(&wrapper).status().unwrap();
    let interfaces = format!("{},{}", lab.t.if_name("g0"), lab.t.if_name("g1"));
    let mut run = vec![
        "--manifests",
        lab.dir.to_str().unwrap(),
        "--node-name",
        "gw1",
        "--interfaces",
        &interfaces,
        "--cluster-cidr",
        "198.19.0.0/16",
    ];
    run.extend(args.iter().map(String::as_str));
    let gw = lab.t.ns_name("gw");
    let daemon = Daemon::start(&wrapper, &gw, &run, &lab.dir.join("run.log"), std::time::Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("as uid 65534 with {wanted:?}: {e}"));
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(uid.split_whitespace().skip(1).all(|u| u == "65534"), "not root: {uid}");
    // It serves: a TCP request through the VIP reaches pod-a's server.
    xskgate_tests::single::line_server(&lab.t, 8080, std::time::Instant::now() + std::time::Duration::from_secs(10));
    let vip: std::net::SocketAddr = format!("{}:80", xskgate_tests::single::VIP).parse().unwrap();
    let mut conns = xskgate_tests::single::connect_all(&lab.t, vip, 1, std::time::Duration::from_secs(5));
    assert_eq!(conns.len(), 1, "a connection through the VIP:\n{}", daemon.log_text());
    use std::io::{BufRead, Write};
    conns[0].set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    conns[0].write_all(b"through the gateway\n").unwrap();
    let mut echoed = String::new();
    std::io::BufReader::new(&conns[0]).read_line(&mut echoed).unwrap();
    assert_eq!(echoed, "through the gateway\n");
    assert_eq!(http_get(&gw, "http://127.0.0.1:10256/healthz".into()).map(|(s, _)| s), Ok(200));
    drop(conns);
    drop(daemon);
}
