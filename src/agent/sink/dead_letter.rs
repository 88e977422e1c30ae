//! Dead-letter files: NDJSON, one line per record an output rejected for good (or per
//! spool frame that failed its check), with the reason.
//!
//! A file is bounded by `--dead-letter-max-bytes`. When the next line would take it past
//! the cap it is renamed to `<file>.1` once (an existing `.1` is never overwritten), and a
//! fresh file is started. When both are full, further lines are dropped and counted in
//! `outrider_agent_dead_letter_dropped_total`: the oldest rejects are kept, since the
//! first failure is usually the one that explains the rest. Moving or deleting the files
//! (after reading them) makes room again.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;

/// One bounded dead-letter file. Writers of the same file share one value.
#[derive(Debug)]
pub struct DeadLetter {
    path: PathBuf,
    cap: u64,
    /// Lines dropped: the file and its `.1` are full, or the write failed.
    dropped: Counter,
    /// Serializes size check, rotation and append.
    lock: Mutex<()>,
}

/// Default of `--dead-letter-max-bytes`.
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;

impl DeadLetter {
    /// A dead-letter file at `path` of at most `cap` bytes (plus one rotated `.1`).
    pub fn new(path: PathBuf, cap: u64, dropped: Counter) -> Self {
        Self {
            path,
            cap: cap.max(1),
            dropped,
            lock: Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `<file>.1`.
    pub fn rotated_path(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(".1");
        PathBuf::from(p)
    }

    /// Appends one JSON object per line (one write and one fsync per call, a rotation in
    /// between when the cap is reached). Returns how many lines were written; the others
    /// are counted as dropped. A failing write is logged: the records are counted, so the
    /// loss is visible in metrics.
    pub fn write(&self, lines: &[serde_json::Value]) -> usize {
        if lines.is_empty() {
            return 0;
        }
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut written = 0usize;
        let mut dropped = 0usize;
        let res = (|| -> std::io::Result<()> {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut size = match std::fs::metadata(&self.path) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
                Err(e) => return Err(e),
            };
            let mut buf: Vec<u8> = Vec::new();
            let mut pending = 0usize;
            for line in lines {
                let mut text = line.to_string().into_bytes();
                text.push(b'\n');
                let len = text.len() as u64;
                if size + len > self.cap && len <= self.cap && size > 0 {
                    let rotated = self.rotated_path();
                    if !rotated.exists() {
                        append(&self.path, &buf)?;
                        written += pending;
                        buf.clear();
                        pending = 0;
                        std::fs::rename(&self.path, &rotated)?;
                        if let Some(dir) = self.path.parent() {
                            std::fs::File::open(dir)?.sync_all()?;
                        }
                        tracing::warn!(path = %self.path.display(), rotated = %rotated.display(), cap = self.cap, "dead-letter file reached its cap; rotated");
                        size = 0;
                    }
                }
                if size + len > self.cap {
                    dropped += 1;
                    continue;
                }
                buf.extend_from_slice(&text);
                size += len;
                pending += 1;
            }
            append(&self.path, &buf)?;
            written += pending;
            Ok(())
        })();
        if let Err(e) = res {
            tracing::error!(path = %self.path.display(), error = %e, "cannot write the dead-letter file");
            dropped = lines.len() - written;
        }
        if dropped > 0 {
            self.dropped.inc_by(dropped as u64);
            tracing::warn!(path = %self.path.display(), records = dropped, cap = self.cap, "dead-letter file and its .1 are full (or unwritable); records dropped");
        }
        written
    }
}

fn append(path: &Path, buf: &[u8]) -> std::io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(buf)?;
    f.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(n: usize) -> serde_json::Value {
        serde_json::json!({"reason": "HTTP 400", "record": format!("r-{n:04}")})
    }

    #[test]
    fn the_file_rotates_once_at_its_cap_then_drops_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let one = line(0).to_string().len() as u64 + 1;
        let dropped = Counter::default();
        let dl = DeadLetter::new(dir.path().join("dl.ndjson"), 3 * one, dropped.clone());
        let lines: Vec<_> = (0..10).map(line).collect();
        assert_eq!(dl.write(&lines[..2]), 2);
        assert_eq!(
            dl.write(&lines[2..]),
            4,
            "one more in the file, three after rotating"
        );
        assert_eq!(dropped.get(), 4);
        let text = |p: &Path| std::fs::read_to_string(p).unwrap();
        assert_eq!(text(&dl.rotated_path()).lines().count(), 3);
        assert!(text(&dl.rotated_path()).contains("r-0000"));
        assert_eq!(text(dl.path()).lines().count(), 3);
        assert!(text(dl.path()).contains("r-0003"));
        assert_eq!(dl.write(&lines[..1]), 0, "both full: dropped");
        assert_eq!(dropped.get(), 5);
        // The operator moved the files away: room again.
        std::fs::remove_file(dl.rotated_path()).unwrap();
        assert_eq!(dl.write(&lines[..1]), 1);
        assert!(std::fs::metadata(dl.path()).unwrap().len() <= 3 * one);
    }

    #[test]
    fn a_line_larger_than_the_cap_is_dropped_without_rotating() {
        let dir = tempfile::tempdir().unwrap();
        let dropped = Counter::default();
        let dl = DeadLetter::new(dir.path().join("dl.ndjson"), 8, dropped.clone());
        assert_eq!(dl.write(&[line(1)]), 0);
        assert_eq!(dropped.get(), 1);
        assert!(!dl.rotated_path().exists());
    }
}
