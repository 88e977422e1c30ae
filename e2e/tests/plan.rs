//! The DeploymentPlan controller against the real API server and the shared test sshd:
//! runs, counts, reruns, resuming after a killed controller, missing references, and the
//! failure budget with rollback.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::ListParams;
use outrider::api::deployment_plan::{DeploymentPlan, PlanPhase};

use crate::support::*;

/// A plan over Inventory `fleet` whose stages are the given YAML list items.
fn plan_yaml(name: &str, ns: &str, strategy: &str, stages: &str, rollback: &str) -> String {
    format!(
        "apiVersion: outrider.dev/v1alpha1\nkind: DeploymentPlan\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  targets: {{inventoryRef: {{name: fleet}}}}\n  strategy: {strategy}\n  stages:\n{stages}{rollback}"
    )
}

/// A script stage that appends the host's address to `<dir>/<file>`.
fn append_stage(name: &str, dir: &Path, file: &str, pre: &str) -> String {
    format!(
        "    - name: {name}\n      env: {{OUT: \"{}\"}}\n      script: |\n        {pre}\n        echo \"$(echo $SSH_CONNECTION | cut -d' ' -f3)\" >> \"$OUT/{file}\"\n      timeout: 60s\n",
        dir.display()
    )
}

fn phase(dp: &DeploymentPlan) -> Option<PlanPhase> {
    dp.status.as_ref()?.phase
}

async fn wait_phase(api: &Api<DeploymentPlan>, name: &str, want: PlanPhase) -> DeploymentPlan {
    eventually(
        Duration::from_secs(120),
        &format!("{name} phase {want:?}"),
        || async {
            let dp = api.get_opt(name).await.ok().flatten()?;
            (phase(&dp) == Some(want)).then_some(dp)
        },
    )
    .await
}

fn ready(dp: &DeploymentPlan) -> Option<(String, String)> {
    let c = dp
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")?;
    Some((c.status.clone(), c.reason.clone()))
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn tally(path: &Path) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for l in lines(path) {
        *m.entry(l).or_insert(0) += 1;
    }
    m
}

fn setup(ns: &str, hosts: usize) {
    let kc = kubeconfig();
    apply(&kc, &secret_yaml("fleet-ssh", ns));
    apply(&kc, &inventory_yaml("fleet", ns, "fleet-ssh", hosts));
}

fn out_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    // the stages run as the unprivileged test user
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    dir
}

