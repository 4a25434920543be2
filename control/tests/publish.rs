//! Publication: the fast path sees what the translation says, one change
//! rebuilds one Service, an unchanged result is not republished, and UDP
//! flows to a removed endpoint are flushed, also to one removed while no
//! process ran (a resumed table); checked with real flows that went
//! through the pipeline.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use xskgate_conntrack::{Addr, Config, FlowTable, Proto};
use xskgate_control::manifest;
use xskgate_control::publish::Publisher;
use xskgate_control::state::ClusterState;
use xskgate_control::translate::NodeIdentity;
use xskgate_fastpath::{
    AffinityTable, Frame, FrontendKind, NodeConfig, ServiceTable, ServiceTableHandle, Tables, Verdict, WorkerState,
    process,
};

fn node() -> NodeIdentity {
    NodeIdentity { name: "gw1".into(), zone: Some("zone-a".into()), ..NodeIdentity::default() }
}

fn node_config() -> NodeConfig {
    let (gw, gw6) = (Addr::from_v4([198, 18, 0, 1]), Addr::from(IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1])));
    NodeConfig { addresses: vec![gw, gw6], snat_v4: Some(gw), snat_v6: Some(gw6), ..NodeConfig::default() }
}

fn fixtures() -> ClusterState {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rules");
    ClusterState::from_objects(manifest::load_dir(&dir).unwrap().objects).0
}

fn lookup<'a>(t: &'a ServiceTable, ip: &str, proto: Proto, port: u16) -> Option<&'a xskgate_fastpath::ServicePort> {
    t.lookup(&Addr::from(ip.parse::<IpAddr>().unwrap()), proto, port).map(|(p, _)| p)
}

#[test]
fn full_sync_publishes_what_the_translation_says() {
    let handle = Arc::new(ServiceTableHandle::new(ServiceTable::default()));
    let mut p = Publisher::new(handle.clone(), None, node_config());
    let state = fixtures();
    let out = p.full_sync(&state, &node());
    assert!(out.published);
    let t = handle.load();
    assert_eq!(t.generation(), 1);
    let lb = lookup(&t, "198.18.100.3", Proto::TCP, 80).expect("LoadBalancer IP of local-lb");
    assert_eq!(lb.name.to_string(), "t/local-lb:web");
    let local: Vec<String> = lb.local.endpoints().iter().map(|e| format!("{}:{}", e.addr, e.port)).collect();
    assert_eq!(local, ["198.19.1.20:8080"]);
    assert_eq!(lb.health_check_node_port, Some(32000));
    // NodePort on the gateway address.
    let (np, kind) = t.lookup(&Addr::from_v4([198, 18, 0, 1]), Proto::TCP, 30081).unwrap();
    assert_eq!((np.name.name.as_str(), kind), ("local-lb", FrontendKind::NodePort));
    // Dual-stack: one fast-path port per family, each with its own endpoints.
    let v4 = lookup(&t, "198.19.128.16", Proto::TCP, 80).unwrap();
    let v6 = lookup(&t, "2001:db8:128::16", Proto::TCP, 80).unwrap();
    assert_ne!(v4.id, v6.id);
    assert!(v4.cluster.endpoints().iter().all(|e| e.addr.is_v4()));
    assert!(v6.cluster.endpoints().iter().all(|e| !e.addr.is_v4()) && v6.cluster.len() == 1);
    // Not proxied: headless and another proxy's Services.
    assert!(lookup(&t, "198.19.128.19", Proto::TCP, 80).is_none());
}

#[test]
fn a_family_the_gateway_has_no_address_of_is_not_served_and_says_so() {
    let handle = Arc::new(ServiceTableHandle::new(ServiceTable::default()));
    let gw = Addr::from_v4([198, 18, 0, 1]);
    let v4_only = NodeConfig { addresses: vec![gw], snat_v4: Some(gw), ..NodeConfig::default() };
    let mut p = Publisher::new(handle.clone(), None, v4_only);
    let out = p.full_sync(&fixtures(), &node());
    let t = handle.load();
    assert!(lookup(&t, "198.19.128.16", Proto::TCP, 80).is_some(), "IPv4 is served");
    assert!(lookup(&t, "2001:db8:128::16", Proto::TCP, 80).is_none(), "IPv6 is not");
    let said: Vec<&String> = out.warnings.iter().filter(|w| w.contains("IPv6 frontends are not served")).collect();
    assert!(
        !said.is_empty() && said.iter().all(|w| w.contains("this gateway has no IPv6 address")),
        "{:?}",
        out.warnings
    );
    assert!(said.iter().any(|w| w.starts_with("Service t/dual-stack ")), "{said:?}");
    // A gateway that does not know its addresses (watch, table) serves both.
    let handle = Arc::new(ServiceTableHandle::new(ServiceTable::default()));
    let out = Publisher::new(handle.clone(), None, NodeConfig::default()).full_sync(&fixtures(), &node());
    assert!(lookup(&handle.load(), "2001:db8:128::16", Proto::TCP, 80).is_some());
    assert!(!out.warnings.iter().any(|w| w.contains("frontends are not served")));
}

