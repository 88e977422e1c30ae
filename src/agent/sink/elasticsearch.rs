//! Elasticsearch `_bulk` output. Every record is a `create` with a deterministic `_id`, so
//! a record re-sent after a crash answers 409 and is counted delivered instead of being
//! stored twice. The response is read per item: only 429/5xx items are retried; other
//! rejections (400 mapping errors) go to the dead-letter file.

use serde::Deserialize;

use super::{Attempt, HttpOptions, SinkError, classify};
use crate::agent::record::Encoded;

#[derive(Debug)]
pub struct EsSink {
    url: reqwest::Url,
    index: String,
    opts: HttpOptions,
}

impl EsSink {
    pub fn new(base: reqwest::Url, index: String, opts: HttpOptions) -> Self {
        Self {
            url: join(&base, "_bulk"),
            index,
            opts,
        }
    }

    pub async fn send(&self, records: &[&Encoded]) -> Result<Attempt, SinkError> {
        let body = bulk_body(&self.index, records);
        let (status, resp) = self
            .opts
            .post(self.url.clone(), "application/x-ndjson", body, &[])
            .await
            .map_err(SinkError::Retryable)?;
        classify(status, &resp)?;
        per_item(&resp, records.len())
    }
}

/// `base` with `segment` appended to its path.
pub(super) fn join(base: &reqwest::Url, segment: &str) -> reqwest::Url {
    let mut u = base.clone();
    let path = format!("{}/{segment}", base.path().trim_end_matches('/'));
    u.set_path(&path);
    u
}

/// The `_bulk` NDJSON body: an action line and the document per record.
pub fn bulk_body(index: &str, records: &[&Encoded]) -> Vec<u8> {
    let mut body = Vec::new();
    for r in records {
        // Records spooled while no output needed ids carry none: Elasticsearch picks one.
        let action = if r.id.is_empty() {
            serde_json::json!({"create": {"_index": index}})
        } else {
            serde_json::json!({"create": {"_index": index, "_id": r.id}})
        };
        body.extend_from_slice(action.to_string().as_bytes());
        body.push(b'\n');
        body.extend_from_slice(&r.json);
        body.push(b'\n');
    }
    body
}

#[derive(Deserialize)]
struct BulkResponse {
    #[serde(default)]
    errors: bool,
    #[serde(default)]
    items: Vec<serde_json::Map<String, serde_json::Value>>,
}

/// Reads per-item results. A response that cannot be matched to the request item by
/// item is retried whole: nothing is assumed delivered without evidence.
pub fn per_item(resp: &[u8], sent: usize) -> Result<Attempt, SinkError> {
    let parsed: BulkResponse = serde_json::from_slice(resp)
        .map_err(|e| SinkError::Retryable(format!("unreadable _bulk response: {e}")))?;
    let mut out = Attempt::default();
    if !parsed.errors && parsed.items.is_empty() {
        // Some proxies answer 200 without items; without evidence, retry.
        return Err(SinkError::Retryable("_bulk response has no items".into()));
    }
    if parsed.items.len() != sent {
        return Err(SinkError::Retryable(format!(
            "_bulk answered {} items for {sent} sent",
            parsed.items.len()
        )));
    }
    for (i, item) in parsed.items.iter().enumerate() {
        let Some(result) = item.values().next() else {
            out.retry.push(i);
            continue;
        };
        let status = result.get("status").and_then(|s| s.as_u64()).unwrap_or(0);
        match status {
            200..=299 => {}
            409 => out.duplicates += 1,
            429 | 500..=599 | 0 => out.retry.push(i),
            _ => {
                let reason = result
                    .get("error")
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                out.dead.push((i, format!("HTTP {status}: {reason}")));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(id: &str) -> Encoded {
        Encoded {
            json: br#"{"message":"m"}"#.to_vec().into(),
            id: id.into(),
            ts_nanos: 0,
        }
    }

    #[test]
    fn bulk_body_uses_create_with_deterministic_ids() {
        let (a, b) = (enc("id-a"), enc("id-b"));
        let body = String::from_utf8(bulk_body("logs", &[&a, &b])).unwrap();
        let lines: Vec<_> = body.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0], r#"{"create":{"_id":"id-a","_index":"logs"}}"#);
        assert_eq!(lines[1], r#"{"message":"m"}"#);
    }

    #[test]
    fn per_item_retries_only_429_and_5xx_dead_letters_400_and_counts_409_delivered() {
        let resp = br#"{"errors":true,"items":[
            {"create":{"status":201}},
            {"create":{"status":429,"error":{"type":"es_rejected_execution_exception"}}},
            {"create":{"status":400,"error":{"type":"mapper_parsing_exception"}}},
            {"create":{"status":409,"error":{"type":"version_conflict_engine_exception"}}},
            {"create":{"status":503}}
        ]}"#;
        let a = per_item(resp, 5).unwrap();
        assert_eq!(a.retry, [1, 4]);
        assert_eq!(a.dead.len(), 1);
        assert_eq!(a.dead[0].0, 2);
        assert!(a.dead[0].1.contains("mapper_parsing_exception"));
        assert_eq!(a.duplicates, 1);
    }

    #[test]
    fn mismatched_item_count_is_retried_whole() {
        let resp = br#"{"errors":false,"items":[{"create":{"status":201}}]}"#;
        assert!(matches!(per_item(resp, 2), Err(SinkError::Retryable(_))));
        assert!(matches!(
            per_item(b"<html>", 1),
            Err(SinkError::Retryable(_))
        ));
    }

    #[test]
    fn url_join_keeps_a_base_path() {
        let u = reqwest::Url::parse("http://es:9200/prefix/").unwrap();
        assert_eq!(join(&u, "_bulk").as_str(), "http://es:9200/prefix/_bulk");
        let u = reqwest::Url::parse("http://es:9200").unwrap();
        assert_eq!(join(&u, "_bulk").as_str(), "http://es:9200/_bulk");
    }
}
