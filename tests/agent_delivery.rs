//! The real `outrider agent` binary against a fault-injecting NDJSON receiver on loopback:
//! exactly-once under normal operation, nothing re-sent after an acknowledged kill -9,
//! bounded buffering while the sink is down, and config reload. (No loss across kill -9,
//! rotation, copytruncate and a 503 outage at 200,000 lines: `agent_loss.rs`.)

#[path = "support/agent.rs"]
mod agent;
#[path = "support/receiver.rs"]
mod receiver;

use std::path::Path;
use std::time::Duration;

use agent::{Agent, append_numbered, count_numbers, missing_and_dups, pipeline_yaml, wait_for};
use receiver::Receiver;

const LONG: Duration = Duration::from_secs(60);

fn http_pipeline(
    dir: &Path,
    name: &str,
    glob: &str,
    rx: &Receiver,
    extra: &str,
) -> std::path::PathBuf {
    let yaml = pipeline_yaml(
        name,
        &format!(
            "{{name: app, paths: [\"{}/{glob}\"]}}",
            dir.join("logs").display()
        ),
        &format!("{{name: rx, http: {{url: \"{}/ingest\"}}}}", rx.url()),
        extra,
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    std::fs::write(&path, yaml).unwrap();
    path
}

fn agent_args<'a>(dir: &'a Path, lp: &'a Path) -> Vec<String> {
    vec![
        "--pipeline".into(),
        lp.display().to_string(),
        "--state-dir".into(),
        dir.join("state").display().to_string(),
        "--node-name".into(),
        "node-a".into(),
    ]
}

fn start(dir: &Path, args: &[String]) -> Agent {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    Agent::start(dir, &a)
}

/// Offsets in a pipeline's checkpoint file as written to disk (none yet: empty).
fn checkpointed_offsets(dir: &Path, file: &str) -> Vec<u64> {
    let path = dir.join("state/checkpoints").join(format!("{file}.json"));
    let Ok(text) = std::fs::read(&path) else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
    v["files"]
        .as_object()
        .map(|m| m.values().filter_map(|e| e["offset"].as_u64()).collect())
        .unwrap_or_default()
}

const FAST_BATCH: &str = "  fields: {service: shop}\n  delivery: {batch: {maxEvents: 500, maxBytes: 256Ki, maxWait: 100ms}}\n";

#[test]
fn every_line_of_every_file_arrives_exactly_once_with_its_fields() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    let lp = http_pipeline(dir.path(), "once", "*.log", &rx, FAST_BATCH);
    let logs = dir.path().join("logs");
    append_numbered(&logs.join("a.log"), "a", 0..3000);
    let _agent = start(dir.path(), &agent_args(dir.path(), &lp));
    append_numbered(&logs.join("b.log"), "b", 0..2000);
    append_numbered(&logs.join("a.log"), "a", 3000..5000);
    wait_for("5000 + 2000 records", LONG, || rx.record_count() >= 7000);
    let msgs = rx.messages();
    for (prefix, n) in [("a", 5000), ("b", 2000)] {
        let (missing, dups) = missing_and_dups(&count_numbers(&msgs, prefix), n);
        assert!(
            missing.is_empty(),
            "{prefix}: missing {} lines",
            missing.len()
        );
        assert_eq!(dups, 0, "{prefix}: duplicates");
    }
    rx.with(|s| {
        let r = &s.records[0];
        assert_eq!(r["node"], "node-a");
        assert_eq!(r["service"], "shop");
        assert_eq!(r["input"], "app");
        assert!(r["file"].as_str().unwrap().ends_with(".log"));
        assert!(chrono::DateTime::parse_from_rfc3339(r["timestamp"].as_str().unwrap()).is_ok());
    });
}

