//! One tailer per open file: reads large chunks from the open descriptor, has the
//! [`Assembler`] turn them into records and hands those to the pipeline buffer (waiting
//! when it is full). The descriptor stays open across a rename, so a rotated file is
//! drained to EOF before it is released; a file found shorter or rewritten
//! (copytruncate, see [`super::truncate`]) is read again from 0.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::assemble::Assembler;
use super::buffer::BufferTx;
use super::config::{FilterConfig, InputConfig};
use super::confine::Confinement;
use super::identity::{DevIno, Fingerprint};
use super::metrics::{AgentMetrics, InputLabels};
use super::reader::READ_CHUNK;
use super::record::{Item, RecordContext};
use super::truncate::{self, TruncatedFiles};

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
    pub opened: Option<Arc<super::discover::OpenedFiles>>,
}

impl InputShared {
    /// Records a file about to be read (see [`super::discover::OpenedFiles`]).
    pub fn record_opened(&self, key: &str, entry: super::checkpoint::Entry) {
        if let Some(o) = &self.opened {
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
    let mut assembler = Some(Assembler::new(
        shared.clone(),
        opened.id,
        &opened.path,
        opened.fingerprint.clone(),
        opened.offset,
    ));
    publish(&ctl, &opened.fingerprint);
    let mut file = Some(opened.file);
    let mut buf = Some(vec![0u8; READ_CHUNK]);
    let mut eof_since: Option<Instant> = None;
    loop {
        if stop.is_cancelled() {
            break;
        }
        let (Some(f), Some(mut b), Some(mut t)) = (file.take(), buf.take(), assembler.take())
        else {
            break;
        };
        let ctl2 = ctl.clone();
        // Reading and turning lines into records both happen on a blocking thread: the
        // CPU-heavy part never holds up the async workers that ship (and on a node with
        // cores to spare, files are parsed in parallel).
        let joined = tokio::task::spawn_blocking(move || {
            let fp = t.fingerprint().clone();
            let r = step(&f, &mut b, t.offset(), &fp, &ctl2);
            let mut items = Vec::new();
            if let Ok(Step::Read(n, new_fp)) = &r {
                if let Some(fp) = new_fp {
                    publish(&ctl2, fp);
                    t.set_fingerprint(fp.clone());
                }
                if *n > 0 {
                    t.consume(&b[..*n], &mut items);
                }
            }
            (f, b, t, r, items)
        })
        .await;
        let Ok((f, b, mut t, result, mut items)) = joined else {
            break;
        };
        let read = match result {
            Ok(Step::Read(n, _)) => n,
            Ok(Step::Truncated(new_fp)) => {
                tracing::info!(path = %t.path(), offset = t.offset(), "file truncated (copytruncate?); reading it again from 0");
                shared
                    .metrics
                    .truncations
                    .get_or_create(&shared.labels)
                    .inc();
                // The copy continues after the last line handed on, not at the read
                // offset: a partial line (or pending multiline record) already read is
                // dropped by the restart below and must be read again, whole, from the copy.
                shared.truncated.remember(t.fingerprint(), t.emitted());
                publish(&ctl, &new_fp);
                t.restart(new_fp);
                file = Some(f);
                buf = Some(b);
                assembler = Some(t);
                continue;
            }
            Err(e) => {
                tracing::warn!(path = %t.path(), error = %e, "reading failed; retrying");
                0
            }
        };
        if read > 0 {
            eof_since = None;
        } else {
            let now = Instant::now();
            t.flush_stale(now, &mut items);
            let since = *eof_since.get_or_insert(now);
            if ctl.gone.load(Ordering::Acquire) && since.elapsed() >= shared.opts.release_after {
                t.finish(&mut items);
                // stays recorded until the checkpoint has its last offset (see OpenedFiles)
                if let Some(o) = &shared.opened {
                    o.release(t.key());
                }
                items.push(Item::Forget(t.key().clone()));
                shared.tx.send_all(items, &stop).await;
                tracing::info!(path = %t.path(), "file drained and released");
                break;
            }
        }
        file = Some(f);
        buf = Some(b);
        assembler = Some(t);
        if !shared.tx.send_all(items, &stop).await {
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

/// Tells discovery the fingerprint this tailer reads under (it compares new files with it).
fn publish(ctl: &TailerControl, fp: &Fingerprint) {
    if let Ok(mut g) = ctl.fingerprint.lock() {
        *g = fp.clone();
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
    if let Some(new_fp) = truncate::before_read(f, offset, fp)? {
        return Ok(Step::Truncated(new_fp));
    }
    if !fp.is_full() {
        // Publish the prefix about to be read before reading it, so discovery never sees
        // a copy of content this tailer is reading without knowing it (copytruncate).
        publish(ctl, &Fingerprint::of_file(f)?);
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
    if let Some(new_fp) = truncate::after_read(f, n, fp)? {
        return Ok(Step::Truncated(new_fp));
    }
    // A short fingerprint grows with the file until it covers the full length.
    let new_fp = (n > 0 && !fp.is_full() && offset + n as u64 > fp.len as u64)
        .then(|| Fingerprint::of_file(f))
        .transpose()?;
    Ok(Step::Read(n, new_fp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::buffer::{self, BufferRx};
    use crate::agent::config::{MultilineConfig, ParserConfig};
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
            .remembered()
            .into_iter()
            .filter(|(fp, _)| *fp == old_fp)
            .map(|(_, o)| o)
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
        let remembered: Vec<u64> = s.truncated.remembered().iter().map(|e| e.1).collect();
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
    async fn a_released_file_stays_in_the_opened_record_until_its_lines_are_acknowledged() {
        // The file is read whole, rotated out of the glob and released while nothing of it
        // is acknowledged yet (a slow sink): a kill -9 now leaves no checkpoint entry, so
        // the record of opened files is the only thing that can find it again.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        append(&path, "one\n");
        let (s, mut rx) = shared(ParserConfig::None, None, vec![]);
        let mut s = Arc::into_inner(s).unwrap();
        let record_path = dir.path().join("opened.json");
        let (record, _) = super::super::discover::OpenedFiles::load(record_path.clone());
        s.opened = Some(Arc::new(record));
        let s = Arc::new(s);
        let opened = open(&path, 0);
        let key = opened.id.key("app");
        s.record_opened(
            &key,
            super::super::checkpoint::Entry {
                path: opened.path.clone(),
                saved: super::super::identity::Saved {
                    offset: 0,
                    fingerprint: opened.fingerprint.clone(),
                },
            },
        );
        let ctl = Arc::new(TailerControl::default());
        ctl.gone.store(true, Ordering::Release);
        let stop = CancellationToken::new();
        let task = tokio::spawn(tail(s.clone(), ctl, opened, stop.clone()));
        assert_eq!(next(&mut rx).await.0.unwrap()["message"], "one");
        assert_eq!(next(&mut rx).await.1, u64::MAX, "released");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("tailer exits after release")
            .unwrap();
        // killed here: what the next start finds
        let (_, before) = super::super::discover::OpenedFiles::load(record_path);
        assert!(
            before.contains_key(&key),
            "a released file whose lines are not acknowledged is still recorded: {before:?}"
        );
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
}
