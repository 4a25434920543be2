//! `xskgate run --config FILE` with kube-proxy's configuration file as
//! kubeadm writes it (`fixtures/kube-proxy-config.yaml`), on real veths in
//! test namespaces (needs root; fails without it): the fields xskgate
//! shares take effect, a flag given on the command line overrides the file,
//! and every other field is named in the log.

use std::path::Path;
use xskgate_tests::daemon::Daemon;
use xskgate_tests::reference::http_get;
use xskgate_tests::single::Lab;

const XSKGATE: &str = env!("CARGO_BIN_EXE_xskgate");
const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kube-proxy-config.yaml");

#[test]
fn a_kubeadm_kube_proxy_configuration_takes_effect_and_names_what_it_does_not_use() {
    xskgate_tests::require_root();
    let lab = Lab::new(Path::new(XSKGATE));
    let interfaces = format!("{},{}", lab.t.if_name("g0"), lab.t.if_name("g1"));
    let gw = lab.t.ns_name("gw");
    // No --node-name, --cluster-cidr, --healthz-bind-address: the file's.
    // --metrics-bind-address and --manifests are given: they win over the
    // file's metricsBindAddress and clientConnection.kubeconfig.
    let args = [
        "--config",
        CONFIG,
        "--manifests",
        lab.dir.to_str().unwrap(),
        "--interfaces",
        &interfaces,
        "--metrics-bind-address",
        "127.0.0.1:10449",
    ];
    let daemon =
        Daemon::start(Path::new(XSKGATE), &gw, &args, &lab.dir.join("run.log"), std::time::Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{e}"));
    let log = daemon.log_text();
    let running = log.lines().find(|l| l.contains("xskgate running")).expect("the summary line");

    // hostnameOverride: the node is gw1, whose endpoint the manifests have.
    assert!(running.contains("node=gw1"), "{running}");
    // nodePortAddresses [198.18.0.0/24]: NodePorts answer on g0's address only.
    assert!(running.contains("nodeport_addresses=198.18.0.1 "), "{running}");
    // conntrack: the timeouts, and maxPerCore × CPUs (min: null is kube-proxy's 131072).
    assert!(running.contains("conntrack_timeouts=tcp_established=43200s,tcp_close_wait=1800s,udp=45s,udp_stream=120s"));
    let cpus = std::thread::available_parallelism().unwrap().get();
    let capacity = (100_000 * cpus).max(131_072);
    assert!(running.contains(&format!("conntrack_max={capacity} ")), "{running}");
    // healthzBindAddress 0.0.0.0:10356 from the file; metrics on the flag's port.
    assert_eq!(http_get(&gw, "http://127.0.0.1:10356/healthz".into()).map(|(s, _)| s), Ok(200));
    let (status, metrics) = http_get(&gw, "http://127.0.0.1:10449/metrics".into()).expect("the flag's metrics address");
    assert_eq!(status, 200);
    let sample = metrics.lines().find(|l| l.starts_with("xskgate_conntrack_capacity ")).expect("capacity sample");
    assert_eq!(sample, format!("xskgate_conntrack_capacity {capacity}"));
    assert!(
        http_get(&gw, "http://127.0.0.1:10349/metrics".into()).is_err(),
        "the file's metrics address is overridden"
    );
    for line in [
        "--metrics-bind-address overrides the configuration file's metricsBindAddress",
        "--manifests overrides the configuration file's clientConnection.kubeconfig",
    ] {
        assert!(log.contains(line), "{line:?} missing:\n{log}");
    }

    // Every field it does not use is named: set ones in one warning each,
    // with the value; zero-valued ones in one line.
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("KubeProxyConfiguration field not used")).collect();
    for (field, value) in [("mode", "\"nftables\""), ("bindAddress", "\"0.0.0.0\""), ("oomScoreAdj", "-999")] {
        let named: Vec<&&str> = warnings
            .iter()
            .filter(|l| l.contains(&format!("field={field} ")) && l.contains(&format!("value={value}")))
            .collect();
        assert_eq!(named.len(), 1, "one warning for {field} = {value}: {warnings:#?}");
    }
    assert_eq!(warnings.len(), 3, "only the fields that ask for something: {warnings:#?}");
    let defaults = log.lines().find(|l| l.contains("fields not used, at their defaults")).expect("the defaults line");
    for field in
        ["ipvs.scheduler", "iptables.masqueradeAll", "conntrack.tcpBeLiberal", "winkernel.enableDSR", "portRange"]
    {
        assert!(defaults.contains(field), "{field} missing: {defaults}");
    }
    drop(daemon);
}

#[test]
fn a_file_that_is_not_a_kube_proxy_configuration_is_refused_by_name() {
    let dir = xskgate_tests::TempDir::new("xskgate-kpc");
    let file = dir.0.join("kubelet.yaml");
    std::fs::write(&file, "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n").unwrap();
    let out = std::process::Command::new(XSKGATE)
        .args(["run", "--interfaces", "lo", "--node-name", "gw1", "--manifests", "/nonexistent", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("KubeletConfiguration") && err.contains("kubeproxy.config.k8s.io/v1alpha1"), "{err}");
}
