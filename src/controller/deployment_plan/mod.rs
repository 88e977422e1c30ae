//! DeploymentPlan controller: resolve the Inventory and its Secret → convert the spec →
//! start the run as a background task (one per plan) that drives the engine
//! ([`plan::run_plan`]) and turns its events into status, Events and metrics. Reconcile
//! returns at once; status is the durable record a restarted controller resumes from.
//!
//! A run is identified by a key: a hash of the spec without `paused`, plus the value of the
//! `outrider.dev/rerun` annotation. Toggling `paused` pauses/resumes the same run; any other
//! spec edit, or a new annotation value, stops the run at the next host boundary and
//! starts a new one. `status.progress` keeps the key, a fingerprint of the host list and
//! the engine's [`ResumeState`].
//!
//! `job:` stages run as `batch/v1` Jobs owned by the plan (`ClusterRunner`); SSH stages
//! go through [`SshRunner`]. The finalizer `outrider.dev/cleanup` stops a deleted plan's
//! run and deletes its Jobs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::conditions::{self, Desired};
use super::runtime;
use super::{Context, Error, status};
use crate::api::deployment_plan::{
    self as api, BatchProgress, DeploymentPlan, DeploymentPlanStatus, HostCounts, PlanPhase,
    RERUN_ANNOTATION, StageProgress,
};
use crate::api::inventory::Inventory;
use crate::engine::plan::{
    self, Control, Phase, PlanEvent, PlanSpec, ResumeState, SshRunner, StageAction,
};
use crate::ssh::{Credentials, Endpoint, Fleet};
use crate::targets;
use crate::telemetry::ResultLabel;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{EnvVar, Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use kube::api::{DeleteParams, ListParams, PostParams};

const KIND: &str = "DeploymentPlan";
/// Finalizer that lets a deleted plan's run stop before the plan is gone.
pub const FINALIZER: &str = "outrider.dev/cleanup";
const READY: &str = "Ready";
const PROGRESSING: &str = "Progressing";
const FAILED: &str = "Failed";
/// Labels of a plan's Jobs.
const PLAN_LABEL: &str = "outrider.dev/plan";
const STAGE_LABEL: &str = "outrider.dev/stage";
/// Finished Jobs are deleted this long after they end.
const JOB_TTL_SECONDS: i32 = 3600;
/// Poll interval of a running Job when there is no Job watch (never in the controller).
const JOB_POLL: Duration = Duration::from_secs(1);
/// A Job stage waiting on the watch still asks the API server this often (a backstop).
const JOB_RECHECK: Duration = Duration::from_secs(30);
/// Most failures listed in status (the schema's limit).
const MAX_FAILURES: usize = 100;
/// Most `HostFailed` Events per run; the rest are summed up in one Event at the end.
const MAX_FAILURE_EVENTS: usize = 10;
/// Status writes of a run are coalesced to at most one per this interval (plus a final one).
const WRITE_INTERVAL: Duration = Duration::from_millis(250);
/// Without events for this long, a run checks that its plan still exists.
const LIVENESS_INTERVAL: Duration = Duration::from_secs(5);
/// Retry interval while the Inventory or Secret is missing or invalid.
const NOT_READY_RETRY: Duration = Duration::from_secs(5);
/// How long shutdown waits for runs to reach a host boundary before cancelling them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// One plan's run in progress (or just finished), owned by the controller context.
struct RunHandle {
    key: String,
    control: watch::Sender<Control>,
    task: JoinHandle<()>,
    /// `metadata.generation` the run's status reports as observed (pausing changes it
    /// without starting a new run).
    generation: Arc<AtomicI64>,
}

/// The runs of every plan, by `namespace/name`.
#[derive(Default)]
pub struct Runs {
    runs: Mutex<HashMap<String, RunHandle>>,
    /// The shared watch of the plans' Jobs, set when the controller starts.
    jobs: std::sync::OnceLock<JobWatch>,
}

impl Runs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, RunHandle>> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops every run (at the next host boundary), waits up to `grace`, then cancels the
    /// rest. Status keeps whatever they recorded, so a successor resumes them.
    async fn shutdown(&self, grace: Duration) {
        let handles: Vec<RunHandle> = self.lock().drain().map(|(_, h)| h).collect();
        for h in &handles {
            let _ = h.control.send(Control::Stop);
        }
        let deadline = tokio::time::Instant::now() + grace;
        for h in handles {
            let abort = h.task.abort_handle();
            if tokio::time::timeout_at(deadline, h.task).await.is_err() {
                abort.abort();
            }
        }
    }
}

