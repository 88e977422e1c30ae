//! The disk buffer's segments (src/agent/spool.rs), read the way the agent reads them after
//! a restart: the input is the last segment as a crash (or a bad disk) left it, plus where
//! the cursor is.
//!
//! Properties: opening never panics, refuses a segment of an unknown format version, and
//! cuts exactly the torn tail; the reader returns exactly the good frames after the cursor,
//! each decoded as a reference decoder does, reports every bad run of bytes (CRC32C
//! mismatch, impossible length, a payload that is no record) once, at its offset and
//! length, and skips it without losing the good frames after it; a record appended after
//! reopening comes back after them, byte for byte. Version-0 segments (no header, no
//! checksums) are read by the old rules.
//!
//! Input: one byte choosing the cursor (the start of a frame or bad run), then the
//! segment's bytes: `OSPL`, version 1, three zero bytes, then frames `len: u32 LE`,
//! `crc32c(len bytes ++ payload): u32 LE`, payload (`ts: i64 LE`, `id_len: u16 LE`, id,
//! JSON). Anything not starting with `OSPL` is a version-0 segment (`len`, payload). The
//! record appended is made from the segment's last bytes.

use std::cell::RefCell;
use std::io;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use outrider::agent::record::{Encoded, RecordId};
use outrider::agent::spool::{self, BadFrame, MAX_FRAME};

/// A decoded record: (time, id, json).
type Rec = (i64, String, Vec<u8>);
/// A reported bad run: (offset, bytes, reason).
type Reported = (u64, u64, &'static str);

/// What the reference finds at a global offset: a record, or a bad run and its reason.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Item {
    Good {
        start: u64,
        end: u64,
        rec: Rec,
    },
    Bad {
        start: u64,
        end: u64,
        reason: &'static str,
    },
}

impl Item {
    fn start(&self) -> u64 {
        match self {
            Item::Good { start, .. } | Item::Bad { start, .. } => *start,
        }
    }
}

/// CRC32C (Castagnoli, reflected 0x82F63B78), table-driven: independent of the crate the
/// agent uses.
fn crc32c(parts: &[&[u8]]) -> u32 {
    thread_local! {
        static TABLE: [u32; 256] = {
            let mut t = [0u32; 256];
            for (i, e) in t.iter_mut().enumerate() {
                let mut c = i as u32;
                for _ in 0..8 {
                    c = if c & 1 == 1 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
                }
                *e = c;
            }
            t
        };
    }
    TABLE.with(|t| {
        let mut c = !0u32;
        for p in parts {
            for b in *p {
                c = t[((c ^ u32::from(*b)) & 0xff) as usize] ^ (c >> 8);
            }
        }
        !c
    })
}

fn reference_decode(p: &[u8]) -> Option<Rec> {
    let ts = i64::from_le_bytes(p.get(0..8)?.try_into().ok()?);
    let id_len = usize::from(u16::from_le_bytes(p.get(8..10)?.try_into().ok()?));
    let id = p.get(10..10 + id_len)?;
    Some((
        ts,
        RecordId::from(String::from_utf8_lossy(id).as_ref()).to_string(),
        p[10 + id_len..].to_vec(),
    ))
}

fn le32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}

/// Why the bytes at `at` of a version-1 segment's data are not a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Not {
    Torn,
    Checksum,
    Record,
}

/// The version-1 frame at `at` of `d`: (end, record).
fn v1_frame(d: &[u8], at: usize) -> Result<(usize, Rec), Not> {
    if d.len() - at < 8 {
        return Err(Not::Torn);
    }
    let n = le32(d, at);
    if n > MAX_FRAME {
        return Err(Not::Checksum);
    }
    let end = at + 8 + n as usize;
    if end > d.len() {
        return Err(Not::Torn);
    }
    if crc32c(&[&d[at..at + 4], &d[at + 8..end]]) != le32(d, at + 4) as u32 {
        return Err(Not::Checksum);
    }
    let rec = reference_decode(&d[at + 8..end]).ok_or(Not::Record)?;
    Ok((end, rec))
}

/// A version-1 segment's data (after the header): its items, and where it is cut on open.
fn v1_model(d: &[u8]) -> (Vec<Item>, u64) {
    let mut items = Vec::new();
    let mut at = 0usize;
    while at < d.len() {
        match v1_frame(d, at) {
            Ok((end, rec)) => {
                items.push(Item::Good {
                    start: at as u64,
                    end: end as u64,
                    rec,
                });
                at = end;
            }
            Err(why) => {
                let next = (at + 1..d.len()).find(|&q| v1_frame(d, q).is_ok());
                let reason = if why == Not::Record {
                    "record"
                } else {
                    "checksum"
                };
                match next {
                    Some(q) => {
                        items.push(Item::Bad {
                            start: at as u64,
                            end: q as u64,
                            reason,
                        });
                        at = q;
                    }
                    None if why == Not::Torn || d[at..].iter().all(|b| *b == 0) => break,
                    None => {
                        items.push(Item::Bad {
                            start: at as u64,
                            end: d.len() as u64,
                            reason,
                        });
                        at = d.len();
                    }
                }
            }
        }
    }
    (items, at as u64)
}

