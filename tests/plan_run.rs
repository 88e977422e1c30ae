//! DeploymentPlans against a real sshd: the engine over a 20-host loopback fleet (budget,
//! rollback, one connection per host), and `outrider plan run` as a user runs it.
//! Run as root (CI is): sshd must switch users.

#[path = "support/sshd.rs"]
mod sshd;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use outrider::api::deployment_plan::DeploymentPlanSpec;
use outrider::engine::plan::{
    self, Control, FailureReason, HostState, Phase, ResumeState, RollbackState, SshRunner,
};
use outrider::resolve::{deployment_plan as resolve_plan, inventory as resolve_inv};
use outrider::ssh::{ClientConfig, Credentials, Endpoint, Fleet};
use tokio::sync::{mpsc, watch};

/// Appends `$STAGE <address>` to `$DIR/<address>` and to `$DIR/all.log` (small O_APPEND
/// writes do not interleave), then fails when the host's address is in `$FAIL`.
const RECORD: &str = r#"h=$(echo "$SSH_CONNECTION" | cut -d' ' -f3)
echo "$STAGE $h" >> "$DIR/$h"
echo "$STAGE $h" >> "$DIR/all.log"
case " $FAIL " in *" $h "*) echo "broken on $h" >&2; exit 1;; esac
exit 0"#;

fn plan_yaml(dir: &Path, fail: &str, batch: &str, budget: &str) -> String {
    let env = |stage: &str| {
        format!(
            "{{STAGE: {stage}, DIR: {:?}, FAIL: {fail:?}}}",
            dir.display().to_string()
        )
    };
    let script = RECORD.replace('\n', "\\n").replace('"', "\\\"");
    format!(
        r#"
apiVersion: outrider.dev/v1alpha1
kind: DeploymentPlan
metadata: {{name: shop}}
spec:
  targets: {{inventoryRef: {{name: fleet}}}}
  strategy: {{batchSize: {batch}, maxParallel: 5, maxUnavailable: {budget}}}
  stages:
    - {{name: pre, script: "{script}", env: {pre}, timeout: 30s}}
    - {{name: rollout, script: "{script}", env: {rollout}, timeout: 30s}}
    - {{name: verify, command: [sh, -c, "h=$(echo $SSH_CONNECTION | cut -d' ' -f3); echo \"$STAGE $h\" >> \"$DIR/$h\"; echo \"$STAGE $h\" >> \"$DIR/all.log\""], env: {verify}, timeout: 30s}}
  rollback:
    - {{name: undo, script: "{script_ok}", env: {undo}, timeout: 30s}}
"#,
        pre = env("pre").replace(&format!("FAIL: {fail:?}"), "FAIL: \"\""),
        rollout = env("rollout"),
        verify = env("verify"),
        undo = env("undo").replace(&format!("FAIL: {fail:?}"), "FAIL: \"\""),
        script_ok = script,
    )
}

