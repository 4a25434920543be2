//! A gateway restarted under load, measured as a client sees it: long-lived
//! TCP connections through a Cluster (SNAT) Service, each sending a line
//! every 10 ms and reading it back from the pod, while `xskgate run` is
//! stopped (SIGTERM or `kill -9`) and started again with the same flags.
//! A connection survives when every one of its requests is answered, none
//! reset or timed out; its gap is the longest time between two answers.
//!
//! With `--state-dir` the conntrack table is in a file on `/dev/shm` and
//! the XDP links are pinned on a BPF file system the measurement mounts for
//! itself (under the run's prefix, unmounted at the end, which detaches
//! what was pinned there). Used by the restart test
//! (`control/tests/restart.rs`) and `xskgate-bench restart`.

use crate::single::{Lab, VIP, connect_all, line_server};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How the running gateway is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM: it stops in order.
    Term,
    /// SIGKILL: nothing of it runs after the signal.
    Kill,
}

impl Stop {
    fn signal(self) -> &'static str {
        match self {
            Stop::Term => "TERM",
            Stop::Kill => "KILL",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Stop::Term => "sigterm",
            Stop::Kill => "kill -9",
        }
    }
}

/// One measurement's parameters.
#[derive(Clone, Debug)]
pub struct Options {
    pub connections: usize,
    pub stop: Stop,
    /// Run with `--state-dir` (and `--bpf-pin-dir`); without, the baseline
    /// of a gateway that keeps nothing.
    pub keep_state: bool,
    /// `--conntrack-max` of both processes.
    pub conntrack_max: usize,
    /// Load before the restart and after the successor is up.
    pub settle: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            connections: 200,
            stop: Stop::Term,
            keep_state: true,
            conntrack_max: 65_536,
            settle: Duration::from_secs(2),
        }
    }
}

/// What the client saw, and what the gateways said.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub connections: usize,
    pub survived: usize,
    /// The longest time between two answers on a connection that survived
    /// (0 when none did).
    pub max_gap_ms: u64,
    /// Requests answered, over all connections.
    pub answered: u64,
    /// The first failure of a connection that did not survive, if any.
    pub first_failure: Option<String>,
    /// From the signal to the successor's first published table.
    pub restart_ms: u64,
    /// Flows the successor resumed from the file (`None` without state).
    pub resumed_flows: Option<u64>,
    /// Frames the predecessor's program dropped in the gap (`None` without
    /// state).
    pub held_frames: Option<u64>,
    /// From the successor's start to its taking over the interfaces
    /// (`None` without state).
    pub takeover_ms: Option<u64>,
    /// The successor's start-up, as it logged it: (phase, ms) for reading
    /// the FIB, the conntrack table, loading the program, opening the
    /// sockets, and the whole start.
    pub startup_ms: Vec<(&'static str, u64)>,
}

impl Report {
    pub fn survived_fraction(&self) -> f64 {
        if self.connections == 0 { 0.0 } else { self.survived as f64 / self.connections as f64 }
    }
}

/// A BPF file system mounted for one run, unmounted (its pins gone) on drop,
/// and the state directory on `/dev/shm`, removed on drop.
pub struct State {
    bpffs: PathBuf,
    state_dir: PathBuf,
}

