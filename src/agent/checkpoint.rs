//! Checkpoints: the offset per file identity up to which every record has been
//! acknowledged by every output of a pipeline. They move only on acknowledgement and in
//! order, and are written atomically (temp file + fsync + rename + directory fsync), so a
//! crash at any point leaves either the old or the new checkpoint, never a torn one.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

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
        })
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

    /// The path and content to write, if anything changed since the last write (lets the
    /// caller do the blocking write off the async threads).
    pub fn pending_write(&self) -> Option<(PathBuf, Vec<u8>)> {
        if !self.dirty {
            return None;
        }
        let body = serde_json::to_vec_pretty(&OnDiskRef {
            version: 1,
            files: &self.files,
        })
        .ok()?;
        Some((self.path.clone(), body))
    }

    /// Marks the content from [`Checkpoints::pending_write`] as written.
    pub fn written(&mut self) {
        self.dirty = false;
    }

    /// Writes the checkpoints now if they changed since the last write.
    pub fn persist(&mut self) -> Result<(), CheckpointError> {
        let Some((path, body)) = self.pending_write() else {
            return Ok(());
        };
        write_atomic(&path, &body).map_err(|source| CheckpointError::Io { path, source })?;
        self.written();
        Ok(())
    }
}

#[derive(Serialize)]
struct OnDiskRef<'a> {
    version: u32,
    files: &'a BTreeMap<String, Entry>,
}

/// Replaces `path` with `body` so that readers (and a crash) see the old or the new
/// content, never a mix: write a temp file, fsync it, rename it over, fsync the directory.
pub fn write_atomic(path: &Path, body: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
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
        write_atomic(&p, b"{\"a\":1}").unwrap();
        write_atomic(&p, b"{\"b\":2}").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"{\"b\":2}");
        let names: Vec<_> = std::fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["c.json"]);
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
}