#[test]
fn an_unchanged_result_is_not_republished_and_one_change_rebuilds_one_service() {
    let handle = Arc::new(ServiceTableHandle::new(ServiceTable::default()));
    let mut p = Publisher::new(handle.clone(), None, node_config());
    let mut state = fixtures();
    p.full_sync(&state, &node());
    let before = handle.load_full();

    // A label on a Service changes nothing the fast path sees.
    let relabelled = manifest::parse(
        "apiVersion: v1\nkind: Service\nmetadata: {name: defaults, namespace: t, labels: {team: x}}\n\
         spec: {clusterIP: 198.19.128.7, ports: [{port: 80, targetPort: 8080}]}\n",
        "inline",
    );
    let changed = state.apply(relabelled.objects.into_iter().next().unwrap());
    assert_eq!(changed, BTreeSet::from([("t".to_string(), "defaults".to_string())]));
    let out = p.update(&state, &node(), &changed);
    assert_eq!((out.published, out.services_translated), (false, 1));
    assert_eq!(handle.load().generation(), 1);

    // One endpoint more in one Service: one Service translated, a new table,
    // and every other service port is the very same Arc.
    let slice = manifest::parse(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: defaults-x, namespace: t, \
         labels: {kubernetes.io/service-name: defaults}}\naddressType: IPv4\nports: [{port: 8080}]\n\
         endpoints: [{addresses: [198.19.1.70]}, {addresses: [198.19.1.79]}]\n",
        "inline",
    );
    let changed = state.apply(slice.objects.into_iter().next().unwrap());
    let out = p.update(&state, &node(), &changed);
    assert_eq!((out.published, out.services_translated), (true, 1));
    let after = handle.load_full();
    assert_eq!(after.generation(), 2);
    let d = lookup(&after, "198.19.128.7", Proto::TCP, 80).unwrap();
    assert_eq!(d.cluster.len(), 2);
    for port in before.ports() {
        if port.name.name != "defaults" {
            assert!(after.ports().iter().any(|q| Arc::ptr_eq(port, q)), "{} was rebuilt", port.name);
        }
    }
    // Applying the same object again reports no change at all.
    let again = manifest::parse(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: defaults-x, namespace: t, \
         labels: {kubernetes.io/service-name: defaults}}\naddressType: IPv4\nports: [{port: 8080}]\n\
         endpoints: [{addresses: [198.19.1.70]}, {addresses: [198.19.1.79]}]\n",
        "inline",
    );
    assert!(state.apply(again.objects.into_iter().next().unwrap()).is_empty());
}

