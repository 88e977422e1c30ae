//! The bounded memory buffer between a pipeline's readers and its outputs.
//!
//! Capacity is counted in bytes. A reader takes room before it hands an item over and
//! waits while the buffer is full: that wait is the backpressure that pauses reading. Room
//! is given back only when the outputs have acknowledged the item, so the bound covers the
//! batch in flight too. Nothing is ever dropped to make room.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::record::Item;

/// Largest capacity a semaphore can count (and far more than any node should buffer).
const MAX_CAPACITY: usize = u32::MAX as usize;

/// The buffer was closed: the pipeline is stopping.
#[derive(Debug, thiserror::Error)]
#[error("the pipeline buffer is closed")]
pub struct Closed;

/// The readers' end; cheap to clone.
#[derive(Clone, Debug)]
pub struct BufferTx {
    tx: mpsc::UnboundedSender<(Item, u32)>,
    room: Arc<Semaphore>,
    capacity: u32,
}

/// The outputs' end.
#[derive(Debug)]
pub struct BufferRx {
    rx: mpsc::UnboundedReceiver<(Item, u32)>,
    room: Arc<Semaphore>,
    capacity: u32,
}

/// A buffer holding at most `capacity` bytes of items (in flight included).
pub fn bounded(capacity: usize) -> (BufferTx, BufferRx) {
    let capacity = capacity.clamp(1, MAX_CAPACITY) as u32;
    let room = Arc::new(Semaphore::new(capacity as usize));
    let (tx, rx) = mpsc::unbounded_channel();
    (
        BufferTx {
            tx,
            room: room.clone(),
            capacity,
        },
        BufferRx { rx, room, capacity },
    )
}

impl BufferTx {
    /// Hands an item over, waiting for room first (backpressure).
    pub async fn send(&self, item: Item) -> Result<(), Closed> {
        let weight = self.reserve(&item).await?;
        self.push(item, weight)
    }

    /// Waits for room for `item` and takes it; returns the weight to [`BufferTx::push`]
    /// with. Cancel-safe: room is only taken when the wait completes.
    pub async fn reserve(&self, item: &Item) -> Result<u32, Closed> {
        let need = self.weight(item);
        self.reserve_weight(need).await?;
        Ok(need)
    }

    /// The room `item` takes. An item larger than the whole buffer takes the whole buffer:
    /// it waits for an empty buffer instead of forever.
    pub fn weight(&self, item: &Item) -> u32 {
        item.size().min(self.capacity as usize) as u32
    }

    /// The whole buffer's capacity in bytes.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Waits for `weight` bytes of room (at most the capacity) and takes them: one wait for
    /// many items, each then handed over with [`BufferTx::push`] and its own weight.
    /// Cancel-safe: room is only taken when the wait completes.
    pub async fn reserve_weight(&self, weight: u32) -> Result<(), Closed> {
        let permit = self
            .room
            .acquire_many(weight.min(self.capacity))
            .await
            .map_err(|_| Closed)?;
        permit.forget();
        Ok(())
    }

    /// Hands over an item whose room was reserved.
    pub fn push(&self, item: Item, weight: u32) -> Result<(), Closed> {
        self.tx.send((item, weight)).map_err(|_| Closed)
    }

    /// Hands an item over only if there is room right now.
    pub fn try_send(&self, item: Item) -> Result<(), Closed> {
        let need = self.weight(&item);
        let permit = self.room.try_acquire_many(need).map_err(|_| Closed)?;
        permit.forget();
        self.tx.send((item, need)).map_err(|_| Closed)
    }

    /// Bytes currently held.
    pub fn used(&self) -> usize {
        self.capacity as usize - self.room.available_permits()
    }

