//! What a workload reports, and its two forms: lines for people, one JSON
//! object for scripts (`crates/bench/scripts/bench-compare.sh` reads its
//! keys).

use std::io::Write;

use serde::Serialize;

use crate::error::Error;
use crate::keys::Seed;

/// How the report is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Summary lines, each starting with the workload's name.
    Text,
    /// One JSON object on one line: `workload`, `endpoints`, `seed` (for
    /// workloads that draw random keys or values), the workload's fields,
    /// and `failure` if requests failed.
    Json,
}

/// A workload's report: its lines, its JSON fields (`F`, in the order
/// they are written) and whether requests failed.
#[derive(Debug)]
pub(crate) struct Report<F> {
    pub(crate) workload: &'static str,
    pub(crate) text: Vec<String>,
    pub(crate) fields: F,
    /// The seed the random choices came from, if there were any.
    pub(crate) seed: Option<Seed>,
    /// Set when requests failed: written, then the run fails.
    pub(crate) failure: Option<String>,
    /// How many times the run logged in again because a server refused
    /// its token (expired, or older than the server's users and roles).
    pub(crate) relogins: u64,
}

/// The JSON object: what every report has around the workload's fields.
#[derive(Serialize)]
struct Envelope<'a, F> {
    workload: &'static str,
    endpoints: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(flatten)]
    fields: &'a F,
    #[serde(skip_serializing_if = "is_zero")]
    relogins: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    failure: Option<&'a str>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl<F: Serialize> Report<F> {
    /// The report as `format`, ending in a newline.
    pub(crate) fn render(&self, endpoints: &[String], format: Format) -> Result<String, Error> {
        match format {
            Format::Text => {
                let mut out = String::new();
                for line in &self.text {
                    out.push_str(line);
                    out.push('\n');
                }
                if self.relogins > 0 {
                    out.push_str(&format!(
                        "{}: logged in again {} times (a server refused the token)\n",
                        self.workload, self.relogins
                    ));
                }
                if let Some(Seed(seed)) = self.seed {
                    out.push_str(&format!(
                        "{}: seed {seed} (repeat with --seed {seed})\n",
                        self.workload
                    ));
                }
                Ok(out)
            }
            Format::Json => {
                let envelope = Envelope {
                    workload: self.workload,
                    endpoints,
                    seed: self.seed.map(|Seed(s)| s),
                    fields: &self.fields,
                    relogins: self.relogins,
                    failure: self.failure.as_deref(),
                };
                let mut line = serde_json::to_string(&envelope)
                    .map_err(|e| Error::Write(std::io::Error::other(e)))?;
                line.push('\n');
                Ok(line)
            }
        }
    }

    /// Writes the report to `out`, then fails if requests failed. A closed
    /// pipe (`| head -1`) is the reader's choice, not an error.
    pub(crate) fn finish(
        self,
        endpoints: &[String],
        format: Format,
        mut out: impl Write,
    ) -> Result<(), Error> {
        let text = self.render(endpoints, format)?;
        match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(Error::Write(e)),
            _ => {}
        }
        match self.failure {
            Some(failure) => Err(Error::Failed {
                workload: self.workload,
                failure,
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Fields {
        b: u32,
        a: &'static str,
    }

    fn report(failure: Option<&str>) -> Report<Fields> {
        Report {
            workload: "put",
            text: vec!["put: one".into(), "put: two".into()],
            fields: Fields { b: 1, a: "x\"y\n" },
            seed: Some(Seed(42)),
            failure: failure.map(str::to_string),
            relogins: 0,
        }
    }

    #[test]
    fn json_keeps_the_field_order_and_escapes() {
        let endpoints = ["http://h:1".to_string()];
        assert_eq!(
            report(Some("1 of 2 requests failed"))
                .render(&endpoints, Format::Json)
                .unwrap(),
            "{\"workload\":\"put\",\"endpoints\":[\"http://h:1\"],\"seed\":42,\"b\":1,\
             \"a\":\"x\\\"y\\n\",\"failure\":\"1 of 2 requests failed\"}\n"
        );
    }

    #[test]
    fn text_ends_with_the_seed() {
        assert_eq!(
            report(None).render(&[], Format::Text).unwrap(),
            "put: one\nput: two\nput: seed 42 (repeat with --seed 42)\n"
        );
    }

    #[test]
    fn logins_again_are_reported_when_there_were_any() {
        let mut again = report(None);
        again.relogins = 2;
        let text = again.render(&[], Format::Text).unwrap();
        assert!(text.contains("put: logged in again 2 times"), "{text}");
        let json = again.render(&[], Format::Json).unwrap();
        assert!(json.contains("\"relogins\":2"), "{json}");
        let json = report(None).render(&[], Format::Json).unwrap();
        assert!(!json.contains("relogins"), "{json}");
    }

    #[test]
    fn failures_fail_after_the_report_is_written() {
        let mut out = Vec::new();
        let err = report(Some("boom")).finish(&[], Format::Text, &mut out);
        assert!(matches!(
            err,
            Err(Error::Failed {
                workload: "put",
                ..
            })
        ));
        assert!(String::from_utf8(out).unwrap().starts_with("put: one\n"));
        assert!(report(None).finish(&[], Format::Json, Vec::new()).is_ok());
    }
}
