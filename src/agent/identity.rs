//! File identity: device + inode, confirmed by a fingerprint (SHA-1 of the first bytes).
//!
//! The inode alone follows a rename-rotated file; the fingerprint catches an inode that
//! was freed and reused by a new file (same number, different content) and a file that
//! was truncated and rewritten (copytruncate) between two looks (see [`super::truncate`]).

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};

/// Bytes hashed for the fingerprint: enough to tell files apart, cheap to re-read.
pub const FINGERPRINT_LEN: usize = 1024;

/// Device and inode of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevIno {
    pub dev: u64,
    pub ino: u64,
}

impl DevIno {
    /// Of a path (following symlinks, as `/var/log/containers` uses them).
    pub fn of_path(path: &Path) -> io::Result<Self> {
        let m = std::fs::metadata(path)?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// Of an open file.
    pub fn of_file(file: &File) -> io::Result<Self> {
        let m = file.metadata()?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// Checkpoint key of this file as read by one input.
    pub fn key(&self, input: &str) -> String {
        format!("{input}/{}:{}", self.dev, self.ino)
    }
}

/// SHA-1 of a file's first `len` bytes (`len` < [`FINGERPRINT_LEN`] while the file is small).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fingerprint {
    pub len: u32,
    pub sha1: String,
}

impl Fingerprint {
    /// Hash of `bytes` (at most the fingerprint length is used).
    pub fn of_bytes(bytes: &[u8]) -> Self {
        let b = &bytes[..bytes.len().min(FINGERPRINT_LEN)];
        let digest = Sha1::digest(b);
        let mut hex = String::with_capacity(40);
        for byte in digest.iter() {
            hex.push_str(&format!("{byte:02x}"));
        }
        Self {
            len: b.len() as u32,
            sha1: hex,
        }
    }

    /// Fingerprint of an open file's first bytes, as long as the file allows.
    pub fn of_file(file: &File) -> io::Result<Self> {
        let mut buf = vec![0u8; FINGERPRINT_LEN];
        let n = read_prefix(file, &mut buf)?;
        Ok(Self::of_bytes(&buf[..n]))
    }

    /// Whether the file's first `self.len` bytes still hash the same; a file that became
    /// shorter than that does not match.
    pub fn matches(&self, file: &File) -> io::Result<bool> {
        if self.len == 0 {
            return Ok(true);
        }
        let mut buf = vec![0u8; self.len as usize];
        let n = read_prefix(file, &mut buf)?;
        Ok(n == buf.len() && Self::of_bytes(&buf) == *self)
    }

    /// Full-length fingerprints are the only ones that identify content (copy detection).
    pub fn is_full(&self) -> bool {
        self.len as usize == FINGERPRINT_LEN
    }
}

fn read_prefix(file: &File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// What a checkpoint remembers about one file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    pub offset: u64,
    pub fingerprint: Fingerprint,
}

/// Where to start reading a file found with the same device+inode as a checkpoint entry.
/// A fingerprint mismatch means the inode was reused by another file (or the file was
/// rewritten); an offset past the end means it was truncated: both start over at 0.
pub fn resume_offset(saved: Option<&Saved>, fingerprint_matches: bool, size: u64) -> u64 {
    match saved {
        Some(s) if fingerprint_matches && s.offset <= size => s.offset,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(path: &Path, s: &str) {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap()
            .write_all(s.as_bytes())
            .unwrap();
    }

    #[test]
    fn rename_rotation_keeps_device_inode_and_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("app.log");
        write(&a, "line 1\nline 2\n");
        let before = DevIno::of_path(&a).unwrap();
        let fp = Fingerprint::of_file(&File::open(&a).unwrap()).unwrap();
        let rotated = dir.path().join("app.log.1");
        std::fs::rename(&a, &rotated).unwrap();
        write(&a, "fresh\n");
        assert_eq!(DevIno::of_path(&rotated).unwrap(), before);
        assert_ne!(DevIno::of_path(&a).unwrap(), before);
        assert!(fp.matches(&File::open(&rotated).unwrap()).unwrap());
        assert!(!fp.matches(&File::open(&a).unwrap()).unwrap());
    }

    #[test]
    fn reused_inode_with_other_content_starts_at_zero() {
        let saved = Saved {
            offset: 100,
            fingerprint: Fingerprint::of_bytes(b"old content"),
        };
        // Same inode, other bytes: the checkpoint belongs to a deleted file.
        assert_eq!(resume_offset(Some(&saved), false, 500), 0);
        assert_eq!(resume_offset(Some(&saved), true, 500), 100);
        // Shorter than the checkpoint: truncated while the agent was away.
        assert_eq!(resume_offset(Some(&saved), true, 50), 0);
        assert_eq!(resume_offset(None, true, 500), 0);
    }

    #[test]
    fn growing_file_keeps_matching_its_short_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("app.log");
        write(&a, "abc\n");
        let f = File::open(&a).unwrap();
        let fp = Fingerprint::of_file(&f).unwrap();
        assert_eq!(fp.len, 4);
        write(&a, &"x".repeat(3000));
        assert!(fp.matches(&f).unwrap());
        assert!(Fingerprint::of_file(&f).unwrap().is_full());
    }
}
