//! A hostile tenant's pipelines against the real `outrider agent` binary: globs outside
//! the allowed root, at the agent's own secret and state directories, at /proc, at `/**`
//! and through `..` are refused with a named reason; symlinks planted beneath the root
//! (to a file and to a directory outside it) are skipped and counted, never followed.
//! The proof is what reaches the receiver: the good pipeline's lines, and nothing from
//! outside the root.

#[path = "support/agent.rs"]
mod agent;
#[path = "support/receiver.rs"]
mod receiver;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use agent::{Agent, append_numbered, pipeline_yaml, wait_for};
use receiver::Receiver;

const LONG: Duration = Duration::from_secs(60);

/// Text that exists only outside the allowed root (or in places never to be read).
const FORBIDDEN: &str = "FORBIDDEN-BYTES";

fn write_pipeline(dir: &Path, name: &str, paths: &[String], rx: &Receiver) -> String {
    let quoted: Vec<String> = paths.iter().map(|p| format!("\"{p}\"")).collect();
    let yaml = pipeline_yaml(
        name,
        &format!("{{name: app, paths: [{}]}}", quoted.join(", ")),
        &format!("{{name: rx, http: {{url: \"{}/ingest\"}}}}", rx.url()),
        "  delivery: {batch: {maxWait: 50ms}}\n",
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    path.display().to_string()
}

#[test]
fn hostile_paths_are_refused_by_name_and_nothing_outside_the_allowed_root_is_shipped() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rx = Receiver::start();

    // outside the root: a file and a directory holding a matching file
    std::fs::write(
        outside.path().join("secret.log"),
        format!("{FORBIDDEN} file\n"),
    )
    .unwrap();
    std::fs::create_dir(outside.path().join("app")).unwrap();
    std::fs::write(
        outside.path().join("app/other.log"),
        format!("{FORBIDDEN} dir\n"),
    )
    .unwrap();
    // the agent's secret directory, inside the allowed root
    let secrets = d.join("secrets/test/creds");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("password"), format!("{FORBIDDEN} secret\n")).unwrap();
    // beneath the root: the real log, and planted symlinks
    let logs = d.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    symlink(outside.path().join("secret.log"), logs.join("planted.log")).unwrap();
    symlink(outside.path(), logs.join("planted-dir")).unwrap();
    symlink("/proc/self/environ", logs.join("environ.log")).unwrap();

    let root = d.display().to_string();
    let good = write_pipeline(
        d,
        "good",
        &[format!("{root}/logs/*.log"), format!("{root}/logs/*/*.log")],
        &rx,
    );
    let hostile = [
        (
            "shadow",
            vec!["/etc/shadow".to_string()],
            "outside_allowed_roots",
        ),
        (
            "secretdir",
            vec![format!("{root}/secrets/*/*/*")],
            "denied_path",
        ),
        (
            "statedir",
            vec![format!("{root}/state/**/*")],
            "denied_path",
        ),
        (
            "environ",
            vec!["/proc/self/environ".to_string()],
            "denied_path",
        ),
        ("everything", vec!["/**".to_string()], "wildcard_above_root"),
        (
            "dotdot",
            vec![format!("{root}/logs/../../../etc/passwd")],
            "parent_component",
        ),
    ];
    let mut args: Vec<String> = vec!["--pipeline".into(), good];
    for (name, paths, _) in &hostile {
        args.push("--pipeline".into());
        args.push(write_pipeline(d, name, paths, &rx));
    }
    args.extend(
        [
            "--state-dir",
            &format!("{root}/state"),
            "--secret-dir",
            &format!("{root}/secrets"),
            "--allowed-root",
            &root,
            "--node-name",
            "n1",
        ]
        .map(String::from),
    );
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start(d, &argv);

    append_numbered(&logs.join("app.log"), "ok", 0..100);
    wait_for("the good pipeline's lines", LONG, || {
        agent::count_numbers(&rx.messages(), "ok").len() == 100
    });
    // every hostile pipeline refused, by name and reason
    for (name, _, reason) in &hostile {
        let n = agent.metric(
            "outrider_agent_pipelines_refused_total",
            &[
                &format!("pipeline=\"{name}\""),
                &format!("reason=\"{reason}\""),
            ],
        );
        assert_eq!(
            n,
            1.0,
            "pipeline {name} refused as {reason}:\n{}",
            agent.metrics()
        );
    }
    // the planted symlinks: each skipped once, also after more scans
    wait_for("the planted symlinks counted", LONG, || {
        agent.metric(
            "outrider_agent_files_refused_total",
            &["pipeline=\"good\"", "reason=\"symlink\""],
        ) == 3.0
    });
    std::thread::sleep(Duration::from_secs(1)); // a few more scans (200 ms each)
    assert_eq!(
        agent.metric(
            "outrider_agent_files_refused_total",
            &["pipeline=\"good\"", "reason=\"symlink\""],
        ),
        3.0,
        "each symlink counted once"
    );
    let log = agent.log_text();
    assert!(
        log.contains("symlink on the way, not followed"),
        "a refused file is logged with its reason:\n{log}"
    );

    let messages = rx.messages();
    let leaked: Vec<&String> = messages
        .iter()
        .filter(|m| m.contains(FORBIDDEN) || m.contains("root:") || m.contains("PATH="))
        .collect();
    assert!(
        leaked.is_empty(),
        "shipped from outside the root: {leaked:?}"
    );
    assert_eq!(
        messages.len(),
        100,
        "only the good pipeline's lines: {messages:?}"
    );
}