/// `(stage, address)` lines of `all.log`, in the order they were written.
fn all_log(dir: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(dir.join("all.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(s, h)| (s.to_string(), h.to_string()))
        .collect()
}

fn hosts_with(log: &[(String, String)], stage: &str) -> Vec<String> {
    let mut v: Vec<String> = log
        .iter()
        .filter(|(s, _)| s == stage)
        .map(|(_, h)| h.clone())
        .collect();
    v.sort();
    v.dedup();
    v
}

/// sshd's `Connection from … on <addr> port <port>` lines for `addr`.
fn connections(log: &str, addr: &str, port: u16) -> usize {
    let needle = format!(" on {addr} port {port}");
    log.lines()
        .filter(|l| l.contains("Connection from") && l.contains(&needle))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_hosts_two_failures_exceed_the_budget_and_roll_back_exactly_the_started_hosts() {
    let server = sshd::Sshd::start();
    let keys = tempfile::tempdir().expect("tempdir");
    let (private_key, public_key) = sshd::user_key(keys.path(), "ed25519", None, "openssh");
    server.authorize("root", &public_key);
    let addrs: Vec<String> = (1..=20).map(|i| format!("127.0.40.{i}")).collect();
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let credentials =
        Credentials::new(&private_key, None, &server.known_hosts_for(&refs)).expect("credentials");
    let fleet = Fleet::new(ClientConfig::new("root"), credentials);
    let hosts: Vec<Endpoint> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| Endpoint::new(format!("h{:02}", i + 1), a.clone(), server.port))
        .collect();

    // batch 2 (hosts 6..10) holds both failures: batch 1 is rolled back too, batches 3-4 never start
    let work = tempfile::tempdir().expect("tempdir");
    let yaml = plan_yaml(work.path(), "127.0.40.7 127.0.40.9", "5", "1");
    let doc: serde_yaml::Value = serde_yaml::from_str(&yaml).expect("yaml");
    let spec: DeploymentPlanSpec = serde_yaml::from_value(doc["spec"].clone()).expect("plan spec");
    let spec = resolve_plan::plan_spec(&spec).expect("engine spec");

    let runner = SshRunner::new(fleet);
    let (_control, control_rx) = watch::channel(Control::Run);
    let (events_tx, mut events_rx) = mpsc::channel(10_000);
    let outcome = plan::run_plan(
        &spec,
        hosts,
        &runner,
        ResumeState::default(),
        control_rx,
        events_tx,
    )
    .await;
    let mut state = ResumeState::default();
    while let Ok(e) = events_rx.try_recv() {
        state.record(&e);
    }
    let sshd_log = server.log();

    assert_eq!(
        outcome.phase,
        Phase::RolledBack,
        "{outcome:#?}\nsshd log:\n{sshd_log}"
    );
    let mut failures: Vec<_> = outcome
        .failures
        .iter()
        .map(|f| {
            (
                f.host.as_str(),
                f.stage.as_str(),
                f.failure.reason,
                f.failure.exit_code,
            )
        })
        .collect();
    failures.sort_by_key(|f| f.0);
    assert_eq!(
        failures,
        vec![
            ("h07", "rollout", FailureReason::NonZeroExit, Some(1)),
            ("h09", "rollout", FailureReason::NonZeroExit, Some(1)),
        ]
    );
    assert!(
        outcome.failures[0]
            .failure
            .output_tail
            .contains("broken on 127.0.40.")
    );
    assert_eq!((outcome.failed, outcome.allowed_failures), (2, 1));

    let log = all_log(work.path());
    let started = hosts_with(&log, "pre");
    let mut first_two_batches: Vec<String> = addrs[..10].to_vec();
    first_two_batches.sort();
    assert_eq!(
        started, first_two_batches,
        "no host of batch 3 or 4 started"
    );
    assert_eq!(hosts_with(&log, "undo"), started, "rolled back = started");
    // reverse batch order: every batch-2 rollback is written before any batch-1 rollback
    let undo_batches: Vec<usize> = log
        .iter()
        .filter(|(s, _)| s == "undo")
        .map(|(_, h)| usize::from(addrs.iter().position(|a| a == h).unwrap_or(99) >= 5))
        .collect();
    assert!(
        undo_batches.windows(2).all(|w| w[0] >= w[1]),
        "{undo_batches:?}"
    );
    // per-host files: a failed host stopped at rollout, then was rolled back
    let h7 = std::fs::read_to_string(work.path().join("127.0.40.7")).expect("h07 file");
    assert_eq!(h7, "pre 127.0.40.7\nrollout 127.0.40.7\nundo 127.0.40.7\n");
    for (i, h) in outcome.hosts.iter().enumerate() {
        let expect = if i < 10 {
            RollbackState::Succeeded
        } else {
            RollbackState::NotRun
        };
        assert_eq!(h.rollback, expect, "{}", h.name);
        if i >= 10 {
            assert_eq!(h.state, HostState::Pending, "{}", h.name);
        }
    }
    assert!(state.budget_exceeded);
    assert_eq!(state.failed.to_string(), "6,8");
    assert_eq!(state.rolled_back.to_string(), "0-9");

    // one SSH connection per host for all its stages and its rollback; none for later batches
    for (i, addr) in addrs.iter().enumerate() {
        let want = usize::from(i < 10);
        assert_eq!(
            connections(&sshd_log, addr, server.port),
            want,
            "connections to {addr}\n{sshd_log}"
        );
    }
}

struct CliSetup {
    server: sshd::Sshd,
    dir: tempfile::TempDir,
    secret: std::path::PathBuf,
    inventory: std::path::PathBuf,
}

fn cli_setup(n: usize) -> CliSetup {
    let server = sshd::Sshd::start();
    let dir = tempfile::tempdir().expect("tmp");
    let (private, public) = sshd::user_key(dir.path(), "ed25519", None, "openssh");
    server.authorize("root", &public);
    let secret = dir.path().join("secret");
    std::fs::create_dir(&secret).expect("mkdir");
    std::fs::write(secret.join("ssh-privatekey"), &private).expect("key");
    let addrs: Vec<String> = (1..=n).map(|i| format!("127.0.41.{i}")).collect();
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    std::fs::write(secret.join("known_hosts"), server.known_hosts_for(&refs)).expect("kh");
    let mut inv = format!(
        "apiVersion: outrider.dev/v1alpha1\nkind: Inventory\nmetadata: {{name: fleet}}\nspec:\n  ssh: {{user: root, port: {}, secretRef: {{name: s}}, connectTimeout: 5s}}\n  hosts:\n",
        server.port
    );
    for (i, a) in addrs.iter().enumerate() {
        inv.push_str(&format!("    - {{name: web-{}, address: {a}}}\n", i + 1));
    }
    let inventory = dir.path().join("inv.yaml");
    std::fs::write(&inventory, inv).expect("inventory");
    CliSetup {
        server,
        dir,
        secret,
        inventory,
    }
}

impl CliSetup {
    fn run(&self, plan: &str) -> (Option<i32>, String, String) {
        let path = self.dir.path().join("plan.yaml");
        std::fs::write(&path, plan).expect("plan");
        let out = Command::new(env!("CARGO_BIN_EXE_outrider"))
            .args(["plan", "run", "-f"])
            .arg(&path)
            .arg("--inventory")
            .arg(&self.inventory)
            .arg("--secret-dir")
            .arg(&self.secret)
            .output()
            .expect("run outrider plan run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

#[test]
fn plan_run_prints_progress_and_a_host_table_and_exits_by_phase() {
    let s = cli_setup(4);
    let work = tempfile::tempdir().expect("tmp");

    let (code, stdout, stderr) = s.run(&plan_yaml(work.path(), "", "2", "0"));
    assert_eq!(code, Some(0), "{stdout}{stderr}\n{}", s.server.log());
    assert!(
        stdout.contains("[batch 1/2] web-1 rollout ok (attempt 1, "),
        "{stdout}"
    );
    assert!(
        stdout.contains("phase: Succeeded (4/4 hosts succeeded"),
        "{stdout}"
    );

    let work = tempfile::tempdir().expect("tmp");
    let (code, stdout, stderr) = s.run(&plan_yaml(work.path(), "127.0.41.3", "2", "0"));
    println!("{stdout}"); // shown with --nocapture: what a user sees
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("web-3 rollout FAILED: NonZeroExit, exit code 1"),
        "{stdout}"
    );
    assert!(stdout.contains("failure budget exceeded"), "{stdout}");
    let row = stdout
        .lines()
        .find(|l| l.starts_with("web-3 "))
        .expect("table row for web-3");
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cells,
        [
            "web-3",
            "FAILED",
            "rollout",
            "NonZeroExit",
            "1",
            "rolled",
            "back"
        ],
        "{stdout}"
    );
    assert!(stdout.contains("broken on 127.0.41.3"), "{stdout}");
    assert!(stdout.contains("phase: RolledBack"), "{stdout}");
    let rolled: BTreeMap<String, usize> = all_log(work.path())
        .into_iter()
        .filter(|(st, _)| st == "undo")
        .fold(BTreeMap::new(), |mut m, (_, h)| {
            *m.entry(h).or_default() += 1;
            m
        });
    assert_eq!(
        rolled.keys().cloned().collect::<Vec<_>>(),
        ["127.0.41.1", "127.0.41.2", "127.0.41.3", "127.0.41.4"]
    );
}

#[test]
fn plan_run_rejects_job_stages_and_a_foreign_inventory_before_connecting() {
    let s = cli_setup(1);
    let job = r#"
apiVersion: outrider.dev/v1alpha1
kind: DeploymentPlan
metadata: {name: p}
spec:
  targets: {inventoryRef: {name: fleet}}
  stages:
    - {name: migrate, runOnce: true, job: {template: {spec: {containers: [{name: m, image: x}]}}}}
"#;
    let (code, _, stderr) = s.run(job);
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("stage \"migrate\" is a Job stage"),
        "{stderr}"
    );
    let (code, _, stderr) = s.run(&job.replace("name: fleet", "name: other"));
    assert_ne!(code, Some(0));
    assert!(stderr.contains("targets Inventory \"other\""), "{stderr}");
    assert_eq!(connections(&s.server.log(), "127.0.41.1", s.server.port), 0);
}

/// One per host: succeeds on the 2nd attempt / exits 3 / outlives its timeout / dies by a
/// signal; plus a host nothing listens for.
const OUTCOMES: &str = r#"h=$(echo "$SSH_CONNECTION" | cut -d' ' -f3)
echo "$h" >> "$DIR/attempts"
case $h in
  127.0.42.1) if [ -e "$DIR/once" ]; then exit 0; fi; touch "$DIR/once"; echo flaky >&2; exit 4;;
  127.0.42.2) echo "config is bad" >&2; exit 3;;
  127.0.42.3) echo started; sleep 30;;
  127.0.42.4) exec sh -c 'kill -TERM $$';;
