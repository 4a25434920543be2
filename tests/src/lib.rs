//! xskgate's veth/netns harness for end-to-end tests and the lab.
//!
//! A [`Topology`] creates network namespaces and veth pairs under a unique
//! per-run prefix and removes them all when dropped, also when the test
//! panics. Veth pairs are created directly inside their namespaces, so
//! nothing ever appears in, or is changed in, the root namespace. Addresses
//! come from 198.18.0.0/15 (and 2001:db8::/32); routes only point at other
//! test namespaces. Every interface that sends into a gateway gets
//! `ethtool -K tx off`: frames a namespace sends over veth carry only a
//! partial checksum, which AF_XDP would pass on as is.
//!
//! [`in_ns`] runs a closure on a thread that entered a namespace, so a test
//! can open thousands of sockets there without spawning a process each.
//! The echo server for pods is the `xskgate-echo` binary of this package.
//!
//! End-to-end tests need root; [`require_root`] makes them fail loudly, never
//! skip, when they cannot run.

pub mod alloc;
pub mod daemon;
pub mod dsr;
pub mod pktinfo;
pub mod reference;
pub mod restart;
pub mod single;
pub mod stream;

pub use daemon::{Daemon, DaemonError};

/// A directory under the system's temporary directory, named `name` and
/// this process's id, created now and removed when dropped (also when the
/// test fails).
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
pub use stream::UdpStream;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

/// Panics (fails the test) unless running as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc_geteuid() };
    assert_eq!(
        euid, 0,
        "end-to-end tests need root (they create network namespaces and veths); run them as root — they are never skipped"
    );
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
    fn setns(fd: i32, nstype: i32) -> i32;
    fn setsockopt(fd: i32, level: i32, name: i32, value: *const std::ffi::c_void, len: u32) -> i32;
}

/// `SOL_SOCKET` and `SO_RCVBUFFORCE` (asm-generic/socket.h; root may exceed `rmem_max`).
const SOL_SOCKET: i32 = 1;
const SO_RCVBUFFORCE: i32 = 33;

/// The receive buffer the test's UDP sockets ask for: 4 MiB, thousands of
/// datagrams, where the default (212 KiB) holds a few hundred — about
/// 0.1 s of a 2,000-per-second stream whose reader the scheduler may hold
/// off on a loaded two-core machine. A loss then means a lost datagram,
/// not a slow test thread.
pub const UDP_RECEIVE_BUFFER: i32 = 4 << 20;

/// Gives `socket` a receive buffer of `bytes` (`SO_RCVBUFFORCE`: needs root,
/// as every end-to-end test does).
///
/// # Errors
/// The kernel refused the option.
pub fn grow_receive_buffer(socket: &UdpSocket, bytes: i32) -> std::io::Result<()> {
    // SAFETY: the descriptor is open for the call; the value is an i32 that
    // outlives it and `len` is its size.
    let rc = unsafe {
        setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            SOL_SOCKET,
            SO_RCVBUFFORCE,
            (&raw const bytes).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

const CLONE_NEWNET: i32 = 0x4000_0000;

/// Runs `f` on a thread inside network namespace `ns` and returns its result.
///
/// # Panics
/// If the namespace cannot be entered (the test cannot run), or if `f` panics.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_in_ns(ns, f).join().expect("the closure run in the namespace panicked")
}

/// Moves the calling thread into the network namespace at `path`.
///
/// # Panics
/// If the namespace cannot be entered (the test cannot run).
fn enter_ns(path: &str) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
    // SAFETY: `file` is an open namespace file descriptor for the call's
    // duration; setns only changes this thread's network namespace.
    let rc = unsafe { setns(std::os::fd::AsRawFd::as_raw_fd(&file), CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
}

/// Starts `f` on a thread inside network namespace `ns` and returns its
/// handle (threads it spawns stay in that namespace).
pub fn spawn_in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        enter_ns(&path);
        f()
    })
}

