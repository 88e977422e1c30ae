//! The real `outrider agent` binary against the fault-injecting receiver's Elasticsearch
//! `_bulk` and Loki push endpoints: per-item results, what is retried and what is
//! dead-lettered.

#[path = "support/agent.rs"]
mod agent;
#[path = "support/receiver.rs"]
mod receiver;

use std::path::Path;
use std::time::Duration;

use agent::{Agent, pipeline_yaml, wait_for};
use receiver::Receiver;

const LONG: Duration = Duration::from_secs(60);

fn start(dir: &Path, output: &str, extra: &str) -> Agent {
    start_with(dir, output, extra, &[])
}

/// [`start`] with more agent arguments.
fn start_with(dir: &Path, output: &str, extra: &str, args: &[&str]) -> Agent {
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let yaml = pipeline_yaml(
        "sinks",
        &format!("{{name: app, paths: [\"{}/*.log\"]}}", logs.display()),
        output,
        extra,
    );
    let lp = dir.join("lp.yaml");
    std::fs::write(&lp, yaml).unwrap();
    Agent::run_pipeline(dir, &lp, "node-b", args)
}

fn append(dir: &Path, lines: &[&str]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("logs").join("app.log"))
        .unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
}

/// Appends `seq-<n>` for n in `range`, 250 lines at a time with a short pause.
fn append_paced(dir: &Path, range: std::ops::Range<u64>) {
    let file = dir.join("logs").join("app.log");
    let mut n = range.start;
    while n < range.end {
        let end = (n + 250).min(range.end);
        agent::append_numbered(&file, "seq", n..end);
        n = end;
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until every number of 0..n arrived, failing with what is missing.
fn wait_for_every_number(rx: &Receiver, n: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let counts = agent::count_numbers(&rx.messages(), "seq");
        let (missing, _) = agent::missing_and_dups(&counts, n);
        if missing.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {n} numbers missing (first {:?}) after {} requests",
            missing.len(),
            &missing[..missing.len().min(10)],
            rx.requests()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn dead_letters(dir: &Path) -> Vec<serde_json::Value> {
    let path = dir.join("state").join("dead-letter");
    let mut out = Vec::new();
    for e in std::fs::read_dir(path).into_iter().flatten().flatten() {
        for line in std::fs::read_to_string(e.path()).unwrap().lines() {
            out.push(serde_json::from_str(line).unwrap());
        }
    }
    out
}

#[test]
fn bulk_retries_only_429_items_dead_letters_400_items_and_counts_409_as_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    let agent = start(
        dir.path(),
        &format!(
            "{{name: es, elasticsearch: {{url: \"{}\", index: logs-test}}}}",
            rx.url()
        ),
        "  delivery: {batch: {maxEvents: 100, maxWait: 300ms}}\n",
    );
    append(
        dir.path(),
        &[
            "ok-1", "busy-1", "reject-1", "exists-1", "ok-2", "busy-2", "ok-3",
        ],
    );
    wait_for("ok and busy documents stored", LONG, || {
        rx.record_count() >= 5
    });
    wait_for("the batch fully accounted", LONG, || {
        agent.metric("outrider_agent_checkpoint_lag_bytes", &[]) == 0.0
            && agent.metric("outrider_agent_records_shipped_total", &[]) >= 6.0
    });
    let mut stored = rx.messages();
    stored.sort();
    assert_eq!(stored, ["busy-1", "busy-2", "ok-1", "ok-2", "ok-3"]);
    rx.with(|s| {
        assert_eq!(s.bulk_requests.len(), 2, "{:?}", s.bulk_requests);
        assert_eq!(
            s.bulk_requests[0].len(),
            7,
            "the first request carries the whole batch"
        );
        // The retry carries only the items that got 429.
        assert_eq!(s.bulk_requests[1], ["busy-1", "busy-2"]);
    });
    let dead = dead_letters(dir.path());
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0]["record"].as_str().unwrap().contains("reject-1"));
    assert!(dead[0]["reason"].as_str().unwrap().contains("400"));
    assert_eq!(
        agent.metric("outrider_agent_records_dead_lettered_total", &[]),
        1.0
    );
    assert_eq!(
        agent.metric("outrider_agent_records_duplicate_total", &[]),
        1.0
    );
    // shipped = 5 stored + 1 already there (409); retried = the two 429 items once.
    assert_eq!(
        agent.metric("outrider_agent_records_shipped_total", &[]),
        6.0
    );
    assert_eq!(
        agent.metric("outrider_agent_records_retried_total", &[]),
        2.0
    );
}