#[tokio::test]
async fn ssh_plan_runs_to_completion_with_correct_counts() {
    let kc = kubeconfig();
    let ns = namespace("dp-counts");
    let controller = ControllerProcess::start(&ns, "outrider", "solo", &[]);
    let api: Api<DeploymentPlan> = Api::namespaced(client().await, &ns);
    setup(&ns, 6);
    let dir = out_dir();
    let stages = [
        append_stage("pre-check", dir.path(), "a.log", "true"),
        append_stage("rollout", dir.path(), "b.log", "true"),
        append_stage("verify", dir.path(), "c.log", "true"),
    ]
    .concat();
    apply(
        &kc,
        &plan_yaml(
            "rollout",
            &ns,
            "{batchSize: 2, maxParallel: 2}",
            &stages,
            "",
        ),
    );
    let dp = wait_phase(&api, "rollout", PlanPhase::Succeeded).await;
    // every write the controller made is recorded under its own name: the finalizer too
    let managers: Vec<(String, String, String)> = dp
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .map(|m| {
            (
                m.manager.clone().unwrap_or_default(),
                m.operation.clone().unwrap_or_default(),
                serde_json::to_string(&m.fields_v1).unwrap_or_default(),
            )
        })
        .collect();
    assert!(
        managers
            .iter()
            .any(|(who, _, fields)| who == "outrider" && fields.contains("f:finalizers")),
        "the finalizer is written as outrider: {managers:?}"
    );
    assert!(
        managers
            .iter()
            .all(|(who, _, _)| who != "unknown" && !who.is_empty()),
        "{managers:?}"
    );
    let status = dp.status.clone().expect("status");
    assert_eq!(status.observed_generation, dp.metadata.generation);
    assert_eq!(status.run.as_deref(), Some("1"));
    let hosts = status.hosts.expect("hosts");
    assert_eq!(
        (
            hosts.total,
            hosts.succeeded,
            hosts.failed,
            hosts.running,
            hosts.pending
        ),
        (6, 6, 0, 0, 0)
    );
    let batch = status.batch.expect("batch");
    assert_eq!((batch.current, batch.total), (3, 3));
    let counts: Vec<(String, u32, u32)> = status
        .stages
        .iter()
        .map(|s| (s.name.clone(), s.succeeded, s.failed))
        .collect();
    assert_eq!(
        counts,
        vec![
            ("pre-check".into(), 6, 0),
            ("rollout".into(), 6, 0),
            ("verify".into(), 6, 0)
        ]
    );
    assert!(status.failures.is_empty());
    assert!(status.started_at.is_some() && status.finished_at.is_some());
    assert_eq!(ready(&dp), Some(("True".into(), "Succeeded".into())));
    for f in ["a.log", "b.log", "c.log"] {
        let t = tally(&dir.path().join(f));
        assert_eq!(t.len(), 6, "{f}: {t:?}");
        assert!(t.values().all(|&n| n == 1), "{f}: {t:?}");
    }

    let out = kubectl(&kc, &["get", "dp", "rollout", "-n", &ns]);
    let text = stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(text.contains("Succeeded"), "{text}");
    assert!(text.contains("PHASE"), "{text}");

    // a finished run does nothing more when reconciled again: an annotation change (not the
    // rerun one) reconciles it — the positive marker — and no status is written
    let url = controller.metrics_url();
    let before = eventually(Duration::from_secs(10), "metrics", || http_get(&url)).await;
    let reconciles = r#"outrider_reconciles_total{kind="DeploymentPlan"}"#;
    let writes = r#"outrider_status_writes_total{kind="DeploymentPlan"}"#;
    let out = kubectl(
        &kc,
        &[
            "annotate",
            "dp",
            "rollout",
            "-n",
            &ns,
            "example.com/touched=1",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let after = eventually(
        Duration::from_secs(30),
        "a reconcile after the annotation",
        || {
            let url = url.clone();
            let before = before.clone();
            async move {
                let m = http_get(&url).await?;
                (metric(&m, reconciles) > metric(&before, reconciles)).then_some(m)
            }
        },
    )
    .await;
    assert_eq!(metric(&after, writes), metric(&before, writes), "{after}");
    let again = api.get("rollout").await.expect("get");
    assert_eq!(
        again.status, dp.status,
        "a finished run's status does not move"
    );

    let metrics = eventually(Duration::from_secs(10), "metrics", || http_get(&url)).await;
    assert!(
        metrics.contains(r#"outrider_plan_runs_total{result="Succeeded"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("outrider_plan_host_stage_duration_seconds_count 18"),
        "{metrics}"
    );
    assert!(
        metrics.contains("outrider_plan_hosts_in_flight 0"),
        "{metrics}"
    );

    let events: Api<Event> = Api::namespaced(client().await, &ns);
    let list = events.list(&ListParams::default()).await.expect("events");
    let reasons: Vec<String> = list.items.iter().filter_map(|e| e.reason.clone()).collect();
    for want in ["RunStarted", "BatchStarted", "Succeeded"] {
        assert!(reasons.iter().any(|r| r == want), "{want} in {reasons:?}");
    }
}

#[tokio::test]
async fn rerun_annotation_starts_a_new_run() {
    let kc = kubeconfig();
    let ns = namespace("dp-rerun");
    let _controller = ControllerProcess::start(&ns, "outrider", "solo", &[]);
    let api: Api<DeploymentPlan> = Api::namespaced(client().await, &ns);
    setup(&ns, 3);
    let dir = out_dir();
    let stage = append_stage("touch", dir.path(), "runs.log", "true");
    apply(
        &kc,
        &plan_yaml("again", &ns, "{batchSize: 100%}", &stage, ""),
    );
    let first = wait_phase(&api, "again", PlanPhase::Succeeded).await;
    assert_eq!(
        first.status.as_ref().and_then(|s| s.run.as_deref()),
        Some("1")
    );

    let out = kubectl(
        &kc,
        &[
            "annotate",
            "dp",
            "again",
            "-n",
            &ns,
            "outrider.dev/rerun=second",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let second = eventually(Duration::from_secs(60), "the rerun to succeed", || async {
        let dp = api.get_opt("again").await.ok().flatten()?;
        let s = dp.status.as_ref()?;
        (s.run.as_deref() == Some("1/second") && s.phase == Some(PlanPhase::Succeeded))
            .then_some(dp)
    })
    .await;
    let status = second.status.expect("status");
    assert_eq!(status.stages[0].succeeded, 3, "counters are per run");
    assert_eq!(status.hosts.map(|h| h.succeeded), Some(3));
    let t = tally(&dir.path().join("runs.log"));
    assert_eq!(t.len(), 3, "{t:?}");
    assert!(t.values().all(|&n| n == 2), "each host ran twice: {t:?}");
}

#[tokio::test]
async fn killed_controller_resumes_without_rerunning_done_hosts() {
    let kc = kubeconfig();
    let ns = namespace("dp-resume");
    let extra = ["--lease-duration", "3"];
    let mut first = ControllerProcess::start(&ns, "outrider", "first", &extra);
    let api: Api<DeploymentPlan> = Api::namespaced(client().await, &ns);
    let hosts = 30;
    setup(&ns, hosts);
    let dir = out_dir();
    let stages = [
        append_stage("slow", dir.path(), "stage1.log", "sleep 0.3"),
        append_stage("after", dir.path(), "stage2.log", "true"),
    ]
    .concat();
    let max_parallel = 3;
    apply(
        &kc,
        &plan_yaml(
            "big",
            &ns,
            &format!("{{batchSize: 100%, maxParallel: {max_parallel}}}"),
            &stages,
            "",
        ),
    );
    eventually(Duration::from_secs(60), "some hosts to succeed", || async {
        let dp = api.get_opt("big").await.ok().flatten()?;
        let h = dp.status.as_ref()?.hosts?;
        (h.succeeded >= 6).then_some(())
    })
    .await;
    first.kill9();
    // what the successor will find: the status as the killed controller left it
    let persisted = api.get("big").await.expect("get");
    let status = persisted.status.clone().expect("status");
    assert_eq!(status.phase, Some(PlanPhase::Running));
    let before = status.hosts.expect("hosts").succeeded;
    assert!(before < hosts as u32, "the run ended before the kill");
    let progress = status.progress.clone().expect("progress");
    let done: Vec<usize> = parse_ranges(progress["state"]["done"].as_str().unwrap_or(""));
    let partial: HashMap<usize, u64> = progress["state"]["partial"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.parse().expect("index"), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();

    let _second = ControllerProcess::start(&ns, "outrider", "second", &extra);
    let dp = wait_phase(&api, "big", PlanPhase::Succeeded).await;
    let status = dp.status.expect("status");
    assert_eq!(status.hosts.map(|h| h.succeeded), Some(hosts as u32));
    assert_eq!(status.run.as_deref(), Some("1"), "the same run resumed");

    let s1 = tally(&dir.path().join("stage1.log"));
    let s2 = tally(&dir.path().join("stage2.log"));
    for i in 0..hosts {
        let addr = host_addr(i);
        let (n1, n2) = (
            s1.get(&addr).copied().unwrap_or(0),
            s2.get(&addr).copied().unwrap_or(0),
        );
        assert!(n1 >= 1 && n2 >= 1, "{addr} did not run every stage");
        assert!(n1 <= 2 && n2 <= 2, "{addr} ran a stage more than twice");
        if done.contains(&i) {
            assert_eq!(
                (n1, n2),
                (1, 1),
                "{addr} was recorded as done, yet ran again"
            );
        }
        if partial.get(&i).is_some_and(|&stages| stages >= 1) {
            assert_eq!(
                n1, 1,
                "{addr} had finished stage 1 per status, yet ran it again"
            );
        }
    }
    let dups: usize = s1.values().chain(s2.values()).map(|n| n - 1).sum();
    // Re-run by design: hosts in flight at the kill, plus stages that finished in the last
    // status-write interval (at most ~250 ms) before the kill and so were never recorded.
    assert!(
        dups <= 2 * max_parallel,
        "{dups} repeated host stages: {s1:?} {s2:?}"
    );
    eprintln!(
        "resume: {before} hosts done before the kill, {} recorded done, {dups} host stages re-run",
        done.len()
    );
    // one run, announced once: the successor says it resumed, not that a run started
    let events: Api<Event> = Api::namespaced(client().await, &ns);
    let list = events.list(&ListParams::default()).await.expect("events");
    let emitted = |reason: &str| -> i32 {
        list.items
            .iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .map(|e| e.series.as_ref().map_or(1, |s| s.count))
            .sum()
    };
    assert_eq!(emitted("RunStarted"), 1, "RunStarted Events");
    assert_eq!(emitted("RunResumed"), 1, "RunResumed Events");
}

#[tokio::test]
async fn a_run_once_stage_is_not_rerun_after_a_kill_as_the_next_stage_starts() {
    let kc = kubeconfig();
    let ns = namespace("dp-once-kill");
    let extra = ["--lease-duration", "3"];
    let mut first = ControllerProcess::start(&ns, "outrider", "first", &extra);
    let api: Api<DeploymentPlan> = Api::namespaced(client().await, &ns);
    setup(&ns, 2);
    let dir = out_dir();
    let started = dir.path().join("after-started");
    let stages = format!(
        "    - name: migrate\n      runOnce: true\n      env: {{OUT: \"{out}\"}}\n      script: echo migrated >> \"$OUT/migrate.log\"\n      timeout: 60s\n    - name: after\n      env: {{OUT: \"{out}\"}}\n      script: |\n        touch \"$OUT/after-started\"\n        sleep 1\n      timeout: 60s\n",
        out = dir.path().display()
    );
    apply(
        &kc,
        &plan_yaml(
            "once",
            &ns,
            "{batchSize: 100%, maxParallel: 2}",
            &stages,
            "",
        ),
    );
    // kill the controller the moment a host starts the stage after the runOnce one: its
    // success must already be in status, or the successor would migrate a second time
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !started.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no host started the stage after the runOnce stage"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.kill9();
    let persisted = api.get("once").await.expect("get");
    let progress = persisted
        .status
        .and_then(|s| s.progress)
        .expect("progress written before the next stage started");
    assert_eq!(
        progress["state"]["runOnceDone"],
        serde_json::json!([0]),
        "the runOnce success is in status: {progress}"
    );

    let _second = ControllerProcess::start(&ns, "outrider", "second", &extra);
    let dp = wait_phase(&api, "once", PlanPhase::Succeeded).await;
    assert_eq!(dp.status.and_then(|s| s.run).as_deref(), Some("1"));
    assert_eq!(
        lines(&dir.path().join("migrate.log")),
        vec!["migrated".to_string()],
        "the runOnce stage ran exactly once across the kill"
    );
}

#[tokio::test]
async fn a_controller_killed_mid_stage_and_resumed_never_runs_two_attempts_at_once() {
    let kc = kubeconfig();
    let ns = namespace("dp-overlap");
    let extra = ["--lease-duration", "3"];
    let mut first = ControllerProcess::start(&ns, "outrider", "first", &extra);
    let api: Api<DeploymentPlan> = Api::namespaced(client().await, &ns);
    setup(&ns, 2);
    let dir = out_dir();
    // long enough that the successor (a 3 s Lease away) would start beside it if it could
    let stages = timed_stage_yaml(dir.path(), 8);
    apply(
        &kc,
        &plan_yaml(
            "slow",
            &ns,
            "{batchSize: 100%, maxParallel: 2}",
            &stages,
            "",
        ),
    );
    let first_host = dir.path().join(host_addr(0));
    eventually(Duration::from_secs(60), "the stage to start", || async {
        first_host.exists().then_some(())
    })
    .await;
    first.kill9();
    let _second = ControllerProcess::start(&ns, "outrider", "second", &extra);
    wait_phase(&api, "slow", PlanPhase::Succeeded).await;
    for i in 0..2 {
        assert_attempts_never_overlap(&host_addr(i), &lines(&dir.path().join(host_addr(i))));
    }
}

fn parse_ranges(s: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (a.parse().expect("range"), b.parse().expect("range"));
        out.extend(a..=b);
    }
    out
}

#[tokio::test]
async fn a_plan_whose_inventory_or_secret_is_missing_is_not_ready_with_a_reason() {
    let kc = kubeconfig();
    let ns = namespace("dp-missing");
    let _controller = ControllerProcess::start(&ns, "outrider", "solo", &[]);
    let client = client().await;
    let api: Api<DeploymentPlan> = Api::namespaced(client.clone(), &ns);
    apply(
        &kc,
        &plan_yaml(
            "waiting",
            &ns,
            "{batchSize: 100%}",
            "    - {name: a, script: \"true\"}\n",
            "",
        ),
    );
    let wait_reason = |reason: &'static str| {
        let api = api.clone();
        async move {
            eventually(
                Duration::from_secs(60),
                &format!("Ready=False/{reason}"),
                || async {
                    let dp = api.get_opt("waiting").await.ok().flatten()?;
                    (ready(&dp) == Some(("False".into(), reason.into()))).then_some(dp)
                },
            )
            .await
        }
    };
    let dp = wait_reason("InventoryNotFound").await;
    assert_eq!(phase(&dp), Some(PlanPhase::Pending));
    let message = &dp.status.as_ref().expect("status").conditions[0].message;
    assert!(message.contains("fleet"), "{message}");
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    eventually(
        Duration::from_secs(30),
        "an InventoryNotFound Warning",
        || async {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some("InventoryNotFound")
                        && e.type_.as_deref() == Some("Warning")
                })
                .then_some(())
        },
    )
    .await;

    apply(&kc, &inventory_yaml("fleet", &ns, "fleet-ssh", 2));
    wait_reason("SecretNotFound").await;
    apply(&kc, &secret_yaml("fleet-ssh", &ns));
    let dp = wait_phase(&api, "waiting", PlanPhase::Succeeded).await;
    assert_eq!(
        dp.status.and_then(|s| s.hosts).map(|h| h.succeeded),
        Some(2)
    );
}

#[tokio::test]
async fn failed_hosts_exceeding_the_budget_roll_back_and_show_in_status() {
    let kc = kubeconfig();
    let ns = namespace("dp-budget");
    let _controller = ControllerProcess::start(&ns, "outrider", "solo", &[]);
    let api: Api<DeploymentPlan> = Api::namespaced(client().await, &ns);
    setup(&ns, 4);
    let dir = out_dir();
    let bad = host_addr(1);
    let stages = format!(
        "    - name: rollout\n      script: |\n        echo deploying\n        if [ \"$(echo $SSH_CONNECTION | cut -d' ' -f3)\" = {bad} ]; then echo broken >&2; exit 3; fi\n"
    );
    let rollback = format!(
        "  rollback:\n{}",
        append_stage("restore", dir.path(), "rollback.log", "true")
    );
    apply(
        &kc,
        &plan_yaml(
            "budget",
            &ns,
            "{batchSize: 2, maxUnavailable: 0}",
            &stages,
            &rollback,
        ),
    );
    let dp = wait_phase(&api, "budget", PlanPhase::RolledBack).await;
    let status = dp.status.clone().expect("status");
    assert_eq!(status.failures.len(), 1, "{:?}", status.failures);
    let f = &status.failures[0];
    assert_eq!(
        (f.host.as_str(), f.stage.as_str(), f.reason.as_str()),
        ("host-1", "rollout", "NonZeroExit")
    );
    assert_eq!(f.exit_code, Some(3));
    assert!(f.output_tail.contains("broken"), "{}", f.output_tail);
    assert_eq!(status.hosts.map(|h| h.failed), Some(1));
    assert_eq!(status.rollback.first().map(|s| s.succeeded), Some(2));
    let failed = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .expect("Failed condition");
    assert_eq!(
        (failed.status.as_str(), failed.reason.as_str()),
        ("True", "RolledBack")
    );
    // only the first batch ran; both its hosts were rolled back
    let t = tally(&dir.path().join("rollback.log"));
    assert_eq!(t.len(), 2, "{t:?}");
}

async fn wait_succeeded_at_least(api: &Api<DeploymentPlan>, name: &str, n: u32) {
    eventually(
        Duration::from_secs(60),
        &format!("{n} hosts of {name} to succeed"),
        || async {
            let dp = api.get_opt(name).await.ok().flatten()?;
            let h = dp.status.as_ref()?.hosts?;
            (h.succeeded >= n).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn pausing_holds_the_run_and_unpausing_finishes_the_same_run() {
    let kc = kubeconfig();
    let ns = namespace("dp-pause");
    let _controller = ControllerProcess::start(&ns, "outrider", "solo", &[]);
    let api: Api<DeploymentPlan> = Api::namespaced(client().await, &ns);
    setup(&ns, 6);
    let dir = out_dir();
    // every attempt records when it started: the positive marker for "nothing started"
    let stage = append_stage(
        "slow",
        dir.path(),
        "runs.log",
        "date +%s%N >> \"$OUT/starts.log\"; sleep 0.4",
    );
    apply(
        &kc,
        &plan_yaml("held", &ns, "{batchSize: 100%, maxParallel: 1}", &stage, ""),
    );
    wait_succeeded_at_least(&api, "held", 1).await;
    let patch = |paused: bool| {
        let out = kubectl(
            &kc,
            &[
                "patch",
                "dp",
                "held",
                "-n",
                &ns,
                "--type=merge",
                "-p",
                &format!("{{\"spec\":{{\"paused\":{paused}}}}}"),
            ],
        );
        assert!(out.status.success(), "{}", stderr(&out));
    };
    patch(true);
    let paused = wait_phase(&api, "held", PlanPhase::Paused).await;
    assert_eq!(ready(&paused), Some(("False".into(), "Paused".into())));
    // the host in flight may finish — including one dispatched just before the pause was
    // seen, which status shows only at its next coalesced write — then nothing moves
    let settled = || async {
        eventually(Duration::from_secs(30), "no host running", || async {
            let dp = api.get_opt("held").await.ok().flatten()?;
            (dp.status.as_ref()?.hosts?.running == 0).then_some(())
        })
        .await;
    };
    settled().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    settled().await;
    let epoch_ns = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos()
    };
    // a window in which nothing may start; checked below against the recorded starts
    let quiet_from = epoch_ns();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = lines(&dir.path().join("runs.log")).len();
    assert!(held < 6, "paused too late: {held} hosts ran");
    let quiet_to = epoch_ns();

    patch(false);
    let dp = wait_phase(&api, "held", PlanPhase::Succeeded).await;
    let starts: Vec<u128> = lines(&dir.path().join("starts.log"))
        .iter()
        .map(|l| l.trim().parse().expect("epoch ns"))
        .collect();
    assert_eq!(starts.len(), 6, "one start per host: {starts:?}");
    assert!(
        starts.iter().any(|t| *t > quiet_to),
        "hosts started after the unpause: {starts:?}"
    );
    assert!(
        starts.iter().all(|t| *t < quiet_from || *t > quiet_to),
        "a host started while the plan was paused: {starts:?} in ({quiet_from}, {quiet_to})"
    );
    let status = dp.status.expect("status");
    assert_eq!(status.run.as_deref(), Some("1"), "pausing is not a new run");
    assert_eq!(status.observed_generation, dp.metadata.generation);
    let t = tally(&dir.path().join("runs.log"));
    assert_eq!(t.len(), 6, "{t:?}");
    assert!(t.values().all(|&n| n == 1), "{t:?}");
}

#[tokio::test]
async fn a_spec_edit_mid_run_stops_the_old_run_and_starts_the_new_generation() {
    let kc = kubeconfig();
    let ns = namespace("dp-edit");
    let _controller = ControllerProcess::start(&ns, "outrider", "solo", &[]);
    let api: Api<DeploymentPlan> = Api::namespaced(client().await, &ns);
    setup(&ns, 6);
    let dir = out_dir();
    let strategy = "{batchSize: 2, maxParallel: 1}";
    // Long enough (6 hosts × 2 s, one at a time) that a loaded machine still sees the edit
    // before the old run could finish on its own.
    let old = append_stage("step", dir.path(), "old.log", "sleep 2");
    apply(&kc, &plan_yaml("edited", &ns, strategy, &old, ""));
    wait_succeeded_at_least(&api, "edited", 1).await;
    let new = append_stage("step", dir.path(), "new.log", "true");
    apply(&kc, &plan_yaml("edited", &ns, strategy, &new, ""));
    let dp = eventually(
        Duration::from_secs(60),
        "generation 2 to succeed",
        || async {
            let dp = api.get_opt("edited").await.ok().flatten()?;
            let s = dp.status.as_ref()?;
            (s.run.as_deref() == Some("2") && s.phase == Some(PlanPhase::Succeeded)).then_some(dp)
        },
    )
    .await;
    let status = dp.status.expect("status");
    assert_eq!(status.stages[0].succeeded, 6);
    let old = tally(&dir.path().join("old.log"));
    let new = tally(&dir.path().join("new.log"));
    assert!(old.len() < 6, "the old run was not stopped: {old:?}");
    assert!(old.values().all(|&n| n == 1), "{old:?}");
    assert_eq!(new.len(), 6, "{new:?}");
    assert!(new.values().all(|&n| n == 1), "{new:?}");
}

#[tokio::test]
async fn deleting_a_plan_mid_run_cancels_it() {
    let kc = kubeconfig();
    let ns = namespace("dp-delete");
    let controller = ControllerProcess::start(&ns, "outrider", "solo", &[]);
    let api: Api<DeploymentPlan> = Api::namespaced(client().await, &ns);
    setup(&ns, 10);
    let dir = out_dir();
    let stage = append_stage(
        "slow",
        dir.path(),
        "runs.log",
        "date +%s%N >> \"$OUT/starts.log\"; sleep 0.4",
    );
    apply(
        &kc,
        &plan_yaml(
            "doomed",
            &ns,
            "{batchSize: 100%, maxParallel: 1}",
            &stage,
            "",
        ),
    );
    wait_succeeded_at_least(&api, "doomed", 1).await;
    let dp = api.get("doomed").await.expect("get");
    assert!(
        dp.metadata
            .finalizers
            .unwrap_or_default()
            .contains(&"outrider.dev/cleanup".to_string()),
        "the cleanup finalizer is in place"
    );
    let out = kubectl(
        &kc,
        &[
            "delete",
            "dp",
            "doomed",
            "-n",
            &ns,
            "--wait=true",
            "--timeout=30s",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let deleted_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    // positive marker: the run gave back its hosts (a stage in flight may finish first)
    let url = controller.metrics_url();
    eventually(Duration::from_secs(60), "no host in flight", || async {
        let m = http_get(&url).await?;
        m.contains("outrider_plan_hosts_in_flight 0").then_some(())
    })
    .await;
    // the stop reached the run before the finalizer let the plan go: nothing starts after
    let starts: Vec<u128> = lines(&dir.path().join("starts.log"))
        .iter()
        .map(|l| l.trim().parse().expect("epoch ns"))
        .collect();
    assert!(
        !starts.is_empty() && starts.len() < 10,
        "the run was not cancelled: {starts:?}"
    );
    assert!(
        starts.iter().all(|t| *t < deleted_at),
        "a host started after the delete returned: {starts:?} vs {deleted_at}"
    );
    assert!(!controller.log_text().contains("panicked"));
}

#[tokio::test]
async fn job_stage_runs_as_an_owned_job_then_ssh_stages_follow() {
    use k8s_openapi::api::batch::v1::Job;
    let kc = kubeconfig();
    let ns = namespace("dp-job");
    let _controller = ControllerProcess::start(&ns, "outrider", "solo", &[]);
    let client = client().await;
    let api: Api<DeploymentPlan> = Api::namespaced(client.clone(), &ns);
    setup(&ns, 3);
    let dir = out_dir();
    let stages = format!(
        "    - name: migrate\n      runOnce: true\n      timeout: 2m\n      env: {{RELEASE: \"42\"}}\n      job:\n        template: {{spec: {{containers: [{{name: m, image: example.com/migrate:42}}], restartPolicy: Never}}}}\n{}",
        append_stage("rollout", dir.path(), "rollout.log", "true")
    );
    apply(
        &kc,
        &plan_yaml("withjob", &ns, "{batchSize: 100%}", &stages, ""),
    );
    let dp = wait_phase(&api, "withjob", PlanPhase::Succeeded).await;
    let status = dp.status.clone().expect("status");
    let counts: Vec<(String, u32, u32)> = status
        .stages
        .iter()
        .map(|s| (s.name.clone(), s.succeeded, s.failed))
        .collect();
    assert_eq!(
        counts,
        vec![("migrate".into(), 1, 0), ("rollout".into(), 3, 0)]
    );
    assert_eq!(tally(&dir.path().join("rollout.log")).len(), 3);

    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let list = jobs
        .list(&ListParams::default().labels("outrider.dev/plan=withjob"))
        .await
        .expect("jobs");
    assert_eq!(list.items.len(), 1, "one Job for the runOnce stage");
    let job = &list.items[0];
    let labels = job.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("outrider.dev/stage").map(String::as_str),
        Some("migrate")
    );
    let owner = &job.metadata.owner_references.clone().unwrap_or_default()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("DeploymentPlan", "withjob", Some(true))
    );
    assert_eq!(owner.uid, dp.metadata.uid.clone().unwrap_or_default());
    let spec = job.spec.as_ref().expect("job spec");
    assert_eq!(spec.active_deadline_seconds, Some(120));
    assert!(spec.ttl_seconds_after_finished.is_some());
    let pod = spec.template.spec.as_ref().expect("pod");
    assert_eq!(
        pod.automount_service_account_token,
        Some(false),
        "no API token in a stage's pod unless its template asks"
    );
    let env = pod.containers[0].env.clone().unwrap_or_default();
    assert!(
        env.iter()
            .any(|e| e.name == "RELEASE" && e.value.as_deref() == Some("42"))
    );
    let complete = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == "Complete" && c.status == "True")
        });
    assert!(complete, "the Job completed: {:?}", job.status);
}

#[tokio::test]
async fn a_failed_job_stage_fails_the_run_with_the_pods_exit_code_and_later_stages_never_run() {
    use k8s_openapi::api::batch::v1::Job;
    let kc = kubeconfig();
    let ns = namespace("dp-jobfail");
    let _controller = ControllerProcess::start(&ns, "outrider", "solo", &[]);
    let client = client().await;
    let api: Api<DeploymentPlan> = Api::namespaced(client.clone(), &ns);
    setup(&ns, 3);
    let dir = out_dir();
    // kwok fails pods labelled kwok-exit-code with that exit code (e2e/cluster/kwok.yaml)
    let stages = format!(
        "    - name: migrate\n      runOnce: true\n      timeout: 2m\n      job:\n        template: {{metadata: {{labels: {{kwok-exit-code: \"7\"}}}}, spec: {{containers: [{{name: m, image: example.com/migrate:43}}], restartPolicy: Never}}}}\n{}",
        append_stage("rollout", dir.path(), "rollout.log", "true")
    );
    apply(
        &kc,
        &plan_yaml("jobfail", &ns, "{batchSize: 100%}", &stages, ""),
    );
    let dp = wait_phase(&api, "jobfail", PlanPhase::Failed).await;
    let status = dp.status.clone().expect("status");
    let f = status
        .failures
        .iter()
        .find(|f| f.stage == "migrate")
        .unwrap_or_else(|| panic!("a failure for stage migrate: {:?}", status.failures));
    assert_eq!(f.reason, "NonZeroExit", "{f:?}");
    assert_eq!(f.exit_code, Some(7), "{f:?}");
    let counts: Vec<(String, u32, u32)> = status
        .stages
        .iter()
        .map(|s| (s.name.clone(), s.succeeded, s.failed))
        .collect();
    assert_eq!(
        counts,
        vec![("migrate".into(), 0, 1), ("rollout".into(), 0, 0)]
    );
    assert!(
        lines(&dir.path().join("rollout.log")).is_empty(),
        "no host ran the stage after the failed runOnce Job"
    );
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let list = jobs
        .list(&ListParams::default().labels("outrider.dev/plan=jobfail"))
        .await
        .expect("jobs");
    assert_eq!(
        list.items.len(),
        1,
        "backoffLimit 0 and no retries: one Job"
    );
    let failed = list.items[0]
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Failed" && c.status == "True"));
    assert!(failed, "the Job failed: {:?}", list.items[0].status);
}

#[tokio::test]
async fn secret_env_values_reach_ssh_stages_and_jobs_but_never_status_or_events() {
    use k8s_openapi::api::batch::v1::Job;
    let kc = kubeconfig();
    let ns = namespace("dp-secenv");
    let _controller = ControllerProcess::start(&ns, "outrider", "solo", &[]);
    let client = client().await;
    let api: Api<DeploymentPlan> = Api::namespaced(client.clone(), &ns);
    setup(&ns, 2);
    let dir = out_dir();
    let secret_value = "s3cr3t-$(id)-'quoted'";
    let stages = format!(
        "    - name: migrate\n      runOnce: true\n      timeout: 2m\n      secretEnv: [{{name: DB_PASSWORD, secretKeyRef: {{name: db, key: password}}}}]\n      job:\n        template: {{spec: {{containers: [{{name: m, image: example.com/migrate:1}}], restartPolicy: Never}}}}\n    - name: write\n      env: {{OUT: \"{}\"}}\n      secretEnv: [{{name: DB_PASSWORD, secretKeyRef: {{name: db, key: password}}}}]\n      script: |\n        printf '%s' \"$DB_PASSWORD\" > \"$OUT/$(echo $SSH_CONNECTION | cut -d' ' -f3)\"\n      timeout: 60s\n",
        dir.path().display()
    );
    // the Secret does not exist yet: not ready, naming it
    apply(
        &kc,
        &plan_yaml("secenv", &ns, "{batchSize: 100%}", &stages, ""),
    );
    eventually(Duration::from_secs(60), "SecretNotFound", || async {
        let dp = api.get_opt("secenv").await.ok().flatten()?;
        let c = dp
            .status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")?
            .clone();
        (c.reason == "SecretNotFound"
            && c.message.contains("\"db\"")
            && c.message.contains("DB_PASSWORD"))
        .then_some(())
    })
    .await;
    apply(
        &kc,
        &format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: db, namespace: {ns}}}\ntype: Opaque\nstringData:\n  password: \"{}\"\n",
            secret_value.replace('"', "\\\"")
        ),
    );
    let dp = wait_phase(&api, "secenv", PlanPhase::Succeeded).await;
    for i in 0..2 {
        let got = std::fs::read_to_string(dir.path().join(host_addr(i))).expect("stage output");
        assert_eq!(got, secret_value);
    }
    // the Job reads the Secret through the kubelet: no value in the Job object
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let list = jobs
        .list(&ListParams::default().labels("outrider.dev/plan=secenv"))
        .await
        .expect("jobs");
    let env = list.items[0]
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .env
        .clone()
        .unwrap_or_default();
    let var = env
        .iter()
        .find(|e| e.name == "DB_PASSWORD")
        .expect("DB_PASSWORD");
    assert_eq!(var.value, None);
    let sel = var
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!((sel.name.as_str(), sel.key.as_str()), ("db", "password"));
    // nowhere in status or Events
    let status = serde_json::to_string(&dp.status).unwrap();
    assert!(!status.contains("s3cr3t"), "{status}");
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let all =
        serde_json::to_string(&events.list(&ListParams::default()).await.unwrap().items).unwrap();
    assert!(!all.contains("s3cr3t"));
}

