//! Include/exclude filters: a regex tested against a record field (or `message`). A record
//! must pass every filter, in order.

use std::borrow::Cow;

use super::config::FilterConfig;

/// Whether the record passes every filter; `field` gives a field's text (`""` when missing).
pub fn keep<'a>(filters: &[FilterConfig], field: impl Fn(&str) -> Cow<'a, str>) -> bool {
    filters.iter().all(|f| {
        let text = field(f.field.as_deref().unwrap_or("message"));
        f.pattern.is_match(&text) == f.include
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::record::field_text;
    use regex::Regex;
    use serde_json::{Map, Value};

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
        let keeps = |fs: &[FilterConfig], r: &Map<String, Value>| keep(fs, |f| field_text(r, f));
        assert!(keeps(&fs, &rec("ERROR", "disk full")));
        assert!(!keeps(&fs, &rec("INFO", "disk full")));
        assert!(!keeps(&fs, &rec("WARN", "GET /healthz")));
        // A missing field is the empty string: it matches no include pattern here.
        assert!(!keeps(&fs, &Map::new()));
        assert!(keeps(&[], &Map::new()));
    }
}
