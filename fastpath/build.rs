//! Compiles the XDP steering program (`bpf/steer.c`) with clang into
//! `$OUT_DIR/steer.o`, embedded by `io::steer`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("steer.o");
    println!("cargo:rerun-if-changed=bpf/steer.c");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let arch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("aarch64") => "aarch64-linux-gnu",
        _ => "x86_64-linux-gnu",
    };
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-I/usr/include/{arch}"))
        .args(["-c", "bpf/steer.c", "-o"])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("clang failed ({s}) compiling bpf/steer.c; needs Debian packages clang, libbpf-dev"),
        Err(e) => {
            panic!("cannot run {clang} ({e}): install Debian packages clang and libbpf-dev to build the XDP program")
        }
    }
}
