//! No loss, no duplicates beyond one batch, at volume: the real `outrider agent` ships
//! 200,000 numbered lines that a writer thread appends while the agent runs, through one
//! fault each — rename rotation, copytruncate, kill -9 three times, and a sink answering
//! 503 for 10 s — and the receiver counts every sequence number that arrived.

#[path = "support/agent.rs"]
mod agent;
#[path = "support/receiver.rs"]
mod receiver;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use agent::{Agent, pipeline_yaml, wait_for};
use receiver::Receiver;

/// Lines each scenario writes.
const N: u64 = 200_000;
/// Lines between two rotations.
const ROTATE_EVERY: u64 = 20_000;
/// Lines per write: the writer appends a chunk, then pauses, so the 200,000 lines take
/// a few seconds and the agent ships while they are being written.
const CHUNK: u64 = 500;
const PAUSE: Duration = Duration::from_millis(10);
/// The batch size configured; a kill may re-send at most the batches in flight.
const MAX_EVENTS: usize = 1000;
/// Batches on their way at once (the agent's default, passed explicitly so the bound below
/// and the agent agree).
const IN_FLIGHT: usize = 2;
/// What follows the number on each line: log lines of a realistic length (~100 bytes),
/// so a rotated generation (2 MB) spans several of the agent's read chunks.
const PAYLOAD: &str =
    "level=info msg=\"request served\" method=GET path=/api/v1/items status=200 duration_ms=12";
/// Long enough for a debug agent on a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(120);

struct Setup {
    dir: tempfile::TempDir,
    rx: Receiver,
    agent: Agent,
    file: PathBuf,
}

/// A receiver, a pipeline of one input (`glob` under `logs/`) into its NDJSON endpoint,
/// and the agent running on it.
fn setup(glob: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let file = logs.join("app.log");
    std::fs::write(&file, "").unwrap();
    let yaml = pipeline_yaml(
        "loss",
        &format!("{{name: app, paths: [\"{}/{glob}\"]}}", logs.display()),
        &format!("{{name: rx, http: {{url: \"{}/ingest\"}}}}", rx.url()),
        &format!(
            "  delivery: {{batch: {{maxEvents: {MAX_EVENTS}, maxBytes: 1Mi, maxWait: 100ms}}}}\n"
        ),
    );
    let lp = dir.path().join("loss.yaml");
    std::fs::write(&lp, yaml).unwrap();
    let agent = Agent::run_pipeline(
        dir.path(),
        &lp,
        "node-loss",
        &["--batches-in-flight", &IN_FLIGHT.to_string()],
    );
    Setup {
        dir,
        rx,
        agent,
        file,
    }
}

/// How a writer rotates its file every [`ROTATE_EVERY`] lines.
#[derive(Clone, Copy)]
enum Rotation {
    None,
    /// `mv app.log app.log.K`; the application reopens `app.log` only after one more
    /// chunk, which therefore lands in the renamed file.
    Rename,
    /// logrotate's copytruncate: `cp app.log app.log.K`, then truncate `app.log` in place.
    CopyTruncate,
}

/// Lets a test decide when the writer may rename its file: a kill then spans exactly the
/// rotations the test means it to, however slowly the agent stops and starts.
#[derive(Default)]
struct RotationGate {
    state: Mutex<GateState>,
    turn: Condvar,
}

#[derive(Default)]
struct GateState {
    /// Renames done so far.
    done: u64,
    /// Renames allowed so far (`None`: any number).
    allowed: Option<u64>,
}

impl RotationGate {
    /// Allows no rename beyond those done; returns how many were done.
    fn hold(&self) -> u64 {
        let mut g = self.state.lock().unwrap();
        g.allowed = Some(g.done);
        g.done
    }

    /// Allows renames up to the `n`th.
    fn allow(&self, n: u64) {
        self.state.lock().unwrap().allowed = Some(n);
        self.turn.notify_all();
    }

    /// Allows any number of renames again.
    fn release(&self) {
        self.state.lock().unwrap().allowed = None;
        self.turn.notify_all();
    }

    /// Renames done so far.
    fn done(&self) -> u64 {
        self.state.lock().unwrap().done
    }

    /// The writer: waits until one more rename is allowed, then does it (`rename`) under
    /// the lock, so [`RotationGate::hold`] never races a rename in progress.
    fn rename(&self, rename: impl FnOnce()) {
        let mut g = self.state.lock().unwrap();
        while g.allowed.is_some_and(|a| g.done >= a) {
            g = self.turn.wait(g).unwrap();
        }
        rename();
        g.done += 1;
    }
}

