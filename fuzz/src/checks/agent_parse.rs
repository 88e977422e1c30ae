//! The node agent's line path (src/agent: reader, parse, multiline, filter, record), wired
//! as the tailer wires it: bytes split into lines, CRI partial lines joined, multiline
//! records joined, then the none/json/regex parser, the filters and the record's JSON.
//!
//! Properties: no panic; every line comes out once, cut at the limit, at the right offset;
//! CRI joining agrees with a small reference and never exceeds the limit, nor does a
//! multiline record; the JSON parser lifts exactly the message and time it should; each
//! record is one JSON object without duplicate keys that carries the pipeline's fixed
//! fields (a line cannot forge them), the message, a timestamp that reads back as RFC 3339
//! and every parsed field; and the filters decide on the values the record carries.
//!
//! Input: one flags byte (below), then the file's bytes.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use chrono::{DateTime, FixedOffset, Utc};
use outrider::agent::config::{FilterConfig, ParserConfig};
use outrider::agent::filter;
use outrider::agent::multiline::{Multiline, Piece};
use outrider::agent::parse::{self, CriJoiner, Parsed};
use outrider::agent::reader::LineSplitter;
use outrider::agent::record::{self, FixedFields, RecordContext, RecordParts, Template};
use regex::Regex;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

/// Flags: parser, 0 none, 1 json, 2 regex, 3 cri.
const PARSER: u8 = 0b11;
/// Flags: the second regex and the second multiline start pattern.
const ALT: u8 = 1 << 2;
const MULTILINE: u8 = 1 << 3;
/// Flags: a 24-byte line limit instead of 4 KiB, so lines, CRI joins and multiline
/// records hit it.
const SMALL: u8 = 1 << 4;
const FILTERS: u8 = 1 << 5;
/// Flags: the pipeline's fields fix `message`, `timestamp` and `stream`, and the file is
/// a kubelet pod log (pod metadata fields).
const FIXED_OWN: u8 = 1 << 6;
/// Flags: the file arrives in three reads instead of one.
const SPLIT: u8 = 1 << 7;

const TIME_KEYS: [&str; 4] = ["timestamp", "@timestamp", "time", "ts"];
const MESSAGE_KEYS: [&str; 2] = ["message", "msg"];
const OWN_KEYS: [&str; 3] = ["message", "timestamp", "stream"];

struct Compiled {
    parsers: [Regex; 2],
    starts: [Regex; 2],
    filters: Vec<FilterConfig>,
}

fn compiled() -> &'static Compiled {
    static C: OnceLock<Compiled> = OnceLock::new();
    C.get_or_init(|| {
        let re = |p: &str| Regex::new(p).expect("built-in pattern");
        Compiled {
            parsers: [
                re(r"^(?P<time>\S+) (?P<level>[A-Z]+) (?P<message>.*)$"),
                re(r"^(?:(?P<ts>\d{4}-\d\d-\d\dT\S+) )?(?:(?P<stream>std(?:out|err)) )?(?P<msg>.*)$"),
            ],
            starts: [re(r"^\d{4}-"), re(r"^\S")],
            filters: vec![
                FilterConfig {
                    include: false,
                    field: None,
                    pattern: re("healthz"),
                },
                FilterConfig {
                    include: true,
                    field: Some("level".into()),
                    pattern: re("^(|ERROR|WARN)$"),
                },
                FilterConfig {
                    include: true,
                    field: Some("stream".into()),
                    pattern: re("^(|stdout|stderr|fixed-stream)$"),
                },
            ],
        }
    })
}

