//! The probe task of one Inventory: a round every `spec.probe.interval` (and at once when
//! started), each round re-reading the pinned keys (a plan may have pinned some), probing
//! every host, pinning keys trusted on first use, and writing status only when it changed.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::core::DeserializeGuard;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio_util::sync::CancellationToken;

use super::super::conditions::{self, Desired, NotReady, READY};
use super::super::runtime;
use super::super::status::{StatusWriter, WriteError};
use super::super::{Context, Error};
use super::{read_pins, record_pins};
use crate::api::inventory::{
    Inventory, InventoryStatus, PinnedHostKeys, RecentHostKey, UnreachableHost,
};
use crate::engine::inventory as engine;
use crate::resolve::inventory::{self as resolve, pins_configmap_name};
use crate::ssh::Pin;
use crate::telemetry::InventoryStateLabels;

const MAX_LISTED_UNREACHABLE: usize = 50;
const MAX_RECENT_KEYS: usize = 20;
/// A round that cannot read its inputs (API errors) is retried this soon.
const RETRY: Duration = Duration::from_secs(10);

pub(super) struct ProbeTask {
    ctx: Arc<Context>,
    inv: Inventory,
    /// The Inventory's Secret as resolved when the task started (a change restarts it).
    secret: Secret,
    stop: CancellationToken,
    /// The shared Inventory cache: deleted objects are not reconciled, so the task checks
    /// it before each round and ends when its Inventory is gone.
    inventories: Store<DeserializeGuard<Inventory>>,
    /// The status as last written (or found), to compute conditions and Events from.
    last: InventoryStatus,
    writer: StatusWriter<Inventory>,
}

impl ProbeTask {
    pub(super) fn new(
        ctx: Arc<Context>,
        inv: Inventory,
        secret: Secret,
        stop: CancellationToken,
        inventories: Store<DeserializeGuard<Inventory>>,
    ) -> Self {
        let ns = inv.namespace().unwrap_or_default();
        let writer = StatusWriter::new(
            ctx.api_in(&ns),
            inv.name_any(),
            ctx.metrics.clone(),
            inv.status.as_ref(),
        );
        Self {
            last: inv.status.clone().unwrap_or_default(),
            ctx,
            inv,
            secret,
            stop,
            inventories,
            writer,
        }
    }

    pub(super) async fn run(mut self) {
        self.rounds().await;
        self.set_host_gauges(None);
    }

    /// The last probe's counts as `outrider_inventory_hosts`; `None` removes the series.
    fn set_host_gauges(&self, probed: Option<(usize, usize)>) {
        let id = format!(
            "{}/{}",
            self.inv.namespace().unwrap_or_default(),
            self.inv.name_any()
        );
        let labels = |state: &str| InventoryStateLabels {
            inventory: id.clone(),
            state: state.into(),
        };
        let gauges = &self.ctx.metrics.inventory_hosts;
        match probed {
            Some((reachable, unreachable)) => {
                for (state, n) in [("reachable", reachable), ("unreachable", unreachable)] {
                    gauges
                        .get_or_create(&labels(state))
                        .set(i64::try_from(n).unwrap_or(i64::MAX));
                }
            }
            None => {
                for state in ["reachable", "unreachable"] {
                    gauges.remove(&labels(state));
                }
            }
        }
    }