/// The first number written to `app.log` after its `r`th rename (the chunk after a rename
/// still lands in the renamed file).
fn first_of_generation(r: u64) -> u64 {
    if r == 0 { 0 } else { r * ROTATE_EVERY + CHUNK }
}

/// The application: appends `seq-<n> <PAYLOAD>` for n in 0..N in chunks, rotating as told
/// (renames only when `gate` allows). `written` counts the lines written so far.
fn spawn_writer(
    path: PathBuf,
    rotation: Rotation,
    written: Arc<AtomicU64>,
    gate: Arc<RotationGate>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let open = |p: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .unwrap()
        };
        let mut out: File = open(&path);
        let mut reopen_after_chunk = false;
        let mut rotations = 0u64;
        for chunk in 0..N / CHUNK {
            let mut buf = String::with_capacity(CHUNK as usize * (PAYLOAD.len() + 14));
            for n in chunk * CHUNK..(chunk + 1) * CHUNK {
                buf.push_str(&format!("seq-{n:08} {PAYLOAD}\n"));
            }
            out.write_all(buf.as_bytes()).unwrap();
            written.store((chunk + 1) * CHUNK, Ordering::Release);
            if reopen_after_chunk {
                out = open(&path);
                reopen_after_chunk = false;
            }
            let end = (chunk + 1) * CHUNK;
            if end.is_multiple_of(ROTATE_EVERY) && end < N {
                rotations += 1;
                let rotated = path.with_file_name(format!("app.log.{rotations}"));
                match rotation {
                    Rotation::None => {}
                    Rotation::Rename => {
                        gate.rename(|| std::fs::rename(&path, &rotated).unwrap());
                        reopen_after_chunk = true;
                    }
                    Rotation::CopyTruncate => {
                        // logrotate copies, then truncates; lines the application writes
                        // between the two are lost by logrotate itself, whatever the
                        // shipper does. The rotation runs here, in the writer, as if it
                        // held the application's write lock: nothing is written between
                        // the copy and the truncation, so the test measures the agent and
                        // not that race.
                        std::fs::copy(&path, &rotated).unwrap();
                        out.set_len(0).unwrap();
                    }
                }
            }
            std::thread::sleep(PAUSE);
        }
    })
}

/// How often each number of 0..N arrived (the receiver's records, counted in place).
struct Tally {
    received: usize,
    missing: Vec<u64>,
    duplicates: usize,
    duplicated: Vec<u64>,
}

fn tally(rx: &Receiver) -> Tally {
    let mut counts = vec![0u32; N as usize];
    let mut foreign: Vec<String> = Vec::new();
    let received = rx.with(|s| {
        for r in &s.records {
            let n = r["message"]
                .as_str()
                .and_then(|m| m.strip_prefix("seq-"))
                .and_then(|m| m.strip_suffix(PAYLOAD))
                .and_then(|m| m.strip_suffix(' '))
                .and_then(|m| m.parse::<u64>().ok())
                .filter(|n| *n < N);
            match n {
                Some(n) => counts[n as usize] += 1,
                None => foreign.push(r["message"].to_string()),
            }
        }
        s.records.len()
    });
    assert!(
        foreign.is_empty(),
        "{} records that are not one of seq-0..{N}, e.g. {:?}",
        foreign.len(),
        &foreign[..foreign.len().min(5)]
    );
    let missing = (0..N).filter(|n| counts[*n as usize] == 0).collect();
    let duplicated: Vec<u64> = (0..N).filter(|n| counts[*n as usize] > 1).collect();
    let duplicates = counts.iter().map(|c| c.saturating_sub(1) as usize).sum();
    Tally {
        received,
        missing,
        duplicates,
        duplicated,
    }
}