/// What `status.progress` holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Progress {
    /// Run key: hash of the spec without `paused`, and the rerun annotation.
    key: String,
    /// Fingerprint of the run's host list (a changed list cannot be resumed).
    hosts: String,
    #[serde(default)]
    state: ResumeState,
}

/// FNV-1a, stable across builds and platforms (unlike `DefaultHasher`).
fn fnv(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn rerun_value(dp: &DeploymentPlan) -> Option<&str> {
    dp.annotations().get(RERUN_ANNOTATION).map(String::as_str)
}

/// The run key of a plan as it is now.
fn run_key(dp: &DeploymentPlan) -> String {
    let mut spec = dp.spec.clone();
    spec.paused = false;
    let json = serde_json::to_vec(&spec).unwrap_or_default();
    match rerun_value(dp) {
        Some(v) => format!("{}/{}", fnv(&json), fnv(v.as_bytes())),
        None => fnv(&json),
    }
}

/// `status.run`: the generation the run started at, plus the rerun annotation.
fn run_id(dp: &DeploymentPlan) -> String {
    let generation = dp.metadata.generation.unwrap_or(0);
    match rerun_value(dp) {
        Some(v) => runtime::truncate(format!("{generation}/{v}"), 128),
        None => generation.to_string(),
    }
}

fn hosts_fingerprint(hosts: &[Endpoint]) -> String {
    let text: Vec<String> = hosts
        .iter()
        .map(|h| format!("{}={}:{}", h.name, h.address, h.port))
        .collect();
    fnv(text.join(",").as_bytes())
}

fn progress_of(status: Option<&DeploymentPlanStatus>) -> Option<Progress> {
    status
        .and_then(|s| s.progress.clone())
        .and_then(|v| serde_json::from_value(v).ok())
}

fn terminal(phase: Option<PlanPhase>) -> bool {
    matches!(
        phase,
        Some(PlanPhase::Succeeded | PlanPhase::Failed | PlanPhase::RolledBack)
    )
}

/// Runs the DeploymentPlan controller until `stop` fires, then stops the runs.
pub async fn run(ctx: Arc<Context>, stop: CancellationToken) {
    let (plans, secrets, inventories, jobs) = match &ctx.namespace {
        Some(ns) => (
            Api::namespaced(ctx.client.clone(), ns),
            Api::<PartialObjectMeta<Secret>>::namespaced(ctx.client.clone(), ns),
            Api::<PartialObjectMeta<Inventory>>::namespaced(ctx.client.clone(), ns),
            Api::<Job>::namespaced(ctx.client.clone(), ns),
        ),
        None => (
            Api::all(ctx.client.clone()),
            Api::<PartialObjectMeta<Secret>>::all(ctx.client.clone()),
            Api::<PartialObjectMeta<Inventory>>::all(ctx.client.clone()),
            Api::<Job>::all(ctx.client.clone()),
        ),
    };
    let (job_watch, job_changes) = JobWatch::start(jobs);
    let _ = ctx.plans.jobs.set(job_watch);
    let queue = runtime::queue_depth(&ctx, KIND);
    let (trigger, store) = runtime::watch::<DeploymentPlan>(plans, queue.clone());
    let secret_changes = watcher(secrets, watcher::Config::default().any_semantic())
        .default_backoff()
        .touched_objects();
    let inventory_changes = watcher(inventories, watcher::Config::default().any_semantic())
        .default_backoff()
        .touched_objects();
    let by_secret = store.clone();
    let by_inventory = store.clone();
    Controller::for_stream(trigger, store)
        .owns_stream(job_changes)
        .watches_stream(secret_changes, move |secret: PartialObjectMeta<Secret>| {
            // the plan names its Inventory, not the Secret: wake the plans still waiting
            runtime::referrers(&by_secret, secret.namespace(), |dp: &DeploymentPlan| {
                dp.status
                    .as_ref()
                    .is_some_and(|s| s.phase == Some(PlanPhase::Pending))
            })
        })
        .watches_stream(
            inventory_changes,
            move |inv: PartialObjectMeta<Inventory>| {
                let name = inv.name_any();
                runtime::referrers(&by_inventory, inv.namespace(), |dp: &DeploymentPlan| {
                    dp.spec.targets.inventory_ref.name == name
                })
            },
        )
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(
            move |obj, ctx| {
                queue.started(&runtime::object_key(obj.as_ref()));
                reconcile(obj, ctx)
            },
            runtime::error_policy,
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()))
        .await;
    ctx.plans.shutdown(SHUTDOWN_GRACE).await;
}

