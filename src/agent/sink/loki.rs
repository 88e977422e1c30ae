//! Loki push API output, JSON or protobuf. Records are grouped into streams by their
//! rendered labels (`{{field}}` templates); the line is the record JSON. Loki answers 204; a
//! 400 means the entries are bad and retrying will not help (dead-lettered); 429/5xx are
//! retried.
//!
//! `encoding: protobuf` sends what Loki's own clients send: a logproto `PushRequest`,
//! snappy-compressed (block format), as `application/x-protobuf`. The messages are written
//! out by hand below (no protoc); their tags are those of Loki's `push.proto`.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value};

use super::elasticsearch::join;
use super::{Attempt, HttpOptions, SinkError, classify};
use crate::agent::record::{Encoded, Template, push_json_str};
use crate::api::log_pipeline::LokiEncoding;

#[derive(Debug)]
pub struct LokiSink {
    url: reqwest::Url,
    labels: Vec<(String, Template)>,
    tenant: Option<String>,
    encoding: LokiEncoding,
    opts: HttpOptions,
}

impl LokiSink {
    /// `labels` are the templates the config parsed (and refused when bad).
    /// A protobuf body is snappy-compressed already: it is never gzipped on top.
    pub fn new(
        base: reqwest::Url,
        labels: Vec<(String, Template)>,
        tenant: Option<String>,
        encoding: LokiEncoding,
        mut opts: HttpOptions,
    ) -> Self {
        if encoding == LokiEncoding::Protobuf {
            opts.gzip = false;
        }
        Self {
            url: join(&base, "loki/api/v1/push"),
            labels,
            tenant,
            encoding,
            opts,
        }
    }

    pub async fn send(&self, records: &[&Encoded]) -> Result<Attempt, SinkError> {
        let (content_type, body) = match self.encoding {
            LokiEncoding::Json => ("application/json", push_body(&self.labels, records)),
            LokiEncoding::Protobuf => (
                "application/x-protobuf",
                protobuf_body(&self.labels, records)
                    .map_err(|e| SinkError::Rejected(format!("snappy: {e}")))?,
            ),
        };
        let extra: Vec<(&str, &str)> = self
            .tenant
            .as_deref()
            .map(|t| ("X-Scope-OrgID", t))
            .into_iter()
            .collect();
        let (status, resp) = self
            .opts
            .post(self.url.clone(), content_type, body, &extra)
            .await
            .map_err(SinkError::Retryable)?;
        classify(status, &resp)?;
        Ok(Attempt::default())
    }
}

/// A rendered label set and its records, in record order.
type Streams<'a> = BTreeMap<BTreeMap<String, String>, Vec<&'a Encoded>>;

/// One stream per distinct rendered label set. Only the fields the templates read are
/// taken from each record's JSON; the rest (the message above all) is skipped unparsed.
fn streams<'a>(labels: &[(String, Template)], records: &[&'a Encoded]) -> Streams<'a> {
    let wanted: Vec<&str> = labels.iter().flat_map(|(_, t)| t.fields()).collect();
    let mut streams = Streams::new();
    for r in records {
        let mut de = serde_json::Deserializer::from_slice(&r.json);
        let rec = Only(&wanted).deserialize(&mut de).unwrap_or_default();
        let set: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, t)| (k.clone(), t.render(&rec)))
            .collect();
        streams.entry(set).or_default().push(*r);
    }
    streams
}

/// The record as text (it was written as UTF-8 JSON; lossy only for a corrupt spool).
fn line(r: &Encoded) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(&r.json)
}

/// The JSON push request: one stream per distinct label set, entries in record order.
/// Written directly: each line is the record's JSON as a JSON string.
pub fn push_body(labels: &[(String, Template)], records: &[&Encoded]) -> Vec<u8> {
    let mut out = Vec::with_capacity(records.iter().map(|r| r.json.len() + 48).sum());
    out.extend_from_slice(b"{\"streams\":[");
    for (i, (set, entries)) in streams(labels, records).into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"stream\":");
        // A map of strings into a Vec: cannot fail.
        let _ = serde_json::to_writer(&mut out, &set);
        out.extend_from_slice(b",\"values\":[");
        for (j, r) in entries.into_iter().enumerate() {
            if j > 0 {
                out.push(b',');
            }
            out.extend_from_slice(format!("[\"{}\",", r.ts_nanos).as_bytes());
            push_json_str(&mut out, &line(r));
            out.push(b']');
        }
        out.extend_from_slice(b"]}");
    }
    out.extend_from_slice(b"]}");
    out
}