#[test]
fn a_file_output_outside_the_output_directory_is_refused_and_others_keep_shipping() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rx = Receiver::start();
    let logs = d.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let good = write_pipeline(d, "good", &[format!("{}/*.log", logs.display())], &rx);
    let escape = d.join("escape.yaml");
    std::fs::write(
        &escape,
        pipeline_yaml(
            "escape",
            &format!("{{name: app, paths: [\"{}/*.log\"]}}", logs.display()),
            "{name: f, file: {path: \"/tmp/outrider-escape/../../etc/cron.d/x\"}}",
            "",
        ),
    )
    .unwrap();
    let outside = d.join("outside.yaml");
    std::fs::write(
        &outside,
        pipeline_yaml(
            "outside",
            &format!("{{name: app, paths: [\"{}/*.log\"]}}", logs.display()),
            "{name: f, file: {path: \"/etc/outrider-test-never.ndjson\"}}",
            "",
        ),
    )
    .unwrap();
    let out_dir = d.join("out");
    let agent = Agent::start(
        d,
        &[
            "--pipeline",
            &good,
            "--pipeline",
            escape.to_str().unwrap(),
            "--pipeline",
            outside.to_str().unwrap(),
            "--state-dir",
            d.join("state").to_str().unwrap(),
            "--file-output-dir",
            out_dir.to_str().unwrap(),
        ],
    );
    append_numbered(&logs.join("app.log"), "ok", 0..10);
    wait_for("the good pipeline's lines", LONG, || {
        agent::count_numbers(&rx.messages(), "ok").len() == 10
    });
    for (name, reason) in [
        ("escape", "parent_component"),
        ("outside", "outside_allowed_roots"),
    ] {
        let n = agent.metric(
            "outrider_agent_pipelines_refused_total",
            &[
                &format!("pipeline=\"{name}\""),
                &format!("reason=\"{reason}\""),
            ],
        );
        assert_eq!(
            n,
            1.0,
            "file output of {name} refused as {reason}:\n{}",
            agent.metrics()
        );
    }
    assert!(!Path::new("/etc/outrider-test-never.ndjson").exists());
    assert!(!Path::new("/tmp/outrider-escape").exists());
}