esac"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_stages_keep_unreachable_timed_out_and_non_zero_exit_apart_and_retry_on_one_connection()
{
    let server = sshd::Sshd::start();
    let keys = tempfile::tempdir().expect("tempdir");
    let (private_key, public_key) = sshd::user_key(keys.path(), "ed25519", None, "openssh");
    server.authorize("root", &public_key);
    let addrs = ["127.0.42.1", "127.0.42.2", "127.0.42.3", "127.0.42.4"];
    let credentials =
        Credentials::new(&private_key, None, &server.known_hosts_for(&addrs)).expect("credentials");
    let mut config = ClientConfig::new("root");
    config.connect_timeout = std::time::Duration::from_secs(5);
    let runner = SshRunner::new(Fleet::new(config, credentials));
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut hosts: Vec<Endpoint> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| Endpoint::new(format!("h{}", i + 1), *a, server.port))
        .collect();
    hosts.push(Endpoint::new("down", "127.0.0.1", closed));

    let work = tempfile::tempdir().expect("tempdir");
    let mut spec = plan::PlanSpec::new(vec![plan::StageSpec {
        name: "rollout".into(),
        action: plan::StageAction::Script(OUTCOMES.into()),
        env: BTreeMap::from([("DIR".into(), work.path().display().to_string())]),
        secret_env: Vec::new(),
        // generous: a loaded machine (root's shell runs pyenv init per command here) must not
        // turn the hosts that answer into timeouts; the sleeping host still times out
        timeout: std::time::Duration::from_secs(5),
        retries: 1,
        run_once: false,
    }]);
    spec.batch_size = plan::Amount::Percent(100);
    spec.max_unavailable = plan::Amount::Count(4);
    spec.backoff.base = std::time::Duration::from_millis(10);
    let (_control, control_rx) = watch::channel(Control::Run);
    let (events_tx, _events_rx) = mpsc::channel(10_000);
    let outcome = plan::run_plan(
        &spec,
        hosts,
        &runner,
        ResumeState::default(),
        control_rx,
        events_tx,
    )
    .await;
    let sshd_log = server.log();

    assert_eq!(
        outcome.phase,
        Phase::Succeeded,
        "4 failures are within the budget"
    );
    assert_eq!(outcome.hosts[0].state, HostState::Succeeded);
    let f = |i: usize| {
        let f = outcome.hosts[i]
            .failure
            .as_ref()
            .unwrap_or_else(|| panic!("host {i} failed: {outcome:#?}"));
        (
            f.failure.reason,
            f.failure.exit_code,
            f.failure.signal.clone(),
            f.attempts,
        )
    };
    assert_eq!(f(1), (FailureReason::NonZeroExit, Some(3), None, 2));
    assert_eq!(f(2), (FailureReason::TimedOut, None, None, 2));
    assert_eq!(
        f(3),
        (FailureReason::NonZeroExit, None, Some("TERM".into()), 2),
        "killed by a signal: no exit code"
    );
    assert_eq!(f(4), (FailureReason::Unreachable, None, None, 1));
    let tail = |i: usize| {
        outcome.hosts[i]
            .failure
            .as_ref()
            .map(|f| f.failure.output_tail.clone())
            .unwrap_or_default()
    };
    assert!(tail(1).contains("config is bad"), "{}", tail(1));
    assert!(tail(2).contains("started"), "{}", tail(2));
    // retries reuse the host's connection
    let attempts = std::fs::read_to_string(work.path().join("attempts")).expect("attempts");
    assert_eq!(attempts.matches("127.0.42.1").count(), 2, "{attempts}");
    for addr in addrs {
        assert_eq!(
            connections(&sshd_log, addr, server.port),
            1,
            "{addr}\n{sshd_log}"
        );
    }
}