#[test]
fn kill_9_after_the_sink_acknowledged_everything_resends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    let lp = http_pipeline(dir.path(), "acked", "*.log", &rx, FAST_BATCH);
    let file = dir.path().join("logs").join("app.log");
    append_numbered(&file, "seq", 0..4000);
    let mut agent = start(dir.path(), &agent_args(dir.path(), &lp));
    let size = std::fs::metadata(&file).unwrap().len();
    wait_for("all acknowledged and checkpointed", LONG, || {
        let m = agent.metrics();
        rx.record_count() == 4000
            && agent::metric_sum(&m, "outrider_agent_checkpoint_lag_bytes", &[]) == 0.0
            && agent::metric_sum(&m, "outrider_agent_records_shipped_total", &[]) == 4000.0
            // The checkpoint is written beside the shipper, right after the acknowledgement.
            && checkpointed_offsets(dir.path(), "acked") == [size]
    });
    agent.kill9();
    append_numbered(&file, "seq", 4000..5000);
    agent.restart();
    wait_for("the new lines", LONG, || rx.record_count() >= 5000);
    let requests = rx.requests();
    // Give a duplicate the chance to show up: wait for one more full batch period of quiet.
    std::thread::sleep(Duration::from_millis(500));
    let (missing, dups) = missing_and_dups(&count_numbers(&rx.messages(), "seq"), 5000);
    assert!(missing.is_empty());
    assert_eq!(dups, 0, "acknowledged lines were sent again");
    assert_eq!(
        rx.requests(),
        requests,
        "agent kept sending after everything was acked"
    );
}

#[test]
fn sink_down_buffers_then_blocks_reading_with_bounded_memory_and_resumes_when_back() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    rx.fail_all(503);
    let lp = http_pipeline(
        dir.path(),
        "down",
        "*.log",
        &rx,
        "  delivery: {batch: {maxEvents: 200, maxBytes: 16Ki, maxWait: 50ms}, buffer: {maxSize: 64Ki}}\n",
    );
    let file = dir.path().join("logs").join("app.log");
    const N: u64 = 100_000; // 1.3 MB of lines, ~20 MB of records: far more than the buffer
    append_numbered(&file, "seq", 0..N);
    let agent = start(dir.path(), &agent_args(dir.path(), &lp));
    wait_for("buffer full", LONG, || {
        agent.metric("outrider_agent_buffer_bytes", &[]) > 32.0 * 1024.0
    });
    // Reading must stall: the bytes read stop growing well short of the file.
    let file_len = std::fs::metadata(&file).unwrap().len() as f64;
    let read_before = agent.metric("outrider_agent_bytes_read_total", &[]);
    wait_for("some failed attempts", LONG, || rx.requests() >= 5);
    let read_after = agent.metric("outrider_agent_bytes_read_total", &[]);
    assert!(
        read_after <= 2.0 * 256.0 * 1024.0 && read_after < file_len / 2.0,
        "read {read_after} of {file_len} bytes while the sink was down"
    );
    // A reader may finish the chunk it was in when the buffer filled; nothing more.
    assert!(read_after - read_before <= 256.0 * 1024.0);
    let used = agent.metric("outrider_agent_buffer_bytes", &[]);
    assert!(
        used <= 64.0 * 1024.0,
        "buffer holds {used} bytes, over its 64Ki bound"
    );
    assert_eq!(rx.record_count(), 0);
    rx.heal();
    wait_for("every number after the sink came back", LONG, || {
        rx.record_count() >= N as usize
    });
    let (missing, dups) = missing_and_dups(&count_numbers(&rx.messages(), "seq"), N);
    assert!(missing.is_empty());
    assert_eq!(dups, 0);
    assert!(agent.metric("outrider_agent_records_retried_total", &[]) > 0.0);
}

