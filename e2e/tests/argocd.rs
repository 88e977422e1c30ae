//! Outrider under a real Argo CD (v3.6, built from its Go module by `e2e/tools.sh argocd`, run
//! by `e2e/argocd.sh` against the test control plane).
//!
//! - `argocd_health_checks_*`: every Lua health check of the chart (files/argocd/, rendered by
//!   templates/argocd-health.yaml) run by Argo CD's own engine (`argocd admin settings
//!   resource-overrides health`, no cluster) over a table of statuses built from the real status
//!   types of `outrider::api`, so a renamed status field breaks this test.
//! - `argocd_syncs_every_kind_*`: a local Git repository (`file://`) with one resource of each
//!   kind, an Application with automated sync, and the controller process. Per-resource health
//!   (`.status.resources[].health`, never only the app's: Argo CD leaves kinds without a check out
//!   of the app's roll-up) reaches Healthy for every kind; a commit that breaks the plan turns it
//!   Degraded, a commit that pauses it Suspended, unpausing Healthy again; the app stays Synced
//!   with one sync per commit and none after the last (status writes, finalizers and CRD
//!   defaults are no drift), and the live objects equal the committed manifests (`kubectl diff
//!   --server-side`). `argocd_server_side_apply_*` tells the same story with Argo CD applying
//!   server-side (`ServerSideApply=true`) and comparing server-side (`ServerSideDiff=true`).
//! - `argocd_syncs_the_examples_*`: the repository's own `examples/` against the demo fleet
//!   (`OUTRIDER_DEMO_APPLY=0 e2e/demo.sh up` in a slot of its own: network-namespace hosts with
//!   sshd, the controller, VictoriaLogs, the node agent; the examples rendered for the slot but
//!   not applied) committed to a `file://` repository: every example's own health reaches
//!   Healthy, the app stays Synced with one sync, `kubectl diff --server-side` of the examples is
//!   empty; then the Application is deleted and the demo taken down.
//!
//! The Secrets with SSH keys are applied with kubectl, never committed (see the test).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use outrider::api::deployment_plan::{
    BatchProgress, DeploymentPlanStatus, HostCounts, HostFailure, PlanPhase,
};
use outrider::api::health_check::{CheckResult, HealthCheckStatus, HealthSummary, ProbeState};
use outrider::api::inventory::{InventoryStatus, UnreachableHost};
use outrider::api::log_pipeline::{LogPipelineStatus, NodeCounts};
use outrider::api::security_policy::{
    ApplyFailure, DriftRecord, PolicyFinding, PolicyHostCounts, SecurityPolicyStatus,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::netns::NetnsHost;
use crate::support::*;

const KINDS: [&str; 6] = [
    "Inventory",
    "DeploymentPlan",
    "HealthCheck",
    "SecurityPolicy",
    "LogPipeline",
    "ClusterLogPipeline",
];

fn argocd_bin() -> PathBuf {
    let bin = repo().join("e2e/bin/argocd");
    assert!(
        bin.exists(),
        "{} is missing: build it with `e2e/tools.sh argocd` (Argo CD from its Go module, ~11 min cold)",
        bin.display()
    );
    bin
}

/// The chart's `argocd-health` ConfigMap as Argo CD's `argocd-cm`: the same keys, renamed and
/// labelled the way Argo CD finds its settings.
fn argocd_cm_from_chart() -> serde_yaml::Value {
    let out = Command::new(repo().join("e2e/bin/helm"))
        .args([
            "template",
            "outrider",
            "charts/outrider",
            "--namespace",
            "argocd",
            "--kube-version",
            "1.37.2",
            "--set",
            "argocd.healthChecks=true",
            "--show-only",
            "templates/argocd-health.yaml",
        ])
        .current_dir(repo())
        .output()
        .expect("running e2e/bin/helm (run `e2e/tools.sh helm`)");
    assert!(out.status.success(), "helm template: {}", stderr(&out));
    let mut cm: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).expect("rendered yaml");
    let data = cm["data"].as_mapping().expect("data");
    for kind in KINDS {
        let key = format!("resource.customizations.health.outrider.dev_{kind}");
        assert!(
            data.contains_key(key.as_str()),
            "the chart renders no {key}"
        );
    }
    cm["metadata"] = serde_yaml::from_str(
        "{name: argocd-cm, namespace: argocd, labels: {app.kubernetes.io/part-of: argocd}}",
    )
    .expect("metadata");
    cm
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn cond(type_: &str, status: &str, reason: &str, message: &str, generation: i64) -> Condition {
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: Some(generation),
        last_transition_time: now(),
    }
}

/// An object of `kind` at `metadata.generation` `generation` with `status` (serialized from the
/// real status type), as the API server returns it.
fn object<S: Serialize>(kind: &str, generation: i64, status: Option<&S>) -> String {
    let mut obj = json!({
        "apiVersion": "outrider.dev/v1alpha1",
        "kind": kind,
        "metadata": {
            "name": "x",
            "namespace": "team-a",
            "uid": "1b1a4a9e-62f7-4a5e-9f0e-3c1c4f1f2a10",
            "generation": generation,
            "creationTimestamp": "2026-12-01T10:00:00Z",
        },
        "spec": {},
    });
    if let Some(s) = status {
        obj["status"] = serde_json::to_value(s).expect("status json");
    }
    serde_yaml::to_string(&obj).expect("yaml")
}

struct Case {
    kind: &'static str,
    what: &'static str,
    yaml: String,
    health: &'static str,
    /// A piece of the message Argo CD shows.
    message: &'static str,
}

fn case(
    kind: &'static str,
    what: &'static str,
    yaml: String,
    health: &'static str,
    message: &'static str,
) -> Case {
    Case {
        kind,
        what,
        yaml,
        health,
        message,
    }
}

fn none() -> Option<&'static Value> {
    None
}