/// Runs a command, returning its output; panics with its stderr on failure.
pub fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    assert!(out.status.success(), "{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    out
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Namespaces and veths under one unique prefix, removed on drop.
pub struct Topology {
    prefix: String,
    namespaces: Vec<String>,
    children: Vec<Child>,
    stop_threads: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Topology {
    /// A new, empty topology with a prefix no other run uses.
    pub fn new() -> Topology {
        require_root();
        loop {
            let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
            let n = std::process::id() ^ nanos ^ COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9e37_79b9);
            // "xg" + 5 hex digits: leaves 8 characters of the 15 an
            // interface name may have.
            let prefix = format!("xg{:05x}", n & 0xf_ffff);
            let taken = std::fs::read_dir("/run/netns")
                .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with(&prefix)))
                .unwrap_or(false);
            if !taken {
                return Topology {
                    prefix,
                    namespaces: Vec::new(),
                    children: Vec::new(),
                    stop_threads: Arc::new(AtomicBool::new(false)),
                    threads: Vec::new(),
                };
            }
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The full name of namespace `short`.
    pub fn ns_name(&self, short: &str) -> String {
        format!("{}-{short}", self.prefix)
    }

    /// The full name of interface `short` (at most 8 characters).
    pub fn if_name(&self, short: &str) -> String {
        assert!(short.len() <= 8, "interface short name {short:?} is longer than 8 characters");
        format!("{}{short}", self.prefix)
    }

    /// Creates namespace `short` with loopback up; returns its full name.
    pub fn add_ns(&mut self, short: &str) -> String {
        let ns = self.ns_name(short);
        run(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        self.exec(short, &["ip", "link", "set", "lo", "up"]);
        // The test owns every address: skip duplicate address detection,
        // so IPv6 (link-local addresses included) works the moment a link is up.
        self.exec(short, &["sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0"]);
        self.exec(short, &["sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"]);
        ns
    }

    /// Runs a command inside namespace `short`.
    pub fn exec(&self, short: &str, args: &[&str]) -> Output {
        let ns = self.ns_name(short);
        let mut full = vec!["ip", "netns", "exec", ns.as_str()];
        full.extend_from_slice(args);
        run(&full)
    }

    /// The kernel's drop counters in namespace `short` that are not zero, for
    /// failure messages: the UDP lines of `/proc/net/snmp` (socket buffer
    /// and input errors, datagrams to no socket) and each interface's
    /// `rx_dropped` and `tx_dropped`.
    pub fn kernel_drops(&self, short: &str) -> String {
        let ns = self.ns_name(short);
        let out = Command::new("ip")
            .args(["netns", "exec", &ns, "sh", "-c"])
            .arg("cat /proc/net/snmp; for f in /sys/class/net/*/statistics/*x_dropped; do echo \"$f $(cat $f)\"; done")
            .output();
        let Ok(out) = out else { return format!("{short}: cannot read the kernel's counters") };
        let text = String::from_utf8_lossy(&out.stdout);
        let mut found = Vec::new();
        let udp: Vec<&str> = text.lines().filter(|l| l.starts_with("Udp: ")).collect();
        if let [names, values] = udp[..] {
            for (n, v) in names.split_whitespace().zip(values.split_whitespace()).skip(1) {
                if (n.contains("Errors") || n == "NoPorts") && v != "0" {
                    found.push(format!("Udp {n} {v}"));
                }
            }
        }
        for l in text.lines().filter(|l| l.starts_with("/sys/class/net/") && !l.ends_with(" 0")) {
            found.push(l.trim_start_matches("/sys/class/net/").replace("/statistics/", " ").to_string());
        }
        format!("{short}: {}", if found.is_empty() { "no kernel drops".to_string() } else { found.join(", ") })
    }

    /// A veth pair between namespaces `a` and `b`, created inside them,
    /// with the given addresses (CIDR notation), up, with TX checksum
    /// offload off on both ends.
    pub fn link(&mut self, a: &str, a_if: &str, a_addr: &str, b: &str, b_if: &str, b_addr: &str) {
        let (an, bn) = (self.ns_name(a), self.ns_name(b));
        let (ai, bi) = (self.if_name(a_if), self.if_name(b_if));
        run(&["ip", "link", "add", &ai, "netns", &an, "type", "veth", "peer", "name", &bi, "netns", &bn]);
        for (ns, ifn, addr) in [(a, &ai, a_addr), (b, &bi, b_addr)] {
            let family = if addr.contains(':') { "-6" } else { "-4" };
            let mut cmd = vec!["ip", family, "addr", "add", addr, "dev", ifn.as_str()];
            if family == "-6" {
                cmd.push("nodad"); // usable at once, no duplicate address detection wait
            }
            self.exec(ns, &cmd);
            self.exec(ns, &["ip", "link", "set", ifn, "up"]);
            self.exec(ns, &["ethtool", "-K", ifn, "tx", "off"]);
        }
    }

    /// Adds another address to interface `if_short` (a short name) in
    /// namespace `short`: an IPv6 address beside a link's IPv4 one.
    pub fn add_address(&self, short: &str, if_short: &str, addr: &str) {
        let ifn = self.if_name(if_short);
        let mut cmd =
            vec!["ip", if addr.contains(':') { "-6" } else { "-4" }, "addr", "add", addr, "dev", ifn.as_str()];
        if addr.contains(':') {
            cmd.push("nodad");
        }
        self.exec(short, &cmd);
    }

    /// A route in namespace `short`.
    pub fn route(&self, short: &str, dst: &str, via: &str) {
        let family = if dst.contains(':') { "-6" } else { "-4" };
        self.exec(short, &["ip", family, "route", "add", dst, "via", via]);
    }

    /// Turns on IP forwarding in namespace `short`.
    pub fn forwarding(&self, short: &str) {
        self.exec(short, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        self.exec(short, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    }

    /// Starts a long-running process in namespace `short`; it is killed when
    /// the topology is dropped. Returns once its first stdout line (if any)
    /// was printed, so a server is ready when this returns.
    pub fn spawn(&mut self, short: &str, program: &str, args: &[&str]) -> u32 {
        let ns = self.ns_name(short);
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns, program])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program} in {ns}: {e}"));
        let mut first = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut first);
        }
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Starts an `xskgate-echo` server (binary at `echo_bin`) for pod `name`
    /// on `port` in namespace `short`.
    pub fn echo(&mut self, short: &str, echo_bin: &str, name: &str, port: u16) {
        self.spawn(short, echo_bin, &["--name", name, "--port", &port.to_string()]);
    }
}

