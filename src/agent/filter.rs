//! Include/exclude filters: a regex tested against a record field (or `message`). A record
//! must pass every filter, in order.

use serde_json::{Map, Value};

use super::config::FilterConfig;
use super::record::field_text;

/// Whether the record passes every filter.
pub fn keep(filters: &[FilterConfig], rec: &Map<String, Value>) -> bool {
    filters.iter().all(|f| {
        let text = field_text(rec, f.field.as_deref().unwrap_or("message"));
        f.pattern.is_match(&text) == f.include
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use regex::Regex;

    fn filter(include: bool, field: Option<&str>, pattern: &str) -> FilterConfig {
        FilterConfig {
            include,
            field: field.map(String::from),
            pattern: Regex::new(pattern).unwrap(),
        }
    }

    fn rec(level: &str, message: &str) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("level".into(), level.into());
        m.insert("message".into(), message.into());
        m
    }

    #[test]
    fn include_on_a_field_and_exclude_on_the_message_both_apply() {
        let fs = [
            filter(true, Some("level"), "ERROR|WARN"),
            filter(false, None, "healthz"),
        ];
        assert!(keep(&fs, &rec("ERROR", "disk full")));
        assert!(!keep(&fs, &rec("INFO", "disk full")));
        assert!(!keep(&fs, &rec("WARN", "GET /healthz")));
        // A missing field is the empty string: it matches no include pattern here.
        assert!(!keep(&fs, &Map::new()));
        assert!(keep(&[], &Map::new()));
    }
}
