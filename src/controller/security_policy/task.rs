//! The task of one SecurityPolicy: a pass right away, then one every `driftCheckInterval`.
//! A pass reads every target host, pushes the ruleset where it is missing or outdated (and
//! where it drifted, under `driftPolicy: Reconcile`) — one canary host, then batches, each
//! host commit-confirmed over a new connection — and writes status. Events say what
//! happened to which host, in the order it happened (the canary's first).
//!
//! The digest of each host's ruleset as read back right after its apply is kept in a
//! ConfigMap owned by the policy (`<name>-firewall`): drift made while the controller was
//! down is still drift after a restart, and a restart never re-pushes to current hosts.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::super::Context;
use super::super::conditions::{self, Desired, READY};
use super::super::inventory::read_pins;
use super::super::runtime;
use super::super::status::{StatusWriter, WriteError};
use super::status_findings;
use crate::api::FIELD_MANAGER;
use crate::api::inventory::Inventory;
use crate::api::security_policy::{
    ApplyFailure, DriftPolicy, DriftRecord, PolicyHostCounts, SecurityPolicy, SecurityPolicyStatus,
};
use crate::engine::firewall::Compiled;
use crate::engine::firewall::rollout::{self, HostResult, Progress, Report, Settings};
use crate::resolve::inventory as resolve_inv;
use crate::resolve::security_policy::{Resolved, policy_id};
use crate::ssh::{Endpoint, Fleet};
use crate::telemetry::{PolicyStateLabels, ResultLabel};

/// Hosts listed in status.drift and status.failures (the schema's limit).
const MAX_LISTED: usize = 100;
/// Host Events per pass; the rest are summed up in one.
const MAX_EVENTS: usize = 30;
/// Hosts read at once by one policy.
const HOST_CONCURRENCY: usize = 50;
const PROGRESSING: &str = "Progressing";
const DEGRADED: &str = "Degraded";
const DIGESTS_KEY: &str = "digests.json";

/// What a task is built from (resolved by reconcile).
pub(super) struct Inputs {
    pub resolved: Resolved,
    pub inventory: Inventory,
    pub secret: Secret,
}

/// Event bookkeeping of one pass.
#[derive(Default)]
struct PassEvents {
    sent: usize,
    suppressed: usize,
    /// Host → batch index (0 is the canary).
    batch_of: BTreeMap<String, usize>,
}

pub(super) struct PolicyTask {
    ctx: Arc<Context>,
    sp: SecurityPolicy,
    inputs: Option<Inputs>,
    policies: Store<DeserializeGuard<SecurityPolicy>>,
    stop: CancellationToken,
    writer: StatusWriter<SecurityPolicy>,
    last: SecurityPolicyStatus,
    /// Host → drift digest recorded after its last confirmed apply.
    recorded: BTreeMap<String, String>,
}

impl PolicyTask {
    pub(super) fn new(
        ctx: Arc<Context>,
        sp: SecurityPolicy,
        inputs: Inputs,
        policies: Store<DeserializeGuard<SecurityPolicy>>,
        stop: CancellationToken,
    ) -> Self {
        let ns = sp.namespace().unwrap_or_default();
        let writer = StatusWriter::new(
            ctx.api_in(&ns),
            sp.name_any(),
            ctx.metrics.clone(),
            sp.status.as_ref(),
        );
        Self {
            last: sp.status.clone().unwrap_or_default(),
            ctx,
            sp,
            inputs: Some(inputs),
            policies,
            stop,
            writer,
            recorded: BTreeMap::new(),
        }
    }

    fn id(&self) -> String {
        policy_id(&self.sp)
    }

    /// Whether this policy (this uid) is still in the controller's cache.
    fn exists(&self) -> bool {
        let key = ObjectRef::new(&self.sp.name_any())
            .within(self.sp.namespace().as_deref().unwrap_or_default());
        self.policies
            .get(&key)
            .is_some_and(|g| g.0.as_ref().is_ok_and(|sp| sp.uid() == self.sp.uid()))
    }

    fn digests_name(&self) -> String {
        format!("{}-firewall", self.sp.name_any())
    }

