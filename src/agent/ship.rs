//! The memory buffer's shipper: fills batches from the buffer, delivers up to `in_flight`
//! of them to every output at once, and acknowledges them strictly in batch order, so
//! checkpoints only move over records every output has.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use futures::StreamExt;
use futures::future::join_all;
use futures::stream::FuturesOrdered;
use tokio_util::sync::CancellationToken;

use super::batch::Batch;
use super::buffer::{BufferRx, Taken};
use super::checkpoint_writer::CheckpointWriter;
use super::metrics::AgentMetrics;
use super::record::{Encoded, Item};
use super::sink::{self, Delivered, Output};

/// The memory buffer's shipper of one pipeline.
pub struct Shipper {
    pub key: Arc<str>,
    pub batch: Batch,
    pub rx: BufferRx,
    pub outputs: Arc<Vec<Output>>,
    /// Batches delivered at the same time, at most; acknowledged in order regardless.
    pub in_flight: usize,
    /// Acknowledged batches not yet written count against `in_flight` too.
    pub checkpoints: CheckpointWriter,
    pub metrics: AgentMetrics,
    pub lag: Arc<AtomicI64>,
    pub abort: CancellationToken,
}

/// A batch on its way to the outputs: its items back, and whether delivery completed.
type Delivery = futures::future::BoxFuture<'static, (Vec<Taken>, bool)>;

/// Ships until the buffer is closed and empty (or shutdown aborts a delivery), then
/// writes the checkpoints a last time.
pub async fn ship_loop(mut s: Shipper) {
    ship_until_done(&mut s).await;
    s.checkpoints.close().await;
}

/// Fills batches and delivers up to `in_flight` of them at once (so the next batch is on the
/// wire while the outputs answer the previous one). Acknowledgements are taken strictly in
/// batch order, so checkpoints only ever move over records every output has.
async fn ship_until_done(s: &mut Shipper) {
    let buffer_gauge = s
        .metrics
        .buffer_bytes
        .get_or_create(&AgentMetrics::pipeline(&s.key))
        .clone();
    let mut deliveries: FuturesOrdered<Delivery> = FuturesOrdered::new();
    // An item that did not fit the full batch: it starts the next one.
    let mut carry: Option<Taken> = None;
    let mut done = false;
    loop {
        let deadline = s.batch.deadline();
        let due = deadline.is_some_and(|d| d <= tokio::time::Instant::now());
        let ready = !s.batch.is_empty() && (s.batch.is_full() || carry.is_some() || due || done);
        if ready && deliveries.len() + s.checkpoints.unwritten() < s.in_flight {
            let items = s.batch.take();
            deliveries.push_back(deliver_batch(s, items));
            if let Some(t) = carry.take() {
                s.batch.push(t, tokio::time::Instant::now);
            }
            buffer_gauge.set(s.rx.used() as i64);
            continue;
        }
        if done && s.batch.is_empty() && carry.is_none() && deliveries.is_empty() {
            return;
        }
        let room = deliveries.len() + s.checkpoints.unwritten() < s.in_flight;
        let sleep = async {
            match deadline {
                Some(d) if room && !due => tokio::time::sleep_until(d).await,
                _ => std::future::pending().await,
            }
        };
        let take = !done && carry.is_none() && !s.batch.is_full();
        tokio::select! {
            Some((items, delivered)) = deliveries.next(), if !deliveries.is_empty() => {
                if !delivered {
                    return;
                }
                acknowledge(s, &items);
            }
            // What was acknowledged meanwhile is written now (see CheckpointWriter).
            _ = s.checkpoints.write_finished() => {}
            t = s.rx.recv(), if take => {
                // Then everything already queued, without a trip through select! per item.
                let mut next = t;
                loop {
                    match next {
                        Some(t) if s.batch.fits(&t) => s.batch.push(t, tokio::time::Instant::now),
                        Some(t) => {
                            carry = Some(t);
                            break;
                        }
                        None => {
                            done = true;
                            break;
                        }
                    }
                    if s.batch.is_full() {
                        break;
                    }
                    match s.rx.try_recv() {
                        Some(t) => next = Some(t),
                        None => break,
                    }
                }
            }
            _ = sleep => {}
        }
    }
}

/// Starts delivering one batch to every output.
fn deliver_batch(s: &Shipper, items: Vec<Taken>) -> Delivery {
    let outputs = s.outputs.clone();
    let metrics = s.metrics.clone();
    let key = s.key.clone();
    let abort = s.abort.clone();
    Box::pin(async move {
        let delivered = {
            let records: Vec<&Encoded> = items
                .iter()
                .flat_map(|t| match &t.item {
                    Item::Event(e) => e.records.as_slice(),
                    Item::Forget(_) => &[],
                })
                .collect();
            let groups: Vec<bytes::Bytes> = items
                .iter()
                .filter_map(|t| match &t.item {
                    Item::Event(e) if !e.records.is_empty() => Some(e.ndjson.clone()),
                    _ => None,
                })
                .collect();
            deliver_all(&outputs, &records, Some(&groups), &metrics, &key, &abort).await
        };
        (items, delivered)
    })
}

/// A delivered batch: checkpoints move over it (and are written by the
/// [`CheckpointWriter`]) and its room in the buffer is given back.
fn acknowledge(s: &mut Shipper, items: &[Taken]) {
    let (weight, consumed) = s.checkpoints.acknowledge(items);
    s.lag.fetch_sub(consumed as i64, Ordering::Relaxed);
    s.metrics
        .checkpoint_lag_bytes
        .get_or_create(&AgentMetrics::pipeline(&s.key))
        .set(s.lag.load(Ordering::Relaxed).max(0));
    s.rx.release(weight);
}

/// Delivers records to every output at once; false when shutdown aborted a delivery.
/// `ndjson`: the records' groups as NDJSON, when the batch is made of whole groups.
pub async fn deliver_all(
    outputs: &[Output],
    records: &[&Encoded],
    ndjson: Option<&[bytes::Bytes]>,
    metrics: &AgentMetrics,
    key: &str,
    abort: &CancellationToken,
) -> bool {
    if records.is_empty() {
        return true;
    }
    let results = join_all(
        outputs
            .iter()
            .map(|o| sink::deliver(o, records, ndjson, metrics, key, abort)),
    )
    .await;
    !results.contains(&Delivered::Aborted)
}
