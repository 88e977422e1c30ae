//! Types every kind shares: target selection, references, durations and conditions.
//!
//! Validation lives in the schema (patterns, ranges, CEL) so the API server rejects a
//! bad object with a message that names the field, before any controller sees it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Go-style duration accepted everywhere a spec says how long: `300ms`, `30s`, `5m`, `1h30m`.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";
/// DNS-1123 label: what host, stage, check and rule names must look like.
pub const DNS1123_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// Byte size with an optional binary or decimal suffix: `1048576`, `1Mi`, `512Mi`, `2G`.
pub const BYTE_SIZE_PATTERN: &str = r"^[0-9]+(Ki|Mi|Gi|Ti|k|K|M|G|T)?$";
/// An IPv4 or IPv6 CIDR (or single address). The exact parse is re-checked by the engine.
pub const CIDR_PATTERN: &str = r"^(([0-9]{1,3}\.){3}[0-9]{1,3}(/([0-9]|[12][0-9]|3[0-2]))?|[0-9a-fA-F:.]*:[0-9a-fA-F:.]*(/([0-9]|[1-9][0-9]|1[01][0-9]|12[0-8]))?)$";

/// An `http://` or `https://` URL (sinks, HTTP probes). Reachability is the controller's to check.
pub const URL_PATTERN: &str = r"^https?://[^\s]+$";

/// CEL for an IntOrString that sizes a batch: an integer `>= 1` or a percentage `1%`..`100%`.
pub const POSITIVE_INT_OR_PERCENT_RULE: &str =
    "type(self) == int ? self >= 1 : self.matches('^([1-9][0-9]?|100)%$')";
/// CEL for an IntOrString failure budget: an integer `>= 0` or a percentage `0%`..`100%`.
pub const NON_NEGATIVE_INT_OR_PERCENT_RULE: &str =
    "type(self) == int ? self >= 0 : self.matches('^([0-9]|[1-9][0-9]|100)%$')";

/// Matches a [`DURATION_PATTERN`] duration with a part of at least `100000h`, `1000000m`,
/// `100000000s` or `100000000000ms` (significant digits; a part starts the string or follows
/// a unit). Such a duration is at least [`OVERSIZED_DURATION_FLOOR`], and a duration with no
/// such part is under ~444444h (32 characters hold at most 16 parts), far inside Go's
/// `time.Duration` (~2562047h). The bound rules reject a match without parsing it: the API
/// server's `duration()` is Go's `time.ParseDuration`, which fails on `9999999999999999h`;
/// a failed evaluation does reject the object, but as `Invalid value: "string": type
/// conversion error from 'string' to 'google.protobuf.Duration' evaluating rule: <message>`,
/// without the value and with an error users cannot act on.
pub const OVERSIZED_DURATION_PATTERN: &str = "(^|[hms])0*([1-9][0-9]{5,}([.][0-9]+)?h|[1-9][0-9]{6,}([.][0-9]+)?m([0-9]|$)|[1-9][0-9]{8,}([.][0-9]+)?s|[1-9][0-9]{11,}([.][0-9]+)?ms)";
/// The smallest duration [`OVERSIZED_DURATION_PATTERN`] matches (`1000000m`, 16666h40m):
/// every maximum given to [`duration_at_most`] is below it.
pub const OVERSIZED_DURATION_FLOOR: std::time::Duration =
    std::time::Duration::from_secs(60_000_000);