    async fn rounds(&mut self) {
        tracing::debug!(inventory = %self.inv.name_any(), "probe task started");
        if let Err(e) = self.migrate_legacy_pins().await {
            tracing::warn!(inventory = %self.inv.name_any(), error = %e, "moving pinned keys out of status failed; retried next round");
        }
        let interval = self
            .inv
            .spec
            .probe
            .interval
            .to_std()
            .unwrap_or(runtime::RESYNC);
        loop {
            if !self.exists() {
                tracing::debug!(inventory = %self.inv.name_any(), "inventory deleted; probe task ends");
                return;
            }
            let wait = match self.round().await {
                Ok(()) => interval,
                Err(RoundEnd::Gone) => return,
                Err(RoundEnd::Retry(e)) => {
                    tracing::warn!(inventory = %self.inv.name_any(), error = %e, "probe round failed; retrying");
                    RETRY
                }
            };
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Whether this Inventory (this uid) is still in the shared cache.
    fn exists(&self) -> bool {
        let key = ObjectRef::new(&self.inv.name_any())
            .within(self.inv.namespace().as_deref().unwrap_or_default());
        self.inventories
            .get(&key)
            .is_some_and(|g| g.0.as_ref().is_ok_and(|inv| inv.uid() == self.inv.uid()))
    }

    /// Moves Outrider 0.1's pinned keys (in status) into the pins ConfigMap.
    async fn migrate_legacy_pins(&mut self) -> Result<(), Error> {
        if self.last.accepted_host_keys.is_empty() {
            return Ok(());
        }
        let hosts = resolve::endpoints(&self.inv, None).unwrap_or_default();
        let pins: Vec<Pin> = self
            .last
            .accepted_host_keys
            .iter()
            .filter_map(|k| {
                let h = hosts.iter().find(|h| h.name == k.host)?;
                Some(Pin {
                    host: h.name.clone(),
                    address: h.address.clone(),
                    port: h.port,
                    fingerprint: k.fingerprint.clone(),
                })
            })
            .collect();
        record_pins(&self.ctx, &self.inv, &pins).await?;
        self.last.accepted_host_keys.clear();
        Ok(())
    }

    async fn round(&mut self) -> Result<(), RoundEnd> {
        let inv = &self.inv;
        let (ready, probed) = match read_pins(&self.ctx, inv).await.map_err(RoundEnd::Retry)? {
            Err(problem) => (NotReady::from(problem).ready(), None),
            Ok(pins) => {
                let built = resolve::fleet(
                    inv,
                    resolve::FleetInput {
                        secret_name: &inv.spec.ssh.secret_ref.name,
                        lookup: &|k| runtime::secret_value(&self.secret, k),
                        pins: pins.clone(),
                        selector: None,
                        selector_field: "spec.hosts",
                        shared_handshakes: Some(self.ctx.handshakes.clone()),
                    },
                );
                match built {
                    Err(e) => (NotReady::from(e).ready(), None),
                    Ok(targets) => {
                        let concurrency = usize::try_from(inv.spec.probe.concurrency).unwrap_or(50);
                        let fleet = targets.fleet.with_concurrency(concurrency);
                        let interval = inv.spec.probe.interval.to_std().unwrap_or(runtime::RESYNC);
                        let report = tokio::select! {
                            r = engine::probe(&fleet, targets.hosts, interval.max(Duration::from_secs(30))) => r,
                            () = self.stop.cancelled() => return Ok(()),
                        };
                        let accepted: Vec<Pin> = report.accepted.iter().map(|a| a.pin()).collect();
                        record_pins(&self.ctx, inv, &accepted)
                            .await
                            .map_err(RoundEnd::Retry)?;
                        (ready_of(&report), Some((report, pins.len())))
                    }
                }
            }
        };
        if let Some((report, _)) = &probed {
            self.set_host_gauges(Some((report.reachable, report.failures.len())));
        }
        let new = self.status(&ready, probed.as_ref());
        let transitioned = conditions::ready_changed(&self.last.conditions, &ready);
        match self.writer.write(&new).await {
            Ok(_) => {}
            Err(WriteError::Gone) => return Err(RoundEnd::Gone),
            Err(WriteError::Failed(e)) => {
                return Err(RoundEnd::Retry(Error::Kube {
                    stage: super::super::Stage::Status,
                    source: e,
                }));
            }
        }
        self.last = new;
        if transitioned {
            runtime::publish_event(
                &self.ctx,
                inv,
                conditions::event_type(&ready),
                ready.reason,
                ready.message.clone(),
            )
            .await;
        }
        if let Some((report, _)) = &probed
            && !report.accepted.is_empty()
        {
            let list: Vec<String> = report
                .accepted
                .iter()
                .map(|k| format!("{} {}", k.host, k.fingerprint))
                .collect();
            let note = format!(
                "trusted on first use (hostKeyPolicy: AcceptNew) and pinned in ConfigMap {}: {}",
                pins_configmap_name(&inv.name_any()),
                list.join(", ")
            );
            runtime::publish_event(&self.ctx, inv, EventType::Normal, "HostKeyAccepted", note)
                .await;
        }
        Ok(())
    }

    fn status(
        &self,
        ready: &Desired,
        probed: Option<&(engine::ProbeReport, usize)>,
    ) -> InventoryStatus {
        let inv = &self.inv;
        let mut host_keys = self.last.host_keys.clone();
        if let Some((report, pinned_before)) = probed {
            let mut recent: Vec<RecentHostKey> = report
                .accepted
                .iter()
                .map(|a| RecentHostKey {
                    host: a.host.clone(),
                    fingerprint: a.fingerprint.clone(),
                })
                .collect();
            let old_recent = host_keys.map(|h| h.recent).unwrap_or_default();
            recent.extend(
                old_recent
                    .into_iter()
                    .filter(|r| !report.accepted.iter().any(|a| a.host == r.host)),
            );
            recent.truncate(MAX_RECENT_KEYS);
            let pinned = pinned_before + report.accepted.len();
            host_keys = (pinned > 0).then(|| PinnedHostKeys {
                pinned: u32::try_from(pinned).unwrap_or(u32::MAX),
                config_map: pins_configmap_name(&inv.name_any()),
                recent,
            });
        }
        InventoryStatus {
            observed_generation: inv.metadata.generation,
            hosts: u32::try_from(inv.spec.hosts.len()).unwrap_or(u32::MAX),
            reachable: probed.map(|(r, _)| u32::try_from(r.reachable).unwrap_or(u32::MAX)),
            unreachable: probed
                .map(|(r, _)| {
                    r.failures
                        .iter()
                        .take(MAX_LISTED_UNREACHABLE)
                        .map(|f| UnreachableHost {
                            host: f.host.clone(),
                            reason: f.reason.to_string(),
                            message: crate::text::clip(f.message.clone(), 1024),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            host_keys,
            accepted_host_keys: self.last.accepted_host_keys.clone(),
            conditions: conditions::merge(
                &self.last.conditions,
                std::slice::from_ref(ready),
                inv.metadata.generation,
                &Time(Timestamp::now()),
            ),
        }
    }
}

enum RoundEnd {
    Gone,
    Retry(Error),
}

/// `Ready` after a probe: True only when every host answered.
fn ready_of(report: &engine::ProbeReport) -> Desired {
    if report.failures.is_empty() {
        return Desired::new(
            READY,
            true,
            "AllReachable",
            format!("all {} hosts reachable", report.total),
        );
    }
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
}
