//! The real `outrider agent` shipping through its Loki and Elasticsearch sinks into a real log
//! store (VictoriaLogs, which speaks both APIs), read back over its query API: every line
//! arrives once, with the record's fields and, for Loki, its labels as the stream.

#[path = "support/agent.rs"]
mod agent;
#[path = "support/victorialogs.rs"]
mod victorialogs;

use std::path::Path;
use std::time::Duration;

use agent::{Agent, append_numbered, count_numbers, pipeline_yaml};
use victorialogs::VictoriaLogs;

const LINES: u64 = 2000;
const LONG: Duration = Duration::from_secs(60);
/// The store's parameters: the record's `message` is the log message, `timestamp` its time.
const PARAMS: &str = "_msg_field=message&_time_field=timestamp";

/// Starts the agent on `<dir>/logs/*.log` with `output`, and writes LINES numbered lines.
fn ship(dir: &Path, output: &str) -> Agent {
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let yaml = pipeline_yaml(
        "to-store",
        &format!("{{name: app, paths: [\"{}/*.log\"]}}", logs.display()),
        output,
        "  fields: {service: shop, env: test}\n  delivery: {batch: {maxEvents: 300, maxWait: 200ms}}\n",
    );
    let lp = dir.join("lp.yaml");
    std::fs::write(&lp, yaml).unwrap();
    let state = dir.join("state");
    let agent = Agent::start(
        dir,
        &[
            "--pipeline",
            lp.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--node-name",
            "node-v",
        ],
    );
    append_numbered(&logs.join("app.log"), "line", 0..LINES);
    agent
}

/// Every number 0..LINES exactly once, every row with the pipeline's fields and the node.
fn assert_once_with_fields(rows: &[serde_json::Value], file: &Path) {
    let messages: Vec<String> = rows
        .iter()
        .map(|r| r["_msg"].as_str().unwrap_or_default().to_string())
        .collect();
    let counts = count_numbers(&messages, "line");
    let missing: Vec<u64> = (0..LINES).filter(|n| !counts.contains_key(n)).collect();
    let dups: usize = counts.values().map(|c| c - 1).sum();
    assert!(
        missing.is_empty(),
        "{} lines missing: {missing:?}",
        missing.len()
    );
    assert_eq!(dups, 0, "duplicated lines");
    assert_eq!(rows.len() as u64, LINES, "rows that are not our lines");
    for r in rows {
        assert_eq!(r["service"], "shop", "{r}");
        assert_eq!(r["env"], "test", "{r}");
        assert_eq!(r["node"], "node-v", "{r}");
        assert_eq!(r["file"], file.display().to_string(), "{r}");
    }
}

#[tokio::test]
async fn loki_sink_ships_every_line_once_with_labels_as_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let store = VictoriaLogs::start();
    let url = format!("{}/insert?{PARAMS}", store.base_url());
    let _agent = ship(
        dir.path(),
        &format!(
            "{{name: loki, loki: {{url: \"{url}\", labels: {{service: \"{{{{service}}}}\", node: \"{{{{node}}}}\"}}}}}}"
        ),
    );
    let rows = store.wait_for_count("*", LINES, LONG).await;
    assert_once_with_fields(&rows, &dir.path().join("logs/app.log"));
    for r in &rows {
        assert_eq!(r["_stream"], r#"{node="node-v",service="shop"}"#, "{r}");
    }
}

#[tokio::test]
async fn elasticsearch_sink_ships_every_line_once_with_its_fields() {
    let dir = tempfile::tempdir().unwrap();
    let store = VictoriaLogs::start();
    let url = format!("{}/insert/elasticsearch?{PARAMS}", store.base_url());
    let _agent = ship(
        dir.path(),
        &format!("{{name: es, elasticsearch: {{url: \"{url}\", index: logs-shop}}}}"),
    );
    let rows = store.wait_for_count("*", LINES, LONG).await;
    assert_once_with_fields(&rows, &dir.path().join("logs/app.log"));
}
