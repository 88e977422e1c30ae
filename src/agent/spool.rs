//! The disk buffer (`buffer.type: disk`): records spooled to segment files under the state
//! directory, so the agent can keep reading ahead of a slow or absent output (and release
//! rotated source files) without holding the records in memory.
//!
//! Two positions matter, both global byte offsets over the whole spool (a segment file is
//! named after the global offset of its first byte):
//! - *durable*: everything before it is written and fsynced. Source-file checkpoints move
//!   as soon as a record is durable here, because the spool now owns it.
//! - *cursor*: everything before it is acknowledged by every output. It is written
//!   atomically to `cursor.json`; segments wholly before it are deleted.
//!
//! The spool holds at most `max` bytes between cursor and durable; the writer waits for room
//! (and so do the readers behind it: backpressure). A torn frame at the end of the last
//! segment (a crash mid-write) is cut off on open; it was never durable, so its source
//! lines were never checkpointed and are read again.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use super::checkpoint::write_atomic;
use bytes::Bytes;

use super::record::{Encoded, RecordId};

/// A new segment is started once the current one is this large.
pub const SEGMENT_BYTES: u64 = 32 << 20;
/// Frame header: payload length.
const HEADER: u64 = 4;

#[derive(Debug)]
struct Shared {
    max: u64,
    cursor: AtomicU64,
    durable: AtomicU64,
    room: Notify,
}

/// Appends records; owned by the pipeline's spool writer task.
#[derive(Debug)]
pub struct SpoolWriter {
    dir: PathBuf,
    start: u64,
    out: BufWriter<File>,
    /// Global offset after the last appended (not necessarily durable) frame.
    end: u64,
    durable_tx: watch::Sender<u64>,
    shared: Arc<Shared>,
    segment_bytes: u64,
}

/// Reads durable records in order and acknowledges them; owned by the spool shipper.
#[derive(Debug)]
pub struct SpoolReader {
    dir: PathBuf,
    /// Next frame to read.
    pos: u64,
    open: Option<(u64, File)>,
    durable_rx: watch::Receiver<u64>,
    shared: Arc<Shared>,
}

#[derive(Serialize, Deserialize)]
struct Cursor {
    offset: u64,
}

fn segment_path(dir: &Path, start: u64) -> PathBuf {
    dir.join(format!("{start:020}.seg"))
}

/// Segment starts, ascending.
fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name.strip_suffix(".seg").and_then(|n| n.parse().ok()) {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Length of the complete frames at the start of `file`.
fn valid_len(file: &File) -> io::Result<u64> {
    let len = file.metadata()?.len();
    let mut pos = 0u64;
    let mut h = [0u8; HEADER as usize];
    while pos + HEADER <= len {
        file.read_exact_at(&mut h, pos)?;
        let n = u32::from_le_bytes(h) as u64;
        if pos + HEADER + n > len {
            break;
        }
        pos += HEADER + n;
    }
    Ok(pos)
}

/// Opens (or creates) the spool in `dir` holding at most `max` unacknowledged bytes.
pub fn open(dir: &Path, max: u64) -> io::Result<(SpoolWriter, SpoolReader)> {
    open_with(dir, max, SEGMENT_BYTES)
}

/// [`open`] with a chosen segment size.
pub fn open_with(
    dir: &Path,
    max: u64,
    segment_bytes: u64,
) -> io::Result<(SpoolWriter, SpoolReader)> {
    std::fs::create_dir_all(dir)?;
    let cursor_path = dir.join("cursor.json");
    let mut segs = segments(dir)?;
    let cursor = match std::fs::read(&cursor_path) {
        Ok(b) => {
            serde_json::from_slice::<Cursor>(&b)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
                .offset
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => segs.first().copied().unwrap_or(0),
        Err(e) => return Err(e),
    };
    // Segments wholly before the cursor were acknowledged: drop them.
    while segs.len() > 1 && segs[1] <= cursor {
        std::fs::remove_file(segment_path(dir, segs[0]))?;
        segs.remove(0);
    }
    let start = match segs.last() {
        Some(s) => *s,
        None => cursor,
    };
    let path = segment_path(dir, start);
    let file = OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(false)
        .open(&path)?;
    let valid = valid_len(&file)?;
    file.set_len(valid)?;
    file.sync_all()?;
    File::open(dir)?.sync_all()?;
    let durable = start + valid;
    let mut out = BufWriter::with_capacity(256 * 1024, file);
    io::Seek::seek(&mut out, io::SeekFrom::End(0))?;
    let shared = Arc::new(Shared {
        max: max.max(1),
        cursor: AtomicU64::new(cursor.min(durable)),
        durable: AtomicU64::new(durable),
        room: Notify::new(),
    });
    let (durable_tx, durable_rx) = watch::channel(durable);
    Ok((
        SpoolWriter {
            dir: dir.to_path_buf(),
            start,
            out,
            end: durable,
            durable_tx,
            shared: shared.clone(),
            segment_bytes: segment_bytes.max(1),
        },
        SpoolReader {
            dir: dir.to_path_buf(),
            pos: cursor.min(durable),
            open: None,
            durable_rx,
            shared,
        },
    ))
}

fn encode(rec: &Encoded) -> Vec<u8> {
    let id = rec.id.as_bytes();
    let payload = 8 + 2 + id.len() + rec.json.len();
    let mut b = Vec::with_capacity(HEADER as usize + payload);
    b.extend_from_slice(&(payload as u32).to_le_bytes());
    b.extend_from_slice(&rec.ts_nanos.to_le_bytes());
    b.extend_from_slice(&(id.len() as u16).to_le_bytes());
    b.extend_from_slice(id);
    b.extend_from_slice(&rec.json);
    b
}

fn decode(p: &[u8]) -> io::Result<Encoded> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "corrupt spool frame");
    if p.len() < 10 {
        return Err(bad());
    }
    let ts_nanos = i64::from_le_bytes(p[0..8].try_into().map_err(|_| bad())?);
    let id_len = u16::from_le_bytes(p[8..10].try_into().map_err(|_| bad())?) as usize;
    let id = p.get(10..10 + id_len).ok_or_else(bad)?;
    Ok(Encoded {
        id: RecordId::from(String::from_utf8_lossy(id).as_ref()),
        ts_nanos,
        json: Bytes::copy_from_slice(&p[10 + id_len..]),
    })
}