fn inventory_cases() -> Vec<Case> {
    let k = "Inventory";
    let ready =
        |status: &str, reason: &str, message: &str, reachable: Option<u32>| InventoryStatus {
            observed_generation: Some(2),
            hosts: 3,
            reachable,
            unreachable: if status == "False" && reachable.is_some() {
                vec![UnreachableHost {
                    host: "web-2".into(),
                    reason: "Unreachable".into(),
                    message: "connect 127.0.10.3:22: connection refused".into(),
                }]
            } else {
                Vec::new()
            },
            conditions: vec![cond("Ready", status, reason, message, 2)],
            ..Default::default()
        };
    let all = ready("True", "AllReachable", "all 3 hosts reachable", Some(3));
    let unprobed = InventoryStatus {
        observed_generation: Some(2),
        hosts: 3,
        ..Default::default()
    };
    vec![
        case(
            k,
            "no status yet",
            object(k, 1, none()),
            "Progressing",
            "Waiting",
        ),
        case(
            k,
            "every host answered",
            object(k, 2, Some(&all)),
            "Healthy",
            "all 3 hosts reachable",
        ),
        case(
            k,
            "a spec edit not observed yet",
            object(k, 3, Some(&all)),
            "Progressing",
            "generation 3",
        ),
        case(
            k,
            "not probed yet",
            object(k, 2, Some(&unprobed)),
            "Progressing",
            "first probe",
        ),
        case(
            k,
            "a host unreachable",
            object(
                k,
                2,
                Some(&ready(
                    "False",
                    "HostsUnreachable",
                    "1 of 3 hosts unreachable: web-2 (Unreachable)",
                    Some(2),
                )),
            ),
            "Degraded",
            "HostsUnreachable: 1 of 3 hosts unreachable",
        ),
        case(
            k,
            "its Secret missing",
            object(
                k,
                2,
                Some(&ready(
                    "False",
                    "SecretNotFound",
                    "Secret \"ssh\" (spec.ssh.secretRef) does not exist in this namespace",
                    None,
                )),
            ),
            "Degraded",
            "SecretNotFound",
        ),
    ]
}

fn plan_cases() -> Vec<Case> {
    let k = "DeploymentPlan";
    let plan = |phase: PlanPhase,
                ready: (&str, &str),
                progressing: (&str, &str),
                counts: (u32, u32, u32, u32)| {
        let (succeeded, failed, running, total) = counts;
        let message = format!("{succeeded} of {total} hosts succeeded, {failed} failed");
        DeploymentPlanStatus {
            observed_generation: Some(4),
            run: Some("4".into()),
            phase: Some(phase),
            batch: Some(BatchProgress {
                current: 1,
                total: 4,
            }),
            hosts: Some(HostCounts {
                total,
                succeeded,
                failed,
                running,
                pending: total - succeeded - failed - running,
            }),
            started_at: Some(now()),
            progress: Some(json!({"v": 2, "key": "k2:9f", "hosts": "3c", "state": {}})),
            conditions: vec![
                cond("Ready", ready.0, ready.1, &message, 4),
                cond("Progressing", progressing.0, progressing.1, &message, 4),
                cond(
                    "Failed",
                    if ready.1 == "RunFailed" || ready.1 == "RolledBack" {
                        "True"
                    } else {
                        "False"
                    },
                    ready.1,
                    &message,
                    4,
                ),
            ],
            ..Default::default()
        }
    };
    let running = plan(
        PlanPhase::Running,
        ("False", "Running"),
        ("True", "BatchRunning"),
        (2, 0, 3, 20),
    );
    let rolling_back = plan(
        PlanPhase::Running,
        ("False", "Running"),
        ("True", "RollingBack"),
        (2, 1, 0, 20),
    );
    let succeeded = DeploymentPlanStatus {
        finished_at: Some(now()),
        ..plan(
            PlanPhase::Succeeded,
            ("True", "Succeeded"),
            ("False", "Completed"),
            (20, 0, 0, 20),
        )
    };
    let failure = HostFailure {
        host: "web-7".into(),
        stage: "rollout".into(),
        reason: "NonZeroExit".into(),
        exit_code: Some(3),
        attempts: 1,
        output_tail: "broken\n".into(),
        finished_at: Some(now()),
        ..Default::default()
    };
    let failed = DeploymentPlanStatus {
        failures: vec![failure.clone()],
        finished_at: Some(now()),
        ..plan(
            PlanPhase::Failed,
            ("False", "RunFailed"),
            ("False", "RunFailed"),
            (6, 1, 0, 20),
        )
    };
    let rolled_back = DeploymentPlanStatus {
        failures: vec![failure],
        finished_at: Some(now()),
        ..plan(
            PlanPhase::RolledBack,
            ("False", "RolledBack"),
            ("False", "RolledBack"),
            (6, 1, 0, 20),
        )
    };
    let paused = plan(
        PlanPhase::Paused,
        ("False", "Paused"),
        ("False", "Paused"),
        (5, 0, 0, 20),
    );
    let pending = DeploymentPlanStatus {
        observed_generation: Some(4),
        run: Some("4".into()),
        phase: Some(PlanPhase::Pending),
        conditions: vec![
            cond(
                "Ready",
                "False",
                "InventoryNotFound",
                "Inventory \"fleet\" (spec.targets.inventoryRef) does not exist in this namespace",
                4,
            ),
            cond(
                "Progressing",
                "False",
                "InventoryNotFound",
                "Inventory \"fleet\" (spec.targets.inventoryRef) does not exist in this namespace",
                4,
            ),
        ],
        ..Default::default()
    };
    let invalid = DeploymentPlanStatus {
        observed_generation: Some(4),
        conditions: vec![cond(
            "Ready",
            "False",
            "InvalidObject",
            "spec.stages[0]: unknown field \"scrpt\"",
            4,
        )],
        ..Default::default()
    };
    vec![
        case(
            k,
            "no status yet",
            object(k, 1, none()),
            "Progressing",
            "Waiting",
        ),
        case(
            k,
            "a batch running",
            object(k, 4, Some(&running)),
            "Progressing",
            "Running, batch 1 of 4: 2 of 20 hosts succeeded",
        ),
        case(
            k,
            "rolling back",
            object(k, 4, Some(&rolling_back)),
            "Progressing",
            "Rolling back",
        ),
        case(
            k,
            "the run succeeded",
            object(k, 4, Some(&succeeded)),
            "Healthy",
            "Succeeded: 20 of 20 hosts succeeded",
        ),
        case(
            k,
            "a new generation not started yet",
            object(k, 5, Some(&succeeded)),
            "Progressing",
            "generation 5",
        ),
        case(
            k,
            "the run failed",
            object(k, 4, Some(&failed)),
            "Degraded",
            "host web-7 stage rollout NonZeroExit (exit code 3)",
        ),
        case(
            k,
            "the run rolled back",
            object(k, 4, Some(&rolled_back)),
            "Degraded",
            "RolledBack",
        ),
        case(
            k,
            "paused mid-run",
            object(k, 4, Some(&paused)),
            "Suspended",
            "Paused (spec.paused): 5 of 20",
        ),
        case(
            k,
            "waiting for its Inventory",
            object(k, 4, Some(&pending)),
            "Degraded",
            "InventoryNotFound",
        ),
        case(
            k,
            "malformed",
            object(k, 4, Some(&invalid)),
            "Degraded",
            "InvalidObject",
        ),
    ]
}

