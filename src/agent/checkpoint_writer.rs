//! When a pipeline's checkpoints reach the disk, and how much acknowledged progress is not
//! there yet. The memory shipper writes on a blocking thread while it goes on shipping;
//! acknowledged batches whose checkpoint is not written yet count against the batches in
//! flight, so a kill -9 still re-sends at most that many. A failed write is not retried in
//! a loop (a full disk): everything is written again with the next acknowledgement.
//!
//! A released file (its `Forget` acknowledged) leaves the checkpoints in three steps, so that
//! after a kill -9 at any point its checkpoint entry or its record of opened files still
//! knows it: its entry, at the last offset, is written; then it leaves the input's record of
//! opened files; then its entry is forgotten and written.

use std::sync::Arc;

use tokio::task::JoinHandle;

use super::buffer::Taken;
use super::checkpoint::{Checkpoints, write_atomic};
use super::discover::OpenedRecords;
use super::record::Item;

/// A checkpoint write in progress, and whether it fsyncs.
struct Writing(JoinHandle<std::io::Result<()>>, bool);

/// A pipeline's checkpoints and the writing of them.
pub struct CheckpointWriter {
    key: Arc<str>,
    checkpoints: Checkpoints,
    /// The checkpoint write running on a blocking thread: the shipper never waits for the
    /// disk between batches. While it runs, later acknowledgements only update the
    /// checkpoints in memory; the newest state is written as soon as it completes.
    writing: Option<Writing>,
    /// Batches acknowledged whose checkpoint is not on disk yet. They count against
    /// the batches in flight, so a kill -9 still re-sends at most that many.
    unwritten: usize,
    /// Of those, the ones the running write covers.
    covered: usize,
    /// Files whose `Forget` was acknowledged, kept in the checkpoints until a write holding
    /// their last offset is done; `released_covered`: those the running write covers.
    released: Vec<Arc<str>>,
    released_covered: Vec<Arc<str>>,
    /// The inputs' records of opened files, which a released file leaves after that write.
    opened: OpenedRecords,
}

impl CheckpointWriter {
    /// `key` names the pipeline in logs.
    pub fn new(key: Arc<str>, checkpoints: Checkpoints) -> Self {
        Self {
            key,
            checkpoints,
            writing: None,
            unwritten: 0,
            covered: 0,
            released: Vec::new(),
            released_covered: Vec::new(),
            opened: OpenedRecords::default(),
        }
    }

    /// The inputs' records of opened files that released files are dropped from.
    pub fn with_opened(mut self, opened: OpenedRecords) -> Self {
        self.opened = opened;
        self
    }

    /// The checkpoints as they are in memory.
    pub fn checkpoints(&self) -> &Checkpoints {
        &self.checkpoints
    }

    /// Batches acknowledged whose checkpoint is not on disk yet.
    pub fn unwritten(&self) -> usize {
        self.unwritten
    }

    /// Moves the checkpoints past `items` (acknowledged or spooled), in order, in memory
    /// only; returns their buffer weight and the file bytes they account for. Of a run of
    /// events from one file only the last is applied: it is the furthest, and the others
    /// would be overwritten by it.
    pub fn advance(&mut self, items: &[Taken]) -> (u64, u64) {
        advance(
            &mut self.checkpoints,
            items,
            &mut self.released,
            &mut self.released_covered,
        )
    }

    /// A batch every output has: the checkpoints move over it ([`CheckpointWriter::advance`]),
    /// it counts as unwritten, and a write starts unless one is running.
    pub fn acknowledge(&mut self, items: &[Taken]) -> (u64, u64) {
        let moved = self.advance(items);
        self.unwritten += 1;
        self.start_write();
        moved
    }

    /// Waits for the running write (forever when none runs) and records how it went: what
    /// was acknowledged meanwhile is written next. After a failure it is written with the
    /// next acknowledgement (a full disk is not retried in a loop), and shipping does not
    /// wait for a disk that fails. Cancel-safe: the write goes on if this is dropped.
    pub async fn write_finished(&mut self) {
        let r = match self.writing.as_mut() {
            Some(w) => (&mut w.0).await,
            None => std::future::pending().await,
        };
        let ok = matches!(r, Ok(Ok(())));
        if let Some(Writing(_, sync)) = self.writing.take() {
            written(&mut self.checkpoints, &self.key, r, sync);
        }
        self.covered_write_done(ok);
        if ok {
            self.unwritten = self.unwritten.saturating_sub(self.covered);
            self.covered = 0;
            self.start_write();
        } else {
            self.unwritten = 0;
            self.covered = 0;
        }
    }

