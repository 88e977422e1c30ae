//! HealthCheck controller: validate and resolve (the spec's checks and endpoints compiled,
//! the Inventory from the shared cache, its Secret and pinned keys, CA Secrets) → keep one
//! probe task per HealthCheck running ([`task::HealthTask`]) → the task runs a round every
//! `interval`, keeps its SSH connections open across rounds, writes status only when a
//! state changed (and a heartbeat), sends Events on transitions and remediates.
//! Reconcile itself is short: it (re)starts the task when what it was built from changed.

mod remediation;
mod task;

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::conditions::{self, NotReady};
use super::runtime::{self, Obj, Shared};
use super::tasks::Found;
use super::{At, Context, Error, Stage};
use crate::api::health_check::{HealthCheck, HealthCheckStatus};
use crate::api::inventory::Inventory;
use crate::engine::health::endpoint::{EndpointProbe, Resolver};
use crate::engine::health::host::HostChecks;
use crate::resolve::inventory as resolve_inv;

/// HealthCheck rounds in flight at once over the whole process: thousands of checks share
/// the controller's CPU and sockets.
pub const MAX_CONCURRENT_ROUNDS: usize = 64;

/// What the HealthCheck controller keeps besides the shared [`Context`].
pub(super) struct HealthState {
    inventories: Store<DeserializeGuard<Inventory>>,
    /// The controller's own cache of HealthChecks: a task ends when its object is gone.
    checks: Store<DeserializeGuard<HealthCheck>>,
    rounds: Arc<Semaphore>,
}

/// Runs the HealthCheck controller until `stop` fires.
pub async fn run(ctx: Arc<Context>, shared: &Shared, stop: CancellationToken) {
    let (trigger, store) = runtime::watch::<HealthCheck>(ctx.api());
    let (controller, queue) = runtime::controller::<HealthCheck>(&ctx, trigger, store.clone());
    let inv_store = store.clone();
    let sec_store = store.clone();
    let inventories = shared.inventories.store.clone();
    let inventories_for_secrets = inventories.clone();
    let controller = controller
        .watches_shared_stream(shared.inventories.subscribe(), move |inv| {
            let name = inv.name_any();
            runtime::referrers(&inv_store, inv.namespace(), |hc: &HealthCheck| {
                hc.spec
                    .targets
                    .as_ref()
                    .is_some_and(|t| t.inventory_ref.name == name)
            })
        })
        .watches_shared_stream(shared.secrets.subscribe(), move |secret| {
            let name = secret.name_any();
            let ns = secret.namespace();
            runtime::referrers(&sec_store, ns.clone(), |hc: &HealthCheck| {
                secret_names(hc, &inventories_for_secrets).contains(&name)
            })
        });
    let state = Arc::new(HealthState {
        inventories,
        checks: store.clone(),
        rounds: Arc::new(Semaphore::new(MAX_CONCURRENT_ROUNDS)),
    });
    let reconcile = move |hc: Obj<HealthCheck>, ctx: Arc<Context>| {
        let state = state.clone();
        async move { reconcile(hc, ctx, state).await }
    };
    runtime::drive(controller, stop, ctx, runtime::reconciler(queue, reconcile)).await;
}

/// Every Secret a HealthCheck reads: its Inventory's SSH Secret and its CA Secrets.
fn secret_names(hc: &HealthCheck, inventories: &Store<DeserializeGuard<Inventory>>) -> Vec<String> {
    let mut names: Vec<String> = hc
        .spec
        .endpoints
        .iter()
        .filter_map(|e| e.ca_secret_ref().map(|r| r.name.clone()))
        .collect();
    if let Some(t) = &hc.spec.targets
        && let Some(inv) = inventories.get(
            &ObjectRef::new(&t.inventory_ref.name)
                .within(hc.namespace().as_deref().unwrap_or_default()),
        )
        && let Ok(inv) = &inv.0
    {
        names.push(inv.spec.ssh.secret_ref.name.clone());
    }
    names
}

/// What a task is built from, resolved; a change of any of it restarts the task.
pub(super) struct Resolved {
    pub checks: HostChecks,
    pub endpoints: Vec<EndpointProbe>,
    /// The Inventory and its Secret when there are host checks.
    pub inventory: Option<(Inventory, Secret)>,
    /// Identifies all of the above: uid, generation and the inputs' resource versions.
    pub run_key: String,
}

