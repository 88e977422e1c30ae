//! The record the sinks ship: one JSON object with `message`, `timestamp` (RFC 3339),
//! `file`, `node`, `input`, pod metadata from `/var/log/pods/...` paths, the pipeline's
//! `fields` and the parsed fields at the top level. Fixed fields win over parsed ones, so a
//! log line cannot forge `node` or the pipeline's `fields`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use chrono::{DateTime, FixedOffset, SecondsFormat, Utc};
use serde_json::{Map, Value};

use super::identity::Fingerprint;

/// Where a record ends in its file: the checkpoint moves here once the record is delivered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourcePos {
    /// Checkpoint key of the file (see [`crate::agent::identity::DevIno::key`]).
    pub file: Arc<str>,
    /// Path the file had when it was opened.
    pub path: Arc<str>,
    /// Fingerprint of the file when this record was read.
    pub fingerprint: Arc<Fingerprint>,
    /// Byte offset just past the record's last line.
    pub offset: u64,
}

/// A record serialized once for every sink, with what sinks need besides the JSON.
#[derive(Clone, Debug)]
pub struct Encoded {
    /// The record as compact JSON (no trailing newline). Records of one group are slices
    /// of one shared allocation.
    pub json: Bytes,
    /// Deterministic id (file identity + end offset): the same line re-read after a crash
    /// gets the same id, so Elasticsearch `create` answers 409 instead of duplicating it.
    pub id: RecordId,
    /// Record time in Unix nanoseconds (Loki wants it).
    pub ts_nanos: i64,
}

/// A record id kept inline: one allocation per record fewer than a `String`. Ids are 32
/// hex digits; ids read back from a disk buffer written by other versions are kept up to
/// 32 bytes. Empty when no output of the pipeline uses ids (hashing every line costs
/// time that only Elasticsearch's `create` pays back).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct RecordId {
    bytes: [u8; 32],
    len: u8,
}