#[test]
fn invalid_config_reload_keeps_the_old_pipeline_and_a_valid_one_is_swapped_in() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let file = logs.join("app.log");
    let config = dir.path().join("agent.yaml");
    let render = |filter: &str| {
        format!(
            "clusterPipelines:\n- name: reload\n  spec:\n    inputs: [{{name: app, paths: [\"{}/*.log\"]}}]\n    filters: [{{exclude: {{pattern: \"{filter}\"}}}}]\n    outputs: [{{name: rx, http: {{url: \"{}/ingest\"}}}}]\n    delivery: {{batch: {{maxWait: 50ms}}}}\n",
            logs.display(),
            rx.url()
        )
    };
    std::fs::write(&config, render("^drop-")).unwrap();
    let state = dir.path().join("state");
    let agent = Agent::start(
        dir.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--node-name",
            "n",
        ],
    );
    append_numbered(&file, "keep", 0..100);
    append_numbered(&file, "drop", 0..100);
    wait_for("first lines", LONG, || rx.record_count() >= 100);
    // An invalid regex: reported, and the running pipeline goes on unchanged.
    std::fs::write(&config, render("(unclosed")).unwrap();
    wait_for("invalid reload counted", LONG, || {
        agent.metric("outrider_agent_config_reloads_total", &["invalid"]) >= 1.0
    });
    append_numbered(&file, "keep", 100..200);
    append_numbered(&file, "drop", 100..200);
    wait_for("lines after the invalid reload", LONG, || {
        rx.record_count() >= 200
    });
    // A valid change: now `keep-` lines are excluded and `drop-` lines pass.
    std::fs::write(&config, render("^keep-")).unwrap();
    wait_for("valid reload counted", LONG, || {
        agent.metric("outrider_agent_config_reloads_total", &["ok"]) >= 1.0
    });
    append_numbered(&file, "keep", 200..300);
    append_numbered(&file, "drop", 200..300);
    wait_for("lines after the swap", LONG, || rx.record_count() >= 300);
    std::thread::sleep(Duration::from_millis(300));
    let msgs = rx.messages();
    let keep = count_numbers(&msgs, "keep");
    let drop = count_numbers(&msgs, "drop");
    assert_eq!(
        missing_and_dups(&keep, 200),
        (vec![], 0),
        "keep-0..200 exactly once"
    );
    assert!(
        keep.keys().all(|n| *n < 200),
        "keep- lines after the swap were shipped"
    );
    assert_eq!(
        drop.keys().copied().collect::<Vec<_>>(),
        (200..300).collect::<Vec<_>>()
    );
    assert!(drop.values().all(|c| *c == 1));
}

#[test]
fn a_new_file_is_found_through_filesystem_events_long_before_the_interval_scan() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    let lp = http_pipeline(dir.path(), "notify", "*.log", &rx, FAST_BATCH);
    let mut args = agent_args(dir.path(), &lp);
    args.extend(["--scan-interval".to_string(), "120s".to_string()]);
    let _agent = start(dir.path(), &args);
    let t0 = std::time::Instant::now();
    append_numbered(&dir.path().join("logs").join("new.log"), "seq", 0..10);
    wait_for("the new file's lines", Duration::from_secs(20), || {
        rx.record_count() >= 10
    });
    assert!(t0.elapsed() < Duration::from_secs(20));
}

#[test]
fn sigterm_ships_the_waiting_batch_and_checkpoints_so_a_restart_sends_nothing_again() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    // maxWait far beyond the test: only shutdown can make this batch go.
    let lp = http_pipeline(
        dir.path(),
        "term",
        "*.log",
        &rx,
        "  delivery: {batch: {maxEvents: 100000, maxBytes: 8Mi, maxWait: 1h}}\n",
    );
    let file = dir.path().join("logs").join("app.log");
    append_numbered(&file, "seq", 0..1000);
    let mut agent = start(dir.path(), &agent_args(dir.path(), &lp));
    wait_for("lines read", LONG, || {
        agent.metric("outrider_agent_lines_read_total", &[]) >= 1000.0
    });
    assert_eq!(rx.record_count(), 0, "the batch waits for maxWait");
    agent.terminate();
    assert_eq!(
        rx.record_count(),
        1000,
        "SIGTERM shipped the buffered batch"
    );
    append_numbered(&file, "seq", 1000..1010);
    agent.restart();
    // Only SIGTERM (or a full batch) ships here, so stop again to flush the new lines.
    wait_for("new lines read", LONG, || {
        agent.metric("outrider_agent_lines_read_total", &[]) >= 10.0
    });
    agent.terminate();
    let (missing, dups) = missing_and_dups(&count_numbers(&rx.messages(), "seq"), 1010);
    assert!(missing.is_empty());
    assert_eq!(dups, 0);
}