fn health_check_cases() -> Vec<Case> {
    let k = "HealthCheck";
    let hc = |summary: HealthSummary, degraded: (&str, &str, &str), results: Vec<CheckResult>| {
        HealthCheckStatus {
            observed_generation: Some(1),
            last_run_at: Some(now()),
            summary: Some(summary),
            results,
            conditions: vec![
                cond(
                    "Ready",
                    "True",
                    "Probing",
                    "2 checks on 3 hosts and 1 endpoints every 30s",
                    1,
                ),
                cond("Degraded", degraded.0, degraded.1, degraded.2, 1),
            ],
            ..Default::default()
        }
    };
    let result = |state: ProbeState, message: &str| CheckResult {
        target: "web-1".into(),
        check: "disk".into(),
        state,
        value: Some(97.0),
        threshold: Some(90.0),
        baseline: None,
        latency_ms: Some(12.5),
        since: Some(now()),
        message: message.into(),
    };
    let healthy = hc(
        HealthSummary {
            healthy: 4,
            ..Default::default()
        },
        ("False", "AllHealthy", "no target is unhealthy"),
        Vec::new(),
    );
    let unhealthy = hc(
        HealthSummary {
            healthy: 3,
            unhealthy: 1,
            ..Default::default()
        },
        ("True", "TargetsUnhealthy", "1 of 4 targets unhealthy"),
        vec![result(ProbeState::Unhealthy, "97% used, limit 90%")],
    );
    let unknown = hc(
        HealthSummary {
            healthy: 3,
            unknown: 1,
            ..Default::default()
        },
        ("True", "TargetsUnknown", "1 targets could not be probed"),
        vec![result(ProbeState::Unknown, "connect: connection refused")],
    );
    let undecided = hc(
        HealthSummary {
            healthy: 2,
            unknown: 2,
            ..Default::default()
        },
        ("False", "AllHealthy", "no target is unhealthy"),
        Vec::new(),
    );
    let anomalous = hc(
        HealthSummary {
            healthy: 3,
            anomalous: 1,
            ..Default::default()
        },
        ("False", "AllHealthy", "no target is unhealthy"),
        vec![result(ProbeState::Anomalous, "far from its baseline")],
    );
    let maintenance = HealthCheckStatus {
        in_maintenance: true,
        ..healthy.clone()
    };
    let not_run = HealthCheckStatus {
        observed_generation: Some(1),
        conditions: vec![cond("Ready", "True", "Probing", "", 1)],
        ..Default::default()
    };
    let invalid = HealthCheckStatus {
        observed_generation: Some(1),
        conditions: vec![cond(
            "Ready",
            "False",
            "InventoryNotFound",
            "Inventory \"fleet\" (spec.targets.inventoryRef) does not exist in this namespace",
            1,
        )],
        ..Default::default()
    };
    vec![
        case(
            k,
            "no status yet",
            object(k, 1, none()),
            "Progressing",
            "Waiting",
        ),
        case(
            k,
            "no round of probes yet",
            object(k, 1, Some(&not_run)),
            "Progressing",
            "first round",
        ),
        case(
            k,
            "every target healthy",
            object(k, 1, Some(&healthy)),
            "Healthy",
            "4 targets healthy",
        ),
        case(
            k,
            "a spec edit not observed yet",
            object(k, 2, Some(&healthy)),
            "Progressing",
            "generation 2",
        ),
        case(
            k,
            "a target unhealthy",
            object(k, 1, Some(&unhealthy)),
            "Degraded",
            "TargetsUnhealthy: 1 of 4 targets unhealthy",
        ),
        case(
            k,
            "a target not probed",
            object(k, 1, Some(&unknown)),
            "Degraded",
            "TargetsUnknown",
        ),
        case(
            k,
            "targets not decided yet",
            object(k, 1, Some(&undecided)),
            "Progressing",
            "2 targets not decided yet",
        ),
        case(
            k,
            "a target anomalous",
            object(k, 1, Some(&anomalous)),
            "Healthy",
            "1 anomalous",
        ),
        case(
            k,
            "in maintenance",
            object(k, 1, Some(&maintenance)),
            "Healthy",
            "(in maintenance)",
        ),
        case(
            k,
            "its Inventory missing",
            object(k, 1, Some(&invalid)),
            "Degraded",
            "InventoryNotFound",
        ),
    ]
}

fn security_policy_cases() -> Vec<Case> {
    let k = "SecurityPolicy";
    let sp = |counts: PolicyHostCounts, ready: (&str, &str, &str), progressing: (&str, &str)| {
        SecurityPolicyStatus {
            observed_generation: Some(3),
            ruleset_hash: Some(format!("sha256:{}", "ab".repeat(32))),
            hosts: Some(counts),
            conditions: vec![
                cond("Ready", ready.0, ready.1, ready.2, 3),
                cond("Progressing", progressing.0, progressing.1, "", 3),
                cond(
                    "Degraded",
                    if counts.drifted + counts.failed > 0 {
                        "True"
                    } else {
                        "False"
                    },
                    if counts.drifted + counts.failed > 0 {
                        ready.1
                    } else {
                        "AllApplied"
                    },
                    "",
                    3,
                ),
            ],
            ..Default::default()
        }
    };
    let counts = |applied, drifted, failed, rolled_back, pending| PolicyHostCounts {
        total: 3,
        applied,
        drifted,
        failed,
        rolled_back,
        pending,
    };
    let applied = sp(
        counts(3, 0, 0, 0, 0),
        ("True", "Applied", "ruleset sha256:abab runs on all 3 hosts"),
        ("False", "PassComplete"),
    );
    let rolling = sp(
        counts(1, 0, 0, 0, 2),
        (
            "False",
            "RollingOut",
            "the ruleset is being pushed; see the Progressing condition",
        ),
        ("True", "RollingOut"),
    );
    let drifted = SecurityPolicyStatus {
        drift: vec![DriftRecord {
            host: "web-1".into(),
            detected_at: Some(now()),
            message: "live ruleset differs from the rendered one".into(),
        }],
        ..sp(
            counts(2, 1, 0, 0, 0),
            ("False", "Drifted", "1 of 3 hosts drifted: web-1"),
            ("False", "PassComplete"),
        )
    };
    let failure = |reason: &str| ApplyFailure {
        host: "web-2".into(),
        reason: reason.into(),
        message: "not confirmed over a new connection within 10s".into(),
        at: Some(now()),
    };
    let rolled_back = SecurityPolicyStatus {
        failures: vec![failure("NotConfirmed")],
        ..sp(
            counts(1, 0, 1, 1, 1),
            (
                "False",
                "RolledBack",
                "1 hosts restored their previous ruleset (not confirmed over a new connection): web-2",
            ),
            ("False", "Halted"),
        )
    };
    let apply_failed = SecurityPolicyStatus {
        failures: vec![failure("RulesetRejected")],
        ..sp(
            counts(2, 0, 1, 0, 0),
            (
                "False",
                "ApplyFailed",
                "ruleset not applied on 1 hosts: web-2",
            ),
            ("False", "PassComplete"),
        )
    };
    let halted = sp(
        counts(1, 0, 0, 0, 2),
        (
            "False",
            "RolloutHalted",
            "2 hosts not reached: the rollout stopped",
        ),
        ("False", "Halted"),
    );
    let invalid = SecurityPolicyStatus {
        observed_generation: Some(3),
        findings: vec![PolicyFinding {
            severity: "Error".into(),
            code: "Shadowed".into(),
            rule: Some("allow_web".into()),
            message: "never matches: deny_all above covers it".into(),
        }],
        conditions: vec![cond(
            "Ready",
            "False",
            "InvalidPolicy",
            "rule allow_web is shadowed by deny_all",
            3,
        )],
        ..Default::default()
    };
    let no_hosts = sp(
        PolicyHostCounts::default(),
        ("True", "NoHosts", "no host is targeted"),
        ("False", "PassComplete"),
    );
    vec![
        case(
            k,
            "no status yet",
            object(k, 1, none()),
            "Progressing",
            "Waiting",
        ),
        case(
            k,
            "rolling out",
            object(k, 3, Some(&rolling)),
            "Progressing",
            "RollingOut",
        ),
        case(
            k,
            "applied everywhere",
            object(k, 3, Some(&applied)),
            "Healthy",
            "runs on all 3 hosts",
        ),
        case(
            k,
            "a spec edit not observed yet",
            object(k, 4, Some(&applied)),
            "Progressing",
            "generation 4",
        ),
        case(
            k,
            "a host drifted",
            object(k, 3, Some(&drifted)),
            "Degraded",
            "Drifted: 1 of 3 hosts drifted",
        ),
        case(
            k,
            "a host rolled back",
            object(k, 3, Some(&rolled_back)),
            "Degraded",
            "RolledBack: 1 hosts restored",
        ),
        case(
            k,
            "a host rejected the ruleset",
            object(k, 3, Some(&apply_failed)),
            "Degraded",
            "ApplyFailed",
        ),
        case(
            k,
            "the rollout halted",
            object(k, 3, Some(&halted)),
            "Degraded",
            "RolloutHalted",
        ),
        case(
            k,
            "the rules do not compile",
            object(k, 3, Some(&invalid)),
            "Degraded",
            "InvalidPolicy",
        ),
        case(
            k,
            "no host targeted",
            object(k, 3, Some(&no_hosts)),
            "Healthy",
            "NoHosts",
        ),
    ]
}