    /// Waits for the running write, then writes and fsyncs whatever is not on disk yet:
    /// the last thing a shipper does.
    pub async fn close(&mut self) {
        if let Some(Writing(handle, sync)) = self.writing.take() {
            let r = handle.await;
            let ok = matches!(r, Ok(Ok(())));
            written(&mut self.checkpoints, &self.key, r, sync);
            self.covered_write_done(ok);
        }
        // Whatever was written since the last fsync reaches the disk before the pipeline ends.
        self.persist(true).await;
    }

    /// Writes the checkpoints if they changed and waits for it (fsynced once per
    /// [`super::checkpoint::SYNC_INTERVAL`] while shipping, and always when `final_write`).
    /// Released files are forgotten by a second write once the first holds their offsets.
    pub async fn persist(&mut self, final_write: bool) {
        let released = std::mem::take(&mut self.released);
        if !self.write_and_wait(final_write).await {
            self.released.extend(released);
            return;
        }
        if !released.is_empty() {
            self.forget_released(released);
            self.write_and_wait(final_write).await;
        }
    }

    /// Writes the checkpoints if they changed and waits; false when the write failed.
    async fn write_and_wait(&mut self, final_write: bool) -> bool {
        let Some(Writing(handle, sync)) = spawn_write(&mut self.checkpoints, final_write) else {
            return true;
        };
        let r = handle.await;
        let ok = matches!(r, Ok(Ok(())));
        written(&mut self.checkpoints, &self.key, r, sync);
        ok
    }

    /// Starts writing the checkpoints if they changed and no write is running.
    fn start_write(&mut self) {
        if self.writing.is_some() {
            return;
        }
        self.writing = spawn_write(&mut self.checkpoints, false);
        self.covered = self.unwritten;
        if self.writing.is_some() {
            self.released_covered.append(&mut self.released);
            return;
        }
        // Nothing changed: what was acknowledged is on disk already.
        self.unwritten = 0;
        if !self.released.is_empty() {
            let released = std::mem::take(&mut self.released);
            self.forget_released(released);
            self.writing = spawn_write(&mut self.checkpoints, false);
        }
    }

    /// The running write is done: the released files it covered go on to their next step
    /// when it reached the disk, and wait for the next write when it did not.
    fn covered_write_done(&mut self, ok: bool) {
        let covered = std::mem::take(&mut self.released_covered);
        if ok {
            self.forget_released(covered);
        } else {
            self.released.extend(covered);
        }
    }

    /// Released files whose last offset is on disk: out of the opened records first, then
    /// out of the checkpoints (written next).
    fn forget_released(&mut self, keys: Vec<Arc<str>>) {
        for k in keys {
            self.opened.drop_released(&k);
            self.checkpoints.forget(&k);
        }
    }
}

/// Starts writing the checkpoints on a blocking thread, if they changed.
fn spawn_write(c: &mut Checkpoints, final_write: bool) -> Option<Writing> {
    let w = c.pending_write(final_write)?;
    let sync = w.sync;
    let handle = tokio::task::spawn_blocking(move || write_atomic(&w.path, &w.body, w.sync));
    Some(Writing(handle, sync))
}

/// `released` collects the files whose `Forget` is among `items`; a file read again after
/// its `Forget` (opened anew under the same identity) is taken out of `released` and
/// `released_covered` again.
fn advance(
    checkpoints: &mut Checkpoints,
    items: &[Taken],
    released: &mut Vec<Arc<str>>,
    released_covered: &mut Vec<Arc<str>>,
) -> (u64, u64) {
    let mut weight = 0u64;
    let mut consumed = 0u64;
    for (i, t) in items.iter().enumerate() {
        weight += u64::from(t.weight);
        match &t.item {
            Item::Event(e) => {
                consumed += e.consumed;
                let superseded = matches!(
                    items.get(i + 1).map(|n| &n.item),
                    Some(Item::Event(next)) if Arc::ptr_eq(&next.pos.file, &e.pos.file)
                        && Arc::ptr_eq(&next.pos.fingerprint, &e.pos.fingerprint)
                );
                if !superseded {
                    checkpoints.set(&e.pos.file, &e.pos.path, e.pos.offset, &e.pos.fingerprint);
                }
                released.retain(|k| *k != e.pos.file);
                released_covered.retain(|k| *k != e.pos.file);
            }
            Item::Forget(k) => released.push(k.clone()),
        }
    }
    (weight, consumed)
}

