//! The disk buffer (`buffer.type: disk`): records spooled to segment files under the state
//! directory, so the agent can keep reading ahead of a slow or absent output (and release
//! rotated source files) without holding the records in memory.
//!
//! Two positions matter, both global byte offsets over the frames of the whole spool (a
//! segment file is named after the global offset of its first frame byte; segment headers
//! are not counted):
//! - *durable*: everything before it is written and fsynced. Source-file checkpoints move
//!   as soon as a record is durable here, because the spool now owns it.
//! - *cursor*: everything before it is acknowledged by every output. It is written
//!   atomically to `cursor.json`; segments wholly before it are deleted.
//!
//! The spool holds at most `max` bytes *on disk*: the writer waits for room (and so do the
//! readers behind it: backpressure) until the frames from the oldest segment still on disk
//! to the end, plus the group it is about to write, fit in `max`. Acknowledged bytes count
//! until their segment is deleted, which is why segments are at most an eighth of `max`
//! ([`segment_bytes_for`]): with one fixed 32 MiB segment a 1 MiB cap let 32 MiB of
//! acknowledged records sit on the node's disk. The one exception: a spool holding nothing
//! unacknowledged always takes the next group, or a group larger than the room left beside
//! the current segment's acknowledged bytes would wait forever. Segment headers (8 bytes a
//! segment) are not counted. A torn frame at the end of the last
//! segment (a crash mid-write) is cut off on open; it was never durable, so its source
//! lines were never checkpointed and are read again.
//!
//! # On-disk format (version 1)
//!
//! A segment starts with an 8-byte header: the magic `OSPL`, the format version (1) and
//! three zero bytes. Then frames, each `len: u32 LE`, `crc: u32 LE`, `len` payload bytes,
//! where `crc` is the CRC32C of the four length bytes followed by the payload (so a
//! zero-filled region is never a valid frame). The payload is `ts_nanos: i64 LE`,
//! `id_len: u16 LE`, the id, then the record's JSON. No frame is longer than
//! [`MAX_FRAME`]: a length above it is corruption and is never allocated.
//!
//! A *bad frame* (CRC mismatch, impossible length, or a payload that is not a record) is
//! skipped, never shipped: the reader looks for the next offset where a frame passes its
//! check (a corrupt length cannot make it lose the good frames behind it), reports the
//! skipped bytes to the handler set with [`SpoolReader::report_bad_frames`] (the pipeline
//! counts them and writes them to the spool's dead-letter file) and logs them.
//!
//! # Version 0 segments
//!
//! Agents before version 1 wrote segments without a header, frames being `len: u32 LE`
//! and the payload, unchecked. Such a segment is recognised by the absence of the magic
//! (read as a version-0 length, `OSPL` is 1.3 GB, a frame no agent ever wrote) and is
//! **read by the old rules** rather than moved aside: its records were already
//! checkpointed out of their source files when they were spooled, so the segment is the
//! only copy left, and shipping them unchecked is better than losing them on an upgrade.
//! A warning names every such segment when the spool opens. The old rules still bound the
//! length ([`MAX_FRAME`]) and check that the payload is a record; with no checksum, a bad
//! version-0 length cannot be resynchronised, so the rest of that segment is the bad frame.
//! New frames are never appended to a version-0 segment: the writer starts a version-1
//! segment after it. A segment of a *newer* version is refused (the spool does not open,
//! loudly): a downgraded agent must not ship or dead-letter what it cannot read.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use super::checkpoint::write_atomic;
use bytes::Bytes;

use super::record::{Encoded, RecordId};

/// A new segment is started once the current one is this large (at most; see
/// [`segment_bytes_for`]).
pub const SEGMENT_BYTES: u64 = 32 << 20;
/// The smallest segment [`segment_bytes_for`] picks: tiny caps would otherwise mean a file
/// (and an fsync of the directory) per few records.
pub const MIN_SEGMENT_BYTES: u64 = 4 << 10;

/// The segment size for a spool capped at `max` bytes: an eighth of the cap (between
/// [`MIN_SEGMENT_BYTES`] and [`SEGMENT_BYTES`]), so the acknowledged bytes a segment keeps
/// on disk until it is wholly acknowledged and deleted take at most an eighth of the cap.
pub fn segment_bytes_for(max: u64) -> u64 {
    (max / 8).clamp(MIN_SEGMENT_BYTES, SEGMENT_BYTES)
}
/// The segment header's magic.
const MAGIC: [u8; 4] = *b"OSPL";
/// The format this agent writes.
pub const FORMAT_VERSION: u8 = 1;
/// Segment header (version 1): magic, version, three reserved zero bytes.
pub const SEGMENT_HEADER: u64 = 8;
/// Frame header (version 1): payload length, CRC32C.
pub const FRAME_HEADER: u64 = 8;
/// Frame header of version-0 segments: payload length only.
const V0_FRAME_HEADER: u64 = 4;
/// Largest frame payload. A record that would be larger is not spooled (it is reported as
/// a bad frame, `too_large`); a length above it on disk is corruption.
pub const MAX_FRAME: u64 = 64 << 20;
/// The shortest payload that is a record: time and id length.
const MIN_PAYLOAD: usize = 10;
/// Bytes of a bad frame handed to the report, at most.
pub const BAD_FRAME_SAMPLE: usize = 64 << 10;

