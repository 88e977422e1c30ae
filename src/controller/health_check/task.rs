//! The probe task of one HealthCheck: rounds every `interval` (the first at a random
//! offset, so a thousand checks created together do not probe in the same second), one
//! round at a time (a slow round delays the next, never overlaps it), at most
//! [`MAX_CONCURRENT_ROUNDS`](super::MAX_CONCURRENT_ROUNDS) rounds of all checks at once.
//! Status is written when a state changed, when maintenance or a remediation changed it,
//! and otherwise every [`HEARTBEAT`]; values alone never cause a write.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use rand::Rng;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::super::Context;
use super::super::conditions::{self, Desired, READY};
use super::super::inventory::{read_pins, record_pins};
use super::super::runtime;
use super::super::status::{StatusWriter, WriteError};
use super::{Resolved, remediation};
use crate::api::FIELD_MANAGER;
use crate::api::health_check::{
    CheckResult, HealthCheck, HealthCheckStatus, HealthSummary, Maintenance, ProbeState,
};
use crate::api::inventory::Inventory;
use crate::engine::health::baseline;
use crate::engine::health::evaluate::{Evaluator, Policy, State, Transition};
use crate::engine::health::pool::Pool;
use crate::engine::health::round::{Checker, RoundReport};
use crate::resolve::inventory as resolve_inv;
use crate::ssh::Pin;
use crate::telemetry::{CheckStateLabels, ProbeLabels};

/// Status is rewritten at least this often while nothing changes (lastRunAt, values).
pub const HEARTBEAT: Duration = Duration::from_secs(300);
/// Baselines are saved to their ConfigMap at most this often (and when the task ends).
const BASELINE_SAVE: Duration = Duration::from_secs(300);
/// Non-healthy results listed in status (the schema's limit).
const MAX_RESULTS: usize = 100;
/// Transition Events per round; the rest are summed up in one.
const MAX_EVENTS: usize = 10;
/// Hosts worked on at once by one HealthCheck.
const HOST_CONCURRENCY: usize = 100;
/// The longest interval honoured (a schema-valid `9999h` must not overflow a deadline).
const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);
const DEGRADED: &str = "Degraded";

pub(super) struct HealthTask {
    ctx: Arc<Context>,
    hc: HealthCheck,
    resolved: Option<Resolved>,
    rounds: Arc<Semaphore>,
    /// The controller's cache of HealthChecks, to notice that this one was deleted.
    checks: Store<DeserializeGuard<HealthCheck>>,
    stop: CancellationToken,
    writer: StatusWriter<HealthCheck>,
    last: HealthCheckStatus,
    /// Hosts already remediated in their current Unhealthy episode.
    remediated: BTreeSet<String>,
    /// Metric series set by this task, removed when it ends.
    series: BTreeSet<ProbeLabels>,
    /// The Inventory of the host checks (pins trusted on first use are recorded in it).
    inventory: Option<Inventory>,
}

impl HealthTask {
    pub(super) fn new(
        ctx: Arc<Context>,
        hc: HealthCheck,
        resolved: Resolved,
        rounds: Arc<Semaphore>,
        checks: Store<DeserializeGuard<HealthCheck>>,
        stop: CancellationToken,
    ) -> Self {
        let ns = hc.namespace().unwrap_or_default();
        let writer = StatusWriter::new(
            ctx.api_in(&ns),
            hc.name_any(),
            ctx.metrics.clone(),
            hc.status.as_ref(),
        );
        Self {
            last: hc.status.clone().unwrap_or_default(),
            ctx,
            hc,
            resolved: Some(resolved),
            rounds,
            checks,
            stop,
            writer,
            remediated: BTreeSet::new(),
            series: BTreeSet::new(),
            inventory: None,
        }
    }

