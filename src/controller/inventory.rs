//! Inventory controller: validate → resolve the SSH Secret → probe every host (connect,
//! verify the host key, authenticate, run `true`) → write status. `Ready` is True only
//! when every host answered; probes repeat every `spec.probe.interval`.

use std::sync::Arc;
use std::time::Duration;

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
use super::runtime;
use super::{Context, Error, status};
use crate::api::inventory::{
    AcceptedHostKey, HostKeyPolicy, Inventory, InventoryStatus, UnreachableHost,
};
use crate::engine::inventory as engine;
use crate::ssh::{Credentials, Fleet};
use crate::targets::{self, SshMaterial};

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
    let queue = runtime::queue_depth(&ctx, KIND);
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

/// Reads what SSH needs from the Secret, or the condition saying why it cannot.
fn secret_material(
    secret: Option<&Secret>,
    name: &str,
    policy: HostKeyPolicy,
) -> Result<SshMaterial, Desired> {
    let Some(secret) = secret else {
        return Err(Desired::new(
            READY,
            false,
            "SecretNotFound",
            format!("Secret {name:?} (spec.ssh.secretRef) does not exist in this namespace"),
        ));
    };
    let lookup = |key: &str| runtime::secret_value(secret, key);
    targets::ssh_material(name, policy, lookup)
        .map_err(|e| Desired::new(READY, false, "SecretInvalid", e.to_string()))
}

/// Status pieces a probe produces.
struct Probed {
    ready: Desired,
    reachable: Option<u32>,
    unreachable: Vec<UnreachableHost>,
    accepted: Vec<AcceptedHostKey>,
    newly_accepted: Vec<AcceptedHostKey>,
}

const MAX_LISTED_UNREACHABLE: usize = 50;

