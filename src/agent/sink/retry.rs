//! Delivery to one output: the retry loop (exponential backoff with jitter) and the
//! dead-letter file, shared by every sink, so each gets the same rules: retry only what can
//! succeed later, never drop silently, give up only on shutdown.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::{Backoff, DeadLetter, Sink, SinkError};
use crate::agent::metrics::AgentMetrics;
use crate::agent::record::Encoded;

/// Sink retries: 100 ms doubling to 10 s, jittered.
pub const SINK_BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));

/// A delivery to one output, with where its rejects go.
#[derive(Debug)]
pub struct Output {
    pub name: String,
    pub sink: Sink,
    pub dead_letter: Arc<DeadLetter>,
    pub backoff: Backoff,
}

/// How a delivery ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivered {
    /// Every record is delivered or dead-lettered: the batch may be checkpointed.
    Done,
    /// Shutdown came first: the batch is not acknowledged and will be re-read.
    Aborted,
}

/// Delivers records to one output: retries what is retryable until it succeeds,
/// dead-letters what the sink rejected, and gives up only when `abort` fires.
pub async fn deliver(
    out: &Output,
    records: &[&Encoded],
    ndjson: Option<&[Bytes]>,
    metrics: &AgentMetrics,
    pipeline: &str,
    abort: &CancellationToken,
) -> Delivered {
    let labels = AgentMetrics::output(pipeline, &out.name);
    let mut pending: Vec<&Encoded> = records.to_vec();
    let mut attempt_no = 0u32;
    while !pending.is_empty() {
        // Retries may carry a subset: their body is built from the records.
        let whole = ndjson.filter(|_| pending.len() == records.len());
        let result = tokio::select! {
            r = out.sink.attempt(&pending, whole) => r,
            _ = abort.cancelled() => return Delivered::Aborted,
        };
        let next: Vec<&Encoded> = match result {
            Ok(a) => {
                let dead = a.dead.len();
                let rejected: Vec<(&Encoded, &str)> = a
                    .dead
                    .iter()
                    .map(|(i, reason)| (pending[*i], reason.as_str()))
                    .collect();
                dead_letter(&out.dead_letter, &rejected);
                metrics
                    .records_dead_lettered
                    .get_or_create(&labels)
                    .inc_by(dead as u64);
                metrics
                    .records_duplicate
                    .get_or_create(&labels)
                    .inc_by(a.duplicates as u64);
                let ok = pending.len() - a.retry.len() - dead;
                metrics
                    .records_shipped
                    .get_or_create(&labels)
                    .inc_by(ok as u64);
                if !a.retry.is_empty() {
                    metrics
                        .records_failed
                        .get_or_create(&labels)
                        .inc_by(a.retry.len() as u64);
                    tracing::warn!(output = %out.name, %pipeline, records = a.retry.len(), "output asked to retry some records");
                }
                a.retry.iter().map(|i| pending[*i]).collect()
            }
            Err(SinkError::Rejected(msg)) => {
                tracing::warn!(output = %out.name, %pipeline, error = %msg, records = pending.len(), "output rejected the batch; dead-lettering it");
                let rejected: Vec<(&Encoded, &str)> =
                    pending.iter().map(|r| (*r, msg.as_str())).collect();
                dead_letter(&out.dead_letter, &rejected);
                metrics
                    .records_dead_lettered
                    .get_or_create(&labels)
                    .inc_by(pending.len() as u64);
                Vec::new()
            }
            Err(SinkError::Retryable(msg)) => {
                tracing::warn!(output = %out.name, %pipeline, error = %msg, records = pending.len(), attempt = attempt_no, "delivery failed; will retry");
                metrics
                    .records_failed
                    .get_or_create(&labels)
                    .inc_by(pending.len() as u64);
                pending
            }
        };
        pending = next;
        if pending.is_empty() {
            break;
        }
        metrics
            .records_retried
            .get_or_create(&labels)
            .inc_by(pending.len() as u64);
        let delay = out.backoff.delay(attempt_no);
        attempt_no = attempt_no.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = abort.cancelled() => return Delivered::Aborted,
        }
    }
    Delivered::Done
}

