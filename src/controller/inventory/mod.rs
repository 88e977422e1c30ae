//! Inventory controller: validate → resolve the SSH Secret and the pinned host keys → keep
//! one probe task per Inventory running (connect, verify the host key, authenticate, run
//! `true` on every host every `spec.probe.interval`) → the task reports status. Reconcile
//! itself is short: it only (re)starts or stops the probe task and reports what stops it.
//! A Secret change restarts the task, so fixing a Secret re-probes at once.

mod pins;
mod probe;

pub use pins::{read as read_pins, record as record_pins};

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
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
use super::{At, Context, Error, Stage};
use crate::api::inventory::{Inventory, InventoryStatus};
use crate::resolve::inventory as resolve;

/// Runs the Inventory controller until `stop` fires.
pub async fn run(ctx: Arc<Context>, shared: &Shared, stop: CancellationToken) {
    let store = shared.inventories.store.clone();
    let cache = store.clone();
    let (controller, queue) =
        runtime::controller::<Inventory>(&ctx, shared.inventories.subscribe(), store.clone());
    let controller = controller.watches_shared_stream(shared.secrets.subscribe(), move |secret| {
        let name = secret.name_any();
        runtime::referrers(&store, secret.namespace(), |inv: &Inventory| {
            inv.spec.ssh.secret_ref.name == name
        })
    });
    let reconcile = move |inv: Obj<Inventory>, ctx: Arc<Context>| {
        let cache = cache.clone();
        async move { reconcile(inv, ctx, cache).await }
    };
    runtime::drive(controller, stop, ctx, runtime::reconciler(queue, reconcile)).await;
}

/// Resolves an Inventory's Secret and checks that a Fleet can be built from it with its
/// pinned keys (the probe task builds its own each round, with the pins of that round).
/// `Ok(Err(_))` is a user-side problem.
async fn resolve(ctx: &Context, inv: &Inventory) -> Result<Result<Secret, NotReady>, Error> {
    let ns = inv.namespace().ok_or(Error::NoNamespace)?;
    let name = &inv.spec.ssh.secret_ref.name;
    let Some(secret) = ctx
        .api_in::<Secret>(&ns)
        .get_opt(name)
        .await
        .at(Stage::Resolve)?
    else {
        return Ok(Err(NotReady::new(
            "SecretNotFound",
            format!("Secret {name:?} (spec.ssh.secretRef) does not exist in this namespace"),
        )));
    };
    let pins = match read_pins(ctx, inv).await? {
        Ok(p) => p,
        Err(e) => return Ok(Err(e.into())),
    };
    let built = resolve::fleet(
        inv,
        resolve::FleetInput {
            secret_name: name,
            lookup: &|k| runtime::secret_value(&secret, k),
            pins,
            selector: None,
            selector_field: "spec.hosts",
            shared_handshakes: None,
        },
    );
    Ok(match built {
        Ok(_) => Ok(secret),
        Err(e) => Err(e.into()),
    })
}

/// The Inventory a resource targets (from the shared cache, or one GET when it is not
/// cached yet) and its SSH Secret, for every kind that reaches hosts. `Ok(Err(_))` names
/// what is missing.
pub async fn targeted(
    ctx: &Context,
    cache: &Store<DeserializeGuard<Inventory>>,
    ns: &str,
    name: &str,
) -> Result<Result<(Inventory, Secret), NotReady>, Error> {
    let cached = cache
        .get(&ObjectRef::new(name).within(ns))
        .and_then(|g| g.0.as_ref().ok().cloned());
    let inv = match cached {
        Some(inv) => inv,
        // not cached (yet): ask once, the Inventory watch wakes the referrer when it appears
        None => match ctx
            .api_in::<Inventory>(ns)
            .get_opt(name)
            .await
            .at(Stage::Resolve)?
        {
            Some(inv) => inv,
            None => {
                return Ok(Err(NotReady::new(
                    "InventoryNotFound",
                    format!(
                        "Inventory {name:?} (spec.targets.inventoryRef) does not exist in this namespace"
                    ),
                )));
            }
        },
    };
    let secret_name = &inv.spec.ssh.secret_ref.name;
    let Some(secret) = ctx
        .api_in::<Secret>(ns)
        .get_opt(secret_name)
        .await
        .at(Stage::Resolve)?
    else {
        return Ok(Err(NotReady::new(
            "SecretNotFound",
            format!(
                "Secret {secret_name:?} (spec.ssh.secretRef of Inventory {name:?}) does not exist in this namespace"
            ),
        )));
    };
    Ok(Ok((inv, secret)))
}