/// Errors about a segment's format (carried inside `io::Error`s of kind `InvalidData`).
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error(
        "spool segment {path} has format version {version}; this agent reads versions 0 and {FORMAT_VERSION} (a newer agent wrote it: upgrade again, or move the segment away to drop its records)"
    )]
    UnknownVersion { path: PathBuf, version: u8 },
    #[error("corrupt spool cursor {path}: {source}")]
    Cursor {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl From<FormatError> for io::Error {
    fn from(e: FormatError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Why a frame was not shipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadReason {
    /// CRC32C mismatch, or a length that is too large or runs past the written data.
    Checksum,
    /// The frame passed its check (or has none: version 0) but its payload is not a record.
    Record,
    /// A record whose frame would be larger than [`MAX_FRAME`]: never written.
    TooLarge,
    /// A segment file is missing: the bytes between the segments are gone.
    Missing,
}

impl BadReason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            BadReason::Checksum => "checksum",
            BadReason::Record => "record",
            BadReason::TooLarge => "too_large",
            BadReason::Missing => "missing",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            BadReason::Checksum => "spool frame failed its CRC32C check (corrupt on disk)",
            BadReason::Record => "spool frame holds no valid record",
            BadReason::TooLarge => "record larger than the spool's maximum frame; not spooled",
            BadReason::Missing => "spool segment missing",
        }
    }
}

/// A frame (or a run of bytes) that was skipped instead of shipped.
#[derive(Clone, Debug)]
pub struct BadFrame {
    pub reason: BadReason,
    /// The segment file it was in.
    pub segment: PathBuf,
    /// Global offset of its first byte.
    pub offset: u64,
    /// Bytes skipped.
    pub bytes: u64,
    /// The record as far as it could be decoded (its length was sane), for the operator:
    /// its content is not to be trusted.
    pub record: Option<Encoded>,
    /// The first [`BAD_FRAME_SAMPLE`] bytes skipped, when no record could be decoded.
    pub sample: Vec<u8>,
}

impl BadFrame {
    /// The dead-letter line for it.
    pub fn dead_letter_line(&self) -> serde_json::Value {
        let mut line = serde_json::json!({
            "reason": self.reason.describe(),
            "spool": {
                "segment": self.segment.display().to_string(),
                "offset": self.offset,
                "bytes": self.bytes,
            },
        });
        match &self.record {
            Some(rec) => {
                line["record"] = String::from_utf8_lossy(&rec.json).into();
                if !rec.id.is_empty() {
                    line["id"] = rec.id.as_str().into();
                }
            }
            None => line["raw"] = String::from_utf8_lossy(&self.sample).into(),
        }
        line
    }
}

/// Where bad frames are reported, besides the log.
pub type BadFrameHandler = Arc<dyn Fn(&BadFrame) + Send + Sync>;

struct Report(Mutex<Option<BadFrameHandler>>);

impl std::fmt::Debug for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Report")
    }
}

impl Report {
    fn send(&self, bad: &BadFrame) {
        tracing::error!(
            segment = %bad.segment.display(),
            offset = bad.offset,
            bytes = bad.bytes,
            reason = bad.reason.label(),
            "disk buffer: bad frame skipped"
        );
        let handler = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(h) = handler {
            h(bad);
        }
    }
}

#[derive(Debug)]
struct Shared {
    max: u64,
    /// Global offset of the oldest segment still on disk: what is on disk is `retained..end`.
    retained: AtomicU64,
    cursor: AtomicU64,
    durable: AtomicU64,
    room: Notify,
    report: Report,
}

/// Appends records; owned by the pipeline's spool writer task.
#[derive(Debug)]
pub struct SpoolWriter {
    dir: PathBuf,
    /// Global offset of the current (version 1) segment's first frame byte.
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
    open: Option<Segment>,
    durable_rx: watch::Receiver<u64>,
    shared: Arc<Shared>,
}

#[derive(Serialize, Deserialize)]
struct Cursor {
    offset: u64,
}

/// A segment file's layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    V0,
    V1,
}

impl Format {
    /// File offset of the first frame.
    fn data_start(self) -> u64 {
        match self {
            Format::V0 => 0,
            Format::V1 => SEGMENT_HEADER,
        }
    }
}

#[derive(Debug)]
struct Segment {
    start: u64,
    format: Format,
    file: File,
}

fn segment_path(dir: &Path, start: u64) -> PathBuf {
    dir.join(format!("{start:020}.seg"))
}