    /// Sends items in order, waiting for buffer room; false when stopping. Room is taken for
    /// groups of up to an eighth of the buffer at a time (one wait per group, not per line).
    /// When stopping, what was already read is still handed over while there is room (so
    /// shutdown ships it); the rest is dropped unacknowledged and read again after the restart.
    pub async fn send_all(&self, items: Vec<Item>, stop: &CancellationToken) -> bool {
        let tx = self;
        let group_limit = u64::from((tx.capacity() / 8).max(1));
        let mut items = items.into_iter().peekable();
        let mut group: Vec<(Item, u32)> = Vec::new();
        loop {
            let mut total = 0u64;
            while let Some(item) = items.peek() {
                let w = tx.weight(item);
                if !group.is_empty() && total + u64::from(w) > group_limit {
                    break;
                }
                total += u64::from(w);
                if let Some(item) = items.next() {
                    group.push((item, w));
                }
            }
            if group.is_empty() {
                return true;
            }
            let reserved = if stop.is_cancelled() {
                Err(())
            } else {
                tokio::select! {
                    r = tx.reserve_weight(total as u32) => r.map_err(|_| ()),
                    _ = stop.cancelled() => Err(()),
                }
            };
            if reserved.is_err() {
                let _ = group
                    .drain(..)
                    .map(|(i, _)| i)
                    .chain(items.by_ref())
                    .try_for_each(|i| tx.try_send(i));
                return false;
            }
            for (item, w) in group.drain(..) {
                if tx.push(item, w).is_err() {
                    return false;
                }
            }
        }
    }
}

/// An item taken from the buffer; its room is given back by [`BufferRx::release`].
#[derive(Debug)]
pub struct Taken {
    pub item: Item,
    pub weight: u32,
}

impl BufferRx {
    /// The next item; `None` once every reader is gone and the buffer is empty.
    pub async fn recv(&mut self) -> Option<Taken> {
        self.rx
            .recv()
            .await
            .map(|(item, weight)| Taken { item, weight })
    }

    /// The next item if one is queued right now.
    pub fn try_recv(&mut self) -> Option<Taken> {
        self.rx
            .try_recv()
            .ok()
            .map(|(item, weight)| Taken { item, weight })
    }

    /// Gives back the room of acknowledged items.
    pub fn release(&self, weight: u64) {
        self.room
            .add_permits(weight.min(self.capacity as u64) as usize);
    }

    /// Bytes currently held (queued plus in flight).
    pub fn used(&self) -> usize {
        self.capacity as usize - self.room.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn forget(name: &str) -> Item {
        Item::Forget(Arc::from(name))
    }

    #[tokio::test]
    async fn a_full_buffer_blocks_the_reader_until_items_are_acknowledged() {
        let one = forget("x").size();
        let (tx, mut rx) = bounded(one * 2);
        tx.send(forget("x")).await.unwrap();
        tx.send(forget("x")).await.unwrap();
        assert_eq!(tx.used(), one * 2);
        // Third send must wait: the buffer is full.
        let blocked = tokio::time::timeout(Duration::from_millis(100), tx.send(forget("x"))).await;
        assert!(
            blocked.is_err(),
            "send should block while the buffer is full"
        );
        // Taking an item does not free room: only acknowledging it does.
        let taken = rx.recv().await.unwrap();
        assert_eq!(rx.used(), one * 2);
        rx.release(taken.weight as u64);
        tokio::time::timeout(Duration::from_secs(5), tx.send(forget("x")))
            .await
            .expect("room was released")
            .unwrap();
    }

    #[tokio::test]
    async fn send_all_hands_items_over_in_order() {
        let (tx, mut rx) = bounded(1 << 20);
        let items = ["a", "b", "c"].map(forget).to_vec();
        assert!(tx.send_all(items, &CancellationToken::new()).await);
        for name in ["a", "b", "c"] {
            let t = rx.try_recv().expect("queued");
            assert!(matches!(&t.item, Item::Forget(k) if &**k == name));
        }
        assert!(rx.try_recv().is_none());
    }

    #[tokio::test]
    async fn send_all_when_stopping_hands_over_what_fits_and_says_so() {
        let one = forget("x").size();
        let (tx, mut rx) = bounded(one * 2);
        let stop = CancellationToken::new();
        stop.cancel();
        let items = vec![forget("x"), forget("x"), forget("x")];
        assert!(!tx.send_all(items, &stop).await);
        assert!(rx.try_recv().is_some());
        assert!(rx.try_recv().is_some());
        assert!(
            rx.try_recv().is_none(),
            "the third is dropped, to be read again"
        );
    }

    #[tokio::test]
    async fn an_item_larger_than_the_buffer_still_passes_alone() {
        let (tx, mut rx) = bounded(8);
        tx.send(forget("a-key-longer-than-eight-bytes"))
            .await
            .unwrap();
        let t = rx.recv().await.unwrap();
        assert_eq!(t.weight, 8);
        rx.release(t.weight as u64);
        assert_eq!(rx.used(), 0);
    }
}
