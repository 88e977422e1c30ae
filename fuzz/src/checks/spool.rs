//! The disk buffer's frames (src/agent/spool.rs), read the way the agent reads them after
//! a restart: the input is the last segment as a crash left it, plus where the cursor is.
//!
//! Properties: opening never panics and cuts exactly the torn tail; the reader returns
//! exactly the complete frames after the cursor, each decoded as a reference decoder does,
//! and stops with `InvalidData` at the first frame too short to be a record; a record
//! appended after reopening comes back after them, byte for byte.
//!
//! Input: one byte choosing the cursor (a frame boundary), then the segment's bytes; the
//! record appended is made from the segment's last bytes.

use std::cell::RefCell;
use std::io;

use bytes::Bytes;
use outrider::agent::record::{Encoded, RecordId};
use outrider::agent::spool;

/// A frame as the reference decoder reads it: (time, id, json), or `None` when too short.
type Frame = Option<(i64, String, Vec<u8>)>;

fn reference_decode(p: &[u8]) -> Frame {
    let ts = i64::from_le_bytes(p.get(0..8)?.try_into().ok()?);
    let id_len = usize::from(u16::from_le_bytes(p.get(8..10)?.try_into().ok()?));
    let id = p.get(10..10 + id_len)?;
    Some((
        ts,
        RecordId::from(String::from_utf8_lossy(id).as_ref()).to_string(),
        p[10 + id_len..].to_vec(),
    ))
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

pub fn check(data: &[u8]) {
    let Some((&pick, seg)) = data.split_first() else {
        return;
    };
    // Complete frames: (start, end, payload).
    let mut frames: Vec<(u64, u64, &[u8])> = Vec::new();
    let mut pos = 0usize;
    while pos + 4 <= seg.len() {
        let n = u32::from_le_bytes([seg[pos], seg[pos + 1], seg[pos + 2], seg[pos + 3]]) as usize;
        if n > seg.len() - pos - 4 {
            break;
        }
        frames.push((pos as u64, (pos + 4 + n) as u64, &seg[pos + 4..pos + 4 + n]));
        pos += 4 + n;
    }
    let valid = pos as u64;
    let skip = usize::from(pick) % (frames.len() + 1);
    let cursor = frames.get(skip).map_or(valid, |f| f.0);

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
    let (mut writer, mut reader) = spool::open(dir.path(), 1 << 20).expect("open the spool");
    let len = std::fs::metadata(&seg_path).expect("segment").len();
    assert_eq!(len, valid, "the torn tail is cut, nothing more");

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
        valid + 4 + 8 + 2 + appended.id.as_bytes().len() as u64 + appended.json.len() as u64;

    let mut want: Vec<(Frame, u64)> = frames[skip..]
        .iter()
        .map(|(_, end, p)| (reference_decode(p), *end))
        .collect();
    want.push((
        Some((
            appended.ts_nanos,
            appended.id.to_string(),
            appended.json.to_vec(),
        )),
        appended_end,
    ));
    block_on(async {
        for (i, (frame, end)) in want.iter().enumerate() {
            let got = reader.next().await;
            match (frame, got) {
                (Some((ts, id, json)), Ok(Some((rec, at)))) => {
                    assert_eq!(
                        (rec.ts_nanos, rec.id.to_string(), rec.json.as_ref(), at),
                        (*ts, id.clone(), json.as_slice(), *end),
                        "frame {i} after the cursor"
                    );
                }
                (None, Err(e)) if e.kind() == io::ErrorKind::InvalidData => return,
                (want, got) => panic!("frame {i} after the cursor: want {want:?}, got {got:?}"),
            }
        }
        assert!(
            matches!(reader.next().await, Ok(None)),
            "nothing after the appended record"
        );
    });
}