/// `s` as a single-quoted CEL string literal.
fn cel_string(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// CEL for a [`DurationString`] field, for `#[x_kube(validation = ...)]`: the duration is at
/// most `max` (e.g. `"24h"`), or the API server rejects the object with
/// `<path>: Invalid value: "<value>": <field> must be at most <max>`. Values too large for
/// Go's duration get the same message (see [`OVERSIZED_DURATION_PATTERN`]); a value
/// [`DURATION_PATTERN`] rejects is left to the pattern's own message.
///
/// Panics (when the schema is generated, so any test catches it) unless `max` is a duration
/// below [`OVERSIZED_DURATION_FLOOR`].
pub fn duration_at_most(field: &str, max: &str) -> kube::core::Rule {
    let bound = parse_duration(max).unwrap_or_else(|e| panic!("{field}: maximum {e}"));
    assert!(
        bound < OVERSIZED_DURATION_FLOOR,
        "{field}: maximum {max} is not below OVERSIZED_DURATION_FLOOR"
    );
    kube::core::Rule::new(format!(
        "!self.matches({pattern}) || (!self.matches({oversized}) && duration(self) <= duration({max}))",
        pattern = cel_string(DURATION_PATTERN),
        oversized = cel_string(OVERSIZED_DURATION_PATTERN),
        max = cel_string(max),
    ))
    .message(kube::core::Message::Message(format!(
        "{field} must be at most {max}"
    )))
}

/// CEL for a [`DurationString`] field: the duration is at least `min` (e.g. `"5s"`), with the
/// message `<field> must be at least <min>`. Oversized values pass this rule (they are far
/// above any minimum; [`duration_at_most`] rejects them) without being parsed.
pub fn duration_at_least(field: &str, min: &str) -> kube::core::Rule {
    parse_duration(min).unwrap_or_else(|e| panic!("{field}: minimum {e}"));
    kube::core::Rule::new(format!(
        "!self.matches({pattern}) || self.matches({oversized}) || duration(self) >= duration({min})",
        pattern = cel_string(DURATION_PATTERN),
        oversized = cel_string(OVERSIZED_DURATION_PATTERN),
        min = cel_string(min),
    ))
    .message(kube::core::Message::Message(format!(
        "{field} must be at least {min}"
    )))
}

/// A string duration validated by the schema (see [`DURATION_PATTERN`]); each field adds
/// its bounds next to it with [`duration_at_most`] (every field) and [`duration_at_least`].
///
/// Kept as the user wrote it so status and `kubectl get -o yaml` round-trip unchanged;
/// [`DurationString::to_std`] parses it when the engine needs a value.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(transparent)]
pub struct DurationString(pub String);

impl DurationString {
    /// Parses a [`DURATION_PATTERN`] duration with checked arithmetic: the schema accepts
    /// `9999999999999999h`, which must be an error here, never a panic (kube's own parser
    /// panics on it in `Duration::mul_f64`).
    pub fn to_std(&self) -> Result<std::time::Duration, DurationError> {
        parse_duration(&self.0)
    }
}

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("{0:?} is not a duration such as 300ms, 30s, 5m or 1h30m")]
    Invalid(String),
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// `([0-9]+(.[0-9]+)?(ms|s|m|h))+` to a Duration, exact to the nanosecond, overflow checked.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, DurationError> {
    let invalid = || DurationError::Invalid(crate::text::head(s, 40).to_string());
    let too_large = || DurationError::TooLarge(crate::text::head(s, 40).to_string());
    let b = s.as_bytes();
    if b.is_empty() {
        return Err(invalid());
    }
    let mut i = 0;
    let mut total: u128 = 0;
    while i < b.len() {
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return Err(invalid());
        }
        let whole = &s[start..i];
        let mut frac = "";
        if i < b.len() && b[i] == b'.' {
            i += 1;
            let f = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            if i == f {
                return Err(invalid());
            }
            frac = &s[f..i];
        }
        let unit_ns: u128 = if s[i..].starts_with("ms") {
            i += 2;
            1_000_000
        } else if s[i..].starts_with('s') {
            i += 1;
            1_000_000_000
        } else if s[i..].starts_with('m') {
            i += 1;
            60_000_000_000
        } else if s[i..].starts_with('h') {
            i += 1;
            3_600_000_000_000
        } else {
            return Err(invalid());
        };
        let whole: u128 = whole.parse().map_err(|_| too_large())?;
        // floor(unit × 0.d1d2…), last digit first: floor((a + y) / 10) equals
        // floor((a + floor(y)) / 10), so no digit is lost (0.000000000009h is 32ns, not 27ns)
        let mut frac_ns: u128 = 0;
        for d in frac.bytes().rev() {
            frac_ns = (u128::from(d - b'0') * unit_ns + frac_ns) / 10;
        }
        let part = whole
            .checked_mul(unit_ns)
            .and_then(|p| p.checked_add(frac_ns))
            .ok_or_else(too_large)?;
        total = total.checked_add(part).ok_or_else(too_large)?;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| too_large())?;
    let nanos = u32::try_from(total % 1_000_000_000).map_err(|_| too_large())?;
    Ok(std::time::Duration::new(secs, nanos))
}