#[test]
fn cri_partial_lines_arrive_joined_with_stream_and_runtime_timestamp() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    let yaml = pipeline_yaml(
        "cri",
        &format!(
            "{{name: pods, paths: [\"{}/*.log\"], parser: cri}}",
            dir.path().join("logs").display()
        ),
        &format!("{{name: rx, http: {{url: \"{}/ingest\"}}}}", rx.url()),
        FAST_BATCH,
    );
    std::fs::create_dir_all(dir.path().join("logs")).unwrap();
    let lp = dir.path().join("cri.yaml");
    std::fs::write(&lp, yaml).unwrap();
    std::fs::write(
        dir.path().join("logs").join("0.log"),
        "2026-11-28T10:00:00.123456789Z stdout P part one, \n\
         2026-11-28T10:00:00.2Z stdout P part two, \n\
         2026-11-28T10:00:00.3Z stdout F the end\n\
         2026-11-28T10:00:01Z stderr F whole line\n",
    )
    .unwrap();
    let _agent = start(dir.path(), &agent_args(dir.path(), &lp));
    wait_for("two records", LONG, || rx.record_count() >= 2);
    rx.with(|s| {
        assert_eq!(s.records.len(), 2);
        assert_eq!(s.records[0]["message"], "part one, part two, the end");
        assert_eq!(s.records[0]["stream"], "stdout");
        assert_eq!(s.records[0]["timestamp"], "2026-11-28T10:00:00.123456789Z");
        assert_eq!(s.records[1]["message"], "whole line");
        assert_eq!(s.records[1]["stream"], "stderr");
    });
}

#[test]
fn config_reload_under_load_leaves_no_gap_and_no_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let file = logs.join("app.log");
    std::fs::write(&file, "").unwrap();
    let config = dir.path().join("agent.yaml");
    let render = |version: u32| {
        format!(
            "clusterPipelines:\n- name: load\n  spec:\n    inputs: [{{name: app, paths: [\"{}/*.log\"]}}]\n    fields: {{version: \"{version}\"}}\n    outputs: [{{name: rx, http: {{url: \"{}/ingest\"}}}}]\n    delivery: {{batch: {{maxEvents: 500, maxWait: 50ms}}}}\n",
            logs.display(),
            rx.url()
        )
    };
    std::fs::write(&config, render(1)).unwrap();
    let state = dir.path().join("state");
    let agent = Agent::start(
        dir.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ],
    );
    const N: u64 = 20_000;
    let writer = {
        let file = file.clone();
        std::thread::spawn(move || {
            // ~2 s of writing: the reloads below land while lines keep coming.
            for chunk in 0..N / 250 {
                append_numbered(&file, "seq", chunk * 250..(chunk + 1) * 250);
                std::thread::sleep(Duration::from_millis(25));
            }
        })
    };
    for version in 2..=4u32 {
        wait_for("progress", LONG, || {
            rx.record_count() >= (version as usize - 1) * N as usize / 5
        });
        std::fs::write(&config, render(version)).unwrap();
        wait_for("reload applied", LONG, || {
            agent.metric("outrider_agent_config_reloads_total", &["ok"]) >= (version - 1) as f64
        });
    }
    writer.join().unwrap();
    wait_for("every number", LONG, || rx.record_count() >= N as usize);
    std::thread::sleep(Duration::from_millis(300));
    let (missing, dups) = missing_and_dups(&count_numbers(&rx.messages(), "seq"), N);
    assert!(missing.is_empty(), "{} missing", missing.len());
    assert_eq!(dups, 0, "a reload re-sent acknowledged lines");
    // Records never go back to an older config, and the newest one is what runs now.
    rx.with(|s| {
        let versions: Vec<u32> = s
            .records
            .iter()
            .map(|r| r["version"].as_str().unwrap().parse().unwrap())
            .collect();
        assert!(
            versions.windows(2).all(|w| w[0] <= w[1]),
            "versions out of order"
        );
    });
    append_numbered(&file, "final", 0..1);
    wait_for("the final line", LONG, || rx.record_count() > N as usize);
    rx.with(|s| assert_eq!(s.records.last().unwrap()["version"], "4"));
}