#[test]
fn loki_429_is_retried_and_400_is_dead_lettered_without_retry() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    let agent = start(
        dir.path(),
        &format!(
            "{{name: loki, loki: {{url: \"{}\", labels: {{service: \"{{{{service}}}}\", node: \"{{{{node}}}}\", job: fixed}}}}}}",
            rx.url()
        ),
        "  fields: {service: shop}\n  delivery: {batch: {maxEvents: 100, maxWait: 300ms}}\n",
    );
    // Two 429s, then success: the same entries arrive once.
    rx.fail_next(&[429, 429]);
    append(dir.path(), &["first-a", "first-b"]);
    wait_for("entries after two 429s", LONG, || rx.record_count() >= 2);
    assert_eq!(rx.requests(), 3);
    rx.with(|s| {
        assert_eq!(s.loki_labels[0]["service"], "shop");
        assert_eq!(s.loki_labels[0]["node"], "node-b");
        assert_eq!(s.loki_labels[0]["job"], "fixed");
        assert_eq!(s.records[0]["message"], "first-a");
    });
    wait_for("first batch checkpointed", LONG, || {
        agent.metric("outrider_agent_checkpoint_lag_bytes", &[]) == 0.0
    });
    // A 400: the entries are bad; retrying cannot help. One request, then dead-letter.
    rx.fail_next(&[400]);
    append(dir.path(), &["second-a", "second-b"]);
    wait_for("the 400 batch dead-lettered", LONG, || {
        dead_letters(dir.path()).len() >= 2
    });
    wait_for(
        "checkpoint moved past the dead-lettered batch",
        LONG,
        || agent.metric("outrider_agent_checkpoint_lag_bytes", &[]) == 0.0,
    );
    assert_eq!(rx.requests(), 4, "a 400 must not be retried");
    assert_eq!(
        agent.metric("outrider_agent_records_dead_lettered_total", &[]),
        2.0
    );
    // The next batch flows normally.
    append(dir.path(), &["third"]);
    wait_for("the batch after the 400", LONG, || rx.record_count() >= 3);
    assert_eq!(rx.messages(), ["first-a", "first-b", "third"]);
}

#[test]
fn kill_9_mid_stream_into_bulk_stores_every_line_exactly_once_thanks_to_deterministic_ids() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    let mut agent = start(
        dir.path(),
        &format!(
            "{{name: es, elasticsearch: {{url: \"{}\", index: logs-test}}}}",
            rx.url()
        ),
        "  delivery: {batch: {maxEvents: 300, maxWait: 50ms}}\n",
    );
    const N: u64 = 20_000;
    let file = dir.path().join("logs").join("app.log");
    let writer = std::thread::spawn(move || {
        for chunk in 0..N / 500 {
            agent::append_numbered(&file, "seq", chunk * 500..(chunk + 1) * 500);
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    for k in 1..=3usize {
        let target = k * N as usize / 5;
        wait_for("progress before the kill", LONG, || {
            rx.record_count() >= target
        });
        agent.kill9();
        agent.restart();
    }
    writer.join().unwrap();
    wait_for("every number stored", LONG, || {
        rx.record_count() >= N as usize
    });
    // Re-sent documents (the batch in flight at a kill) answer 409 and are not stored twice.
    std::thread::sleep(Duration::from_millis(300));
    let (missing, dups) = agent::missing_and_dups(&agent::count_numbers(&rx.messages(), "seq"), N);
    assert!(missing.is_empty(), "{} missing", missing.len());
    assert_eq!(dups, 0, "stored twice");
}

#[test]
fn gzip_bodies_and_basic_auth_from_the_secret_dir_reach_the_sink() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let secret = dir.path().join("secrets").join("test").join("rx-creds");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("username"), "shipper\n").unwrap();
    std::fs::write(secret.join("password"), "s3cret").unwrap();
    let yaml = pipeline_yaml(
        "auth",
        &format!("{{name: app, paths: [\"{}/*.log\"]}}", logs.display()),
        &format!(
            "{{name: rx, http: {{url: \"{}/ingest\", secretRef: {{name: rx-creds}}, insecureAllowHttpCredentials: true}}}}",
            rx.url()
        ),
        "  delivery: {batch: {maxWait: 50ms}}\n",
    );
    let lp = dir.path().join("lp.yaml");
    std::fs::write(&lp, yaml).unwrap();
    let state = dir.path().join("state");
    let secrets = dir.path().join("secrets");
    let agent = Agent::start(
        dir.path(),
        &[
            "--pipeline",
            lp.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--secret-dir",
            secrets.to_str().unwrap(),
            "--gzip",
        ],
    );
    append(dir.path(), &["compressed and authenticated"]);
    wait_for("the record", LONG, || rx.record_count() >= 1);
    rx.with(|s| {
        assert_eq!(s.records[0]["message"], "compressed and authenticated");
        assert_eq!(s.encodings[0].as_deref(), Some("gzip"));
        // base64("shipper:s3cret")
        assert_eq!(
            s.authorization[0].as_deref(),
            Some("Basic c2hpcHBlcjpzM2NyZXQ=")
        );
    });
    assert!(
        !agent.log_text().contains("s3cret"),
        "the password must never be logged"
    );
}

