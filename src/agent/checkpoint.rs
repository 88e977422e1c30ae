//! Checkpoints: the offset per file identity up to which every record has been
//! acknowledged by every output of a pipeline. They move only on acknowledgement and in
//! order, and are written atomically (temp file + rename), so a crash of the agent at any
//! point leaves either the old or the new checkpoint, never a torn one. Every write replaces
//! the file; a write is also fsynced (file and directory) when the last fsync is
//! [`SYNC_INTERVAL`] old, and at shutdown, so a crash of the whole machine loses at most that
//! much progress (records re-sent, never lost) without paying a disk flush per batch.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::identity::{Fingerprint, Saved};

/// A checkpoint problem; the agent cannot promise anything without its state directory.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("checkpoint {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// One file's entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Path the file had when it was opened (for people reading the file).
    pub path: String,
    #[serde(flatten)]
    pub saved: Saved,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    files: BTreeMap<String, Entry>,
}

/// The checkpoints of one pipeline, in memory and in `<state-dir>/checkpoints/<ns>_<name>.json`.
#[derive(Debug)]
pub struct Checkpoints {
    path: PathBuf,
    files: BTreeMap<String, Entry>,
    dirty: bool,
    /// A write since the last fsync has not reached the disk for sure.
    unsynced: bool,
    last_sync: Option<Instant>,
}

/// Longest a written checkpoint waits for its fsync while batches keep being acknowledged.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// A checkpoint write to do off the async threads.
#[derive(Debug)]
pub struct PendingWrite {
    pub path: PathBuf,
    pub body: Vec<u8>,
    /// Flush it to the disk too (the last fsync is [`SYNC_INTERVAL`] old).
    pub sync: bool,
}

impl Checkpoints {
    /// File that holds a pipeline's checkpoints.
    pub fn path_for(state_dir: &Path, pipeline_key: &str) -> PathBuf {
        state_dir
            .join("checkpoints")
            .join(format!("{}.json", pipeline_key.replace('/', "_")))
    }

    /// Loads the checkpoints (none yet is fine).
    pub fn load(path: PathBuf) -> Result<Self, CheckpointError> {
        let files = match std::fs::read(&path) {
            Ok(bytes) => {
                let d: OnDisk =
                    serde_json::from_slice(&bytes).map_err(|source| CheckpointError::Corrupt {
                        path: path.clone(),
                        source,
                    })?;
                d.files
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(CheckpointError::Io { path, source }),
        };
        Ok(Self {
            path,
            files,
            dirty: false,
            unsynced: false,
            last_sync: None,
        })
    }

    /// [`Checkpoints::load`], but a corrupt file is renamed to `<file>.corrupt-<unix time>`
    /// and an empty set returned with where it went: the pipeline reads its files again from
    /// the start (duplicates, never a loss) instead of not running at all.
    pub fn load_or_set_aside(path: PathBuf) -> Result<(Self, Option<PathBuf>), CheckpointError> {
        match Self::load(path.clone()) {
            Err(CheckpointError::Corrupt { .. }) => {
                let secs = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let mut aside = path.clone().into_os_string();
                aside.push(format!(".corrupt-{secs}"));
                let aside = PathBuf::from(aside);
                std::fs::rename(&path, &aside).map_err(|source| CheckpointError::Io {
                    path: path.clone(),
                    source,
                })?;
                Ok((Self::load(path)?, Some(aside)))
            }
            other => other.map(|c| (c, None)),
        }
    }

    /// Every entry (what discovery resumes from).
    pub fn entries(&self) -> &BTreeMap<String, Entry> {
        &self.files
    }

    /// Records that everything of `key` up to `offset` is acknowledged.
    pub fn set(&mut self, key: &str, path: &str, offset: u64, fingerprint: &Fingerprint) {
        let entry = Entry {
            path: path.to_string(),
            saved: Saved {
                offset,
                fingerprint: fingerprint.clone(),
            },
        };
        if self.files.get(key) != Some(&entry) {
            self.files.insert(key.to_string(), entry);
            self.dirty = true;
        }
    }

    /// Drops a file that is no longer tailed and no longer matched.
    pub fn forget(&mut self, key: &str) {
        if self.files.remove(key).is_some() {
            self.dirty = true;
        }
    }

    /// What to write, if anything changed since the last write (lets the caller do the
    /// blocking write off the async threads). `sync` asks for an fsync when the last one is
    /// [`SYNC_INTERVAL`] old, or when `final_write` (shutdown) and a write is not synced.
    /// Taking it counts the state as written; report with [`Checkpoints::written`] or
    /// [`Checkpoints::write_failed`].
    pub fn pending_write(&mut self, final_write: bool) -> Option<PendingWrite> {
        let sync_due = self.last_sync.is_none_or(|t| t.elapsed() >= SYNC_INTERVAL);
        let sync = final_write || sync_due;
        if !(self.dirty || sync && self.unsynced) {
            return None;
        }
        let body = serde_json::to_vec_pretty(&OnDiskRef {
            version: 1,
            files: &self.files,
        })
        .ok()?;
        self.dirty = false;
        Some(PendingWrite {
            path: self.path.clone(),
            body,
            sync,
        })
    }

    /// Marks a [`Checkpoints::pending_write`] as done.
    pub fn written(&mut self, synced: bool) {
        if synced {
            self.unsynced = false;
            self.last_sync = Some(Instant::now());
        } else {
            self.unsynced = true;
        }
    }

    /// A [`Checkpoints::pending_write`] did not reach the file: write again next time.
    pub fn write_failed(&mut self) {
        self.dirty = true;
    }

    /// Writes (and fsyncs) the checkpoints now if they changed since the last write.
    pub fn persist(&mut self) -> Result<(), CheckpointError> {
        let Some(w) = self.pending_write(true) else {
            return Ok(());
        };
        write_atomic(&w.path, &w.body, true).map_err(|source| {
            self.write_failed();
            CheckpointError::Io {
                path: w.path,
                source,
            }
        })?;
        self.written(true);
        Ok(())
    }
}

#[derive(Serialize)]
struct OnDiskRef<'a> {
    version: u32,
    files: &'a BTreeMap<String, Entry>,
}

