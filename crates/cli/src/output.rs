//! Printing for the operator subcommands: aligned tables, times, durations,
//! JSON lines, and registry errors worded for a terminal.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use muster::Etcd;

/// A table printed with columns aligned on two spaces, as `kubectl get`.
#[derive(Debug)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&str]) -> Table {
        Table {
            rows: vec![headers.iter().map(|h| h.to_string()).collect()],
        }
    }

    /// Adds a row (one cell per header).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text, one line per row, each ending in `\n`.
    pub fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut widths = vec![0; columns];
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                line.push_str(cell);
                if i + 1 < row.len() {
                    let pad = widths[i] - cell.chars().count() + 2;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Writes `text` to stdout. A closed pipe (`muster ls | head`) is not an
/// error worth a message; it ends the command quietly.
pub fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(BrokenPipe.into()),
        Err(e) => Err(anyhow::anyhow!("cannot write to stdout: {e}")),
    }
}

/// Prints one JSON value on one line.
pub fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    print(&format!("{value}\n"))
}

/// Stdout was closed by the reader; `main` exits quietly on it.
#[derive(Debug)]
pub struct BrokenPipe;

impl std::fmt::Display for BrokenPipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout closed")
    }
}

impl std::error::Error for BrokenPipe {}

/// `time` as RFC 3339 in UTC with milliseconds, e.g. `2025-03-01T12:00:05.250Z`.
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A short human duration: `850ms`, `7s`, `3m12s`, `2h05m`, `4d03h`.
pub fn human(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..86_400 => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{:02}h", secs / 86_400, secs % 86_400 / 3600),
    }
}

/// A registry error worded for the command line: an unreachable registry
/// names the endpoints that were tried.
pub fn registry_error(etcd: &Etcd, error: muster::Error) -> anyhow::Error {
    match error {
        muster::Error::Unavailable(_)
        | muster::Error::Timeout(_)
        | muster::Error::Outage { .. } => anyhow::anyhow!(
            "cannot reach the registry at {}: {error}",
            etcd.endpoints().join(", ")
        ),
        other => match auth_message(&other, Needs::Keys) {
            Some(message) => anyhow::anyhow!(message),
            None => other.into(),
        },
    }
}

/// What a refused request needed, for the advice on a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Permissions on keys: a role granting them.
    Keys,
    /// Managing users, roles or auth: the root role.
    Root,
}

/// A refusal of etcd's auth worded for the command line, with what to do
/// about it in muster's commands: no credentials while auth is on, wrong
/// ones, or a user whose roles do not allow the request. `None` for any
/// other error.
pub fn auth_message(error: &muster::Error, needs: Needs) -> Option<String> {
    match error {
        muster::Error::PermissionDenied { user, request } => {
            let what = if request.is_empty() {
                "do this"
            } else {
                request
            };
            Some(match (user, needs) {
                (None, Needs::Keys) => format!(
                    "etcdserver: permission denied: etcd has authentication enabled and no --user \
                     was given, so it may not {what}; give --user NAME:PASSWORD"
                ),
                (None, Needs::Root) => format!(
                    "etcdserver: permission denied: etcd has authentication enabled and no --user \
                     was given, so it may not {what}; use --user root:PASSWORD"
                ),
                (Some(user), Needs::Keys) => format!(
                    "etcdserver: permission denied: user {user:?} may not {what}; grant one of its \
                     roles that permission (muster role grant-permission, or muster role \
                     grant-service ROLE SERVICE; see muster user get {user} --detail), or use \
                     another --user"
                ),
                (Some(user), Needs::Root) => format!(
                    "etcdserver: permission denied: user {user:?} may not {what}: managing users, \
                     roles and auth needs the root role; use --user root:PASSWORD"
                ),
            })
        }
        muster::Error::AuthFailed(_) => Some(format!(
            "{error}; check the name and password given with --user"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(951_782_400_123); // leap day 2000
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.123Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_735_689_599); // last second of 2024
        assert_eq!(rfc3339(t), "2024-12-31T23:59:59.000Z");
    }

    #[test]
    fn durations() {
        assert_eq!(human(Duration::from_millis(850)), "850ms");
        assert_eq!(human(Duration::from_secs(7)), "7s");
        assert_eq!(human(Duration::from_secs(192)), "3m12s");
        assert_eq!(human(Duration::from_secs(7500)), "2h05m");
        assert_eq!(human(Duration::from_secs(4 * 86_400 + 3 * 3600)), "4d03h");
    }

    #[test]
    fn tables_align() {
        let mut t = Table::new(&["ID", "ADDRESS"]);
        t.row(vec!["a-long-id".into(), "x".into()]);
        t.row(vec!["b".into(), "".into()]);
        assert_eq!(t.render(), "ID         ADDRESS\na-long-id  x\nb\n");
    }
}