pub fn check(data: &[u8]) {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    let c = compiled();
    let alt = usize::from(flags & ALT != 0);
    let max = if flags & SMALL != 0 { 24 } else { 4096 };
    let parser = match flags & PARSER {
        0 => ParserConfig::None,
        1 => ParserConfig::Json,
        2 => ParserConfig::Regex(c.parsers[alt].clone()),
        // 3: CRI framing (below) with no parser after it
        _ => ParserConfig::None,
    };
    let mut fields = BTreeMap::from([("service".to_owned(), "shop".to_owned())]);
    let mut path = "/var/log/app/current.log";
    if flags & FIXED_OWN != 0 {
        for (k, v) in [
            ("message", "fixed-message"),
            ("timestamp", "fixed-timestamp"),
            ("stream", "fixed-stream"),
        ] {
            fields.insert(k.to_owned(), v.to_owned());
        }
        path = "/var/log/pods/prod_shop-7d9_1234-abcd/app/0.log";
    }
    let ctx = RecordContext {
        node: "node-1".into(),
        input: "app".into(),
        fields,
    };
    let pod = record::pod_from_path(path, "/var/log/pods/");
    assert_eq!(pod.is_some(), flags & FIXED_OWN != 0, "{path}");
    let now = Instant::now();
    let mut run = Run {
        filters: if flags & FILTERS != 0 {
            &c.filters
        } else {
            &[]
        },
        fixed: FixedFields::new(&ctx, path, pod.as_ref()),
        fixed_values: fixed_values(&ctx, path, pod.is_some()),
        clock: record::format_time(Utc::now()),
        parser,
        max,
        cri: (flags & PARSER == 3).then(|| CriJoiner::new(max)),
        cri_ref: None,
        multiline: (flags & MULTILINE != 0).then(|| {
            Multiline::new(&c.starts[alt], Duration::from_secs(5), max).expect("start pattern")
        }),
        longest_piece: 0,
        now,
    };

    let lines = split_lines(body, max, flags & SPLIT != 0);
    for (bytes, end) in &lines {
        run.line(bytes, *end);
    }
    if let Some(m) = run.multiline.as_mut() {
        let pending = m.has_pending();
        assert_eq!(m.flush_stale(now), None, "flushed before its timeout");
        let stale = m.flush_stale(now + Duration::from_secs(5));
        assert_eq!(
            stale.is_some(),
            pending,
            "a pending record flushes at its timeout"
        );
        assert!(!m.has_pending());
        if let Some(p) = stale {
            run.multiline_record(p);
        }
    }

    // The first line as the label template and the pod path parsers see text.
    let first = String::from_utf8_lossy(body.split(|b| *b == b'\n').next().unwrap_or_default());
    let _ = record::pod_from_path(&first, "/var/log/pods/");
    if let Ok(t) = Template::parse(&first) {
        let rendered = t.render(&Map::new());
        if !first.contains("{{") {
            assert_eq!(
                rendered, first,
                "a template without placeholders is literal"
            );
        }
    }
}

/// Splits `body` with the agent's splitter and checks every line against the bytes.
fn split_lines(body: &[u8], max: usize, split: bool) -> Vec<(Vec<u8>, u64)> {
    let reads: Vec<&[u8]> = if split {
        let (a, rest) = body.split_at(body.len() / 3);
        let (b, c) = rest.split_at(rest.len() / 2);
        vec![a, b, c]
    } else {
        vec![body]
    };
    let mut splitter = LineSplitter::new(max);
    let mut got: Vec<(Vec<u8>, u64, bool)> = Vec::new();
    let mut offset = 0u64;
    for r in reads {
        splitter.feed(r, offset, |l| {
            assert!(
                l.bytes.len() <= max,
                "a line over the limit: {}",
                l.bytes.len()
            );
            got.push((l.bytes.to_vec(), l.end, l.truncated));
        });
        offset += r.len() as u64;
    }
    if let Some(rest) = splitter.finish() {
        got.push((rest, offset, false));
    }

    // The lines as the bytes have them: (line without `\n`, offset past it, terminated).
    let mut want: Vec<(&[u8], u64, bool)> = Vec::new();
    let mut start = 0;
    for (i, b) in body.iter().enumerate() {
        if *b == b'\n' {
            want.push((&body[start..i], i as u64 + 1, true));
            start = i + 1;
        }
    }
    if start < body.len() {
        want.push((&body[start..], body.len() as u64, false));
    }
    assert_eq!(got.len(), want.len(), "one line per line of the file");
    let mut last_end = 0;
    for ((bytes, end, truncated), (raw, raw_end, terminated)) in got.iter().zip(&want) {
        let why = format!("line {raw:?} (ends at {raw_end}) came out as {bytes:?} at {end}");
        let prefix = &raw[..raw.len().min(max)];
        let stripped = prefix.strip_suffix(b"\r").unwrap_or(prefix);
        assert_eq!(*truncated, raw.len() > max, "{why}");
        if *terminated && raw.len() <= max {
            assert_eq!((bytes.as_slice(), *end), (stripped, *raw_end), "{why}");
        } else {
            assert!(bytes == prefix || bytes == stripped, "{why}");
            assert!(*end <= *raw_end, "{why}");
        }
        assert!(*end >= last_end, "{why}: offsets go back");
        last_end = *end;
    }
    got.into_iter().map(|(b, e, _)| (b, e)).collect()
}

/// Pipeline fields win over pod metadata, which wins over `file`/`node`/`input`.
fn fixed_values(ctx: &RecordContext, path: &str, pod: bool) -> BTreeMap<String, String> {
    let mut v = BTreeMap::from([
        ("file".to_owned(), path.to_owned()),
        ("node".to_owned(), ctx.node.clone()),
        ("input".to_owned(), ctx.input.clone()),
    ]);
    if pod {
        v.insert("namespace".into(), "prod".into());
        v.insert("pod".into(), "shop-7d9".into());
        v.insert("container".into(), "app".into());
    }
    v.extend(ctx.fields.clone());
    v
}

