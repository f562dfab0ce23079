//! The `--faults` specification: what to inject, how much and how often.
//!
//! A comma-separated list of `name=value` items, each fault at most once:
//!
//! | item | meaning |
//! | --- | --- |
//! | `latency=50ms` or `latency=50ms±20ms` (`+-` also accepted) | every request waits this long (uniformly within the jitter) before it is served |
//! | `drop-watch=1/min` (`N/PERIOD`) | on average N times per period, one open watch stream is cut |
//! | `unavailable=2s/30s` (`DURATION/PERIOD`) | once per period the registry refuses every request with `Unavailable` for the duration, and cuts every watch and keep-alive stream when the window opens |
//! | `compact=10s` | every period, the history is compacted at the current revision |
//! | `lease-expire-early=5%` | each lease grant or keep-alive dooms the lease with this probability: it expires at a random moment within its TTL, whatever keep-alives follow |
//! | `seed=42` | seeds the random choices, so that a run can be repeated |
//!
//! Durations are a number and a unit: `ms`, `s`, `m` or `min`, `h`. A
//! period may be written as a bare unit (`1/min` is once a minute).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A malformed `--faults` specification, saying which item and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--faults {item:?}: {reason}")]
pub struct FaultSpecError {
    /// The offending item (or the whole spec, when it is empty).
    pub item: String,
    /// What is wrong with it and what is expected.
    pub reason: String,
}

/// The names of the faults, as the specification and `/metrics` spell them.
pub const FAULT_NAMES: [&str; 5] = [
    "latency",
    "drop-watch",
    "unavailable",
    "compact",
    "lease-expire-early",
];

/// Extra time before every request is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latency {
    /// The mean added latency.
    pub base: Duration,
    /// At most this much more or less (uniform).
    pub jitter: Duration,
}

/// A fault that acts `times` times per `period` (on average).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// How many times per period.
    pub times: u32,
    /// The period.
    pub period: Duration,
}

/// A window of unavailability once per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outage {
    /// How long every request is refused.
    pub duration: Duration,
    /// How often a window opens (the first one period after start).
    pub period: Duration,
}

/// Every fault to inject; all off by default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultSpec {
    /// `latency=`.
    pub latency: Option<Latency>,
    /// `drop-watch=`.
    pub drop_watch: Option<Rate>,
    /// `unavailable=`.
    pub unavailable: Option<Outage>,
    /// `compact=`: the compaction period.
    pub compact: Option<Duration>,
    /// `lease-expire-early=`: the probability, in 0..=1.
    pub lease_expire_early: Option<f64>,
    /// `seed=`: the random seed (otherwise one drawn at start, and logged).
    pub seed: Option<u64>,
}

impl FaultSpec {
    /// Whether no fault is on.
    pub fn is_empty(&self) -> bool {
        self.latency.is_none()
            && self.drop_watch.is_none()
            && self.unavailable.is_none()
            && self.compact.is_none()
            && self.lease_expire_early.is_none()
    }
}

impl FromStr for FaultSpec {
    type Err = FaultSpecError;