async fn resolve(
    ctx: &Context,
    state: &HealthState,
    hc: &HealthCheck,
) -> Result<Result<Resolved, NotReady>, Error> {
    let ns = hc.namespace().ok_or(Error::NoNamespace)?;
    let invalid = |e: String| NotReady::new("InvalidSpec", e);
    let checks = match HostChecks::new(&hc.spec.checks) {
        Ok(c) => c,
        Err(e) => return Ok(Err(invalid(e.to_string()))),
    };
    let mut versions: Vec<String> = Vec::new();
    let secrets = ctx.api_in::<Secret>(&ns);
    let mut endpoints = Vec::with_capacity(hc.spec.endpoints.len());
    for e in &hc.spec.endpoints {
        let ca_ref = e.ca_secret_ref();
        let ca = match ca_ref {
            None => None,
            Some(r) => {
                let Some(secret) = secrets.get_opt(&r.name).await.at(Stage::Resolve)? else {
                    return Ok(Err(NotReady::new(
                        "SecretNotFound",
                        format!(
                            "Secret {:?} (spec.endpoints[{}] caSecretRef) does not exist in this namespace",
                            r.name, e.name
                        ),
                    )));
                };
                versions.push(secret.resource_version().unwrap_or_default());
                match runtime::secret_value(&secret, "ca.crt") {
                    Some(pem) => Some(pem),
                    None => {
                        return Ok(Err(NotReady::new(
                            "SecretInvalid",
                            format!(
                                "Secret {:?} (spec.endpoints[{}] caSecretRef) has no ca.crt key",
                                r.name, e.name
                            ),
                        )));
                    }
                }
            }
        };
        match EndpointProbe::new(e, ca.as_deref(), Resolver::System) {
            Ok(p) => endpoints.push(p),
            Err(err) => return Ok(Err(invalid(err.to_string()))),
        }
    }
    let mut inventory = None;
    if !checks.is_empty()
        && let Some(targets) = &hc.spec.targets
    {
        let name = &targets.inventory_ref.name;
        let (inv, secret) =
            match crate::controller::inventory::targeted(ctx, &state.inventories, &ns, name).await?
            {
                Ok(found) => found,
                Err(problem) => return Ok(Err(problem)),
            };
        let secret_name = &inv.spec.ssh.secret_ref.name;
        // the Fleet must build (key, known_hosts, selector) before a task starts
        let pins = match crate::controller::inventory::read_pins(ctx, &inv).await? {
            Ok(p) => p,
            Err(e) => return Ok(Err(e.into())),
        };
        if let Err(e) = resolve_inv::fleet(
            &inv,
            resolve_inv::FleetInput {
                secret_name,
                lookup: &|k| runtime::secret_value(&secret, k),
                pins,
                selector: targets.selector.as_ref(),
                selector_field: "spec.targets.selector",
                shared_handshakes: None,
            },
        ) {
            return Ok(Err(e.into()));
        }
        // the Inventory's spec (generation), not its resourceVersion: its probe task's
        // status writes must not restart this task and drop its connections
        versions.push(format!(
            "{}@{}",
            inv.uid().unwrap_or_default(),
            inv.metadata.generation.unwrap_or(0)
        ));
        versions.push(secret.resource_version().unwrap_or_default());
        inventory = Some((inv, secret));
    }
    let run_key = format!(
        "{}/{}/{}",
        hc.uid().unwrap_or_default(),
        hc.metadata.generation.unwrap_or(0),
        versions.join(",")
    );
    Ok(Ok(Resolved {
        checks,
        endpoints,
        inventory,
        run_key,
    }))
}

async fn reconcile(
    hc: Obj<HealthCheck>,
    ctx: Arc<Context>,
    state: Arc<HealthState>,
) -> Result<Action, Error> {
    let key = runtime::object_key(&*hc);
    let resolved = match resolve(&ctx, &state, &hc).await? {
        Ok(r) => r,
        Err(problem) => {
            ctx.tasks.stop(&key);
            report_not_ready(&ctx, &hc, &problem).await?;
            return Ok(Action::requeue(runtime::RESYNC));
        }
    };
    if ctx
        .tasks
        .steer::<CancellationToken>(&key, &resolved.run_key, |_| {})
        != Found::Running
    {
        let stop = CancellationToken::new();
        let run_key = resolved.run_key.clone();
        let t = task::HealthTask::new(
            ctx.clone(),
            (*hc).clone(),
            resolved,
            state.rounds.clone(),
            state.checks.clone(),
            stop.clone(),
        );
        ctx.tasks.start(&key, run_key, stop, t.run());
    }
    Ok(Action::requeue(runtime::RESYNC))
}

/// `Ready=False` with the problem; the last results stay as they were.
async fn report_not_ready(
    ctx: &Context,
    hc: &HealthCheck,
    problem: &NotReady,
) -> Result<(), Error> {
    let old = hc.status.clone().unwrap_or_default();
    let ready = problem.ready();
    let new = HealthCheckStatus {
        observed_generation: hc.metadata.generation,
        conditions: conditions::merge(
            &old.conditions,
            std::slice::from_ref(&ready),
            hc.metadata.generation,
            &Time(Timestamp::now()),
        ),
        ..old.clone()
    };
    conditions::report(
        ctx,
        hc,
        (hc.status.as_ref(), &new),
        &old.conditions,
        &ready,
        conditions::Events::OnReadyChange,
    )
    .await
}