#[test]
fn a_response_slower_than_the_request_timeout_is_retried_and_only_that_batch_arrives_again() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    let agent = start_with(
        dir.path(),
        &format!("{{name: rx, http: {{url: \"{}/ingest\"}}}}", rx.url()),
        "  delivery: {batch: {maxEvents: 200, maxWait: 50ms}}\n",
        // One batch at a time, so the two slow answers are one batch's attempt and retry.
        &["--request-timeout", "2s", "--batches-in-flight", "1"],
    );
    const N: u64 = 5000;
    append_paced(dir.path(), 0..N / 2);
    wait_for("progress", LONG, || rx.record_count() >= 1000);
    // The receiver stores the next two requests' records at once but answers each only
    // after 5 s, well past the agent's 2 s timeout: the first attempt of a batch and its
    // first retry both time out, the third attempt is acknowledged.
    rx.slow_next(2, Duration::from_secs(5));
    append_paced(dir.path(), N / 2..N);
    wait_for_every_number(&rx, N);
    std::thread::sleep(Duration::from_millis(300));
    let counts = agent::count_numbers(&rx.messages(), "seq");
    let (slow, slow_messages) = rx.with(|s| (s.slow, s.slow_messages.clone()));
    assert_eq!(slow, 2, "both slow answers were used");
    let batch = slow_messages.len() / 2;
    assert!(
        batch > 0 && batch <= 200,
        "{} records in the slow requests",
        slow_messages.len()
    );
    assert_eq!(
        slow_messages[..batch],
        slow_messages[batch..],
        "the retry after a timeout carries the same batch"
    );
    let slow_numbers: std::collections::BTreeSet<u64> = agent::count_numbers(&slow_messages, "seq")
        .into_keys()
        .collect();
    let duplicated: Vec<u64> = counts
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(n, _)| *n)
        .collect();
    let (_, dups) = agent::missing_and_dups(&counts, N);
    eprintln!("{dups} duplicates: the batch of {batch} records stored by both timed-out attempts");
    assert!(
        duplicated.iter().all(|n| slow_numbers.contains(n)),
        "duplicates outside the timed-out batch: {:?}",
        duplicated
            .iter()
            .filter(|n| !slow_numbers.contains(n))
            .take(10)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        dups,
        2 * batch,
        "each timed-out attempt re-sent the batch once"
    );
    assert!(agent.metric("outrider_agent_records_retried_total", &[]) >= 2.0 * batch as f64);
}

#[test]
fn a_connection_reset_mid_request_is_retried_and_every_line_arrives_once() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    let agent = start(
        dir.path(),
        &format!("{{name: rx, http: {{url: \"{}/ingest\"}}}}", rx.url()),
        "  delivery: {batch: {maxEvents: 200, maxWait: 50ms}}\n",
    );
    const N: u64 = 5000;
    append_paced(dir.path(), 0..N / 2);
    wait_for("progress", LONG, || rx.record_count() >= 1000);
    // The next two requests are read in full, then their connections are reset without
    // an answer and nothing is stored: a sink that died mid-request.
    rx.reset_next(2);
    append_paced(dir.path(), N / 2..N);
    wait_for_every_number(&rx, N);
    std::thread::sleep(Duration::from_millis(300));
    let (missing, dups) = agent::missing_and_dups(&agent::count_numbers(&rx.messages(), "seq"), N);
    assert!(missing.is_empty());
    assert_eq!(rx.with(|s| s.resets), 2, "both resets were used");
    assert_eq!(
        dups, 0,
        "a reset request stored nothing, so nothing arrives twice"
    );
    assert!(agent.metric("outrider_agent_records_retried_total", &[]) > 0.0);
    assert!(
        agent.log_text().contains("delivery failed; will retry"),
        "the reset was reported as a failed delivery"
    );
}

