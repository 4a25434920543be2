//! The harness itself, on plain kernel routing (no xskgate): client —
//! router — pod, TCP and UDP through the echo server, the source address the
//! pod saw, and clean-up on drop and on panic. Needs root; fails loudly
//! without it.

use std::net::SocketAddr;
use std::time::Duration;
use xskgate_tests::{Topology, ask_tcp, ask_udp, in_ns};

const ECHO: &str = env!("CARGO_BIN_EXE_xskgate-echo");

fn namespaces_with(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

fn routed() -> Topology {
    let mut t = Topology::new();
    for ns in ["client", "router", "pod"] {
        t.add_ns(ns);
    }
    t.link("client", "c0", "198.18.1.2/24", "router", "r0", "198.18.1.1/24");
    t.link("router", "r1", "198.18.2.1/24", "pod", "p0", "198.18.2.2/24");
    t.link("client", "c6", "2001:db8:1::2/64", "router", "r6", "2001:db8:1::1/64");
    t.link("router", "r7", "2001:db8:2::1/64", "pod", "p6", "2001:db8:2::2/64");
    t.forwarding("router");
    t.route("client", "198.18.2.0/24", "198.18.1.1");
    t.route("pod", "198.18.1.0/24", "198.18.2.1");
    t.route("client", "2001:db8:2::/64", "2001:db8:1::1");
    t.route("pod", "2001:db8:1::/64", "2001:db8:2::1");
    t.echo("pod", ECHO, "pod-a", 8080);
    t
}

#[test]
fn client_reaches_the_pod_which_sees_the_client_address_v4_and_v6() {
    let t = routed();
    let client = t.ns_name("client");
    for to in ["198.18.2.2:8080", "[2001:db8:2::2]:8080"] {
        let to: SocketAddr = to.parse().unwrap();
        let (tcp, udp) = in_ns(&client, move || {
            let tcp = ask_tcp(to, Duration::from_secs(2)).unwrap_or_else(|e| panic!("TCP to {to}: {e}"));
            let udp = ask_udp(to, Duration::from_secs(2)).unwrap_or_else(|e| panic!("UDP to {to}: {e}"));
            (tcp, udp)
        });
        let want = if to.is_ipv4() { "198.18.1.2" } else { "2001:db8:1::2" };
        for a in [tcp, udp] {
            assert_eq!(a.pod, "pod-a");
            assert_eq!(a.peer.ip().to_string(), want, "the pod sees the client's address through plain routing");
        }
    }
    // Many connections from one thread in the namespace.
    let n = in_ns(&client, || {
        (0..200).filter(|_| ask_tcp("198.18.2.2:8080".parse().unwrap(), Duration::from_secs(2)).is_ok()).count()
    });
    assert_eq!(n, 200);
    // Nothing was created outside the test's namespaces.
    let root_links = String::from_utf8(xskgate_tests::run(&["ip", "-o", "link"]).stdout).unwrap();
    assert!(!root_links.contains(t.prefix()), "a test interface leaked into the root namespace");
}

#[test]
fn everything_is_removed_on_drop_and_on_panic() {
    let prefix = {
        let t = routed();
        assert_eq!(namespaces_with(t.prefix()).len(), 3);
        t.prefix().to_string()
    };
    assert!(namespaces_with(&prefix).is_empty(), "namespaces left after drop");

    let prefix = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let p = prefix.clone();
    let result = std::panic::catch_unwind(move || {
        let t = routed();
        *p.lock().unwrap() = t.prefix().to_string();
        panic!("a failing test");
    });
    assert!(result.is_err());
    let prefix = prefix.lock().unwrap().clone();
    assert!(!prefix.is_empty());
    assert!(namespaces_with(&prefix).is_empty(), "namespaces left after a panic");
}

/// `kernel_drops` names the kernel's counters that rose (a datagram to a
/// port nobody listens on counts `NoPorts`), and `grow_receive_buffer`
/// gives a socket the buffer the scenario tests rely on.
#[test]
fn kernel_drops_reports_what_the_kernel_counted() {
    let t = routed();
    assert_eq!(t.kernel_drops("pod"), "pod: no kernel drops");
    let pod = t.ns_name("pod");
    let buffer = in_ns(&pod, || {
        let s = std::net::UdpSocket::bind("198.18.2.2:0").unwrap();
        xskgate_tests::grow_receive_buffer(&s, xskgate_tests::UDP_RECEIVE_BUFFER).unwrap();
        // Nothing listens on port 9 in this namespace.
        s.send_to(b"x", "198.18.2.2:9").unwrap();
        socket_receive_buffer(&s)
    });
    // The kernel doubles the value asked for (its bookkeeping overhead).
    assert_eq!(buffer, 2 * xskgate_tests::UDP_RECEIVE_BUFFER);
    let drops = t.kernel_drops("pod");
    assert!(drops.contains("Udp NoPorts 1"), "{drops}");
}

/// `SO_RCVBUF` of `s`, as the kernel reports it.
fn socket_receive_buffer(s: &std::net::UdpSocket) -> i32 {
    unsafe extern "C" {
        fn getsockopt(fd: i32, level: i32, name: i32, value: *mut std::ffi::c_void, len: *mut u32) -> i32;
    }
    let (mut v, mut len) = (0i32, std::mem::size_of::<i32>() as u32);
    // SAFETY: the descriptor is open; `v` and `len` outlive the call and
    // `len` is the size of `v`. SOL_SOCKET = 1, SO_RCVBUF = 8.
    let rc = unsafe { getsockopt(std::os::fd::AsRawFd::as_raw_fd(s), 1, 8, (&raw mut v).cast(), &raw mut len) };
    assert_eq!(rc, 0, "getsockopt: {}", std::io::Error::last_os_error());
    v
}
