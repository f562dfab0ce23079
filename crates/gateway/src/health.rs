//! Passive health checking: an instance that fails `failures` times in a
//! row (connect errors, errors before a response, timeouts, 5xx answers)
//! is ejected from its service's pool for a while. The period doubles with
//! each ejection that is not followed by a success (capped); once it is
//! over the instance is let back in, on probation: one more failure ejects
//! it again, one success clears its record.
//!
//! If every instance of a service is ejected the gateway fails open and
//! uses them all: an answer from a struggling instance beats a 503.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};
use muster::Instance;

use crate::config::HealthConfig;
use crate::metrics::Histogram;

/// What the gateway keeps about one instance.
#[derive(Debug)]
pub(crate) struct InstanceState {
    pub(crate) id: String,
    pub(crate) addr: String,
    /// Where to send requests; `None` if the registered address is not a
    /// usable `host:port`, `http://host:port` or `https://host:port`.
    pub(crate) target: Option<(Scheme, Authority)>,
    pub(crate) latency: Arc<Histogram>,
    failures: AtomicU32,
    /// Set while ejected or on probation (so successes know to clear it).
    marked: AtomicBool,
    eject: Mutex<Ejection>,
}

#[derive(Debug, Default)]
struct Ejection {
    /// Ejections in a row without a success.
    strikes: u32,
    /// Ejected until then.
    until: Option<Instant>,
}

/// What a recorded failure did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nothing changed.
    Counted,
    /// The instance was ejected for this long.
    Ejected(Duration),
}

impl InstanceState {
    pub(crate) fn new(instance: &Instance) -> Self {
        InstanceState {
            id: instance.id.clone(),
            addr: instance.addr.clone(),
            target: parse_target(&instance.addr),
            latency: Arc::new(Histogram::default()),
            failures: AtomicU32::new(0),
            marked: AtomicBool::new(false),
            eject: Mutex::new(Ejection::default()),
        }
    }

    /// Records a success: clears the failure count and any ejection record.
    #[inline]
    pub(crate) fn success(&self) {
        // Read first: writing on every request would bounce the cache line.
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.marked.load(Ordering::Relaxed) {
            let mut e = self.eject.lock().unwrap_or_else(PoisonError::into_inner);
            if e.until.is_none_or(|u| u <= Instant::now()) {
                *e = Ejection::default();
                self.marked.store(false, Ordering::Relaxed);
            }
        }
    }

    /// Records a failure; ejects the instance when it has failed too often.
    pub(crate) fn failure(&self, config: &HealthConfig) -> Verdict {
        if config.failures == 0 {
            return Verdict::Counted;
        }
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let on_probation = self.marked.load(Ordering::Relaxed);
        if n < config.failures && !on_probation {
            return Verdict::Counted;
        }
        let now = Instant::now();
        let mut e = self.eject.lock().unwrap_or_else(PoisonError::into_inner);
        if e.until.is_some_and(|u| u > now) {
            return Verdict::Counted; // already out
        }
        e.strikes = e.strikes.saturating_add(1);
        let factor = 1u32 << (e.strikes - 1).min(16);
        let period = config
            .base_ejection
            .saturating_mul(factor)
            .min(config.max_ejection.max(config.base_ejection));
        e.until = Some(now + period);
        self.marked.store(true, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        Verdict::Ejected(period)
    }

    /// Until when the instance is ejected, if it is now.
    pub(crate) fn ejected_until(&self, now: Instant) -> Option<Instant> {
        if !self.marked.load(Ordering::Relaxed) {
            return None;
        }
        let e = self.eject.lock().unwrap_or_else(PoisonError::into_inner);
        e.until.filter(|u| *u > now)
    }
}

/// `host:port`, `http://host:port[/]` or `https://host:port[/]` as scheme
/// and authority.
fn parse_target(addr: &str) -> Option<(Scheme, Authority)> {
    let (scheme, rest) = match addr.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => (Scheme::HTTP, rest),
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => (Scheme::HTTPS, rest),
        Some(_) => return None,
        None => (Scheme::HTTP, addr),
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
        return None;
    }
    let authority: Authority = rest.parse().ok()?;
    authority.port_u16()?;
    Some((scheme, authority))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> HealthConfig {
        HealthConfig {
            failures: 3,
            base_ejection: Duration::from_millis(100),
            max_ejection: Duration::from_millis(300),
        }
    }

    #[test]
    fn targets_parse() {
        assert!(parse_target("127.0.0.1:80").is_some());
        assert!(parse_target("http://10.0.0.7:8080").is_some());
        assert!(parse_target("http://10.0.0.7:8080/").is_some());
        assert!(parse_target("[::1]:80").is_some());
        assert_eq!(
            parse_target("https://h:1/"),
            Some((Scheme::HTTPS, "h:1".parse().unwrap()))
        );
        assert_eq!(parse_target("h:1").unwrap().0, Scheme::HTTP);
        assert!(parse_target("https://h").is_none());
        assert!(parse_target("ftp://h:1").is_none());
        assert!(parse_target("h").is_none());
        assert!(parse_target("h:1/x").is_none());
        assert!(parse_target("").is_none());
    }

    #[test]
    fn ejects_after_consecutive_failures_and_doubles() {
        let c = config();
        let i = InstanceState::new(&Instance::new("s", "a", "127.0.0.1:1"));
        assert_eq!(i.failure(&c), Verdict::Counted);
        i.success();
        assert_eq!(i.failure(&c), Verdict::Counted);
        assert_eq!(i.failure(&c), Verdict::Counted);
        assert_eq!(i.failure(&c), Verdict::Ejected(Duration::from_millis(100)));
        let now = Instant::now();
        assert!(i.ejected_until(now).is_some());
        // Failures while ejected change nothing.
        assert_eq!(i.failure(&c), Verdict::Counted);
        std::thread::sleep(Duration::from_millis(120));
        assert!(i.ejected_until(Instant::now()).is_none());
        // On probation: one failure ejects again, for twice as long.
        assert_eq!(i.failure(&c), Verdict::Ejected(Duration::from_millis(200)));
        std::thread::sleep(Duration::from_millis(220));
        assert_eq!(i.failure(&c), Verdict::Ejected(Duration::from_millis(300)));
        std::thread::sleep(Duration::from_millis(320));
        // A success clears the record.
        i.success();
        assert_eq!(i.failure(&c), Verdict::Counted);
    }
}