impl SpoolWriter {
    /// Appends a record (buffered; durable only after [`SpoolWriter::commit`]).
    pub fn append(&mut self, rec: &Encoded) -> io::Result<()> {
        let frame = encode(rec);
        self.out.write_all(&frame)?;
        self.end += frame.len() as u64;
        Ok(())
    }

    /// Makes everything appended durable (flush + fsync), publishes it to the reader,
    /// and starts a new segment when the current one is full.
    pub fn commit(&mut self) -> io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_data()?;
        self.shared.durable.store(self.end, Ordering::Release);
        self.durable_tx.send_replace(self.end);
        if self.end - self.start >= self.segment_bytes {
            let path = segment_path(&self.dir, self.end);
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            File::open(&self.dir)?.sync_all()?;
            self.out = BufWriter::with_capacity(256 * 1024, file);
            self.start = self.end;
        }
        Ok(())
    }

    /// Bytes not yet acknowledged (appended ones included).
    pub fn used(&self) -> u64 {
        self.end
            .saturating_sub(self.shared.cursor.load(Ordering::Acquire))
    }

    /// Whether the spool is at its size limit.
    pub fn is_full(&self) -> bool {
        self.used() >= self.shared.max
    }

    /// Waits until the spool is below its size limit.
    pub async fn wait_room(&self) {
        loop {
            let notified = self.shared.room.notified();
            if self.used() < self.shared.max {
                return;
            }
            notified.await;
        }
    }
}

impl SpoolReader {
    /// The next durable record and the position after it; waits for the writer.
    /// `None` once the writer is gone and everything durable was read.
    pub async fn next(&mut self) -> io::Result<Option<(Encoded, u64)>> {
        loop {
            let durable = *self.durable_rx.borrow_and_update();
            if self.pos < durable {
                return self.read_frame().map(Some);
            }
            if self.durable_rx.changed().await.is_err() {
                let durable = *self.durable_rx.borrow();
                if self.pos < durable {
                    return self.read_frame().map(Some);
                }
                return Ok(None);
            }
        }
    }