struct Run<'a> {
    filters: &'a [FilterConfig],
    fixed: FixedFields,
    fixed_values: BTreeMap<String, String>,
    /// The timestamp of a record without its own time.
    clock: String,
    parser: ParserConfig,
    max: usize,
    cri: Option<CriJoiner>,
    /// What the reference CRI joiner holds.
    cri_ref: Option<CriPending>,
    multiline: Option<Multiline>,
    longest_piece: usize,
    now: Instant,
}

/// Partial CRI lines joined so far: time and stream of the first one, and the content.
struct CriPending {
    time: Option<DateTime<FixedOffset>>,
    stream: String,
    content: Vec<u8>,
}

/// A CRI log line: `<time> <stream> <P|F> <content>`.
struct CriLine<'a> {
    time: &'a [u8],
    stream: &'a [u8],
    partial: bool,
    content: &'a [u8],
}

fn split_cri(line: &[u8]) -> Option<CriLine<'_>> {
    let mut parts = line.splitn(4, |b| *b == b' ');
    let time = parts.next()?;
    let stream = parts.next()?;
    let partial = match parts.next()? {
        b"P" => true,
        b"F" => false,
        _ => return None,
    };
    let content = parts.next().unwrap_or_default();
    matches!(stream, b"stdout" | b"stderr").then_some(CriLine {
        time,
        stream,
        partial,
        content,
    })
}

impl Run<'_> {
    fn line(&mut self, bytes: &[u8], end: u64) {
        if self.cri.is_none() && self.multiline.is_none() {
            self.emit(bytes, None, None);
            return;
        }
        let piece = match self.cri.as_mut() {
            Some(j) => {
                let got = j.push(bytes);
                let want = cri_reference(&mut self.cri_ref, bytes, self.max);
                assert_eq!(j.has_pending(), self.cri_ref.is_some(), "{bytes:?}");
                assert_eq!(got, want, "CRI line {bytes:?}");
                let Some(e) = got else { return };
                assert!(e.content.len() <= self.max || e.failed, "{e:?}");
                Piece {
                    bytes: e.content,
                    end,
                    time: e.time,
                    stream: (!e.failed).then_some(e.stream),
                }
            }
            None => Piece {
                bytes: bytes.to_vec(),
                end,
                time: None,
                stream: None,
            },
        };
        match self.multiline.as_mut() {
            Some(m) => {
                self.longest_piece = self.longest_piece.max(piece.bytes.len());
                if let Some(p) = m.push(piece, self.now) {
                    self.multiline_record(p);
                }
            }
            None => self.emit(&piece.bytes, piece.time, piece.stream),
        }
    }

    fn multiline_record(&mut self, p: Piece) {
        assert!(
            p.bytes.len() <= self.max.max(self.longest_piece),
            "a multiline record of {} bytes",
            p.bytes.len()
        );
        self.emit(&p.bytes, p.time, p.stream);
    }

    fn emit(&mut self, bytes: &[u8], time: Option<DateTime<FixedOffset>>, stream: Option<String>) {
        if bytes.is_empty() {
            return;
        }
        let text = match std::str::from_utf8(bytes) {
            Ok(t) => Cow::Borrowed(t),
            Err(_) => String::from_utf8_lossy(bytes),
        };
        let parsed = match &self.parser {
            ParserConfig::None => None,
            other => {
                let p = parse::parse(other, text.clone().into_owned());
                parsed_agrees(other, &text, &p);
                Some(p)
            }
        };
        let timestamp = match parsed.as_ref().and_then(|p| p.time).or(time) {
            Some(t) => {
                // What Loki gets (the tailer ships 0 when this is None).
                assert!(
                    t.timestamp_nanos_opt().is_some(),
                    "{t} is past Unix nanoseconds"
                );
                record::format_time(t.with_timezone(&Utc))
            }
            None => self.clock.clone(),
        };
        let no_fields = Map::new();
        let parts = RecordParts {
            message: parsed.as_ref().map_or(&text, |p| &p.message),
            timestamp: &timestamp,
            parsed: parsed.as_ref().map_or(&no_fields, |p| &p.fields),
            stream: stream.as_deref(),
        };
        let kept = filter::keep(self.filters, |f| parts.field(&self.fixed, f));
        let mut out = BytesMut::new();
        parts.encode_into(&self.fixed, &mut out);
        let rec = match serde_json::from_slice::<Entries>(&out) {
            Ok(Entries(e)) => e,
            Err(e) => panic!("the record is not a JSON object ({e}): {out:?}"),
        };
        let mut seen: BTreeMap<&str, &Value> = BTreeMap::new();
        for (k, v) in &rec {
            assert!(seen.insert(k, v).is_none(), "key {k:?} twice in {out:?}");
        }
        let why = format!("record {out:?} from {text:?}");
        for (k, v) in &self.fixed_values {
            assert_eq!(
                seen.get(k.as_str()).and_then(|v| v.as_str()),
                Some(v.as_str()),
                "{k}: {why}"
            );
        }
        let own = [
            Some(parts.message),
            Some(timestamp.as_str()),
            stream.as_deref(),
        ];
        for (k, v) in OWN_KEYS.into_iter().zip(own) {
            if let Some(v) = v
                && !self.fixed_values.contains_key(k)
            {
                assert_eq!(seen.get(k).and_then(|v| v.as_str()), Some(v), "{k}: {why}");
            }
        }
        if let Some(ts) = seen.get("timestamp").and_then(|v| v.as_str())
            && !self.fixed_values.contains_key("timestamp")
        {
            assert!(
                record::parse_time(ts).is_some(),
                "the record's timestamp {ts:?} is not RFC 3339: {why}"
            );
        }
        for (k, v) in parts.parsed {
            let shadowed = self.fixed_values.contains_key(k)
                || matches!(k.as_str(), "message" | "timestamp")
                || (k == "stream" && stream.is_some());
            if !shadowed {
                assert_eq!(seen.get(k.as_str()), Some(&v), "{k}: {why}");
            }
        }
        // The filters saw what the record carries.
        let text_of = |f: &str| match seen.get(f) {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
        };
        let want = self.filters.iter().all(|f| {
            f.pattern
                .is_match(&text_of(f.field.as_deref().unwrap_or("message")))
                == f.include
        });
        assert_eq!(kept, want, "filters on {why}");
    }
}