impl RecordId {
    /// Id from a 128-bit digest, as 32 hex digits.
    pub fn from_digest(digest: u128) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = HEX[((digest >> ((31 - i) * 4)) & 0xf) as usize];
        }
        Self { bytes, len: 32 }
    }

    pub fn as_str(&self) -> &str {
        // Only whole UTF-8 characters are ever stored (see `From<&str>`).
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl From<&str> for RecordId {
    /// Keeps at most 32 bytes, cut at a character boundary.
    fn from(s: &str) -> Self {
        let mut len = s.len().min(32);
        while !s.is_char_boundary(len) {
            len -= 1;
        }
        let mut bytes = [0u8; 32];
        bytes[..len].copy_from_slice(&s.as_bytes()[..len]);
        Self {
            bytes,
            len: len as u8,
        }
    }
}

impl From<String> for RecordId {
    fn from(s: String) -> Self {
        Self::from(s.as_str())
    }
}

impl PartialEq<&str> for RecordId {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::fmt::Debug for RecordId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for RecordId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for RecordId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Consecutive records of one file, or only a position to checkpoint (lines that were
/// filtered out still advance the checkpoint once everything before them is
/// acknowledged). Records travel in groups so the buffer, the batch and the checkpoint
/// handle one item per group instead of one per line.
#[derive(Clone, Debug)]
pub struct Event {
    /// Where the last line this event accounts for ends.
    pub pos: SourcePos,
    /// The records, in file order (empty when every line was filtered out).
    pub records: Vec<Encoded>,
    /// The records as NDJSON (each followed by `\n`): the allocation their `json` slices
    /// point into, so an output can send a whole group without copying it.
    pub ndjson: Bytes,
    /// File bytes this event accounts for (checkpoint lag).
    pub consumed: u64,
}

/// One item in the buffer, in file order.
#[derive(Clone, Debug)]
pub enum Item {
    Event(Event),
    /// The file is released and no longer matched: drop its checkpoint once everything
    /// before this item is acknowledged.
    Forget(Arc<str>),
}

impl Item {
    /// Bytes this item holds in the buffer (what backpressure counts).
    /// Counts what the allocations really hold (capacities, the item itself and its slot
    /// in the queue and the batch), so the buffer's bound is close to its memory.
    pub fn size(&self) -> usize {
        const OVERHEAD: usize = 2 * std::mem::size_of::<Item>() + 16;
        const PER_RECORD: usize = std::mem::size_of::<Encoded>() + 16;
        match self {
            Item::Event(e) => {
                OVERHEAD
                    + e.records
                        .iter()
                        .map(|r| PER_RECORD + r.json.len())
                        .sum::<usize>()
            }
            Item::Forget(k) => OVERHEAD + k.len(),
        }
    }
}

/// What every record of one input carries.
#[derive(Clone, Debug)]
pub struct RecordContext {
    pub node: String,
    pub input: String,
    pub fields: BTreeMap<String, String>,
}

/// Pod metadata taken from a kubelet log path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

/// Parses `<root>/<namespace>_<pod>_<uid>/<container>/<n>.log` (`root` ends in `/`).
pub fn pod_from_path(path: &str, root: &str) -> Option<PodInfo> {
    let rest = path.strip_prefix(root)?;
    let mut parts = rest.split('/');
    let dir = parts.next()?;
    let container = parts.next()?;
    parts.next()?;
    let mut it = dir.splitn(3, '_');
    let namespace = it.next()?;
    let pod = it.next()?;
    it.next()?;
    if namespace.is_empty() || pod.is_empty() || container.is_empty() {
        return None;
    }
    Some(PodInfo {
        namespace: namespace.into(),
        pod: pod.into(),
        container: container.into(),
    })
}

/// What every record of one file carries besides its own parts: `file`, `node`, `input`,
/// pod metadata and the pipeline's `fields`, serialized once when the file is opened. These
/// win over the record's own fields (the pipeline's `fields` over everything), so a log line
/// cannot forge `node` or the pipeline's `fields`.
#[derive(Clone, Debug)]
pub struct FixedFields {
    values: BTreeMap<String, String>,
    /// Whether `message`, `timestamp` and `stream` are fixed (looked up once, not per line).
    fixed_own: [bool; 3],
    /// `"k":"v",...` of `values`, without braces; never empty (`file` is always there).
    json: Vec<u8>,
}

impl FixedFields {
    /// Bytes the fixed fields add to every record.
    pub fn json_len(&self) -> usize {
        self.json.len()
    }

    pub fn new(ctx: &RecordContext, file: &str, pod: Option<&PodInfo>) -> Self {
        let mut values = BTreeMap::new();
        values.insert("file".to_string(), file.to_string());
        values.insert("node".to_string(), ctx.node.clone());
        values.insert("input".to_string(), ctx.input.clone());
        if let Some(p) = pod {
            values.insert("namespace".to_string(), p.namespace.clone());
            values.insert("pod".to_string(), p.pod.clone());
            values.insert("container".to_string(), p.container.clone());
        }
        for (k, v) in &ctx.fields {
            values.insert(k.clone(), v.clone());
        }
        let mut json = Vec::new();
        for (i, (k, v)) in values.iter().enumerate() {
            if i > 0 {
                json.put_u8(b',');
            }
            push_json_str(&mut json, k);
            json.put_u8(b':');
            push_json_str(&mut json, v);
        }
        let fixed_own = OWN_KEYS.map(|k| values.contains_key(k));
        Self {
            values,
            fixed_own,
            json,
        }
    }
}

/// The fields a record brings itself, in the order they are written.
const OWN_KEYS: [&str; 3] = ["message", "timestamp", "stream"];

/// One record's own parts; the rest comes from [`FixedFields`]. Borrowed, so a plain line
/// is encoded straight from the read buffer into the record's JSON.
pub struct RecordParts<'a> {
    pub message: &'a str,
    /// The record's time, RFC 3339.
    pub timestamp: &'a str,
    /// The parser's fields (`message` already taken out).
    pub parsed: &'a Map<String, Value>,
    /// The CRI stream (`stdout`/`stderr`), which wins over a parsed `stream`.
    pub stream: Option<&'a str>,
}

impl<'a> RecordParts<'a> {
    /// The record as compact JSON on its own (the tailer appends to a group's block).
    #[cfg(test)]
    pub fn encode(&self, fixed: &FixedFields) -> Vec<u8> {
        let mut out = BytesMut::new();
        self.encode_into(fixed, &mut out);
        out.to_vec()
    }

    /// Appends the record as compact JSON to `out`: the records of a group share one
    /// allocation (each then a [`Bytes`] slice of it).
    pub fn encode_into(&self, fixed: &FixedFields, out: &mut BytesMut) {
        out.reserve(40 + self.message.len() + self.timestamp.len() + fixed.json.len());
        out.put_u8(b'{');
        for (k, v) in self.parsed {
            let own = matches!(k.as_str(), "message" | "timestamp")
                || (k == "stream" && self.stream.is_some());
            if own || fixed.values.contains_key(k) {
                continue;
            }
            push_json_str(out, k);
            out.put_u8(b':');
            push_json(out, v);
            out.put_u8(b',');
        }
        let own = [Some(self.message), Some(self.timestamp), self.stream];
        for ((k, v), fixed) in OWN_KEYS.into_iter().zip(own).zip(fixed.fixed_own) {
            if let Some(v) = v
                && !fixed
            {
                push_json_str(out, k);
                out.put_u8(b':');
                push_json_str(out, v);
                out.put_u8(b',');
            }
        }
        out.put_slice(&fixed.json);
        out.put_u8(b'}');
    }

    /// Text of a field as filters see it (`""` when missing; JSON for non-strings).
    pub fn field<'b>(&'b self, fixed: &'b FixedFields, name: &str) -> Cow<'b, str>
    where
        'a: 'b,
    {
        if let Some(v) = fixed.values.get(name) {
            return v.as_str().into();
        }
        match (name, self.stream) {
            ("message", _) => self.message.into(),
            ("timestamp", _) => self.timestamp.into(),
            ("stream", Some(s)) => s.into(),
            _ => field_text(self.parsed, name),
        }
    }
}

/// Appends `v` as JSON. Serializing a string or a JSON value into a `Vec` cannot fail (no
/// I/O error, no non-string map keys), so the result carries nothing to handle.
fn push_json<T: serde::Serialize + ?Sized>(out: &mut impl BufMut, v: &T) {
    let _ = serde_json::to_writer(out.writer(), v);
}

/// Appends a string as JSON. Most log text needs no escaping: that is checked 16 bytes at a
/// time (a loop the compiler vectorizes) and the text copied whole; only text with quotes,
/// backslashes or control characters goes through the escaper.
pub fn push_json_str(out: &mut impl BufMut, s: &str) {
    if !needs_escape(s.as_bytes()) {
        out.put_u8(b'"');
        out.put_slice(s.as_bytes());
        out.put_u8(b'"');
    } else {
        push_json(out, s);
    }
}

/// Whether a JSON string needs escaping: a quote, a backslash or a control character.
/// Fixed 32-byte blocks, OR-ed without branches, so the compiler turns each block into a
/// few vector instructions.
fn needs_escape(s: &[u8]) -> bool {
    let bad = |b: u8| u8::from(b < 0x20) | u8::from(b == b'"') | u8::from(b == b'\\');
    let mut blocks = s.chunks_exact(32);
    for block in &mut blocks {
        if block.iter().fold(0u8, |acc, &b| acc | bad(b)) != 0 {
            return true;
        }
    }
    blocks.remainder().iter().any(|&b| bad(b) != 0)
}

/// Formats a record time the way every record carries it.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Reads a timestamp the way log records usually carry one. Times outside Unix nanoseconds
/// (1677..2262) count as none: their record would ship `ts_nanos` 0 and, past year 0 or
/// 9999 in UTC, a timestamp that is not RFC 3339 (`-0001-12-31T23:00:00Z`).
pub fn parse_time(s: &str) -> Option<DateTime<FixedOffset>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .filter(|t| t.timestamp_nanos_opt().is_some())
}

/// Text of a field for filters and label templates (`""` when missing; JSON for non-strings).
pub fn field_text<'a>(rec: &'a Map<String, Value>, field: &str) -> Cow<'a, str> {
    match rec.get(field) {
        None | Some(Value::Null) => "".into(),
        Some(Value::String(s)) => s.as_str().into(),
        Some(v) => v.to_string().into(),
    }
}