#[tokio::test]
async fn a_job_stage_asking_for_the_node_is_refused_naming_the_field_and_never_created() {
    use k8s_openapi::api::batch::v1::Job;
    let kc = kubeconfig();
    let ns = namespace("dp-privjob");
    let _controller = ControllerProcess::start(&ns, "outrider", "solo", &[]);
    let client = client().await;
    let api: Api<DeploymentPlan> = Api::namespaced(client.clone(), &ns);
    setup(&ns, 1);
    let stages = "    - name: grab\n      runOnce: true\n      job:\n        template: {spec: {containers: [{name: m, image: i, volumeMounts: [{name: root, mountPath: /host}]}], volumes: [{name: root, hostPath: {path: /}}]}}\n";
    apply(&kc, &plan_yaml("grab", &ns, "{batchSize: 1}", stages, ""));
    let (_, message) = eventually(Duration::from_secs(60), "PrivilegedJobRefused", || async {
        let dp = api.get_opt("grab").await.ok().flatten()?;
        let c = dp
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Ready")?;
        (c.status == "False" && c.reason == "PrivilegedJobRefused").then_some((c.reason, c.message))
    })
    .await;
    assert!(
        message.contains("spec.stages[0].job.template.spec.volumes[0].hostPath"),
        "{message}"
    );
    assert!(message.contains("--allow-privileged-jobs"), "{message}");
    let jobs: Api<Job> = Api::namespaced(client, &ns);
    let list = jobs.list(&ListParams::default()).await.expect("jobs");
    assert!(list.items.is_empty(), "no Job was created");
}
