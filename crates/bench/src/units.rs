//! How the reports show numbers: milliseconds for people, three decimals
//! in JSON.

use std::time::Duration;

use serde::Serializer;

/// A duration in whole nanoseconds (saturating).
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Nanoseconds as milliseconds, for people: three decimals below 10 ms,
/// one above.
pub(crate) fn ms(nanos: u64) -> String {
    let ms = nanos as f64 / 1e6;
    if ms < 10.0 {
        format!("{ms:.3} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

/// Serializes a float rounded to three decimals: whole numbers without a
/// fraction (`5`, not `5.0`), anything not finite as `null`.
pub(crate) fn three_decimals<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
    let rounded = (x * 1000.0).round() / 1000.0;
    // Whole numbers up to 2^53 are exact in both types.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    if !rounded.is_finite() {
        s.serialize_none()
    } else if rounded.fract() == 0.0 && rounded.abs() <= EXACT {
        s.serialize_i64(rounded as i64)
    } else {
        s.serialize_f64(rounded)
    }
}

/// Serializes nanoseconds as milliseconds, rounded to three decimals.
pub(crate) fn nanos_as_ms<S: Serializer>(nanos: &u64, s: S) -> Result<S::Ok, S::Error> {
    three_decimals(&(*nanos as f64 / 1e6), s)
}

/// Serializes a duration as milliseconds, rounded to three decimals.
pub(crate) fn duration_as_ms<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    three_decimals(&(d.as_secs_f64() * 1e3), s)
}

/// Serializes a duration as seconds, rounded to three decimals.
pub(crate) fn duration_as_secs<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    three_decimals(&d.as_secs_f64(), s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize)]
    struct Numbers {
        #[serde(serialize_with = "three_decimals")]
        a: f64,
        #[serde(serialize_with = "three_decimals")]
        b: f64,
        #[serde(serialize_with = "three_decimals")]
        c: f64,
        #[serde(serialize_with = "nanos_as_ms")]
        d: u64,
        #[serde(serialize_with = "duration_as_secs")]
        e: Duration,
    }

    #[test]
    fn floats_have_three_decimals_and_whole_ones_none() {
        let n = Numbers {
            a: 1.23456,
            b: 5.0,
            c: f64::NAN,
            d: 1_234_567,
            e: Duration::from_millis(1030),
        };
        assert_eq!(
            serde_json::to_string(&n).unwrap(),
            r#"{"a":1.235,"b":5,"c":null,"d":1.235,"e":1.03}"#
        );
    }

    #[test]
    fn milliseconds_for_people() {
        assert_eq!(ms(2_345_678), "2.346 ms");
        assert_eq!(ms(14_300_000), "14.3 ms");
    }
}
