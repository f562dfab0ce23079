//! Go programs as test peers: build a `main` package from a directory with
//! the Go toolchain and Debian's Go libraries, run it as a child process,
//! read what it prints.
//!
//! Interop tests run the real Go code of another registry's library (etcd's
//! naming package, say) against muster. There is no module proxy and no
//! network: programs are built in GOPATH mode (`GO111MODULE=off`) against
//! the source trees Debian's `golang-*-dev` packages install under
//! `/usr/share/gocode` (Debian's `golang-etcd-server-dev` carries etcd
//! 3.4's `clientv3`). The programs import packages as they would in a
//! GOPATH project; they need no `go.mod`.
//!
//! * [`require_go`] checks that `go` runs and that the packages a test
//!   needs are installed; without them the test is skipped loudly, or fails
//!   when `MUSTER_REQUIRE_GO=1`.
//! * [`GoProgram::build`] builds a directory once per test process (later
//!   calls return the same binary) into a cache under cargo's target
//!   directory, `target/go-interop/` (the first build of etcd's client
//!   takes half a minute on two cores; Go's build cache, kept there too,
//!   makes the next process's build a matter of seconds).
//! * [`GoProcess`] is the running program: its stdout lines are collected
//!   as they come, its stderr is kept (the last lines) for failure
//!   messages, and it is killed when dropped. Its stdin is a pipe that only
//!   [`GoProcess::close_stdin`] (or the test process's death) closes, so a
//!   program that stops at end of input never outlives the test.
//!
//! Environment variables:
//! * `MUSTER_REQUIRE_GO=1`: make [`require_go`] panic instead of skipping.
//! * `MUSTER_GO_BIN`: the `go` command (default `go` from `PATH`).
//! * `MUSTER_GOPATH`: `:`-separated GOPATH roots holding the libraries
//!   (default `/usr/share/gocode`).
//! * `MUSTER_GO_CACHE`: where binaries and Go's build cache go (default
//!   `go-interop/` in cargo's target directory).
//!
//! Other `GO*` variables of the test process (`GOFLAGS`, `GOPATH`,
//! `GOOS`, ...) are not passed on to the build, so a developer's Go setup
//! does not change what is built; `GOROOT` is.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::hash::{Hash, Hasher};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};
use std::{env, fs, thread};

use crate::DEADLINE;

/// Where Debian installs its Go libraries' sources (`src/` below it).
pub const DEBIAN_GOPATH: &str = "/usr/share/gocode";

/// How many of a program's stderr lines are kept for failure messages.
const STDERR_TAIL: usize = 200;

fn go_bin() -> OsString {
    env::var_os("MUSTER_GO_BIN").unwrap_or_else(|| "go".into())
}

/// The GOPATH roots the libraries are read from (`MUSTER_GOPATH`, else
/// [`DEBIAN_GOPATH`]).
pub fn gopath_roots() -> Vec<PathBuf> {
    match env::var_os("MUSTER_GOPATH") {
        Some(roots) if !roots.is_empty() => env::split_paths(&roots).collect(),
        _ => vec![PathBuf::from(DEBIAN_GOPATH)],
    }
}

/// The `go version` line, if `go` runs (computed once).
pub fn go_version() -> Option<&'static str> {
    static VERSION: OnceLock<Option<String>> = OnceLock::new();
    VERSION
        .get_or_init(|| {
            let out = Command::new(go_bin())
                .arg("version")
                .env("GOTOOLCHAIN", "local")
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
        .as_deref()
}

/// Whether `go` runs.
pub fn go_available() -> bool {
    go_version().is_some()
}

/// The import paths among `packages` found in no GOPATH root.
fn missing_packages<'a>(packages: &[&'a str]) -> Vec<&'a str> {
    let roots = gopath_roots();
    packages
        .iter()
        .copied()
        .filter(|p| !roots.iter().any(|r| r.join("src").join(p).is_dir()))
        .collect()
}

