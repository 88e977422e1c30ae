//! The disk buffer's writer: moves items from the (small) memory buffer into the spool,
//! and moves the source files' checkpoints once the records are durable there.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use tokio_util::sync::CancellationToken;

use super::buffer::{BufferRx, Taken};
use super::checkpoint_writer::CheckpointWriter;
use super::metrics::AgentMetrics;
use super::record::Item;
use super::sink;
use super::spool::{self, SpoolWriter};

/// Moves items from memory to the disk spool. Source checkpoints move as soon as the
/// records are durable in the spool: from then on the spool owns them.
pub struct SpoolWriteTask {
    pub key: Arc<str>,
    pub rx: BufferRx,
    pub writer: SpoolWriter,
    /// Written (and waited for) after every spooled group.
    pub checkpoints: CheckpointWriter,
    pub metrics: AgentMetrics,
    pub lag: Arc<AtomicI64>,
    pub stop: CancellationToken,
}

/// Items (groups of records) spooled per fsync at most.
const SPOOL_GROUP: usize = 64;

/// Spools items until the buffer closes (or stopping finds the spool full).
pub async fn spool_write_loop(mut w: SpoolWriteTask) {
    loop {
        let Some(first) = w.rx.recv().await else {
            break;
        };
        let mut taken = vec![first];
        while taken.len() < SPOOL_GROUP {
            match w.rx.try_recv() {
                Some(t) => taken.push(t),
                None => break,
            }
        }
        // A full spool stops taking items: memory fills and the readers pause. Waiting
        // for room for the whole group keeps the spool at its cap. When stopping, nothing
        // frees room any more: leave the rest unspooled (and unchecked), to be read again
        // from the files next time.
        let need = spool::frames_len(taken.iter().flat_map(|t| match &t.item {
            Item::Event(e) => e.records.as_slice(),
            Item::Forget(_) => &[],
        }));
        tokio::select! {
            _ = w.writer.wait_room_for(need) => {}
            _ = w.stop.cancelled(), if !w.writer.has_room_for(need) => break,
        }
        if !spool_group(&mut w, &taken).await {
            // Stopping while the disk fails: these records are neither spooled nor
            // checkpointed, and are read again from their files next time.
            break;
        }
        let (weight, consumed) = w.checkpoints.advance(&taken);
        w.checkpoints.persist(false).await;
        w.lag.fetch_sub(consumed as i64, Ordering::Relaxed);
        let labels = AgentMetrics::pipeline(&w.key);
        w.metrics
            .checkpoint_lag_bytes
            .get_or_create(&labels)
            .set(w.lag.load(Ordering::Relaxed).max(0));
        w.metrics
            .buffer_bytes
            .get_or_create(&labels)
            .set(w.writer.used() as i64);
        w.rx.release(weight);
    }
    w.checkpoints.persist(true).await;
    // Dropping the writer tells the shipper that nothing more will come.
}

/// Spools one group of items, supervised: after a failed append or commit the writer
/// restarts (what was not committed is discarded and the segment is cut back to its
/// durable end) and the group is appended again, with backoff, until it is durable.
/// Never checkpoints what may not be on disk. False when `stop` came first.
async fn spool_group(w: &mut SpoolWriteTask, taken: &[Taken]) -> bool {
    let mut attempt = 0u32;
    loop {
        let written = taken
            .iter()
            .try_for_each(|t| match &t.item {
                Item::Event(e) => e.records.iter().try_for_each(|r| w.writer.append(r)),
                Item::Forget(_) => Ok(()),
            })
            .and_then(|()| w.writer.commit());
        let Err(mut error) = written else {
            return true;
        };
        loop {
            w.metrics
                .spool_restarts
                .get_or_create(&AgentMetrics::spool_task(&w.key, "writer"))
                .inc();
            let delay = sink::SINK_BACKOFF.delay(attempt);
            attempt = attempt.saturating_add(1);
            tracing::error!(pipeline = %w.key, %error, retry_in = ?delay, "writing the disk buffer failed; the writer restarts");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = w.stop.cancelled() => return false,
            }
            match w.writer.restart() {
                Ok(()) => break,
                Err(e) => error = e,
            }
        }
    }
}
