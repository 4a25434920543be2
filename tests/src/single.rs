//! One gateway, one pod: the topology of the fault and restart tests.
//!
//! ```text
//!  client 198.18.0.100 ── g0 198.18.0.1 [gw: xskgate on g0,g1] g1 198.19.1.1 ── pod-a 198.19.1.10
//! ```
//!
//! The gateway serves one Cluster LoadBalancer Service, [`VIP`] (TCP 80 and
//! UDP 53 → pod-a:8080), from a manifest directory the lab writes; the pod
//! runs whatever server the test starts in namespace `pa`.

use crate::{Daemon, Topology, in_ns, spawn_in_ns};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The Service's LoadBalancer IP.
pub const VIP: &str = "198.18.100.11";
/// pod-a's address.
pub const POD: &str = "198.19.1.10";

/// The Service and its EndpointSlice.
pub const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 198.19.128.11
  externalTrafficPolicy: Cluster
  ports:
  - {name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30081}
  - {name: dns, port: 53, protocol: UDP, targetPort: 8080, nodePort: 30054}
status: {loadBalancer: {ingress: [{ip: 198.18.100.11}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 8080, protocol: UDP}]
endpoints:
- {addresses: [198.19.1.10], nodeName: gw1, targetRef: {kind: Pod, name: pod-a}, conditions: {ready: true}}
"#;

/// The topology and the manifest directory (removed on drop).
pub struct Lab {
    pub t: Topology,
    pub dir: PathBuf,
    xskgate: PathBuf,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Lab {
    /// Makes the namespaces, links and routes, and writes [`SERVICE`].
    pub fn new(xskgate: &Path) -> Lab {
        let mut t = Topology::new();
        for ns in ["client", "gw", "pa"] {
            t.add_ns(ns);
        }
        t.link("client", "c0", "198.18.0.100/24", "gw", "g0", "198.18.0.1/24");
        t.link("gw", "g1", "198.19.1.1/24", "pa", "a0", "198.19.1.10/24");
        t.forwarding("gw");
        t.route("client", "198.18.100.0/24", "198.18.0.1");
        t.route("pa", "default", "198.19.1.1");
        let dir = std::env::temp_dir().join(format!("{}-manifests", t.prefix()));
        std::fs::create_dir_all(&dir).expect("manifest directory");
        std::fs::write(dir.join("services.yaml"), SERVICE).expect("manifest");
        Lab { t, dir, xskgate: xskgate.to_path_buf() }
    }

    /// `xskgate run` on the manifest directory, with `extra` flags.
    pub fn start(&self, extra: &[&str], log: &str) -> Daemon {
        let mut args = vec!["--manifests", self.dir.to_str().expect("a UTF-8 temporary directory")];
        args.extend_from_slice(extra);
        self.start_from(&args, log)
    }

    /// `xskgate run` with `source` (and other) flags, as gw1 on g0 and g1.
    pub fn start_from(&self, source: &[&str], log: &str) -> Daemon {
        self.try_start_from(source, log).unwrap_or_else(|e| panic!("{e}"))
    }

    /// As [`Lab::start_from`], the failure returned.
    ///
    /// # Errors
    /// The daemon did not come up (its log is in the error).
    pub fn try_start_from(&self, source: &[&str], log: &str) -> Result<Daemon, crate::DaemonError> {
        self.try_start_on(&["g0", "g1"], source, log)
    }

    /// As [`Lab::try_start_from`], attached only to the gateway interfaces
    /// `on` (short names).
    ///
    /// # Errors
    /// The daemon did not come up (its log is in the error).
    pub fn try_start_on(&self, on: &[&str], source: &[&str], log: &str) -> Result<Daemon, crate::DaemonError> {
        let interfaces = on.iter().map(|i| self.t.if_name(i)).collect::<Vec<_>>().join(",");
        let mut args = vec!["--node-name", "gw1", "--interfaces", &interfaces, "--cluster-cidr", "198.19.0.0/16"];
        args.extend_from_slice(source);
        Daemon::start(&self.xskgate, &self.t.ns_name("gw"), &args, &self.dir.join(log), Duration::from_secs(20))
    }

    /// One sample of the gateway's `/metrics`.
    pub fn metric(&self, sample: &str) -> u64 {
        let (_, text) = crate::reference::http_get(&self.t.ns_name("gw"), "http://127.0.0.1:10249/metrics".into())
            .expect("metrics answer");
        text.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no sample {sample} in /metrics"))
    }
}

/// A pod server on pod-a that keeps each TCP connection open: every line
/// it reads comes back, and it closes when the client does. It accepts
/// until `deadline` (its listener is non-blocking).
pub fn line_server(t: &Topology, port: u16, deadline: Instant) {
    let listener = in_ns(&t.ns_name("pa"), move || TcpListener::bind((POD, port)).expect("bind"));
    listener.set_nonblocking(true).expect("non-blocking listener");
    std::thread::spawn(move || {
        while Instant::now() < deadline {
            match listener.accept() {
                Ok((conn, _)) => {
                    std::thread::spawn(move || {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
                        let Ok(mut w) = conn.try_clone() else { return };
                        for line in BufReader::new(conn).lines() {
                            let Ok(line) = line else { break };
                            if writeln!(w, "{line}").is_err() {
                                break;
                            }
                        }
                        // EOF: the client closed; dropping closes our side.
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    });
}

/// `n` TCP connections to `to` opened in the client namespace at once
/// (one thread each), each given `timeout`; the ones that connected.
pub fn connect_all(t: &Topology, to: SocketAddr, n: usize, timeout: Duration) -> Vec<TcpStream> {
    spawn_in_ns(&t.ns_name("client"), move || {
        let tries: Vec<_> =
            (0..n).map(|_| std::thread::spawn(move || TcpStream::connect_timeout(&to, timeout).ok())).collect();
        tries.into_iter().filter_map(|h| h.join().ok().flatten()).collect::<Vec<_>>()
    })
    .join()
    .expect("connect thread")
}