/// Replaces `path` with `body` so that readers (and a crash) see the old or the new
/// content, never a mix: write a temp file, rename it over. With `sync`, the temp file is
/// fsynced before the rename and the directory after it, so the new content also survives
/// a crash of the machine.
pub fn write_atomic(path: &Path, body: &[u8], sync: bool) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        // Blocks allocated up front: ext4 starts writeback of a file with delayed
        // allocation when it is renamed over another (`auto_da_alloc`), which made every
        // checkpoint write a disk write. Best effort: not every filesystem can.
        let _ = rustix::fs::fallocate(
            &f,
            rustix::fs::FallocateFlags::empty(),
            0,
            body.len() as u64,
        );
        f.write_all(body)?;
        if sync {
            f.sync_all()?;
        }
    }
    std::fs::rename(&tmp, path)?;
    if sync {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_survive_a_reload_and_forget_removes_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = Checkpoints::path_for(dir.path(), "prod/shop");
        assert!(path.ends_with("checkpoints/prod_shop.json"));
        let fp = Fingerprint::of_bytes(b"hello");
        let mut c = Checkpoints::load(path.clone()).unwrap();
        c.set("app/1:2", "/var/log/a.log", 42, &fp);
        c.set("app/1:3", "/var/log/b.log", 7, &fp);
        c.persist().unwrap();
        let mut again = Checkpoints::load(path.clone()).unwrap();
        assert_eq!(again.entries()["app/1:2"].saved.offset, 42);
        assert_eq!(again.entries()["app/1:2"].saved.fingerprint, fp);
        again.forget("app/1:3");
        again.persist().unwrap();
        let third = Checkpoints::load(path).unwrap();
        assert_eq!(third.entries().len(), 1);
    }

    #[test]
    fn atomic_write_leaves_no_temp_file_and_replaces_content_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state").join("c.json");
        write_atomic(&p, b"{\"a\":1}", true).unwrap();
        write_atomic(&p, b"{\"b\":2}", false).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"{\"b\":2}");
        let names: Vec<_> = std::fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["c.json"]);
    }

    #[test]
    fn writes_are_fsynced_once_per_interval_and_always_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Checkpoints::load(dir.path().join("c.json")).unwrap();
        let fp = Fingerprint::of_bytes(b"hello");
        assert!(c.pending_write(false).is_none(), "nothing to write yet");
        c.set("app/1:2", "/a.log", 1, &fp);
        let first = c.pending_write(false).unwrap();
        assert!(first.sync, "the first write is synced");
        c.written(first.sync);
        c.set("app/1:2", "/a.log", 2, &fp);
        let second = c.pending_write(false).unwrap();
        assert!(!second.sync, "within the interval a write is not synced");
        c.written(second.sync);
        assert!(c.pending_write(false).is_none(), "written and not yet due");
        let last = c
            .pending_write(true)
            .expect("an unsynced write is synced at the end");
        assert!(last.sync);
        c.written(last.sync);
        assert!(c.pending_write(true).is_none(), "everything is on disk");
    }

    #[test]
    fn a_stale_temp_file_from_a_crash_does_not_affect_loading() {
        let dir = tempfile::tempdir().unwrap();
        let path = Checkpoints::path_for(dir.path(), "ns/p");
        let mut c = Checkpoints::load(path.clone()).unwrap();
        c.set("i/1:1", "/f", 10, &Fingerprint::default());
        c.persist().unwrap();
        // A crash between create and rename leaves a half-written temp file behind.
        std::fs::write(path.parent().unwrap().join(".ns_p.json.tmp"), b"{\"vers").unwrap();
        let loaded = Checkpoints::load(path).unwrap();
        assert_eq!(loaded.entries()["i/1:1"].saved.offset, 10);
    }

    #[test]
    fn corrupt_checkpoint_is_an_error_not_a_silent_restart_from_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(&path, b"garbage").unwrap();
        assert!(matches!(
            Checkpoints::load(path),
            Err(CheckpointError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_corrupt_checkpoint_is_set_aside_and_the_pipeline_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(&path, b"garbage").unwrap();
        let (c, aside) = Checkpoints::load_or_set_aside(path.clone()).unwrap();
        assert!(c.entries().is_empty());
        let aside = aside.expect("moved aside");
        assert_eq!(std::fs::read(&aside).unwrap(), b"garbage");
        assert!(!path.exists());
        // a good one is loaded as it is
        let mut good = Checkpoints::load(path.clone()).unwrap();
        good.set(
            "app/1:2",
            "/var/log/a.log",
            7,
            &Fingerprint::of_bytes(b"abc"),
        );
        good.persist().unwrap();
        let (c, aside) = Checkpoints::load_or_set_aside(path).unwrap();
        assert_eq!(c.entries().len(), 1);
        assert!(aside.is_none());
    }
}