    /// Whether this HealthCheck (this uid) is still in the controller's cache.
    fn exists(&self) -> bool {
        let key = ObjectRef::new(&self.hc.name_any())
            .within(self.hc.namespace().as_deref().unwrap_or_default());
        self.checks
            .get(&key)
            .is_some_and(|g| g.0.as_ref().is_ok_and(|hc| hc.uid() == self.hc.uid()))
    }

    fn id(&self) -> String {
        format!(
            "{}/{}",
            self.hc.namespace().unwrap_or_default(),
            self.hc.name_any()
        )
    }

    pub(super) async fn run(mut self) {
        let Some(mut checker) = self.checker().await else {
            return;
        };
        let interval = self
            .hc
            .spec
            .interval
            .to_std()
            .unwrap_or(Duration::from_secs(30))
            .clamp(Duration::from_secs(1), MAX_INTERVAL);
        // spread the first rounds of many checks over one interval
        let offset = interval.mul_f64(rand::rng().random_range(0.0..1.0));
        let mut next = tokio::time::Instant::now() + offset;
        let mut last_write = Instant::now();
        let mut last_save = Instant::now();
        let mut digest = None;
        let mut gone = false;
        loop {
            tokio::select! {
                () = self.stop.cancelled() => break,
                () = tokio::time::sleep_until(next) => {}
            }
            // deleted objects are not reconciled: the task notices it from the cache
            if !self.exists() {
                gone = true;
                break;
            }
            let permit = tokio::select! {
                () = self.stop.cancelled() => break,
                p = self.rounds.clone().acquire_owned() => p,
            };
            let lag = tokio::time::Instant::now().saturating_duration_since(next);
            self.ctx
                .metrics
                .health_schedule_lag
                .observe(lag.as_secs_f64());
            let maintenance = in_maintenance(self.hc.spec.maintenance.as_ref(), SystemTime::now());
            let handshakes = checker.handshakes();
            let report = tokio::select! {
                () = self.stop.cancelled() => break,
                r = checker.round(interval, maintenance) => r,
            };
            drop(permit);
            self.ctx.metrics.health_rounds.inc();
            self.ctx
                .metrics
                .health_handshakes
                .inc_by(checker.handshakes().saturating_sub(handshakes));
            self.metrics(&report, &checker.evaluator);
            self.record_accepted(&report).await;
            self.events(&report.transitions).await;
            let remediated = if maintenance {
                false
            } else {
                self.remediate(&checker.evaluator).await
            };
            let d = checker.evaluator.digest();
            let due = digest != Some(d)
                || remediated
                || maintenance != self.last.in_maintenance
                || last_write.elapsed() >= HEARTBEAT;
            if due {
                let status = self.status(&checker.evaluator, maintenance);
                match self.writer.write(&status).await {
                    Ok(_) => {
                        self.last = status;
                        digest = Some(d);
                        last_write = Instant::now();
                    }
                    Err(WriteError::Gone) => {
                        gone = true;
                        break;
                    }
                    Err(WriteError::Failed(e)) => {
                        tracing::warn!(check = %self.id(), error = %e, "status write failed; retried next round");
                    }
                }
            }
            if !checker.evaluator.baselines().is_empty() && last_save.elapsed() >= BASELINE_SAVE {
                self.save_baselines(checker.evaluator.baselines()).await;
                last_save = Instant::now();
            }
            // a round that overran its slot skips the missed slots rather than bunching up
            next += interval;
            let now = tokio::time::Instant::now();
            while next <= now {
                next += interval;
            }
        }
        if !gone && !checker.evaluator.baselines().is_empty() {
            self.save_baselines(checker.evaluator.baselines()).await;
        }
        checker.close().await;
        self.forget_metrics();
    }

