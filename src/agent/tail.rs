//! One tailer per open file: reads large chunks from the open descriptor, splits lines,
//! joins CRI partials and multiline records, parses, enriches, filters and hands the
//! records to the pipeline buffer (waiting when it is full). The descriptor stays open
//! across a rename, so a rotated file is drained to EOF before it is released; a file
//! found shorter or rewritten (copytruncate) is read again from 0.

use std::borrow::Cow;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use chrono::{DateTime, FixedOffset, Utc};
use serde_json::Map;
use tokio_util::sync::CancellationToken;
use xxhash_rust::xxh3::Xxh3;

use super::buffer::BufferTx;
use super::config::{FilterConfig, InputConfig, ParserConfig};
use super::confine::Confinement;
use super::filter;
use super::identity::{self, Change, DevIno, Fingerprint};
use super::metrics::{AgentMetrics, InputLabels};
use super::multiline::{Multiline, Piece};
use super::parse::{self, CriJoiner};
use super::reader::{LineSplitter, READ_CHUNK};
use super::record::{
    self, Encoded, Event, FixedFields, Item, RecordContext, RecordId, RecordParts, SourcePos,
};

/// Bytes of record JSON allocated at a time per file; groups are cut where a block ends.
const BLOCK: usize = 256 * 1024;

/// Timing and limits of tailers.
#[derive(Clone, Copy, Debug)]
pub struct TailOptions {
    /// Wait at EOF before looking again.
    pub poll: Duration,
    /// Longest line (and joined record) kept; longer ones are cut and counted.
    pub max_line: usize,
    /// A file that is no longer matched is released after it stayed at EOF this long
    /// (a writer may still append right after a rename).
    pub release_after: Duration,
    /// Most files one input's globs may match per scan; the rest wait (counted).
    pub max_files: usize,
}

/// Offsets reached in files that were then truncated, with the fingerprint of what was read:
/// the copy that copytruncate left behind is read from there instead of from 0.
pub type TruncatedFiles = Arc<Mutex<Vec<(Fingerprint, u64, Instant)>>>;

/// What every tailer of one input shares.
pub struct InputShared {
    pub pipeline: Arc<str>,
    pub input: InputConfig,
    pub ctx: RecordContext,
    pub filters: Arc<Vec<FilterConfig>>,
    pub tx: BufferTx,
    pub metrics: AgentMetrics,
    pub labels: InputLabels,
    /// Bytes read but not yet acknowledged, for the whole pipeline.
    pub lag: Arc<AtomicI64>,
    pub opts: TailOptions,
    pub truncated: TruncatedFiles,
    /// Most records and record bytes per buffer item: an eighth of a batch, so batches
    /// still fill to within an eighth of their limits.
    pub group: GroupLimits,
    /// Some output uses record ids (Elasticsearch): compute one per record.
    pub ids: bool,
    /// Where this input may open files.
    pub confine: Arc<Confinement>,
    /// The files being read, on disk (set once by discovery; unset in unit tests).
    pub opened: std::sync::OnceLock<super::discover::OpenedFiles>,
}

impl InputShared {
    /// Records a file about to be read (see [`super::discover::OpenedFiles`]).
    pub fn record_opened(&self, key: &str, entry: super::checkpoint::Entry) {
        if let Some(o) = self.opened.get() {
            o.add(key, entry);
        }
    }
}

/// How many records travel as one buffer item.
#[derive(Clone, Copy, Debug)]
pub struct GroupLimits {
    pub records: usize,
    pub bytes: usize,
}

impl GroupLimits {
    /// About an eighth of the batch limits. The record count divides `maxEvents` where a
    /// divisor between 8 and 64 exists, so batches still fill to exactly `maxEvents`.
    pub fn for_batch(max_events: usize, max_bytes: usize) -> Self {
        let parts = (8..=64)
            .find(|k| max_events.is_multiple_of(*k))
            .unwrap_or(8)
            .min(max_events.max(1));
        Self {
            records: (max_events / parts).max(1),
            bytes: (max_bytes / 8).max(1),
        }
    }
}