/// Why a plan cannot start, as the Ready condition says it.
fn not_ready(reason: &'static str, message: String) -> Desired {
    Desired::new(READY, false, reason, message)
}

/// Everything a run needs, resolved from the plan, its Inventory and its Secret.
struct Resolved {
    spec: PlanSpec,
    hosts: Vec<Endpoint>,
    runner: SshRunner,
}

async fn resolve(ctx: &Context, ns: &str, dp: &DeploymentPlan) -> Result<Resolved, DesiredOr> {
    let spec = targets::plan_spec(&dp.spec)
        .map_err(|e| DesiredOr::Desired(not_ready("InvalidSpec", e.to_string())))?;
    let inv_name = &dp.spec.targets.inventory_ref.name;
    let inv = Api::<Inventory>::namespaced(ctx.client.clone(), ns)
        .get_opt(inv_name)
        .await
        .map_err(DesiredOr::Kube)?
        .ok_or_else(|| {
            DesiredOr::Desired(not_ready(
                "InventoryNotFound",
                format!(
                    "Inventory {inv_name:?} (spec.targets.inventoryRef) does not exist in this namespace"
                ),
            ))
        })?;
    let secret_name = &inv.spec.ssh.secret_ref.name;
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), ns)
        .get_opt(secret_name)
        .await
        .map_err(DesiredOr::Kube)?
        .ok_or_else(|| {
            DesiredOr::Desired(not_ready(
                "SecretNotFound",
                format!(
                    "Secret {secret_name:?} (spec.ssh.secretRef of Inventory {inv_name:?}) does not exist in this namespace"
                ),
            ))
        })?;
    let lookup = |key: &str| runtime::secret_value(&secret, key);
    let invalid = |e: String| DesiredOr::Desired(not_ready("SecretInvalid", e));
    let material = targets::ssh_material(secret_name, inv.spec.ssh.host_key_policy, lookup)
        .map_err(|e| invalid(e.to_string()))?;
    let credentials = Credentials::new(
        &material.private_key,
        material.passphrase.as_deref(),
        &material.known_hosts,
    )
    .map_err(|e| invalid(format!("Secret {secret_name:?}: {e}")))?;
    let config = targets::client_config(&inv)
        .map_err(|e| DesiredOr::Desired(not_ready("InvalidInventory", e.to_string())))?;
    let hosts = targets::endpoints(&inv, dp.spec.targets.selector.as_ref())
        .map_err(|e| DesiredOr::Desired(not_ready("InvalidSpec", format!("spec.{e}"))))?;
    if hosts.is_empty() {
        return Err(DesiredOr::Desired(not_ready(
            "NoTargets",
            format!("no host of Inventory {inv_name:?} matches spec.targets.selector"),
        )));
    }
    let fleet = Fleet::new(config, credentials).with_handshakes(16);
    Ok(Resolved {
        spec,
        hosts,
        runner: SshRunner::new(fleet),
    })
}

/// A resolve failure: a condition for the user, or an API error to retry.
enum DesiredOr {
    Desired(Desired),
    Kube(kube::Error),
}

async fn reconcile(
    guard: Arc<DeserializeGuard<DeploymentPlan>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started(KIND);
    let key = runtime::object_key(guard.as_ref());
    let ns = guard.namespace().ok_or(Error::NoNamespace)?;
    let Some(dp) = runtime::readable(&ctx, guard.as_ref()).await else {
        return Ok(Action::await_change());
    };
    let api: Api<DeploymentPlan> = Api::namespaced(ctx.client.clone(), &ns);
    let action = finalizer(&api, FINALIZER, Arc::new(dp.clone()), |event| async {
        match event {
            FinalizerEvent::Apply(dp) => apply(&ctx, &api, &ns, &dp).await,
            FinalizerEvent::Cleanup(dp) => cleanup(&ctx, &ns, &dp).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))?;
    ctx.backoff.reset(&key);
    Ok(action)
}

/// Stops the plan's run when the plan is deleted. The run task cancels itself once the
/// plan is gone; it is aborted if it has not reached a host boundary within the grace.
/// Idempotent: a plan without a run has nothing to clean up.
async fn cleanup(ctx: &Context, ns: &str, dp: &DeploymentPlan) -> Result<Action, Error> {
    let plan_key = format!("{ns}/{}", dp.name_any());
    if let Some(h) = ctx.plans.lock().remove(&plan_key) {
        let _ = h.control.send(Control::Stop);
        let abort = h.task.abort_handle();
        tokio::spawn(async move {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
            abort.abort();
        });
    }
    // owned Jobs would be garbage-collected too; deleting them now stops their pods at once
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), ns);
    let selector = format!("{PLAN_LABEL}={}", dp.name_any());
    match jobs
        .delete_collection(
            &DeleteParams::background(),
            &ListParams::default().labels(&selector),
        )
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Action::await_change())
}