impl From<&str> for DurationString {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

impl JsonSchema for DurationString {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "DurationString".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "maxLength": 32,
            "description": "a duration such as 300ms, 30s, 5m or 1h30m",
        })
    }
}

/// DNS-1123 subdomain: what every object name must look like. Names in references are
/// pasted into API paths (kube does not encode them), so `..` or `a/b` must never pass.
pub const DNS1123_SUBDOMAIN_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// Whether `s` is a DNS-1123 subdomain, checked in code before a name from a resource is
/// joined into a file path or an API path, whatever the schema let through.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            let b = label.as_bytes();
            match (b.first(), b.last()) {
                (Some(first), Some(last)) => {
                    first.is_ascii_alphanumeric()
                        && last.is_ascii_alphanumeric()
                        && b.iter()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                }
                _ => false,
            }
        })
}

/// A reference to an object of a known kind in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct LocalObjectReference {
    /// Name of the object, in the namespace of the referring resource (a DNS-1123 subdomain).
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS1123_SUBDOMAIN_PATTERN))]
    pub name: String,
}

/// Which Inventory hosts a resource acts on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Targets {
    /// The Inventory that lists the hosts and how to reach them.
    pub inventory_ref: LocalObjectReference,
    /// Optional label selector over the Inventory's hosts; all hosts when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// Schema for a `conditions` field: standard `metav1.Condition`s as a list keyed by `type`,
/// so server-side apply merges them by type instead of replacing the list.
pub fn conditions_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<Vec<Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
    schema.insert("maxItems".into(), 16.into());
    schema
}

/// Fields every status carries.
pub trait HasConditions {
    fn conditions(&self) -> &[Condition];
}

