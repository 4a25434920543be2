//! `xskgate explain` as an operator runs it: the real binary, seed 003/004's
//! manifests (`control/examples/reference`), one packet each, `--json`
//! checked field by field and the text checked for the lines an operator
//! reads. The decisions come from the real pipeline (`process_batch_traced`).

use serde_json::Value;
use std::process::Command;

const XSKGATE: &str = env!("CARGO_BIN_EXE_xskgate");

fn run(node: &str, packet: &str, json: bool) -> (i32, String, String) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/reference");
    let mut cmd = Command::new(XSKGATE);
    cmd.args(["explain", "--manifests", dir, "--node-name", node, "--cluster-cidr", "198.19.0.0/16"]);
    cmd.args(["--packet", packet]);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().expect("run xskgate explain");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

fn json(node: &str, packet: &str) -> Value {
    let (code, out, err) = run(node, packet, true);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn local_keeps_the_client_and_serves_only_this_nodes_pod() {
    let x = json("gw1", "tcp 198.18.1.100:40000 > 198.18.100.10:80");
    assert_eq!(x["verdict"], "forward");
    assert_eq!(x["reason"], Value::Null);
    assert_eq!(x["service"], "default/whoami-local:http");
    assert_eq!((x["policy"].as_str(), x["traffic"].as_str()), (Some("Local"), Some("external")));
    assert_eq!(x["endpoint"], "198.19.1.10:8080");
    assert_eq!(x["snat"], false);
    assert_eq!(x["translated"]["src"], "198.18.1.100:40000", "the client's address is kept");
    assert_eq!(x["translated"]["dst"], "198.19.1.10:8080");
    let eps = x["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 3);
    let usable: Vec<&str> =
        eps.iter().filter(|e| e["usable"] == true).map(|e| e["address"].as_str().unwrap()).collect();
    assert_eq!(usable, ["198.19.1.10:8080"]);
    let pod_b = eps.iter().find(|e| e["address"] == "198.19.2.10:8080").unwrap();
    assert_eq!(pod_b["node"], "gw2");
    assert!(pod_b["why"].as_str().unwrap().contains("on node gw2, not this node (gw1)"), "{pod_b}");
    let stages: Vec<&str> = x["steps"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap()).collect();
    for stage in ["frontend", "source ranges", "traffic", "policy", "endpoint set", "endpoint", "masquerade", "rewrite"]
    {
        assert!(stages.contains(&stage), "no {stage} step: {stages:?}");
    }
    assert_eq!(stages.last(), Some(&"verdict"));
}

#[test]
fn cluster_masquerades_and_says_which_rule() {
    let x = json("gw1", "tcp 198.18.1.100:40000 > 198.18.100.11:80");
    assert_eq!((x["verdict"].as_str(), x["policy"].as_str()), (Some("forward"), Some("Cluster")));
    assert_eq!(x["snat"], true);
    assert!(x["translated"]["src"].as_str().unwrap().starts_with("198.18.0.1:"), "SNAT to the node: {x}");
    assert_eq!(x["endpoints"].as_array().unwrap().iter().filter(|e| e["usable"] == true).count(), 3);
    let masq = x["steps"].as_array().unwrap().iter().find(|s| s["stage"] == "masquerade").unwrap();
    assert!(masq["why"].as_str().unwrap().contains("policy Cluster"), "{masq}");
}

/// The dual-stack reference Service over IPv6: the packet's family's port
/// and endpoints only, the client's IPv6 address kept.
#[test]
fn an_ipv6_packet_meets_the_ipv6_endpoints() {
    let x = json("gw1", "tcp [2001:db8:18:1::100]:40000 > [2001:db8:18:100::10]:80");
    assert_eq!((x["verdict"].as_str(), x["policy"].as_str()), (Some("forward"), Some("Local")), "{x}");
    assert_eq!(x["endpoint"], "[2001:db8:19:1::10]:8080");
    assert_eq!(x["translated"]["src"], "[2001:db8:18:1::100]:40000");
    let eps: Vec<&str> = x["endpoints"].as_array().unwrap().iter().map(|e| e["address"].as_str().unwrap()).collect();
    assert_eq!(eps, ["[2001:db8:19:1::10]:8080", "[2001:db8:19:2::10]:8080", "[2001:db8:19:2::11]:8080"]);
}

/// Seed 003's puzzle: a gateway without a local pod drops Local traffic,
/// and says why for every endpoint.
#[test]
fn local_without_a_local_endpoint_is_dropped_with_its_reason() {
    let x = json("gw3", "tcp 198.18.1.100:40000 > 198.18.100.10:80");
    assert_eq!((x["verdict"].as_str(), x["reason"].as_str()), (Some("drop"), Some("no_local_endpoints")));
    assert_eq!(x["endpoint"], Value::Null);
    assert_eq!(x["translated"], Value::Null);
    let eps = x["endpoints"].as_array().unwrap();
    assert!(eps.iter().all(|e| e["usable"] == false && e["why"].as_str().unwrap().contains("not this node (gw3)")));
    let (code, text, _) = run("gw3", "tcp 198.18.1.100:40000 > 198.18.100.10:80", false);
    assert_eq!(code, 0);
    assert!(text.lines().any(|l| l.starts_with("verdict") && l.contains("drop: no_local_endpoints")), "{text}");
}

#[test]
fn a_pod_reaching_the_load_balancer_ip_is_internal() {
    let x = json("gw1", "tcp 198.19.2.10:40000 > 198.18.100.10:80");
    assert_eq!(x["traffic"], "internal");
    assert_eq!(x["policy"], "Cluster", "internalTrafficPolicy applies: the Cluster set");
    let traffic = x["steps"].as_array().unwrap().iter().find(|s| s["stage"] == "traffic").unwrap();
    assert!(traffic["why"].as_str().unwrap().contains("from a pod"), "{traffic}");
}

#[test]
fn no_frontend_passes_and_names_the_nearest() {
    let x = json("gw1", "udp 198.18.1.100:40000 > 198.18.100.10:53");
    assert_eq!((x["verdict"].as_str(), x["service"].as_str()), (Some("pass"), None));
    let front = x["steps"].as_array().unwrap().iter().find(|s| s["stage"] == "frontend").unwrap();
    assert_eq!(front["decision"], "no Service has this frontend");
    assert!(front["why"].as_str().unwrap().contains("198.18.100.10:80/TCP (default/whoami-local)"), "{front}");
}

#[test]
fn a_malformed_packet_names_the_field_and_exits_2() {
    let (code, out, err) = run("gw1", "tcp 198.18.1.100:40000 > 198.18.100.10:http", false);
    assert_eq!(code, 2);
    assert!(out.is_empty());
    assert!(err.contains("destination port \"http\""), "{err}");
}

/// Seed 000 offline: a ping of the Local VIP is answered on gw1 (pod-a is
/// there) and by the VIP itself; on a gateway without a local pod (gw3) it
/// is dropped as `echo_not_served`; a ping of the node is the kernel's.
#[test]
fn ping_of_a_vip_is_answered_only_where_the_service_is_served() {
    let x = json("gw1", "icmp 198.18.1.100 > 198.18.100.10");
    assert_eq!((x["verdict"].as_str(), x["service"].as_str()), (Some("reply"), Some("default/whoami-local:http")));
    let echo = x["steps"].as_array().unwrap().iter().find(|s| s["stage"] == "echo").expect("an echo step");
    assert_eq!(echo["decision"], "answered for 198.18.100.10", "{x:#}");
    let x = json("gw3", "icmp 198.18.1.100 > 198.18.100.10");
    assert_eq!((x["verdict"].as_str(), x["reason"].as_str()), (Some("drop"), Some("echo_not_served")), "{x:#}");
    assert_eq!(json("gw3", "icmp 198.18.1.100 > 198.18.100.11")["verdict"], "reply", "Cluster is served anywhere");
    let x = json("gw1", "icmp 198.18.1.100 > 198.18.1.1");
    assert_eq!(x["verdict"], "pass", "{x:#}");
    let (code, out, err) = run("gw3", "icmp 198.18.1.100 > 198.18.100.10", false);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("echo           not answered for 198.18.100.10"), "{out}");
}

/// `--pcap`: every frame of a capture, as captured, through the pipeline,
/// one JSON object per line; the file is written by pcap-file's own pcap
/// writer (the format tcpdump writes). A file of another link type or no
/// capture at all is refused with a reason.
#[test]
fn every_frame_of_a_pcap_is_explained_as_captured() {
    use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
    let dir = std::env::temp_dir().join(format!("xskgate-explain-pcap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let frames: Vec<Vec<u8>> = vec![
        "tcp 198.18.1.100:40000 > 198.18.100.11:80".parse::<xskgate_control::explain::PacketSpec>().unwrap().frame(),
        "udp 198.18.1.100:40001 > 198.18.100.10:80".parse::<xskgate_control::explain::PacketSpec>().unwrap().frame(),
        // An ARP request: not IP.
        [vec![0xff; 6], vec![2, 0, 0, 0, 0, 1], vec![0x08, 0x06], vec![0; 28]].concat(),
    ];
    let write = |name: &str, datalink: pcap_file::DataLink| {
        let path = dir.join(name);
        let header = PcapHeader { datalink, ..PcapHeader::default() };
        let mut w = PcapWriter::with_header(std::fs::File::create(&path).unwrap(), header).unwrap();
        for f in &frames {
            let p = PcapPacket::new(std::time::Duration::from_secs(1), f.len() as u32, f);
            w.write_packet(&p).unwrap();
        }
        path
    };
    let capture = write("three.pcap", pcap_file::DataLink::ETHERNET);
    let reference = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/reference");
    let args = ["explain", "--manifests", reference, "--node-name", "gw1", "--cluster-cidr", "198.19.0.0/16"];
    let out = Command::new(XSKGATE).args(args).arg("--pcap").arg(&capture).arg("--json").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!((lines[0]["verdict"].as_str(), lines[0]["snat"].as_bool()), (Some("forward"), Some(true)));
    assert_eq!(lines[0]["packet"], "frame 1: tcp 198.18.1.100:40000 > 198.18.100.11:80");
    // UDP to the TCP-only Local VIP: no such frontend, the kernel's.
    assert_eq!(lines[1]["verdict"], "pass");
    assert_eq!(lines[2]["packet"], "frame 3: 42 bytes, not TCP, UDP or an echo request");
    assert_eq!(lines[2]["verdict"], "pass");
    let text = Command::new(XSKGATE).args(args).arg("--pcap").arg(&capture).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert_eq!(text.matches("\npacket ").count() + usize::from(text.starts_with("packet ")), 3, "{text}");

    let raw = write("raw.pcap", pcap_file::DataLink::RAW);
    let out = Command::new(XSKGATE).args(args).arg("--pcap").arg(&raw).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not Ethernet"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let not = dir.join("not.pcap");
    std::fs::write(&not, b"hello").unwrap();
    let out = Command::new(XSKGATE).args(args).arg("--pcap").arg(&not).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a pcap or pcapng file"));
    let _ = std::fs::remove_dir_all(&dir);
}