#[test]
fn a_later_batch_acknowledged_first_never_moves_the_checkpoint_past_an_unacknowledged_one() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    // The first request to arrive is stored at once but answered only after 8 s; the others
    // are answered at once, so a later batch is acknowledged while that one is outstanding.
    rx.slow_next(1, Duration::from_secs(8));
    let mut agent = start_with(
        dir.path(),
        &format!("{{name: rx, http: {{url: \"{}/ingest\"}}}}", rx.url()),
        "  delivery: {batch: {maxEvents: 100, maxWait: 50ms}}\n",
        &["--batches-in-flight", "2"],
    );
    const N: u64 = 1000;
    agent::append_numbered(&dir.path().join("logs").join("app.log"), "seq", 0..N);
    wait_for("the slow batch and a later one", LONG, || {
        rx.with(|s| s.slow) == 1 && rx.record_count() >= 200
    });
    // Whatever else the agent would send while the slow batch is outstanding, it sends now.
    std::thread::sleep(Duration::from_millis(1500));
    let before_kill = agent::count_numbers(&rx.messages(), "seq");
    let slow_first = agent::count_numbers(&rx.with(|s| s.slow_messages.clone()), "seq")
        .into_keys()
        .next()
        .expect("the slow batch's records");
    assert!(
        (before_kill.len() as u64) < N,
        "an outstanding batch must stop the shipper after {} batches in flight: {} of {N} sent",
        2,
        before_kill.len()
    );
    agent.kill9();
    agent.restart();
    wait_for_every_number(&rx, N);
    let counts = agent::count_numbers(&rx.messages(), "seq");
    // The checkpoint stayed before the unacknowledged batch: it and everything sent after
    // it (acknowledged or not) comes again.
    let not_resent: Vec<u64> = before_kill
        .keys()
        .filter(|n| **n >= slow_first && counts.get(n).copied().unwrap_or(0) < 2)
        .copied()
        .collect();
    assert!(
        not_resent.is_empty(),
        "sent after the slow batch (from {slow_first}) but not re-sent after the restart: {:?}",
        &not_resent[..not_resent.len().min(10)]
    );
}

#[test]
fn a_sink_answering_302_to_a_200_page_gets_nothing_counted_delivered_and_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    let agent = start(
        dir.path(),
        &format!("{{name: rx, http: {{url: \"{}/ingest\"}}}}", rx.url()),
        "  delivery: {batch: {maxEvents: 100, maxWait: 300ms}}\n",
    );
    rx.redirect_next(1);
    append(dir.path(), &["moved-a", "moved-b"]);
    wait_for("the redirected batch dead-lettered", LONG, || {
        dead_letters(dir.path()).len() >= 2
    });
    let dead = dead_letters(dir.path());
    let text = serde_json::to_string(&dead).unwrap();
    assert!(
        text.contains("moved-a") && text.contains("moved-b") && text.contains("redirect"),
        "{text}"
    );
    rx.with(|s| {
        assert_eq!(s.redirects, 1);
        assert_eq!(s.landings, 0, "the redirect was followed");
        assert!(s.records.is_empty());
    });
    assert_eq!(
        agent.metric("outrider_agent_records_dead_lettered_total", &[]),
        2.0
    );
    // the next batch flows normally
    append(dir.path(), &["after"]);
    wait_for("the batch after the redirect", LONG, || {
        rx.record_count() >= 1
    });
    assert_eq!(rx.messages(), ["after"]);
}

#[test]
fn a_sink_answering_200_with_an_endless_body_is_read_only_up_to_a_cap_and_delivers_once() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    let agent = start(
        dir.path(),
        &format!("{{name: rx, http: {{url: \"{}/ingest\"}}}}", rx.url()),
        "  delivery: {batch: {maxEvents: 100, maxWait: 300ms}}\n",
    );
    rx.endless_next(1);
    append(dir.path(), &["first"]);
    wait_for("the first batch checkpointed", LONG, || {
        rx.record_count() >= 1 && agent.metric("outrider_agent_checkpoint_lag_bytes", &[]) == 0.0
    });
    append(dir.path(), &["second"]);
    wait_for("the second batch", LONG, || rx.record_count() >= 2);
    // done with at the cap: not retried, so stored once
    assert_eq!(rx.messages(), ["first", "second"]);
    // the answer was read up to its 16 MiB cap (without it: 256 MiB and counting)
    let peak = agent.peak_rss_kib();
    assert!(peak < 100 * 1024, "peak RSS {peak} KiB");
    rx.with(|s| assert_eq!(s.endless, 1));
    assert_eq!(
        agent.metric("outrider_agent_records_dead_lettered_total", &[]),
        0.0
    );
}