fn header() -> [u8; SEGMENT_HEADER as usize] {
    [
        MAGIC[0],
        MAGIC[1],
        MAGIC[2],
        MAGIC[3],
        FORMAT_VERSION,
        0,
        0,
        0,
    ]
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

/// The format of a segment file; `None` when it is shorter than a header (a new segment
/// whose header was torn, or a version-0 one holding no complete record either way).
fn format_of(path: &Path, file: &File) -> io::Result<Option<Format>> {
    let len = file.metadata()?.len();
    if len < SEGMENT_HEADER {
        return Ok(None);
    }
    let mut h = [0u8; SEGMENT_HEADER as usize];
    file.read_exact_at(&mut h, 0)?;
    if h[..4] != MAGIC {
        return Ok(Some(Format::V0));
    }
    if h[4] != FORMAT_VERSION {
        return Err(FormatError::UnknownVersion {
            path: path.to_path_buf(),
            version: h[4],
        }
        .into());
    }
    Ok(Some(Format::V1))
}

/// Why the bytes at an offset are not a good frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NotFrame {
    /// A frame cut short by the end of the data (a torn write, if at the end).
    Torn,
    Bad(BadReason),
}

/// The version-1 frame at the start of `b` (which runs to the end of the readable data):
/// the record and the frame's length.
fn check_v1(b: &[u8]) -> Result<(Encoded, u64), NotFrame> {
    let h = b.get(..FRAME_HEADER as usize).ok_or(NotFrame::Torn)?;
    let n = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as u64;
    if n > MAX_FRAME {
        return Err(NotFrame::Bad(BadReason::Checksum));
    }
    let end = FRAME_HEADER + n;
    let payload = b
        .get(FRAME_HEADER as usize..end as usize)
        .ok_or(NotFrame::Torn)?;
    let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    if crc32c::crc32c_append(crc32c::crc32c(&h[..4]), payload) != crc {
        return Err(NotFrame::Bad(BadReason::Checksum));
    }
    let rec = decode(payload).ok_or(NotFrame::Bad(BadReason::Record))?;
    Ok((rec, end))
}

/// Reads `len` bytes at `at`.
fn read_vec(file: &File, at: u64, len: u64) -> io::Result<Vec<u8>> {
    let mut b = vec![0u8; len as usize];
    file.read_exact_at(&mut b, at)?;
    Ok(b)
}

/// The version-1 frame at file offset `at`, data ending at `limit`. A length above
/// [`MAX_FRAME`] is never allocated.
fn frame_at(file: &File, at: u64, limit: u64) -> io::Result<Result<(Encoded, u64), NotFrame>> {
    if at + FRAME_HEADER > limit {
        return Ok(Err(NotFrame::Torn));
    }
    let h = read_vec(file, at, FRAME_HEADER)?;
    let n = u64::from(u32::from_le_bytes([h[0], h[1], h[2], h[3]]));
    if n > MAX_FRAME {
        return Ok(Err(NotFrame::Bad(BadReason::Checksum)));
    }
    if at + FRAME_HEADER + n > limit {
        return Ok(Err(NotFrame::Torn));
    }
    let b = read_vec(file, at, FRAME_HEADER + n)?;
    Ok(check_v1(&b))
}

/// The first offset after `from` (before `limit`) where a good version-1 frame starts.
/// Reads the rest of the segment once: this runs only after a bad frame.
fn resync(file: &File, from: u64, limit: u64) -> io::Result<Option<u64>> {
    let first = from + 1;
    if first + FRAME_HEADER > limit {
        return Ok(None);
    }
    let b = read_vec(file, first, limit - first)?;
    Ok(resync_in(&b).map(|i| first + i as u64))
}

/// The first index of `b` where a good version-1 frame starts.
fn resync_in(b: &[u8]) -> Option<usize> {
    (0..b.len().saturating_sub(FRAME_HEADER as usize - 1)).find(|&i| {
        let n = u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) as u64;
        n <= MAX_FRAME
            && (i as u64 + FRAME_HEADER + n) <= b.len() as u64
            && check_v1(&b[i..]).is_ok()
    })
}

/// Where appending continues in the last version-1 segment (a file offset): after its last
/// frame, good or bad. What follows, a frame cut short by the end of the file or zeros
/// with no good frame after them, is a torn write: never durable, cut.
fn v1_tail(file: &File) -> io::Result<u64> {
    let len = file.metadata()?.len();
    let mut at = SEGMENT_HEADER;
    while at < len {
        match frame_at(file, at, len)? {
            Ok((_, n)) => at += n,
            Err(why) => match resync(file, at, len)? {
                Some(next) => at = next,
                None => {
                    let rest = read_vec(file, at, len - at)?;
                    if why == NotFrame::Torn || rest.iter().all(|b| *b == 0) {
                        return Ok(at);
                    }
                    return Ok(len);
                }
            },
        }
    }
    Ok(at)
}