/// Appends rejected records with their reasons to the output's bounded dead-letter file
/// (see [`DeadLetter`]: what does not fit is dropped and counted there).
fn dead_letter(file: &DeadLetter, rejected: &[(&Encoded, &str)]) {
    let lines: Vec<serde_json::Value> = rejected
        .iter()
        .map(|(rec, reason)| {
            let mut line = serde_json::json!({
                "reason": reason,
                "record": String::from_utf8_lossy(&rec.json),
            });
            if !rec.id.is_empty() {
                line["id"] = rec.id.as_str().into();
            }
            line
        })
        .collect();
    file.write(&lines);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::sink::file::FileSink;

    fn record(text: &str) -> Encoded {
        Encoded {
            json: Bytes::from(format!("{{\"message\":\"{text}\"}}")),
            id: "".into(),
            ts_nanos: 0,
        }
    }

    /// A file output whose directory is a plain file: every write fails until it is removed.
    fn blocked_output(dir: &std::path::Path) -> (Output, std::path::PathBuf) {
        let blocker = dir.join("out");
        std::fs::write(&blocker, b"").unwrap();
        let output = Output {
            name: "f".into(),
            sink: Sink::File(FileSink::new(Some(blocker.join("records.ndjson")))),
            dead_letter: Arc::new(DeadLetter::new(
                dir.join("dead.ndjson"),
                1 << 20,
                Default::default(),
            )),
            backoff: Backoff::new(Duration::from_millis(1), Duration::from_millis(5)),
        };
        (output, blocker)
    }

    async fn wait_for_retries(metrics: &AgentMetrics) {
        let retried = metrics
            .records_retried
            .get_or_create(&AgentMetrics::output("ns/p", "f"))
            .clone();
        tokio::time::timeout(Duration::from_secs(5), async {
            while retried.get() < 4 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .expect("retried");
    }

    #[tokio::test]
    async fn a_failing_output_is_retried_until_it_takes_the_records() {
        let dir = tempfile::tempdir().unwrap();
        let (output, blocker) = blocked_output(dir.path());
        let metrics = AgentMetrics::default();
        let abort = CancellationToken::new();
        let (a, b) = (record("a"), record("b"));
        let records = [&a, &b];
        let delivery = deliver(&output, &records, None, &metrics, "ns/p", &abort);
        let unblock = async {
            wait_for_retries(&metrics).await;
            std::fs::remove_file(&blocker).unwrap();
        };
        let (delivered, ()) = tokio::join!(delivery, unblock);
        assert_eq!(delivered, Delivered::Done);
        let written = std::fs::read_to_string(blocker.join("records.ndjson")).unwrap();
        assert_eq!(written, "{\"message\":\"a\"}\n{\"message\":\"b\"}\n");
        let labels = AgentMetrics::output("ns/p", "f");
        assert_eq!(metrics.records_shipped.get_or_create(&labels).get(), 2);
        assert_eq!(
            metrics.records_dead_lettered.get_or_create(&labels).get(),
            0
        );
        assert!(metrics.records_failed.get_or_create(&labels).get() >= 4);
    }

    #[tokio::test]
    async fn only_abort_ends_the_retries_of_a_failing_output() {
        let dir = tempfile::tempdir().unwrap();
        let (output, _blocker) = blocked_output(dir.path());
        let metrics = AgentMetrics::default();
        let abort = CancellationToken::new();
        let a = record("a");
        let records = [&a];
        let delivery = deliver(&output, &records, None, &metrics, "ns/p", &abort);
        let stop = async {
            wait_for_retries(&metrics).await;
            abort.cancel();
        };
        let (delivered, ()) = tokio::join!(delivery, stop);
        assert_eq!(delivered, Delivered::Aborted);
        assert!(
            !dir.path().join("dead.ndjson").exists(),
            "nothing dead-lettered"
        );
    }
}