/// A LogPipeline's or a ClusterLogPipeline's (`k`) statuses: the same status type.
fn log_pipeline_cases(k: &'static str) -> Vec<Case> {
    let lp =
        |reason: &str, status: &str, message: &str, nodes: Option<NodeCounts>| LogPipelineStatus {
            observed_generation: Some(2),
            config_hash: nodes.map(|_| format!("sha256:{}", "cd".repeat(32))),
            nodes,
            conditions: vec![cond("Ready", status, reason, message, 2)],
        };
    let shipping = lp(
        "AllNodesShipping",
        "True",
        "2 agents run configuration sha256:cdcd",
        Some(NodeCounts {
            desired: 2,
            ready: 2,
            updated: 2,
        }),
    );
    vec![
        case(
            k,
            "no status yet",
            object(k, 1, none()),
            "Progressing",
            "Waiting",
        ),
        case(
            k,
            "every agent ships",
            object(k, 2, Some(&shipping)),
            "Healthy",
            "AllNodesShipping",
        ),
        case(
            k,
            "a spec edit not observed yet",
            object(k, 3, Some(&shipping)),
            "Progressing",
            "generation 3",
        ),
        case(
            k,
            "agents loading the new configuration",
            object(
                k,
                2,
                Some(&lp(
                    "RollingOut",
                    "False",
                    "1 of 2 agents run configuration sha256:cdcd (2 ready)",
                    Some(NodeCounts {
                        desired: 2,
                        ready: 2,
                        updated: 1,
                    }),
                )),
            ),
            "Progressing",
            "RollingOut",
        ),
        case(
            k,
            "no agent on a selected node",
            object(
                k,
                2,
                Some(&lp(
                    "NoAgents",
                    "False",
                    "no node agent Pod (app.kubernetes.io/name=outrider-agent in namespace outrider) runs on a node this pipeline selects",
                    Some(NodeCounts::default()),
                )),
            ),
            "Degraded",
            "NoAgents",
        ),
        case(
            k,
            "a regex the CRD cannot check",
            object(
                k,
                2,
                Some(&lp(
                    "InvalidSpec",
                    "False",
                    "spec.inputs[0].multiline.startPattern: unclosed group",
                    None,
                )),
            ),
            "Degraded",
            "InvalidSpec",
        ),
        case(
            k,
            "an output's Secret missing",
            object(
                k,
                2,
                Some(&lp(
                    "SecretNotFound",
                    "False",
                    "Secret \"es-creds\" (spec.outputs[es].secretRef) does not exist in this namespace",
                    None,
                )),
            ),
            "Degraded",
            "SecretNotFound",
        ),
    ]
}

/// `argocd admin settings resource-overrides health` on one object: (status, message).
fn argocd_health(argocd: &Path, cm: &Path, obj: &Path) -> (String, String) {
    let out = Command::new(argocd)
        .args(["admin", "settings", "resource-overrides", "health"])
        .arg(obj)
        .arg("--argocd-cm-path")
        .arg(cm)
        .env("HOME", obj.parent().expect("dir"))
        .output()
        .expect("running e2e/bin/argocd");
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "argocd health failed: {}{}",
        text,
        stderr(&out)
    );
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
    };
    match (field("STATUS:"), field("MESSAGE:")) {
        (Some(s), Some(m)) => (s, m),
        _ => panic!("no health from argocd (is the check configured?): {text}"),
    }
}

