//! The receiving side of direct server return, where the kernel's own
//! tunnel devices cannot run.
//!
//! On a real node, the kernel's `ipip` (IPv4) and `ip6tnl` (IPv6) devices
//! take the gateway's encapsulated packets, strip the outer header and hand
//! the client's packet, to a VIP the node holds, to its stack as received on
//! the tunnel device. This machine's kernel has neither
//! (`CONFIG_NET_IPIP` and `CONFIG_IPV6_TUNNEL` are not set, see
//! `/proc/config.gz`), so [`Decapsulator`] does exactly that in user space
//! and nothing more: a raw socket of protocol 4 (IPv4) and one of protocol
//! 41 (IPv6) receive the encapsulated packets addressed to the pod (the
//! kernel hands raw sockets every protocol it has no handler for), and each
//! inner packet, unchanged, is written to a TUN device, `dsr0`, from which
//! the pod's kernel receives it as it would from `tunl0`/`ip6tnl0`. The VIPs
//! are on the pod's loopback, and the pod's reply goes straight to the
//! client by its ordinary routes: the tunnel only ever receives.

use crate::Topology;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The TUN device's name in the pod namespace.
pub const DEVICE: &str = "dsr0";

/// A running decapsulator in one pod namespace; stops on drop.
pub struct Decapsulator {
    stop: Arc<AtomicBool>,
    /// Encapsulated packets received and handed on.
    pub packets: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Decapsulator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn raw_socket(family: i32, proto: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the descriptor is owned
    // by the returned OwnedFd.
    let fd = unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, proto) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the persistent TUN device `name` (created by `ip tuntap`).
fn open_tun(name: &str) -> std::io::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
    // struct ifreq: the name, then the flags (a short) in the union.
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as i16;
    ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `ifr` is
    // large enough to hold; the descriptor is open for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, ifr.as_mut_ptr()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

impl Decapsulator {
    /// Sets up namespace `ns` (a pod) to take DSR traffic for `vips`: the
    /// VIPs on its loopback, the TUN device up, reverse-path filtering off
    /// for it (the client is routed by the pod's own link), and starts the
    /// decapsulating thread.
    ///
    /// # Panics
    /// If the namespace cannot be set up (the test cannot run).
    pub fn start(t: &Topology, ns: &str, vips: &[&str]) -> Decapsulator {
        t.exec(ns, &["ip", "tuntap", "add", "dev", DEVICE, "mode", "tun"]);
        t.exec(ns, &["ip", "link", "set", DEVICE, "up"]);
        for vip in vips {
            let len = if vip.contains(':') { "128" } else { "32" };
            t.exec(ns, &["ip", "addr", "add", &format!("{vip}/{len}"), "dev", "lo"]);
        }
        for knob in ["all", "default", DEVICE] {
            t.exec(ns, &["sysctl", "-qw", &format!("net.ipv4.conf.{knob}.rp_filter=0")]);
        }
        let (stop, packets) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (s, n) = (stop.clone(), packets.clone());
        let thread = crate::spawn_in_ns(&t.ns_name(ns), move || {
            let opened = (|| {
                Ok::<_, std::io::Error>((
                    raw_socket(libc::AF_INET, 4)?,
                    raw_socket(libc::AF_INET6, 41)?,
                    open_tun(DEVICE)?,
                ))
            })();
            let (v4, v6, tun) = match opened {
                Ok(o) => {
                    let _ = ready_tx.send(None);
                    o
                }
                Err(e) => {
                    let _ = ready_tx.send(Some(e.to_string()));
                    return;
                }
            };
            decapsulate(&v4, &v6, &tun, &s, &n);
        });
        match ready_rx.recv() {
            Ok(None) => {}
            Ok(Some(e)) => panic!("the DSR decapsulator in {ns} cannot start: {e}"),
            Err(_) => panic!("the DSR decapsulator thread in {ns} died"),
        }
        Decapsulator { stop, packets, thread: Some(thread) }
    }
}

/// Until `stop`: every packet on the raw sockets, its outer header off,
/// written to the TUN device.
fn decapsulate(v4: &OwnedFd, v6: &OwnedFd, tun: &std::fs::File, stop: &AtomicBool, packets: &AtomicU64) {
    use std::io::Write;
    let mut buf = vec![0u8; 65536];
    let mut tun = tun;
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [
            libc::pollfd { fd: v4.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: v6.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, 50) };
        if ready <= 0 {
            continue;
        }
        for (i, fd) in [v4, v6].into_iter().enumerate() {
            if fds[i].revents & libc::POLLIN == 0 {
                continue;
            }
            // SAFETY: `buf` is writable for its length; the socket is open.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(n) = usize::try_from(n) else { continue };
            // An IPv4 raw socket delivers the outer header (its length in
            // IHL); an IPv6 one delivers only what follows it.
            let inner = if i == 0 { usize::from(buf[0] & 0x0f) * 4 } else { 0 };
            if n > inner && tun.write_all(&buf[inner..n]).is_ok() {
                packets.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