    /// Builds the checker: connections, compiled probes, evaluation state from status and
    /// the baselines ConfigMap.
    async fn checker(&mut self) -> Option<Checker> {
        let resolved = self.resolved.take()?;
        self.inventory = resolved.inventory.as_ref().map(|(inv, _)| inv.clone());
        let spec = &self.hc.spec;
        let mut hosts = Vec::new();
        let mut pool = None;
        if let Some((inv, secret)) = &resolved.inventory {
            let pins = match read_pins(&self.ctx, inv).await {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    tracing::warn!(check = %self.id(), error = %e, "pinned host keys unreadable");
                    crate::ssh::Pins::default()
                }
                Err(e) => {
                    tracing::warn!(check = %self.id(), error = %e, "pinned host keys not read");
                    crate::ssh::Pins::default()
                }
            };
            let targets = resolve_inv::fleet(
                inv,
                resolve_inv::FleetInput {
                    secret_name: &inv.spec.ssh.secret_ref.name,
                    lookup: &|k| runtime::secret_value(secret, k),
                    pins,
                    selector: spec.targets.as_ref().and_then(|t| t.selector.as_ref()),
                    selector_field: "spec.targets.selector",
                    shared_handshakes: Some(self.ctx.handshakes.clone()),
                },
            );
            match targets {
                Ok(t) => {
                    hosts = t.hosts;
                    pool = Some(Pool::new(t.fleet));
                }
                Err(e) => {
                    // reconcile checked this; a change since restarts the task anyway
                    tracing::warn!(check = %self.id(), error = %e, "fleet no longer builds");
                    return None;
                }
            }
        }
        let baselines = self.load_baselines().await;
        let mut evaluator = Evaluator::new(
            Policy {
                failure_threshold: spec.failure_threshold,
                success_threshold: spec.success_threshold,
                baseline: spec.baseline.clone(),
            },
            baselines,
        );
        for r in &self.last.results {
            let state = match r.state {
                ProbeState::Unhealthy => State::Unhealthy,
                ProbeState::Unknown => State::Unknown,
                ProbeState::Anomalous => State::Anomalous,
                ProbeState::Healthy => continue,
            };
            let since = r
                .since
                .as_ref()
                .map(|t| SystemTime::from(t.0))
                .unwrap_or_else(SystemTime::now);
            let host = r.target != r.check;
            evaluator.seed(&r.target, &r.check, host, state, since);
        }
        let mut checker = Checker::new(resolved.checks, resolved.endpoints, hosts, pool, evaluator);
        checker.concurrency = HOST_CONCURRENCY;
        Some(checker)
    }

    fn status(&self, ev: &Evaluator, maintenance: bool) -> HealthCheckStatus {
        let s = ev.summary();
        let results: Vec<CheckResult> = ev
            .problems(MAX_RESULTS)
            .into_iter()
            .map(|(target, check, t)| CheckResult {
                target: crate::text::head(target, 63).to_string(),
                check: crate::text::head(check, 63).to_string(),
                state: match t.state {
                    State::Unhealthy => ProbeState::Unhealthy,
                    State::Anomalous => ProbeState::Anomalous,
                    State::Healthy => ProbeState::Healthy,
                    State::Unknown | State::Pending => ProbeState::Unknown,
                },
                value: t.last.value,
                threshold: t.last.threshold,
                baseline: t.baseline,
                latency_ms: Some((t.last.latency.as_secs_f64() * 1000.0 * 10.0).round() / 10.0),
                since: Timestamp::try_from(t.since).ok().map(Time),
                message: crate::text::clip(t.last.message.clone(), 1024),
            })
            .collect();
        let degraded = degraded_condition(ev);
        let spec = &self.hc.spec;
        let ready = Desired::new(
            READY,
            true,
            if maintenance {
                "InMaintenance"
            } else {
                "Probing"
            },
            format!(
                "{} checks on {} hosts and {} endpoints every {}{}",
                spec.checks.len(),
                ev.tracked()
                    .filter(|(_, _, t)| t.host)
                    .map(|(h, _, _)| h)
                    .collect::<BTreeSet<_>>()
                    .len(),
                spec.endpoints.len(),
                spec.interval.0,
                if maintenance {
                    "; in maintenance: no state changes, no remediation"
                } else {
                    ""
                }
            ),
        );
        HealthCheckStatus {
            observed_generation: self.hc.metadata.generation,
            last_run_at: Some(Time(Timestamp::now())),
            summary: Some(HealthSummary {
                healthy: s.healthy,
                unhealthy: s.unhealthy,
                unknown: s.unknown,
                anomalous: s.anomalous,
            }),
            results,
            remediations: self.last.remediations.clone(),
            in_maintenance: maintenance,
            conditions: conditions::merge(
                &self.last.conditions,
                &[ready, degraded],
                self.hc.metadata.generation,
                &Time(Timestamp::now()),
            ),
        }
    }

    fn metrics(&mut self, report: &RoundReport, ev: &Evaluator) {
        let m = &self.ctx.metrics;
        let check = self.id();
        for p in &report.probed {
            let labels = ProbeLabels {
                check: check.clone(),
                target: p.target.clone(),
                probe: p.check.clone(),
            };
            let o = &p.observation;
            m.probe_success
                .get_or_create(&labels)
                .set(i64::from(o.outcome == crate::engine::health::Outcome::Pass));
            m.probe_duration
                .get_or_create(&labels)
                .set(o.latency.as_secs_f64());
            if let Some(v) = o.value {
                m.probe_value.get_or_create(&labels).set(v);
            }
            self.series.insert(labels);
        }
        let s = ev.summary();
        for (state, n) in [
            ("Healthy", s.healthy),
            ("Unhealthy", s.unhealthy),
            ("Unknown", s.unknown),
            ("Anomalous", s.anomalous),
        ] {
            m.check_state
                .get_or_create(&CheckStateLabels {
                    check: check.clone(),
                    state: state.into(),
                })
                .set(i64::from(n));
        }
    }

    fn forget_metrics(&mut self) {
        let m = &self.ctx.metrics;
        for labels in std::mem::take(&mut self.series) {
            m.probe_success.remove(&labels);
            m.probe_duration.remove(&labels);
            m.probe_value.remove(&labels);
        }
        for state in ["Healthy", "Unhealthy", "Unknown", "Anomalous"] {
            m.check_state.remove(&CheckStateLabels {
                check: self.id(),
                state: state.into(),
            });
        }
    }

    /// Host keys trusted on first use go to the Inventory's pins ConfigMap, as everywhere.
    async fn record_accepted(&self, report: &RoundReport) {
        let Some(inv) = &self.inventory else {
            return;
        };
        if report.accepted.is_empty() {
            return;
        }
        let pins: Vec<Pin> = report
            .accepted
            .iter()
            .map(|(h, fingerprint, _)| Pin {
                host: h.name.clone(),
                address: h.address.clone(),
                port: h.port,
                fingerprint: fingerprint.clone(),
            })
            .collect();
        if let Err(e) = record_pins(&self.ctx, inv, &pins).await {
            tracing::warn!(check = %self.id(), error = %e, "could not pin host keys trusted on first use");
        }
    }

    async fn events(&self, transitions: &[Transition]) {
        for t in transitions.iter().take(MAX_EVENTS) {
            let (type_, reason) = match t.to {
                State::Unhealthy => (EventType::Warning, "TargetUnhealthy"),
                State::Unknown => (EventType::Warning, "TargetUnknown"),
                State::Anomalous => (EventType::Warning, "TargetAnomalous"),
                State::Healthy | State::Pending => (EventType::Normal, "TargetHealthy"),
            };
            let note = format!(
                "{}/{}: {} → {}: {}",
                t.target,
                t.check,
                t.from.as_str(),
                t.to.as_str(),
                t.message
            );
            runtime::publish_event(&self.ctx, &self.hc, type_, reason, note).await;
        }
        if transitions.len() > MAX_EVENTS {
            let more = transitions.len() - MAX_EVENTS;
            runtime::publish_event(
                &self.ctx,
                &self.hc,
                EventType::Warning,
                "TargetsChanged",
                format!("{more} more targets changed state this round; see status.results"),
            )
            .await;
        }
    }

    /// Starts a remediation for the hosts that turned Unhealthy, when allowed. Returns
    /// whether status gained a record.
    async fn remediate(&mut self, ev: &Evaluator) -> bool {
        let unhealthy: BTreeSet<String> = ev
            .unhealthy_hosts()
            .into_iter()
            .map(str::to_string)
            .collect();
        // a host that recovered may be remediated again in its next episode
        self.remediated.retain(|h| unhealthy.contains(h));
        let Some(spec) = &self.hc.spec.remediation else {
            return false;
        };
        let fresh: Vec<String> = unhealthy
            .iter()
            .filter(|h| !self.remediated.contains(*h))
            .cloned()
            .collect();
        if fresh.is_empty() {
            return false;
        }
        let now = SystemTime::now();
        if let Err(why) = remediation::allowed(spec, &self.last.remediations, now) {
            tracing::debug!(check = %self.id(), why, "remediation held back");
            return false;
        }
        match remediation::start(&self.ctx, &self.hc, spec, &fresh).await {
            Ok(record) => {
                self.remediated.extend(fresh.iter().cloned());
                let note = format!(
                    "started DeploymentPlan {} (a copy of {}) for {}",
                    record.0,
                    spec.deployment_plan_ref.name,
                    fresh.join(", ")
                );
                runtime::publish_event(&self.ctx, &self.hc, EventType::Normal, "Remediating", note)
                    .await;
                self.last.remediations.insert(0, record.1);
                self.last.remediations.truncate(20);
                true
            }
            Err(e) => {
                // counted as done for this episode: a missing plan must not spam every round
                self.remediated.extend(fresh.iter().cloned());
                runtime::publish_event(
                    &self.ctx,
                    &self.hc,
                    EventType::Warning,
                    "RemediationFailed",
                    e,
                )
                .await;
                false
            }
        }
    }

    fn baselines_name(&self) -> String {
        format!("{}-baselines", self.hc.name_any())
    }

    async fn load_baselines(&self) -> baseline::Baselines {
        if !self.hc.spec.baseline.as_ref().is_some_and(|b| b.enabled) {
            return baseline::Baselines::new();
        }
        let api = self
            .ctx
            .api_in::<ConfigMap>(&self.hc.namespace().unwrap_or_default());
        match api.get_opt(&self.baselines_name()).await {
            Ok(Some(cm)) => cm
                .data
                .as_ref()
                .and_then(|d| d.get("baselines.json"))
                .map(|t| baseline::decode(t))
                .unwrap_or_default(),
            Ok(None) => baseline::Baselines::new(),
            Err(e) => {
                tracing::warn!(check = %self.id(), error = %e, "baselines not read; learning afresh");
                baseline::Baselines::new()
            }
        }
    }

    /// Saves the baselines to a ConfigMap owned by the HealthCheck (server-side apply).
    async fn save_baselines(&self, baselines: &baseline::Baselines) {
        let ns = self.hc.namespace().unwrap_or_default();
        let api = self.ctx.api_in::<ConfigMap>(&ns);
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.baselines_name()),
                namespace: Some(ns),
                owner_references: self.hc.controller_owner_ref(&()).map(|o| vec![o]),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".into(),
                    "outrider".into(),
                )])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                "baselines.json".into(),
                baseline::encode(baselines),
            )])),
            ..Default::default()
        };
        let params = PatchParams::apply(FIELD_MANAGER).force();
        if let Err(e) = api
            .patch(&self.baselines_name(), &params, &Patch::Apply(&cm))
            .await
        {
            tracing::warn!(check = %self.id(), error = %e, "baselines not saved");
        }
    }
}

