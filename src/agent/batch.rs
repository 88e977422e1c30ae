//! Batch assembly: items (groups of records) are collected until `maxEvents` records or
//! `maxBytes` of record JSON, or until the first item has waited `maxWait`. A batch never
//! exceeds either limit unless a single item is larger on its own (tailers keep items to
//! an eighth of the limits).

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

    /// Records and record bytes of an item.
    fn size(t: &Taken) -> (usize, usize) {
        match &t.item {
            // The group's NDJSON is its records' JSON, each with its newline.
            Item::Event(e) => (e.records.len(), e.ndjson.len()),
            Item::Forget(_) => (0, 0),
        }
    }

    /// Whether `t` can join without breaking `maxEvents` or `maxBytes` (an empty batch
    /// takes anything).
    pub fn fits(&self, t: &Taken) -> bool {
        let (records, bytes) = Self::size(t);
        records == 0
            || self.records == 0
            || (self.records + records <= self.limits.max_events
                && self.bytes + bytes <= self.limits.max_bytes)
    }

    /// Adds an item; call [`Batch::fits`] first.
    /// `now` is only called for the first item (it starts the `maxWait` clock).
    pub fn push(&mut self, t: Taken, now: impl FnOnce() -> Instant) {
        let (records, bytes) = Self::size(&t);
        self.records += records;
        self.bytes += bytes;
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
        self.started
            .map(|s| crate::deadline::after(s, self.limits.max_wait))
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
        recs(1, len)
    }

    fn recs(n: usize, len: usize) -> Taken {
        Taken {
            item: Item::Event(Event {
                pos: SourcePos {
                    file: Arc::from("k"),
                    path: Arc::from("/f"),
                    fingerprint: Arc::new(Fingerprint::default()),
                    offset: 0,
                },
                records: vec![
                    Encoded {
                        json: vec![b'x'; len].into(),
                        id: "".into(),
                        ts_nanos: 0,
                    };
                    n
                ],
                ndjson: vec![b'x'; n * (len + 1)].into(),
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
    fn a_schema_valid_huge_max_wait_gives_a_far_deadline_not_a_panic() {
        let mut b = Batch::new(BatchConfig {
            max_wait: Duration::MAX,
            ..limits(3, 1 << 20)
        });
        let now = Instant::now();
        b.push(rec(10), || now);
        assert!(
            b.deadline()
                .is_some_and(|d| d > now + Duration::from_secs(86400))
        );
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
    fn a_group_that_would_pass_max_events_starts_the_next_batch() {
        let mut b = Batch::new(limits(10, 1 << 20));
        let now = Instant::now();
        b.push(recs(4, 10), || now);
        assert!(b.fits(&recs(6, 10)), "4 + 6 = 10 records fit");
        b.push(recs(6, 10), || now);
        assert!(b.is_full());
        b.take();
        b.push(recs(8, 10), || now);
        assert!(!b.fits(&recs(3, 10)), "8 + 3 records would pass maxEvents");
        assert!(b.fits(&recs(0, 0)), "a checkpoint-only item always fits");
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