impl Topology {
    /// Starts an echo server for pod `name` on `port` on a thread of this
    /// process inside namespace `short` (no binary needed); it stops when
    /// the topology is dropped. Returns once it listens.
    pub fn echo_thread(&mut self, short: &str, name: &str, port: u16) {
        let path = format!("/run/netns/{}", self.ns_name(short));
        let (name, stop) = (name.to_string(), self.stop_threads.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            enter_ns(&path);
            let server = EchoServer::bind(&name, port);
            let ok = server.is_ok();
            let _ = ready_tx.send(server.as_ref().err().map(|e| e.to_string()));
            if ok {
                server.expect("checked").serve(&stop);
            }
        });
        match ready_rx.recv() {
            Ok(None) => {}
            Ok(Some(e)) => panic!("echo server in {short} did not start: {e}"),
            Err(_) => panic!("echo server thread for {short} died before listening"),
        }
        self.threads.push(t);
    }
}

/// The pod echo server: on TCP and UDP `port`, answers every request (a TCP
/// connection's first line, or a datagram, from the address it was sent to)
/// with `<pod> <peer addr>:<port>\n`;
/// HTTP GETs get the same line as an HTTP/1.1 response, so curl works too.
pub struct EchoServer {
    name: String,
    tcp: TcpListener,
    udp: UdpSocket,
}

/// An IPv4-mapped peer as the IPv4 address it is.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