/// Records how a checkpoint write went; a failed one is written again next time.
fn written(
    c: &mut Checkpoints,
    key: &str,
    res: Result<std::io::Result<()>, tokio::task::JoinError>,
    sync: bool,
) {
    match res {
        Ok(Ok(())) => c.written(sync),
        Ok(Err(e)) => {
            c.write_failed();
            tracing::error!(pipeline = %key, error = %e, "writing checkpoints failed; will retry after the next batch")
        }
        Err(e) => {
            c.write_failed();
            tracing::error!(pipeline = %key, error = %e, "checkpoint writer panicked")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::identity::Fingerprint;
    use crate::agent::record::{Event, SourcePos};
    use std::path::Path;

    /// One group of `file` read up to `offset`, accounting for `consumed` bytes.
    fn event(file: &Arc<str>, fp: &Arc<Fingerprint>, offset: u64, consumed: u64) -> Taken {
        Taken {
            item: Item::Event(Event {
                pos: SourcePos {
                    file: file.clone(),
                    path: Arc::from(format!("/var/log/{file}.log")),
                    fingerprint: fp.clone(),
                    offset,
                },
                records: vec![],
                ndjson: Default::default(),
                consumed,
            }),
            weight: 10,
        }
    }

    fn key(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    fn on_disk(path: &Path) -> Vec<(String, u64)> {
        Checkpoints::load(path.to_path_buf())
            .unwrap()
            .entries()
            .iter()
            .map(|(k, e)| (k.clone(), e.saved.offset))
            .collect()
    }

    #[test]
    fn only_the_last_event_of_a_run_from_one_file_moves_its_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoints::load(dir.path().join("c.json")).unwrap();
        let mut w = CheckpointWriter::new(key("ns/p"), cp);
        let fp = Arc::new(Fingerprint::of_bytes(b"a"));
        let (a, b) = (key("app/1:1"), key("app/1:2"));
        let items = [
            event(&a, &fp, 10, 10),
            event(&a, &fp, 25, 15),
            event(&b, &fp, 7, 7),
            Taken {
                item: Item::Forget(key("app/1:9")),
                weight: 3,
            },
        ];
        assert_eq!(
            w.advance(&items),
            (33, 32),
            "weights and bytes of every item"
        );
        let offsets: Vec<u64> = w
            .checkpoints()
            .entries()
            .values()
            .map(|e| e.saved.offset)
            .collect();
        assert_eq!(offsets, [25, 7]);
        assert_eq!(
            w.unwritten(),
            0,
            "advancing alone is not an acknowledgement"
        );
        w.advance(&[Taken {
            item: Item::Forget(b.clone()),
            weight: 1,
        }]);
        assert_eq!(
            w.checkpoints().entries().len(),
            2,
            "a forgotten entry stays until its last offset is written"
        );
    }

    #[tokio::test]
    async fn persist_writes_a_released_files_last_offset_then_forgets_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        let cp = Checkpoints::load(path.clone()).unwrap();
        let mut w = CheckpointWriter::new(key("ns/p"), cp);
        let fp = Arc::new(Fingerprint::of_bytes(b"a"));
        let a = key("app/1:1");
        w.advance(&[
            event(&a, &fp, 10, 10),
            Taken {
                item: Item::Forget(a.clone()),
                weight: 1,
            },
        ]);
        w.persist(false).await;
        assert_eq!(on_disk(&path), [], "written, then forgotten and written");
    }

    /// A file read whole and released before any of it was acknowledged: at every step of
    /// its acknowledgement, what a kill -9 leaves on disk (checkpoint or record of opened
    /// files) still knows it, at its last offset once that is checkpointed.
    #[tokio::test]
    async fn a_released_file_leaves_the_opened_record_only_once_its_last_offset_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let cp_path = dir.path().join("c.json");
        let (records, _) = OpenedRecords::load(dir.path(), "ns/p", ["app"]);
        let record = records.get("app").unwrap();
        let fp = Arc::new(Fingerprint::of_bytes(b"a"));
        let a = key("app/1:1");
        let entry = crate::agent::checkpoint::Entry {
            path: "/var/log/a.log".into(),
            saved: crate::agent::identity::Saved {
                offset: 0,
                fingerprint: (*fp).clone(),
            },
        };
        record.add(&a, entry);
        record.release(&a);
        let mut w = CheckpointWriter::new(key("ns/p"), Checkpoints::load(cp_path.clone()).unwrap())
            .with_opened(records.clone());
        // (checkpoint on disk, record of opened files on disk) after a kill -9 now
        let after_kill = || {
            let (_, before) = OpenedRecords::load(dir.path(), "ns/p", ["app"]);
            let opened: Vec<(String, u64)> = before["app"]
                .iter()
                .map(|(k, e)| (k.clone(), e.saved.offset))
                .collect();
            (on_disk(&cp_path), opened)
        };
        let known = [("app/1:1".to_string(), 0)];
        let done = [("app/1:1".to_string(), 30)];
        assert_eq!(
            after_kill(),
            (vec![], known.to_vec()),
            "released, nothing acknowledged"
        );
        w.acknowledge(&[
            event(&a, &fp, 30, 30),
            Taken {
                item: Item::Forget(a.clone()),
                weight: 1,
            },
        ]);
        assert_eq!(
            after_kill().1,
            known,
            "acknowledged, checkpoint not written yet: still recorded"
        );
        w.write_finished().await;
        assert_eq!(
            after_kill(),
            (done.to_vec(), vec![]),
            "the last offset written, then out of the record"
        );
        w.write_finished().await;
        assert_eq!(after_kill(), (vec![], vec![]), "then forgotten");
        assert_eq!(w.unwritten(), 0);
    }

    #[tokio::test]
    async fn acknowledged_batches_count_against_in_flight_until_their_write_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        let mut w = CheckpointWriter::new(key("ns/p"), Checkpoints::load(path.clone()).unwrap());
        let fp = Arc::new(Fingerprint::of_bytes(b"a"));
        let a = key("app/1:1");
        w.acknowledge(&[event(&a, &fp, 10, 10)]);
        assert_eq!(w.unwritten(), 1, "written on a blocking thread meanwhile");
        // Acknowledged while the first write runs: in memory only, and still unwritten.
        w.acknowledge(&[event(&a, &fp, 20, 10)]);
        assert_eq!(w.unwritten(), 2);
        w.write_finished().await;
        assert_eq!(w.unwritten(), 1, "the first write covered one batch");
        // The newer state went out as soon as the first write was done.
        w.write_finished().await;
        assert_eq!(w.unwritten(), 0);
        assert_eq!(on_disk(&path), [("app/1:1".to_string(), 20)]);
    }

    #[tokio::test]
    async fn acknowledging_what_is_already_written_leaves_nothing_unwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        let mut w = CheckpointWriter::new(key("ns/p"), Checkpoints::load(path).unwrap());
        let fp = Arc::new(Fingerprint::of_bytes(b"a"));
        let a = key("app/1:1");
        w.acknowledge(&[event(&a, &fp, 10, 10)]);
        w.write_finished().await;
        assert_eq!(w.unwritten(), 0);
        // A batch of nothing new (say, only filtered lines of the same end): no write.
        w.acknowledge(&[event(&a, &fp, 10, 0)]);
        assert_eq!(w.unwritten(), 0);
    }

    #[tokio::test]
    async fn after_a_failed_write_the_next_acknowledgement_writes_everything() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("checkpoints");
        let path = state.join("c.json");
        let mut w = CheckpointWriter::new(key("ns/p"), Checkpoints::load(path.clone()).unwrap());
        // The directory cannot be made: every write fails until the file is gone.
        std::fs::write(&state, b"in the way").unwrap();
        let fp = Arc::new(Fingerprint::of_bytes(b"a"));
        let files: Vec<Arc<str>> = (1..=3).map(|i| key(&format!("app/1:{i}"))).collect();
        for (i, f) in files.iter().enumerate() {
            w.acknowledge(&[event(f, &fp, 10 * (i as u64 + 1), 10)]);
        }
        assert_eq!(w.unwritten(), 3);
        w.write_finished().await;
        assert_eq!(
            w.unwritten(),
            0,
            "a failing disk does not hold shipping up: nothing counts as unwritten"
        );
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), w.write_finished())
                .await
                .is_err(),
            "and the failed write is not retried in a loop"
        );
        std::fs::remove_file(&state).unwrap();
        let d = key("app/1:4");
        w.acknowledge(&[event(&d, &fp, 40, 10)]);
        assert_eq!(w.unwritten(), 1);
        w.write_finished().await;
        assert_eq!(w.unwritten(), 0);
        assert_eq!(
            on_disk(&path),
            [
                ("app/1:1".to_string(), 10),
                ("app/1:2".to_string(), 20),
                ("app/1:3".to_string(), 30),
                ("app/1:4".to_string(), 40),
            ],
            "the next write carries every acknowledgement, the failed ones too"
        );
    }

    #[tokio::test]
    async fn close_waits_for_the_running_write_and_syncs_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        let mut w = CheckpointWriter::new(key("ns/p"), Checkpoints::load(path.clone()).unwrap());
        let fp = Arc::new(Fingerprint::of_bytes(b"a"));
        let a = key("app/1:1");
        w.acknowledge(&[event(&a, &fp, 10, 10)]);
        w.acknowledge(&[event(&a, &fp, 30, 20)]);
        w.close().await;
        assert_eq!(on_disk(&path), [("app/1:1".to_string(), 30)]);
    }

    #[tokio::test]
    async fn persist_writes_spooled_progress_before_returning() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        let mut w = CheckpointWriter::new(key("ns/p"), Checkpoints::load(path.clone()).unwrap());
        let fp = Arc::new(Fingerprint::of_bytes(b"a"));
        w.advance(&[event(&key("app/1:1"), &fp, 5, 5)]);
        w.persist(false).await;
        assert_eq!(on_disk(&path), [("app/1:1".to_string(), 5)]);
        assert_eq!(
            w.unwritten(),
            0,
            "the spool writer waits: nothing is unwritten"
        );
    }
}