/// A version-0 segment: its items and where it is cut on open (the old rule: after the
/// last frame that fits).
fn v0_model(d: &[u8]) -> (Vec<Item>, u64) {
    let mut items = Vec::new();
    let mut at = 0usize;
    while d.len() - at >= 4 {
        let n = le32(d, at);
        if n > (d.len() - at - 4) as u64 {
            break;
        }
        let end = at + 4 + n as usize;
        items.push(match reference_decode(&d[at + 4..end]) {
            Some(rec) => Item::Good {
                start: at as u64,
                end: end as u64,
                rec,
            },
            None => Item::Bad {
                start: at as u64,
                end: end as u64,
                reason: "record",
            },
        });
        at = end;
    }
    (items, at as u64)
}

thread_local! {
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    RUNTIME.with(|rt| {
        let mut rt = rt.borrow_mut();
        let rt = rt.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("tokio runtime")
        });
        rt.block_on(f)
    })
}

/// A tmpfs when there is one: opening a spool fsyncs, which costs milliseconds on a disk.
fn root() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if std::env::var_os("OUTRIDER_FUZZ_TMPDIR").is_none() && shm.is_dir() {
        return shm.to_path_buf();
    }
    super::scratch_root()
}

const HEADER: [u8; 8] = *b"OSPL\x01\0\0\0";

pub fn check(data: &[u8]) {
    let Some((&pick, seg)) = data.split_first() else {
        return;
    };
    // The format, the items, where the segment is cut, and its length after opening.
    let (items, valid, kept_len, v0) = if seg.len() < 8 {
        (Vec::new(), 0, 8, false)
    } else if seg[..4] == HEADER[..4] {
        let (items, valid) = v1_model(&seg[8..]);
        (items, valid, 8 + valid, false)
    } else {
        match v0_model(seg) {
            // Too short for a record: started afresh as a version-1 segment.
            (_, valid) if valid < 8 => (Vec::new(), 0, 8, false),
            (items, valid) => (items, valid, valid, true),
        }
    };
    let skip = usize::from(pick) % (items.len() + 1);
    let cursor = items.get(skip).map_or(valid, Item::start);

    let dir = tempfile::Builder::new()
        .prefix("outrider-fuzz-spool")
        .tempdir_in(root())
        .expect("scratch directory");
    let seg_path = dir.path().join(format!("{:020}.seg", 0));
    std::fs::write(&seg_path, seg).expect("write segment");
    if pick & 1 == 1 || cursor > 0 {
        std::fs::write(
            dir.path().join("cursor.json"),
            format!("{{\"offset\":{cursor}}}"),
        )
        .expect("write cursor");
    }
    let opened = spool::open(dir.path(), 1 << 20);
    if seg.len() >= 8 && seg[..4] == HEADER[..4] && seg[4] != HEADER[4] {
        let err = opened.expect_err("a segment of an unknown version is refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        return;
    }
    let (mut writer, mut reader) = opened.expect("open the spool");
    let bad: Arc<Mutex<Vec<Reported>>> = Arc::default();
    let sink = bad.clone();
    reader.report_bad_frames(Arc::new(move |b: &BadFrame| {
        sink.lock()
            .expect("reports")
            .push((b.offset, b.bytes, b.reason.label()));
    }));
    let len = std::fs::metadata(&seg_path).expect("segment").len();
    assert_eq!(len, kept_len, "the torn tail is cut, nothing more");
    if v0 {
        let next = dir.path().join(format!("{valid:020}.seg"));
        assert_eq!(
            std::fs::read(next).expect("a version-1 segment after a version-0 one"),
            HEADER,
            "new records never go to a version-0 segment"
        );
    }

    let tail = &seg[seg.len().saturating_sub(48)..];
    let id_len = tail.len().min(usize::from(pick) % 40);
    let appended = Encoded {
        json: Bytes::copy_from_slice(&tail[id_len..]),
        id: RecordId::from(String::from_utf8_lossy(&tail[..id_len]).as_ref()),
        ts_nanos: i64::from(pick).wrapping_mul(-0x0123_4567_89ab_cdef),
    };
    writer.append(&appended).expect("append");
    writer.commit().expect("commit");
    drop(writer);
    let appended_end =
        valid + 8 + 8 + 2 + appended.id.as_bytes().len() as u64 + appended.json.len() as u64;

    let mut want_good: Vec<(Rec, u64)> = Vec::new();
    let mut want_bad: Vec<Reported> = Vec::new();
    for item in &items[skip..] {
        match item {
            Item::Good { end, rec, .. } => want_good.push((rec.clone(), *end)),
            Item::Bad { start, end, reason } => want_bad.push((*start, end - start, reason)),
        }
    }
    want_good.push((
        (
            appended.ts_nanos,
            appended.id.to_string(),
            appended.json.to_vec(),
        ),
        appended_end,
    ));
    let got: Vec<(Rec, u64)> = block_on(async {
        let mut got = Vec::new();
        loop {
            match reader.next().await {
                Ok(Some((rec, at))) => {
                    got.push(((rec.ts_nanos, rec.id.to_string(), rec.json.to_vec()), at));
                }
                Ok(None) => return got,
                Err(e) => panic!("the reader failed after {} records: {e}", got.len()),
            }
            assert!(got.len() <= want_good.len(), "more records than frames");
        }
    });
    assert_eq!(got, want_good, "the good frames after the cursor, in order");
    assert_eq!(
        *bad.lock().expect("reports"),
        want_bad,
        "every bad run after the cursor reported once"
    );
}
