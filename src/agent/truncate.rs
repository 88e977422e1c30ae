//! Copytruncate: a file cut back (and perhaps written again) while it is being read. It is
//! found by looking at the open file just before and just after each read. The offset the
//! original was read to is remembered with its fingerprint, so the copy copytruncate left
//! beside it is read from there instead of from 0.

use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::identity::Fingerprint;

/// How long a truncated original waits for its copy to be found.
const REMEMBER_FOR: Duration = Duration::from_secs(300);

/// Offsets reached in files that were then truncated, with the fingerprint of what was read:
/// the copy that copytruncate left behind is read from there instead of from 0.
/// Shared by the tailers (which remember) and discovery (which takes) of one pipeline.
#[derive(Clone, Debug, Default)]
pub struct TruncatedFiles(Arc<Mutex<Vec<(Fingerprint, u64, Instant)>>>);

impl TruncatedFiles {
    /// Remembers that the file fingerprinted `fp` was handed on up to `emitted` before it
    /// was truncated. An empty fingerprint or nothing handed on leaves nothing to continue.
    pub fn remember(&self, fp: &Fingerprint, emitted: u64) {
        if fp.len > 0
            && emitted > 0
            && let Ok(mut m) = self.0.lock()
        {
            m.retain(|(_, _, at)| at.elapsed() < REMEMBER_FOR);
            m.push((fp.clone(), emitted, Instant::now()));
        }
    }

    /// The offset a truncated original reached, if `file` starts with what it had read.
    /// Taken once: a second file with the same start is not a copy of the same original.
    pub fn take(&self, file: &File) -> Option<u64> {
        let mut m = self.0.lock().ok()?;
        let i = m
            .iter()
            .position(|(fp, _, _)| fp.matches(file).unwrap_or(false))?;
        Some(m.remove(i).1)
    }

    /// What is remembered, oldest first (tests look at it).
    #[cfg(test)]
    pub fn remembered(&self) -> Vec<(Fingerprint, u64)> {
        self.0
            .lock()
            .map(|m| m.iter().map(|(fp, o, _)| (fp.clone(), *o)).collect())
            .unwrap_or_default()
    }
}

/// Before a read at `offset` of a file read so far with fingerprint `fp`: the file's new
/// fingerprint if it was truncated, i.e. it is shorter than `offset` or its first bytes
/// differ (truncated and rewritten past the old offset between two looks).
pub fn before_read(file: &File, offset: u64, fp: &Fingerprint) -> io::Result<Option<Fingerprint>> {
    let size = file.metadata()?.len();
    if size < offset || !fp.matches(file)? {
        return Ok(Some(Fingerprint::of_file(file)?));
    }
    Ok(None)
}

/// After a read of `n` bytes: the file's new fingerprint if it was truncated and rewritten
/// between [`before_read`] and the read. What was read may then be the new content at the
/// old offset, and must be discarded.
pub fn after_read(file: &File, n: usize, fp: &Fingerprint) -> io::Result<Option<Fingerprint>> {
    if n > 0 && !fp.matches(file)? {
        return Ok(Some(Fingerprint::of_file(file)?));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::Path;

    fn append(path: &Path, s: &str) {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap()
            .write_all(s.as_bytes())
            .unwrap();
    }

    fn truncate(path: &Path) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(0)
            .unwrap();
    }

    #[test]
    fn copytruncate_is_detected_by_size_and_by_rewritten_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("app.log");
        append(&a, "0001 first line\n0002 second line\n");
        let f = File::open(&a).unwrap();
        let fp = Fingerprint::of_file(&f).unwrap();
        let offset = f.metadata().unwrap().len();
        assert_eq!(before_read(&f, offset, &fp).unwrap(), None);
        // Truncated: shorter than what was read.
        truncate(&a);
        assert_eq!(
            before_read(&f, offset, &fp).unwrap(),
            Some(Fingerprint::of_bytes(b""))
        );
        // Truncated and rewritten beyond the old offset before the next look.
        let rewritten = "0003 third line that is longer than before\n";
        append(&a, rewritten);
        assert!(f.metadata().unwrap().len() > offset);
        assert_eq!(
            before_read(&f, offset, &fp).unwrap(),
            Some(Fingerprint::of_bytes(rewritten.as_bytes()))
        );
    }

    #[test]
    fn a_file_that_only_grew_is_not_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("app.log");
        append(&a, "abc\n");
        let f = File::open(&a).unwrap();
        let fp = Fingerprint::of_file(&f).unwrap();
        append(&a, "def\n");
        assert_eq!(before_read(&f, 4, &fp).unwrap(), None);
        assert_eq!(after_read(&f, 4, &fp).unwrap(), None);
        // An empty fingerprint (nothing read yet) matches any content.
        assert_eq!(before_read(&f, 0, &Fingerprint::default()).unwrap(), None);
    }

    #[test]
    fn a_rewrite_between_the_check_and_the_read_discards_what_was_read() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("app.log");
        append(&a, "old content\n");
        let f = File::open(&a).unwrap();
        let fp = Fingerprint::of_file(&f).unwrap();
        assert_eq!(before_read(&f, 0, &fp).unwrap(), None);
        truncate(&a);
        append(&a, "new content, longer\n");
        assert_eq!(
            after_read(&f, 8, &fp).unwrap(),
            Some(Fingerprint::of_bytes(b"new content, longer\n"))
        );
        // Nothing read: nothing to discard, the next look finds the truncation.
        assert_eq!(after_read(&f, 0, &fp).unwrap(), None);
    }

    #[test]
    fn the_copy_of_a_truncated_file_takes_the_offset_once() {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("app.log.1");
        let other = dir.path().join("other.log");
        append(&copy, "line one\nline two\n");
        append(&other, "something else\n");
        let fp = Fingerprint::of_bytes(b"line one\nline two\n");
        let t = TruncatedFiles::default();
        t.remember(&fp, 9);
        assert_eq!(t.remembered(), [(fp.clone(), 9)]);
        assert_eq!(t.take(&File::open(&other).unwrap()), None);
        assert_eq!(t.take(&File::open(&copy).unwrap()), Some(9));
        assert_eq!(t.take(&File::open(&copy).unwrap()), None, "taken once");
    }

    #[test]
    fn nothing_is_remembered_of_a_file_nothing_was_handed_on_from() {
        let t = TruncatedFiles::default();
        t.remember(&Fingerprint::of_bytes(b"abc"), 0);
        t.remember(&Fingerprint::default(), 10);
        assert!(t.remembered().is_empty());
        let shared = t.clone();
        shared.remember(&Fingerprint::of_bytes(b"abc"), 3);
        assert_eq!(t.remembered().len(), 1, "clones share one list");
    }
}