/// Length of the complete frames at the start of a version-0 segment (its old rule).
fn v0_tail(file: &File) -> io::Result<u64> {
    let len = file.metadata()?.len();
    let mut pos = 0u64;
    let mut h = [0u8; V0_FRAME_HEADER as usize];
    while pos + V0_FRAME_HEADER <= len {
        file.read_exact_at(&mut h, pos)?;
        let n = u32::from_le_bytes(h) as u64;
        if pos + V0_FRAME_HEADER + n > len {
            break;
        }
        pos += V0_FRAME_HEADER + n;
    }
    Ok(pos)
}

/// Creates (or empties) a version-1 segment holding only its header, fsynced.
fn new_segment(dir: &Path, start: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(segment_path(dir, start))?;
    // Through the file's cursor, so that appending goes on after the header.
    (&file).write_all(&header())?;
    file.sync_all()?;
    File::open(dir)?.sync_all()?;
    Ok(file)
}

/// Opens (or creates) the spool in `dir` holding at most `max` bytes on disk.
pub fn open(dir: &Path, max: u64) -> io::Result<(SpoolWriter, SpoolReader)> {
    open_with(dir, max, segment_bytes_for(max))
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
                .map_err(|source| FormatError::Cursor {
                    path: cursor_path.clone(),
                    source,
                })?
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
    // Every segment left is read later: refuse a format this agent cannot read now.
    for s in &segs {
        let path = segment_path(dir, *s);
        if format_of(&path, &File::open(&path)?)? == Some(Format::V0) {
            tracing::warn!(segment = %path.display(), "disk buffer segment of format version 0 (no checksums): its records are shipped by the old rules");
        }
    }
    let mut start = match segs.last() {
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
    let (file, valid) = match format_of(&path, &file)? {
        None => (new_segment(dir, start)?, 0),
        Some(Format::V1) => {
            let tail = v1_tail(&file)?;
            let len = file.metadata()?.len();
            if tail < len {
                tracing::info!(segment = %path.display(), bytes = len - tail, "disk buffer: torn write at the end cut (never durable; its lines are read again)");
                file.set_len(tail)?;
                file.sync_all()?;
            }
            (file, tail - SEGMENT_HEADER)
        }
        Some(Format::V0) => {
            let tail = v0_tail(&file)?;
            file.set_len(tail)?;
            file.sync_all()?;
            drop(file);
            if tail < SEGMENT_HEADER {
                // Too short to hold a record (or to be told from a torn version-1
                // segment later): started afresh.
                (new_segment(dir, start)?, 0)
            } else {
                // Never append to a version-0 segment: a version-1 one starts after it.
                start += tail;
                (new_segment(dir, start)?, 0)
            }
        }
    };
    let durable = start + valid;
    let mut out = BufWriter::with_capacity(256 * 1024, file);
    io::Seek::seek(&mut out, io::SeekFrom::End(0))?;
    let shared = Arc::new(Shared {
        max: max.max(1),
        retained: AtomicU64::new(segs.first().copied().unwrap_or(start).min(start)),
        cursor: AtomicU64::new(cursor.min(durable)),
        durable: AtomicU64::new(durable),
        room: Notify::new(),
        report: Report(Mutex::new(None)),
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

/// The bytes [`SpoolWriter::append`] writes for `rec` (0 for a record too large to spool),
/// so a writer can wait for room for a whole group first.
pub fn frame_len(rec: &Encoded) -> u64 {
    let payload = 8 + 2 + rec.id.as_bytes().len() as u64 + rec.json.len() as u64;
    if payload > MAX_FRAME {
        return 0;
    }
    FRAME_HEADER + payload
}

/// [`frame_len`] of every record.
pub fn frames_len<'a>(recs: impl IntoIterator<Item = &'a Encoded>) -> u64 {
    recs.into_iter().map(frame_len).sum()
}

/// A version-1 frame for the record; `None` when it would be larger than [`MAX_FRAME`].
fn encode(rec: &Encoded) -> Option<Vec<u8>> {
    let id = rec.id.as_bytes();
    let payload = 8 + 2 + id.len() + rec.json.len();
    if payload as u64 > MAX_FRAME {
        return None;
    }
    let mut b = Vec::with_capacity(FRAME_HEADER as usize + payload);
    b.extend_from_slice(&(payload as u32).to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(&rec.ts_nanos.to_le_bytes());
    b.extend_from_slice(&(id.len() as u16).to_le_bytes());
    b.extend_from_slice(id);
    b.extend_from_slice(&rec.json);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..4]), &b[FRAME_HEADER as usize..]);
    b[4..8].copy_from_slice(&crc.to_le_bytes());
    Some(b)
}

/// A payload as a record: `None` when it is too short or its id runs past its end.
fn decode(p: &[u8]) -> Option<Encoded> {
    if p.len() < MIN_PAYLOAD {
        return None;
    }
    let ts_nanos = i64::from_le_bytes(p[0..8].try_into().ok()?);
    let id_len = usize::from(u16::from_le_bytes(p[8..10].try_into().ok()?));
    let id = p.get(10..10 + id_len)?;
    Some(Encoded {
        id: RecordId::from(String::from_utf8_lossy(id).as_ref()),
        ts_nanos,
        json: Bytes::copy_from_slice(&p[10 + id_len..]),
    })
}

impl SpoolWriter {
    /// Appends a record (buffered; durable only after [`SpoolWriter::commit`]). A record
    /// too large for a frame is not written: it is reported as a bad frame (`too_large`).
    pub fn append(&mut self, rec: &Encoded) -> io::Result<()> {
        let Some(frame) = encode(rec) else {
            self.shared.report.send(&BadFrame {
                reason: BadReason::TooLarge,
                segment: segment_path(&self.dir, self.start),
                offset: self.end,
                bytes: 0,
                record: Some(rec.clone()),
                sample: Vec::new(),
            });
            return Ok(());
        };
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
            // What is committed stays committed: a failed roll is tried again next time.
            match new_segment(&self.dir, self.end) {
                Ok(file) => {
                    self.out = BufWriter::with_capacity(256 * 1024, file);
                    self.start = self.end;
                }
                Err(e) => {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "disk buffer: starting a new segment failed; appending to the current one");
                }
            }
        }
        Ok(())
    }

    /// Restarts the writer after an I/O error: what was appended but not committed is
    /// discarded (the caller appends it again) and the segment is reopened and cut back to
    /// the durable end, so no half-written frame stays behind.
    pub fn restart(&mut self) -> io::Result<()> {
        let durable = self.shared.durable.load(Ordering::Acquire);
        let path = segment_path(&self.dir, self.start);
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        file.set_len(SEGMENT_HEADER + (durable - self.start))?;
        file.sync_all()?;
        let mut out = BufWriter::with_capacity(256 * 1024, file);
        io::Seek::seek(&mut out, io::SeekFrom::End(0))?;
        // The old buffer is dropped unwritten (into_parts does not flush).
        let (_, _unwritten) = std::mem::replace(&mut self.out, out).into_parts();
        self.end = durable;
        Ok(())
    }

    /// Bytes not yet acknowledged (appended ones included).
    pub fn used(&self) -> u64 {
        self.end
            .saturating_sub(self.shared.cursor.load(Ordering::Acquire))
    }

    /// Frame bytes on disk: from the oldest segment not yet deleted (acknowledged bytes
    /// included) to the last appended frame.
    pub fn on_disk(&self) -> u64 {
        self.end
            .saturating_sub(self.shared.retained.load(Ordering::Acquire))
    }

    /// Whether `bytes` more fit beneath the size limit (always, when nothing is
    /// unacknowledged: see the module documentation).
    pub fn has_room_for(&self, bytes: u64) -> bool {
        self.used() == 0 || self.on_disk().saturating_add(bytes) <= self.shared.max
    }

    /// Whether the spool is at its size limit.
    pub fn is_full(&self) -> bool {
        !self.has_room_for(1)
    }

    /// Waits until the spool is below its size limit.
    pub async fn wait_room(&self) {
        self.wait_room_for(1).await
    }

    /// Waits until `bytes` more fit ([`SpoolWriter::has_room_for`]).
    pub async fn wait_room_for(&self, bytes: u64) {
        loop {
            let notified = self.shared.room.notified();
            if self.has_room_for(bytes) {
                return;
            }
            notified.await;
        }
    }
}