/// A label value template: literal text with `{{field}}` placeholders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template(Vec<Part>);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Lit(String),
    Field(String),
}

impl Template {
    /// Parses `"{{service}}-{{node}}"`; an unclosed `{{` is an error.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                parts.push(Part::Lit(rest[..start].into()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find("}}")
                .ok_or_else(|| format!("unclosed '{{{{' in {s:?}"))?;
            let name = after[..end].trim();
            if name.is_empty() {
                return Err(format!("empty '{{{{}}}}' in {s:?}"));
            }
            parts.push(Part::Field(name.into()));
            rest = &after[end + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.into()));
        }
        Ok(Self(parts))
    }

    /// The fields the template reads.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.0.iter().filter_map(|p| match p {
            Part::Field(f) => Some(f.as_str()),
            Part::Lit(_) => None,
        })
    }

    /// Renders with the record's fields.
    pub fn render(&self, rec: &Map<String, Value>) -> String {
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Field(f) => out.push_str(&field_text(rec, f)),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_outside_unix_nanoseconds_count_as_none() {
        // found by fuzzing: they shipped ts_nanos 0 and a timestamp that is not RFC 3339
        for t in [
            "0000-01-01T00:00:00+01:00",
            "1000-01-01T00:00:00Z",
            "9999-12-31T23:59:59-23:59",
        ] {
            assert_eq!(parse_time(t), None, "{t}");
        }
        let t = parse_time("2026-12-07T12:00:00.5+01:00").expect("a normal time");
        assert_eq!(t.timestamp_nanos_opt(), Some(1_796_641_200_500_000_000));
    }

    #[test]
    fn pod_metadata_comes_from_kubelet_log_paths() {
        let p = pod_from_path(
            "/var/log/pods/prod_shop-7d9_1234-abcd/app/0.log",
            "/var/log/pods/",
        )
        .unwrap();
        assert_eq!(
            p,
            PodInfo {
                namespace: "prod".into(),
                pod: "shop-7d9".into(),
                container: "app".into()
            }
        );
        assert_eq!(pod_from_path("/var/log/app/x.log", "/var/log/pods/"), None);
        assert_eq!(
            pod_from_path("/var/log/pods/bad/app/0.log", "/var/log/pods/"),
            None
        );
    }

    #[test]
    fn pipeline_fields_and_node_override_parsed_fields() {
        let ctx = RecordContext {
            node: "n1".into(),
            input: "app".into(),
            fields: [("service".to_string(), "shop".to_string())].into(),
        };
        let fixed = FixedFields::new(&ctx, "/f", None);
        let mut parsed = Map::new();
        parsed.insert("service".into(), "forged".into());
        parsed.insert("node".into(), "forged".into());
        parsed.insert("level".into(), "INFO".into());
        parsed.insert("stream".into(), "forged".into());
        parsed.insert("n".into(), 7.into());
        let ts = format_time(
            parse_time("2026-11-28T10:00:00.5+01:00")
                .unwrap()
                .with_timezone(&Utc),
        );
        let parts = RecordParts {
            message: "hi \"there\"\n",
            timestamp: &ts,
            parsed: &parsed,
            stream: Some("stderr"),
        };
        let json = parts.encode(&fixed);
        let rec: Map<String, Value> = serde_json::from_slice(&json).unwrap();
        assert_eq!(rec["service"], "shop");
        assert_eq!(rec["node"], "n1");
        assert_eq!(rec["level"], "INFO");
        assert_eq!(rec["n"], 7);
        assert_eq!(rec["stream"], "stderr");
        assert_eq!(rec["message"], "hi \"there\"\n");
        assert_eq!(rec["timestamp"], "2026-11-28T09:00:00.500Z");
        assert_eq!(rec["file"], "/f");
        assert_eq!(rec["input"], "app");
        assert_eq!(
            rec.len(),
            9,
            "no key twice: {}",
            String::from_utf8_lossy(&json)
        );
        // Filters see the same values the record carries.
        assert_eq!(parts.field(&fixed, "service"), "shop");
        assert_eq!(parts.field(&fixed, "stream"), "stderr");
        assert_eq!(parts.field(&fixed, "n"), "7");
        assert_eq!(parts.field(&fixed, "missing"), "");
    }

    #[test]
    fn pod_fields_come_from_the_path_and_a_plain_line_has_only_fixed_fields() {
        let ctx = RecordContext {
            node: "n1".into(),
            input: "pods".into(),
            fields: Default::default(),
        };
        let path = "/var/log/pods/prod_shop-7d9_1234-abcd/app/0.log";
        let fixed = FixedFields::new(&ctx, path, pod_from_path(path, "/var/log/pods/").as_ref());
        let json = RecordParts {
            message: "plain",
            timestamp: "2026-11-28T09:00:00Z",
            parsed: &Map::new(),
            stream: None,
        }
        .encode(&fixed);
        let rec: Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(
            rec,
            serde_json::json!({"message": "plain", "timestamp": "2026-11-28T09:00:00Z",
                "file": path, "node": "n1", "input": "pods",
                "namespace": "prod", "pod": "shop-7d9", "container": "app"})
        );
    }

    #[test]
    fn strings_are_escaped_exactly_as_serde_json_does_on_both_paths() {
        let long_plain = "x".repeat(40) + "é ünïcode";
        // A quote in the last partial block, and a backslash and a control character inside
        // a later full 32-byte block.
        let quote_in_tail = "x".repeat(40) + "\"";
        let backslash_in_block = "x".repeat(50) + "\\" + &"y".repeat(20);
        let control_in_block = "x".repeat(33) + "\u{1f}" + &"y".repeat(40);
        let cases = [
            quote_in_tail.as_str(),
            backslash_in_block.as_str(),
            control_in_block.as_str(),
            "",
            "plain text",
            long_plain.as_str(),
            "quote \" at 8",
            "back\\slash",
            "tab\tand\nnewline and \u{1}",
            "sixteen bytes ok\"",
        ];
        for s in cases {
            let mut ours = Vec::new();
            push_json_str(&mut ours, s);
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                serde_json::to_string(s).unwrap()
            );
        }
    }

    #[test]
    fn label_templates_substitute_fields() {
        let t = Template::parse("{{service}}-{{ node }}/x").unwrap();
        let mut rec = Map::new();
        rec.insert("service".into(), "shop".into());
        rec.insert("node".into(), "n1".into());
        assert_eq!(t.render(&rec), "shop-n1/x");
        assert_eq!(Template::parse("plain").unwrap().render(&rec), "plain");
        assert!(Template::parse("{{oops").is_err());
    }
}