/// Whether `now` falls in a maintenance window (or maintenance is suspended).
pub fn in_maintenance(m: Option<&Maintenance>, now: SystemTime) -> bool {
    let Ok(now) = Timestamp::try_from(now) else {
        return false;
    };
    m.is_some_and(|m| m.is_open(now))
}

/// `Degraded` from the tracked results: the worst state wins; targets not decided yet (or
/// no result at all) are not reported as all healthy.
fn degraded_condition(ev: &Evaluator) -> Desired {
    let s = ev.summary();
    let pending = ev
        .tracked()
        .filter(|(_, _, t)| t.state == State::Pending)
        .count();
    let worst = ev
        .tracked()
        .map(|(_, _, t)| t.state)
        .max_by_key(|s| match s {
            State::Unhealthy => 2,
            State::Unknown => 1,
            _ => 0,
        });
    match worst {
        Some(State::Unhealthy) => Desired::new(
            DEGRADED,
            true,
            "TargetsUnhealthy",
            format!(
                "{} of {} targets unhealthy",
                s.unhealthy,
                s.healthy + s.unhealthy + s.unknown + s.anomalous
            ),
        ),
        Some(State::Unknown) => Desired::new(
            DEGRADED,
            true,
            "TargetsUnknown",
            format!("{} targets could not be probed", s.unknown),
        ),
        // targets not decided yet are not healthy either: say so
        None => Desired::new(DEGRADED, false, "TargetsPending", "no target probed yet"),
        _ if pending > 0 => Desired::new(
            DEGRADED,
            false,
            "TargetsPending",
            format!("{pending} targets not decided yet; none unhealthy"),
        ),
        _ => Desired::new(DEGRADED, false, "AllHealthy", "no target is unhealthy"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn degraded_says_pending_until_every_target_is_decided_and_the_worst_state_wins() {
        let reason = |states: &[State]| {
            let policy = Policy {
                failure_threshold: 3,
                success_threshold: 1,
                baseline: None,
            };
            let mut ev = Evaluator::new(policy, Default::default());
            for (i, state) in states.iter().enumerate() {
                ev.seed(&format!("h{i}"), "disk", true, *state, SystemTime::now());
            }
            let d = degraded_condition(&ev);
            (d.status, d.reason, d.message)
        };
        use State::*;
        assert_eq!(
            reason(&[]),
            (false, "TargetsPending", "no target probed yet".into())
        );
        assert_eq!(
            reason(&[Healthy, Pending, Pending]),
            (
                false,
                "TargetsPending",
                "2 targets not decided yet; none unhealthy".into()
            )
        );
        assert_eq!(reason(&[Healthy, Anomalous]).1, "AllHealthy");
        assert_eq!(reason(&[Healthy, Unknown, Pending]).1, "TargetsUnknown");
        assert_eq!(
            reason(&[Unhealthy, Unknown, Pending]),
            (true, "TargetsUnhealthy", "1 of 3 targets unhealthy".into())
        );
    }

    #[test]
    fn maintenance_is_open_inside_a_window_or_while_suspended() {
        let m: Maintenance = serde_yaml::from_str(
            "{windows: [{start: '2026-12-24T22:00:00Z', end: '2026-12-25T02:00:00Z'}]}",
        )
        .expect("maintenance");
        let at = |s: &str| SystemTime::from(s.parse::<Timestamp>().expect("time"));
        assert!(!in_maintenance(Some(&m), at("2026-12-24T21:59:59Z")));
        assert!(in_maintenance(Some(&m), at("2026-12-24T22:00:00Z")));
        assert!(in_maintenance(Some(&m), at("2026-12-25T01:59:59Z")));
        assert!(
            !in_maintenance(Some(&m), at("2026-12-25T02:00:00Z")),
            "end is exclusive"
        );
        assert!(!in_maintenance(None, at("2026-12-24T23:00:00Z")));
        let suspended = Maintenance {
            suspend: true,
            windows: Vec::new(),
        };
        assert!(in_maintenance(Some(&suspended), SystemTime::now()));
    }
}
