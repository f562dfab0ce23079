//! Headless Chromium for browser tests: finding `chromium` and
//! `chromedriver` (Debian's `chromium` and `chromium-driver`), skipping
//! loudly without them unless `MUSTER_REQUIRE_BROWSER=1`, and chromedriver
//! on a free loopback port. `MUSTER_CHROMIUM` and `MUSTER_CHROMEDRIVER`
//! name other binaries. The WebDriver session itself is the test's (with
//! its own client crate).

use std::ffi::OsString;
use std::io::Write;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::DEADLINE;

/// A binary from the environment variable or `PATH`.
pub fn find_binary(var: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(var) {
        return Some(PathBuf::from(path)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin"));
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

/// Chromium and chromedriver, or `None` (skipped loudly) when either is
/// missing and `MUSTER_REQUIRE_BROWSER` is not set.
pub fn browser_binaries() -> Option<(PathBuf, PathBuf)> {
    let chromium = find_binary("MUSTER_CHROMIUM", &["chromium", "chromium-browser"]);
    let driver = find_binary("MUSTER_CHROMEDRIVER", &["chromedriver"]);
    match (chromium, driver) {
        (Some(chromium), Some(driver)) => Some((chromium, driver)),
        (chromium, driver) => {
            let msg = format!(
                "headless browser test needs chromium and chromedriver \
                 (apt-get install chromium chromium-driver); found chromium: {chromium:?}, \
                 chromedriver: {driver:?}"
            );
            if std::env::var_os("MUSTER_REQUIRE_BROWSER").is_some_and(|v| v == "1") {
                panic!("{msg}");
            }
            // Written to the real stderr (not `eprintln!`) so libtest's
            // output capture does not hide it for a passing test.
            let bar = "!".repeat(78);
            let _ = writeln!(
                std::io::stderr().lock(),
                "\n{bar}\n!! SKIPPED: the headless browser test did NOT run.\n\
                 !! {msg}\n\
                 !! Set MUSTER_REQUIRE_BROWSER=1 to turn this skip into a failure.\n{bar}"
            );
            None
        }
    }
}

/// chromedriver on a free loopback port; killed when dropped.
#[derive(Debug)]
pub struct ChromeDriver {
    child: Child,
    /// The port it listens on.
    pub port: u16,
}

impl ChromeDriver {
    /// Starts `binary`, logging to `log`, and waits until it listens.
    pub fn start(binary: &Path, log: &Path) -> ChromeDriver {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new(binary)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let driver = ChromeDriver { child, port };
        let start = Instant::now();
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            assert!(
                start.elapsed() < DEADLINE,
                "chromedriver did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        driver
    }

    /// Its WebDriver URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