impl State {
    /// Mounts the BPF file system under the run's `prefix`.
    ///
    /// # Errors
    /// `mount` failed (not root, no bpffs in the kernel).
    pub fn new(prefix: &str) -> Result<State, String> {
        let bpffs = std::env::temp_dir().join(format!("{prefix}-bpffs"));
        std::fs::create_dir_all(&bpffs).map_err(|e| format!("creating {}: {e}", bpffs.display()))?;
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&bpffs)
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            let _ = std::fs::remove_dir(&bpffs);
            return Err(format!(
                "mount -t bpf bpf {}: {}",
                bpffs.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        Ok(State { bpffs, state_dir: base.join(format!("{prefix}-state")) })
    }
}

impl State {
    /// `--state-dir DIR --bpf-pin-dir PIN` for `xskgate run`.
    pub fn args(&self) -> [String; 4] {
        [
            "--state-dir".into(),
            self.state_dir.display().to_string(),
            "--bpf-pin-dir".into(),
            self.bpffs.join("xskgate").display().to_string(),
        ]
    }
}

impl Drop for State {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.bpffs).status();
        let _ = std::fs::remove_dir(&self.bpffs);
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// What one connection's driver saw.
struct Seen {
    answered: u64,
    max_gap: Duration,
    failure: Option<String>,
}

/// Sends a line every 10 ms on `conn` and reads it back, until `stop`.
fn drive(i: usize, conn: TcpStream, stop: Arc<AtomicBool>) -> Seen {
    let mut seen = Seen { answered: 0, max_gap: Duration::ZERO, failure: None };
    if let Err(e) = conn.set_read_timeout(Some(Duration::from_secs(20))) {
        seen.failure = Some(format!("connection {i}: {e}"));
        return seen;
    }
    let mut w = match conn.try_clone() {
        Ok(w) => w,
        Err(e) => {
            seen.failure = Some(format!("connection {i}: {e}"));
            return seen;
        }
    };
    let mut r = BufReader::new(conn);
    let mut last = Instant::now();
    let mut line = String::new();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let want = format!("{i} {seq}");
        line.clear();
        let result = writeln!(w, "{want}").and_then(|()| r.read_line(&mut line));
        match result {
            Ok(0) => {
                seen.failure = Some(format!("connection {i}: closed by the peer after {} answers", seen.answered));
                break;
            }
            Ok(_) if line.trim_end() == want => {
                let now = Instant::now();
                seen.max_gap = seen.max_gap.max(now - last);
                last = now;
                seen.answered += 1;
            }
            Ok(_) => {
                seen.failure = Some(format!("connection {i}: answer {:?} to {want:?}", line.trim_end()));
                break;
            }
            Err(e) => {
                seen.failure = Some(format!("connection {i}: {e} after {} answers", seen.answered));
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    seen
}

/// The first `key=<number>` of `log`'s line that contains `marker`.
fn logged(log: &str, marker: &str, key: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains(marker))?;
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    line[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Runs one restart under load (see the module documentation).
///
/// # Errors
/// The lab could not be set up, a gateway did not start, or not every
/// connection opened before the restart.
pub fn measure(xskgate: &Path, o: &Options) -> Result<Report, String> {
    let lab = Lab::new(xskgate);
    let state = if o.keep_state { Some(State::new(lab.t.prefix())?) } else { None };
    line_server(&lab.t, 8080, Instant::now() + o.settle * 4 + Duration::from_secs(90));
    let max = o.conntrack_max.to_string();
    let state_args = state.as_ref().map(State::args);
    let mut args = vec!["--manifests", lab.dir.to_str().ok_or("a non-UTF-8 temporary directory")?];
    args.extend(["--conntrack-max", &max]);
    args.extend(state_args.iter().flatten().map(String::as_str));
    let mut first = lab.try_start_from(&args, "first.log").map_err(|e| e.to_string())?;
    let vip: SocketAddr = format!("{VIP}:80").parse().expect("literal");
    let conns = connect_all(&lab.t, vip, o.connections, Duration::from_secs(5));
    if conns.len() != o.connections {
        return Err(format!("{} of {} connections opened before the restart", conns.len(), o.connections));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let drivers: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let stop = stop.clone();
            std::thread::spawn(move || drive(i, c, stop))
        })
        .collect();
    std::thread::sleep(o.settle);
    let signalled = Instant::now();
    let stopped = first.signal_and_wait(o.stop.signal());
    let second = lab.try_start_from(&args, "second.log");
    let restart_ms = signalled.elapsed().as_millis() as u64;
    let second = match (stopped, second) {
        (Ok(_), Ok(d)) => d,
        (Err(e), _) => {
            stop.store(true, Ordering::Relaxed);
            return Err(format!("stopping the first gateway: {e}"));
        }
        (_, Err(e)) => {
            stop.store(true, Ordering::Relaxed);
            return Err(format!("the second gateway: {e}"));
        }
    };
    std::thread::sleep(o.settle);
    stop.store(true, Ordering::Relaxed);
    let seen: Vec<Seen> = drivers.into_iter().map(|d| d.join().expect("driver thread")).collect();
    let log = second.log_text();
    let survivors = seen.iter().filter(|s| s.failure.is_none());
    Ok(Report {
        connections: o.connections,
        survived: survivors.clone().count(),
        max_gap_ms: survivors.map(|s| s.max_gap.as_millis() as u64).max().unwrap_or(0),
        answered: seen.iter().map(|s| s.answered).sum(),
        first_failure: seen.iter().find_map(|s| s.failure.clone()),
        restart_ms,
        resumed_flows: state.as_ref().map(|_| logged(&log, "conntrack table resumed", "flows").unwrap_or(0)),
        held_frames: state.as_ref().map(|_| lab.metric("xskgate_xdp_frames_total{decision=\"held\"}")),
        takeover_ms: state.as_ref().and_then(|_| logged(&log, "took over from the predecessor", "since_start_ms")),
        startup_ms: ["fib_ms", "conntrack_ms", "program_ms", "sockets_ms", "start_ms"]
            .into_iter()
            .filter_map(|k| logged(&log, "xskgate running", k).map(|v| (k, v)))
            .collect(),
    })
}