/// Starts, steers or replaces the plan's run (the finalizer is in place).
async fn apply(
    ctx: &Arc<Context>,
    api: &Api<DeploymentPlan>,
    ns: &str,
    dp: &DeploymentPlan,
) -> Result<Action, Error> {
    let plan_key = format!("{ns}/{}", dp.name_any());
    let run_key = run_key(dp);
    let wanted = if dp.spec.paused {
        Control::Pause
    } else {
        Control::Run
    };

    // A run of this plan exists: steer it, or stop it when the run key changed.
    enum Existing {
        Steered,
        Finished,
        Replaced(RunHandle),
        None,
    }
    let existing = {
        let mut runs = ctx.plans.lock();
        match runs.get(&plan_key) {
            Some(h) if h.key == run_key && !h.task.is_finished() => {
                h.generation
                    .store(dp.metadata.generation.unwrap_or(0), Ordering::SeqCst);
                h.control.send_if_modified(|c| {
                    let changed = *c != wanted && *c != Control::Stop;
                    if changed {
                        *c = wanted;
                    }
                    changed
                });
                Existing::Steered
            }
            Some(h) if h.key == run_key => Existing::Finished,
            Some(_) => runs
                .remove(&plan_key)
                .map_or(Existing::None, Existing::Replaced),
            None => Existing::None,
        }
    };
    let previous = match existing {
        Existing::Steered => {
            return Ok(Action::requeue(runtime::RESYNC));
        }
        Existing::Finished => {
            // status is final; only observedGeneration may need to follow
            observe_generation(api, dp).await?;
            return Ok(Action::requeue(runtime::RESYNC));
        }
        Existing::Replaced(h) => Some(h),
        Existing::None => None,
    };
    if let Some(old) = &previous {
        let _ = old.control.send(Control::Stop);
    }

    let old_status = dp.status.clone().unwrap_or_default();
    let progress = progress_of(dp.status.as_ref());
    let same_run = progress.as_ref().is_some_and(|p| p.key == run_key);
    if previous.is_none() && same_run && terminal(old_status.phase) {
        observe_generation(api, dp).await?;
        return Ok(Action::requeue(runtime::RESYNC));
    }

    let resolved = match resolve(ctx, ns, dp).await {
        Ok(r) => r,
        Err(DesiredOr::Kube(e)) => return Err(e.into()),
        Err(DesiredOr::Desired(ready)) => {
            // keep the old run's task stopped; report why nothing runs
            if let Some(old) = previous {
                old.task.abort();
            }
            write_not_ready(ctx, api, dp, &old_status, &ready).await?;
            return Ok(Action::requeue(NOT_READY_RETRY));
        }
    };

    let fingerprint = hosts_fingerprint(&resolved.hosts);
    let resume = match progress {
        Some(p)
            if previous.is_none()
                && p.key == run_key
                && p.hosts == fingerprint
                && matches!(
                    old_status.phase,
                    Some(PlanPhase::Running | PlanPhase::Paused)
                ) =>
        {
            Some(p.state)
        }
        _ => None,
    };
    let (control, control_rx) = watch::channel(wanted);
    let generation = Arc::new(AtomicI64::new(dp.metadata.generation.unwrap_or(0)));
    let run = PlanRun {
        generation: generation.clone(),
        ctx: ctx.clone(),
        api: api.clone(),
        plan: dp.clone(),
        run_id: if resume.is_some() {
            old_status.run.clone().unwrap_or_else(|| run_id(dp))
        } else {
            run_id(dp)
        },
        progress_key: run_key.clone(),
        fingerprint,
        old_status: resume.is_some().then_some(old_status),
    };
    let wait_for = previous.map(|p| p.task);
    let task = tokio::spawn(async move {
        if let Some(old) = wait_for {
            // the old run stops at its next host boundary; its last write comes first
            let _ = old.await;
        }
        run.drive(resolved, resume, control_rx).await;
    });
    ctx.plans.lock().insert(
        plan_key,
        RunHandle {
            key: run_key,
            control,
            task,
            generation,
        },
    );
    Ok(Action::requeue(runtime::RESYNC))
}