/// Deserializes only the named top-level fields of a JSON object.
struct Only<'w>(&'w [&'w str]);

impl<'de> DeserializeSeed<'de> for Only<'_> {
    type Value = Map<String, Value>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Only<'_> {
    type Value = Map<String, Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
        let mut out = Map::new();
        while let Some(Key(k)) = m.next_key()? {
            if self.0.contains(&k.as_ref()) {
                out.insert(k.into_owned(), m.next_value()?);
            } else {
                m.next_value::<IgnoredAny>()?;
            }
        }
        Ok(out)
    }
}

/// An object key, borrowed from the input when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

/// The protobuf push request, snappy-compressed.
pub fn protobuf_body(
    labels: &[(String, Template)],
    records: &[&Encoded],
) -> Result<Vec<u8>, snap::Error> {
    let req = push_request(labels, records);
    snap::raw::Encoder::new().compress_vec(&prost::Message::encode_to_vec(&req))
}

/// The logproto `PushRequest` for the records.
pub fn push_request(labels: &[(String, Template)], records: &[&Encoded]) -> logproto::PushRequest {
    let streams = streams(labels, records)
        .into_iter()
        .map(|(set, entries)| logproto::Stream {
            labels: label_string(&set),
            entries: entries
                .into_iter()
                .map(|r| logproto::Entry {
                    timestamp: Some(logproto::Timestamp {
                        seconds: r.ts_nanos.div_euclid(1_000_000_000),
                        // In 0..1e9, so it fits.
                        nanos: r.ts_nanos.rem_euclid(1_000_000_000) as i32,
                    }),
                    line: line(r).into_owned(),
                })
                .collect(),
        })
        .collect();
    logproto::PushRequest { streams }
}

/// A label set in Prometheus text syntax, `{a="x",b="y"}`: values are double-quoted with
/// `\`, `"` and newline escaped. Names were validated as label names with the config.
pub fn label_string(set: &BTreeMap<String, String>) -> String {
    let mut out = String::from("{");
    for (i, (k, v)) in set.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push_str("=\"");
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
    out
}

