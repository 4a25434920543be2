//! A port's TX on a real AF_XDP socket, on a veth pair in namespaces the
//! test makes and removes: a batch larger than one kick's budget (the
//! kernel's copy mode sends at most 32 frames per `sendto`) leaves in full
//! from one flush, with no later frame to push it out. Needs root; fails
//! loudly without it.

use std::time::Duration;
use xskgate_fastpath::io::xsk::Port;
use xskgate_tests::{Topology, in_ns};

const BURSTS: usize = 3;
const BURST: usize = 64;

#[test]
fn a_batch_larger_than_a_kick_leaves_in_full() {
    xskgate_tests::require_root();
    let mut t = Topology::new();
    t.add_ns("a");
    t.add_ns("b");
    t.link("a", "x0", "198.18.5.1/24", "b", "x1", "198.18.5.2/24");
    let (x0, x1) = (t.if_name("x0"), t.if_name("x1"));
    let read = |ns: &str, ifn: &str, what: &str| {
        String::from_utf8_lossy(&t.exec(ns, &["cat", &format!("/sys/class/net/{ifn}/{what}")]).stdout)
            .trim()
            .to_string()
    };
    let mac = |s: String| -> [u8; 6] {
        let v: Vec<u8> = s.split(':').map(|h| u8::from_str_radix(h, 16).expect("hex")).collect();
        v.try_into().expect("six bytes")
    };
    let (src_mac, dst_mac) = (mac(read("a", &x0, "address")), mac(read("b", &x1, "address")));
    let ifindex: u32 = read("a", &x0, "ifindex").parse().expect("ifindex");
    let receiver = in_ns(&t.ns_name("b"), || {
        let s = std::net::UdpSocket::bind("198.18.5.2:9999").expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
        s
    });
    let frame = {
        let b = etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
            .ipv4([198, 18, 5, 1], [198, 18, 5, 2], 64)
            .udp(1234, 9999);
        let mut v = Vec::new();
        b.write(&mut v, b"burst").expect("write");
        v
    };
    // The port lives on one thread in namespace a for the whole test.
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (sent_tx, sent_rx) = std::sync::mpsc::channel::<usize>();
    let sender = xskgate_tests::spawn_in_ns(&t.ns_name("a"), move || {
        let mut port = Port::open(&x0, ifindex, 0).unwrap_or_else(|e| panic!("{e}"));
        while go_rx.recv().is_ok() {
            let sent = port.send_with(BURST, |_, buf| {
                buf[..frame.len()].copy_from_slice(&frame);
                frame.len()
            });
            sent_tx.send(sent).expect("the test waits for it");
        }
    });
    let mut received = Vec::new();
    for _ in 0..BURSTS {
        go_tx.send(()).expect("the sender runs");
        assert_eq!(sent_rx.recv().expect("the sender answers"), BURST, "the TX ring took the whole burst");
        let mut got = 0;
        let mut buf = [0u8; 64];
        // Nothing else is sent until the next burst: what is not here within
        // the timeout waits in the ring for a kick that never comes.
        while receiver.recv(&mut buf).is_ok() {
            got += 1;
        }
        received.push(got);
    }
    drop(go_tx);
    sender.join().expect("the sender thread");
    assert_eq!(received, vec![BURST; BURSTS], "frames received per burst of {BURST}");
}
