//! A tiny echo server for test pods: on TCP and UDP port `--port`, answers
//! every request (a TCP connection's first line, or a datagram) with
//! `<pod name> <peer address>:<peer port>\n`, so a test sees which pod
//! answered and which source address the pod saw. HTTP GETs get the same
//! line as an HTTP/1.1 response, so curl works too. Runs until killed.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};

/// An IPv4-mapped peer as the IPv4 address it is.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut name, mut port) = (String::from("pod"), 8080u16);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--name" => name = args.next().expect("--name NAME"),
            "--port" => port = args.next().and_then(|p| p.parse().ok()).expect("--port PORT"),
            other => panic!("unknown argument {other}"),
        }
    }
    // [::] takes IPv4 too (IPv4-mapped) on Linux; peers are printed in
    // their own family.
    let tcp = TcpListener::bind(("::", port)).expect("bind TCP");
    let udp = UdpSocket::bind(("::", port)).expect("bind UDP");
    let udp_name = name.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((_, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(format!("{udp_name} {}\n", canonical(peer)).as_bytes(), peer);
        }
    });
    println!("ready");
    for conn in tcp.incoming().flatten() {
        let name = name.clone();
        std::thread::spawn(move || {
            let Ok(peer) = conn.peer_addr().map(canonical) else { return };
            let mut reader = BufReader::new(&conn);
            let mut first = String::new();
            if reader.read_line(&mut first).is_err() {
                return;
            }
            let line = format!("{name} {peer}\n");
            let mut w = &conn;
            if first.starts_with("GET ") {
                // Drain the request head, answer as HTTP/1.1 and close.
                let mut h = String::new();
                while reader.read_line(&mut h).is_ok_and(|n| n > 2) {
                    h.clear();
                }
                let _ =
                    write!(w, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{line}", line.len());
            } else {
                let _ = w.write_all(line.as_bytes());
            }
        });
    }
}