#[test]
fn local_example_is_a_valid_ssh_only_plan_for_its_inventory() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/local");
    let plan: outrider::api::deployment_plan::DeploymentPlan =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("plan.yaml")).expect("plan"))
            .expect("plan.yaml is a DeploymentPlan");
    let inv: outrider::api::inventory::Inventory = serde_yaml::from_str(
        &std::fs::read_to_string(dir.join("inventory.yaml")).expect("inventory"),
    )
    .expect("inventory.yaml is an Inventory");
    assert_eq!(
        Some(plan.spec.targets.inventory_ref.name.as_str()),
        inv.metadata.name.as_deref()
    );
    let spec = resolve_plan::plan_spec(&plan.spec).expect("valid plan");
    assert!(
        spec.stages
            .iter()
            .chain(&spec.rollback)
            .all(|s| !matches!(s.action, plan::StageAction::Job(_)))
    );
    let hosts = resolve_inv::endpoints(&inv, plan.spec.targets.selector.as_ref()).expect("hosts");
    // the demo fleet (e2e/fleet.sh): its two web hosts, not db-1
    let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["web-1", "web-2"]);
}

/// A runner logged in as the unprivileged test user, and one host of `server` at `addr`.
fn nosudo_runner(server: &sshd::Sshd, addr: &str, keys: &Path) -> (SshRunner, Endpoint) {
    let (private_key, public_key) = sshd::user_key(keys, "ed25519", None, "openssh");
    server.authorize("outrider-nosudo", &public_key);
    let credentials = Credentials::new(&private_key, None, &server.known_hosts_for(&[addr]))
        .expect("credentials");
    let runner = SshRunner::new(Fleet::new(
        ClientConfig::new("outrider-nosudo"),
        credentials,
    ));
    (runner, Endpoint::new("h1", addr, server.port))
}