#[test]
fn disk_buffer_reads_ahead_while_the_sink_is_down_and_survives_kill_9_and_deleted_sources() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    rx.fail_all(503);
    let lp = http_pipeline(
        dir.path(),
        "disk",
        "*.log",
        &rx,
        "  delivery: {batch: {maxEvents: 1000, maxBytes: 256Ki, maxWait: 50ms}, buffer: {type: disk, maxSize: 64Mi}}\n",
    );
    let file = dir.path().join("logs").join("app.log");
    const N: u64 = 20_000;
    append_numbered(&file, "seq", 0..N);
    let len = std::fs::metadata(&file).unwrap().len() as f64;
    let mut agent = start(dir.path(), &agent_args(dir.path(), &lp));
    // Unlike the memory buffer, the spool lets reading run ahead of a dead sink, and the
    // file is checkpointed once its records are durable in the spool.
    let checkpoint = dir.path().join("state/checkpoints/disk.json");
    wait_for("the whole file spooled and checkpointed", LONG, || {
        let Ok(text) = std::fs::read_to_string(&checkpoint) else {
            return false;
        };
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let offsets: Vec<f64> = v["files"]
            .as_object()
            .unwrap()
            .values()
            .map(|f| f["offset"].as_f64().unwrap())
            .collect();
        offsets == [len]
    });
    assert!(agent.metric("outrider_agent_buffer_bytes", &[]) > 0.0);
    assert_eq!(rx.record_count(), 0);
    // The source is rotated away and deleted, and the agent dies: only the spool has them.
    std::fs::remove_file(&file).unwrap();
    agent.kill9();
    rx.heal();
    agent.restart();
    wait_for("every number from the spool", LONG, || {
        rx.record_count() >= N as usize
    });
    std::thread::sleep(Duration::from_millis(300));
    let (missing, dups) = missing_and_dups(&count_numbers(&rx.messages(), "seq"), N);
    assert!(missing.is_empty(), "{} missing", missing.len());
    assert_eq!(dups, 0);
}

#[test]
fn a_full_disk_buffer_pauses_reading_and_resumes_when_the_sink_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    rx.fail_all(503);
    let lp = http_pipeline(
        dir.path(),
        "diskfull",
        "*.log",
        &rx,
        "  delivery: {batch: {maxEvents: 500, maxBytes: 64Ki, maxWait: 50ms}, buffer: {type: disk, maxSize: 512Ki}}\n",
    );
    let file = dir.path().join("logs").join("app.log");
    const N: u64 = 100_000; // 1.3 MB of lines, ~20 MB of records
    append_numbered(&file, "seq", 0..N);
    let len = std::fs::metadata(&file).unwrap().len() as f64;
    let agent = start(dir.path(), &agent_args(dir.path(), &lp));
    // Full: the next group does not fit beneath maxSize (so it stops short of it).
    wait_for("spool full", LONG, || {
        agent.metric("outrider_agent_buffer_bytes", &[]) >= 256.0 * 1024.0
    });
    wait_for("some failed attempts", LONG, || rx.requests() >= 5);
    let read = agent.metric("outrider_agent_bytes_read_total", &[]);
    assert!(
        read < len / 2.0,
        "read {read} of {len} bytes with a full spool"
    );
    let segments: Vec<u64> = std::fs::read_dir(dir.path().join("state/spool/diskfull"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name() != "cursor.json")
        .map(|e| e.metadata().unwrap().len())
        .collect();
    // Room is checked for each whole group before it is appended: the segment files stay
    // within maxSize, their 8-byte headers aside.
    let spool_bytes: u64 = segments.iter().sum();
    assert!(
        spool_bytes <= 512 * 1024 + 8 * segments.len() as u64,
        "spool holds {spool_bytes} bytes in {} segments",
        segments.len()
    );
    rx.heal();
    wait_for("every number", Duration::from_secs(120), || {
        rx.record_count() >= N as usize
    });
    let (missing, dups) = missing_and_dups(&count_numbers(&rx.messages(), "seq"), N);
    assert!(missing.is_empty());
    assert_eq!(dups, 0);
}

#[test]
fn switching_from_disk_to_memory_buffer_still_ships_the_spooled_records() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    rx.fail_all(503);
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let file = logs.join("app.log");
    const N: u64 = 5_000;
    append_numbered(&file, "seq", 0..N);
    let len = std::fs::metadata(&file).unwrap().len();
    let config = dir.path().join("agent.yaml");
    let render = |buffer: &str| {
        format!(
            "clusterPipelines:\n- name: switch\n  spec:\n    inputs: [{{name: app, paths: [\"{}/*.log\"]}}]\n    outputs: [{{name: rx, http: {{url: \"{}/ingest\"}}}}]\n    delivery: {{batch: {{maxWait: 50ms}}, buffer: {{type: {buffer}}}}}\n",
            logs.display(),
            rx.url()
        )
    };
    std::fs::write(&config, render("disk")).unwrap();
    let state = dir.path().join("state");
    let agent = Agent::start(
        dir.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--shutdown-grace",
            "1s",
        ],
    );
    let checkpoint = state.join("checkpoints/switch.json");
    wait_for("the file checkpointed into the spool", LONG, || {
        std::fs::read_to_string(&checkpoint)
            .is_ok_and(|t| t.contains(&format!("\"offset\": {len}")))
    });
    std::fs::write(&config, render("memory")).unwrap();
    wait_for("reload applied", LONG, || {
        agent.metric("outrider_agent_config_reloads_total", &["ok"]) >= 1.0
    });
    rx.heal();
    wait_for("every spooled number", LONG, || {
        rx.record_count() >= N as usize
    });
    std::thread::sleep(Duration::from_millis(300));
    let (missing, dups) = missing_and_dups(&count_numbers(&rx.messages(), "seq"), N);
    assert!(missing.is_empty(), "{} missing", missing.len());
    assert_eq!(dups, 0);
}