#[test]
fn argocd_health_checks_map_every_kind_status_to_its_health() {
    let argocd = argocd_bin();
    let dir = tempfile::tempdir().expect("tempdir");
    let cm = dir.path().join("argocd-cm.yaml");
    std::fs::write(
        &cm,
        serde_yaml::to_string(&argocd_cm_from_chart()).expect("cm yaml"),
    )
    .expect("write cm");
    let cases: Vec<Case> = [
        inventory_cases(),
        plan_cases(),
        health_check_cases(),
        security_policy_cases(),
        log_pipeline_cases("LogPipeline"),
        log_pipeline_cases("ClusterLogPipeline"),
    ]
    .into_iter()
    .flatten()
    .collect();
    for kind in KINDS {
        let seen: Vec<&str> = cases
            .iter()
            .filter(|c| c.kind == kind)
            .map(|c| c.health)
            .collect();
        for health in ["Healthy", "Progressing", "Degraded"] {
            assert!(seen.contains(&health), "{kind}: no {health} case");
        }
    }
    let mut failures = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let obj = dir.path().join(format!("obj-{i}.yaml"));
        std::fs::write(&obj, &c.yaml).expect("write obj");
        let (health, message) = argocd_health(&argocd, &cm, &obj);
        let ok = health == c.health && message.contains(c.message);
        println!(
            "{} {:<15} {:<40} -> {health:<11} {message}",
            if ok { "ok  " } else { "FAIL" },
            c.kind,
            c.what
        );
        if !ok {
            failures.push(format!(
                "{} {}: got {health} {message:?}, want {} with {:?}\n{}",
                c.kind, c.what, c.health, c.message, c.yaml
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ------------------------------------------------------------------------------ the real thing

const APPS_NS: &str = "argocd";
const FW_USER: &str = "outrider-sudo";

fn cluster_dir(kc: &Path) -> PathBuf {
    kc.parent().expect("cluster dir").to_path_buf()
}

/// `e2e/argocd.sh up` (idempotent: a no-op when Argo CD already runs against this cluster).
fn argocd_up(kc: &Path) {
    argocd_bin();
    let out = Command::new(repo().join("e2e/argocd.sh"))
        .arg("up")
        .env("OUTRIDER_CLUSTER_DIR", cluster_dir(kc))
        .output()
        .expect("running e2e/argocd.sh (is bash installed?)");
    assert!(
        out.status.success(),
        "e2e/argocd.sh up failed (run e2e/deps.sh as root for redis-server, e2e/tools.sh argocd for Argo CD):\n{}{}",
        stdout(&out),
        stderr(&out)
    );
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=Outrider e2e",
            "-c",
            "user.email=e2e@outrider.invalid",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running git (apt-get install git)");
    assert!(out.status.success(), "git {args:?}: {}", stderr(&out));
    stdout(&out).trim().to_string()
}

/// A local Git repository Argo CD reads over `file://`; manifests live in `deploy/`.
struct GitRepo {
    dir: tempfile::TempDir,
}

impl GitRepo {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        git(dir.path(), &["init", "-q", "-b", "main"]);
        std::fs::create_dir_all(dir.path().join("deploy")).expect("deploy dir");
        Self { dir }
    }

    fn url(&self) -> String {
        format!("file://{}", self.dir.path().display())
    }

    fn deploy(&self) -> PathBuf {
        self.dir.path().join("deploy")
    }

    /// Writes `files` into `deploy/` and commits them; returns the commit.
    fn commit(&self, files: &[(&str, &str)], message: &str) -> String {
        for (name, text) in files {
            std::fs::write(self.deploy().join(name), text).expect("write manifest");
        }
        git(self.dir.path(), &["add", "-A"]);
        git(self.dir.path(), &["commit", "-q", "-m", message]);
        git(self.dir.path(), &["rev-parse", "HEAD"])
    }
}

fn plan_yaml(ns: &str, script: &str, paused: bool) -> String {
    format!(
        r#"apiVersion: outrider.dev/v1alpha1
kind: DeploymentPlan
metadata:
  name: deploy
  namespace: {ns}
spec:
  targets:
    inventoryRef: {{name: fleet}}
  strategy: {{batchSize: 1, maxUnavailable: 0}}
  paused: {paused}
  stages:
    - name: rollout
      script: {script:?}
      timeout: 30s
"#
    )
}

fn health_check_yaml(ns: &str) -> String {
    format!(
        r#"apiVersion: outrider.dev/v1alpha1
kind: HealthCheck
metadata:
  name: alive
  namespace: {ns}
spec:
  interval: 5s
  targets:
    inventoryRef: {{name: fleet}}
  checks:
    - name: shell
      exec: {{command: ["true"]}}
      timeout: 5s
"#
    )
}

fn firewall_yaml(ns: &str, host: &NetnsHost) -> String {
    format!(
        r#"apiVersion: outrider.dev/v1alpha1
kind: Inventory
metadata:
  name: fw-fleet
  namespace: {ns}
spec:
  ssh:
    user: {FW_USER}
    port: 22
    connectTimeout: 3s
    secretRef: {{name: fw-ssh}}
    become: {{method: sudo, user: root}}
  probe: {{interval: 30s}}
  hosts:
    - {{name: fw-0, address: "{addr}"}}
---
apiVersion: outrider.dev/v1alpha1
kind: SecurityPolicy
metadata:
  name: fw
  namespace: {ns}
spec:
  targets:
    inventoryRef: {{name: fw-fleet}}
  zones:
    trust: ["{operator}/32"]
  defaultInput: drop
  rules:
    - {{name: allow_web, action: allow, protocol: tcp, ports: [80]}}
  failsafe: {{ports: [22], sources: [198.18.0.0/15]}}
  apply: {{confirmTimeout: 10s, batchSize: 1, maxUnavailable: 0}}
  driftCheckInterval: 30s
  driftPolicy: Report
"#,
        addr = host.addr,
        operator = host.operator,
    )
}

fn log_pipeline_yaml(ns: &str) -> String {
    format!(
        r#"apiVersion: outrider.dev/v1alpha1
kind: LogPipeline
metadata:
  name: logs
  namespace: {ns}
spec:
  pods: {{selector: {{matchLabels: {{app: shop}}}}}}
  parser: json
  fields: {{service: shop}}
  outputs:
    - {{name: out, http: {{url: "http://127.0.0.1:9/ingest"}}}}
"#
    )
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

/// The SSH Secret of the firewall host (applied with kubectl, not committed: see the test).
fn fw_secret_yaml(ns: &str, host: &NetnsHost, private_key: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: fw-ssh, namespace: {ns}}}\ntype: Opaque\nstringData:\n  ssh-privatekey: |\n{}  known_hosts: |\n{}",
        indent(private_key),
        indent(&host.known_hosts())
    )
}

/// How Argo CD applies and compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Argo CD's defaults: client-side `kubectl apply` (last-applied annotation) and its
    /// three-way diff.
    ClientSide,
    /// `ServerSideApply=true` (field manager argocd-controller) and `ServerSideDiff=true`
    /// (a dry-run apply compared with the live object), as many teams run CRDs.
    ServerSide,
}

fn application_yaml(name: &str, repo_url: &str, ns: &str, mode: Mode) -> String {
    let (annotations, sync_options) = match mode {
        Mode::ClientSide => ("{}", "[]"),
        Mode::ServerSide => (
            "{argocd.argoproj.io/compare-options: ServerSideDiff=true}",
            "[ServerSideApply=true]",
        ),
    };
    format!(
        r#"apiVersion: argoproj.io/v1alpha1
kind: Application
metadata:
  name: {name}
  namespace: {APPS_NS}
  annotations: {annotations}
spec:
  project: default
  source:
    repoURL: {repo_url}
    path: deploy
    targetRevision: main
  destination:
    server: https://kubernetes.default.svc
    namespace: {ns}
  syncPolicy:
    automated: {{prune: true, selfHeal: true}}
    syncOptions: {sync_options}
"#
    )
}