fn script_stage(name: &str, script: &str, dir: &Path, timeout_secs: u64) -> plan::StageSpec {
    plan::StageSpec {
        name: name.into(),
        action: plan::StageAction::Script(script.into()),
        env: BTreeMap::from([("DIR".into(), dir.display().to_string())]),
        secret_env: Vec::new(),
        timeout: std::time::Duration::from_secs(timeout_secs),
        retries: 0,
        run_once: false,
    }
}

async fn run_one(runner: &SshRunner, stage: plan::StageSpec, host: Endpoint) -> plan::PlanOutcome {
    let (_control, control_rx) = watch::channel(Control::Run);
    let (events_tx, mut events_rx) = mpsc::channel(10_000);
    let drain = async { while events_rx.recv().await.is_some() {} };
    let spec = plan::PlanSpec::new(vec![stage]);
    let (outcome, ()) = tokio::join!(
        plan::run_plan(
            &spec,
            vec![host],
            runner,
            ResumeState::default(),
            control_rx,
            events_tx
        ),
        drain
    );
    outcome
}

/// Processes whose command line is exactly `sleep <secs>` (a duration no one else uses).
fn sleepers(secs: u32) -> Vec<u32> {
    let want = format!("sleep\0{secs}\0");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if std::fs::read(entry.path().join("cmdline")).is_ok_and(|c| c == want.as_bytes()) {
            found.push(pid);
        }
    }
    found
}

