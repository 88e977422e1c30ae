//! DeploymentPlan controller: resolve the Inventory and its Secret → convert the spec →
//! start the run as a background task (one per plan) that drives the engine
//! ([`plan::run_plan`]) and turns its events into status, Events and metrics. Reconcile
//! returns at once; status is the durable record a restarted controller resumes from.
//!
//! A run is identified by a key over what the user wrote (see
//! [`crate::resolve::deployment_plan::run_key`]): the stored spec without `paused`, plus the
//! value of the `outrider.dev/rerun` annotation. Toggling `paused` pauses/resumes the same
//! run; any other spec edit, or a new annotation value, stops the run at the next host
//! boundary and starts a new one. `status.progress` keeps a format version, the key, a
//! fingerprint of the host list and the engine's [`ResumeState`]; a progress this version
//! cannot read is reported (`Ready=False/ProgressUnreadable`), never silently restarted.
//! Runs are tasks of the shared [`tasks::Registry`](super::tasks::Registry).
//!
//! `job:` stages run as `batch/v1` Jobs owned by the plan (`ClusterRunner`); SSH stages
//! go through [`SshRunner`]. The finalizer `outrider.dev/cleanup` stops a deleted plan's
//! run and deletes its Jobs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::{Api, ResourceExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::conditions::{self, Desired, NotReady, READY};
use super::runtime::{self, Obj, Shared};
use super::tasks::{Found, Steer};
use super::{At, Context, Error, Stage, status};
use crate::api::deployment_plan::{
    self as api, BatchProgress, DeploymentPlan, DeploymentPlanStatus, HostCounts, PlanPhase,
    RERUN_ANNOTATION, StageProgress,
};
use crate::api::inventory::Inventory;
use crate::engine::plan::{
    self, Control, Phase, PlanEvent, PlanSpec, ResumeState, SshRunner, StageAction,
};
use crate::resolve::deployment_plan::{self as resolve_plan, fnv};
use crate::resolve::inventory as resolve_inv;
use crate::ssh::Endpoint;
use crate::telemetry::ResultLabel;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{EnvVar, Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use kube::api::{DeleteParams, ListParams, PostParams};

const KIND: &str = "DeploymentPlan";
/// Finalizer that lets a deleted plan's run stop before the plan is gone.
pub const FINALIZER: &str = "outrider.dev/cleanup";
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
/// Attempts of a run's final status write before giving up until the next reconcile.
const FINAL_WRITE_ATTEMPTS: u32 = 12;
/// The `status.progress` format this version writes and reads.
const PROGRESS_VERSION: u32 = 2;

/// Steers one plan's run task.
struct PlanSteer {
    control: watch::Sender<Control>,
    /// `metadata.generation` the run's status reports as observed (pausing changes it
    /// without starting a new run).
    generation: Arc<AtomicI64>,
}

impl Steer for PlanSteer {
    fn stop(&self) {
        let _ = self.control.send(Control::Stop);
    }
}

/// What the DeploymentPlan controller keeps besides the shared [`Context`].
pub(super) struct PlanState {
    /// The shared watch of the plans' Jobs.
    jobs: JobWatch,
    /// Run keys by plan uid, computed once per generation from the stored spec.
    keys: Mutex<HashMap<String, (i64, String)>>,
    /// The shared Inventory cache (the plans' targets are read from it, not fetched).
    inventories: kube::runtime::reflector::Store<kube::core::DeserializeGuard<Inventory>>,
}

/// What `status.progress` holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Progress {
    /// Format version ([`PROGRESS_VERSION`]); absent in Outrider 0.1's progress.
    #[serde(default, skip_serializing_if = "is_zero")]
    v: u32,
    /// Run key (see [`resolve_plan::run_key`]).
    key: String,
    /// Fingerprint of the run's host list (a changed list cannot be resumed).
    hosts: String,
    #[serde(default)]
    state: ResumeState,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// What a plan's `status.progress` says, as far as this version can tell.
#[derive(Debug, PartialEq)]
enum Recorded {
    None,
    Readable(Box<Progress>),
    /// Written in a form this version cannot read: never restarted silently.
    Unreadable(String),
}

fn recorded(status: Option<&DeploymentPlanStatus>) -> Recorded {
    let Some(value) = status.and_then(|s| s.progress.as_ref()) else {
        return Recorded::None;
    };
    match serde_json::from_value::<Progress>(value.clone()) {
        Ok(p) if p.v <= PROGRESS_VERSION => Recorded::Readable(Box::new(p)),
        Ok(p) => Recorded::Unreadable(format!(
            "status.progress has format version {} but this controller reads up to {PROGRESS_VERSION} (a newer Outrider wrote it)",
            p.v
        )),
        Err(e) => Recorded::Unreadable(format!("status.progress cannot be read: {e}")),
    }
}

/// Whether `progress` records the run `key` identifies (an Outrider 0.1 progress is
/// matched by its own key scheme, so upgrading never reruns finished plans).
fn same_run(progress: &Progress, key: &str, legacy_key: &str) -> bool {
    if progress.v == 0 {
        progress.key == legacy_key
    } else {
        progress.key == key
    }
}

fn rerun_value(dp: &DeploymentPlan) -> Option<&str> {
    dp.annotations().get(RERUN_ANNOTATION).map(String::as_str)
}

/// `status.run`: the generation the run started at, plus the rerun annotation.
fn run_id(dp: &DeploymentPlan) -> String {
    let generation = dp.metadata.generation.unwrap_or(0);
    match rerun_value(dp) {
        Some(v) => crate::text::clip(format!("{generation}/{v}"), 128),
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

fn terminal(phase: Option<PlanPhase>) -> bool {
    matches!(
        phase,
        Some(PlanPhase::Succeeded | PlanPhase::Failed | PlanPhase::RolledBack)
    )
}

/// Runs the DeploymentPlan controller until `stop` fires.
pub async fn run(ctx: Arc<Context>, shared: &Shared, stop: CancellationToken) {
    let (jobs, job_changes) = JobWatch::start(ctx.tenant_apis::<Job>());
    let state = Arc::new(PlanState {
        jobs,
        keys: Mutex::new(HashMap::new()),
        inventories: shared.inventories.store.clone(),
    });
    let (trigger, store) = runtime::watch::<DeploymentPlan>(ctx.api());
    let (controller, queue) = runtime::controller::<DeploymentPlan>(&ctx, trigger, store.clone());
    let by_secret = store.clone();
    let by_inventory = store;
    let controller = controller
        .owns_stream(job_changes)
        .watches_shared_stream(shared.secrets.subscribe(), move |secret| {
            // the plan names its Inventory, not the Secret: wake the plans still waiting
            runtime::referrers(&by_secret, secret.namespace(), |dp: &DeploymentPlan| {
                dp.status
                    .as_ref()
                    .is_some_and(|s| s.phase == Some(PlanPhase::Pending))
            })
        })
        .watches_shared_stream(
            runtime::changed(shared.inventories.subscribe()),
            move |inv| {
                let name = inv.name_any();
                runtime::referrers(&by_inventory, inv.namespace(), |dp: &DeploymentPlan| {
                    dp.spec.targets.inventory_ref.name == name
                })
            },
        );
    let reconcile = runtime::reconciler(queue, move |dp, ctx| {
        let state = state.clone();
        async move { reconcile(dp, ctx, state).await }
    });
    runtime::drive(controller, stop, ctx, reconcile).await;
}

/// Everything a run needs, resolved from the plan, its Inventory and its Secret.
struct Resolved {
    spec: PlanSpec,
    hosts: Vec<Endpoint>,
    runner: SshRunner,
    /// The Inventory, to pin keys trusted on first use during the run.
    inventory: Inventory,
}

async fn resolve(
    ctx: &Context,
    state: &PlanState,
    ns: &str,
    dp: &DeploymentPlan,
) -> Result<Result<Resolved, NotReady>, Error> {
    let mut spec = match resolve_plan::plan_spec(&dp.spec) {
        Ok(s) => s,
        Err(e) => return Ok(Err(e.into())),
    };
    if let Err(e) = crate::resolve::job_policy::check_jobs(&dp.spec, ctx.allow_privileged_jobs) {
        return Ok(Err(e.into()));
    }
    if let Err(problem) = secret_env_values(ctx, ns, &mut spec).await? {
        return Ok(Err(problem));
    }
    let inv_name = &dp.spec.targets.inventory_ref.name;
    let (inv, secret) =
        match super::inventory::targeted(ctx, &state.inventories, ns, inv_name).await? {
            Ok(found) => found,
            Err(problem) => return Ok(Err(problem)),
        };
    let secret_name = &inv.spec.ssh.secret_ref.name;
    let pins = match super::inventory::read_pins(ctx, &inv).await? {
        Ok(p) => p,
        Err(e) => return Ok(Err(e.into())),
    };
    let built = resolve_inv::fleet(
        &inv,
        resolve_inv::FleetInput {
            secret_name,
            lookup: &|k| runtime::secret_value(&secret, k),
            pins,
            selector: dp.spec.targets.selector.as_ref(),
            selector_field: "spec.targets.selector",
            shared_handshakes: Some(ctx.handshakes.clone()),
        },
    );
    Ok(match built {
        Ok(targets) => Ok(Resolved {
            spec,
            hosts: targets.hosts,
            runner: SshRunner::new(targets.fleet),
            inventory: inv,
        }),
        Err(e) => Err(e.into()),
    })
}

/// Reads the values of every SSH stage's `secretEnv` from Secrets in `ns` (Job stages
/// leave that to the kubelet). The values live only in the resolved spec: never in status,
/// Events or logs (`SecretEnv`'s Debug redacts them).
async fn secret_env_values(
    ctx: &Context,
    ns: &str,
    spec: &mut PlanSpec,
) -> Result<Result<(), NotReady>, Error> {
    let api = ctx.api_in::<k8s_openapi::api::core::v1::Secret>(ns);
    let mut read: HashMap<String, Option<k8s_openapi::api::core::v1::Secret>> = HashMap::new();
    for stage in spec.stages.iter_mut().chain(spec.rollback.iter_mut()) {
        if matches!(stage.action, plan::StageAction::Job(_)) {
            continue;
        }
        for v in &mut stage.secret_env {
            if !read.contains_key(&v.secret) {
                let got = api.get_opt(&v.secret).await.at(Stage::Resolve)?;
                read.insert(v.secret.clone(), got);
            }
            let field = format!("stage {:?} secretEnv {}", stage.name, v.name);
            let Some(Some(secret)) = read.get(&v.secret) else {
                return Ok(Err(NotReady::new(
                    "SecretNotFound",
                    format!(
                        "Secret {:?} ({field}) does not exist in this namespace",
                        v.secret
                    ),
                )));
            };
            let Some(bytes) = runtime::secret_value(secret, &v.key) else {
                return Ok(Err(NotReady::new(
                    "SecretInvalid",
                    format!("Secret {:?} has no key {:?} ({field})", v.secret, v.key),
                )));
            };
            let bytes = zeroize::Zeroizing::new(bytes);
            match std::str::from_utf8(&bytes) {
                Ok(text) if !text.contains('\0') => {
                    v.value = Some(zeroize::Zeroizing::new(text.to_string()))
                }
                _ => {
                    return Ok(Err(NotReady::new(
                        "SecretInvalid",
                        format!(
                            "Secret {:?} key {:?} ({field}) is not text without NUL bytes",
                            v.secret, v.key
                        ),
                    )));
                }
            }
        }
    }
    Ok(Ok(()))
}

/// The run key of `dp` from its stored spec (fetched once per generation: the typed spec
/// re-serialised is not what the user wrote). `None` while the stored object is ahead of
/// the watched one (the watch catches up and reconciles again).
async fn stored_run_key(
    ctx: &Context,
    state: &PlanState,
    ns: &str,
    dp: &DeploymentPlan,
) -> Result<Option<String>, Error> {
    let uid = dp.uid().unwrap_or_default();
    let generation = dp.metadata.generation.unwrap_or(0);
    let cached = state
        .keys
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&uid)
        .filter(|(g, _)| *g == generation)
        .map(|(_, k)| k.clone());
    let base = match cached {
        Some(k) => k,
        None => {
            let ar = ApiResource::erase::<DeploymentPlan>(&());
            let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &ar);
            let Some(raw) = api.get_opt(&dp.name_any()).await.at(Stage::Resolve)? else {
                return Ok(None);
            };
            if raw.metadata.generation != dp.metadata.generation || raw.uid() != dp.uid() {
                return Ok(None);
            }
            let spec = raw.data.get("spec").cloned().unwrap_or_default();
            let key = resolve_plan::run_key(&spec, None);
            state
                .keys
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(uid, (generation, key.clone()));
            key
        }
    };
    Ok(Some(match rerun_value(dp) {
        Some(v) => format!("{base}/{}", fnv(v.as_bytes())),
        None => base,
    }))
}

async fn reconcile(
    dp: Obj<DeploymentPlan>,
    ctx: Arc<Context>,
    state: Arc<PlanState>,
) -> Result<Action, Error> {
    let ns = dp.ns()?;
    let api: Api<DeploymentPlan> = ctx.api_in(&ns);
    finalizer(&api, FINALIZER, Arc::new((*dp).clone()), |event| async {
        match event {
            FinalizerEvent::Apply(dp) => apply(&ctx, &state, &api, &ns, &dp).await,
            FinalizerEvent::Cleanup(dp) => cleanup(&ctx, &state, &ns, &dp).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Stops the plan's run when the plan is deleted. The run task cancels itself once the
/// plan is gone; it is aborted if it has not reached a host boundary within the grace.
/// Idempotent: a plan without a run has nothing to clean up.
async fn cleanup(
    ctx: &Context,
    state: &PlanState,
    ns: &str,
    dp: &DeploymentPlan,
) -> Result<Action, Error> {
    ctx.tasks.stop(&runtime::object_key(dp));
    state
        .keys
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&dp.uid().unwrap_or_default());
    // owned Jobs would be garbage-collected too; deleting them now stops their pods at once
    let jobs: Api<Job> = ctx.api_in(ns);
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
        Err(e) => return Err(e).at(Stage::Cleanup),
    }
    Ok(Action::await_change())
}

/// What to do with a plan whose run is not running here.
#[derive(Debug, PartialEq)]
enum Start {
    /// Status already records this run as finished: nothing to run.
    AlreadyFinished,
    /// Resume this run from the recorded progress.
    Resume(ResumeState),
    /// Start the run from scratch.
    Fresh,
    /// The recorded progress cannot be read: report it, run nothing.
    Unreadable(String),
}

/// The resume decision, from what status records and what the run would be now.
fn decide(
    status: Option<&DeploymentPlanStatus>,
    key: &str,
    legacy_key: &str,
    fingerprint: Option<&str>,
    replacing: bool,
) -> Start {
    let phase = status.and_then(|s| s.phase);
    match recorded(status) {
        Recorded::Unreadable(why) if !replacing => Start::Unreadable(why),
        Recorded::Readable(p) if !replacing && same_run(&p, key, legacy_key) => {
            if terminal(phase) {
                Start::AlreadyFinished
            } else if matches!(phase, Some(PlanPhase::Running | PlanPhase::Paused))
                && fingerprint.is_some_and(|f| f == p.hosts)
            {
                Start::Resume(p.state.clone())
            } else {
                Start::Fresh
            }
        }
        _ => Start::Fresh,
    }
}

/// Starts, steers or replaces the plan's run (the finalizer is in place).
async fn apply(
    ctx: &Arc<Context>,
    state: &Arc<PlanState>,
    api: &Api<DeploymentPlan>,
    ns: &str,
    dp: &DeploymentPlan,
) -> Result<Action, Error> {
    let task_key = runtime::object_key(dp);
    let Some(run_key) = stored_run_key(ctx, state, ns, dp).await? else {
        return Ok(Action::requeue(Duration::from_secs(1)));
    };
    let legacy_key = resolve_plan::legacy_run_key(&dp.spec, rerun_value(dp));
    let wanted = if dp.spec.paused {
        Control::Pause
    } else {
        Control::Run
    };
    let found = ctx.tasks.steer::<PlanSteer>(&task_key, &run_key, |s| {
        s.generation
            .store(dp.metadata.generation.unwrap_or(0), Ordering::SeqCst);
        s.control.send_if_modified(|c| {
            let changed = *c != wanted && *c != Control::Stop;
            if changed {
                *c = wanted;
            }
            changed
        });
    });
    match found {
        Found::Running => return Ok(Action::requeue(runtime::RESYNC)),
        Found::Finished => {
            // status is final; only observedGeneration may need to follow
            observe_generation(ctx, api, dp).await?;
            return Ok(Action::requeue(runtime::RESYNC));
        }
        Found::Other => {}
    }
    let replacing = ctx.tasks.contains(&task_key);
    let old_status = dp.status.clone().unwrap_or_default();

    // decide what the status allows before resolving anything (a finished run needs no SSH)
    match decide(dp.status.as_ref(), &run_key, &legacy_key, None, replacing) {
        Start::AlreadyFinished => {
            observe_generation(ctx, api, dp).await?;
            return Ok(Action::requeue(runtime::RESYNC));
        }
        Start::Unreadable(why) => {
            let problem = NotReady::new(
                "ProgressUnreadable",
                format!(
                    "{why}; nothing was run. Set the annotation {RERUN_ANNOTATION} to a new value to start a fresh run"
                ),
            );
            write_not_ready(ctx, dp, &old_status, &problem, false).await?;
            return Ok(Action::await_change());
        }
        _ => {}
    }

    let resolved = match resolve(ctx, state, ns, dp).await? {
        Ok(r) => r,
        Err(problem) => {
            // any old run stays stopped; report why nothing runs
            ctx.tasks.stop(&task_key);
            write_not_ready(ctx, dp, &old_status, &problem, true).await?;
            return Ok(Action::requeue(NOT_READY_RETRY));
        }
    };

    let fingerprint = hosts_fingerprint(&resolved.hosts);
    let resume = match decide(
        dp.status.as_ref(),
        &run_key,
        &legacy_key,
        Some(&fingerprint),
        replacing,
    ) {
        Start::Resume(state) => Some(state),
        _ => None,
    };
    let (control, control_rx) = watch::channel(wanted);
    let generation = Arc::new(AtomicI64::new(dp.metadata.generation.unwrap_or(0)));
    let run = PlanRun {
        generation: generation.clone(),
        ctx: ctx.clone(),
        jobs: state.jobs.clone(),
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
    ctx.tasks.start(
        &task_key,
        run_key,
        PlanSteer {
            control,
            generation,
        },
        run.drive(resolved, resume, control_rx),
    );
    Ok(Action::requeue(runtime::RESYNC))
}

/// A finished run's status with `observedGeneration` (and its conditions') moved to the
/// current generation, e.g. after `paused` was toggled on a finished plan.
async fn observe_generation(
    ctx: &Context,
    api: &Api<DeploymentPlan>,
    dp: &DeploymentPlan,
) -> Result<(), Error> {
    let Some(old) = dp.status.as_ref() else {
        return Ok(());
    };
    let mut new = old.clone();
    new.observed_generation = dp.metadata.generation;
    for c in &mut new.conditions {
        c.observed_generation = dp.metadata.generation;
    }
    if status::apply_if_changed(api, &dp.name_any(), Some(old), &new)
        .await
        .at(Stage::Status)?
    {
        ctx.metrics.status_written(KIND);
    }
    Ok(())
}

/// Records why the plan cannot run (Ready=False, and phase Pending when `pending`; the
/// recorded progress is kept) and, on a change, an Event.
async fn write_not_ready(
    ctx: &Context,
    dp: &DeploymentPlan,
    old: &DeploymentPlanStatus,
    problem: &NotReady,
    pending: bool,
) -> Result<(), Error> {
    let ready = problem.ready();
    let progressing = Desired::new(PROGRESSING, false, ready.reason, ready.message.clone());
    let conditions = conditions::merge(
        &old.conditions,
        &[ready.clone(), progressing],
        dp.metadata.generation,
        &Time(Timestamp::now()),
    );
    let interrupted =
        matches!(old.phase, Some(PlanPhase::Running | PlanPhase::Paused)) && old.progress.is_some();
    let new = if pending && !interrupted {
        DeploymentPlanStatus {
            observed_generation: dp.metadata.generation,
            run: Some(run_id(dp)),
            phase: Some(PlanPhase::Pending),
            conditions,
            ..Default::default()
        }
    } else {
        // a run interrupted mid-way keeps its recorded progress, to resume once resolvable
        DeploymentPlanStatus {
            observed_generation: dp.metadata.generation,
            conditions,
            ..old.clone()
        }
    };
    conditions::report(
        ctx,
        dp,
        (dp.status.as_ref(), &new),
        &old.conditions,
        &ready,
        conditions::Events::OnReadyChange,
    )
    .await
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

    fn status(phase: PlanPhase, progress: serde_json::Value) -> DeploymentPlanStatus {
        DeploymentPlanStatus {
            phase: Some(phase),
            progress: Some(progress),
            ..Default::default()
        }
    }

    fn progress(v: u32, key: &str, hosts: &str) -> serde_json::Value {
        serde_json::to_value(Progress {
            v,
            key: key.into(),
            hosts: hosts.into(),
            state: ResumeState {
                done: [0, 1].into_iter().collect(),
                ..Default::default()
            },
        })
        .expect("json")
    }

    #[test]
    fn run_ids_carry_the_generation_and_the_rerun_value() {
        let base = plan(PLAN);
        let mut rerun = base.clone();
        rerun
            .annotations_mut()
            .insert(RERUN_ANNOTATION.into(), "x".into());
        assert_eq!(run_id(&rerun), "3/x");
        assert_eq!(run_id(&base), "3");
    }

    #[test]
    fn a_finished_run_is_not_started_again_and_a_running_one_resumes_on_the_same_hosts() {
        let done = status(PlanPhase::Succeeded, progress(2, "k2-a", "h"));
        assert_eq!(
            decide(Some(&done), "k2-a", "legacy", None, false),
            Start::AlreadyFinished
        );
        let running = status(PlanPhase::Running, progress(2, "k2-a", "h"));
        assert!(matches!(
            decide(Some(&running), "k2-a", "legacy", Some("h"), false),
            Start::Resume(s) if s.done.len() == 2
        ));
        // the host list changed: start over
        assert_eq!(
            decide(Some(&running), "k2-a", "legacy", Some("other"), false),
            Start::Fresh
        );
        // the spec changed (another key), or a run of this plan is being replaced here
        assert_eq!(
            decide(Some(&done), "k2-b", "legacy", None, false),
            Start::Fresh
        );
        assert_eq!(
            decide(Some(&running), "k2-a", "legacy", Some("h"), true),
            Start::Fresh
        );
        assert_eq!(
            decide(None, "k2-a", "legacy", Some("h"), false),
            Start::Fresh
        );
    }

    #[test]
    fn a_run_recorded_by_outrider_0_1_is_recognised_after_the_upgrade() {
        let dp = plan(PLAN);
        let legacy = resolve_plan::legacy_run_key(&dp.spec, None);
        let old = status(PlanPhase::Succeeded, progress(0, &legacy, "h"));
        assert_eq!(
            decide(Some(&old), "k2-new", &legacy, None, false),
            Start::AlreadyFinished,
            "a finished 0.1 run must not run again on its whole fleet"
        );
    }

    #[test]
    fn an_unreadable_progress_is_reported_not_restarted() {
        let garbage = status(PlanPhase::Running, serde_json::json!({"key": 7}));
        assert!(matches!(
            decide(Some(&garbage), "k2-a", "l", Some("h"), false),
            Start::Unreadable(why) if why.contains("status.progress")
        ));
        let newer = status(
            PlanPhase::Running,
            progress(PROGRESS_VERSION + 1, "k2-a", "h"),
        );
        assert!(matches!(
            decide(Some(&newer), "k2-a", "l", Some("h"), false),
            Start::Unreadable(why) if why.contains("newer")
        ));
    }

    #[test]
    fn progress_round_trips_through_status_json_with_its_version() {
        let p = Progress {
            v: PROGRESS_VERSION,
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
        assert_eq!(recorded(Some(&back)), Recorded::Readable(Box::new(p)));
    }
}
