//! Bytes in, records out: one file's bytes, as they are read, become groups of encoded
//! records. Lines are split, CRI partials and multiline records joined, then parsed,
//! enriched, filtered and encoded into one shared block per group. No I/O happens here:
//! the tailer reads, this turns what was read into buffer items.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::{BufMut, BytesMut};
use chrono::{DateTime, FixedOffset, Utc};
use serde_json::Map;
use xxhash_rust::xxh3::Xxh3;

use super::config::ParserConfig;
use super::filter;
use super::identity::{DevIno, Fingerprint};
use super::multiline::{Multiline, Piece};
use super::parse::{self, CriJoiner};
use super::reader::LineSplitter;
use super::record::{self, Encoded, Event, FixedFields, Item, RecordId, RecordParts, SourcePos};
use super::tail::InputShared;

/// Bytes of record JSON allocated at a time per file; groups are cut where a block ends.
const BLOCK: usize = 256 * 1024;

/// One file's line-to-record state: what is carried between reads (a partial line, a CRI
/// partial, a pending multiline record) and the group of records being filled.
pub struct Assembler {
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

impl Assembler {
    /// Starts at `offset` of the file `id` (opened at `path`) read so far under `fp`.
    pub fn new(
        shared: Arc<InputShared>,
        id: DevIno,
        path: &str,
        fp: Fingerprint,
        offset: u64,
    ) -> Self {
        let max = shared.opts.max_line;
        let multiline = shared.input.multiline.as_ref().and_then(|m| {
            Multiline::new(&m.start, m.flush_timeout, max)
                .map_err(|e| tracing::error!(error = %e, "multiline pattern"))
                .ok()
        });
        Self {
            key: Arc::from(id.key(&shared.input.name)),
            path: Arc::from(path),
            fixed: FixedFields::new(
                &shared.ctx,
                path,
                record::pod_from_path(path, &shared.input.pod_root).as_ref(),
            ),
            clock: (0, String::new()),
            fp: Arc::new(fp),
            offset,
            emitted: offset,
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

    /// Checkpoint key of the file (`<input>/<dev>:<ino>`).
    pub fn key(&self) -> &Arc<str> {
        &self.key
    }

    /// Path the file had when it was opened.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Fingerprint of what was read so far.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fp
    }

    /// File offset of the next byte to read.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// End of the last line handed on (filtered or not): where a copy would continue.
    pub fn emitted(&self) -> u64 {
        self.emitted
    }

    /// Hands the records emitted so far on as one item.
    pub fn flush(&mut self, items: &mut Vec<Item>) {
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

    /// The fingerprint grew (or changed with a restart): later groups carry this one.
    pub fn set_fingerprint(&mut self, fp: Fingerprint) {
        self.fp = Arc::new(fp);
    }

    /// Starts over at offset 0 of a truncated file: whatever was carried is dropped.
    pub fn restart(&mut self, fp: Fingerprint) {
        self.set_fingerprint(fp);
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

    /// Turns the bytes read at [`Assembler::offset`] into records; the groups completed
    /// (and the last, partly filled one) are pushed to `items`.
    pub fn consume(&mut self, chunk: &[u8], items: &mut Vec<Item>) {
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

    /// At EOF: a multiline record that waited past its flush timeout is handed on.
    pub fn flush_stale(&mut self, now: Instant, items: &mut Vec<Item>) {
        if let Some(p) = self.multiline.as_mut().and_then(|m| m.flush_stale(now)) {
            let s = self.shared.clone();
            self.tick();
            self.emit_piece(&s, p, items);
            self.flush(items);
        }
    }

    /// Emits what is left when the file is released: a pending multiline record and an
    /// unterminated last line.
    pub fn finish(&mut self, items: &mut Vec<Item>) {
        let shared = self.shared.clone();
        let s = &*shared;
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
    use crate::agent::buffer;
    use crate::agent::config::{FilterConfig, InputConfig, MultilineConfig};
    use crate::agent::metrics::AgentMetrics;
    use crate::agent::record::RecordContext;
    use crate::agent::tail::{GroupLimits, TailOptions};
    use crate::agent::truncate::TruncatedFiles;
    use regex::Regex;
    use std::time::Duration;

    struct Setup {
        parser: ParserConfig,
        cri: bool,
        multiline: Option<&'static str>,
        filters: Vec<FilterConfig>,
        max_line: usize,
        group_records: usize,
    }

    impl Default for Setup {
        fn default() -> Self {
            Self {
                parser: ParserConfig::None,
                cri: false,
                multiline: None,
                filters: vec![],
                max_line: 4096,
                group_records: 1000,
            }
        }
    }

    impl Setup {
        fn shared(self) -> Arc<InputShared> {
            let (tx, _rx) = buffer::bounded(1 << 20);
            Arc::new(InputShared {
                pipeline: Arc::from("ns/p"),
                input: InputConfig {
                    name: "app".into(),
                    paths: vec![],
                    exclude: vec![],
                    multiline: self.multiline.map(|p| MultilineConfig {
                        start: Regex::new(p).unwrap(),
                        flush_timeout: Duration::from_millis(100),
                    }),
                    cri: self.cri,
                    parser: self.parser,
                    pod_root: "/var/log/pods/".into(),
                },
                ctx: RecordContext {
                    node: "n1".into(),
                    input: "app".into(),
                    fields: Default::default(),
                },
                filters: Arc::new(self.filters),
                tx,
                metrics: AgentMetrics::default(),
                labels: AgentMetrics::input("ns/p", "app"),
                lag: Arc::default(),
                opts: TailOptions {
                    poll: Duration::from_millis(10),
                    max_line: self.max_line,
                    release_after: Duration::from_millis(50),
                    max_files: 100,
                },
                truncated: TruncatedFiles::default(),
                group: GroupLimits {
                    records: self.group_records,
                    bytes: 1 << 20,
                },
                ids: true,
                confine: Arc::default(),
                opened: Default::default(),
            })
        }

        fn assembler(self) -> Assembler {
            let shared = self.shared();
            Assembler::new(
                shared,
                DevIno { dev: 1, ino: 2 },
                "/var/log/a.log",
                Fingerprint::default(),
                0,
            )
        }
    }

    /// One item as (messages, end offset, bytes consumed); `None` for a forget.
    type Group = (Vec<String>, u64, u64);

    fn groups(items: Vec<Item>) -> Vec<Group> {
        items
            .into_iter()
            .map(|i| match i {
                Item::Event(e) => {
                    let mut ndjson = Vec::new();
                    for r in &e.records {
                        ndjson.extend_from_slice(&r.json);
                        ndjson.push(b'\n');
                    }
                    assert_eq!(e.ndjson, ndjson, "the group's NDJSON is its records'");
                    let messages = e.records.iter().map(|r| message(&r.json)).collect();
                    (messages, e.pos.offset, e.consumed)
                }
                Item::Forget(_) => panic!("an assembler never forgets"),
            })
            .collect()
    }

    fn message(json: &[u8]) -> String {
        let v: serde_json::Value = serde_json::from_slice(json).unwrap();
        v["message"].as_str().unwrap().to_string()
    }

    fn feed(a: &mut Assembler, chunk: &[u8]) -> Vec<Group> {
        let mut items = Vec::new();
        a.consume(chunk, &mut items);
        groups(items)
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_line_split_across_reads_becomes_one_record_at_its_end() {
        let mut a = Setup::default().assembler();
        assert_eq!(feed(&mut a, b"one\ntw"), [(strings(&["one"]), 4, 4)]);
        assert_eq!(a.offset(), 6);
        assert_eq!(a.emitted(), 4, "the partial line is not handed on");
        assert_eq!(
            feed(&mut a, b"o\nthree\n"),
            [(strings(&["two", "three"]), 14, 10)]
        );
        assert_eq!(a.emitted(), 14);
    }

    #[test]
    fn a_read_without_a_line_end_hands_nothing_on() {
        let mut a = Setup::default().assembler();
        assert!(feed(&mut a, b"no newline yet").is_empty());
        assert_eq!(a.offset(), 14);
        assert_eq!(a.emitted(), 0);
    }

    #[test]
    fn crlf_line_ends_lose_their_carriage_return() {
        let mut a = Setup::default().assembler();
        assert_eq!(
            feed(&mut a, b"a\r\nb\r"),
            [(strings(&["a"]), 3, 3)],
            "a CR before a line end not yet read stays with the line"
        );
        assert_eq!(feed(&mut a, b"\nc\n"), [(strings(&["b", "c"]), 8, 5)]);
    }

    #[test]
    fn lines_longer_than_max_line_are_clipped_and_counted() {
        let s = Setup {
            max_line: 4,
            ..Setup::default()
        }
        .shared();
        let mut a = Assembler::new(
            s.clone(),
            DevIno { dev: 1, ino: 2 },
            "/a.log",
            Fingerprint::default(),
            0,
        );
        assert_eq!(
            feed(&mut a, b"abcdefgh\nok\n"),
            [(strings(&["abcd", "ok"]), 12, 12)]
        );
        // Cut as soon as the limit is reached, before its end is read; the rest is skipped.
        assert_eq!(feed(&mut a, b"xyzzy"), [(strings(&["xyzz"]), 17, 5)]);
        assert!(feed(&mut a, b"more").is_empty());
        assert_eq!(
            feed(&mut a, b"tail\nnext\n"),
            [(strings(&["next"]), 31, 14)]
        );
        assert_eq!(s.metrics.lines_truncated.get_or_create(&s.labels).get(), 2);
        assert_eq!(s.metrics.lines_read.get_or_create(&s.labels).get(), 4);
        assert_eq!(s.metrics.bytes_read.get_or_create(&s.labels).get(), 31);
    }

    #[test]
    fn an_unterminated_last_line_is_handed_on_by_finish() {
        let mut a = Setup::default().assembler();
        assert_eq!(feed(&mut a, b"a\nb"), [(strings(&["a"]), 2, 2)]);
        let mut items = Vec::new();
        a.finish(&mut items);
        assert_eq!(groups(items), [(strings(&["b"]), 3, 1)]);
    }

    #[test]
    fn restart_drops_what_was_carried_and_reads_from_zero() {
        let mut a = Setup::default().assembler();
        feed(&mut a, b"a\npart");
        a.restart(Fingerprint::of_bytes(b"new\n"));
        assert_eq!((a.offset(), a.emitted()), (0, 0));
        assert_eq!(a.fingerprint(), &Fingerprint::of_bytes(b"new\n"));
        assert_eq!(feed(&mut a, b"new\n"), [(strings(&["new"]), 4, 4)]);
    }

    #[test]
    fn groups_are_cut_at_the_record_limit() {
        let mut a = Setup {
            group_records: 2,
            ..Setup::default()
        }
        .assembler();
        assert_eq!(
            feed(&mut a, b"a\nb\nc\n"),
            [(strings(&["a", "b"]), 4, 4), (strings(&["c"]), 6, 2)]
        );
    }

    #[test]
    fn filtered_and_empty_lines_move_the_end_without_a_record() {
        let mut a = Setup {
            filters: vec![FilterConfig {
                include: false,
                field: None,
                pattern: Regex::new("^drop").unwrap(),
            }],
            ..Setup::default()
        }
        .assembler();
        assert_eq!(
            feed(&mut a, b"keep\ndrop me\n\n"),
            [(strings(&["keep"]), 14, 14)]
        );
        assert_eq!(
            feed(&mut a, b"drop too\n"),
            [(vec![], 23, 9)],
            "progress only: the checkpoint still moves"
        );
    }

    #[test]
    fn cri_partials_are_joined_into_one_record_with_their_stream_and_time() {
        let mut a = Setup {
            cri: true,
            ..Setup::default()
        }
        .assembler();
        let first = b"2026-01-02T03:04:05.1Z stdout P hello \n";
        assert!(
            feed(&mut a, first).is_empty(),
            "a partial is not handed on, not even as progress"
        );
        assert_eq!(a.emitted(), 0);
        let mut items = Vec::new();
        let last = b"2026-01-02T03:04:05.3Z stderr F world\n";
        a.consume(last, &mut items);
        let [Item::Event(e)] = items.as_slice() else {
            panic!("one group")
        };
        assert_eq!(e.pos.offset, (first.len() + last.len()) as u64);
        assert_eq!(
            e.consumed, e.pos.offset,
            "the partial counts with its record"
        );
        let v: serde_json::Value = serde_json::from_slice(&e.records[0].json).unwrap();
        assert_eq!(v["message"], "hello world");
        assert_eq!(v["stream"], "stdout");
        assert_eq!(v["timestamp"], "2026-01-02T03:04:05.100Z");
    }

    #[test]
    fn multiline_records_wait_for_the_next_start_or_the_flush_timeout() {
        let mut a = Setup {
            multiline: Some(r"^\S"),
            ..Setup::default()
        }
        .assembler();
        assert!(feed(&mut a, b"first\n  at x\n").is_empty());
        assert_eq!(
            feed(&mut a, b"second\n"),
            [(strings(&["first\n  at x"]), 13, 13)]
        );
        let mut items = Vec::new();
        a.flush_stale(Instant::now(), &mut items);
        assert!(items.is_empty(), "not stale yet");
        a.flush_stale(Instant::now() + Duration::from_secs(1), &mut items);
        assert_eq!(groups(items), [(strings(&["second"]), 20, 7)]);
    }

    #[test]
    fn handed_on_bytes_count_as_lag_and_records_get_ids() {
        let s = Setup::default().shared();
        let mut a = Assembler::new(
            s.clone(),
            DevIno { dev: 1, ino: 2 },
            "/a.log",
            Fingerprint::default(),
            100,
        );
        let mut items = Vec::new();
        a.consume(b"x\ny\npartial", &mut items);
        assert_eq!(s.lag.load(Ordering::Relaxed), 4);
        let Some(Item::Event(e)) = items.first() else {
            panic!("one group")
        };
        assert_eq!(e.pos.offset, 104);
        assert_eq!(&*e.pos.file, "app/1:2");
        assert_eq!(
            e.records[1].id,
            record_id("ns/p", "app/1:2", 104, b"y"),
            "the id is that of the bytes at their place"
        );
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