/// The Application as JSON, `None` while it cannot be read.
fn get_app(kc: &Path, name: &str) -> Option<Value> {
    let out = kubectl(
        kc,
        &["-n", APPS_NS, "get", "application", name, "-o", "json"],
    );
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// `(sync, health, message)` of one managed resource, from `.status.resources[]`.
fn resource(app: &Value, kind: &str, name: &str) -> Option<(String, String, String)> {
    let r = app["status"]["resources"]
        .as_array()?
        .iter()
        .find(|r| r["kind"] == kind && r["name"] == name)?;
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    Some((
        s(&r["status"]),
        s(&r["health"]["status"]),
        s(&r["health"]["message"]),
    ))
}

/// What the app shows, for failure messages.
fn summary(app: &Value) -> String {
    let mut s = format!(
        "sync {} at {}, health {}, operation {} {}\n",
        app["status"]["sync"]["status"],
        app["status"]["sync"]["revision"],
        app["status"]["health"]["status"],
        app["status"]["operationState"]["phase"],
        app["status"]["operationState"]["message"],
    );
    for r in app["status"]["resources"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "  {}/{}: {} {} {}\n",
            r["kind"], r["name"], r["status"], r["health"]["status"], r["health"]["message"]
        ));
    }
    for c in app["status"]["conditions"].as_array().into_iter().flatten() {
        s.push_str(&format!("  condition {}: {}\n", c["type"], c["message"]));
    }
    s
}