impl SpoolReader {
    /// Sends every bad frame (read by this reader, or refused by its writer) to `handler`.
    pub fn report_bad_frames(&self, handler: BadFrameHandler) {
        *self
            .shared
            .report
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(handler);
    }

    /// The next durable record and the position after it; waits for the writer. Bad
    /// frames are reported and skipped. `None` once the writer is gone and everything
    /// durable was read.
    pub async fn next(&mut self) -> io::Result<Option<(Encoded, u64)>> {
        loop {
            let durable = *self.durable_rx.borrow_and_update();
            if self.pos < durable {
                if let Some(r) = self.read_frame(durable)? {
                    return Ok(Some(r));
                }
                continue;
            }
            if self.durable_rx.changed().await.is_err() {
                let durable = *self.durable_rx.borrow();
                if self.pos < durable {
                    if let Some(r) = self.read_frame(durable)? {
                        return Ok(Some(r));
                    }
                    continue;
                }
                return Ok(None);
            }
        }
    }

    /// Restarts the reader after an I/O error: the segment is opened again on the next
    /// read, which resumes at the same position.
    pub fn restart(&mut self) {
        self.open = None;
    }

    /// Reads the frame at `pos` (before `durable`): the record, or `None` when bad bytes
    /// (or a missing segment) were skipped instead.
    fn read_frame(&mut self, durable: u64) -> io::Result<Option<(Encoded, u64)>> {
        let seg = self.segment_for(self.pos)?;
        let data = seg.format.data_start();
        let len = seg.file.metadata()?.len();
        let at = self.pos - seg.start + data;
        let limit = len.min(durable - seg.start + data);
        if at >= limit {
            // End of this segment: the next one starts exactly here.
            let done = seg.start;
            return match segments(&self.dir)?.into_iter().find(|s| *s > done) {
                Some(next) if next == self.pos => Ok(None),
                Some(next) if next > self.pos => {
                    self.skip(BadReason::Missing, next - self.pos, None, Vec::new(), done);
                    Ok(None)
                }
                _ => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "spool segment missing",
                )),
            };
        }
        let (start, format) = (seg.start, seg.format);
        let (bad, skip) = match format {
            Format::V1 => match frame_at(&seg.file, at, limit)? {
                Ok((rec, n)) => {
                    self.pos += n;
                    self.open = Some(seg);
                    return Ok(Some((rec, self.pos)));
                }
                Err(why) => {
                    let next = resync(&seg.file, at, limit)?.unwrap_or(limit);
                    let reason = match why {
                        NotFrame::Bad(r) => r,
                        NotFrame::Torn => BadReason::Checksum,
                    };
                    (reason, next - at)
                }
            },
            Format::V0 => {
                let h = if at + V0_FRAME_HEADER <= limit {
                    Some(read_vec(&seg.file, at, V0_FRAME_HEADER)?)
                } else {
                    None
                };
                let n = h.map(|h| u64::from(u32::from_le_bytes([h[0], h[1], h[2], h[3]])));
                match n {
                    Some(n) if n <= MAX_FRAME && at + V0_FRAME_HEADER + n <= limit => {
                        let payload = read_vec(&seg.file, at + V0_FRAME_HEADER, n)?;
                        if let Some(rec) = decode(&payload) {
                            self.pos += V0_FRAME_HEADER + n;
                            self.open = Some(seg);
                            return Ok(Some((rec, self.pos)));
                        }
                        (BadReason::Record, V0_FRAME_HEADER + n)
                    }
                    // No checksum to find the next frame by: the rest of the segment.
                    _ => (BadReason::Checksum, limit - at),
                }
            }
        };
        let header_len = match format {
            Format::V0 => V0_FRAME_HEADER,
            Format::V1 => FRAME_HEADER,
        };
        // For the operator: the record as far as it decodes, else the first bytes.
        let mut record = None;
        if at + header_len <= limit {
            let h = read_vec(&seg.file, at, 4)?;
            let n = u64::from(u32::from_le_bytes([h[0], h[1], h[2], h[3]]));
            if n <= MAX_FRAME && header_len + n <= skip {
                record = decode(&read_vec(&seg.file, at + header_len, n)?);
            }
        }
        let sample = match record {
            Some(_) => Vec::new(),
            None => read_vec(&seg.file, at, skip.min(BAD_FRAME_SAMPLE as u64))?,
        };
        self.open = Some(seg);
        self.skip(bad, skip, record, sample, start);
        Ok(None)
    }

    /// Reports `bytes` skipped at `pos` and moves past them.
    fn skip(
        &mut self,
        reason: BadReason,
        bytes: u64,
        record: Option<Encoded>,
        sample: Vec<u8>,
        segment: u64,
    ) {
        self.shared.report.send(&BadFrame {
            reason,
            segment: segment_path(&self.dir, segment),
            offset: self.pos,
            bytes,
            record,
            sample,
        });
        self.pos += bytes;
    }

    /// The segment holding global offset `pos` (the one with the largest start ≤ pos),
    /// taken out of the cache (put it back with `self.open = Some(..)`).
    fn segment_for(&mut self, pos: u64) -> io::Result<Segment> {
        if let Some(s) = self.open.take()
            && s.start <= pos
        {
            return Ok(s);
        }
        let start = segments(&self.dir)?
            .into_iter()
            .filter(|s| *s <= pos)
            .max()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no spool segment"))?;
        let path = segment_path(&self.dir, start);
        let file = File::open(&path)?;
        let format = format_of(&path, &file)?.unwrap_or(Format::V1);
        Ok(Segment {
            start,
            format,
            file,
        })
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
                self.shared.retained.fetch_max(pair[1], Ordering::AcqRel);
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

    /// Frame bytes of the segment files in `dir` (their headers left out, as the cap does).
    fn frames_on_disk(dir: &Path) -> u64 {
        segments(dir)
            .unwrap()
            .iter()
            .map(|s| std::fs::metadata(segment_path(dir, *s)).unwrap().len() - SEGMENT_HEADER)
            .sum()
    }

    #[tokio::test]
    async fn the_files_on_disk_stay_within_the_cap_while_the_reader_acknowledges_behind() {
        // A reader that keeps up (acknowledging all but the newest group) kept the
        // unacknowledged bytes low while one 32 MiB segment of acknowledged records grew on
        // disk: the cap counted only what was unacknowledged. Phases where the reader
        // stalls fill the spool to its cap.
        let dir = tempfile::tempdir().unwrap();
        let max = 64 << 10;
        let (mut w, mut r) = open(dir.path(), max).unwrap();
        let group: Vec<Encoded> = (0..100).map(rec).collect();
        let need = frames_len(&group);
        let (mut written, mut waited) = (0u64, 0);
        for i in 0..400 {
            let stalled = (i / 25) % 2 == 1;
            if !stalled {
                // acknowledges what it read before, then reads what is new
                let upto = r.pos;
                if upto > r.shared.cursor.load(Ordering::Acquire) {
                    r.ack(upto).unwrap();
                }
                while r.pos < w.end {
                    r.next().await.unwrap().unwrap();
                }
            }
            if w.has_room_for(need) {
                for rec in &group {
                    w.append(rec).unwrap();
                }
                w.commit().unwrap();
                written += need;
            } else {
                // (the first step after a stall only acknowledges what came before it)
                assert!(
                    stalled || i % 25 == 0,
                    "no room at step {i} though the reader keeps up"
                );
                waited += 1;
            }
            let on_disk = frames_on_disk(dir.path());
            assert!(
                on_disk <= max,
                "{on_disk} bytes on disk over a cap of {max}"
            );
            assert_eq!(on_disk, w.on_disk());
        }
        assert!(written > 10 * max, "the spool kept going ({written} bytes)");
        assert!(waited > 0, "the cap was reached");
    }

    #[test]
    fn segments_are_an_eighth_of_the_cap_within_bounds() {
        assert_eq!(segment_bytes_for(1 << 30), SEGMENT_BYTES);
        assert_eq!(segment_bytes_for(16 << 20), 2 << 20);
        assert_eq!(segment_bytes_for(1000), MIN_SEGMENT_BYTES);
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

    /// Reports collected by a handler.
    fn collect(r: &SpoolReader) -> Arc<Mutex<Vec<BadFrame>>> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        r.report_bad_frames(Arc::new(move |b: &BadFrame| {
            sink.lock().unwrap().push(b.clone())
        }));
        seen
    }

    /// Writes records 0..n in one segment, returns the frames' file offsets.
    fn spool_of(dir: &Path, n: u32) -> Vec<u64> {
        let (mut w, _r) = open(dir, 1 << 20).unwrap();
        let mut at = vec![SEGMENT_HEADER];
        for i in 0..n {
            w.append(&rec(i)).unwrap();
            at.push(SEGMENT_HEADER + w.end);
        }
        w.commit().unwrap();
        at
    }

    fn flip(dir: &Path, at: u64) {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(segment_path(dir, 0))
            .unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x20], at).unwrap();
    }

    async fn drain(r: &mut SpoolReader, w: SpoolWriter) -> Vec<String> {
        drop(w);
        let mut ids = Vec::new();
        while let Some((rec, _)) = r.next().await.unwrap() {
            ids.push(rec.id.to_string());
        }
        ids
    }

    #[tokio::test]
    async fn a_flipped_payload_byte_is_reported_and_skipped_and_every_other_record_read() {
        let dir = tempfile::tempdir().unwrap();
        let at = spool_of(dir.path(), 5);
        flip(dir.path(), at[2] + FRAME_HEADER + 14);
        let (w, mut r) = open(dir.path(), 1 << 20).unwrap();
        let seen = collect(&r);
        let ids = drain(&mut r, w).await;
        assert_eq!(ids, ["id-0", "id-1", "id-3", "id-4"]);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].reason, BadReason::Checksum);
        assert_eq!(seen[0].offset, at[2] - SEGMENT_HEADER);
        assert_eq!(seen[0].bytes, at[3] - at[2]);
        let line = seen[0].dead_letter_line().to_string();
        assert!(line.contains("CRC32C") && line.contains("m-2"), "{line}");
    }

    #[tokio::test]
    async fn a_corrupt_length_does_not_lose_the_frames_after_it() {
        for (byte, big) in [(0u64, false), (3, true)] {
            let dir = tempfile::tempdir().unwrap();
            let at = spool_of(dir.path(), 5);
            // A bigger length (past the data or above the maximum frame) or a smaller one.
            flip(dir.path(), at[1] + byte);
            let (w, mut r) = open(dir.path(), 1 << 20).unwrap();
            let seen = collect(&r);
            let ids = drain(&mut r, w).await;
            assert_eq!(ids, ["id-0", "id-2", "id-3", "id-4"], "big length: {big}");
            assert_eq!(seen.lock().unwrap().len(), 1);
            assert_eq!(seen.lock().unwrap()[0].bytes, at[2] - at[1]);
        }
    }

    #[tokio::test]
    async fn a_corrupt_last_frame_is_kept_and_reported_and_appending_goes_on_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let at = spool_of(dir.path(), 3);
        flip(dir.path(), at[2] + FRAME_HEADER + 3);
        let (mut w, mut r) = open(dir.path(), 1 << 20).unwrap();
        let seen = collect(&r);
        w.append(&rec(7)).unwrap();
        w.commit().unwrap();
        assert_eq!(drain(&mut r, w).await, ["id-0", "id-1", "id-7"]);
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn zeros_at_the_end_are_a_torn_write_and_cut() {
        let dir = tempfile::tempdir().unwrap();
        let at = spool_of(dir.path(), 2);
        let f = OpenOptions::new()
            .append(true)
            .open(segment_path(dir.path(), 0))
            .unwrap();
        f.set_len(at[2] + 4096).unwrap();
        let (w, mut r) = open(dir.path(), 1 << 20).unwrap();
        let seen = collect(&r);
        assert_eq!(
            std::fs::metadata(segment_path(dir.path(), 0))
                .unwrap()
                .len(),
            at[2]
        );
        assert_eq!(drain(&mut r, w).await, ["id-0", "id-1"]);
        assert!(seen.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_version_0_segment_is_read_by_the_old_rules_and_new_records_go_to_a_version_1_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut old = Vec::new();
        for i in 0..3u32 {
            let r = rec(i);
            let payload = 8 + 2 + r.id.as_bytes().len() + r.json.len();
            old.extend_from_slice(&(payload as u32).to_le_bytes());
            old.extend_from_slice(&r.ts_nanos.to_le_bytes());
            old.extend_from_slice(&(r.id.as_bytes().len() as u16).to_le_bytes());
            old.extend_from_slice(r.id.as_bytes());
            old.extend_from_slice(&r.json);
        }
        let v0_len = old.len() as u64;
        old.extend_from_slice(&[9, 0, 0, 0, 1]); // torn
        std::fs::write(segment_path(dir.path(), 0), &old).unwrap();
        let (mut w, mut r) = open(dir.path(), 1 << 20).unwrap();
        assert_eq!(segments(dir.path()).unwrap(), [0, v0_len]);
        assert_eq!(
            std::fs::read(segment_path(dir.path(), v0_len)).unwrap(),
            header()
        );
        w.append(&rec(3)).unwrap();
        w.commit().unwrap();
        assert_eq!(drain(&mut r, w).await, ["id-0", "id-1", "id-2", "id-3"]);
    }

    #[tokio::test]
    async fn a_segment_of_a_newer_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = header();
        h[4] = 2;
        std::fs::write(segment_path(dir.path(), 0), h).unwrap();
        let err = open(dir.path(), 1 << 20).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("format version 2"), "{err}");
    }

    #[tokio::test]
    async fn a_record_too_large_for_a_frame_is_reported_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, mut r) = open(dir.path(), u64::MAX).unwrap();
        let seen = collect(&r);
        let huge = Encoded {
            json: vec![b'x'; MAX_FRAME as usize].into(),
            id: "huge".into(),
            ts_nanos: 0,
        };
        w.append(&rec(0)).unwrap();
        w.append(&huge).unwrap();
        w.append(&rec(1)).unwrap();
        w.commit().unwrap();
        assert_eq!(drain(&mut r, w).await, ["id-0", "id-1"]);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].reason, BadReason::TooLarge);
    }

    #[tokio::test]
    async fn a_restarted_writer_drops_what_was_not_committed() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, mut r) = open(dir.path(), 1 << 20).unwrap();
        w.append(&rec(0)).unwrap();
        w.commit().unwrap();
        w.append(&rec(1)).unwrap();
        w.out.flush().unwrap(); // half-way through a failed commit
        w.append(&rec(2)).unwrap();
        w.restart().unwrap();
        w.append(&rec(3)).unwrap();
        w.commit().unwrap();
        assert_eq!(drain(&mut r, w).await, ["id-0", "id-3"]);
    }

    #[tokio::test]
    async fn a_restarted_reader_resumes_where_it_failed() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, mut r) = open(dir.path(), 1 << 20).unwrap();
        for n in 0..3 {
            w.append(&rec(n)).unwrap();
        }
        w.commit().unwrap();
        assert_eq!(r.next().await.unwrap().unwrap().0.id, "id-0");
        // The segment is gone for a while: the read fails, nothing is skipped.
        let seg = segment_path(dir.path(), 0);
        let aside = dir.path().join("aside");
        std::fs::rename(&seg, &aside).unwrap();
        r.restart();
        assert!(r.next().await.is_err());
        std::fs::rename(&aside, &seg).unwrap();
        r.restart();
        assert_eq!(drain(&mut r, w).await, ["id-1", "id-2"]);
    }
}