#[test]
fn udp_flows_to_a_removed_endpoint_are_flushed_tcp_flows_are_not() {
    let yaml = |endpoints: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: t}}\nspec:\n  clusterIP: 198.19.128.53\n  ports:\n  - {{name: udp, port: 53, protocol: UDP, targetPort: 5353}}\n  - {{name: tcp, port: 53, protocol: TCP, targetPort: 5353}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: dns-x, namespace: t, labels: {{kubernetes.io/service-name: dns}}}}\naddressType: IPv4\nports: [{{name: udp, port: 5353, protocol: UDP}}, {{name: tcp, port: 5353, protocol: TCP}}]\nendpoints: [{endpoints}]\n"
        )
    };
    let (mut state, _) = ClusterState::from_objects(manifest::parse(&yaml("{addresses: [198.19.1.53]}"), "a").objects);
    let handle = Arc::new(ServiceTableHandle::new(ServiceTable::default()));
    let conntrack = Arc::new(FlowTable::new(Config { capacity: 1024, ..Config::default() }).unwrap());
    let mut p = Publisher::new(handle.clone(), Some(conntrack.clone()), node_config());
    p.full_sync(&state, &node());

    // A UDP and a TCP flow from a pod through the real pipeline.
    let affinity = AffinityTable::new(16);
    let mut worker = WorkerState::new();
    let mut send = |proto: Proto| {
        let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4(
            [198, 19, 3, 3],
            [198, 19, 128, 53],
            64,
        );
        let mut frame = Vec::new();
        match proto {
            Proto::UDP => b.udp(40000, 53).write(&mut frame, b"q").unwrap(),
            _ => b.tcp(40000, 53, 1, 100).syn().write(&mut frame, b"").unwrap(),
        }
        let table = handle.load();
        let t = Tables { services: &table, conntrack: &conntrack, affinity: &affinity };
        let len = frame.len();
        let mut f = Frame { buf: &mut frame, len };
        process(&mut f, &t, &mut worker, 1)
    };
    assert_eq!(send(Proto::UDP), Verdict::Forward { next_hop: Addr::from_v4([198, 19, 1, 53]) });
    assert_eq!(send(Proto::TCP), Verdict::Forward { next_hop: Addr::from_v4([198, 19, 1, 53]) });
    assert_eq!(conntrack.len(), 2);

    // The endpoint is replaced by another one.
    let new = ClusterState::from_objects(manifest::parse(&yaml("{addresses: [198.19.1.54]}"), "b").objects).0;
    let changed = state.replace(new);
    let out = p.update(&state, &node(), &changed);
    assert!(out.published);
    assert_eq!(out.udp_flows_flushed, 1, "the UDP flow to the removed endpoint is gone");
    let left: Vec<Proto> = conntrack.flows().iter().map(|f| f.orig.proto).collect();
    assert_eq!(left, [Proto::TCP], "established TCP keeps flowing until it ends");
    // The flow's next datagram reaches the live endpoint.
    assert_eq!(send(Proto::UDP), Verdict::Forward { next_hop: Addr::from_v4([198, 19, 1, 54]) });

    // A successor resumes the table (`--state-dir`): its first table is all
    // it knows. With the endpoint unchanged, no flow goes; with the endpoint
    // replaced while no process ran, the UDP flow to the old one goes and
    // the TCP flow stays.
    for (endpoint, removed) in [("198.19.1.54", 0), ("198.19.1.55", 1)] {
        let state =
            ClusterState::from_objects(manifest::parse(&yaml(&format!("{{addresses: [{endpoint}]}}")), "c").objects).0;
        let handle = Arc::new(ServiceTableHandle::new(ServiceTable::default()));
        let mut successor = Publisher::new(handle, Some(conntrack.clone()), node_config());
        assert_eq!(successor.full_sync(&state, &node()).udp_flows_flushed, 0, "a first table flushes nothing");
        assert_eq!(successor.flush_udp_to_unknown_endpoints(), removed, "endpoint {endpoint}");
    }
    let left: Vec<Proto> = conntrack.flows().iter().map(|f| f.orig.proto).collect();
    assert_eq!(left, [Proto::TCP]);
}

/// `xskgate.io/lb-mode: dsr` (or the gateway's default, `--lb-mode`) makes a
/// port DSR where its endpoints listen on the Service's port; one whose
/// endpoints use another port is served with SNAT and named in a warning,
/// as is an annotation value that is neither mode.
#[test]
fn lb_mode_dsr_where_the_endpoints_use_the_services_port() {
    let svc = |name: &str, annotation: &str, port: u16, lb: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: t{annotation}}}\nspec:\n  \
             type: LoadBalancer\n  clusterIP: 198.19.130.{}\n  ports: [{{name: web, port: {port}, protocol: TCP, targetPort: 8080}}]\n\
             status: {{loadBalancer: {{ingress: [{{ip: {lb}}}]}}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}-1, namespace: t, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\n\
             ports: [{{name: web, port: 8080, protocol: TCP}}]\nendpoints: [{{addresses: [198.19.1.10], conditions: {{ready: true}}}}]\n",
            &lb[lb.len() - 2..]
        )
    };
    let dsr = ", annotations: {xskgate.io/lb-mode: dsr}";
    let text = svc("dsr-ok", dsr, 8080, "198.18.130.11")
        + &svc("dsr-port", dsr, 80, "198.18.130.12")
        + &svc("plain", "", 8080, "198.18.130.13")
        + &svc("typo", ", annotations: {xskgate.io/lb-mode: dssr}", 8080, "198.18.130.14");
    let dir = xskgate_tests::TempDir::new("xskgate-publish-lb-mode");
    std::fs::write(dir.0.join("s.yaml"), text).unwrap();
    let state = ClusterState::from_objects(manifest::load_dir(&dir.0).unwrap().objects).0;
    for (default_dsr, plain) in [(false, false), (true, true)] {
        let handle = Arc::new(ServiceTableHandle::new(ServiceTable::default()));
        let mut p = Publisher::new(handle.clone(), None, node_config());
        if default_dsr {
            p.set_default_lb_mode(xskgate_control::translate::LbMode::Dsr);
        }
        let out = p.full_sync(&state, &node());
        let t = handle.load();
        let dsr_of = |ip: &str, port: u16| lookup(&t, ip, Proto::TCP, port).expect("published").dsr;
        assert!(dsr_of("198.18.130.11", 8080), "annotated, on the endpoints' port");
        assert!(!dsr_of("198.18.130.12", 80), "annotated, but the endpoints use 8080");
        assert_eq!(dsr_of("198.18.130.13", 8080), plain, "the gateway's default (dsr: {default_dsr})");
        assert_eq!(dsr_of("198.18.130.14", 8080), plain, "a bad annotation is ignored");
        let said = out.warnings.join("\n");
        assert!(
            said.contains("Service t/dsr-port web: lb-mode dsr needs its endpoints on the Service's port 80 (they use 8080): served with SNAT"),
            "{said}"
        );
        assert!(said.contains("xskgate.io/lb-mode: \"dssr\" is not snat or dsr; ignored"), "{said}");
    }
}

