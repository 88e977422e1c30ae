//! The real `outrider agent` binary's disk buffer against damage on disk: a spool segment
//! with a flipped byte is read past the bad frame, which is counted and dead-lettered,
//! while every other line arrives.

#[path = "support/agent.rs"]
mod agent;
#[path = "support/receiver.rs"]
mod receiver;

use std::path::{Path, PathBuf};
use std::time::Duration;

use agent::{Agent, append_numbered, count_numbers, missing_and_dups, pipeline_yaml, wait_for};
use receiver::Receiver;

const LONG: Duration = Duration::from_secs(60);

/// A pipeline `<name>` tailing `<dir>/logs/*.log` into the receiver, with a disk buffer.
fn disk_pipeline(dir: &Path, name: &str, rx: &Receiver) -> PathBuf {
    let yaml = pipeline_yaml(
        name,
        &format!(
            "{{name: app, paths: [\"{}/*.log\"]}}",
            dir.join("logs").display()
        ),
        &format!("{{name: rx, http: {{url: \"{}/ingest\"}}}}", rx.url()),
        "  delivery: {batch: {maxEvents: 200, maxBytes: 64Ki, maxWait: 50ms}, buffer: {type: disk, maxSize: 64Mi}}\n",
    );
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    path
}

/// Checkpointed offsets of the pipeline's files, as written to disk.
fn checkpointed(dir: &Path, name: &str) -> Vec<u64> {
    let path = dir.join(format!("state/checkpoints/{name}.json"));
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["files"]
        .as_object()
        .map(|m| m.values().filter_map(|f| f["offset"].as_u64()).collect())
        .unwrap_or_default()
}

/// The frames of a version-1 segment: (file offset, payload length, message).
fn frames(seg: &[u8]) -> Vec<(usize, usize, String)> {
    assert_eq!(&seg[..5], b"OSPL\x01", "a version-1 segment header");
    let mut out = Vec::new();
    let mut at = 8;
    while at + 8 <= seg.len() {
        let n = u32::from_le_bytes(seg[at..at + 4].try_into().unwrap()) as usize;
        let payload = &seg[at + 8..at + 8 + n];
        let id_len = u16::from_le_bytes(payload[8..10].try_into().unwrap()) as usize;
        let json: serde_json::Value = serde_json::from_slice(&payload[10 + id_len..]).unwrap();
        out.push((at, n, json["message"].as_str().unwrap().to_string()));
        at += 8 + n;
    }
    assert_eq!(at, seg.len(), "whole frames only");
    out
}

#[test]
fn a_spool_with_a_flipped_byte_reports_and_skips_the_bad_frame_and_every_other_line_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    rx.fail_all(503);
    let lp = disk_pipeline(dir.path(), "flip", &rx);
    let file = dir.path().join("logs").join("app.log");
    const N: u64 = 2_000;
    append_numbered(&file, "seq", 0..N);
    let len = std::fs::metadata(&file).unwrap().len();
    let mut agent = Agent::run_pipeline(dir.path(), &lp, "node-s", &[]);
    // The sink is down: every line ends up in the spool only (its file is checkpointed).
    wait_for("the whole file spooled and checkpointed", LONG, || {
        checkpointed(dir.path(), "flip") == [len]
    });
    agent.kill9();
    assert_eq!(rx.record_count(), 0);

    // One byte inside one frame in the middle of the segment goes bad on disk.
    let spool = dir.path().join("state/spool/flip");
    let segs: Vec<PathBuf> = std::fs::read_dir(&spool)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    assert_eq!(segs.len(), 1, "{segs:?}");
    let mut seg = std::fs::read(&segs[0]).unwrap();
    let all = frames(&seg);
    assert_eq!(all.len(), N as usize);
    let (at, n, message) = all[N as usize / 2].clone();
    let bad: u64 = message.strip_prefix("seq-").unwrap().parse().unwrap();
    // The JSON's closing brace: the message itself stays readable in the dead letter.
    seg[at + 8 + n - 1] ^= 0x20;
    std::fs::write(&segs[0], &seg).unwrap();

    rx.heal();
    agent.restart();
    wait_for("every other line", LONG, || {
        rx.record_count() >= N as usize - 1
    });
    let counts = count_numbers(&rx.messages(), "seq");
    let (missing, dups) = missing_and_dups(&counts, N);
    assert_eq!(missing, [bad], "only the line of the bad frame is missing");
    assert_eq!(dups, 0);
    assert_eq!(
        agent.metric(
            "outrider_agent_spool_bad_frames_total",
            &["pipeline=\"flip\"", "reason=\"checksum\""]
        ),
        1.0
    );
    assert_eq!(
        agent.metric("outrider_agent_spool_bad_bytes_total", &[]),
        (8 + n) as f64
    );
    let dead =
        std::fs::read_to_string(dir.path().join("state/dead-letter/flip.spool.ndjson")).unwrap();
    let dead: Vec<serde_json::Value> = dead
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0]["reason"].as_str().unwrap().contains("CRC32C"),
        "{dead:?}"
    );
    assert!(
        dead[0]["record"].as_str().unwrap().contains(&message),
        "{dead:?}"
    );
    assert_eq!(dead[0]["spool"]["bytes"], 8 + n);
}