async fn reconcile(
    inv: Obj<Inventory>,
    ctx: Arc<Context>,
    cache: Store<DeserializeGuard<Inventory>>,
) -> Result<Action, Error> {
    let key = runtime::object_key(&*inv);
    let secret = match resolve(&ctx, &inv).await? {
        Ok(secret) => secret,
        Err(problem) => {
            ctx.tasks.stop(&key);
            report_not_ready(&ctx, &inv, &problem).await?;
            return Ok(Action::requeue(runtime::RESYNC));
        }
    };
    let run_key = format!(
        "{}/{}/{}",
        inv.uid().unwrap_or_default(),
        inv.metadata.generation.unwrap_or(0),
        secret.resource_version().unwrap_or_default()
    );
    if ctx.tasks.steer::<CancellationToken>(&key, &run_key, |_| {}) != Found::Running {
        let stop = CancellationToken::new();
        let task = probe::ProbeTask::new(ctx.clone(), (*inv).clone(), secret, stop.clone(), cache);
        ctx.tasks.start(&key, run_key, stop, task.run());
    }
    Ok(Action::requeue(runtime::RESYNC))
}

/// `Ready=False` with the problem; the host counts stay, reachability is unknown.
async fn report_not_ready(ctx: &Context, inv: &Inventory, problem: &NotReady) -> Result<(), Error> {
    let old = inv.status.clone().unwrap_or_default();
    let ready = problem.ready();
    let new = InventoryStatus {
        observed_generation: inv.metadata.generation,
        hosts: u32::try_from(inv.spec.hosts.len()).unwrap_or(u32::MAX),
        reachable: None,
        unreachable: Vec::new(),
        host_keys: old.host_keys.clone(),
        accepted_host_keys: old.accepted_host_keys.clone(),
        conditions: conditions::merge(
            &old.conditions,
            std::slice::from_ref(&ready),
            inv.metadata.generation,
            &Time(Timestamp::now()),
        ),
    };
    conditions::report(
        ctx,
        inv,
        (inv.status.as_ref(), &new),
        &old.conditions,
        &ready,
        conditions::Events::OnReadyChange,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::inventory::{PinnedHostKeys, RecentHostKey, UnreachableHost};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    /// The largest status a 5,000-host fleet can have, whatever its key types: pins live in
    /// a ConfigMap, status keeps counts, the 20 newest fingerprints and at most 50
    /// unreachable hosts with messages at their schema maximum.
    #[test]
    fn status_of_a_5000_host_fleet_stays_under_256_kib_whatever_the_key_types() {
        let status = InventoryStatus {
            observed_generation: Some(i64::MAX),
            hosts: 5000,
            reachable: Some(0),
            unreachable: (0..50)
                .map(|i| UnreachableHost {
                    host: format!("{:-<60}{i:03}", "h"),
                    reason: "HostKeyMismatch".into(),
                    message: "\"\u{1}€".repeat(1024 / 6),
                })
                .collect(),
            host_keys: Some(PinnedHostKeys {
                pinned: 5000,
                config_map: "x".repeat(253),
                recent: (0..20)
                    .map(|i| RecentHostKey {
                        host: format!("{:-<60}{i:03}", "h"),
                        fingerprint: format!("SHA256:{}", "A".repeat(43)),
                    })
                    .collect(),
            }),
            accepted_host_keys: Vec::new(),
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: "HostsUnreachable".into(),
                message: "m".repeat(32 * 1024),
                observed_generation: Some(1),
                last_transition_time: Time(Timestamp::now()),
            }],
        };
        let json = serde_json::to_vec(&status).expect("json");
        eprintln!("worst-case Inventory status: {} bytes", json.len());
        assert!(json.len() < 256 * 1024, "{} bytes", json.len());
    }
}
