//! Running `muster serve` as a child process in tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `muster serve` child, killed when dropped, and its HTTP address.
pub struct Serve(pub Child, pub String);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `muster serve` on `port` with `storage` flags (`--in-memory` or
/// `--data-dir DIR`) and waits for its ready line.
pub fn serve(port: u16, storage: &[&std::ffi::OsStr]) -> Serve {
    let mut child = Command::new(env!("CARGO_BIN_EXE_muster"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args(storage)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("muster serve starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("muster serve ready") {
                let http = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("http=http://"))
                    .unwrap_or_default()
                    .to_string();
                let _ = tx.send(http);
            }
        }
    });
    let http = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("muster serve prints its ready line");
    Serve(child, http)
}
