//! Line parsers: none, json, regex with named groups, and the CRI container log format
//! (`<time> <stream> <P|F> <content>`, partial lines joined). A line that does not parse is
//! kept as the raw `message` and counted, never dropped.

use chrono::{DateTime, FixedOffset};
use regex::Regex;
use serde_json::{Map, Value};

use super::config::ParserConfig;
use super::record::parse_time;

/// What a parser made of one message.
#[derive(Debug, Default, PartialEq)]
pub struct Parsed {
    pub message: String,
    pub fields: Map<String, Value>,
    pub time: Option<DateTime<FixedOffset>>,
    /// The parser could not make sense of the line (it is shipped raw).
    pub failed: bool,
}

/// Keys that carry a record's own time, most common first.
const TIME_KEYS: [&str; 4] = ["timestamp", "@timestamp", "time", "ts"];
/// Keys that carry the human message in JSON logs.
const MESSAGE_KEYS: [&str; 2] = ["message", "msg"];

/// Parses a (possibly multiline-joined) message. CRI decoding happens earlier, per line,
/// in [`CriJoiner`]; the parser sees the decoded content.
pub fn parse(parser: &ParserConfig, text: String) -> Parsed {
    match parser {
        ParserConfig::None => Parsed {
            message: text,
            ..Parsed::default()
        },
        ParserConfig::Json => parse_json(text),
        ParserConfig::Regex(re) => parse_regex(re, text),
    }
}

fn parse_json(text: String) -> Parsed {
    let Ok(Value::Object(mut obj)) = serde_json::from_str::<Value>(&text) else {
        return Parsed {
            message: text,
            failed: true,
            ..Parsed::default()
        };
    };
    let mut message = None;
    for k in MESSAGE_KEYS {
        if let Some(Value::String(_)) = obj.get(k)
            && let Some(Value::String(m)) = obj.remove(k)
        {
            message = Some(m);
            break;
        }
    }
    let time = TIME_KEYS.iter().find_map(|k| match obj.get(*k) {
        Some(Value::String(s)) => parse_time(s),
        _ => None,
    });
    Parsed {
        message: message.unwrap_or(text),
        fields: obj,
        time,
        failed: false,
    }
}

fn parse_regex(re: &Regex, text: String) -> Parsed {
    let Some(caps) = re.captures(&text) else {
        return Parsed {
            message: text,
            failed: true,
            ..Parsed::default()
        };
    };
    let mut fields = Map::new();
    let mut message = None;
    let mut time = None;
    for name in re.capture_names().flatten() {
        let Some(m) = caps.name(name) else { continue };
        let v = m.as_str();
        if MESSAGE_KEYS.contains(&name) {
            message = Some(v.to_string());
            continue;
        }
        if time.is_none() && TIME_KEYS.contains(&name) {
            time = parse_time(v);
        }
        fields.insert(name.to_string(), Value::String(v.to_string()));
    }
    Parsed {
        message: message.unwrap_or(text),
        fields,
        time,
        failed: false,
    }
}

/// One decoded CRI log entry (partials already joined).
#[derive(Debug, PartialEq)]
pub struct CriEntry {
    pub time: Option<DateTime<FixedOffset>>,
    pub stream: String,
    pub content: Vec<u8>,
    /// The line was not CRI formatted; `content` is the raw line.
    pub failed: bool,
}

/// Joins CRI partial lines (`P`) until the final one (`F`). The joined size is capped so a
/// runtime that never sends `F` cannot grow memory without bound.
#[derive(Debug)]
pub struct CriJoiner {
    pending: Option<CriEntry>,
    max: usize,
}

impl CriJoiner {
    pub fn new(max: usize) -> Self {
        Self { pending: None, max }
    }