    fn from_str(s: &str) -> Result<FaultSpec, FaultSpecError> {
        let mut spec = FaultSpec::default();
        let mut seen: Vec<&str> = Vec::new();
        for item in s.split(',').map(str::trim) {
            let err = |reason: String| FaultSpecError {
                item: item.to_string(),
                reason,
            };
            if item.is_empty() {
                return Err(FaultSpecError {
                    item: s.to_string(),
                    reason: "empty item; expected name=value items separated by commas".into(),
                });
            }
            let Some((name, value)) = item.split_once('=') else {
                return Err(err("expected name=value".into()));
            };
            let (name, value) = (name.trim(), value.trim());
            if seen.contains(&name) {
                return Err(err(format!("{name} is given twice")));
            }
            seen.push(name);
            match name {
                "latency" => {
                    let (base, jitter) = match split_jitter(value) {
                        Some((b, j)) => (b, Some(j)),
                        None => (value, None),
                    };
                    let base = duration(base).map_err(&err)?;
                    let jitter = jitter.map(duration).transpose().map_err(&err)?;
                    let jitter = jitter.unwrap_or(Duration::ZERO);
                    if jitter > base {
                        return Err(err(format!(
                            "the jitter ({jitter:?}) is larger than the latency ({base:?})"
                        )));
                    }
                    spec.latency = Some(Latency { base, jitter });
                }
                "drop-watch" => {
                    let (times, period) = value
                        .split_once('/')
                        .ok_or_else(|| err("expected N/PERIOD, e.g. 1/min or 3/30s".into()))?;
                    let times: u32 = times
                        .trim()
                        .parse()
                        .map_err(|_| err(format!("{times:?} is not a count; expected N/PERIOD")))?;
                    if times == 0 {
                        return Err(err("the count must be at least 1".into()));
                    }
                    let period = period_of(period.trim()).map_err(&err)?;
                    spec.drop_watch = Some(Rate { times, period });
                }
                "unavailable" => {
                    let (d, p) = value
                        .split_once('/')
                        .ok_or_else(|| err("expected DURATION/PERIOD, e.g. 2s/30s".into()))?;
                    let duration = duration(d.trim()).map_err(&err)?;
                    let period = period_of(p.trim()).map_err(&err)?;
                    if duration >= period {
                        return Err(err(format!(
                            "the outage ({duration:?}) must be shorter than its period ({period:?})"
                        )));
                    }
                    spec.unavailable = Some(Outage { duration, period });
                }
                "compact" => {
                    spec.compact = Some(period_of(value).map_err(&err)?);
                }
                "lease-expire-early" => {
                    let number = value
                        .strip_suffix('%')
                        .ok_or_else(|| err("expected a percentage, e.g. 5%".into()))?;
                    let percent: f64 = number
                        .trim()
                        .parse()
                        .map_err(|_| err(format!("{number:?} is not a number")))?;
                    if !(percent > 0.0 && percent <= 100.0) {
                        return Err(err("the percentage must be above 0 and at most 100".into()));
                    }
                    spec.lease_expire_early = Some(percent / 100.0);
                }
                "seed" => {
                    spec.seed = Some(value.parse().map_err(|_| {
                        err(format!("{value:?} is not a seed (an unsigned integer)"))
                    })?);
                }
                other => {
                    return Err(err(format!(
                        "unknown fault {other:?}; known: {}, and seed",
                        FAULT_NAMES.join(", ")
                    )));
                }
            }
        }
        if spec.is_empty() {
            return Err(FaultSpecError {
                item: s.to_string(),
                reason: format!("no fault given; known: {}", FAULT_NAMES.join(", ")),
            });
        }
        Ok(spec)
    }
}

impl fmt::Display for FaultSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut items = Vec::new();
        if let Some(l) = self.latency {
            if l.jitter.is_zero() {
                items.push(format!("latency={}", show(l.base)));
            } else {
                items.push(format!("latency={}±{}", show(l.base), show(l.jitter)));
            }
        }
        if let Some(r) = self.drop_watch {
            items.push(format!("drop-watch={}/{}", r.times, show(r.period)));
        }
        if let Some(o) = self.unavailable {
            items.push(format!(
                "unavailable={}/{}",
                show(o.duration),
                show(o.period)
            ));
        }
        if let Some(p) = self.compact {
            items.push(format!("compact={}", show(p)));
        }
        if let Some(p) = self.lease_expire_early {
            items.push(format!("lease-expire-early={}%", p * 100.0));
        }
        if let Some(seed) = self.seed {
            items.push(format!("seed={seed}"));
        }
        f.write_str(&items.join(","))
    }
}

/// `50ms±20ms` or `50ms+-20ms` into its two halves.
fn split_jitter(value: &str) -> Option<(&str, &str)> {
    value
        .split_once('±')
        .or_else(|| value.split_once("+-"))
        .map(|(a, b)| (a.trim(), b.trim()))
}

/// A period: a duration, or a bare unit meaning one of it (`min`).
fn period_of(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let d = if value.starts_with(|c: char| c.is_ascii_digit()) {
        duration(value)?
    } else {
        duration(&format!("1{value}"))?
    };
    if d.is_zero() {
        return Err("a period must be longer than zero".into());
    }
    Ok(d)
}

