//! A bounded UDP stream through a gateway, for the tests that count loss:
//! one client socket (one flow) sending about 2,000 datagrams per second to
//! an echo server, and a reader counting the answers. Both stop by
//! themselves: the sender at its time or datagram bound, the reader 2 s
//! after the last answer.

use crate::{UDP_RECEIVE_BUFFER, grow_receive_buffer, in_ns};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A running stream; [`UdpStream::finish`] stops it and counts.
pub struct UdpStream {
    stop: Arc<AtomicBool>,
    sender: JoinHandle<u64>,
    receiver: JoinHandle<u64>,
}

impl UdpStream {
    /// Starts a stream from namespace `ns` to `to`, at most `max_time` and
    /// `max_datagrams` long. The flow is made first (one datagram answered
    /// within 2 s: endpoint chosen, next hops resolved), so that loss
    /// counts only what the stream itself sends.
    ///
    /// # Errors
    /// The socket could not be made, or the first datagram had no answer.
    pub fn start(ns: &str, to: SocketAddr, max_time: Duration, max_datagrams: u64) -> std::io::Result<UdpStream> {
        let sock = in_ns(ns, move || -> std::io::Result<UdpSocket> {
            let bind = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            let s = UdpSocket::bind(bind)?;
            grow_receive_buffer(&s, UDP_RECEIVE_BUFFER)?;
            s.connect(to)?;
            Ok(s)
        })?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        sock.send(b"who")?;
        let mut buf = [0u8; 128];
        sock.recv(&mut buf)?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let sender = {
            let (s, stop) = (sock.try_clone()?, stop.clone());
            std::thread::spawn(move || {
                let (mut sent, start) = (0u64, Instant::now());
                while !stop.load(Ordering::Relaxed) && start.elapsed() < max_time && sent < max_datagrams {
                    if s.send(b"who").is_ok() {
                        sent += 1;
                    }
                    std::thread::sleep(Duration::from_micros(500));
                }
                sent
            })
        };
        let receiver = {
            let s = sock;
            std::thread::spawn(move || {
                let (mut got, mut quiet_since) = (0u64, Instant::now());
                let mut buf = [0u8; 128];
                loop {
                    match s.recv(&mut buf) {
                        Ok(_) => {
                            got += 1;
                            quiet_since = Instant::now();
                        }
                        Err(_) if quiet_since.elapsed() > Duration::from_secs(2) => return got,
                        Err(_) => {}
                    }
                }
            })
        };
        Ok(UdpStream { stop, sender, receiver })
    }

    /// Stops the stream and returns (datagrams sent, answers received),
    /// after the reader has waited 2 s for late answers.
    ///
    /// # Panics
    /// If a stream thread panicked.
    pub fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.sender.join().expect("sender");
        (sent, self.receiver.join().expect("receiver"))
    }
}
