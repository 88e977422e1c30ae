//! Clipping text to a byte budget on a character boundary: status fields, Event notes and
//! output tails all have byte limits (the API server's schema counts characters, but a
//! byte bound is the stricter one and keeps objects small whatever the script).

/// The first at most `max` bytes of `s`, cut on a character boundary.
pub fn head(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    &s[..cut]
}

/// `s` cut to at most `max` bytes on a character boundary (owned form of [`head`]).
pub fn clip(mut s: String, max: usize) -> String {
    let len = head(&s, max).len();
    s.truncate(len);
    s
}

/// The end of `s` (trailing whitespace trimmed), at most `max` bytes including a leading
/// `…` that marks a cut.
pub fn tail(s: &str, max: usize) -> String {
    let s = s.trim_end();
    if s.len() <= max {
        return s.to_string();
    }
    let budget = max.saturating_sub('…'.len_utf8());
    let mut start = s.len() - budget;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &s[start..])
}

/// JSON with object keys sorted at every level, numbers and strings as serde_json writes
/// them: the same value always gives the same text, whatever order it was stored in.
pub fn canonical_json(v: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                if let Some(inner) = map.get(k) {
                    canonical_json(inner, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_and_clip_cut_on_char_boundaries() {
        assert_eq!(head("héllo", 2), "h");
        assert_eq!(head("héllo", 3), "hé");
        assert_eq!(head("ok", 10), "ok");
        assert_eq!(clip("ééé".to_string(), 5), "éé");
    }

    #[test]
    fn tail_keeps_the_end_marks_the_cut_and_respects_the_byte_budget() {
        assert_eq!(tail("short\n", 512), "short");
        let long = "é".repeat(1000);
        let t = tail(&long, 512);
        assert!(t.len() <= 512 && t.len() > 508, "{}", t.len());
        assert!(t.starts_with('…') && t.ends_with('é'));
        assert_eq!(tail("abcdef", 4), "…f");
        assert_eq!(tail("abcdef", 0), "…");
    }
}
