//! SecurityPolicy controller: compile and check the policy, resolve its Inventory and
//! Secret from the shared caches → keep one task per policy running
//! ([`task::PolicyTask`]) → the task rolls the ruleset out (canary, batches, commit-confirmed
//! per host), then reads every host each `driftCheckInterval` and reports or repairs drift.
//! Reconcile itself is short: it (re)starts the task when what it was built from changed.

mod task;

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio_util::sync::CancellationToken;

use super::conditions::{self, NotReady};
use super::runtime::{self, Obj, Shared};
use super::tasks::Found;
use super::{Context, Error};
use crate::api::inventory::Inventory;
use crate::api::security_policy::{PolicyFinding, SecurityPolicy, SecurityPolicyStatus};
use crate::engine::firewall::Finding;
use crate::resolve::inventory as resolve_inv;
use crate::resolve::security_policy::{self as resolve_sp, PolicyError};

/// Findings listed in status (the schema's limit).
pub const MAX_FINDINGS: usize = 50;

/// What the SecurityPolicy controller keeps besides the shared [`Context`].
pub(super) struct PolicyState {
    inventories: Store<DeserializeGuard<Inventory>>,
    /// The controller's own cache of policies: a task ends when its object is gone.
    policies: Store<DeserializeGuard<SecurityPolicy>>,
}

/// Runs the SecurityPolicy controller until `stop` fires.
pub async fn run(ctx: Arc<Context>, shared: &Shared, stop: CancellationToken) {
    let (trigger, store) = runtime::watch::<SecurityPolicy>(ctx.api());
    let (controller, queue) = runtime::controller::<SecurityPolicy>(&ctx, trigger, store.clone());
    let inv_store = store.clone();
    let sec_store = store.clone();
    let inventories = shared.inventories.store.clone();
    let inventories_for_secrets = inventories.clone();
    let controller = controller
        .watches_shared_stream(shared.inventories.subscribe(), move |inv| {
            let name = inv.name_any();
            runtime::referrers(&inv_store, inv.namespace(), |sp: &SecurityPolicy| {
                sp.spec.targets.inventory_ref.name == name
            })
        })
        .watches_shared_stream(shared.secrets.subscribe(), move |secret| {
            let name = secret.name_any();
            let ns = secret.namespace();
            runtime::referrers(&sec_store, ns.clone(), |sp: &SecurityPolicy| {
                let key = ObjectRef::new(&sp.spec.targets.inventory_ref.name)
                    .within(sp.namespace().as_deref().unwrap_or_default());
                inventories_for_secrets
                    .get(&key)
                    .and_then(|g| {
                        g.0.as_ref()
                            .ok()
                            .map(|i| i.spec.ssh.secret_ref.name.clone())
                    })
                    .is_some_and(|s| s == name)
            })
        });
    let state = Arc::new(PolicyState {
        inventories,
        policies: store.clone(),
    });
    let reconcile = move |sp: Obj<SecurityPolicy>, ctx: Arc<Context>| {
        let state = state.clone();
        async move { reconcile(sp, ctx, state).await }
    };
    runtime::drive(controller, stop, ctx, runtime::reconciler(queue, reconcile)).await;
}

/// Findings as status lists them.
pub(super) fn status_findings(findings: &[Finding]) -> Vec<PolicyFinding> {
    findings
        .iter()
        .take(MAX_FINDINGS)
        .map(|f| PolicyFinding {
            severity: f.severity.as_str().into(),
            code: f.code.into(),
            rule: f
                .rule
                .as_ref()
                .map(|r| crate::text::head(r, 63).to_string()),
            message: crate::text::clip(f.message.clone(), 1024),
        })
        .collect()
}

