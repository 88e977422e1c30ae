//! Inventory controller: validate → resolve the SSH Secret → write status.
//! Reachability probing arrives with the SSH transport; until then `Ready` means the
//! inventory is usable: hosts valid and credentials present.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;

use super::conditions::{self, Desired};
use super::runtime::{self, QueueDepth};
use super::{Context, Error, status};
use crate::api::inventory::{HostKeyPolicy, Inventory, InventoryStatus};
use crate::engine::inventory as engine;
use crate::telemetry::KindLabel;

const KIND: &str = "Inventory";
const READY: &str = "Ready";

/// Runs the Inventory controller until `stop` fires.
pub async fn run(ctx: Arc<Context>, stop: CancellationToken) {
    let (inventories, secrets) = match &ctx.namespace {
        Some(ns) => (
            Api::namespaced(ctx.client.clone(), ns),
            Api::<PartialObjectMeta<Secret>>::namespaced(ctx.client.clone(), ns),
        ),
        None => (
            Api::all(ctx.client.clone()),
            Api::<PartialObjectMeta<Secret>>::all(ctx.client.clone()),
        ),
    };
    let queue = Arc::new(QueueDepth::new(
        ctx.metrics
            .queue_depth
            .get_or_create(&KindLabel { kind: KIND.into() })
            .clone(),
    ));
    let (trigger, store) = runtime::watch::<Inventory>(inventories, queue.clone());
    // Secrets are watched by metadata only: their data never enters this process's cache.
    let secret_changes = watcher(secrets, watcher::Config::default().any_semantic())
        .default_backoff()
        .touched_objects();
    let referrers_store = store.clone();
    Controller::for_stream(trigger, store)
        .watches_stream(secret_changes, move |secret: PartialObjectMeta<Secret>| {
            let name = secret.name_any();
            runtime::referrers(&referrers_store, secret.namespace(), |inv: &Inventory| {
                inv.spec.ssh.secret_ref.name == name
            })
        })
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(
            move |obj, ctx| {
                queue.started(&runtime::object_key(obj.as_ref()));
                reconcile(obj, ctx)
            },
            runtime::error_policy,
            ctx,
        )
        .for_each(|_| futures::future::ready(()))
        .await;
}

/// What the Secret check concluded, as a condition.
fn secret_condition(secret: Option<&Secret>, name: &str, policy: HostKeyPolicy) -> Desired {
    let Some(secret) = secret else {
        return Desired::new(
            READY,
            false,
            "SecretNotFound",
            format!("Secret {name:?} (spec.ssh.secretRef) does not exist in this namespace"),
        );
    };
    let lookup = |key: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|v| v.0.len())
            .or_else(|| {
                secret
                    .string_data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .map(String::len)
            })
    };
    match engine::check_secret(name, policy == HostKeyPolicy::Strict, lookup) {
        Ok(()) => Desired::new(
            READY,
            true,
            "Resolved",
            "hosts valid, SSH credentials present",
        ),
        Err(problem) => Desired::new(READY, false, "SecretInvalid", problem.to_string()),
    }
}

async fn reconcile(
    guard: Arc<DeserializeGuard<Inventory>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started(KIND);
    let key = runtime::object_key(guard.as_ref());
    let ns = guard.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<Inventory> = Api::namespaced(ctx.client.clone(), &ns);

    let inv = match &guard.0 {
        Ok(inv) => inv,
        Err(invalid) => {
            // Only reachable when the stored object no longer matches these types (e.g. a
            // CRD newer than this controller): report it on the object, do not retry.
            let message = format!("cannot read this Inventory: {}", invalid.error);
            runtime::publish_event(
                &ctx,
                guard.as_ref(),
                EventType::Warning,
                "InvalidObject",
                message.clone(),
            )
            .await;
            let status = serde_json::json!({
                "conditions": conditions::merge(&[], &[Desired::new(READY, false, "InvalidObject", message)],
                    invalid.metadata.generation, &Time(Timestamp::now())),
            });
            let meta_api: Api<PartialObjectMeta<Inventory>> =
                Api::namespaced(ctx.client.clone(), &ns);
            status::apply(&meta_api, &guard.name_any(), &status).await?;
            return Ok(Action::await_change());
        }
    };

    let old = inv.status.clone().unwrap_or_default();
    let host_names = inv.spec.hosts.iter().map(|h| h.name.as_str());
    let ready = match engine::check_hosts(host_names) {
        Err(problem) => Desired::new(READY, false, "InvalidHosts", problem.to_string()),
        Ok(_) => {
            let secret_name = &inv.spec.ssh.secret_ref.name;
            let secret = Api::<Secret>::namespaced(ctx.client.clone(), &ns)
                .get_opt(secret_name)
                .await?;
            secret_condition(secret.as_ref(), secret_name, inv.spec.ssh.host_key_policy)
        }
    };

    let new = InventoryStatus {
        observed_generation: inv.metadata.generation,
        hosts: u32::try_from(inv.spec.hosts.len()).unwrap_or(u32::MAX),
        reachable: old.reachable,
        conditions: conditions::merge(
            &old.conditions,
            std::slice::from_ref(&ready),
            inv.metadata.generation,
            &Time(Timestamp::now()),
        ),
    };
    let old_ready = conditions::find(&old.conditions, READY);
    let transitioned = old_ready.is_none_or(|c| c.reason != ready.reason);
    status::apply_if_changed(&api, &inv.name_any(), inv.status.as_ref(), &new).await?;
    if transitioned {
        let type_ = if ready.status {
            EventType::Normal
        } else {
            EventType::Warning
        };
        runtime::publish_event(&ctx, inv, type_, ready.reason, ready.message.clone()).await;
    }
    ctx.backoff.reset(&key);
    Ok(Action::requeue(runtime::RESYNC))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(keys: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(
                keys.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn missing_secret_is_secret_not_found_naming_the_field() {
        let c = secret_condition(None, "fleet-ssh", HostKeyPolicy::Strict);
        assert!(!c.status);
        assert_eq!(c.reason, "SecretNotFound");
        assert!(c.message.contains("spec.ssh.secretRef"), "{}", c.message);
    }

    #[test]
    fn secret_without_known_hosts_is_invalid_under_strict_and_message_has_no_values() {
        let s = secret(&[("ssh-privatekey", "TOPSECRET")]);
        let c = secret_condition(Some(&s), "fleet-ssh", HostKeyPolicy::Strict);
        assert_eq!(c.reason, "SecretInvalid");
        assert!(c.message.contains("known_hosts"));
        assert!(!c.message.contains("TOPSECRET"));
        let ok = secret_condition(Some(&s), "fleet-ssh", HostKeyPolicy::AcceptNew);
        assert!(ok.status, "{ok:?}");
    }
}