#[test]
fn a_sink_always_answering_400_stops_the_dead_letter_file_at_its_cap_and_counts_drops() {
    const CAP: u64 = 16 * 1024;
    const N: u64 = 2_000;
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    rx.fail_all(400);
    let agent = start_with(
        dir.path(),
        &format!("{{name: rx, http: {{url: \"{}/ingest\"}}}}", rx.url()),
        "  delivery: {batch: {maxEvents: 100, maxBytes: 64Ki, maxWait: 50ms}}\n",
        &["--dead-letter-max-bytes", "16Ki"],
    );
    append_paced(dir.path(), 0..N);
    wait_for("every record rejected", LONG, || {
        agent.metric("outrider_agent_records_dead_lettered_total", &[]) >= N as f64
    });
    let file = dir.path().join("state/dead-letter/sinks_rx.ndjson");
    let rotated = dir.path().join("state/dead-letter/sinks_rx.ndjson.1");
    let lines = |p: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    for p in [&file, &rotated] {
        let size = std::fs::metadata(p).unwrap().len();
        assert!(size <= CAP, "{} holds {size} bytes", p.display());
        assert!(!lines(p).is_empty(), "{}", p.display());
    }
    let first = &lines(&rotated)[0];
    assert!(first["reason"].as_str().unwrap().contains("400"), "{first}");
    assert!(
        first["record"].as_str().unwrap().contains("seq-"),
        "{first}"
    );
    let kept = (lines(&file).len() + lines(&rotated).len()) as f64;
    let dropped = agent.metric(
        "outrider_agent_dead_letter_dropped_total",
        &["file=\"sinks_rx.ndjson\""],
    );
    assert!(dropped > 0.0);
    assert_eq!(
        kept + dropped,
        N as f64,
        "every rejected record is kept or counted"
    );
    let names: Vec<_> = std::fs::read_dir(dir.path().join("state/dead-letter"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names.len(), 2, "one rotation only: {names:?}");
}

#[test]
fn credentials_over_plain_http_are_refused_unless_the_output_allows_it() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let secret = dir.path().join("secrets").join("test").join("rx-creds");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("token"), "t0ken").unwrap();
    let write = |name: &str, allow: &str| {
        let yaml = pipeline_yaml(
            name,
            &format!("{{name: app, paths: [\"{}/*.log\"]}}", logs.display()),
            &format!(
                "{{name: rx, http: {{url: \"{}/ingest\", secretRef: {{name: rx-creds}}{allow}}}}}",
                rx.url()
            ),
            "  delivery: {batch: {maxWait: 50ms}}\n",
        );
        let lp = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&lp, yaml).unwrap();
        lp.display().to_string()
    };
    let refused = write("clear", "");
    let allowed = write("allowed", ", insecureAllowHttpCredentials: true");
    let state = dir.path().join("state");
    let secrets = dir.path().join("secrets");
    let agent = Agent::start(
        dir.path(),
        &[
            "--pipeline",
            &refused,
            "--pipeline",
            &allowed,
            "--state-dir",
            state.to_str().unwrap(),
            "--secret-dir",
            secrets.to_str().unwrap(),
        ],
    );
    append(dir.path(), &["one line"]);
    wait_for("the allowed pipeline's record", LONG, || {
        rx.record_count() >= 1
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        rx.record_count(),
        1,
        "only the pipeline that allows it sent the token"
    );
    // counted at each retry with backoff (the Secret may change)
    assert!(
        agent.metric(
            "outrider_agent_pipelines_refused_total",
            &["pipeline=\"clear\"", "reason=\"secret\""]
        ) >= 1.0
    );
    let log = agent.log_text();
    assert!(
        log.contains("insecureAllowHttpCredentials") && !log.contains("t0ken"),
        "the refusal says how to allow it and never prints the token:\n{log}"
    );
}