async fn reconcile(
    sp: Obj<SecurityPolicy>,
    ctx: Arc<Context>,
    state: Arc<PolicyState>,
) -> Result<Action, Error> {
    let key = runtime::object_key(&*sp);
    let ns = sp.namespace().ok_or(Error::NoNamespace)?;
    let resolved = match resolve_sp::resolve(&sp) {
        Ok(r) => r,
        Err(e) => {
            ctx.tasks.stop(&key);
            let (problem, findings) = match e {
                PolicyError::Compile(c) => (
                    NotReady::new("InvalidPolicy", c.to_string()),
                    status_findings(&c.0),
                ),
                PolicyError::Field(f) => (NotReady::new(f.reason(), f.to_string()), Vec::new()),
            };
            report_not_ready(&ctx, &sp, &problem, Some(findings)).await?;
            return Ok(Action::requeue(runtime::RESYNC));
        }
    };
    let name = &sp.spec.targets.inventory_ref.name;
    let (inv, secret) =
        match crate::controller::inventory::targeted(&ctx, &state.inventories, &ns, name).await? {
            Ok(found) => found,
            Err(problem) => {
                ctx.tasks.stop(&key);
                report_not_ready(&ctx, &sp, &problem, None).await?;
                return Ok(Action::requeue(runtime::RESYNC));
            }
        };
    let pins = match crate::controller::inventory::read_pins(&ctx, &inv).await? {
        Ok(p) => p,
        Err(e) => {
            ctx.tasks.stop(&key);
            report_not_ready(&ctx, &sp, &e.into(), None).await?;
            return Ok(Action::requeue(runtime::RESYNC));
        }
    };
    if let Err(e) = resolve_inv::fleet(
        &inv,
        resolve_inv::FleetInput {
            secret_name: &inv.spec.ssh.secret_ref.name,
            lookup: &|k| runtime::secret_value(&secret, k),
            pins,
            selector: sp.spec.targets.selector.as_ref(),
            selector_field: "spec.targets.selector",
            shared_handshakes: None,
        },
    ) {
        ctx.tasks.stop(&key);
        report_not_ready(&ctx, &sp, &e.into(), None).await?;
        return Ok(Action::requeue(runtime::RESYNC));
    }
    // the Inventory's spec (generation), not its resourceVersion: its probe task's status
    // writes must not restart a rollout
    let run_key = format!(
        "{}/{}/{}@{}/{}",
        sp.uid().unwrap_or_default(),
        sp.metadata.generation.unwrap_or(0),
        inv.uid().unwrap_or_default(),
        inv.metadata.generation.unwrap_or(0),
        secret.resource_version().unwrap_or_default()
    );
    if ctx.tasks.steer::<CancellationToken>(&key, &run_key, |_| {}) != Found::Running {
        let stop = CancellationToken::new();
        let t = task::PolicyTask::new(
            ctx.clone(),
            (*sp).clone(),
            task::Inputs {
                resolved,
                inventory: inv,
                secret,
            },
            state.policies.clone(),
            stop.clone(),
        );
        ctx.tasks.start(&key, run_key, stop, t.run());
    }
    Ok(Action::requeue(runtime::RESYNC))
}

/// `Ready=False` with the problem; host results stay as they were. `findings` replaces the
/// listed findings when given.
async fn report_not_ready(
    ctx: &Context,
    sp: &SecurityPolicy,
    problem: &NotReady,
    findings: Option<Vec<PolicyFinding>>,
) -> Result<(), Error> {
    let old = sp.status.clone().unwrap_or_default();
    let ready = problem.ready();
    let new = SecurityPolicyStatus {
        observed_generation: sp.metadata.generation,
        findings: findings.unwrap_or_else(|| old.findings.clone()),
        conditions: conditions::merge(
            &old.conditions,
            std::slice::from_ref(&ready),
            sp.metadata.generation,
            &Time(Timestamp::now()),
        ),
        ..old.clone()
    };
    conditions::report(
        ctx,
        sp,
        (sp.status.as_ref(), &new),
        &old.conditions,
        &ready,
        conditions::Events::OnReadyChange,
    )
    .await
}
