//! The steering maps follow the service table: after `follow` (incremental,
//! by port pointer) the kernel's BPF maps hold exactly `SteerSet::of` the
//! table, through changed, added and removed ports and shared keys. Loads
//! the real XDP program into the kernel (not attached): needs root, fails
//! loudly without it.

use std::sync::Arc;
use xskgate_conntrack::{Addr, Proto};
use xskgate_fastpath::io::steer::{SteerSet, Steering};
use xskgate_fastpath::{
    Endpoint, EndpointSet, Frontend, FrontendKind, NodeConfig, PortChange, ServicePort, ServicePortName, ServiceTable,
    ServiceTableBuilder, TrafficPolicy,
};

fn port(id: u32, vip: [u8; 4], node_port: Option<u16>, eps: &[[u8; 4]]) -> Arc<ServicePort> {
    let mut frontends = vec![Frontend { kind: FrontendKind::LoadBalancer, addr: Addr::from_v4(vip), port: 80 }];
    if let Some(np) = node_port {
        frontends.push(Frontend { kind: FrontendKind::NodePort, addr: Addr::from_v4([0, 0, 0, 0]), port: np });
    }
    let set = EndpointSet::new(
        eps.iter().enumerate().map(|(i, e)| Endpoint { addr: Addr::from_v4(*e), port: 8080, id: i as u32 }).collect(),
    );
    Arc::new(ServicePort {
        id,
        name: ServicePortName { namespace: "t".into(), name: format!("s{id}"), port_name: String::new() },
        proto: Proto::UDP,
        frontends,
        external_policy: TrafficPolicy::Cluster,
        internal_policy: TrafficPolicy::Cluster,
        cluster: set.clone(),
        local: set,
        affinity_timeout: None,
        source_ranges: vec![],
        health_check_node_port: None,
        dsr: false,
    })
}

fn check(s: &Steering, t: &ServiceTable, local: &[Addr], when: &str) {
    let want = SteerSet::of(t, local);
    let (fe, ep) = s.programmed();
    assert_eq!(fe, want.frontends, "{when}: frontends");
    assert_eq!(ep, want.endpoints, "{when}: endpoints");
}

#[test]
fn follow_keeps_the_kernel_maps_equal_to_the_table() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc_geteuid() }, 0, "loading a BPF program needs root; this test never skips");
    let mut s = Steering::load().expect("the XDP program loads");
    let node = NodeConfig {
        addresses: vec![Addr::from_v4([198, 18, 0, 1])],
        snat_v4: Some(Addr::from_v4([198, 18, 0, 1])),
        ..NodeConfig::default()
    };
    let local = [Addr::from_v4([198, 18, 0, 1])];
    let mut b = ServiceTableBuilder::new(node, 1);
    b.add(port(1, [198, 18, 100, 1], Some(30001), &[[198, 19, 1, 1], [198, 19, 1, 2]])).unwrap();
    b.add(port(2, [198, 18, 100, 2], None, &[[198, 19, 1, 2], [198, 19, 1, 3]])).unwrap();
    let t1 = b.build();
    s.follow(&t1, &local).unwrap();
    check(&s, &t1, &local, "first table");

    // Port 1 loses 198.19.1.2 (still used by port 2: the key stays), port 2
    // goes, port 3 comes with a shared endpoint and a new frontend.
    let (t2, errors) = t1.with_changes(
        2,
        vec![
            PortChange::Upsert(port(1, [198, 18, 100, 1], Some(30001), &[[198, 19, 1, 1]])),
            PortChange::Remove(2),
            PortChange::Upsert(port(3, [198, 18, 100, 3], None, &[[198, 19, 1, 1], [198, 19, 1, 4]])),
        ],
    );
    assert!(errors.is_empty(), "{errors:?}");
    let written = s.follow(&t2, &local).unwrap();
    check(&s, &t2, &local, "after changes");
    // Two frontends and their VIPs' echo keys, two endpoints, at most two more.
    assert!(written <= 8, "only changed keys are written ({written})");
    assert_eq!(s.follow(&t2, &local).unwrap(), 0, "the same table again writes nothing");

    // A table made from the one followed: only the ports it names are
    // looked at. Then one made from a table never followed: the follower
    // falls back to comparing every port.
    let (t4, _) = t2.with_changes(
        4,
        vec![PortChange::Remove(3), PortChange::Upsert(port(1, [198, 18, 100, 1], Some(30001), &[[198, 19, 1, 5]]))],
    );
    assert_eq!(t4.changed_since(2), Some(&[3, 1][..]));
    s.follow(&t4, &local).unwrap();
    check(&s, &t4, &local, "after a table made from the followed one");
    let (t5, _) = t4.with_changes(5, vec![PortChange::Upsert(port(2, [198, 18, 100, 2], None, &[[198, 19, 1, 6]]))]);
    let (t6, _) = t5.with_changes(6, vec![PortChange::Upsert(port(1, [198, 18, 100, 1], None, &[[198, 19, 1, 7]]))]);
    assert_eq!(t6.changed_since(4), None, "t6 was made from t5, which was never followed");
    s.follow(&t6, &local).unwrap();
    check(&s, &t6, &local, "after skipping a table");

    // A node change rebuilds everything.
    let node3 = NodeConfig { addresses: vec![Addr::from_v4([198, 18, 0, 9])], ..t2.node().clone() };
    let mut b = ServiceTableBuilder::new(node3, 3);
    for p in t2.ports() {
        b.add(p.clone()).unwrap();
    }
    let t3 = b.build();
    s.follow(&t3, &local).unwrap();
    check(&s, &t3, &local, "after a node change");
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
