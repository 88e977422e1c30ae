//! The admin's caps against the real `outrider agent` binary: pipelines asking for a
//! memory buffer, a disk buffer or a batch over the caps are refused by name (log line
//! naming the pipeline and field, `pipelines_refused{reason="limit_exceeded"}`), and the
//! pipeline within them ships every line. The proof is what reaches the receiver.

#[path = "support/agent.rs"]
mod agent;
#[path = "support/receiver.rs"]
mod receiver;

use std::path::Path;
use std::time::Duration;

use agent::{Agent, append_numbered, count_numbers, pipeline_yaml, wait_for};
use receiver::Receiver;

const LONG: Duration = Duration::from_secs(60);

/// Writes `<dir>/<name>.yaml` reading `<dir>/logs/<name>.log` into `rx`.
fn write_pipeline(dir: &Path, name: &str, delivery: &str, rx: &Receiver) -> String {
    let yaml = pipeline_yaml(
        name,
        &format!(
            "{{name: app, paths: [\"{}/logs/{name}.log\"]}}",
            dir.display()
        ),
        &format!("{{name: rx, http: {{url: \"{}/ingest\"}}}}", rx.url()),
        &format!("  delivery: {delivery}\n"),
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    path.display().to_string()
}

#[test]
fn pipelines_over_the_caps_are_refused_by_name_and_the_one_within_ships_every_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rx = Receiver::start();
    std::fs::create_dir_all(d.join("logs")).unwrap();

    let good = write_pipeline(
        d,
        "good",
        "{batch: {maxBytes: 64Ki, maxWait: 50ms}, buffer: {maxSize: 4Mi}}",
        &rx,
    );
    // (field, what the message says) per refused pipeline
    let greedy = [
        (
            "memory",
            "{batch: {maxWait: 50ms}, buffer: {maxSize: 8Mi}}",
            "spec.delivery.buffer.maxSize: 8Mi is over the node agents' memory cap of 4Mi",
        ),
        (
            "disk",
            "{batch: {maxWait: 50ms}, buffer: {type: disk, maxSize: 2Gi}}",
            // the default cap: no --max-disk-buffer given
            "spec.delivery.buffer.maxSize: 2Gi is over the node agents' disk cap of 1Gi",
        ),
        (
            "batch",
            "{batch: {maxBytes: 2Mi, maxWait: 50ms}, buffer: {maxSize: 4Mi}}",
            "spec.delivery.batch.maxBytes: 2Mi is over the node agents' batch cap of 1Mi",
        ),
    ];
    let root = d.display().to_string();
    let state = format!("{root}/state");
    let mut args = vec!["--pipeline".to_string(), good];
    for (name, delivery, _) in &greedy {
        args.push("--pipeline".into());
        args.push(write_pipeline(d, name, delivery, &rx));
    }
    args.extend(
        [
            "--state-dir",
            &state,
            "--allowed-root",
            &root,
            "--node-name",
            "n1",
            "--max-memory-buffer",
            "4Mi",
            "--max-batch-bytes",
            "1Mi",
        ]
        .map(String::from),
    );
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start(d, &argv);

    append_numbered(&d.join("logs/good.log"), "ok", 0..500);
    for (name, _, _) in &greedy {
        append_numbered(&d.join(format!("logs/{name}.log")), name, 0..50);
    }
    wait_for("the good pipeline's 500 lines", LONG, || {
        count_numbers(&rx.messages(), "ok").len() == 500
    });

    let log = agent.log_text();
    for (name, _, says) in &greedy {
        let n = agent.metric(
            "outrider_agent_pipelines_refused_total",
            &[&format!("pipeline=\"{name}\""), "reason=\"limit_exceeded\""],
        );
        assert_eq!(n, 1.0, "pipeline {name} refused:\n{}", agent.metrics());
        assert!(
            log.contains(&format!("pipeline {name}: {says}")),
            "the refusal of {name} names the pipeline, field and cap:\n{log}"
        );
    }
    assert_eq!(
        agent.metric(
            "outrider_agent_pipelines_refused_total",
            &["pipeline=\"good\""]
        ),
        0.0
    );
    // a refused pipeline is not retried: still counted once after a few reload intervals
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        agent.metric(
            "outrider_agent_pipelines_refused_total",
            &["reason=\"limit_exceeded\""]
        ),
        3.0,
        "each refusal counted once:\n{}",
        agent.metrics()
    );

    let messages = rx.messages();
    let counts = count_numbers(&messages, "ok");
    assert!(counts.values().all(|n| *n == 1), "no duplicates");
    assert_eq!(
        messages.len(),
        500,
        "only the good pipeline's lines arrive: {:?}",
        messages
            .iter()
            .filter(|m| !m.contains("ok"))
            .take(5)
            .collect::<Vec<_>>()
    );
}

#[test]
fn a_cap_of_zero_or_not_a_size_stops_the_agent_at_its_flags() {
    for (flag, value) in [
        ("--max-memory-buffer", "0"),
        ("--max-disk-buffer", "lots"),
        ("--max-batch-events", "0"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_outrider"))
            .args(["agent", "--pipeline", "/nonexistent.yaml", flag, value])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{flag} {value}: {err}");
    }
}