#[cfg(test)]
mod duration_tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn only_dns_subdomains_pass_the_name_check() {
        for ok in ["a", "creds", "loki-creds.v2", "0", &"a".repeat(253)] {
            assert!(is_dns1123_subdomain(ok), "{ok}");
        }
        for bad in [
            "",
            "..",
            ".",
            "a/b",
            "../x",
            "A",
            "a..b",
            "-a",
            "a-",
            ".a",
            "a.",
            "a b",
            "é",
            &"a".repeat(254),
        ] {
            assert!(!is_dns1123_subdomain(bad), "{bad:?}");
        }
    }

    #[test]
    fn durations_parse_exactly_and_huge_ones_are_errors_not_panics() {
        let ok = |s: &str| parse_duration(s).expect(s);
        assert_eq!(ok("300ms"), Duration::from_millis(300));
        assert_eq!(ok("1h30m"), Duration::from_secs(5400));
        assert_eq!(ok("1.5s"), Duration::from_millis(1500));
        assert_eq!(ok("0.001ms"), Duration::from_nanos(1000));
        assert_eq!(ok("2m0.5s"), Duration::from_millis(120_500));
        // a fraction digit below the unit's nanosecond weight still counts (found by fuzzing:
        // 0.000000000009h is 32.4ns, it parsed as 27ns)
        assert_eq!(ok("0.000000000009h"), Duration::from_nanos(32));
        assert_eq!(ok("0.0000000001s"), Duration::ZERO);
        assert_eq!(ok("1.999999999999s"), Duration::from_nanos(1_999_999_999));
        for bad in ["", "5", "s", "1.s", "1x", "-1s", "1 s", "1d"] {
            assert!(
                matches!(parse_duration(bad), Err(DurationError::Invalid(_))),
                "{bad}"
            );
        }
        for huge in [
            "9999999999999999h",
            "99999999999999999999999999999999999999999h",
            "5124095576030432h",
        ] {
            assert!(
                matches!(parse_duration(huge), Err(DurationError::TooLarge(_))),
                "{huge}"
            );
        }
        assert!(
            parse_duration("5124095576030431h").is_ok(),
            "the most whole hours in u64 seconds"
        );
    }

    /// Go's `time.Duration` limit: `1<<63 - 1` nanoseconds (~2562047h).
    const GO_MAX: Duration = Duration::from_nanos(i64::MAX as u64);

    /// Durations the schema accepts (pattern, at most 32 characters), built from parts of
    /// every unit with 1 to 17 digits, leading zeros and fractions, alone and after other parts.
    fn schema_valid_durations() -> Vec<String> {
        let pattern = regex::Regex::new(DURATION_PATTERN).unwrap();
        let mut parts = Vec::new();
        for unit in ["h", "m", "s", "ms"] {
            for digits in 1..=17 {
                for lead in ["", "0", "000"] {
                    for frac in ["", ".5", ".999999999"] {
                        for first in ['1', '9'] {
                            let rest = if first == '1' { '0' } else { '9' };
                            let whole: String = std::iter::once(first)
                                .chain(std::iter::repeat_n(rest, digits - 1))
                                .collect();
                            parts.push(format!("{lead}{whole}{frac}{unit}"));
                        }
                    }
                }
            }
        }
        let mut all = parts.clone();
        for prefix in ["1h", "59m", "1ms", "99999h", "999999m", "99999999s"] {
            all.extend(parts.iter().map(|p| format!("{prefix}{p}")));
            all.extend(parts.iter().map(|p| format!("{p}{prefix}")));
        }
        all.extend(
            [
                "99999h99999h99999h99999h99999h",
                "99999999s99999999s99999999s",
            ]
            .map(String::from),
        );
        all.retain(|d| d.len() <= 32 && pattern.is_match(d));
        all
    }

    #[test]
    fn oversized_durations_are_exactly_past_every_bound_and_the_rest_fit_go() {
        let oversized = regex::Regex::new(OVERSIZED_DURATION_PATTERN).unwrap();
        let all = schema_valid_durations();
        assert!(all.len() > 2000, "{}", all.len());
        let (mut big, mut small) = (0, 0);
        for d in &all {
            if oversized.is_match(d) {
                big += 1;
                // never a false rejection: each match is past every maximum
                if let Ok(v) = parse_duration(d) {
                    assert!(v >= OVERSIZED_DURATION_FLOOR, "{d} is {v:?}");
                }
            } else {
                small += 1;
                // never an evaluation error: what is parsed fits Go's duration
                let v = parse_duration(d).unwrap();
                assert!(v < GO_MAX / 4, "{d} is {v:?}");
            }
        }
        assert!(big > 500 && small > 500, "{big} oversized, {small} not");
        for (d, expect) in [
            ("9999999999999999h", true),
            ("100000h", true),
            ("0099999h", false),
            ("1000000m", true),
            ("999999m", false),
            ("1000000ms", false),
            ("99999999999ms", false),
            ("100000000000ms", true),
            ("100000000s", true),
            ("1.100000000s", false),
            ("1ms100000h", true),
            ("1h30m", false),
        ] {
            assert_eq!(oversized.is_match(d), expect, "{d}");
        }
        assert_eq!(
            parse_duration("1000000m").unwrap(),
            OVERSIZED_DURATION_FLOOR
        );
    }

    #[test]
    fn bound_rules_name_the_field_and_refuse_maxima_past_the_oversized_floor() {
        let rule = duration_at_most("timeout", "24h");
        assert_eq!(
            rule.message,
            Some(kube::core::Message::Message(
                "timeout must be at most 24h".into()
            ))
        );
        assert!(rule.rule.ends_with("duration(self) <= duration('24h'))"));
        assert!(
            rule.rule
                .starts_with(r"!self.matches('^([0-9]+(\\.[0-9]+)?(ms|s|m|h))+$')")
        );
        let rule = duration_at_least("interval", "5s");
        assert_eq!(
            rule.message,
            Some(kube::core::Message::Message(
                "interval must be at least 5s".into()
            ))
        );
        assert!(rule.rule.ends_with("duration(self) >= duration('5s')"));
        assert!(std::panic::catch_unwind(|| duration_at_most("x", "16666h40m")).is_err());
        assert!(std::panic::catch_unwind(|| duration_at_most("x", "1 day")).is_err());
    }
}
