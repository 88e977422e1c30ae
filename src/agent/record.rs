//! The record the sinks ship: one JSON object with `message`, `timestamp` (RFC 3339),
//! `file`, `node`, `input`, pod metadata from `/var/log/pods/...` paths, the pipeline's
//! `fields` and the parsed fields at the top level. Fixed fields win over parsed ones, so a
//! log line cannot forge `node` or the pipeline's `fields`.

use std::collections::BTreeMap;
use std::sync::Arc;

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
    /// The record as compact JSON (no trailing newline).
    pub json: Vec<u8>,
    /// Deterministic id (file identity + end offset): the same line re-read after a crash
    /// gets the same id, so Elasticsearch `create` answers 409 instead of duplicating it.
    pub id: String,
    /// Record time in Unix nanoseconds (Loki wants it).
    pub ts_nanos: i64,
}

/// A record to ship, or only a position to checkpoint (lines that were filtered out still
/// advance the checkpoint once everything before them is acknowledged).
#[derive(Clone, Debug)]
pub struct Event {
    pub pos: SourcePos,
    pub record: Option<Encoded>,
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
    pub fn size(&self) -> usize {
        match self {
            Item::Event(e) => 96 + e.record.as_ref().map_or(0, |r| r.json.len() + r.id.len()),
            Item::Forget(k) => 32 + k.len(),
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

/// Parses `/var/log/pods/<namespace>_<pod>_<uid>/<container>/<n>.log`.
pub fn pod_from_path(path: &str) -> Option<PodInfo> {
    let rest = path.strip_prefix("/var/log/pods/")?;
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

/// Builds the record object. `parsed` are the parser's fields (`message` already removed),
/// `time` the parsed timestamp if any, else `read_time` is used.
pub fn build(
    ctx: &RecordContext,
    file: &str,
    pod: Option<&PodInfo>,
    message: String,
    parsed: Map<String, Value>,
    time: Option<DateTime<FixedOffset>>,
    read_time: DateTime<Utc>,
) -> (Map<String, Value>, i64) {
    let mut rec = parsed;
    let ts = time.map(|t| t.with_timezone(&Utc)).unwrap_or(read_time);
    rec.insert("message".into(), Value::String(message));
    rec.insert(
        "timestamp".into(),
        Value::String(ts.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
    );
    rec.insert("file".into(), Value::String(file.into()));
    rec.insert("node".into(), Value::String(ctx.node.clone()));
    rec.insert("input".into(), Value::String(ctx.input.clone()));
    if let Some(p) = pod {
        rec.insert("namespace".into(), Value::String(p.namespace.clone()));
        rec.insert("pod".into(), Value::String(p.pod.clone()));
        rec.insert("container".into(), Value::String(p.container.clone()));
    }
    for (k, v) in &ctx.fields {
        rec.insert(k.clone(), Value::String(v.clone()));
    }
    (rec, ts.timestamp_nanos_opt().unwrap_or(0))
}

/// Reads a timestamp the way log records usually carry one.
pub fn parse_time(s: &str) -> Option<DateTime<FixedOffset>> {
    DateTime::parse_from_rfc3339(s).ok()
}

/// Text of a field for filters and label templates (`""` when missing; JSON for non-strings).
pub fn field_text<'a>(rec: &'a Map<String, Value>, field: &str) -> std::borrow::Cow<'a, str> {
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
    fn pod_metadata_comes_from_kubelet_log_paths() {
        let p = pod_from_path("/var/log/pods/prod_shop-7d9_1234-abcd/app/0.log").unwrap();
        assert_eq!(
            p,
            PodInfo {
                namespace: "prod".into(),
                pod: "shop-7d9".into(),
                container: "app".into()
            }
        );
        assert_eq!(pod_from_path("/var/log/app/x.log"), None);
        assert_eq!(pod_from_path("/var/log/pods/bad/app/0.log"), None);
    }

    #[test]
    fn pipeline_fields_and_node_override_parsed_fields() {
        let ctx = RecordContext {
            node: "n1".into(),
            input: "app".into(),
            fields: [("service".to_string(), "shop".to_string())].into(),
        };
        let mut parsed = Map::new();
        parsed.insert("service".into(), "forged".into());
        parsed.insert("node".into(), "forged".into());
        parsed.insert("level".into(), "INFO".into());
        let t = parse_time("2026-11-28T10:00:00.5+01:00");
        let (rec, ns) = build(&ctx, "/f", None, "hi".into(), parsed, t, Utc::now());
        assert_eq!(rec["service"], "shop");
        assert_eq!(rec["node"], "n1");
        assert_eq!(rec["level"], "INFO");
        assert_eq!(rec["message"], "hi");
        assert_eq!(rec["timestamp"], "2026-11-28T09:00:00.500Z");
        assert_eq!(ns, 1_795_856_400_500_000_000);
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
