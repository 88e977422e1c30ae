//! The real `outrider agent` shipping through its Loki and Elasticsearch sinks into a real log
//! store (VictoriaLogs, which speaks both APIs), read back over its query API: every line
//! arrives once, with the record's fields and, for Loki (JSON and protobuf), its labels as the
//! stream. Over HTTPS, the store's certificate is trusted only through the CA in the output's
//! Secret (`ca.crt`); without it nothing is delivered, and nothing is lost either.

#[path = "support/agent.rs"]
mod agent;
#[path = "support/victorialogs.rs"]
mod victorialogs;

use std::path::{Path, PathBuf};
use std::time::Duration;

use agent::{Agent, append_numbered, count_numbers, pipeline_yaml, wait_for};
use victorialogs::VictoriaLogs;

const LINES: u64 = 2000;
const LONG: Duration = Duration::from_secs(60);
/// The store's parameters: the record's `message` is the log message, `timestamp` its time.
const PARAMS: &str = "_msg_field=message&_time_field=timestamp";

/// Starts the agent on `<dir>/logs/*.log` with `output`, and writes LINES numbered lines.
fn ship(dir: &Path, output: &str) -> Agent {
    ship_with(dir, output, &[])
}

/// [`ship`] with extra agent arguments.
fn ship_with(dir: &Path, output: &str, args: &[&str]) -> Agent {
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let lp = dir.join("lp.yaml");
    std::fs::write(&lp, pipeline(dir, output)).unwrap();
    let agent = Agent::run_pipeline(dir, &lp, "node-v", args);
    append_numbered(&logs.join("app.log"), "line", 0..LINES);
    agent
}

/// The ClusterLogPipeline `to-store` tailing `<dir>/logs/*.log` into `output`.
fn pipeline(dir: &Path, output: &str) -> String {
    pipeline_yaml(
        "to-store",
        &format!(
            "{{name: app, paths: [\"{}/*.log\"]}}",
            dir.join("logs").display()
        ),
        output,
        "  fields: {service: shop, env: test}\n  delivery: {batch: {maxEvents: 300, maxWait: 200ms}}\n",
    )
}

/// A Loki output to `url` with the `service` and `node` labels and `extra` settings.
fn loki_output(url: &str, extra: &str) -> String {
    format!(
        "{{name: loki, loki: {{url: \"{url}\", labels: {{service: \"{{{{service}}}}\", node: \"{{{{node}}}}\"}}{extra}}}}}"
    )
}

/// A CA and a server certificate it signed for 127.0.0.1, written to `dir` as `ca.crt`,
/// `server.crt` and `server.key`.
fn make_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "outrider test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let paths = (
        dir.join("ca.crt"),
        dir.join("server.crt"),
        dir.join("server.key"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, server.pem()).unwrap();
    std::fs::write(&paths.2, server_key.serialize_pem()).unwrap();
    paths
}