#[test]
fn a_failing_checkpoint_write_is_retried_with_the_next_batch_not_in_a_loop() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    let lp = http_pipeline(dir.path(), "cpfail", "*.log", &rx, FAST_BATCH);
    // A directory where the checkpoint's temp file goes: every write fails, even as root.
    let blocker = dir.path().join("state/checkpoints/.cpfail.json.tmp");
    std::fs::create_dir_all(&blocker).unwrap();
    let file = dir.path().join("logs").join("app.log");
    append_numbered(&file, "seq", 0..2000);
    let mut agent = start(dir.path(), &agent_args(dir.path(), &lp));
    wait_for("2000 records", LONG, || rx.record_count() >= 2000);
    // Quiet time in which a write retried in a loop would fail thousands of times.
    std::thread::sleep(Duration::from_secs(2));
    let failures = agent
        .log_text()
        .matches("writing checkpoints failed")
        .count();
    assert!(
        (1..=8).contains(&failures),
        "{failures} failed checkpoint writes for 4 batches"
    );
    assert!(checkpointed_offsets(dir.path(), "cpfail").is_empty());
    // Writable again: the next acknowledged batch writes the checkpoint, so a kill -9 after
    // it re-sends nothing.
    std::fs::remove_dir(&blocker).unwrap();
    append_numbered(&file, "seq", 2000..2100);
    let size = std::fs::metadata(&file).unwrap().len();
    wait_for("the next batch checkpointed", LONG, || {
        rx.record_count() >= 2100 && checkpointed_offsets(dir.path(), "cpfail") == [size]
    });
    agent.kill9();
    agent.restart();
    std::thread::sleep(Duration::from_secs(2));
    let (missing, dups) = missing_and_dups(&count_numbers(&rx.messages(), "seq"), 2100);
    assert!(missing.is_empty(), "missing {} lines", missing.len());
    assert_eq!(dups, 0, "checkpointed lines were sent again");
}

#[test]
fn an_agent_started_before_its_config_exists_waits_then_ships_once_it_appears() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    // as in a DaemonSet whose optional ConfigMap the controller has not rendered yet
    let config = dir.path().join("config/agent.yaml");
    let state = dir.path().join("state");
    let mut agent = Agent::spawn(
        dir.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--node-name",
            "n",
        ],
    );
    wait_for("the agent says it waits", LONG, || {
        agent.log_text().contains("no agent configuration yet")
    });
    std::thread::sleep(Duration::from_millis(900)); // three reload intervals
    assert!(
        agent.alive(),
        "exited without a config: {}",
        agent.log_text()
    );
    assert_eq!(agent.readyz(), Some(503), "not ready with nothing to run");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(
        &config,
        format!(
            "clusterPipelines:\n- name: late\n  spec:\n    inputs: [{{name: app, paths: [\"{}/*.log\"]}}]\n    outputs: [{{name: rx, http: {{url: \"{}/ingest\"}}}}]\n    delivery: {{batch: {{maxWait: 50ms}}}}\n",
            logs.display(),
            rx.url()
        ),
    )
    .unwrap();
    agent.wait_ready();
    append_numbered(&logs.join("app.log"), "late", 0..50);
    wait_for("lines shipped", LONG, || rx.record_count() >= 50);
    assert_eq!(
        missing_and_dups(&count_numbers(&rx.messages(), "late"), 50),
        (vec![], 0)
    );
}