/// A finished run's status with `observedGeneration` (and its conditions') moved to the
/// current generation, e.g. after `paused` was toggled on a finished plan.
async fn observe_generation(api: &Api<DeploymentPlan>, dp: &DeploymentPlan) -> Result<(), Error> {
    let Some(old) = dp.status.as_ref() else {
        return Ok(());
    };
    let mut new = old.clone();
    new.observed_generation = dp.metadata.generation;
    for c in &mut new.conditions {
        c.observed_generation = dp.metadata.generation;
    }
    status::apply_if_changed(api, &dp.name_any(), Some(old), &new).await?;
    Ok(())
}

/// Records why the plan cannot run (phase Pending, Ready=False) and, on a change, an Event.
async fn write_not_ready(
    ctx: &Context,
    api: &Api<DeploymentPlan>,
    dp: &DeploymentPlan,
    old: &DeploymentPlanStatus,
    ready: &Desired,
) -> Result<(), Error> {
    let progressing = Desired::new(PROGRESSING, false, ready.reason, ready.message.clone());
    let new = DeploymentPlanStatus {
        observed_generation: dp.metadata.generation,
        run: Some(run_id(dp)),
        phase: Some(PlanPhase::Pending),
        conditions: conditions::merge(
            &old.conditions,
            &[ready.clone(), progressing],
            dp.metadata.generation,
            &Time(Timestamp::now()),
        ),
        ..Default::default()
    };
    let transitioned =
        conditions::find(&old.conditions, READY).is_none_or(|c| c.reason != ready.reason);
    status::apply_if_changed(api, &dp.name_any(), dp.status.as_ref(), &new).await?;
    if transitioned {
        runtime::publish_event(
            ctx,
            dp,
            EventType::Warning,
            ready.reason,
            ready.message.clone(),
        )
        .await;
    }
    Ok(())
}

mod jobs;
mod run_task;

use jobs::{ClusterRunner, JobWatch};
use run_task::PlanRun;

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(yaml: &str) -> DeploymentPlan {
        serde_yaml::from_str(yaml).expect("plan yaml")
    }

    const PLAN: &str = r#"
apiVersion: outrider.dev/v1alpha1
kind: DeploymentPlan
metadata: {name: p, namespace: n, generation: 3}
spec:
  targets: {inventoryRef: {name: fleet}}
  stages: [{name: a, script: "true"}]
"#;

    #[test]
    fn pausing_keeps_the_run_key_but_edits_and_reruns_change_it() {
        let base = plan(PLAN);
        let mut paused = base.clone();
        paused.spec.paused = true;
        paused.metadata.generation = Some(4);
        assert_eq!(run_key(&base), run_key(&paused));
        let mut edited = base.clone();
        edited.spec.stages[0].script = Some("false".into());
        assert_ne!(run_key(&base), run_key(&edited));
        let mut rerun = base.clone();
        rerun
            .annotations_mut()
            .insert(RERUN_ANNOTATION.into(), "x".into());
        assert_ne!(run_key(&base), run_key(&rerun));
        assert_eq!(run_id(&rerun), "3/x");
        assert_eq!(run_id(&base), "3");
    }

    #[test]
    fn progress_round_trips_through_status_json() {
        let p = Progress {
            key: "k".into(),
            hosts: "h".into(),
            state: ResumeState {
                done: (0..5000).collect(),
                ..Default::default()
            },
        };
        let status = DeploymentPlanStatus {
            progress: serde_json::to_value(&p).ok(),
            ..Default::default()
        };
        let json = serde_json::to_string(&status).expect("json");
        assert!(json.len() < 200, "{json}");
        let back: DeploymentPlanStatus = serde_json::from_str(&json).expect("parse");
        assert_eq!(progress_of(Some(&back)), Some(p));
    }
}
