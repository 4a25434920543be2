//! A tiny echo server for test pods: on TCP and UDP port `--port`, answers
//! every request (a TCP connection's first line, or a datagram) with
//! `<pod name> <peer address>:<peer port>\n`, so a test sees which pod
//! answered and which source address the pod saw. HTTP GETs get the same
//! line as an HTTP/1.1 response, so curl works too. Runs until killed.

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
    let server = xskgate_tests::EchoServer::bind(&name, port).expect("bind TCP and UDP");
    println!("ready");
    server.serve(&std::sync::atomic::AtomicBool::new(false));
}