/// `<dir>/secrets/test/<name>/ca.crt` (the agent's `--secret-dir` layout) holding `ca`.
fn ca_secret(dir: &Path, name: &str, ca: &Path) -> PathBuf {
    let secrets = dir.join("secrets");
    let secret = secrets.join("test").join(name);
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::copy(ca, secret.join("ca.crt")).unwrap();
    secrets
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
    let _agent = ship(dir.path(), &loki_output(&url, ""));
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

#[tokio::test]
async fn loki_protobuf_sink_ships_every_line_once_with_labels_as_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let store = VictoriaLogs::start();
    let url = format!("{}/insert?{PARAMS}", store.base_url());
    // --gzip is on: the snappy-compressed protobuf body must not be gzipped on top.
    let agent = ship_with(
        dir.path(),
        &loki_output(&url, ", encoding: protobuf"),
        &["--gzip"],
    );
    let rows = store.wait_for_count("*", LINES, LONG).await;
    assert_once_with_fields(&rows, &dir.path().join("logs/app.log"));
    for r in &rows {
        assert_eq!(r["_stream"], r#"{node="node-v",service="shop"}"#, "{r}");
    }
    let shipped = agent.metric("outrider_agent_records_shipped_total", &["output=\"loki\""]);
    assert_eq!(shipped, LINES as f64);
}

#[tokio::test]
async fn https_loki_sink_trusts_the_ca_from_the_secret_and_ships_every_line_once() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_certs(dir.path());
    let store = VictoriaLogs::start_tls(&cert, &key);
    let secrets = ca_secret(dir.path(), "store-ca", &ca);
    let url = format!("{}/insert?{PARAMS}", store.tls_base_url());
    let _agent = ship_with(
        dir.path(),
        &loki_output(&url, ", secretRef: {name: store-ca}"),
        &["--secret-dir", secrets.to_str().unwrap()],
    );
    let rows = store.wait_for_count("*", LINES, LONG).await;
    assert_once_with_fields(&rows, &dir.path().join("logs/app.log"));
    for r in &rows {
        assert_eq!(r["_stream"], r#"{node="node-v",service="shop"}"#, "{r}");
    }
}

#[tokio::test]
async fn https_sink_without_the_ca_retries_and_loses_nothing_until_the_ca_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_certs(dir.path());
    let store = VictoriaLogs::start_tls(&cert, &key);
    let secrets = ca_secret(dir.path(), "store-ca", &ca);
    let url = format!("{}/insert/elasticsearch?{PARAMS}", store.tls_base_url());
    let es = |extra: &str| {
        format!("{{name: es, elasticsearch: {{url: \"{url}\", index: logs{extra}}}}}")
    };
    // No secretRef: the public roots do not know the test CA.
    let agent = ship_with(
        dir.path(),
        &es(""),
        &[
            "--secret-dir",
            secrets.to_str().unwrap(),
            "--shutdown-grace",
            "500ms",
        ],
    );
    let failed = || agent.metric("outrider_agent_records_failed_total", &["output=\"es\""]);
    wait_for("failed deliveries counted", LONG, || failed() > 0.0);
    // Several rounds of retries: still nothing arrives, nothing is dead-lettered.
    wait_for("retries", LONG, || {
        agent.metric("outrider_agent_records_retried_total", &["output=\"es\""]) >= 3.0 * 300.0
    });
    let log = agent.log_text();
    assert!(
        log.contains("invalid peer certificate") && log.contains("UnknownIssuer"),
        "the certificate error is not logged: {log}"
    );
    store.flush().await;
    assert_eq!(
        store.count("*").await,
        0,
        "delivered without trusting the CA"
    );
    assert_eq!(
        agent.metric("outrider_agent_records_shipped_total", &["output=\"es\""]),
        0.0
    );
    assert_eq!(
        agent.metric(
            "outrider_agent_records_dead_lettered_total",
            &["output=\"es\""]
        ),
        0.0
    );
    // Give the Secret: the reloaded pipeline starts from the checkpoint and ships it all.
    std::fs::write(
        dir.path().join("lp.yaml"),
        pipeline(dir.path(), &es(", secretRef: {name: store-ca}")),
    )
    .unwrap();
    let rows = store.wait_for_count("*", LINES, LONG).await;
    assert_once_with_fields(&rows, &dir.path().join("logs/app.log"));
}

#[test]
fn unreadable_ca_in_the_secret_refuses_its_pipeline_with_an_error_naming_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.crt");
    std::fs::write(&bad, "this is not PEM").unwrap();
    let secrets = ca_secret(dir.path(), "store-ca", &bad);
    std::fs::create_dir_all(dir.path().join("logs")).unwrap();
    let lp = dir.path().join("lp.yaml");
    let output = loki_output("https://127.0.0.1:9", ", secretRef: {name: store-ca}");
    std::fs::write(&lp, pipeline(dir.path(), &output)).unwrap();
    // the agent keeps running (other pipelines would ship) and retries this one later
    let agent = Agent::spawn(
        dir.path(),
        &[
            "--pipeline",
            lp.to_str().unwrap(),
            "--state-dir",
            dir.path().join("state").to_str().unwrap(),
            "--secret-dir",
            secrets.to_str().unwrap(),
            "--node-name",
            "node-v",
        ],
    );
    let wanted = "to-store: spec.outputs[0].secretRef: Secret test/store-ca: ca.crt: holds no PEM certificate";
    wait_for(
        "the refusal naming the output",
        Duration::from_secs(30),
        || agent.log_text().contains(wanted),
    );
    wait_for("the refusal counted", Duration::from_secs(30), || {
        agent.metric(
            "outrider_agent_pipelines_refused_total",
            &["pipeline=\"to-store\"", "reason=\"secret\""],
        ) >= 1.0
    });
}