/// Two gateways that learn the same endpoints in another order (the
/// EndpointSlices split differently, the endpoints listed the other way
/// round, other Services first so that the ids differ) build the same
/// Maglev table: every flow hash picks the same endpoint on both, so ECMP
/// moving a flow between gateways does not move it between pods (DSR and
/// Local rely on it).
#[test]
fn every_gateway_builds_the_same_maglev_table_whatever_the_order() {
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: t}\nspec:\n  type: LoadBalancer\n  \
               clusterIP: 198.19.131.1\n  ports: [{name: web, port: 8080, protocol: TCP}]\n\
               status: {loadBalancer: {ingress: [{ip: 198.18.131.1}]}}\n";
    let slice = |name: &str, pods: &[u8]| {
        let eps: Vec<String> =
            pods.iter().map(|p| format!("{{addresses: [198.19.7.{p}], conditions: {{ready: true}}}}")).collect();
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: t, \
             labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: web, port: 8080, protocol: TCP}}]\n\
             endpoints: [{}]\n",
            eps.join(", ")
        )
    };
    let pods: Vec<u8> = (10..17).collect();
    let reversed: Vec<u8> = pods.iter().rev().copied().collect();
    let gw1 = format!("{svc}{}", slice("web-a", &pods));
    let other = "---\napiVersion: v1\nkind: Service\nmetadata: {name: first, namespace: a}\nspec:\n  clusterIP: 198.19.131.9\n  \
                 ports: [{port: 80, protocol: TCP}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {name: first-1, namespace: a, labels: {kubernetes.io/service-name: first}}\naddressType: IPv4\n\
                 ports: [{port: 8080, protocol: TCP}]\nendpoints: [{addresses: [198.19.7.16], conditions: {ready: true}}]\n";
    let gw2 = format!("{other}{}{}---\n{svc}", slice("web-y", &reversed[..3]), slice("web-x", &reversed[3..]));
    let mut tables = Vec::new();
    for (i, text) in [gw1, gw2].into_iter().enumerate() {
        let dir = xskgate_tests::TempDir::new(&format!("xskgate-publish-maglev-{i}"));
        std::fs::write(dir.0.join("s.yaml"), text).unwrap();
        let state = ClusterState::from_objects(manifest::load_dir(&dir.0).unwrap().objects).0;
        let handle = Arc::new(ServiceTableHandle::new(ServiceTable::default()));
        Publisher::new(handle.clone(), None, node_config()).full_sync(&state, &node());
        tables.push(handle.load());
    }
    let port = |t: &ServiceTable| lookup(t, "198.18.131.1", Proto::TCP, 8080).expect("published").cluster.clone();
    let (a, b) = (port(&tables[0]), port(&tables[1]));
    assert_eq!(a.len(), 7);
    let ids = |s: &xskgate_fastpath::EndpointSet| s.endpoints().iter().map(|e| e.id).collect::<Vec<_>>();
    assert_ne!(ids(&a), ids(&b), "the ids differ between the gateways (the test would prove nothing otherwise)");
    let mut hash = 0x243f_6a88_85a3_08d3u64;
    for _ in 0..20_000 {
        hash = hash.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let pick = |s: &xskgate_fastpath::EndpointSet| s.pick(hash).map(|e| (e.addr, e.port));
        assert_eq!(pick(&a), pick(&b), "flow hash {hash:#x}");
    }
}
