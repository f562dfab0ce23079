//! Helpers the areas share: a client channel to a server, and the loud skip
//! of a test whose tool (etcd, etcdctl) is not installed.

use std::io::Write;
use std::process::{Command, Stdio};

use muster_server::Server;
use tonic::transport::Channel;

/// A connected channel to `server`.
pub async fn channel(server: &Server) -> Channel {
    Channel::from_shared(server.endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to the embedded server")
}

/// Whether `program` runs (`program version_arg` succeeds). Without it,
/// what needs it (`what`) is skipped loudly, or fails when
/// `MUSTER_REQUIRE_ETCD=1`; `install` says how to get it.
pub fn require_tool(program: &str, version_arg: &str, what: &str, install: &str) -> bool {
    let runs = Command::new(program)
        .arg(version_arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if runs {
        return true;
    }
    assert!(
        std::env::var("MUSTER_REQUIRE_ETCD").as_deref() != Ok("1"),
        "{program} is required for {what} ({install})"
    );
    // Straight to stderr: the test harness captures eprintln! of passing
    // tests, and a skip must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: {program} not on PATH; {what} did not run \
         ({install}, or set MUSTER_REQUIRE_ETCD=1 to fail instead)"
    );
    false
}