/// Polls the Application until `check` holds; panics with what it shows after `timeout`.
async fn wait_app(
    kc: &Path,
    name: &str,
    timeout: Duration,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    let mut last = Value::Null;
    loop {
        if let Some(app) = get_app(kc, name) {
            if check(&app) {
                return app;
            }
            last = app;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; the Application shows:\n{}",
            summary(&last)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Asks Argo CD to compare again now (what a webhook would do after a push).
fn refresh(kc: &Path, name: &str) {
    let out = kubectl(
        kc,
        &[
            "-n",
            APPS_NS,
            "annotate",
            "application",
            name,
            "argocd.argoproj.io/refresh=normal",
            "--overwrite",
        ],
    );
    assert!(out.status.success(), "annotate refresh: {}", stderr(&out));
}

/// Every managed resource named in `want` (kind, name) has health `health`, and the app is
/// Synced at `revision`.
fn synced_with(app: &Value, revision: &str, want: &[(&str, &str, &str)]) -> bool {
    app["status"]["sync"]["status"] == "Synced"
        && app["status"]["sync"]["revision"] == revision
        && want.iter().all(|(kind, name, health)| {
            resource(app, kind, name).is_some_and(|(sync, h, _)| sync == "Synced" && h == *health)
        })
}

/// Asks for three refreshes, 5 s apart, and waits for each to be done (a new `reconciledAt`, the
/// refresh annotation consumed); returns the Application after the last one.
async fn refresh_a_few_times(kc: &Path, name: &str) -> Value {
    for _ in 0..3 {
        let before = get_app(kc, name).map(|a| a["status"]["reconciledAt"].clone());
        tokio::time::sleep(Duration::from_secs(5)).await;
        refresh(kc, name);
        wait_app(kc, name, Duration::from_secs(60), "a refresh", |app| {
            Some(app["status"]["reconciledAt"].clone()) != before
                && app["metadata"]["annotations"]["argocd.argoproj.io/refresh"].is_null()
        })
        .await;
    }
    get_app(kc, name).expect("app")
}

/// The revisions Argo CD synced, oldest first (`.status.history`).
fn synced_revisions(app: &Value) -> Vec<&str> {
    app["status"]["history"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h["revision"].as_str())
        .collect()
}

/// What is live equals what is committed in `dir`, field by field: `kubectl diff --server-side`
/// (a dry-run apply as another field manager: the fields Argo CD, the controller and the API
/// server own stay theirs, so only a committed value that differs from the live one shows up)
/// is empty. `ns` is the namespace of manifests that name none (Argo CD's destination).
fn assert_live_equals_committed(kc: &Path, ns: &str, dir: &Path) {
    let out = kubectl(
        kc,
        &[
            "diff",
            "--server-side",
            "--force-conflicts",
            "--field-manager=e2e-diff",
            "-n",
            ns,
            "-f",
            dir.to_str().expect("utf-8 path"),
        ],
    );
    assert!(
        out.status.success(),
        "kubectl diff of the committed manifests is not empty (exit {:?}):\n{}{}",
        out.status.code(),
        stdout(&out),
        stderr(&out)
    );
}

/// The Application, deleted at the end of the test whatever happens (its resources stay: no
/// finalizer), so Argo CD stops reading a repository that is gone.
struct AppGuard<'a> {
    kc: &'a Path,
    name: String,
}

impl Drop for AppGuard<'_> {
    fn drop(&mut self) {
        let _ = kubectl(
            self.kc,
            &[
                "-n",
                APPS_NS,
                "delete",
                "application",
                &self.name,
                "--wait=false",
            ],
        );
    }
}

#[tokio::test]
async fn argocd_syncs_every_kind_and_reports_each_ones_health_without_drift() {
    gitops(Mode::ClientSide, "argocd-csa").await;
}

#[tokio::test]
async fn argocd_server_side_apply_and_diff_see_no_drift_either() {
    gitops(Mode::ServerSide, "argocd-ssa").await;
}

/// The whole story with one Application in namespace `<prefix>-<pid>`.
async fn gitops(mode: Mode, prefix: &str) {
    let started = Instant::now();
    let kc = kubeconfig();
    argocd_up(&kc);
    let ns = namespace(prefix);
    let app_name = format!("outrider-{ns}");
    let _controller = ControllerProcess::start(&ns, "outrider", "solo", &[]);

    // The SSH Secrets are applied directly, not committed: a private key does not belong in Git
    // (teams bring Secrets through Sealed Secrets / External Secrets / Vault, outside the app's
    // manifests), and Argo CD does not need to own them for the Outrider resources to use them.
    apply(&kc, &secret_yaml("fleet-ssh", &ns));
    let fw_host = NetnsHost::start(&[80]);
    let keys = tempfile::tempdir().expect("tempdir");
    let (fw_key, fw_public) = crate::sshd::user_key(keys.path(), "ed25519", None, "openssh");
    fw_host.sshd.authorize(FW_USER, &fw_public);
    apply(&kc, &fw_secret_yaml(&ns, &fw_host, &fw_key));
    // The node agent runs from the chart's DaemonSet in a real install: here one agent Pod on a
    // kwok node (kwok makes it Ready) and the agent process serving its IP (scraped by the
    // controller for the configuration it runs).
    let agent_port = free_port();
    apply(
        &kc,
        &agent_pod_yaml("agent-0", &ns, "kwok-node-0", agent_port),
    );

    let git_repo = GitRepo::new();
    let inventory = inventory_yaml("fleet", &ns, "fleet-ssh", 1);
    let good = plan_yaml(&ns, "echo deployed on $(hostname)", false);
    let rev1 = git_repo.commit(
        &[
            ("inventory.yaml", &inventory),
            ("plan.yaml", &good),
            ("healthcheck.yaml", &health_check_yaml(&ns)),
            ("firewall.yaml", &firewall_yaml(&ns, &fw_host)),
            ("logpipeline.yaml", &log_pipeline_yaml(&ns)),
        ],
        "one of each kind",
    );
    apply(
        &kc,
        &application_yaml(&app_name, &git_repo.url(), &ns, mode),
    );
    let _guard = AppGuard {
        kc: &kc,
        name: app_name.clone(),
    };

    // the agent gets the configuration the controller renders for the synced LogPipeline
    let agent_dir = tempfile::tempdir().expect("tempdir");
    let config = agent_dir.path().join("agent.yaml");
    let rendered = eventually(Duration::from_secs(120), "the agent ConfigMap", || async {
        let out = kubectl(
            &kc,
            &[
                "-n",
                &ns,
                "get",
                "configmap",
                "outrider-agent",
                "-o",
                "json",
            ],
        );
        let cm: Value = serde_json::from_slice(&out.stdout).ok()?;
        let text = cm["data"]["agent.yaml"].as_str()?;
        text.contains("name: logs").then(|| text.to_string())
    })
    .await;
    std::fs::write(&config, rendered).expect("write agent.yaml");
    let agent_ip = pod_ip(&ns, "agent-0").await;
    let _agent = AgentProcess::start(
        &config,
        agent_dir.path(),
        "kwok-node-0",
        &format!("{agent_ip}:{agent_port}"),
    );

    let all_healthy: Vec<(&str, &str, &str)> = vec![
        ("Inventory", "fleet", "Healthy"),
        ("Inventory", "fw-fleet", "Healthy"),
        ("DeploymentPlan", "deploy", "Healthy"),
        ("HealthCheck", "alive", "Healthy"),
        ("SecurityPolicy", "fw", "Healthy"),
        ("LogPipeline", "logs", "Healthy"),
    ];
    wait_all_healthy(
        &kc,
        &app_name,
        &rev1,
        &all_healthy,
        Duration::from_secs(240),
    )
    .await;

    // a commit that breaks the plan: the new run fails on the host -> Degraded
    let broken = plan_yaml(&ns, "echo broken >&2; exit 3", false);
    let rev2 = git_repo.commit(&[("plan.yaml", &broken)], "break the plan");
    refresh(&kc, &app_name);
    let app = wait_app(
        &kc,
        &app_name,
        Duration::from_secs(120),
        "the broken plan Degraded",
        |app| synced_with(app, &rev2, &[("DeploymentPlan", "deploy", "Degraded")]),
    )
    .await;
    let (_, _, message) = resource(&app, "DeploymentPlan", "deploy").expect("plan");
    assert!(message.contains("exit code 3"), "{message}");
    assert_eq!(
        app["status"]["health"]["status"],
        "Degraded",
        "{}",
        summary(&app)
    );

    // a commit that fixes the script and pauses the plan: the new run waits -> Suspended
    let paused = plan_yaml(&ns, "echo v2 on $(hostname)", true);
    let rev3 = git_repo.commit(&[("plan.yaml", &paused)], "fix and pause the plan");
    refresh(&kc, &app_name);
    let app = wait_app(
        &kc,
        &app_name,
        Duration::from_secs(120),
        "the paused plan Suspended",
        |app| synced_with(app, &rev3, &[("DeploymentPlan", "deploy", "Suspended")]),
    )
    .await;
    println!("paused:\n{}", summary(&app));

    // unpausing resumes the same run -> Healthy
    let resumed = plan_yaml(&ns, "echo v2 on $(hostname)", false);
    let rev4 = git_repo.commit(&[("plan.yaml", &resumed)], "resume the plan");
    refresh(&kc, &app_name);
    let app = wait_app(
        &kc,
        &app_name,
        Duration::from_secs(120),
        "every kind Healthy again",
        |app| synced_with(app, &rev4, &all_healthy),
    )
    .await;

    // No drift after reconcile: the controller's status writes, its finalizer and the CRD
    // defaults filled in by the API server must not make Argo CD see the app OutOfSync, nor make
    // automated sync (selfHeal) apply again. Several refreshes later, still Synced, and no new
    // sync operation started.
    let last_sync = app["status"]["operationState"]["finishedAt"].clone();
    let app = refresh_a_few_times(&kc, &app_name).await;
    assert!(
        synced_with(&app, &rev4, &all_healthy),
        "drift after reconcile:\n{}",
        summary(&app)
    );
    assert_eq!(
        app["status"]["operationState"]["finishedAt"],
        last_sync,
        "Argo CD synced again although nothing was committed:\n{}",
        summary(&app)
    );
    // one sync per commit over the whole test: selfHeal never had drift to undo
    assert_eq!(
        synced_revisions(&app),
        [rev1.as_str(), rev2.as_str(), rev3.as_str(), rev4.as_str()],
        "sync history (a revision twice is a self-heal sync):\n{}",
        summary(&app)
    );

    // and what is live equals what is committed
    assert_live_equals_committed(&kc, &ns, &git_repo.deploy());
    println!("argocd e2e ({mode:?}) took {:?}", started.elapsed());
}

// ------------------------------------------------------------- the examples on the demo fleet

/// `e2e/demo.sh` with `OUTRIDER_DEMO_APPLY=0`: the demo fleet (three network-namespace hosts with
/// sshd), its Secret in the namespace, the controller, VictoriaLogs and the node agent, but the
/// examples left to Argo CD. In a slot and a temp state dir of its own; `down` when dropped
/// unless the test did it.
struct DemoFleet {
    slot: u32,
    dir: tempfile::TempDir,
    cluster: PathBuf,
    down: bool,
}

impl DemoFleet {
    fn new(kc: &Path) -> Self {
        // the demo test of this same process takes pid % 250 + 1: stay half the range away
        Self {
            slot: (std::process::id() + 125) % 250 + 1,
            dir: tempfile::Builder::new()
                .prefix("outrider-argocd-demo-")
                .tempdir()
                .expect("tempdir"),
            cluster: cluster_dir(kc),
            down: false,
        }
    }

    fn run(&self, arg: &str) -> std::process::Output {
        Command::new(repo().join("e2e/demo.sh"))
            .arg(arg)
            .env("OUTRIDER_CLUSTER_DIR", &self.cluster)
            .env("OUTRIDER_DEMO_DIR", self.dir.path())
            .env("OUTRIDER_DEMO_SLOT", self.slot.to_string())
            .env("OUTRIDER_DEMO_APPLY", "0")
            .env("OUTRIDER_BIN", env!("CARGO_BIN_EXE_outrider"))
            .stdin(std::process::Stdio::null())
            .output()
            .expect("running e2e/demo.sh (is bash installed?)")
    }

    fn namespace(&self) -> String {
        format!("outrider-demo-{}", self.slot)
    }
}

impl Drop for DemoFleet {
    fn drop(&mut self) {
        if !self.down {
            let out = self.run("down");
            if !out.status.success() {
                eprintln!("e2e/demo.sh down failed:\n{}", stderr(&out));
            }
        }
    }
}

/// The `*.yaml` file names in `dir`, sorted.
fn yaml_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    names
}