#[test]
fn a_missing_secret_or_a_secret_ref_of_dotdot_stops_only_its_own_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rx = Receiver::start();
    let logs = d.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    // another tenant's credentials, one level up from where `..` would lead
    let other = d.join("secrets/other/creds");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("token"), "other-tenant-token").unwrap();
    let good = write_pipeline(d, "good", &[format!("{}/*.log", logs.display())], &rx);
    let with_secret = |name: &str, secret: &str| {
        let path = d.join(format!("{name}.yaml"));
        let yaml = pipeline_yaml(
            name,
            &format!("{{name: app, paths: [\"{}/*.log\"]}}", logs.display()),
            &format!(
                "{{name: rx, http: {{url: \"{}/ingest\", secretRef: {{name: \"{secret}\"}}}}}}",
                rx.url()
            ),
            "",
        );
        std::fs::write(&path, yaml).unwrap();
        path.display().to_string()
    };
    let missing = with_secret("missing", "nope");
    // `<secret-dir>/test/../other/creds`: another tenant's token, if names were joined unchecked
    let dotdot = with_secret("dotdot", "../other/creds");
    let agent = Agent::start(
        d,
        &[
            "--pipeline",
            &good,
            "--pipeline",
            &missing,
            "--pipeline",
            &dotdot,
            "--state-dir",
            d.join("state").to_str().unwrap(),
            "--secret-dir",
            d.join("secrets").to_str().unwrap(),
        ],
    );
    append_numbered(&logs.join("app.log"), "ok", 0..50);
    wait_for("the good pipeline's lines", LONG, || {
        agent::count_numbers(&rx.messages(), "ok").len() == 50
    });
    for name in ["missing", "dotdot"] {
        let n = agent.metric(
            "outrider_agent_pipelines_refused_total",
            &[&format!("pipeline=\"{name}\""), "reason=\"secret\""],
        );
        // counted at each retry (a Secret may be mounted later)
        assert!(
            n >= 1.0,
            "{name} refused for its Secret:\n{}",
            agent.metrics()
        );
    }
    let log = agent.log_text();
    assert!(
        log.contains("is not a DNS-1123 subdomain"),
        "the `..` reference is named as such:\n{log}"
    );
    assert_eq!(rx.messages().len(), 50, "only the good pipeline shipped");
    assert_eq!(
        rx.with(|s| s.records.len()),
        50,
        "the refused pipelines sent nothing (the `..` one would ship with the other tenant's token)"
    );
}

#[test]
fn a_pipeline_whose_secret_is_mounted_later_starts_then_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rx = Receiver::start();
    let logs = d.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let lp = d.join("late.yaml");
    std::fs::write(
        &lp,
        pipeline_yaml(
            "late",
            &format!("{{name: app, paths: [\"{}/*.log\"]}}", logs.display()),
            &format!(
                "{{name: rx, http: {{url: \"{}/ingest\", secretRef: {{name: creds}}, insecureAllowHttpCredentials: true}}}}",
                rx.url()
            ),
            "  delivery: {batch: {maxWait: 50ms}}\n",
        ),
    )
    .unwrap();
    let agent = Agent::start(
        d,
        &[
            "--pipeline",
            lp.to_str().unwrap(),
            "--state-dir",
            d.join("state").to_str().unwrap(),
            "--secret-dir",
            d.join("secrets").to_str().unwrap(),
        ],
    );
    append_numbered(&logs.join("app.log"), "ok", 0..20);
    wait_for("the missing Secret reported", LONG, || {
        agent.metric(
            "outrider_agent_pipelines_refused_total",
            &["pipeline=\"late\"", "reason=\"secret\""],
        ) >= 1.0
    });
    assert_eq!(rx.record_count(), 0);
    // the kubelet mounts the Secret a little later
    let creds = d.join("secrets/test/creds");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::write(creds.join("token"), "late-token").unwrap();
    wait_for("the pipeline started on a retry and shipped", LONG, || {
        agent::count_numbers(&rx.messages(), "ok").len() == 20
    });
    assert!(
        agent
            .log_text()
            .contains("pipeline started after earlier failures")
    );
}
