//! The disk buffer's shipper: reads records from the spool, delivers them in batches to
//! every output and acknowledges them in the spool.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::config::BatchConfig;
use super::metrics::AgentMetrics;
use super::record::Encoded;
use super::ship::deliver_all;
use super::sink::{self, Output};
use super::spool::SpoolReader;

/// Ships records from the disk spool in batches and acknowledges them in the spool.
pub struct SpoolShipTask {
    pub key: Arc<str>,
    pub limits: BatchConfig,
    pub reader: SpoolReader,
    pub outputs: Vec<Output>,
    pub metrics: AgentMetrics,
    pub abort: CancellationToken,
    pub stop: CancellationToken,
}

/// Ships until the spool is drained and its writer gone, or `stop` fires.
pub async fn spool_ship_loop(mut s: SpoolShipTask) {
    let labels = AgentMetrics::pipeline(&s.key);
    let mut batch: Vec<Encoded> = Vec::new();
    let mut bytes = 0usize;
    let mut end = 0u64;
    let mut started: Option<tokio::time::Instant> = None;
    // Read failures in a row: the reader restarts after each, with backoff.
    let mut failures = 0u32;
    loop {
        // never `t + max_wait`: a `--pipeline` manifest never met the CRD's 5m bound
        let deadline = started.map(|t| crate::deadline::after(t, s.limits.max_wait));
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let mut ship_now = false;
        let mut last = false;
        let mut carry = None;
        let mut failed = false;
        tokio::select! {
            r = s.reader.next() => match r {
                Ok(Some((rec, e))) => {
                    failures = 0;
                    let len = rec.json.len() + 1;
                    if !batch.is_empty() && bytes + len > s.limits.max_bytes {
                        ship_now = true;
                        carry = Some((rec, e, len));
                    } else {
                        bytes += len;
                        batch.push(rec);
                        end = e;
                        started.get_or_insert_with(tokio::time::Instant::now);
                        ship_now = batch.len() >= s.limits.max_events || bytes >= s.limits.max_bytes;
                    }
                }
                Ok(None) => last = true,
                Err(e) => {
                    let delay = sink::SINK_BACKOFF.delay(failures);
                    failures = failures.saturating_add(1);
                    s.metrics
                        .spool_restarts
                        .get_or_create(&AgentMetrics::spool_task(&s.key, "reader"))
                        .inc();
                    tracing::error!(pipeline = %s.key, error = %e, retry_in = ?delay, "reading the disk buffer failed; the reader restarts");
                    s.reader.restart();
                    failed = true;
                    // What was read is shipped first; the next read waits for the backoff.
                    ship_now = true;
                }
            },
            _ = sleep => ship_now = true,
            // Stopping: what is spooled stays there for the next start.
            _ = s.stop.cancelled() => last = true,
        }
        if (ship_now || last) && !batch.is_empty() {
            let refs: Vec<&Encoded> = batch.iter().collect();
            if !deliver_all(&s.outputs, &refs, None, &s.metrics, &s.key, &s.abort).await {
                return;
            }
            if let Err(e) = s.reader.ack(end) {
                tracing::error!(pipeline = %s.key, error = %e, "writing the disk buffer cursor failed");
            }
            batch.clear();
            bytes = 0;
            started = None;
        }
        if let Some((rec, e, len)) = carry {
            bytes += len;
            batch.push(rec);
            end = e;
            started = Some(tokio::time::Instant::now());
        }
        s.metrics
            .buffer_bytes
            .get_or_create(&labels)
            .set(s.reader.used() as i64);
        if last {
            return;
        }
        if failed {
            tokio::select! {
                _ = tokio::time::sleep(sink::SINK_BACKOFF.delay(failures.saturating_sub(1))) => {}
                _ = s.stop.cancelled() => return,
            }
        }
    }
}