impl EchoServer {
    /// Binds `[::]:port` (IPv4 too, IPv4-mapped) for TCP and UDP.
    ///
    /// # Errors
    /// A port that cannot be bound.
    pub fn bind(name: &str, port: u16) -> std::io::Result<EchoServer> {
        let tcp = TcpListener::bind(("::", port))?;
        let udp = UdpSocket::bind(("::", port))?;
        grow_receive_buffer(&udp, UDP_RECEIVE_BUFFER)?;
        pktinfo::enable(&udp)?;
        tcp.set_nonblocking(true)?;
        udp.set_read_timeout(Some(Duration::from_millis(50)))?;
        Ok(EchoServer { name: name.to_string(), tcp, udp })
    }

    /// Serves until `stop` is set (checked every 50 ms).
    pub fn serve(self, stop: &AtomicBool) {
        let EchoServer { name, tcp, udp } = self;
        let udp_name = name.clone();
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    // Answered from the address it was sent to (a VIP under DSR).
                    if let Ok(r) = pktinfo::recv(&udp, &mut buf) {
                        let answer = format!("{udp_name} {}\n", canonical(r.peer));
                        let _ = pktinfo::send_from(&udp, answer.as_bytes(), r.peer, r.to);
                    }
                }
            });
            while !stop.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((conn, peer)) => {
                        let name = name.clone();
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                        std::thread::spawn(move || answer_tcp(&name, &conn, canonical(peer)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
    }
}

fn answer_tcp(name: &str, conn: &TcpStream, peer: SocketAddr) {
    let mut reader = BufReader::new(conn);
    let mut first = String::new();
    if reader.read_line(&mut first).is_err() {
        return;
    }
    let line = format!("{name} {peer}\n");
    let mut w = conn;
    if first.starts_with("GET ") {
        // Drain the request head, answer as HTTP/1.1 and close.
        let mut h = String::new();
        while reader.read_line(&mut h).is_ok_and(|n| n > 2) {
            h.clear();
        }
        let _ = write!(w, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{line}", line.len());
    } else {
        let _ = w.write_all(line.as_bytes());
    }
}

impl Default for Topology {
    fn default() -> Topology {
        Topology::new()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.stop_threads.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deleting a namespace deletes the veths in it.
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The answer of an `xskgate-echo` server: which pod, and the source
/// address it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub pod: String,
    pub peer: SocketAddr,
}

fn parse_answer(line: &str) -> Option<Answer> {
    let (pod, peer) = line.trim().split_once(' ')?;
    Some(Answer { pod: pod.to_string(), peer: peer.parse().ok()? })
}

/// Asks an echo server over TCP (call inside [`in_ns`]).
///
/// # Errors
/// Connection refused, reset, timed out, or an unreadable answer.
pub fn ask_tcp(to: SocketAddr, timeout: Duration) -> std::io::Result<Answer> {
    let mut s = TcpStream::connect_timeout(&to, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"who\n")?;
    let mut line = String::new();
    s.read_to_string(&mut line).or_else(|e| if line.is_empty() { Err(e) } else { Ok(0) })?;
    parse_answer(&line).ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("answer {line:?}")))
}

/// Asks an echo server over UDP from a fresh socket (call inside [`in_ns`]).
///
/// # Errors
/// No answer within `timeout` (or an ICMP error reported by the kernel).
pub fn ask_udp(to: SocketAddr, timeout: Duration) -> std::io::Result<Answer> {
    let bind: SocketAddr = if to.is_ipv4() { "0.0.0.0:0".parse() } else { "[::]:0".parse() }.expect("literal");
    let s = UdpSocket::bind(bind)?;
    s.connect(to)?;
    s.set_read_timeout(Some(timeout))?;
    s.send(b"who")?;
    let mut buf = [0u8; 512];
    let n = s.recv(&mut buf)?;
    let line = String::from_utf8_lossy(&buf[..n]);
    parse_answer(&line).ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("answer {line:?}")))
}