    fn read_frame(&mut self) -> io::Result<(Encoded, u64)> {
        let mut h = [0u8; HEADER as usize];
        let (start, file) = self.file_for(self.pos)?;
        let local = self.pos - start;
        if local + HEADER > file.metadata()?.len() {
            // End of this segment: the next one starts exactly here.
            self.open = None;
            let (start, file) = self.file_for(self.pos)?;
            if start != self.pos {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "spool segment missing",
                ));
            }
            return self.read_at(file, 0, &mut h);
        }
        self.read_at(file, local, &mut h)
    }

    fn read_at(&mut self, file: File, local: u64, h: &mut [u8; 4]) -> io::Result<(Encoded, u64)> {
        file.read_exact_at(h, local)?;
        let n = u32::from_le_bytes(*h) as usize;
        let mut payload = vec![0u8; n];
        file.read_exact_at(&mut payload, local + HEADER)?;
        let rec = decode(&payload)?;
        let start = self.pos - local;
        self.open = Some((start, file));
        self.pos += HEADER + n as u64;
        Ok((rec, self.pos))
    }

    /// The segment holding global offset `pos` (the one with the largest start ≤ pos).
    fn file_for(&mut self, pos: u64) -> io::Result<(u64, File)> {
        if let Some((start, f)) = self.open.take()
            && start <= pos
        {
            return Ok((start, f));
        }
        let start = segments(&self.dir)?
            .into_iter()
            .filter(|s| *s <= pos)
            .max()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no spool segment"))?;
        Ok((start, File::open(segment_path(&self.dir, start))?))
    }

    /// Records that everything before `upto` is acknowledged: persists the cursor, deletes
    /// segments wholly before it and wakes a writer waiting for room.
    pub fn ack(&mut self, upto: u64) -> io::Result<()> {
        let body = serde_json::to_vec(&Cursor { offset: upto })
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        write_atomic(&self.dir.join("cursor.json"), &body, true)?;
        self.shared.cursor.store(upto, Ordering::Release);
        let segs = segments(&self.dir)?;
        for pair in segs.windows(2) {
            if pair[1] <= upto {
                std::fs::remove_file(segment_path(&self.dir, pair[0]))?;
            }
        }
        self.shared.room.notify_waiters();
        Ok(())
    }

    /// Bytes durable but not yet acknowledged.
    pub fn used(&self) -> u64 {
        self.shared
            .durable
            .load(Ordering::Acquire)
            .saturating_sub(self.shared.cursor.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rec(n: u32) -> Encoded {
        Encoded {
            json: format!("{{\"message\":\"m-{n}\"}}").into_bytes().into(),
            id: format!("id-{n}").into(),
            ts_nanos: n as i64,
        }
    }

    #[tokio::test]
    async fn records_round_trip_and_only_durable_ones_are_readable() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, mut r) = open(dir.path(), 1 << 20).unwrap();
        w.append(&rec(1)).unwrap();
        let not_yet = tokio::time::timeout(Duration::from_millis(50), r.next()).await;
        assert!(
            not_yet.is_err(),
            "an uncommitted record must not be readable"
        );
        w.commit().unwrap();
        let (got, end) = r.next().await.unwrap().unwrap();
        assert_eq!(got.json, rec(1).json);
        assert_eq!(got.id, "id-1");
        assert_eq!(got.ts_nanos, 1);
        assert_eq!(end, w.used());
        drop(w);
        assert!(r.next().await.unwrap().is_none(), "writer gone, all read");
    }

    #[tokio::test]
    async fn reopen_resumes_after_the_acknowledged_cursor_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut w, mut r) = open(dir.path(), 1 << 20).unwrap();
            for n in 0..5 {
                w.append(&rec(n)).unwrap();
            }
            w.commit().unwrap();
            let mut end = 0;
            for _ in 0..2 {
                end = r.next().await.unwrap().unwrap().1;
            }
            r.ack(end).unwrap();
        }
        // A crash mid-write left half a frame at the end.
        let seg = segment_path(dir.path(), 0);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let (mut w, mut r) = open(dir.path(), 1 << 20).unwrap();
        let (first, _) = r.next().await.unwrap().unwrap();
        assert_eq!(first.id, "id-2", "acknowledged records are not read again");
        w.append(&rec(9)).unwrap();
        w.commit().unwrap();
        let ids: Vec<String> = [
            r.next().await.unwrap().unwrap().0.id.to_string(),
            r.next().await.unwrap().unwrap().0.id.to_string(),
            r.next().await.unwrap().unwrap().0.id.to_string(),
        ]
        .into();
        assert_eq!(ids, ["id-3", "id-4", "id-9"], "the torn frame is gone");
    }

    #[tokio::test]
    async fn a_full_spool_makes_the_writer_wait_until_the_reader_acknowledges() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, mut r) = open(dir.path(), 64).unwrap();
        for n in 0..3 {
            w.append(&rec(n)).unwrap();
        }
        w.commit().unwrap();
        assert!(w.used() >= 64);
        let waiting = tokio::time::timeout(Duration::from_millis(50), w.wait_room()).await;
        assert!(waiting.is_err(), "writer must wait while the spool is full");
        let mut end = 0;
        for _ in 0..3 {
            end = r.next().await.unwrap().unwrap().1;
        }
        r.ack(end).unwrap();
        tokio::time::timeout(Duration::from_secs(1), w.wait_room())
            .await
            .expect("room after the ack");
        assert_eq!(r.used(), 0);
    }

    #[tokio::test]
    async fn segments_roll_and_acknowledged_ones_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, mut r) = open_with(dir.path(), u64::MAX, 1000).unwrap();
        let big = Encoded {
            json: vec![b'x'; 500].into(),
            id: "big".into(),
            ts_nanos: 0,
        };
        for _ in 0..3 {
            w.append(&big).unwrap();
            w.commit().unwrap();
        }
        assert_eq!(segments(dir.path()).unwrap().len(), 2);
        let mut end = 0;
        for _ in 0..3 {
            end = r.next().await.unwrap().unwrap().1;
        }
        r.ack(end).unwrap();
        assert_eq!(
            segments(dir.path()).unwrap().len(),
            1,
            "the first segment is deleted"
        );
    }
}