/// How discovery talks to a running tailer.
#[derive(Debug, Default)]
pub struct TailerControl {
    /// The file is no longer matched under its identity: drain and release it.
    pub gone: AtomicBool,
    /// The tailer's current fingerprint (discovery compares new files against it).
    pub fingerprint: Mutex<Fingerprint>,
}

/// A file to tail from `offset`.
pub struct Opened {
    pub file: File,
    pub path: String,
    pub id: DevIno,
    pub offset: u64,
    pub fingerprint: Fingerprint,
}

enum Step {
    Read(usize, Option<Fingerprint>),
    Truncated(Fingerprint),
}

/// Tails one file until it is released or `stop` fires.
pub async fn tail(
    shared: Arc<InputShared>,
    ctl: Arc<TailerControl>,
    opened: Opened,
    stop: CancellationToken,
) {
    let files_open = shared
        .metrics
        .files_open
        .get_or_create(&shared.labels)
        .clone();
    files_open.inc();
    let mut tailer = Some(Tailer::new(shared.clone(), &opened));
    if let Ok(mut g) = ctl.fingerprint.lock() {
        *g = opened.fingerprint.clone();
    }
    let mut file = Some(opened.file);
    let mut buf = Some(vec![0u8; READ_CHUNK]);
    let mut eof_since: Option<Instant> = None;
    loop {
        if stop.is_cancelled() {
            break;
        }
        let (Some(f), Some(mut b), Some(mut t)) = (file.take(), buf.take(), tailer.take()) else {
            break;
        };
        let ctl2 = ctl.clone();
        // Reading and turning lines into records both happen on a blocking thread: the
        // CPU-heavy part never holds up the async workers that ship (and on a node with
        // cores to spare, files are parsed in parallel).
        let joined = tokio::task::spawn_blocking(move || {
            let fp = (*t.fp).clone();
            let r = step(&f, &mut b, t.offset, &fp, &ctl2);
            let mut items = Vec::new();
            if let Ok(Step::Read(n, new_fp)) = &r {
                if let Some(fp) = new_fp {
                    t.set_fingerprint(fp.clone(), &ctl2);
                }
                if *n > 0 {
                    t.consume(&b[..*n], &mut items);
                }
            }
            (f, b, t, r, items)
        })
        .await;
        let Ok((f, b, t_back, result, mut items)) = joined else {
            break;
        };
        let mut t = t_back;
        let read = match result {
            Ok(Step::Read(n, _)) => n,
            Ok(Step::Truncated(new_fp)) => {
                tracing::info!(path = %t.path, offset = t.offset, "file truncated (copytruncate?); reading it again from 0");
                shared
                    .metrics
                    .truncations
                    .get_or_create(&shared.labels)
                    .inc();
                // The copy continues after the last line handed on, not at the read
                // offset: a partial line (or pending multiline record) already read is
                // dropped by the restart below and must be read again, whole, from the copy.
                if t.fp.len > 0
                    && t.emitted > 0
                    && let Ok(mut m) = shared.truncated.lock()
                {
                    m.retain(|(_, _, at)| at.elapsed() < Duration::from_secs(300));
                    m.push(((*t.fp).clone(), t.emitted, Instant::now()));
                }
                t.restart(new_fp, &ctl);
                file = Some(f);
                buf = Some(b);
                tailer = Some(t);
                continue;
            }
            Err(e) => {
                tracing::warn!(path = %t.path, error = %e, "reading failed; retrying");
                0
            }
        };
        if read > 0 {
            eof_since = None;
        } else {
            let now = Instant::now();
            if let Some(p) = t.multiline.as_mut().and_then(|m| m.flush_stale(now)) {
                t.tick();
                t.emit_piece(&shared, p, &mut items);
                t.flush(&mut items);
            }
            let since = *eof_since.get_or_insert(now);
            if ctl.gone.load(Ordering::Acquire) && since.elapsed() >= shared.opts.release_after {
                t.finish(&shared, &mut items);
                // out of the record before its Forget can reach the checkpoint
                if let Some(o) = shared.opened.get() {
                    o.remove(&t.key);
                }
                items.push(Item::Forget(t.key.clone()));
                send_all(&shared, items, &stop).await;
                tracing::info!(path = %t.path, "file drained and released");
                break;
            }
        }
        file = Some(f);
        buf = Some(b);
        tailer = Some(t);
        if !send_all(&shared, items, &stop).await {
            break;
        }
        if read == 0 {
            tokio::select! {
                _ = tokio::time::sleep(shared.opts.poll) => {}
                _ = stop.cancelled() => break,
            }
        }
    }
    files_open.dec();
}