async fn until_no_sleepers(secs: u32, within: std::time::Duration) -> Vec<u32> {
    let end = std::time::Instant::now() + within;
    loop {
        let left = sleepers(secs);
        if left.is_empty() || std::time::Instant::now() > end {
            return left;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_that_outlives_its_timeout_leaves_no_process_behind_on_the_host() {
    let server = sshd::Sshd::start();
    let keys = tempfile::tempdir().expect("tempdir");
    let (runner, host) = nosudo_runner(&server, "127.0.43.1", keys.path());
    let work = tempfile::tempdir().expect("tempdir");
    let secs = 4000 + std::process::id() % 1000;
    // a background child and a foreground one, both far past the 2 s timeout
    let script = format!("sleep {secs} &\necho started\nsleep {secs}\n");
    let outcome = run_one(&runner, script_stage("hang", &script, work.path(), 2), host).await;
    let failure = outcome.hosts[0]
        .failure
        .as_ref()
        .unwrap_or_else(|| panic!("{outcome:#?}"));
    assert_eq!(
        failure.failure.reason,
        FailureReason::TimedOut,
        "{failure:#?}"
    );
    assert!(
        failure.failure.output_tail.contains("started"),
        "the output before the kill is kept: {failure:#?}"
    );
    let left = until_no_sleepers(secs, std::time::Duration::from_secs(5)).await;
    assert!(
        left.is_empty(),
        "processes of the timed-out stage still run on the host: {left:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_run_kills_its_stage_on_the_host() {
    let server = sshd::Sshd::start();
    let keys = tempfile::tempdir().expect("tempdir");
    let (runner, host) = nosudo_runner(&server, "127.0.43.2", keys.path());
    let work = tempfile::tempdir().expect("tempdir");
    let secs = 5000 + std::process::id() % 1000;
    let script = format!("sleep {secs} &\nsleep {secs}\n");
    let stage = script_stage("long", &script, work.path(), 600);
    // the plan is deleted mid-stage: the controller drops the run
    let cancelled = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        run_one(&runner, stage, host),
    )
    .await;
    assert!(
        cancelled.is_err(),
        "the stage ended by itself: {cancelled:?}"
    );
    assert!(
        !sleepers(secs).is_empty(),
        "the stage was running when the run was dropped"
    );
    let left = until_no_sleepers(secs, std::time::Duration::from_secs(10)).await;
    assert!(
        left.is_empty(),
        "processes of the cancelled stage still run on the host: {left:?}"
    );
}

/// `(start, end)` pairs of seconds-since-epoch lines `start <t>` / `end <t>` in `path`.
fn intervals(path: &Path) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut starts = Vec::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let (what, t) = line.split_once(' ').expect("a start or end line");
        let t: f64 = t.parse().expect("a time");
        match what {
            "start" => starts.push(t),
            _ => out.push((starts.remove(0), t)),
        }
    }
    out
}

fn overlap(v: &[(f64, f64)]) -> bool {
    v.iter()
        .enumerate()
        .any(|(i, a)| v[i + 1..].iter().any(|b| a.0 < b.1 && b.0 < a.1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_attempts_of_one_stage_of_one_run_never_overlap_on_a_host() {
    let server = sshd::Sshd::start();
    let keys = tempfile::tempdir().expect("tempdir");
    let work = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    const TIMED: &str = "echo \"start $(date +%s.%N)\" >> \"$DIR/$LOG\"\nsleep 1.5\necho \"end $(date +%s.%N)\" >> \"$DIR/$LOG\"\n";
    let stage = |log: &str| {
        let mut s = script_stage("deploy", TIMED, work.path(), 30);
        s.env.insert("LOG".into(), log.into());
        s
    };
    let addr = "127.0.43.3";
    // one run resumed by another replica: the same lock scope on both runners
    let (first, host) = nosudo_runner(&server, addr, keys.path());
    let (second, _) = nosudo_runner(&server, addr, keys.path());
    let (first, second) = (
        first.with_lock_scope("ns/uid/1"),
        second.with_lock_scope("ns/uid/1"),
    );
    let (a, b) = tokio::join!(run_one(&first, stage("same.log"), host.clone()), async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        run_one(&second, stage("same.log"), host.clone()).await
    });
    assert_eq!(
        (a.phase, b.phase),
        (Phase::Succeeded, Phase::Succeeded),
        "{a:#?} {b:#?}"
    );
    let same = intervals(&work.path().join("same.log"));
    assert_eq!(same.len(), 2, "{same:?}");
    assert!(
        !overlap(&same),
        "two attempts of one stage ran at once: {same:?}"
    );

    // the control: different runs are not serialised, so the check above can see overlap
    let (other, _) = nosudo_runner(&server, addr, keys.path());
    let other = other.with_lock_scope("ns/uid/2");
    let (a, b) = tokio::join!(run_one(&first, stage("diff.log"), host.clone()), async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        run_one(&other, stage("diff.log"), host.clone()).await
    });
    assert_eq!((a.phase, b.phase), (Phase::Succeeded, Phase::Succeeded));
    let diff = intervals(&work.path().join("diff.log"));
    assert!(
        overlap(&diff),
        "stages of different runs ran one after the other: {diff:?}"
    );
}