    /// Feeds one line; returns a complete entry when the line ends one.
    pub fn push(&mut self, line: &[u8]) -> Option<CriEntry> {
        let Some(CriParts {
            time,
            stream,
            tag,
            content,
        }) = split_cri(line)
        else {
            // Not CRI: flush anything pending first would reorder; keep it simple and emit
            // the raw line (the pending partial stays until its F arrives).
            return Some(CriEntry {
                time: None,
                stream: String::new(),
                content: line.to_vec(),
                failed: true,
            });
        };
        let time = std::str::from_utf8(time).ok().and_then(parse_time);
        let stream = String::from_utf8_lossy(stream).into_owned();
        match self.pending.as_mut() {
            Some(p) => {
                let room = self.max.saturating_sub(p.content.len());
                p.content
                    .extend_from_slice(&content[..content.len().min(room)]);
            }
            None => {
                self.pending = Some(CriEntry {
                    time,
                    stream,
                    content: content[..content.len().min(self.max)].to_vec(),
                    failed: false,
                });
            }
        }
        if tag == b"P" {
            None
        } else {
            self.pending.take()
        }
    }

    /// Whether a partial entry waits for its final line (its bytes are not checkpointed).
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }
}

/// The four space-separated parts of a CRI log line.
struct CriParts<'a> {
    time: &'a [u8],
    stream: &'a [u8],
    tag: &'a [u8],
    content: &'a [u8],
}

fn split_cri(line: &[u8]) -> Option<CriParts<'_>> {
    let mut it = line.splitn(4, |b| *b == b' ');
    let time = it.next()?;
    let stream = it.next()?;
    let tag = it.next()?;
    let content = it.next().unwrap_or(&[]);
    if (tag != b"P" && tag != b"F") || (stream != b"stdout" && stream != b"stderr") {
        return None;
    }
    Some(CriParts {
        time,
        stream,
        tag,
        content,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_keys_become_fields_and_message_and_time_are_lifted() {
        let p = parse(
            &ParserConfig::Json,
            r#"{"msg":"hello","level":"WARN","time":"2026-01-02T03:04:05Z","n":3}"#.into(),
        );
        assert!(!p.failed);
        assert_eq!(p.message, "hello");
        assert_eq!(p.fields["level"], "WARN");
        assert_eq!(p.fields["n"], 3);
        assert_eq!(p.time, parse_time("2026-01-02T03:04:05Z"));
    }

    #[test]
    fn json_parse_failure_keeps_raw_line() {
        let p = parse(&ParserConfig::Json, "not json {".into());
        assert!(p.failed);
        assert_eq!(p.message, "not json {");
        assert!(p.fields.is_empty());
    }

    #[test]
    fn regex_named_groups_become_fields() {
        let re = Regex::new(r"^(?P<level>\w+) (?P<message>.*)$").unwrap();
        let p = parse(&ParserConfig::Regex(re.clone()), "ERROR disk full".into());
        assert_eq!(p.message, "disk full");
        assert_eq!(p.fields["level"], "ERROR");
        let miss = parse(&ParserConfig::Regex(re), "".into());
        assert!(miss.failed);
    }

    #[test]
    fn cri_partial_lines_are_joined_until_the_final_one() {
        let mut j = CriJoiner::new(1024);
        assert_eq!(j.push(b"2026-01-02T03:04:05.1Z stdout P hello "), None);
        assert!(j.has_pending());
        assert_eq!(j.push(b"2026-01-02T03:04:05.2Z stdout P big "), None);
        let e = j.push(b"2026-01-02T03:04:05.3Z stdout F world").unwrap();
        assert_eq!(e.content, b"hello big world");
        assert_eq!(e.stream, "stdout");
        assert_eq!(e.time, parse_time("2026-01-02T03:04:05.1Z"));
        assert!(!j.has_pending());
        let whole = j.push(b"2026-01-02T03:04:06Z stderr F one").unwrap();
        assert_eq!(whole.content, b"one");
        assert_eq!(whole.stream, "stderr");
    }

    #[test]
    fn cri_join_is_capped() {
        let mut j = CriJoiner::new(8);
        assert_eq!(j.push(b"t stdout P 123456"), None);
        let e = j.push(b"t stdout F 789abc").unwrap();
        assert_eq!(e.content, b"12345678");
    }

    #[test]
    fn non_cri_line_is_kept_raw_and_marked_failed() {
        let mut j = CriJoiner::new(64);
        let e = j.push(b"plain text").unwrap();
        assert!(e.failed);
        assert_eq!(e.content, b"plain text");
    }
}