/// `(kind, name)` of every document in `text`.
fn objects_in(text: &str) -> Vec<(String, String)> {
    serde_yaml::Deserializer::from_str(text)
        .filter_map(|doc| {
            let v = serde_yaml::Value::deserialize(doc).expect("example yaml");
            let s = |v: &serde_yaml::Value| v.as_str().map(str::to_string);
            Some((s(&v["kind"])?, s(&v["metadata"]["name"])?))
        })
        .collect()
}

/// GitOps as a user runs it, with nothing made up for the test: the repository's own
/// `examples/`, exactly the files a user reads (rendered by `e2e/demo.sh` for the slot's addresses,
/// log dir and store port), committed to Git; Argo CD syncs them onto the demo fleet, every
/// resource's own health turns Healthy, the app stays Synced without a second sync, and the live
/// objects equal the committed files.
#[tokio::test]
async fn argocd_syncs_the_examples_onto_the_demo_fleet_and_every_kind_turns_healthy_without_drift()
{
    let started = Instant::now();
    let kc = kubeconfig();
    argocd_up(&kc);
    let mut demo = DemoFleet::new(&kc);
    let ns = demo.namespace();
    let out = demo.run("up");
    assert!(
        out.status.success(),
        "OUTRIDER_DEMO_APPLY=0 e2e/demo.sh up failed:\n{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    println!(
        "demo fleet in slot {} up after {:?}",
        demo.slot,
        started.elapsed()
    );
    let rendered = PathBuf::from(stdout(&out).lines().last().unwrap_or_default());
    assert_eq!(
        rendered,
        demo.dir.path().join("demo/examples"),
        "the last line demo.sh prints is the rendered examples' dir:\n{}",
        stdout(&out)
    );

    // every example, none left out, none added
    let names = yaml_names(&rendered);
    assert_eq!(names, yaml_names(&repo().join("examples")));
    let mut files = Vec::new();
    let mut managed = Vec::new();
    for name in &names {
        let text = std::fs::read_to_string(rendered.join(name)).expect("rendered example");
        assert!(
            !text.contains("198.19.0."),
            "{name} still names slot 0's fleet:\n{text}"
        );
        managed.extend(objects_in(&text));
        files.push((name.as_str(), text));
    }
    managed.sort();
    for kind in KINDS {
        assert!(
            managed.iter().any(|(k, _)| k == kind),
            "no {kind} in examples/: {managed:?}"
        );
    }
    let git_repo = GitRepo::new();
    let refs: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let rev = git_repo.commit(&refs, "examples/ for the demo fleet");

    let app_name = format!("outrider-{ns}");
    apply(
        &kc,
        &application_yaml(&app_name, &git_repo.url(), &ns, Mode::ClientSide),
    );
    let guard = AppGuard {
        kc: &kc,
        name: app_name.clone(),
    };
    let want: Vec<(&str, &str, &str)> = managed
        .iter()
        .map(|(k, n)| (k.as_str(), n.as_str(), "Healthy"))
        .collect();
    let app = wait_all_healthy(&kc, &app_name, &rev, &want, Duration::from_secs(360)).await;
    // Argo CD manages the examples and nothing else (the Secret, the agent's Pod and ConfigMap,
    // the plan's Job are not the app's)
    let mut listed: Vec<(String, String)> = app["status"]["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
            (s(&r["kind"]), s(&r["name"]))
        })
        .collect();
    listed.sort();
    assert_eq!(listed, managed, "{}", summary(&app));

    // no drift after reconcile: still Synced and Healthy, no sync but the first
    let last_sync = app["status"]["operationState"]["finishedAt"].clone();
    let app = refresh_a_few_times(&kc, &app_name).await;
    assert!(
        synced_with(&app, &rev, &want),
        "drift after reconcile:\n{}",
        summary(&app)
    );
    assert_eq!(
        app["status"]["operationState"]["finishedAt"],
        last_sync,
        "Argo CD synced again although nothing was committed:\n{}",
        summary(&app)
    );
    assert_eq!(
        synced_revisions(&app),
        [rev.as_str()],
        "sync history (a revision twice is a self-heal sync):\n{}",
        summary(&app)
    );
    assert_live_equals_committed(&kc, &ns, &git_repo.deploy());

    // the end: the Application goes first (no finalizer: the examples stay, nothing syncs them
    // back while the demo takes its namespace down), then the demo
    drop(guard);
    eventually(
        Duration::from_secs(30),
        "the Application deleted",
        || async {
            let out = kubectl(
                &kc,
                &["-n", APPS_NS, "get", "application", &app_name, "-o", "name"],
            );
            (!out.status.success() && stderr(&out).contains("NotFound")).then_some(())
        },
    )
    .await;
    demo.down = true;
    let out = demo.run("down");
    assert!(
        out.status.success(),
        "e2e/demo.sh down failed:\n{}",
        stderr(&out)
    );
    let out = kubectl(&kc, &["get", "namespace", &ns, "-o", "name"]);
    assert!(
        !out.status.success() && stderr(&out).contains("NotFound"),
        "namespace {ns} is left: {}{}",
        stdout(&out),
        stderr(&out)
    );
    println!(
        "argocd e2e (the examples on the demo fleet) took {:?}",
        started.elapsed()
    );
}

/// Waits until the app is Synced at `rev` with every resource of `want` in its health, and
/// checks the app's own health rolls them up to Healthy.
async fn wait_all_healthy(
    kc: &std::path::Path,
    app_name: &str,
    rev: &str,
    want: &[(&str, &str, &str)],
    timeout: Duration,
) -> serde_json::Value {
    let t = Instant::now();
    let app = wait_app(
        kc,
        app_name,
        timeout,
        "every resource Healthy, app Synced",
        |app| synced_with(app, rev, want),
    )
    .await;
    println!(
        "synced and every resource Healthy after {:?}:\n{}",
        t.elapsed(),
        summary(&app)
    );
    assert_eq!(
        app["status"]["health"]["status"],
        "Healthy",
        "the app's own health rolls the resources up:\n{}",
        summary(&app)
    );
    app
}
