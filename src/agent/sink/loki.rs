//! Loki push API output (JSON). Records are grouped into streams by their rendered labels
//! (`{{field}}` templates); the line is the record JSON. Loki answers 204; a 400 means the
//! entries are bad and retrying will not help (dead-lettered); 429/5xx are retried.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::elasticsearch::join;
use super::{Attempt, HttpOptions, SinkError, classify};
use crate::agent::record::{Encoded, Template};

#[derive(Debug)]
pub struct LokiSink {
    url: reqwest::Url,
    labels: Vec<(String, Template)>,
    tenant: Option<String>,
    opts: HttpOptions,
}

impl LokiSink {
    /// Label templates were validated with the config; one that fails here is dropped.
    pub fn new(
        base: reqwest::Url,
        labels: &BTreeMap<String, String>,
        tenant: Option<String>,
        opts: HttpOptions,
    ) -> Self {
        let labels = labels
            .iter()
            .filter_map(|(k, v)| Template::parse(v).ok().map(|t| (k.clone(), t)))
            .collect();
        Self {
            url: join(&base, "loki/api/v1/push"),
            labels,
            tenant,
            opts,
        }
    }

    pub async fn send(&mut self, records: &[&Encoded]) -> Result<Attempt, SinkError> {
        let body = push_body(&self.labels, records);
        let extra: Vec<(&str, &str)> = self
            .tenant
            .as_deref()
            .map(|t| ("X-Scope-OrgID", t))
            .into_iter()
            .collect();
        let (status, resp) = self
            .opts
            .post(self.url.clone(), "application/json", body, &extra)
            .await
            .map_err(SinkError::Retryable)?;
        classify(status, &resp)?;
        Ok(Attempt::default())
    }
}

/// The push request: one stream per distinct label set, entries in record order.
pub fn push_body(labels: &[(String, Template)], records: &[&Encoded]) -> Vec<u8> {
    let mut streams: BTreeMap<BTreeMap<String, String>, Vec<Value>> = BTreeMap::new();
    for r in records {
        let rec: Map<String, Value> = serde_json::from_slice(&r.json).unwrap_or_default();
        let set: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, t)| (k.clone(), t.render(&rec)))
            .collect();
        let line = String::from_utf8_lossy(&r.json).into_owned();
        streams.entry(set).or_default().push(Value::Array(vec![
            Value::String(r.ts_nanos.to_string()),
            Value::String(line),
        ]));
    }
    let streams: Vec<Value> = streams
        .into_iter()
        .map(|(stream, values)| serde_json::json!({"stream": stream, "values": values}))
        .collect();
    serde_json::to_vec(&serde_json::json!({ "streams": streams })).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

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
            .unwrap(),
            id: String::new(),
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
}
