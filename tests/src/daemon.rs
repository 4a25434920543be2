//! `xskgate run` in a test namespace: a child process whose log goes to a
//! file, started and waited for in one place for the tests, the lab and
//! the e2e benchmark. It is stopped when dropped (SIGTERM, then SIGKILL
//! after 5 s).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Why a daemon did not come up.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot create the log {}: {source}", path.display())]
    Log { path: PathBuf, source: std::io::Error },
    #[error("cannot start {}: {source}", xskgate.display())]
    Spawn { xskgate: PathBuf, source: std::io::Error },
    #[error("xskgate run exited ({status}):\n{log}")]
    Exited { status: ExitStatus, log: String },
    #[error("xskgate run did not publish its first table within {timeout:?}:\n{log}")]
    Timeout { timeout: Duration, log: String },
}

/// A running `xskgate run`.
pub struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `xskgate run ARGS` in the namespace named `ns` (its full
    /// name), its standard error into `log`, and waits up to `timeout` until
    /// it has published its first table.
    ///
    /// # Errors
    /// It could not be started, exited, or did not come up in time (its
    /// log is in the error).
    pub fn start(
        xskgate: &Path,
        ns: &str,
        args: &[&str],
        log: &Path,
        timeout: Duration,
    ) -> Result<Daemon, DaemonError> {
        let err = std::fs::File::create(log).map_err(|source| DaemonError::Log { path: log.to_path_buf(), source })?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(xskgate)
            .arg("run")
            .args(args)
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .map_err(|source| DaemonError::Spawn { xskgate: xskgate.to_path_buf(), source })?;
        let mut d = Daemon { child, log: log.to_path_buf() };
        let deadline = Instant::now() + timeout;
        while !d.log_text().contains("first table published") {
            if let Ok(Some(status)) = d.child.try_wait() {
                return Err(DaemonError::Exited { status, log: d.log_text() });
            }
            if Instant::now() > deadline {
                return Err(DaemonError::Timeout { timeout, log: d.log_text() });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(d)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon's process id (`ip netns exec` execs xskgate, so the child
    /// is the daemon itself).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (as `kill` takes it: `TERM`, `KILL`, …) and waits for
    /// the exit.
    ///
    /// # Errors
    /// `kill` could not be run, or waiting failed.
    pub fn signal_and_wait(&mut self, signal: &str) -> std::io::Result<ExitStatus> {
        Command::new("kill").args([format!("-{signal}"), self.pid().to_string()]).status()?;
        self.child.wait()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