/// Sends items in order, waiting for buffer room; false when stopping. Room is taken for
/// groups of up to an eighth of the buffer at a time (one wait per group, not per line).
/// When stopping, what was already read is still handed over while there is room (so
/// shutdown ships it); the rest is dropped unacknowledged and read again after the restart.
async fn send_all(shared: &InputShared, items: Vec<Item>, stop: &CancellationToken) -> bool {
    let tx = &shared.tx;
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

/// One blocking look at the file: truncation check, then a read at `offset`.
fn step(
    f: &File,
    buf: &mut [u8],
    offset: u64,
    fp: &Fingerprint,
    ctl: &TailerControl,
) -> std::io::Result<Step> {
    if identity::check(f, offset, fp)? == Change::Truncated {
        return Ok(Step::Truncated(Fingerprint::of_file(f)?));
    }
    if !fp.is_full() {
        // Publish the prefix about to be read before reading it, so discovery never sees
        // a copy of content this tailer is reading without knowing it (copytruncate).
        let now = Fingerprint::of_file(f)?;
        if let Ok(mut g) = ctl.fingerprint.lock() {
            *g = now;
        }
    }
    let n = loop {
        match f.read_at(buf, offset) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    };
    // Truncated (and rewritten) between the check and the read: what was read may be the
    // new content at the old offset. Discard it; the old offset is what was really read.
    if n > 0 && !fp.matches(f)? {
        return Ok(Step::Truncated(Fingerprint::of_file(f)?));
    }
    // A short fingerprint grows with the file until it covers the full length.
    let new_fp = (n > 0 && !fp.is_full() && offset + n as u64 > fp.len as u64)
        .then(|| Fingerprint::of_file(f))
        .transpose()?;
    Ok(Step::Read(n, new_fp))
}

/// Per-file processing state.
struct Tailer {
    shared: Arc<InputShared>,
    key: Arc<str>,
    path: Arc<str>,
    /// `file`, `node`, `input`, pod metadata and `fields`, serialized once.
    fixed: FixedFields,
    /// Read time of the records being emitted (Unix ns, RFC 3339): taken once per read.
    clock: (i64, String),
    fp: Arc<Fingerprint>,
    offset: u64,
    /// End of the last emitted piece (lag accounting).
    emitted: u64,
    splitter: LineSplitter,
    cri: Option<CriJoiner>,
    multiline: Option<Multiline>,
    /// JSON of the records emitted but not yet handed on, each followed by `\n`; it
    /// sits at the end of a larger block that later groups fill on, so records cost no
    /// allocation of their own.
    block: BytesMut,
    /// Length, id and time of each record in `block`.
    group: Vec<(usize, RecordId, i64)>,
    group_bytes: usize,
    /// End of the last line the group accounts for (set once any line was emitted).
    group_end: Option<u64>,
    group_consumed: u64,
}

impl Tailer {
    fn new(shared: Arc<InputShared>, o: &Opened) -> Self {
        let max = shared.opts.max_line;
        let multiline = shared.input.multiline.as_ref().and_then(|m| {
            Multiline::new(&m.start, m.flush_timeout, max)
                .map_err(|e| tracing::error!(error = %e, "multiline pattern"))
                .ok()
        });
        Self {
            key: Arc::from(o.id.key(&shared.input.name)),
            path: Arc::from(o.path.as_str()),
            fixed: FixedFields::new(
                &shared.ctx,
                &o.path,
                record::pod_from_path(&o.path, &shared.input.pod_root).as_ref(),
            ),
            clock: (0, String::new()),
            fp: Arc::new(o.fingerprint.clone()),
            offset: o.offset,
            emitted: o.offset,
            splitter: LineSplitter::new(max),
            cri: shared.input.cri.then(|| CriJoiner::new(max)),
            multiline,
            block: BytesMut::new(),
            group: Vec::new(),
            group_bytes: 0,
            group_end: None,
            group_consumed: 0,
            shared,
        }
    }

    /// Hands the records emitted so far on as one item.
    fn flush(&mut self, items: &mut Vec<Item>) {
        let Some(end) = self.group_end.take() else {
            return;
        };
        let json = self.block.split().freeze();
        let mut at = 0;
        let records = self
            .group
            .drain(..)
            .map(|(len, id, ts_nanos)| {
                let json = json.slice(at..at + len);
                at += len + 1;
                Encoded { json, id, ts_nanos }
            })
            .collect();
        items.push(Item::Event(Event {
            pos: SourcePos {
                file: self.key.clone(),
                path: self.path.clone(),
                fingerprint: self.fp.clone(),
                offset: end,
            },
            records,
            ndjson: json,
            consumed: std::mem::take(&mut self.group_consumed),
        }));
        self.group_bytes = 0;
    }

    fn set_fingerprint(&mut self, fp: Fingerprint, ctl: &TailerControl) {
        if let Ok(mut g) = ctl.fingerprint.lock() {
            *g = fp.clone();
        }
        self.fp = Arc::new(fp);
    }

    fn restart(&mut self, fp: Fingerprint, ctl: &TailerControl) {
        self.set_fingerprint(fp, ctl);
        self.offset = 0;
        self.emitted = 0;
        self.splitter.reset();
        if let Some(c) = self.cri.as_mut() {
            *c = CriJoiner::new(self.shared.opts.max_line);
        }
        if let Some(m) = self.multiline.as_mut() {
            m.reset();
        }
    }

    fn consume(&mut self, chunk: &[u8], items: &mut Vec<Item>) {
        let s = self.shared.clone();
        s.metrics
            .bytes_read
            .get_or_create(&s.labels)
            .inc_by(chunk.len() as u64);
        let start = self.offset;
        self.offset += chunk.len() as u64;
        let mut splitter = std::mem::replace(&mut self.splitter, LineSplitter::new(1));
        let mut lines = 0u64;
        let mut truncated = 0u64;
        let now = Instant::now();
        self.tick();
        splitter.feed(chunk, start, |line| {
            lines += 1;
            if line.truncated {
                truncated += 1;
            }
            self.line(&s, line.bytes, line.end, now, items);
        });
        self.flush(items);
        self.splitter = splitter;
        s.metrics.lines_read.get_or_create(&s.labels).inc_by(lines);
        if truncated > 0 {
            s.metrics
                .lines_truncated
                .get_or_create(&s.labels)
                .inc_by(truncated);
        }
    }

    /// Reads the clock for the records emitted next.
    fn tick(&mut self) {
        let now = Utc::now();
        self.clock = (
            now.timestamp_nanos_opt().unwrap_or(0),
            record::format_time(now),
        );
    }

    fn line(
        &mut self,
        s: &InputShared,
        bytes: &[u8],
        end: u64,
        now: Instant,
        items: &mut Vec<Item>,
    ) {
        if self.cri.is_none() && self.multiline.is_none() {
            // The common case: straight from the read buffer to the record.
            self.emit(s, bytes, end, None, None, items);
            return;
        }
        let piece = match self.cri.as_mut() {
            Some(j) => {
                let Some(e) = j.push(bytes) else { return };
                if e.failed {
                    self.count_parse_error();
                }
                Piece {
                    bytes: e.content,
                    end,
                    time: e.time,
                    stream: (!e.failed).then_some(e.stream),
                }
            }
            None => Piece {
                bytes: bytes.to_vec(),
                end,
                time: None,
                stream: None,
            },
        };
        let done = match self.multiline.as_mut() {
            Some(m) => m.push(piece, now),
            None => Some(piece),
        };
        if let Some(p) = done {
            self.emit_piece(s, p, items);
        }
    }

    /// Emits what is left when the file is released: a pending multiline record and an
    /// unterminated last line.
    fn finish(&mut self, s: &InputShared, items: &mut Vec<Item>) {
        self.tick();
        if let Some(rest) = self.splitter.finish() {
            let end = self.offset;
            self.line(s, &rest, end, Instant::now(), items);
        }
        if let Some(p) = self.multiline.as_mut().and_then(|m| m.flush()) {
            self.emit_piece(s, p, items);
        }
        self.flush(items);
    }

    fn count_parse_error(&self) {
        self.shared
            .metrics
            .parse_errors
            .get_or_create(&self.shared.labels)
            .inc();
    }

    fn emit_piece(&mut self, s: &InputShared, p: Piece, items: &mut Vec<Item>) {
        self.emit(s, &p.bytes, p.end, p.time, p.stream, items)
    }

    /// Adds a complete record's bytes to the group being filled: as a record, or only as
    /// progress when it is empty or filtered out. A full group is handed on.
    fn emit(
        &mut self,
        s: &InputShared,
        bytes: &[u8],
        end: u64,
        time: Option<DateTime<FixedOffset>>,
        stream: Option<String>,
        items: &mut Vec<Item>,
    ) {
        // Room for the record (an estimate: escaping may need more, which the block then
        // grows for). A block without room hands the group on and a fresh block starts.
        let need = 128 + 2 * bytes.len() + self.fixed.json_len();
        if self.block.capacity() - self.block.len() < need {
            self.flush(items);
            self.block = BytesMut::with_capacity(BLOCK.max(need));
        }
        let consumed = end.saturating_sub(self.emitted);
        self.emitted = end;
        s.lag.fetch_add(consumed as i64, Ordering::Relaxed);
        self.group_end = Some(end);
        self.group_consumed += consumed;
        if bytes.is_empty() {
            return;
        }
        // Valid UTF-8 (nearly every line) is borrowed; std's validation has an ASCII fast
        // path that the lossy decoder lacks.
        let text = match std::str::from_utf8(bytes) {
            Ok(t) => Cow::Borrowed(t),
            Err(_) => String::from_utf8_lossy(bytes),
        };
        let no_fields = Map::new();
        let parsed = match &s.input.parser {
            ParserConfig::None => None,
            other => Some(parse::parse(other, text.clone().into_owned())),
        };
        if parsed.as_ref().is_some_and(|p| p.failed) {
            self.count_parse_error();
        }
        let (ts_nanos, own_time);
        let timestamp = match parsed.as_ref().and_then(|p| p.time).or(time) {
            Some(t) => {
                let t = t.with_timezone(&Utc);
                ts_nanos = t.timestamp_nanos_opt().unwrap_or(0);
                own_time = record::format_time(t);
                own_time.as_str()
            }
            None => {
                ts_nanos = self.clock.0;
                self.clock.1.as_str()
            }
        };
        let parts = RecordParts {
            message: parsed.as_ref().map_or(&text, |p| &p.message),
            timestamp,
            parsed: parsed.as_ref().map_or(&no_fields, |p| &p.fields),
            stream: stream.as_deref(),
        };
        if !filter::keep(&s.filters, |f| parts.field(&self.fixed, f)) {
            return;
        }
        let id = if s.ids {
            record_id(&s.pipeline, &self.key, end, bytes)
        } else {
            RecordId::default()
        };
        let start = self.block.len();
        parts.encode_into(&self.fixed, &mut self.block);
        let len = self.block.len() - start;
        self.block.put_u8(b'\n');
        self.group_bytes += len + 1;
        self.group.push((len, id, ts_nanos));
        if self.group.len() >= s.group.records || self.group_bytes >= s.group.bytes {
            self.flush(items);
        }
    }
}

/// Deterministic record id: the same bytes at the same place of the same file always get
/// the same id, so a re-read after a crash is recognised downstream.
/// 128 bits of XXH3 (a stable, published hash: ids survive upgrades) as 32 hex digits.
pub fn record_id(pipeline: &str, key: &str, end: u64, bytes: &[u8]) -> RecordId {
    let mut h = Xxh3::new();
    h.update(pipeline.as_bytes());
    h.update(&[0]);
    h.update(key.as_bytes());
    h.update(&end.to_le_bytes());
    h.update(bytes);
    RecordId::from_digest(h.digest128())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::buffer::{self, BufferRx};
    use crate::agent::config::MultilineConfig;
    use regex::Regex;
    use std::io::Write;

    fn shared(
        parser: ParserConfig,
        multiline: Option<&str>,
        filters: Vec<FilterConfig>,
    ) -> (Arc<InputShared>, BufferRx) {
        let (tx, rx) = buffer::bounded(1 << 20);
        let input = InputConfig {
            name: "app".into(),
            paths: vec![],
            exclude: vec![],
            multiline: multiline.map(|p| MultilineConfig {
                start: Regex::new(p).unwrap(),
                flush_timeout: Duration::from_millis(100),
            }),
            cri: false,
            parser,
            pod_root: "/var/log/pods/".into(),
        };
        let s = InputShared {
            pipeline: Arc::from("ns/p"),
            input,
            ctx: RecordContext {
                node: "n1".into(),
                input: "app".into(),
                fields: Default::default(),
            },
            filters: Arc::new(filters),
            tx,
            metrics: AgentMetrics::default(),
            labels: AgentMetrics::input("ns/p", "app"),
            lag: Arc::default(),
            opts: TailOptions {
                poll: Duration::from_millis(10),
                max_line: 4096,
                release_after: Duration::from_millis(50),
                max_files: 100,
            },
            truncated: TruncatedFiles::default(),
            group: GroupLimits::for_batch(1000, 1 << 20),
            ids: true,
            confine: Arc::default(),
            opened: Default::default(),
        };
        (Arc::new(s), rx)
    }

    fn open(path: &std::path::Path, offset: u64) -> Opened {
        let file = File::open(path).unwrap();
        Opened {
            id: DevIno::of_file(&file).unwrap(),
            fingerprint: Fingerprint::of_file(&file).unwrap(),
            file,
            path: path.to_string_lossy().into_owned(),
            offset,
        }
    }

    fn append(path: &std::path::Path, s: &str) {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap()
            .write_all(s.as_bytes())
            .unwrap();
    }

    /// Next item as (message or None for a marker, end offset), or "forget".
    async fn next(rx: &mut BufferRx) -> (Option<serde_json::Value>, u64) {
        let t = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("an item within 5s")
            .expect("buffer open");
        rx.release(t.weight as u64);
        match t.item {
            Item::Event(e) => {
                assert!(e.records.len() <= 1, "one record per read in these tests");
                (
                    e.records
                        .first()
                        .map(|r| serde_json::from_slice(&r.json).unwrap()),
                    e.pos.offset,
                )
            }
            Item::Forget(_) => (None, u64::MAX),
        }
    }

    #[tokio::test]
    async fn json_multiline_and_filters_produce_records_and_markers_in_file_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        append(
            &path,
            "{\"msg\":\"boom\",\"level\":\"ERROR\"}\n  at x\n{\"msg\":\"fine\",\"level\":\"INFO\"}\n",
        );
        let filters = vec![FilterConfig {
            include: true,
            field: Some("level".into()),
            pattern: Regex::new("ERROR").unwrap(),
        }];
        let (s, mut rx) = shared(ParserConfig::Json, Some(r"^\{"), filters);
        let stop = CancellationToken::new();
        let task = tokio::spawn(tail(
            s.clone(),
            Arc::default(),
            open(&path, 0),
            stop.clone(),
        ));
        // The stack-trace line joins the first record, which then fails to parse as JSON
        // (it is two lines) and is kept raw; its level is missing so the filter drops it.
        let (first, end1) = next(&mut rx).await;
        assert!(first.is_none(), "{first:?}");
        assert_eq!(end1, 38);
        // The INFO record is filtered out too, after the multiline flush timeout.
        let (second, end2) = next(&mut rx).await;
        assert!(second.is_none());
        assert_eq!(end2, std::fs::metadata(&path).unwrap().len());
        append(
            &path,
            "{\"msg\":\"bad\",\"level\":\"ERROR\",\"time\":\"2026-01-01T00:00:00Z\"}\n",
        );
        let (third, _) = next(&mut rx).await;
        let third = third.expect("an ERROR record passes");
        assert_eq!(third["message"], "bad");
        assert_eq!(third["timestamp"], "2026-01-01T00:00:00Z");
        assert_eq!(third["node"], "n1");
        assert_eq!(s.metrics.parse_errors.get_or_create(&s.labels).get(), 1);
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn copytruncate_restarts_at_zero_and_remembers_the_old_offset_for_the_copy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let long = "x".repeat(1100);
        append(&path, &format!("{long}\n"));
        let (s, mut rx) = shared(ParserConfig::None, None, vec![]);
        let stop = CancellationToken::new();
        let opened = open(&path, 0);
        let old_fp = opened.fingerprint.clone();
        assert!(old_fp.is_full());
        let task = tokio::spawn(tail(s.clone(), Arc::default(), opened, stop.clone()));
        let (r, end) = next(&mut rx).await;
        assert_eq!(r.unwrap()["message"], long.as_str());
        assert_eq!(end, 1101);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        append(&path, "after truncate\n");
        let (r, end) = next(&mut rx).await;
        assert_eq!(r.unwrap()["message"], "after truncate");
        assert_eq!(end, 15, "read again from offset 0");
        assert_eq!(s.metrics.truncations.get_or_create(&s.labels).get(), 1);
        let remembered: Vec<u64> = s
            .truncated
            .lock()
            .unwrap()
            .iter()
            .filter(|(fp, _, _)| *fp == old_fp)
            .map(|(_, o, _)| *o)
            .collect();
        assert_eq!(remembered, [1101]);
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn copytruncate_after_a_partial_line_remembers_the_end_of_the_last_whole_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        // The read stops inside the second line (a chunk boundary, or a write seen half done).
        append(&path, "first line\nsecond li");
        let (s, mut rx) = shared(ParserConfig::None, None, vec![]);
        let stop = CancellationToken::new();
        let task = tokio::spawn(tail(
            s.clone(),
            Arc::default(),
            open(&path, 0),
            stop.clone(),
        ));
        let (r, end) = next(&mut rx).await;
        assert_eq!(r.unwrap()["message"], "first line");
        assert_eq!(end, 11);
        let bytes_read = s.metrics.bytes_read.get_or_create(&s.labels).clone();
        tokio::time::timeout(Duration::from_secs(5), async {
            while bytes_read.get() < 20 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the partial line read");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        append(&path, "new\n");
        let (r, _) = next(&mut rx).await;
        assert_eq!(r.unwrap()["message"], "new");
        // The copy is read from 11, so "second li..." arrives whole from it; from 20 only
        // its tail would arrive, as a line of its own.
        let remembered: Vec<u64> = s.truncated.lock().unwrap().iter().map(|e| e.1).collect();
        assert_eq!(remembered, [11]);
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_file_no_longer_matched_is_drained_to_eof_then_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        append(&path, "one\n");
        let (s, mut rx) = shared(ParserConfig::None, None, vec![]);
        let ctl = Arc::new(TailerControl::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(tail(s.clone(), ctl.clone(), open(&path, 0), stop.clone()));
        assert_eq!(next(&mut rx).await.0.unwrap()["message"], "one");
        // Rename-rotate, then the writer's last lines land in the renamed file (one
        // without a final newline).
        let rotated = dir.path().join("a.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        ctl.gone.store(true, Ordering::Release);
        append(&rotated, "two\nthree");
        assert_eq!(next(&mut rx).await.0.unwrap()["message"], "two");
        assert_eq!(next(&mut rx).await.0.unwrap()["message"], "three");
        assert_eq!(
            next(&mut rx).await.1,
            u64::MAX,
            "then the checkpoint entry is forgotten"
        );
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("tailer exits after release")
            .unwrap();
    }

    #[tokio::test]
    async fn lines_of_one_read_travel_in_groups_and_filtered_lines_still_move_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        append(&path, "a\nb\nc\nd\ne\n");
        let filters = vec![FilterConfig {
            include: false,
            field: None,
            pattern: Regex::new("^c$").unwrap(),
        }];
        let (s, mut rx) = shared(ParserConfig::None, None, filters);
        let mut s = Arc::into_inner(s).unwrap();
        s.group = GroupLimits {
            records: 2,
            bytes: 1 << 20,
        };
        let s = Arc::new(s);
        let stop = CancellationToken::new();
        let task = tokio::spawn(tail(s, Arc::default(), open(&path, 0), stop.clone()));
        let mut groups = Vec::new();
        while groups.len() < 2 {
            let t = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap();
            rx.release(t.weight as u64);
            let Item::Event(e) = t.item else {
                panic!("unexpected forget")
            };
            let messages: Vec<String> = e
                .records
                .iter()
                .map(|r| {
                    let v: serde_json::Value = serde_json::from_slice(&r.json).unwrap();
                    v["message"].as_str().unwrap().to_string()
                })
                .collect();
            let mut ndjson = Vec::new();
            for r in &e.records {
                ndjson.extend_from_slice(&r.json);
                ndjson.push(b'\n');
            }
            assert_eq!(e.ndjson, ndjson, "the group's NDJSON is its records'");
            groups.push((messages, e.pos.offset, e.consumed));
        }
        assert_eq!(
            groups,
            [
                (vec!["a".to_string(), "b".to_string()], 4, 4),
                (vec!["d".to_string(), "e".to_string()], 10, 6)
            ]
        );
        stop.cancel();
        task.await.unwrap();
    }

    #[test]
    fn group_sizes_divide_max_events_when_they_can() {
        let records = |n| GroupLimits::for_batch(n, 1 << 20).records;
        assert_eq!(records(1000), 125);
        assert_eq!(records(100), 10);
        assert_eq!(records(500), 50);
        assert_eq!(records(4), 1);
        assert_eq!(records(1), 1);
        assert_eq!(records(1009), 126, "a prime: about an eighth");
        assert_eq!(GroupLimits::for_batch(1000, 1 << 20).bytes, 128 << 10);
    }

    #[test]
    fn record_ids_are_stable_and_depend_on_place_and_content() {
        let a = record_id("ns/p", "app/1:2", 10, b"line");
        assert_eq!(a, record_id("ns/p", "app/1:2", 10, b"line"));
        assert_ne!(a, record_id("ns/p", "app/1:2", 11, b"line"));
        assert_ne!(a, record_id("ns/p", "app/1:3", 10, b"line"));
        assert_ne!(a, record_id("ns/p", "app/1:2", 10, b"lime"));
    }
}
