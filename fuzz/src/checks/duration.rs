//! Durations (src/api/common.rs `parse_duration`): never a panic; the result a reference
//! gives, reading parts from the left: the exact value (each part's fraction truncated to
//! whole nanoseconds once, however many digits it has), `TooLarge` when the sum does not fit
//! a `Duration` (or overflows before a later malformed part is reached), else `Invalid`;
//! `DURATION_PATTERN` matches exactly what is made of parts all through; and the schema's CEL
//! bounds hold: a value the schema accepts either matches `OVERSIZED_DURATION_PATTERN` and
//! is at least `OVERSIZED_DURATION_FLOOR`, or parses to less than a quarter of Go's maximum.

use std::sync::OnceLock;
use std::time::Duration;

use outrider::api::common::{
    DURATION_PATTERN, DurationError, DurationString, OVERSIZED_DURATION_FLOOR,
    OVERSIZED_DURATION_PATTERN, parse_duration,
};
use regex::Regex;

/// Go's `time.Duration` limit: `1<<63 - 1` nanoseconds (~2562047h).
const GO_MAX: Duration = Duration::from_nanos(i64::MAX as u64);

fn regexes() -> &'static (Regex, Regex, Regex) {
    static RE: OnceLock<(Regex, Regex, Regex)> = OnceLock::new();
    RE.get_or_init(|| {
        (
            Regex::new(DURATION_PATTERN).expect("DURATION_PATTERN"),
            Regex::new(OVERSIZED_DURATION_PATTERN).expect("OVERSIZED_DURATION_PATTERN"),
            Regex::new(r"^([0-9]+)(?:\.([0-9]+))?(ms|s|m|h)").expect("part"),
        )
    })
}

pub fn check(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    let got = parse_duration(&s);
    assert_eq!(got, DurationString(s.to_string()).to_std(), "{s:?}");
    if let Err(e) = &got {
        // The message quotes at most the first 40 bytes.
        let quoted = match e {
            DurationError::Invalid(q) | DurationError::TooLarge(q) => q,
        };
        assert!(quoted.len() <= 40 && s.starts_with(quoted.as_str()), "{e}");
    }
    let kind = |r: &Result<Duration, DurationError>| match r {
        Ok(v) => Ok(*v),
        Err(DurationError::Invalid(_)) => Err(Problem::Invalid),
        Err(DurationError::TooLarge(_)) => Err(Problem::TooLarge),
    };
    assert_eq!(kind(&got), reference(&s), "{s:?}");

    let (pattern, oversized, _) = regexes();
    let matches = pattern.is_match(&s);
    assert_eq!(matches, full_scan_ok(&s), "{s:?}: DURATION_PATTERN");
    // What the schema lets through to the CEL bound rules (maxLength 32).
    if matches && s.len() <= 32 {
        if oversized.is_match(&s) {
            if let Ok(v) = got {
                assert!(v >= OVERSIZED_DURATION_FLOOR, "{s:?} is only {v:?}");
            }
        } else {
            assert!(
                got.as_ref().is_ok_and(|v| *v < GO_MAX / 4),
                "{s:?} is not caught by OVERSIZED_DURATION_PATTERN but is {got:?}"
            );
        }
    }
}

#[derive(Debug, PartialEq)]
enum Problem {
    Invalid,
    TooLarge,
}

/// Whether `s` is made of parts all the way (whatever their size).
fn full_scan_ok(s: &str) -> bool {
    let (_, _, part) = regexes();
    let mut pos = 0;
    while pos < s.len() {
        match part.find(&s[pos..]) {
            Some(m) => pos += m.end(),
            None => return false,
        }
    }
    pos > 0
}

/// The exact value, parts read from the left; the first problem met decides the error: a
/// part that is malformed (`Invalid`) or one that takes the sum past `u128` nanoseconds
/// (`TooLarge`); a sum past `Duration` is `TooLarge` too.
fn reference(s: &str) -> Result<Duration, Problem> {
    let (_, _, part) = regexes();
    if s.is_empty() {
        return Err(Problem::Invalid);
    }
    let mut total: u128 = 0;
    let mut pos = 0;
    while pos < s.len() {
        let c = part.captures(&s[pos..]).ok_or(Problem::Invalid)?;
        pos += c.get(0).map_or(0, |m| m.end());
        let unit: u128 = match &c[3] {
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            _ => 3_600_000_000_000,
        };
        let whole = c[1].trim_start_matches('0');
        // u128 holds any 38 digits; more cannot fit once multiplied by a unit anyway.
        let whole: u128 = if whole.is_empty() {
            0
        } else if whole.len() > 38 {
            return Err(Problem::TooLarge);
        } else {
            whole.parse().map_err(|_| Problem::TooLarge)?
        };
        // floor(unit * 0.d1d2…dn), digit by digit from the last: floor((a + y) / 10) =
        // floor((a + floor(y)) / 10) for whole a, so nothing is lost on the way.
        let mut frac: u128 = 0;
        for d in c.get(2).map_or("", |f| f.as_str()).bytes().rev() {
            frac = (u128::from(d - b'0') * unit + frac) / 10;
        }
        total = whole
            .checked_mul(unit)
            .and_then(|p| p.checked_add(frac))
            .and_then(|p| p.checked_add(total))
            .ok_or(Problem::TooLarge)?;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| Problem::TooLarge)?;
    Ok(Duration::new(secs, (total % 1_000_000_000) as u32))
}
