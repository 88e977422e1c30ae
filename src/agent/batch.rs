//! Batch assembly: items are collected until `maxEvents` records or `maxBytes` of record
//! JSON, or until the first item has waited `maxWait`. A batch never exceeds `maxBytes`
//! unless a single record is larger on its own.

use tokio::time::Instant;

use super::buffer::Taken;
use super::config::BatchConfig;
use super::record::Item;

/// The batch being filled.
#[derive(Debug)]
pub struct Batch {
    limits: BatchConfig,
    items: Vec<Taken>,
    records: usize,
    bytes: usize,
    started: Option<Instant>,
}

impl Batch {
    pub fn new(limits: BatchConfig) -> Self {
        Self {
            limits,
            items: Vec::new(),
            records: 0,
            bytes: 0,
            started: None,
        }
    }

    fn record_bytes(t: &Taken) -> Option<usize> {
        match &t.item {
            Item::Event(e) => e.record.as_ref().map(|r| r.json.len() + 1),
            Item::Forget(_) => None,
        }
    }

    /// Whether `t` can join without breaking `maxBytes` (an empty batch takes anything).
    pub fn fits(&self, t: &Taken) -> bool {
        match Self::record_bytes(t) {
            Some(b) => self.records == 0 || self.bytes + b <= self.limits.max_bytes,
            None => true,
        }
    }

    /// Adds an item; call [`Batch::fits`] first.
    /// `now` is only called for the first item (it starts the `maxWait` clock).
    pub fn push(&mut self, t: Taken, now: impl FnOnce() -> Instant) {
        if let Some(b) = Self::record_bytes(&t) {
            self.records += 1;
            self.bytes += b;
        }
        self.started.get_or_insert_with(now);
        self.items.push(t);
    }

    /// Reached `maxEvents` or `maxBytes`: ship now.
    pub fn is_full(&self) -> bool {
        self.records >= self.limits.max_events || self.bytes >= self.limits.max_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// When the batch must go even if it is not full.
    pub fn deadline(&self) -> Option<Instant> {
        self.started.map(|s| s + self.limits.max_wait)
    }

    /// Records in the batch (checkpoint-only items excluded).
    pub fn records(&self) -> usize {
        self.records
    }

    /// Empties the batch, returning its items in order.
    pub fn take(&mut self) -> Vec<Taken> {
        self.records = 0;
        self.bytes = 0;
        self.started = None;
        std::mem::take(&mut self.items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::identity::Fingerprint;
    use crate::agent::record::{Encoded, Event, SourcePos};
    use std::sync::Arc;
    use std::time::Duration;

    fn rec(len: usize) -> Taken {
        Taken {
            item: Item::Event(Event {
                pos: SourcePos {
                    file: Arc::from("k"),
                    path: Arc::from("/f"),
                    fingerprint: Arc::new(Fingerprint::default()),
                    offset: 0,
                },
                record: Some(Encoded {
                    json: vec![b'x'; len],
                    id: String::new(),
                    ts_nanos: 0,
                }),
                consumed: 0,
            }),
            weight: 1,
        }
    }

    fn limits(max_events: usize, max_bytes: usize) -> BatchConfig {
        BatchConfig {
            max_events,
            max_bytes,
            max_wait: Duration::from_millis(500),
        }
    }

    #[test]
    fn batch_is_full_at_max_events() {
        let mut b = Batch::new(limits(3, 1 << 20));
        let now = Instant::now();
        for _ in 0..2 {
            b.push(rec(10), || now);
        }
        assert!(!b.is_full());
        b.push(rec(10), || now);
        assert!(b.is_full());
        assert_eq!(b.take().len(), 3);
        assert!(b.is_empty());
        assert_eq!(b.deadline(), None);
    }

    #[test]
    fn batch_never_exceeds_max_bytes_except_for_one_huge_record() {
        let mut b = Batch::new(limits(100, 25));
        let now = Instant::now();
        b.push(rec(10), || now); // 11 bytes with the newline
        assert!(b.fits(&rec(10))); // 22 <= 25
        b.push(rec(10), || now);
        assert!(!b.fits(&rec(10))); // 33 > 25: ship first
        b.take();
        assert!(
            b.fits(&rec(1000)),
            "an empty batch takes an oversized record"
        );
        b.push(rec(1000), || now);
        assert!(b.is_full());
    }

    #[test]
    fn deadline_is_max_wait_after_the_first_item() {
        let mut b = Batch::new(limits(100, 1000));
        let t0 = Instant::now();
        b.push(rec(1), || t0);
        b.push(rec(1), || t0 + Duration::from_millis(300));
        assert_eq!(b.deadline(), Some(t0 + Duration::from_millis(500)));
    }
}