/// The reference CRI joiner: a non-CRI line comes out raw; partials collect (capped at
/// `max`) under the time and stream of the first one until a final line.
fn cri_reference(
    pending: &mut Option<CriPending>,
    line: &[u8],
    max: usize,
) -> Option<parse::CriEntry> {
    let Some(cri) = split_cri(line) else {
        return Some(parse::CriEntry {
            time: None,
            stream: String::new(),
            content: line.to_vec(),
            failed: true,
        });
    };
    let p = pending.get_or_insert_with(|| CriPending {
        time: std::str::from_utf8(cri.time)
            .ok()
            .and_then(record::parse_time),
        stream: String::from_utf8_lossy(cri.stream).into_owned(),
        content: Vec::new(),
    });
    let room = max.saturating_sub(p.content.len());
    p.content
        .extend_from_slice(&cri.content[..cri.content.len().min(room)]);
    if cri.partial {
        return None;
    }
    pending.take().map(|p| parse::CriEntry {
        time: p.time,
        stream: p.stream,
        content: p.content,
        failed: false,
    })
}

fn parsed_agrees(parser: &ParserConfig, text: &str, p: &Parsed) {
    match parser {
        ParserConfig::Json => {
            let Ok(Value::Object(mut obj)) = serde_json::from_str::<Value>(text) else {
                assert!(
                    p.failed && p.message == text && p.fields.is_empty(),
                    "{text:?}: {p:?}"
                );
                return;
            };
            assert!(!p.failed, "{text:?}");
            let key = MESSAGE_KEYS
                .into_iter()
                .find(|k| obj.get(*k).is_some_and(Value::is_string));
            let message = match key.and_then(|k| obj.remove(k)) {
                Some(Value::String(m)) => m,
                _ => text.to_owned(),
            };
            assert_eq!(p.message, message, "{text:?}");
            let time = TIME_KEYS
                .into_iter()
                .filter_map(|k| obj.get(k)?.as_str())
                .find_map(record::parse_time);
            assert_eq!(p.time, time, "{text:?}");
            assert_eq!(p.fields, obj, "{text:?}");
        }
        ParserConfig::Regex(re) => {
            assert_eq!(p.failed, !re.is_match(text), "{text:?}");
            if p.failed {
                assert_eq!(p.message, text);
            }
            for (k, v) in &p.fields {
                assert!(re.capture_names().flatten().any(|n| n == k), "{k}");
                assert!(v.as_str().is_some_and(|v| text.contains(v)), "{k}: {v}");
            }
        }
        ParserConfig::None => {}
    }
}

/// A JSON object's entries in order, duplicates kept (a map would hide them).
struct Entries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Entries, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = m.next_entry::<String, Value>()? {
                    out.push(entry);
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}