/// For tests: `Some(())` if `go` runs and every one of `packages` (Go
/// import paths, e.g. `go.etcd.io/etcd/clientv3/naming/resolver`) is in a
/// GOPATH root ([`gopath_roots`]).
///
/// Otherwise: when `MUSTER_REQUIRE_GO=1` is set, panics saying what is
/// missing; else prints a loud warning to stderr and returns `None`. `install`
/// says how to get the packages (e.g. `apt-get install
/// golang-etcd-server-dev`). Usage:
///
/// ```no_run
/// let Some(()) = muster_testkit::require_go(
///     &["go.etcd.io/etcd/clientv3"],
///     "apt-get install golang-etcd-server-dev",
/// ) else {
///     return;
/// };
/// ```
pub fn require_go(packages: &[&str], install: &str) -> Option<()> {
    let problem = if !go_available() {
        format!(
            "{:?} does not run (install golang-go, e.g. `apt-get install golang-go`, \
             or point MUSTER_GO_BIN at a go binary)",
            go_bin()
        )
    } else {
        let missing = missing_packages(packages);
        if missing.is_empty() {
            return Some(());
        }
        format!(
            "Go packages {} are not in {} ({install}, or point MUSTER_GOPATH at a GOPATH holding them)",
            missing.join(", "),
            env::join_paths(gopath_roots())
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default()
        )
    };
    let current = thread::current();
    let test = current.name().unwrap_or("<unnamed>");
    if env::var("MUSTER_REQUIRE_GO").as_deref() == Ok("1") {
        panic!("test `{test}` requires Go (MUSTER_REQUIRE_GO=1): {problem}");
    }
    let bar = "!".repeat(78);
    // Straight to stderr: libtest captures eprintln! of passing tests, and
    // a skip must be seen.
    let _ = writeln!(
        io::stderr().lock(),
        "\n{bar}\n\
         !! SKIPPED: test `{test}` did NOT run: {problem}.\n\
         !! Set MUSTER_REQUIRE_GO=1 to turn this skip into a failure.\n\
         {bar}"
    );
    None
}

/// Where built programs and Go's build cache are kept: `MUSTER_GO_CACHE`,
/// else `go-interop/` in cargo's target directory (found from the running
/// test binary, `target/<profile>/deps/<test>`), else the temp directory.
pub fn go_cache_dir() -> PathBuf {
    if let Some(dir) = env::var_os("MUSTER_GO_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let target = env::current_exe().ok().and_then(|exe| {
        let deps = exe.parent()?;
        // target/<profile>/deps/<binary>; examples and build scripts sit
        // one level up, without deps/.
        let profile = if deps.file_name() == Some(OsStr::new("deps")) {
            deps.parent()?
        } else {
            deps
        };
        Some(profile.parent()?.to_path_buf())
    });
    target.unwrap_or_else(env::temp_dir).join("go-interop")
}

/// A Go program built by [`GoProgram::build`].
#[derive(Debug, Clone)]
pub struct GoProgram {
    name: String,
    path: PathBuf,
}

impl GoProgram {
    /// Builds the `main` package in `dir` (`go build` in GOPATH mode
    /// against [`gopath_roots`], without cgo) into [`go_cache_dir`], once
    /// per process: later calls for the same directory, from any thread,
    /// return the first build's result (concurrent calls wait for it).
    /// Check [`require_go`] first.
    ///
    /// The error carries the compiler's output.
    pub fn build(dir: impl AsRef<Path>) -> io::Result<GoProgram> {
        type Built = BTreeMap<PathBuf, Result<GoProgram, (io::ErrorKind, String)>>;
        static BUILT: Mutex<Built> = Mutex::new(BTreeMap::new());
        let dir = fs::canonicalize(dir.as_ref()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("Go program directory {}: {e}", dir.as_ref().display()),
            )
        })?;
        // Held while building: one build at a time (two cores), and a
        // second caller for the same directory finds the first's result.
        let mut built = BUILT.lock().unwrap_or_else(PoisonError::into_inner);
        let result = built
            .entry(dir.clone())
            .or_insert_with(|| build_uncached(&dir).map_err(|e| (e.kind(), e.to_string())));
        result
            .clone()
            .map_err(|(kind, msg)| io::Error::new(kind, msg))
    }

    /// The program's name (its directory's).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The built binary.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts the program with `args` ([`GoProcess::spawn`]).
    pub fn spawn<I, S>(&self, args: I) -> io::Result<GoProcess>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(&self.path);
        cmd.args(args);
        GoProcess::spawn(&self.name, cmd)
    }
}