    pub(super) async fn run(mut self) {
        let Some(inputs) = self.inputs.take() else {
            return;
        };
        let Some((fleet, hosts)) = self.fleet(&inputs).await else {
            return;
        };
        let compiled = Arc::new(inputs.resolved.compiled.clone());
        let interval = inputs.resolved.drift_interval;
        self.recorded = self.load_digests().await;
        // cut off mid-apply (spec changed, object deleted), a host restores itself
        let stop = self.stop.clone();
        loop {
            if !self.exists() {
                break;
            }
            let report = tokio::select! {
                () = stop.cancelled() => break,
                r = self.pass(&fleet, &hosts, &compiled, &inputs.resolved) => r,
            };
            let Some(report) = report else { break };
            self.remember(&hosts, &report).await;
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(interval) => {}
            }
        }
        self.forget_gauges();
    }

    async fn fleet(&self, inputs: &Inputs) -> Option<(Fleet, Vec<Endpoint>)> {
        let inv = &inputs.inventory;
        let pins = match read_pins(&self.ctx, inv).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                tracing::warn!(policy = %self.id(), error = %e, "pinned host keys unreadable");
                crate::ssh::Pins::default()
            }
            Err(e) => {
                tracing::warn!(policy = %self.id(), error = %e, "pinned host keys not read");
                crate::ssh::Pins::default()
            }
        };
        let targets = resolve_inv::fleet(
            inv,
            resolve_inv::FleetInput {
                secret_name: &inv.spec.ssh.secret_ref.name,
                lookup: &|k| runtime::secret_value(&inputs.secret, k),
                pins,
                selector: self.sp.spec.targets.selector.as_ref(),
                selector_field: "spec.targets.selector",
                shared_handshakes: Some(self.ctx.handshakes.clone()),
            },
        );
        match targets {
            Ok(t) => Some((t.fleet.with_concurrency(HOST_CONCURRENCY), t.hosts)),
            Err(e) => {
                // reconcile checked this; a change since restarts the task anyway
                tracing::warn!(policy = %self.id(), error = %e, "fleet no longer builds");
                None
            }
        }
    }

    /// Hosts that failed with this ruleset for a reason a retry cannot fix.
    fn held(&self, compiled: &Compiled) -> BTreeMap<String, (String, String)> {
        if self.last.ruleset_hash.as_deref() != Some(compiled.hash.as_str()) {
            return BTreeMap::new();
        }
        self.last
            .failures
            .iter()
            .filter(|f| !rollout::retryable(&f.reason))
            .map(|f| (f.host.clone(), (f.reason.clone(), f.message.clone())))
            .collect()
    }

    /// One pass; `None` when the object is gone.
    async fn pass(
        &mut self,
        fleet: &Fleet,
        hosts: &[Endpoint],
        compiled: &Arc<Compiled>,
        resolved: &Resolved,
    ) -> Option<Report> {
        let settings = Settings {
            policy: self.id(),
            batch_size: resolved.batch_size,
            max_unavailable: resolved.max_unavailable,
            confirm: resolved.confirm,
            repair_drift: self.sp.spec.drift_policy == DriftPolicy::Reconcile,
            hold: self.held(compiled),
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<Progress>();
        let send = move |p: Progress| {
            let _ = tx.send(p);
        };
        let recorded = self.recorded.clone();
        let run = rollout::run(fleet, hosts, compiled, &recorded, &settings, &send);
        tokio::pin!(run);
        let mut ev = PassEvents::default();
        let report = loop {
            tokio::select! {
                report = &mut run => break report,
                Some(p) = rx.recv() => {
                    if !self.on_progress(p, hosts.len(), compiled, &mut ev).await {
                        return None;
                    }
                }
            }
        };
        // progress sent after the last poll
        while let Ok(p) = rx.try_recv() {
            if !self.on_progress(p, hosts.len(), compiled, &mut ev).await {
                return None;
            }
        }
        let suppressed = ev.suppressed;
        if suppressed > 0 {
            self.event(
                EventType::Normal,
                "HostsChanged",
                format!("{suppressed} more hosts finished this pass; see status"),
            )
            .await;
        }
        let status = self.status(hosts.len(), &report, compiled).await;
        self.ctx.metrics.policy_passes.inc();
        self.gauges(status.hosts.unwrap_or_default());
        match self.writer.write(&status).await {
            Ok(_) => self.last = status,
            Err(WriteError::Gone) => return None,
            Err(WriteError::Failed(e)) => {
                tracing::warn!(policy = %self.id(), error = %e, "status write failed; retried next pass");
            }
        }
        Some(report)
    }

    /// Status and Events for one step of a pass, as it happens; `false` when the object is
    /// gone.
    async fn on_progress(
        &mut self,
        p: Progress,
        total: usize,
        compiled: &Compiled,
        ev: &mut PassEvents,
    ) -> bool {
        match p {
            Progress::Planned { pending } if !pending.is_empty() => {
                let status = self.progressing(total, &pending, compiled);
                if let Err(WriteError::Gone) = self.writer.write(&status).await {
                    return false;
                }
                self.last = status;
                self.event(
                    EventType::Normal,
                    "RolloutStarted",
                    format!(
                        "pushing ruleset {} to {} of {total} hosts: canary {} first",
                        compiled.short_hash(),
                        pending.len(),
                        pending[0]
                    ),
                )
                .await;
            }
            Progress::Batch { index, hosts } => {
                for h in hosts {
                    ev.batch_of.insert(h, index);
                }
            }
            Progress::Done { host, result } => {
                let label = match &result {
                    HostResult::Applied { .. } => "applied",
                    HostResult::Failed {
                        rolled_back: true, ..
                    } => "rolled_back",
                    _ => "failed",
                };
                self.ctx
                    .metrics
                    .policy_applies
                    .get_or_create(&ResultLabel {
                        result: label.into(),
                    })
                    .inc();
                if ev.sent >= MAX_EVENTS {
                    ev.suppressed += 1;
                    return true;
                }
                ev.sent += 1;
                let phase = match ev.batch_of.get(&host) {
                    Some(0) => "canary".to_string(),
                    Some(i) => format!("batch {i}"),
                    None => String::new(),
                };
                match result {
                    HostResult::Applied { .. } => {
                        let note = format!(
                            "{host} ({phase}): ruleset {} applied and confirmed over a new connection",
                            compiled.short_hash()
                        );
                        self.host_event(&host, EventType::Normal, "Applied", note)
                            .await
                    }
                    HostResult::Failed {
                        reason,
                        message,
                        rolled_back,
                    } => {
                        let what = if rolled_back {
                            "RolledBack"
                        } else {
                            "ApplyFailed"
                        };
                        let note = format!("{host} ({phase}): {reason}: {message}");
                        self.host_event(&host, EventType::Warning, what, note).await
                    }
                    _ => {}
                }
            }
            Progress::Halted { failed, budget } => {
                self.event(
                    EventType::Warning,
                    "RolloutHalted",
                    format!(
                        "{failed} hosts failed or rolled back, more than maxUnavailable ({budget}); the other hosts keep their ruleset"
                    ),
                )
                .await;
            }
            Progress::Planned { .. } | Progress::Step { .. } => {}
        }
        true
    }

    fn gauges(&self, counts: PolicyHostCounts) {
        for (state, n) in [
            ("applied", counts.applied),
            ("drifted", counts.drifted),
            ("failed", counts.failed),
            ("rolled_back", counts.rolled_back),
            ("pending", counts.pending),
        ] {
            self.ctx
                .metrics
                .policy_hosts
                .get_or_create(&PolicyStateLabels {
                    policy: self.id(),
                    state: state.into(),
                })
                .set(i64::from(n));
        }
    }

    /// Removes this policy's series (the task ends: deleted, or restarted with new inputs).
    fn forget_gauges(&self) {
        for state in ["applied", "drifted", "failed", "rolled_back", "pending"] {
            self.ctx.metrics.policy_hosts.remove(&PolicyStateLabels {
                policy: self.id(),
                state: state.into(),
            });
        }
    }

    async fn event(&self, type_: EventType, reason: &str, note: String) {
        runtime::publish_event(&self.ctx, &self.sp, type_, reason, note).await;
    }

    /// An Event about one host (its own series: see [`runtime::publish_event_related`]).
    async fn host_event(&self, host: &str, type_: EventType, reason: &str, note: String) {
        let related = ObjectReference {
            api_version: Some("outrider.dev/v1alpha1".into()),
            kind: Some("Inventory".into()),
            name: Some(self.sp.spec.targets.inventory_ref.name.clone()),
            namespace: self.sp.namespace(),
            field_path: Some(format!("spec.hosts{{{host}}}")),
            ..Default::default()
        };
        runtime::publish_event_related(&self.ctx, &self.sp, type_, reason, note, Some(related))
            .await;
    }

    fn progressing(
        &self,
        total: usize,
        pending: &[String],
        compiled: &Compiled,
    ) -> SecurityPolicyStatus {
        let mut counts = self.last.hosts.unwrap_or_default();
        counts.total = total as u32;
        counts.pending = pending.len() as u32;
        let now = Time(Timestamp::now());
        let mut conds = vec![Desired::new(
            PROGRESSING,
            true,
            "RollingOut",
            format!(
                "pushing ruleset {} to {} hosts (canary first)",
                compiled.short_hash(),
                pending.len()
            ),
        )];
        // Ready stays as it was until the pass ends (a drift repair is not an outage)
        let ready = match conditions::find(&self.last.conditions, READY) {
            Some(c) if c.status == "True" => {
                Desired::new(READY, true, "Applied", c.message.clone())
            }
            _ => Desired::new(
                READY,
                false,
                "RollingOut",
                "the ruleset is being pushed; see the Progressing condition",
            ),
        };
        conds.insert(0, ready);
        SecurityPolicyStatus {
            observed_generation: self.sp.metadata.generation,
            ruleset_hash: Some(compiled.hash.clone()),
            hosts: Some(counts),
            findings: status_findings(&compiled.findings),
            conditions: conditions::merge(
                &self.last.conditions,
                &conds,
                self.sp.metadata.generation,
                &now,
            ),
            ..self.last.clone()
        }
    }

    async fn status(
        &mut self,
        total: usize,
        report: &Report,
        compiled: &Compiled,
    ) -> SecurityPolicyStatus {
        let now = Time(Timestamp::now());
        let mut counts = PolicyHostCounts {
            total: total as u32,
            ..Default::default()
        };
        let mut drift = Vec::new();
        let mut failures = Vec::new();
        let mut new_drift = Vec::new();
        for (host, r) in &report.hosts {
            match r {
                HostResult::Applied { .. } | HostResult::Unchanged { .. } => counts.applied += 1,
                HostResult::Drifted { message } => {
                    counts.drifted += 1;
                    let prev = self.last.drift.iter().find(|d| &d.host == host);
                    if prev.is_none() {
                        new_drift.push((host.clone(), message.clone()));
                    }
                    if drift.len() < MAX_LISTED {
                        drift.push(DriftRecord {
                            host: crate::text::head(host, 63).to_string(),
                            detected_at: prev
                                .and_then(|d| d.detected_at.clone())
                                .or_else(|| Some(now.clone())),
                            message: crate::text::clip(message.clone(), 1024),
                        });
                    }
                }
                HostResult::Failed {
                    reason,
                    message,
                    rolled_back,
                } => {
                    counts.failed += 1;
                    if *rolled_back {
                        counts.rolled_back += 1;
                    }
                    if failures.len() < MAX_LISTED {
                        let prev = self
                            .last
                            .failures
                            .iter()
                            .find(|f| &f.host == host && &f.reason == reason);
                        failures.push(ApplyFailure {
                            host: crate::text::head(host, 63).to_string(),
                            reason: crate::text::head(reason, 64).to_string(),
                            message: crate::text::clip(message.clone(), 1024),
                            at: prev
                                .and_then(|f| f.at.clone())
                                .or_else(|| Some(now.clone())),
                        });
                    }
                }
                HostResult::Skipped => counts.pending += 1,
            }
        }
        // drift repaired under Reconcile is news too
        for (host, message) in &report.drift {
            if !self.last.drift.iter().any(|d| &d.host == host)
                && !new_drift.iter().any(|(h, _)| h == host)
            {
                new_drift.push((host.clone(), message.clone()));
            }
        }
        for (host, message) in new_drift.iter().take(MAX_EVENTS) {
            let repaired = matches!(report.hosts.get(host), Some(HostResult::Applied { .. }));
            let note = if repaired {
                format!("{host}: {message}; pushed the ruleset again (driftPolicy Reconcile)")
            } else {
                format!("{host}: {message}")
            };
            self.host_event(host, EventType::Warning, "Drifted", note)
                .await;
        }
        let listed = |v: Vec<String>| {
            let n = v.len();
            let mut s = v.into_iter().take(5).collect::<Vec<_>>().join(", ");
            if n > 5 {
                s.push_str(&format!(" and {} more", n - 5));
            }
            s
        };
        let names = |f: &dyn Fn(&HostResult) -> bool| {
            listed(
                report
                    .hosts
                    .iter()
                    .filter(|(_, r)| f(r))
                    .map(|(h, _)| h.clone())
                    .collect(),
            )
        };
        let ready = if counts.drifted > 0 {
            Desired::new(
                READY,
                false,
                "Drifted",
                format!(
                    "{} of {} hosts drifted: {}",
                    counts.drifted,
                    total,
                    names(&|r| matches!(r, HostResult::Drifted { .. }))
                ),
            )
        } else if counts.rolled_back > 0 {
            Desired::new(
                READY,
                false,
                "RolledBack",
                format!(
                    "{} hosts restored their previous ruleset (not confirmed over a new connection): {}",
                    counts.rolled_back,
                    names(&|r| matches!(
                        r,
                        HostResult::Failed {
                            rolled_back: true,
                            ..
                        }
                    ))
                ),
            )
        } else if counts.failed > 0 {
            Desired::new(
                READY,
                false,
                "ApplyFailed",
                format!(
                    "ruleset not applied on {} hosts: {}",
                    counts.failed,
                    names(&|r| matches!(r, HostResult::Failed { .. }))
                ),
            )
        } else if report.halted || counts.pending > 0 {
            Desired::new(
                READY,
                false,
                "RolloutHalted",
                format!("{} hosts not reached: the rollout stopped", counts.pending),
            )
        } else if total == 0 {
            Desired::new(READY, true, "NoHosts", "no host is targeted")
        } else {
            Desired::new(
                READY,
                true,
                "Applied",
                format!(
                    "ruleset {} runs on all {total} hosts",
                    compiled.short_hash()
                ),
            )
        };
        let degraded = if counts.drifted + counts.failed > 0 {
            Desired::new(
                DEGRADED,
                true,
                ready.reason,
                format!(
                    "{} drifted, {} failed ({} rolled back)",
                    counts.drifted, counts.failed, counts.rolled_back
                ),
            )
        } else {
            Desired::new(DEGRADED, false, "AllApplied", "no host drifted or failed")
        };
        let progressing = Desired::new(
            PROGRESSING,
            false,
            if report.halted {
                "Halted"
            } else {
                "PassComplete"
            },
            format!(
                "last pass pushed to {} hosts; next drift check in {}",
                report.pushed.len(),
                self.sp.spec.drift_check_interval.0
            ),
        );
        SecurityPolicyStatus {
            observed_generation: self.sp.metadata.generation,
            ruleset_hash: Some(compiled.hash.clone()),
            hosts: Some(counts),
            drift,
            failures,
            findings: status_findings(&compiled.findings),
            conditions: conditions::merge(
                &self.last.conditions,
                &[ready, progressing, degraded],
                self.sp.metadata.generation,
                &now,
            ),
        }
    }

    /// Records the digests of current hosts and saves them when they changed.
    async fn remember(&mut self, hosts: &[Endpoint], report: &Report) {
        let mut next = self.recorded.clone();
        next.retain(|h, _| hosts.iter().any(|e| &e.name == h));
        for (host, r) in &report.hosts {
            match r {
                HostResult::Applied { digest } | HostResult::Unchanged { digest } => {
                    next.insert(host.clone(), digest.clone());
                }
                _ => {}
            }
        }
        if next != self.recorded {
            self.recorded = next;
            self.save_digests().await;
        }
    }

    async fn load_digests(&self) -> BTreeMap<String, String> {
        let api = self
            .ctx
            .api_in::<ConfigMap>(&self.sp.namespace().unwrap_or_default());
        match api.get_opt(&self.digests_name()).await {
            Ok(Some(cm)) => cm
                .data
                .as_ref()
                .and_then(|d| d.get(DIGESTS_KEY))
                .and_then(|t| serde_json::from_str(t).ok())
                .unwrap_or_default(),
            Ok(None) => BTreeMap::new(),
            Err(e) => {
                tracing::warn!(policy = %self.id(), error = %e, "recorded digests not read; hosts are judged by their ownership tag");
                BTreeMap::new()
            }
        }
    }

    /// Saves the digests to a ConfigMap owned by the policy (server-side apply).
    async fn save_digests(&self) {
        let ns = self.sp.namespace().unwrap_or_default();
        let api = self.ctx.api_in::<ConfigMap>(&ns);
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.digests_name()),
                namespace: Some(ns),
                owner_references: self.sp.controller_owner_ref(&()).map(|o| vec![o]),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".into(),
                    "outrider".into(),
                )])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                DIGESTS_KEY.into(),
                serde_json::to_string(&self.recorded).unwrap_or_default(),
            )])),
            ..Default::default()
        };
        let params = PatchParams::apply(FIELD_MANAGER).force();
        if let Err(e) = api
            .patch(&self.digests_name(), &params, &Patch::Apply(&cm))
            .await
        {
            tracing::warn!(policy = %self.id(), error = %e, "recorded digests not saved");
        }
    }
}
