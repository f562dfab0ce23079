//! Helpers of the testkit's own test binaries.

use std::process::Output;
use std::time::{Duration, Instant};

/// etcdctl's stdout, after asserting it succeeded.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "etcdctl failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `cond` every 20 ms until it holds; panics naming `what` after
/// `timeout`.
pub fn eventually(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