/// The highest number the receiver got.
fn newest_number(rx: &Receiver) -> Option<u64> {
    rx.with(|s| {
        s.records
            .iter()
            .filter_map(|r| {
                r["message"]
                    .as_str()?
                    .strip_prefix("seq-")?
                    .split(' ')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .max()
    })
}

/// Waits (up to [`DEADLINE`]) until every number of 0..N arrived, then a little longer for
/// late duplicates, and returns the final tally. Fails naming what is missing.
fn wait_for_every_number(rx: &Receiver, agent: &Agent, started: Instant) -> Tally {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let t = tally(rx);
        if t.missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after {:?}: {} of {N} numbers missing (first {:?}), {} records received; agent log tail:\n{}",
            started.elapsed(),
            t.missing.len(),
            &t.missing[..t.missing.len().min(10)],
            t.received,
            tail(&agent.log_text(), 30),
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // Anything still in flight (a duplicate, if there is one) lands within a batch period.
    std::thread::sleep(Duration::from_millis(500));
    tally(rx)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn report(name: &str, t: &Tally, started: Instant) {
    eprintln!(
        "{name}: {N} numbers arrived, {} records, {} duplicates, {:?}",
        t.received,
        t.duplicates,
        started.elapsed()
    );
}

fn assert_no_duplicates(t: &Tally) {
    assert_eq!(
        t.duplicates,
        0,
        "{} numbers arrived more than once (first {:?})",
        t.duplicated.len(),
        &t.duplicated[..t.duplicated.len().min(10)]
    );
}

#[test]
fn rename_rotation_every_20000_of_200000_lines_loses_nothing_and_duplicates_nothing() {
    let started = Instant::now();
    // Only app.log is matched: each rotated file is drained through the descriptor the
    // agent holds, including the chunk written to it after the rename.
    let s = setup("app.log");
    let written = Arc::new(AtomicU64::new(0));
    let writer = spawn_writer(
        s.file.clone(),
        Rotation::Rename,
        written.clone(),
        Arc::default(),
    );
    writer.join().unwrap();
    let t = wait_for_every_number(&s.rx, &s.agent, started);
    report("rename", &t, started);
    assert_no_duplicates(&t);
    let rotated = std::fs::read_dir(s.dir.path().join("logs"))
        .unwrap()
        .count()
        - 1;
    assert_eq!(rotated as u64, N / ROTATE_EVERY - 1, "rotated files");
}

#[test]
fn files_rotated_out_of_the_glob_while_the_agent_is_killed_are_found_again_and_drained() {
    let started = Instant::now();
    // Only app.log is matched, and each of two kill -9s spans a rename rotation: when the
    // agent comes back its file is app.log.K, which no glob matches (Filebeat and Fluent Bit
    // lose its unread tail here). It is found again by its checkpointed (or recorded)
    // device+inode in the same directory and drained.
    //
    // Each kill spans exactly one rotation, and the agent has opened the file it spans: a
    // generation created and renamed away while the agent is down was never known to it
    // and no tailer can find it again. The writer's renames are gated for that: timed by
    // the lines written (read after the kill), a chunk written during the kill crossed a
    // rotation, the test then waited for the next one, and the generation between the two
    // was lost whole (about 1 run in 3); a restart slower than a generation does the same.
    let mut s = setup("app.log");
    let written = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(RotationGate::default());
    let writer = spawn_writer(
        s.file.clone(),
        Rotation::Rename,
        written.clone(),
        gate.clone(),
    );
    let mut kills = Vec::new();
    for k in [1u64, 2] {
        wait_for("a third more of the lines written", DEADLINE, || {
            written.load(Ordering::Acquire) >= k * N / 3
        });
        // app.log stays the generation after `renamed` renames until the agent is killed.
        let renamed = gate.hold();
        // Only files the agent was already reading are followed: kill it once a line of
        // that generation arrived (it opened the file; lines of it may still be
        // unacknowledged, so only its record of opened files may know it).
        wait_for("a line of the current generation shipped", DEADLINE, || {
            newest_number(&s.rx) >= Some(first_of_generation(renamed))
        });
        let at = written.load(Ordering::Acquire);
        s.agent.kill9();
        // down until the writer renamed the file, wrote its last chunk into it and started
        // the next one, and no longer
        gate.allow(renamed + 1);
        let rotation = (renamed + 1) * ROTATE_EVERY;
        wait_for("a rotation while the agent is down", DEADLINE, || {
            written.load(Ordering::Acquire) >= rotation + 2 * CHUNK
        });
        kills.push((rotation, at, written.load(Ordering::Acquire)));
        s.agent.restart();
        // The next rename only once the agent is reading the new app.log.
        wait_for(
            "a line of the generation begun while down shipped",
            DEADLINE,
            || newest_number(&s.rx) >= Some(first_of_generation(renamed + 1)),
        );
        assert_eq!(gate.done(), renamed + 1, "one rotation while down");
        gate.release();
    }
    writer.join().unwrap();
    let t = wait_for_every_number(&s.rx, &s.agent, started);
    report("rename while killed", &t, started);
    eprintln!("(rotation spanned, lines written at the kill, at the restart): {kills:?}");
    assert!(
        kills
            .iter()
            .all(|(rotation, at, back)| *back < N && at <= rotation && rotation < back),
        "each kill spans a rotation and ends before the writing does: {kills:?}"
    );
    assert!(
        t.duplicates <= 2 * IN_FLIGHT * MAX_EVENTS,
        "{} duplicates for 2 kills with {IN_FLIGHT} batches of {MAX_EVENTS} in flight",
        t.duplicates
    );
    assert!(
        s.agent
            .log_text()
            .contains("draining a file rotated out of the glob"),
        "the rotated files were found by identity"
    );
}

#[test]
fn copytruncate_every_20000_of_200000_lines_loses_nothing_and_duplicates_nothing() {
    let started = Instant::now();
    // The copies must match the glob: lines the agent had not read yet when app.log was
    // truncated exist only in the copy. The agent recognises a copy by the fingerprint
    // of the truncated original and reads it from where the original stopped; a copy the
    // glob does not match would lose those lines.
    let s = setup("app.log*");
    let written = Arc::new(AtomicU64::new(0));
    let writer = spawn_writer(
        s.file.clone(),
        Rotation::CopyTruncate,
        written.clone(),
        Arc::default(),
    );
    writer.join().unwrap();
    let t = wait_for_every_number(&s.rx, &s.agent, started);
    report("copytruncate", &t, started);
    assert_no_duplicates(&t);
    assert!(
        s.agent.metric("outrider_agent_truncations_total", &[]) >= 1.0,
        "the agent saw no truncation"
    );
}

#[test]
fn kill_9_three_times_while_200000_lines_are_written_loses_nothing_and_resends_at_most_the_batches_in_flight()
 {
    let started = Instant::now();
    let mut s = setup("*.log");
    let written = Arc::new(AtomicU64::new(0));
    let writer = spawn_writer(
        s.file.clone(),
        Rotation::None,
        written.clone(),
        Arc::default(),
    );
    let mut at_kill: Vec<(usize, u64)> = Vec::new();
    for k in 1..=3u64 {
        // At a quarter, half and three quarters of the writing (or later, if the agent
        // has not shipped a batch since its last start): mid-write and mid-shipping.
        let shipped_before = at_kill.last().map_or(0, |(received, _)| *received);
        wait_for("progress before the kill", DEADLINE, || {
            written.load(Ordering::Acquire) >= k * N / 4
                && s.rx.record_count() >= shipped_before + MAX_EVENTS
        });
        at_kill.push((s.rx.record_count(), written.load(Ordering::Acquire)));
        s.agent.kill9();
        s.agent.restart();
    }
    writer.join().unwrap();
    let t = wait_for_every_number(&s.rx, &s.agent, started);
    report("kill -9 x3", &t, started);
    eprintln!("(records received, lines written) at each kill: {at_kill:?}");
    assert!(
        at_kill.iter().all(|(received, _)| *received < N as usize),
        "a kill came after everything had arrived: {at_kill:?}"
    );
    // Only the batches in flight at each kill (sent, not yet acknowledged) may come twice.
    assert!(
        t.duplicates <= 3 * IN_FLIGHT * MAX_EVENTS,
        "{} duplicates for 3 kills with {IN_FLIGHT} batches of {MAX_EVENTS} in flight",
        t.duplicates
    );
}

#[test]
fn sink_answering_503_for_10_seconds_mid_stream_loses_nothing_and_duplicates_nothing() {
    let started = Instant::now();
    let s = setup("*.log");
    let written = Arc::new(AtomicU64::new(0));
    let writer = spawn_writer(
        s.file.clone(),
        Rotation::None,
        written.clone(),
        Arc::default(),
    );
    // While lines are still being written and shipped.
    wait_for("progress before the outage", DEADLINE, || {
        written.load(Ordering::Acquire) >= N / 5 && s.rx.record_count() >= 10 * MAX_EVENTS
    });
    s.rx.fail_all(503);
    let outage = Instant::now();
    let at_outage = (s.rx.record_count(), written.load(Ordering::Acquire));
    std::thread::sleep(Duration::from_secs(10));
    s.rx.heal();
    let outage = outage.elapsed();
    writer.join().unwrap();
    let t = wait_for_every_number(&s.rx, &s.agent, started);
    report("503 for 10 s", &t, started);
    let refused =
        s.rx.with(|st| st.statuses.iter().filter(|c| **c == 503).count());
    eprintln!(
        "(records received, lines written) when the outage began: {at_outage:?}; {refused} requests answered 503 over {outage:?}"
    );
    assert!(
        at_outage.0 < N as usize,
        "the outage began after everything had arrived"
    );
    assert!(refused >= 2, "only {refused} requests answered 503");
    assert_no_duplicates(&t);
}