fn build_uncached(dir: &Path) -> io::Result<GoProgram> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "main".into());
    let cache = go_cache_dir();
    let bin_dir = cache.join("bin");
    let empty_gopath = cache.join("gopath");
    fs::create_dir_all(&bin_dir)?;
    fs::create_dir_all(&empty_gopath)?;
    // Two directories of the same name (in two checkouts) get two binaries.
    let mut hasher = std::hash::DefaultHasher::new();
    dir.hash(&mut hasher);
    let path = bin_dir.join(format!("{name}-{:016x}", hasher.finish()));
    // Built beside and renamed over: another test process may be running
    // the previous binary, which a rename leaves alone.
    let tmp = bin_dir.join(format!(".{name}.{}.tmp", std::process::id()));

    let mut gopath = vec![empty_gopath];
    gopath.extend(gopath_roots());
    let gopath = env::join_paths(gopath).map_err(io::Error::other)?;
    let mut cmd = Command::new(go_bin());
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("GO") && key != "GOROOT" {
            cmd.env_remove(&*key);
        }
    }
    // One compile at a time (`-p 1`, GOMAXPROCS=1): a cold build is
    // hardly slower (46 s instead of 39 s on two cores) and leaves a core
    // to the tests running meanwhile, whose deadlines are ticking.
    cmd.current_dir(dir)
        .args(["build", "-p", "1", "-trimpath", "-o"])
        .arg(&tmp)
        .arg(".")
        .env("GO111MODULE", "off")
        .env("GOPATH", gopath)
        .env("GOCACHE", cache.join("gocache"))
        .env("GOENV", "off")
        .env("GOPROXY", "off")
        .env("GOTOOLCHAIN", "local")
        // No C toolchain needed (golang-go only recommends gcc): net's
        // pure-Go resolver, std rebuilt once into GOCACHE.
        .env("CGO_ENABLED", "0")
        .env("GOMAXPROCS", "1")
        .stdin(Stdio::null());
    let started = Instant::now();
    let out = cmd.output().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("run {:?} (is golang-go installed?): {e}", go_bin()),
        )
    })?;
    if !out.status.success() {
        let _ = fs::remove_file(&tmp);
        return Err(io::Error::other(format!(
            "go build of {} failed ({}):\n{}{}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    fs::rename(&tmp, &path)?;
    tracing::info!(
        program = %name,
        took = ?started.elapsed(),
        path = %path.display(),
        "built Go program"
    );
    Ok(GoProgram { name, path })
}

/// What a process printed on stdout so far.
#[derive(Default)]
struct Lines {
    lines: Vec<String>,
    /// stdout reached its end (the process closed it or exited).
    closed: bool,
}

#[derive(Default)]
struct Stdout {
    lines: Mutex<Lines>,
    more: Condvar,
}

/// A running program (a Go one, typically; any will do): its stdout read
/// line by line, its stderr's last lines kept. Killed (`SIGKILL`) and
/// reaped when dropped.
///
/// Lines are taken in order: [`wait_line`](Self::wait_line) and
/// [`expect_line`](Self::expect_line) return the first matching line after
/// the last one they returned.
pub struct GoProcess {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Arc<Stdout>,
    stderr: Arc<Mutex<VecDeque<String>>>,
    /// Index of the first line not yet looked at by a match.
    cursor: usize,
    status: Option<ExitStatus>,
}

impl std::fmt::Debug for GoProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GoProcess")
            .field("name", &self.name)
            .field("pid", &self.child.id())
            .field("status", &self.status)
            .finish()
    }
}

impl GoProcess {
    /// Starts `cmd` with piped stdin, stdout and stderr; `name` is for
    /// messages. Threads collect stdout's lines and stderr's last lines
    /// (each stderr line is also logged at debug level).
    pub fn spawn(name: &str, mut cmd: Command) -> io::Result<GoProcess> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("start {name}: {e}")))?;
        let stdout = Arc::new(Stdout::default());
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(pipe) = child.stdout.take() {
            let stdout = Arc::clone(&stdout);
            thread::Builder::new()
                .name(format!("{name}-stdout"))
                .spawn(move || {
                    for line in BufReader::new(pipe).lines() {
                        let Ok(line) = line else { break };
                        let mut lines = stdout.lines.lock().unwrap_or_else(PoisonError::into_inner);
                        lines.lines.push(line.trim_end().to_string());
                        stdout.more.notify_all();
                    }
                    let mut lines = stdout.lines.lock().unwrap_or_else(PoisonError::into_inner);
                    lines.closed = true;
                    stdout.more.notify_all();
                })?;
        }
        if let Some(pipe) = child.stderr.take() {
            let stderr = Arc::clone(&stderr);
            let name = name.to_string();
            thread::Builder::new()
                .name(format!("{name}-stderr"))
                .spawn(move || {
                    for line in BufReader::new(pipe).lines() {
                        let Ok(line) = line else { break };
                        tracing::debug!(program = %name, "{line}");
                        let mut tail = stderr.lock().unwrap_or_else(PoisonError::into_inner);
                        if tail.len() == STDERR_TAIL {
                            tail.pop_front();
                        }
                        tail.push_back(line);
                    }
                })?;
        }
        tracing::debug!(program = %name, pid = child.id(), "started");
        Ok(GoProcess {
            name: name.to_string(),
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
            cursor: 0,
            status: None,
        })
    }

    /// Its name, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Every line it printed on stdout so far.
    pub fn lines(&self) -> Vec<String> {
        self.stdout
            .lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .lines
            .clone()
    }

    /// The first line after the last one returned that satisfies `pred`,
    /// if it has been printed already (the lines before it are passed
    /// over). Does not wait.
    pub fn try_line(&mut self, mut pred: impl FnMut(&str) -> bool) -> Option<String> {
        let lines = self
            .stdout
            .lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let found = lines.lines[self.cursor..]
            .iter()
            .position(|l| pred(l))
            .map(|i| self.cursor + i);
        found.map(|i| {
            self.cursor = i + 1;
            lines.lines[i].clone()
        })
    }

    /// [`try_line`](Self::try_line), waiting (blocking the thread) up to
    /// `timeout` for such a line. Fails when the time is up or stdout
    /// ends first, saying what it printed.
    pub fn wait_line(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> io::Result<String> {
        let deadline = Instant::now() + timeout;
        let stdout = Arc::clone(&self.stdout);
        let mut lines = stdout.lines.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(i) = lines.lines[self.cursor..].iter().position(|l| pred(l)) {
                let i = self.cursor + i;
                self.cursor = i + 1;
                return Ok(lines.lines[i].clone());
            }
            let now = Instant::now();
            if lines.closed || now >= deadline {
                let why = if lines.closed {
                    "its stdout ended"
                } else {
                    "timed out"
                };
                let kind = if lines.closed {
                    io::ErrorKind::UnexpectedEof
                } else {
                    io::ErrorKind::TimedOut
                };
                let seen = lines.lines[self.cursor..].to_vec();
                drop(lines);
                return Err(io::Error::new(kind, self.report(why, &seen)));
            }
            lines = stdout
                .more
                .wait_timeout(lines, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// [`try_line`](Self::try_line), polled (without blocking the async
    /// runtime) until such a line comes.
    ///
    /// # Panics
    /// After [`DEADLINE`], or when stdout ends first, with `what` was
    /// expected, the lines it printed meanwhile and its stderr's tail.
    pub async fn expect_line(&mut self, what: &str, mut pred: impl FnMut(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            if let Some(line) = self.try_line(&mut pred) {
                return line;
            }
            let closed = self
                .stdout
                .lines
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .closed;
            if closed || start.elapsed() >= DEADLINE {
                // One last look: the line may have come with the end.
                if let Some(line) = self.try_line(&mut pred) {
                    return line;
                }
                let seen = self.lines()[self.cursor..].to_vec();
                let why = if closed {
                    "its stdout ended"
                } else {
                    "timed out"
                };
                panic!("waiting for {what}: {}", self.report(why, &seen));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Writes `line` and a newline to its stdin. Fails once stdin is
    /// closed ([`close_stdin`](Self::close_stdin)) or the program has
    /// stopped reading it.
    pub fn send_line(&mut self, line: &str) -> io::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "its stdin is closed"))?;
        stdin.write_all(format!("{line}\n").as_bytes())?;
        stdin.flush()
    }

    /// Closes its stdin (a program that stops at end of input stops).
    /// Idempotent.
    pub fn close_stdin(&mut self) {
        self.stdin.take();
    }

    /// Its exit status, if it has exited (reaping it). Does not wait.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }

    /// Closes its stdin and waits (blocking the thread) up to `timeout`
    /// for it to exit; kills it if it has not by then, and fails.
    pub fn stop(&mut self, timeout: Duration) -> io::Result<ExitStatus> {
        self.close_stdin();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    self.report("did not exit after its stdin was closed", &[]),
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Closes its stdin and waits (polling, without blocking the async
    /// runtime) for it to exit.
    ///
    /// # Panics
    /// If it has not exited after [`DEADLINE`] (it is killed first).
    pub async fn expect_stopped(&mut self) -> ExitStatus {
        self.close_stdin();
        let start = Instant::now();
        loop {
            match self.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if start.elapsed() < DEADLINE => {}
                Ok(None) => {
                    self.kill();
                    panic!(
                        "{}",
                        self.report("did not exit after its stdin was closed", &[])
                    );
                }
                Err(e) => panic!("wait for {}: {e}", self.name),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills it (`SIGKILL`: no clean-up of its own) and reaps it.
    /// Idempotent.
    pub fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
            tracing::debug!(program = %self.name, "killed");
        }
    }

    /// The last `n` lines it wrote to stderr.
    pub fn stderr_tail(&self, n: usize) -> String {
        let tail = self.stderr.lock().unwrap_or_else(PoisonError::into_inner);
        let skip = tail.len().saturating_sub(n);
        tail.iter()
            .skip(skip)
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn report(&mut self, why: &str, seen: &[String]) -> String {
        let status = match self.try_wait() {
            Ok(Some(status)) => format!("exited: {status}"),
            Ok(None) => "still running".to_string(),
            Err(e) => format!("status unknown: {e}"),
        };
        format!(
            "{} (pid {}, {status}): {why}\n--- stdout since the last match:\n{}\n--- stderr (tail):\n{}",
            self.name,
            self.child.id(),
            seen.join("\n"),
            self.stderr_tail(40)
        )
    }
}

impl Drop for GoProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo() -> Option<GoProgram> {
        require_go(&[], "")?;
        Some(
            GoProgram::build(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/go/echo"))
                .unwrap_or_else(|e| panic!("{e}")),
        )
    }

    fn stderr_eventually(go: &GoProcess, text: &str) {
        let start = Instant::now();
        while !go.stderr_tail(10).contains(text) {
            assert!(
                start.elapsed() < DEADLINE,
                "no {text:?} on stderr: {}",
                go.stderr_tail(10)
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_program_is_built_once_and_talks_over_its_pipes() {
        let Some(echo) = echo() else { return };
        let modified = fs::metadata(echo.path()).unwrap().modified().unwrap();
        let again =
            GoProgram::build(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/go/echo/")).unwrap();
        assert_eq!(again.path(), echo.path());
        assert_eq!(
            fs::metadata(again.path()).unwrap().modified().unwrap(),
            modified,
            "built again"
        );
        assert_eq!(echo.name(), "echo");
        assert!(echo.path().starts_with(go_cache_dir()));

        let mut go = echo.spawn(["a", "b"]).unwrap();
        assert_eq!(
            go.wait_line(DEADLINE, |l| l.starts_with("hello")).unwrap(),
            "hello a b"
        );
        go.send_line("x").unwrap();
        go.send_line("y").unwrap();
        // Lines are taken in order: "got x" is passed over for "got y",
        // and not found after it.
        assert_eq!(go.wait_line(DEADLINE, |l| l == "got y").unwrap(), "got y");
        assert!(go.try_line(|l| l == "got x").is_none());
        go.close_stdin();
        assert!(go.send_line("z").is_err());
        go.wait_line(DEADLINE, |l| l == "bye").unwrap();
        assert!(go.stop(DEADLINE).unwrap().success());
        assert_eq!(go.lines(), ["hello a b", "got x", "got y", "bye"]);
        stderr_eventually(&go, "echo: on stderr");
    }

    #[test]
    fn waiting_fails_when_stdout_ends_or_time_is_up_saying_what_came() {
        let Some(echo) = echo() else { return };
        let mut go = echo.spawn(["c"]).unwrap();
        go.wait_line(DEADLINE, |l| l == "hello c").unwrap();
        stderr_eventually(&go, "echo: on stderr");
        let err = go
            .wait_line(Duration::from_millis(100), |l| l == "never")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("echo: on stderr"), "{err}");
        assert!(err.to_string().contains("still running"), "{err}");

        go.close_stdin();
        let err = go.wait_line(DEADLINE, |l| l == "never").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(err.to_string().contains("bye"), "{err}");
    }

    #[test]
    fn a_program_that_does_not_stop_is_killed() {
        let Some(echo) = echo() else { return };
        let mut go = echo.spawn(["-ignore-eof"]).unwrap();
        go.wait_line(DEADLINE, |l| l.starts_with("hello")).unwrap();
        let err = go.stop(Duration::from_millis(200)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let status = go.try_wait().unwrap().expect("killed and reaped");
        assert!(!status.success());
    }

    #[tokio::test]
    async fn async_waits_and_kill_on_drop() {
        let Some(echo) = echo() else { return };
        let mut go = echo.spawn(["d"]).unwrap();
        go.expect_line("the greeting", |l| l == "hello d").await;
        assert!(go.expect_stopped().await.success());

        let mut go = echo.spawn(["-ignore-eof"]).unwrap();
        go.expect_line("the greeting", |l| l.starts_with("hello"))
            .await;
        let proc_dir = PathBuf::from(format!("/proc/{}", go.id()));
        assert!(proc_dir.exists());
        drop(go);
        assert!(!proc_dir.exists(), "still running after drop");
    }

    #[test]
    fn a_build_error_carries_the_compiler_output_once() {
        let Some(()) = require_go(&[], "") else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("main.go"),
            "package main\n\nfunc main() { nope }\n",
        )
        .unwrap();
        let err = GoProgram::build(dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("main.go") && msg.contains("nope"), "{msg}");
        // Not built again: the same error, even once the source is fixed.
        fs::write(
            dir.path().join("main.go"),
            "package main\n\nfunc main() {}\n",
        )
        .unwrap();
        assert_eq!(GoProgram::build(dir.path()).unwrap_err().to_string(), msg);
        let missing = GoProgram::build(dir.path().join("absent")).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }
}