/// Validates, resolves the Secret and probes every host.
async fn probe_inventory(
    inv: &Inventory,
    secret: Option<&Secret>,
    old: &InventoryStatus,
) -> Probed {
    let not_probed = |ready: Desired| Probed {
        ready,
        reachable: None,
        unreachable: Vec::new(),
        accepted: old.accepted_host_keys.clone(),
        newly_accepted: Vec::new(),
    };
    if let Err(problem) = engine::check_hosts(inv.spec.hosts.iter().map(|h| h.name.as_str())) {
        return not_probed(Desired::new(
            READY,
            false,
            "InvalidHosts",
            problem.to_string(),
        ));
    }
    let name = &inv.spec.ssh.secret_ref.name;
    let material = match secret_material(secret, name, inv.spec.ssh.host_key_policy) {
        Ok(m) => m,
        Err(ready) => return not_probed(ready),
    };
    let config = match targets::client_config(inv) {
        Ok(c) => c,
        Err(e) => return not_probed(Desired::new(READY, false, "InvalidSpec", e.to_string())),
    };
    let endpoints = match targets::endpoints(inv, None) {
        Ok(e) => e,
        Err(e) => return not_probed(Desired::new(READY, false, "InvalidSpec", e.to_string())),
    };
    // keys accepted on first use earlier are pinned like known_hosts entries
    let hosts: std::collections::HashSet<&str> =
        inv.spec.hosts.iter().map(|h| h.name.as_str()).collect();
    let mut accepted: Vec<AcceptedHostKey> = old
        .accepted_host_keys
        .iter()
        .filter(|k| hosts.contains(k.host.as_str()))
        .cloned()
        .collect();
    let mut known_hosts = material.known_hosts.clone();
    for k in &accepted {
        known_hosts.push('\n');
        known_hosts.push_str(&k.known_hosts_line);
    }
    let credentials = match Credentials::new(
        &material.private_key,
        material.passphrase.as_deref(),
        &known_hosts,
    ) {
        Ok(c) => c,
        Err(e) => {
            return not_probed(Desired::new(
                READY,
                false,
                "SecretInvalid",
                format!("Secret {name:?}: {e}"),
            ));
        }
    };
    let interval = inv.spec.probe.interval.to_std().unwrap_or(runtime::RESYNC);
    let concurrency = usize::try_from(inv.spec.probe.concurrency).unwrap_or(50);
    let fleet = Fleet::new(config, credentials).with_concurrency(concurrency);
    let report = engine::probe(&fleet, endpoints, interval.max(Duration::from_secs(30))).await;

    let newly_accepted: Vec<AcceptedHostKey> = report
        .accepted
        .iter()
        .map(|a| AcceptedHostKey {
            host: a.host.clone(),
            fingerprint: a.fingerprint.clone(),
            known_hosts_line: a.known_hosts_line.clone(),
        })
        .collect();
    accepted.extend(newly_accepted.iter().cloned());
    accepted.sort_by(|a, b| a.host.cmp(&b.host));
    let ready = if report.failures.is_empty() {
        Desired::new(
            READY,
            true,
            "AllReachable",
            format!("all {} hosts reachable", report.total),
        )
    } else {
        let listed: Vec<String> = report
            .failures
            .iter()
            .take(5)
            .map(|f| format!("{} ({})", f.host, f.reason))
            .collect();
        let more = report.failures.len().saturating_sub(5);
        Desired::new(
            READY,
            false,
            "HostsUnreachable",
            format!(
                "{} of {} hosts unreachable: {}{}",
                report.failures.len(),
                report.total,
                listed.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            ),
        )
    };
    Probed {
        ready,
        reachable: Some(u32::try_from(report.reachable).unwrap_or(u32::MAX)),
        unreachable: report
            .failures
            .into_iter()
            .take(MAX_LISTED_UNREACHABLE)
            .map(|f| UnreachableHost {
                host: f.host,
                reason: f.reason.to_string(),
                message: runtime::truncate(f.message, 1024),
            })
            .collect(),
        accepted,
        newly_accepted,
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
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&inv.spec.ssh.secret_ref.name)
        .await?;
    let probed = probe_inventory(inv, secret.as_ref(), &old).await;
    drop(secret);

    let new = InventoryStatus {
        observed_generation: inv.metadata.generation,
        hosts: u32::try_from(inv.spec.hosts.len()).unwrap_or(u32::MAX),
        reachable: probed.reachable,
        unreachable: probed.unreachable,
        accepted_host_keys: probed.accepted,
        conditions: conditions::merge(
            &old.conditions,
            std::slice::from_ref(&probed.ready),
            inv.metadata.generation,
            &Time(Timestamp::now()),
        ),
    };
    let ready = &probed.ready;
    let transitioned =
        conditions::find(&old.conditions, READY).is_none_or(|c| c.reason != ready.reason);
    status::apply_if_changed(&api, &inv.name_any(), inv.status.as_ref(), &new).await?;
    if transitioned {
        let type_ = if ready.status {
            EventType::Normal
        } else {
            EventType::Warning
        };
        runtime::publish_event(&ctx, inv, type_, ready.reason, ready.message.clone()).await;
    }
    if !probed.newly_accepted.is_empty() {
        let list: Vec<String> = probed
            .newly_accepted
            .iter()
            .map(|k| format!("{} {}", k.host, k.fingerprint))
            .collect();
        let note = format!(
            "trusted on first use (hostKeyPolicy: AcceptNew): {}",
            list.join(", ")
        );
        runtime::publish_event(&ctx, inv, EventType::Normal, "HostKeyAccepted", note).await;
    }
    ctx.backoff.reset(&key);
    Ok(Action::requeue(
        inv.spec.probe.interval.to_std().unwrap_or(runtime::RESYNC),
    ))
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
        let Err(c) = secret_material(None, "fleet-ssh", HostKeyPolicy::Strict) else {
            panic!("no secret must fail")
        };
        assert!(!c.status);
        assert_eq!(c.reason, "SecretNotFound");
        assert!(c.message.contains("spec.ssh.secretRef"), "{}", c.message);
    }

    #[test]
    fn secret_without_known_hosts_is_invalid_under_strict_and_message_has_no_values() {
        let s = secret(&[("ssh-privatekey", "TOPSECRET")]);
        let Err(c) = secret_material(Some(&s), "fleet-ssh", HostKeyPolicy::Strict) else {
            panic!("must fail")
        };
        assert_eq!(c.reason, "SecretInvalid");
        assert!(c.message.contains("known_hosts"));
        assert!(!c.message.contains("TOPSECRET"));
        let ok = secret_material(Some(&s), "fleet-ssh", HostKeyPolicy::AcceptNew)
            .expect("AcceptNew needs no known_hosts");
        assert_eq!(ok.private_key, "TOPSECRET");
    }
}