/// Loki's `logproto` push messages (`pkg/push/push.proto`), the fields the agent sends.
pub mod logproto {
    /// `logproto.PushRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PushRequest {
        #[prost(message, repeated, tag = "1")]
        pub streams: Vec<Stream>,
    }

    /// `logproto.StreamAdapter`: labels in Prometheus syntax and the entries.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Stream {
        #[prost(string, tag = "1")]
        pub labels: String,
        #[prost(message, repeated, tag = "2")]
        pub entries: Vec<Entry>,
    }

    /// `logproto.EntryAdapter`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Entry {
        #[prost(message, optional, tag = "1")]
        pub timestamp: Option<Timestamp>,
        #[prost(string, tag = "2")]
        pub line: String,
    }

    /// `google.protobuf.Timestamp`.
    #[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
    pub struct Timestamp {
        #[prost(int64, tag = "1")]
        pub seconds: i64,
        #[prost(int32, tag = "2")]
        pub nanos: i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_fields_are_read_alone_and_equal_what_a_full_parse_gives() {
        let json = br#"{"message":"a \"quoted\" line","n":7,"svc\u0041":"x","service":"shop","nested":{"a":[1,2]}}"#;
        let wanted = ["service", "n", "svcA", "missing"];
        let mut de = serde_json::Deserializer::from_slice(json);
        let only = Only(&wanted).deserialize(&mut de).unwrap();
        let full: Map<String, Value> = serde_json::from_slice(json).unwrap();
        for f in wanted {
            assert_eq!(only.get(f), full.get(f), "{f}");
        }
        assert_eq!(only.len(), 3, "{only:?}");
    }

    /// The label templates of a Loki output as the agent's config validates them.
    fn validated_labels(labels: &str) -> Result<Vec<(String, Template)>, String> {
        use crate::agent::config::{ClusterPipelineEntry, OutputKind, Sources, validate_cluster};
        let yaml = format!(
            r#"
inputs: [{{name: app, paths: ["/var/log/app/*.log"]}}]
outputs: [{{name: l, loki: {{url: "http://127.0.0.1:9", labels: {labels}}}}}]
"#
        );
        let p = validate_cluster(
            ClusterPipelineEntry {
                name: "shop".into(),
                spec: serde_yaml::from_str(&yaml).unwrap(),
            },
            &Sources::default(),
        )
        .map_err(|e| e.to_string())?;
        match &p.outputs[0].kind {
            OutputKind::Loki { labels, .. } => Ok(labels.clone()),
            other => panic!("not a Loki output: {other:?}"),
        }
    }

    #[test]
    fn the_sink_renders_the_templates_the_config_parsed_and_a_bad_one_never_gets_there() {
        let labels = validated_labels(r#"{svc: "{{service}}-x", job: fixed}"#).unwrap();
        assert_eq!(
            labels,
            [
                ("job".to_string(), Template::parse("fixed").unwrap()),
                ("svc".to_string(), Template::parse("{{service}}-x").unwrap()),
            ],
            "parsed once, in label-name order"
        );
        let r = Encoded {
            json: br#"{"service":"shop","message":"m"}"#.to_vec().into(),
            id: "".into(),
            ts_nanos: 1,
        };
        let body: Value = serde_json::from_slice(&push_body(&labels, &[&r])).unwrap();
        assert_eq!(
            body["streams"][0]["stream"],
            serde_json::json!({"job": "fixed", "svc": "shop-x"})
        );
        let err = validated_labels(r#"{ok: "{{service}}", bad: "{{oops"}"#).unwrap_err();
        assert!(err.contains("spec.outputs[0].loki.labels.bad"), "{err}");
    }

    #[test]
    fn records_are_grouped_into_streams_by_rendered_labels() {
        let labels = vec![
            (
                "service".to_string(),
                Template::parse("{{service}}").unwrap(),
            ),
            ("node".to_string(), Template::parse("{{node}}").unwrap()),
        ];
        let mk = |svc: &str, ts: i64| Encoded {
            json: serde_json::to_vec(
                &serde_json::json!({"service": svc, "node": "n1", "message": "m"}),
            )
            .unwrap()
            .into(),
            id: "".into(),
            ts_nanos: ts,
        };
        let (a, b, c) = (mk("shop", 1), mk("cart", 2), mk("shop", 3));
        let body: Value = serde_json::from_slice(&push_body(&labels, &[&a, &b, &c])).unwrap();
        let streams = body["streams"].as_array().unwrap();
        assert_eq!(streams.len(), 2);
        let shop = streams
            .iter()
            .find(|s| s["stream"]["service"] == "shop")
            .unwrap();
        assert_eq!(shop["stream"]["node"], "n1");
        let values = shop["values"].as_array().unwrap();
        assert_eq!(values.len(), 2);
        assert_eq!(values[0][0], "1");
        assert_eq!(values[1][0], "3");
    }

    #[test]
    fn label_values_are_quoted_and_escaped_in_prometheus_syntax() {
        let set: BTreeMap<String, String> = [
            ("app", "shop"),
            ("path", r"C:\logs"),
            ("quote", r#"say "hi""#),
            ("multi", "a\nb"),
            ("empty", ""),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            label_string(&set),
            r#"{app="shop",empty="",multi="a\nb",path="C:\\logs",quote="say \"hi\""}"#
        );
        assert_eq!(label_string(&BTreeMap::new()), "{}");
    }

    #[test]
    fn protobuf_body_is_snappy_framed_logproto_that_decodes_to_the_streams() {
        let labels = vec![(
            "service".to_string(),
            Template::parse("{{service}}").unwrap(),
        )];
        let mk = |svc: &str, ts: i64, msg: &str| Encoded {
            json: serde_json::to_vec(&serde_json::json!({"service": svc, "message": msg}))
                .unwrap()
                .into(),
            id: "".into(),
            ts_nanos: ts,
        };
        let a = mk("shop", 1_700_000_000_123_456_789, "first");
        let b = mk("cart", 5, "second");
        let c = mk("shop", -1, "before 1970");
        let body = protobuf_body(&labels, &[&a, &b, &c]).unwrap();
        let raw = snap::raw::Decoder::new().decompress_vec(&body).unwrap();
        let req = <logproto::PushRequest as prost::Message>::decode(raw.as_slice()).unwrap();
        assert_eq!(req, push_request(&labels, &[&a, &b, &c]));
        let names: Vec<&str> = req.streams.iter().map(|s| s.labels.as_str()).collect();
        assert_eq!(names, [r#"{service="cart"}"#, r#"{service="shop"}"#]);
        let shop = &req.streams[1].entries;
        assert_eq!(shop.len(), 2);
        assert_eq!(
            shop[0].timestamp,
            Some(logproto::Timestamp {
                seconds: 1_700_000_000,
                nanos: 123_456_789
            })
        );
        assert_eq!(shop[0].line, String::from_utf8(a.json.to_vec()).unwrap());
        // Timestamp keeps nanos non-negative: -1 ns is -1 s + 999999999 ns.
        assert_eq!(
            shop[1].timestamp,
            Some(logproto::Timestamp {
                seconds: -1,
                nanos: 999_999_999
            })
        );
        assert_eq!(
            req.streams[0].entries[0].line,
            String::from_utf8(b.json.to_vec()).unwrap()
        );
    }
}