/// `250ms`, `2s`, `1.5s`, `5m`, `1min`, `1h`.
fn duration(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let split = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{value:?} has no unit; use ms, s, m or h"))?;
    let (number, unit) = value.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{value:?} is not a duration (a number, then ms, s, m or h)"))?;
    let seconds = match unit.trim() {
        "ms" => number / 1000.0,
        "s" => number,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        other => return Err(format!("{other:?} is not a unit; use ms, s, m or h")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{value:?} is out of range"))
}

/// A duration the way the specification writes it.
fn show(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) || ms == 0 {
        format!("{ms}ms")
    } else {
        format!("{}s", ms / 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_parses() {
        let spec: FaultSpec =
            "latency=50ms±20ms,drop-watch=1/min,unavailable=2s/30s,compact=10s,lease-expire-early=5%"
                .parse()
                .unwrap();
        assert_eq!(
            spec.latency,
            Some(Latency {
                base: Duration::from_millis(50),
                jitter: Duration::from_millis(20)
            })
        );
        assert_eq!(
            spec.drop_watch,
            Some(Rate {
                times: 1,
                period: Duration::from_secs(60)
            })
        );
        assert_eq!(
            spec.unavailable,
            Some(Outage {
                duration: Duration::from_secs(2),
                period: Duration::from_secs(30)
            })
        );
        assert_eq!(spec.compact, Some(Duration::from_secs(10)));
        assert_eq!(spec.lease_expire_early, Some(0.05));
        assert_eq!(spec.seed, None);
        // It prints back as it was written (with ± spelled out).
        assert_eq!(
            spec.to_string(),
            "latency=50ms±20ms,drop-watch=1/60s,unavailable=2s/30s,compact=10s,lease-expire-early=5%"
        );
        assert_eq!(spec.to_string().parse::<FaultSpec>().unwrap(), spec);
    }

    #[test]
    fn other_spellings() {
        let spec: FaultSpec = "latency=1.5s+-250ms, drop-watch=3/30s, seed=7"
            .parse()
            .unwrap();
        assert_eq!(spec.latency.unwrap().base, Duration::from_millis(1500));
        assert_eq!(spec.latency.unwrap().jitter, Duration::from_millis(250));
        assert_eq!(spec.drop_watch.unwrap().period, Duration::from_secs(30));
        assert_eq!(spec.seed, Some(7));
        let spec: FaultSpec = "latency=5ms,drop-watch=2/h".parse().unwrap();
        assert_eq!(spec.latency.unwrap().jitter, Duration::ZERO);
        assert_eq!(spec.drop_watch.unwrap().period, Duration::from_secs(3600));
    }

    #[test]
    fn malformed_specs_say_what_is_wrong() {
        for (spec, expected) in [
            ("", "empty item"),
            ("latency", "expected name=value"),
            ("latency=fast", "is not a duration"),
            ("latency=5", "has no unit"),
            ("latency=5parsecs", "is not a unit"),
            ("latency=10ms±20ms", "larger than the latency"),
            ("drop-watch=1", "expected N/PERIOD"),
            ("drop-watch=0/min", "at least 1"),
            ("drop-watch=x/min", "is not a count"),
            ("drop-watch=1/0s", "longer than zero"),
            ("unavailable=30s/30s", "shorter than its period"),
            ("unavailable=2s", "expected DURATION/PERIOD"),
            ("lease-expire-early=5", "expected a percentage"),
            ("lease-expire-early=0%", "above 0"),
            ("lease-expire-early=150%", "at most 100"),
            ("compact=10s,compact=5s", "given twice"),
            ("explode=1", "unknown fault \"explode\"; known: latency"),
            ("seed=7", "no fault given"),
            ("seed=-1,compact=1s", "not a seed"),
            ("compact=1s,,latency=1ms", "empty item"),
        ] {
            let e = spec.parse::<FaultSpec>().unwrap_err();
            assert!(e.to_string().contains(expected), "{spec:?}: {e}");
        }
    }
}
