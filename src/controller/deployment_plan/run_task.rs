//! The background task of one plan run: drives the engine and folds its events into
//! status (coalesced writes), Events and metrics.

use super::*;
use crate::controller::status::{StatusWriter, WriteError};
use crate::telemetry::Metrics;

/// One run of one plan, driven on its own task.
pub(super) struct PlanRun {
    pub(super) ctx: Arc<Context>,
    pub(super) jobs: JobWatch,
    pub(super) api: Api<DeploymentPlan>,
    pub(super) plan: DeploymentPlan,
    pub(super) generation: Arc<AtomicI64>,
    pub(super) run_id: String,
    pub(super) progress_key: String,
    pub(super) fingerprint: String,
    /// The status to resume from, when resuming.
    pub(super) old_status: Option<DeploymentPlanStatus>,
}

impl PlanRun {
    fn api_namespace(&self) -> String {
        self.plan.namespace().unwrap_or_default()
    }

    pub(super) async fn drive(
        self,
        resolved: Resolved,
        resume: Option<ResumeState>,
        control: watch::Receiver<Control>,
    ) {
        let (tx, rx) = mpsc::channel(1024);
        let Resolved {
            spec,
            hosts,
            runner,
            inventory,
        } = resolved;
        // the same for every attempt of this run, by whichever replica: a resumed run's
        // stages wait on the host for its attempts still running there
        let lock_scope = format!(
            "{}/{}/{}",
            self.api_namespace(),
            self.plan.uid().unwrap_or_else(|| self.plan.name_any()),
            self.run_id
        );
        let runner = ClusterRunner {
            ssh: runner.with_lock_scope(lock_scope),
            jobs: Api::namespaced(self.ctx.client.clone(), &self.api_namespace()),
            watch: Some(self.jobs.clone()),
            namespace: self.api_namespace(),
            owner: self.plan.controller_owner_ref(&()),
            plan: self.plan.name_any(),
            run_key: self.progress_key.clone(),
        };
        let mut fold = Fold::new(
            FoldStart {
                old_status: self.old_status.as_ref(),
                conditions: self
                    .plan
                    .status
                    .as_ref()
                    .map(|s| s.conditions.clone())
                    .unwrap_or_default(),
                generation: self.generation.load(Ordering::SeqCst),
                metrics: &self.ctx.metrics,
            },
            &spec,
            hosts.len(),
            resume.clone(),
        );
        let resumed = resume.is_some();
        let run = plan::run_plan(
            &spec,
            hosts,
            &runner,
            resume.unwrap_or_default(),
            control,
            tx,
        );
        tokio::pin!(run);
        {
            let consume = self.consume(&mut fold, rx, resumed, &inventory);
            tokio::pin!(consume);
            tokio::select! {
                _ = &mut run => {
                    // the engine is done and dropped its sender: drain the rest
                    consume.await;
                }
                () = &mut consume => {
                    // the plan is gone: dropping the run cancels it and closes its connections
                }
            }
        }
    }

    /// Folds events into status until the engine finishes (or the plan disappears).
    async fn consume(
        &self,
        fold: &mut Fold,
        mut rx: mpsc::Receiver<PlanEvent>,
        resumed: bool,
        inventory: &Inventory,
    ) {
        let mut writer = StatusWriter::new(
            self.api.clone(),
            self.plan.name_any(),
            self.ctx.metrics.clone(),
            self.plan.status.as_ref(),
        );
        let mut tick = tokio::time::interval(WRITE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_write = Instant::now();
        // the first write (phase Running, run id) goes out at once
        fold.dirty = true;
        if resumed {
            let note = format!("resuming run {} from status", self.run_id);
            runtime::publish_event(&self.ctx, &self.plan, EventType::Normal, "RunResumed", note)
                .await;
        }
        loop {
            tokio::select! {
                event = rx.recv() => {
                    let Some(event) = event else { break };
                    if let PlanEvent::HostKeyAccepted { host, fingerprint, .. } = &event {
                        self.pin(inventory, &host.name, fingerprint).await;
                    }
                    for (type_, reason, note) in fold.apply(&self.ctx.metrics, &event) {
                        runtime::publish_event(&self.ctx, &self.plan, type_, reason, note).await;
                    }
                    if let PlanEvent::Checkpoint { ack } = &event {
                        if self.write_durably(&mut writer, fold).await.is_err() {
                            return;
                        }
                        last_write = Instant::now();
                        ack.done();
                    }
                }
                _ = tick.tick() => {
                    let generation = self.generation.load(Ordering::SeqCst);
                    if fold.generation != generation {
                        fold.generation = generation;
                        fold.dirty = true;
                    }
                    if fold.dirty {
                        if self.write(&mut writer, fold).await.is_err() {
                            return;
                        }
                        last_write = Instant::now();
                    } else if last_write.elapsed() > LIVENESS_INTERVAL {
                        last_write = Instant::now();
                        if matches!(self.api.get_opt(&self.plan.name_any()).await, Ok(None)) {
                            return;
                        }
                    }
                }
            }
        }
        if let Some(summary) = fold.failure_summary() {
            runtime::publish_event(
                &self.ctx,
                &self.plan,
                EventType::Warning,
                "HostsFailed",
                summary,
            )
            .await;
        }
        // the last write says how the run ended: retried, so the plan never stays Running
        fold.generation = self.generation.load(Ordering::SeqCst);
        let status = fold.status(&self.run_id, &self.progress_key, &self.fingerprint);
        match writer.write_final(&status, FINAL_WRITE_ATTEMPTS).await {
            Ok(()) => fold.dirty = false,
            Err(e) => {
                tracing::error!(plan = %self.plan.name_any(), error = %e, "the run's final status could not be written; the next reconcile resumes from the last one written");
            }
        }
    }

    /// Pins a host key this run trusted on first use in the Inventory's pins ConfigMap, so
    /// the Inventory's probes and later runs refuse any other key for the host.
    async fn pin(&self, inventory: &Inventory, host: &str, fingerprint: &str) {
        let Some(endpoint) = resolve_inv::endpoints(inventory, None)
            .unwrap_or_default()
            .into_iter()
            .find(|e| e.name == host)
        else {
            return;
        };
        let pin = crate::ssh::Pin {
            host: endpoint.name,
            address: endpoint.address,
            port: endpoint.port,
            fingerprint: fingerprint.to_string(),
        };
        if let Err(e) = super::super::inventory::record_pins(&self.ctx, inventory, &[pin]).await {
            tracing::warn!(plan = %self.plan.name_any(), host, error = %e, "could not pin a host key trusted on first use");
        }
    }

    /// Writes the status until a write succeeds (a `runOnce` stage waits on it, so a
    /// restart never runs it again); `Err` means the plan is gone and the run must end.
    async fn write_durably(
        &self,
        writer: &mut StatusWriter<DeploymentPlan>,
        fold: &mut Fold,
    ) -> Result<(), ()> {
        let mut delay = WRITE_INTERVAL;
        while fold.dirty {
            self.write(writer, fold).await?;
            if fold.dirty {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(LIVENESS_INTERVAL);
            }
        }
        Ok(())
    }

    /// Writes the status (coalesced by the writer); `Err` means the plan is gone and the
    /// run must end.
    async fn write(
        &self,
        writer: &mut StatusWriter<DeploymentPlan>,
        fold: &mut Fold,
    ) -> Result<(), ()> {
        fold.generation = self.generation.load(Ordering::SeqCst);
        let status = fold.status(&self.run_id, &self.progress_key, &self.fingerprint);
        match writer.write(&status).await {
            Ok(_) => {
                fold.conditions = status.conditions;
                fold.dirty = false;
                Ok(())
            }
            Err(WriteError::Gone) => {
                tracing::info!(plan = %self.plan.name_any(), "plan deleted: cancelling its run");
                Err(())
            }
            Err(e) => {
                tracing::warn!(plan = %self.plan.name_any(), error = %e, "status write failed; retrying");
                Ok(())
            }
        }
    }
}

/// What a fold starts from besides the spec.
struct FoldStart<'a> {
    /// The status to resume from, when resuming.
    old_status: Option<&'a DeploymentPlanStatus>,
    /// The plan's conditions now (their transition times are kept).
    conditions: Vec<Condition>,
    generation: i64,
    metrics: &'a Metrics,
}

/// Everything status says about a run, updated event by event.
struct Fold {
    state: ResumeState,
    total: usize,
    running: HashMap<usize, ()>,
    phase: PlanPhase,
    finished: Option<Phase>,
    batch: Option<BatchProgress>,
    stages: Vec<StageProgress>,
    rollback: Vec<StageProgress>,
    failures: Vec<api::HostFailure>,
    failure_events: usize,
    started_at: Time,
    finished_at: Option<Time>,
    conditions: Vec<Condition>,
    stage_started: HashMap<(usize, bool), Instant>,
    exceeded: bool,
    /// Resumed from status: the run already announced itself (`RunResumed` instead).
    resumed: bool,
    dirty: bool,
    generation: i64,
    /// `outrider_plan_hosts_in_flight`, given back for `running` hosts when the fold is
    /// dropped (the run ended, was cancelled or aborted).
    in_flight: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for Fold {
    fn drop(&mut self) {
        self.in_flight
            .dec_by(i64::try_from(self.running.len()).unwrap_or(0));
    }
}

/// Bytes of a failure's output kept in status: with at most [`MAX_FAILURES`] failures,
/// status stays far below etcd's object limit even when the output is all escapes.
const STATUS_TAIL_BYTES: usize = 512;

/// The end of a failed host's output, at most [`STATUS_TAIL_BYTES`] bytes.
fn status_tail(output: &str) -> String {
    crate::text::tail(output, STATUS_TAIL_BYTES)
}

fn stage_list(stages: &[plan::StageSpec]) -> Vec<StageProgress> {
    stages
        .iter()
        .map(|s| StageProgress {
            name: s.name.clone(),
            ..Default::default()
        })
        .collect()
}

fn bump(list: &mut [StageProgress], index: usize, ok: bool) {
    if let Some(s) = list.get_mut(index) {
        if ok {
            s.succeeded = s.succeeded.saturating_add(1);
        } else {
            s.failed = s.failed.saturating_add(1);
        }
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Fold {
    fn new(
        start: FoldStart<'_>,
        spec: &PlanSpec,
        total: usize,
        resume: Option<ResumeState>,
    ) -> Self {
        let old = start.old_status.cloned().unwrap_or_default();
        let resumed = resume.is_some();
        let keep = |old: &[StageProgress], fresh: Vec<StageProgress>| {
            if resumed && old.len() == fresh.len() {
                old.to_vec()
            } else {
                fresh
            }
        };
        Self {
            state: resume.unwrap_or_default(),
            total,
            running: HashMap::new(),
            phase: PlanPhase::Running,
            finished: None,
            batch: old.batch.filter(|_| resumed),
            stages: keep(&old.stages, stage_list(&spec.stages)),
            rollback: keep(&old.rollback, stage_list(&spec.rollback)),
            failures: if resumed {
                old.failures.clone()
            } else {
                Vec::new()
            },
            failure_events: if resumed { MAX_FAILURE_EVENTS } else { 0 },
            started_at: old
                .started_at
                .clone()
                .filter(|_| resumed)
                .unwrap_or_else(|| Time(Timestamp::now())),
            finished_at: None,
            conditions: start.conditions,
            stage_started: HashMap::new(),
            exceeded: false,
            resumed,
            dirty: true,
            generation: start.generation,
            in_flight: start.metrics.plan_hosts_in_flight.clone(),
        }
    }

    fn failure(f: &plan::HostFailure) -> api::HostFailure {
        api::HostFailure {
            host: f.host.clone(),
            stage: f.stage.clone(),
            reason: f.failure.reason.as_str().to_string(),
            exit_code: f.failure.exit_code,
            signal: f.failure.signal.clone(),
            attempts: f.attempts,
            output_tail: status_tail(&f.failure.output_tail),
            finished_at: Some(Time(Timestamp::now())),
        }
    }

    fn record_failure(
        &mut self,
        f: &plan::HostFailure,
        out: &mut Vec<(EventType, &'static str, String)>,
    ) {
        if self.failures.len() < MAX_FAILURES {
            self.failures.push(Self::failure(f));
        }
        self.failure_events += 1;
        if self.failure_events <= MAX_FAILURE_EVENTS {
            out.push((
                EventType::Warning,
                "HostFailed",
                format!(
                    "host {} failed stage {} after {} attempt(s): {}",
                    f.host, f.stage, f.attempts, f.failure
                ),
            ));
        }
    }

    fn failure_summary(&self) -> Option<String> {
        let more = self.failure_events.saturating_sub(MAX_FAILURE_EVENTS);
        (more > 0).then(|| {
            format!("{more} more host failures not reported as Events (see status.failures)")
        })
    }

    /// Folds one event; returns the Events to publish.
    fn apply(
        &mut self,
        metrics: &Metrics,
        event: &PlanEvent,
    ) -> Vec<(EventType, &'static str, String)> {
        self.state.record(event);
        let mut out = Vec::new();
        match event {
            PlanEvent::RunStarted { .. } if self.resumed => {}
            PlanEvent::RunStarted {
                hosts,
                batches,
                allowed_failures,
            } => out.push((
                EventType::Normal,
                "RunStarted",
                format!(
                    "run started: {hosts} hosts in {batches} batches, up to {allowed_failures} failures allowed"
                ),
            )),
            PlanEvent::BatchStarted {
                index,
                total,
                hosts,
            } => {
                self.batch = Some(BatchProgress {
                    current: count(index + 1),
                    total: count(*total),
                });
                out.push((
                    EventType::Normal,
                    "BatchStarted",
                    format!(
                        "batch {}/{total} started: {} hosts{}",
                        index + 1,
                        hosts.len(),
                        if *index == 0 { " (canary)" } else { "" }
                    ),
                ));
            }
            PlanEvent::HostStageStarted { host, rollback, .. } => {
                self.stage_started
                    .insert((host.index, *rollback), Instant::now());
                if !rollback && self.running.insert(host.index, ()).is_none() {
                    metrics.plan_hosts_in_flight.inc();
                }
            }
            PlanEvent::HostStageFinished {
                host,
                stage_index,
                result,
                rollback,
                ..
            } => {
                if let Some(t) = self.stage_started.remove(&(host.index, *rollback)) {
                    metrics
                        .plan_host_stage_duration
                        .observe(t.elapsed().as_secs_f64());
                }
                let list = if *rollback {
                    &mut self.rollback
                } else {
                    &mut self.stages
                };
                bump(list, *stage_index, result.is_ok());
            }
            PlanEvent::HostFinished { host, failure, .. } => {
                if self.running.remove(&host.index).is_some() {
                    metrics.plan_hosts_in_flight.dec();
                }
                if let Some(f) = failure {
                    self.record_failure(f, &mut out);
                }
            }
            PlanEvent::BudgetExceeded { failed, allowed } => {
                self.exceeded = true;
                out.push((
                    EventType::Warning,
                    "BudgetExceeded",
                    format!("failure budget exceeded: {failed} hosts failed, {allowed} allowed"),
                ));
            }
            PlanEvent::RunOnceFailed { stage } => {
                self.exceeded = true;
                out.push((
                    EventType::Warning,
                    "RunOnceFailed",
                    format!("runOnce stage {stage} failed: the run stops"),
                ));
            }
            PlanEvent::RollbackStarted { hosts } => out.push((
                EventType::Warning,
                "RollbackStarted",
                format!("rolling back {hosts} hosts"),
            )),
            PlanEvent::RollbackHostFinished { failure, .. } => {
                if let Some(f) = failure {
                    self.record_failure(f, &mut out);
                }
            }
            PlanEvent::Paused => self.phase = PlanPhase::Paused,
            PlanEvent::Resumed => self.phase = PlanPhase::Running,
            PlanEvent::Stopping | PlanEvent::HostKeyAccepted { .. } => {}
            PlanEvent::HostStageRetrying { .. } | PlanEvent::Checkpoint { .. } => return out,
            PlanEvent::Finished { phase } => {
                self.finished = Some(*phase);
                let (type_, reason) = match phase {
                    Phase::Succeeded => (EventType::Normal, "Succeeded"),
                    Phase::Failed => (EventType::Warning, "Failed"),
                    Phase::RolledBack => (EventType::Warning, "RolledBack"),
                    Phase::Stopped => (EventType::Normal, "Stopped"),
                };
                if *phase != Phase::Stopped {
                    self.phase = match phase {
                        Phase::Succeeded => PlanPhase::Succeeded,
                        Phase::Failed => PlanPhase::Failed,
                        _ => PlanPhase::RolledBack,
                    };
                    self.finished_at = Some(Time(Timestamp::now()));
                    metrics
                        .plan_runs
                        .get_or_create(&ResultLabel {
                            result: phase.as_str().to_string(),
                        })
                        .inc();
                }
                out.push((
                    type_,
                    reason,
                    format!(
                        "run {}: {} of {} hosts succeeded, {} failed",
                        phase.as_str(),
                        self.state.done.len(),
                        self.total,
                        self.state.failed.len()
                    ),
                ));
            }
        }
        self.dirty = true;
        out
    }

    fn desired_conditions(&self) -> Vec<Desired> {
        let hosts = format!(
            "{} of {} hosts succeeded, {} failed",
            self.state.done.len(),
            self.total,
            self.state.failed.len()
        );
        match self.phase {
            PlanPhase::Succeeded => vec![
                Desired::new(READY, true, "Succeeded", hosts.clone()),
                Desired::new(PROGRESSING, false, "Completed", hosts.clone()),
                Desired::new(FAILED, false, "Succeeded", hosts),
            ],
            PlanPhase::Failed | PlanPhase::RolledBack => {
                let reason = if self.phase == PlanPhase::Failed {
                    "RunFailed"
                } else {
                    "RolledBack"
                };
                vec![
                    Desired::new(READY, false, reason, hosts.clone()),
                    Desired::new(PROGRESSING, false, reason, hosts.clone()),
                    Desired::new(FAILED, true, reason, hosts),
                ]
            }
            PlanPhase::Paused => vec![
                Desired::new(READY, false, "Paused", hosts.clone()),
                Desired::new(PROGRESSING, false, "Paused", hosts.clone()),
                Desired::new(FAILED, false, "Paused", hosts),
            ],
            PlanPhase::Running | PlanPhase::Pending => {
                let reason = if self.exceeded {
                    "RollingBack"
                } else {
                    "BatchRunning"
                };
                vec![
                    Desired::new(READY, false, "Running", hosts.clone()),
                    Desired::new(PROGRESSING, true, reason, hosts.clone()),
                    Desired::new(FAILED, false, "Running", hosts),
                ]
            }
        }
    }

    fn status(&self, run_id: &str, key: &str, fingerprint: &str) -> DeploymentPlanStatus {
        let succeeded = self.state.done.len();
        let failed = self.state.failed.len();
        let running = self.running.len();
        let progress = Progress {
            v: PROGRESS_VERSION,
            key: key.to_string(),
            hosts: fingerprint.to_string(),
            state: self.state.clone(),
        };
        DeploymentPlanStatus {
            observed_generation: Some(self.generation),
            run: Some(run_id.to_string()),
            phase: Some(self.phase),
            batch: self.batch,
            hosts: Some(HostCounts {
                total: count(self.total),
                succeeded: count(succeeded),
                failed: count(failed),
                running: count(running),
                pending: count(
                    self.total
                        .saturating_sub(succeeded + failed + running)
                        .min(self.total),
                ),
            }),
            stages: self.stages.clone(),
            rollback: if self.exceeded || self.rollback.iter().any(|s| s.succeeded + s.failed > 0) {
                self.rollback.clone()
            } else {
                Vec::new()
            },
            failures: self.failures.clone(),
            started_at: Some(self.started_at.clone()),
            finished_at: self.finished_at.clone(),
            progress: serde_json::to_value(progress).ok(),
            conditions: conditions::merge(
                &self.conditions,
                &self.desired_conditions(),
                Some(self.generation),
                &Time(Timestamp::now()),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(index: usize) -> plan::HostRef {
        plan::HostRef {
            index,
            name: format!("h{index}"),
        }
    }

    /// The fold turns engine events into exactly what status shows, with nothing but metrics.
    #[test]
    fn the_event_fold_counts_hosts_lists_failures_and_ends_in_the_engines_phase() {
        let metrics = Metrics::new(&mut prometheus_client::registry::Registry::default());
        let spec = PlanSpec::new(vec![plan::StageSpec {
            name: "deploy".into(),
            action: StageAction::Script("true".into()),
            env: Default::default(),
            secret_env: Vec::new(),
            timeout: Duration::from_secs(5),
            retries: 0,
            run_once: false,
        }]);
        let mut fold = Fold::new(
            FoldStart {
                old_status: None,
                conditions: Vec::new(),
                generation: 7,
                metrics: &metrics,
            },
            &spec,
            3,
            None,
        );
        let failure = plan::StageFailure::new(plan::FailureReason::NonZeroExit, "exit 3");
        let mut events = Vec::new();
        let script = vec![
            PlanEvent::RunStarted {
                hosts: 3,
                batches: 1,
                allowed_failures: 1,
            },
            PlanEvent::BatchStarted {
                index: 0,
                total: 1,
                hosts: 0..3,
            },
            PlanEvent::HostStageStarted {
                host: host(0),
                stage: "deploy".into(),
                stage_index: 0,
                attempt: 1,
                rollback: false,
            },
            PlanEvent::HostStageStarted {
                host: host(1),
                stage: "deploy".into(),
                stage_index: 0,
                attempt: 1,
                rollback: false,
            },
        ];
        for e in &script {
            events.extend(fold.apply(&metrics, e));
        }
        let mid = fold.status("7", "k2-x", "fp");
        assert_eq!(mid.phase, Some(PlanPhase::Running));
        assert_eq!(mid.hosts.map(|h| (h.running, h.pending)), Some((2, 1)));
        assert_eq!(metrics.plan_hosts_in_flight.get(), 2);
        let rest = vec![
            PlanEvent::HostStageFinished {
                host: host(0),
                stage: "deploy".into(),
                stage_index: 0,
                attempts: 1,
                result: Ok(Default::default()),
                rollback: false,
                run_once: false,
            },
            PlanEvent::HostFinished {
                host: host(0),
                result: plan::HostState::Succeeded,
                started: true,
                failure: None,
            },
            PlanEvent::HostStageFinished {
                host: host(1),
                stage: "deploy".into(),
                stage_index: 0,
                attempts: 1,
                result: Err(failure.clone()),
                rollback: false,
                run_once: false,
            },
            PlanEvent::HostFinished {
                host: host(1),
                result: plan::HostState::Failed,
                started: true,
                failure: Some(plan::HostFailure {
                    host: "h1".into(),
                    stage: "deploy".into(),
                    attempts: 1,
                    failure,
                }),
            },
            PlanEvent::Finished {
                phase: Phase::Failed,
            },
        ];
        for e in &rest {
            events.extend(fold.apply(&metrics, e));
        }
        let end = fold.status("7", "k2-x", "fp");
        assert_eq!(end.phase, Some(PlanPhase::Failed));
        assert_eq!(end.observed_generation, Some(7));
        let counts = end.hosts.expect("counts");
        assert_eq!(
            (
                counts.succeeded,
                counts.failed,
                counts.running,
                counts.pending
            ),
            (1, 1, 0, 1)
        );
        assert_eq!(end.stages[0].succeeded, 1);
        assert_eq!(end.stages[0].failed, 1);
        assert_eq!(end.failures.len(), 1);
        assert_eq!(end.failures[0].host, "h1");
        assert_eq!(end.failures[0].reason, "NonZeroExit");
        assert!(end.finished_at.is_some());
        let ready = conditions::find(&end.conditions, READY).expect("Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "RunFailed")
        );
        assert_eq!(metrics.plan_hosts_in_flight.get(), 0);
        let reasons: Vec<&str> = events.iter().map(|(_, r, _)| *r).collect();
        assert_eq!(
            reasons,
            ["RunStarted", "BatchStarted", "HostFailed", "Failed"]
        );
        match recorded(Some(&end)) {
            Recorded::Readable(p) => {
                assert_eq!((p.v, p.key.as_str()), (PROGRESS_VERSION, "k2-x"));
                assert!(p.state.done.contains(0) && p.state.failed.contains(1));
            }
            other => panic!("progress unreadable: {other:?}"),
        }
    }

    #[test]
    fn status_tail_keeps_the_last_bytes_on_a_char_boundary() {
        assert_eq!(status_tail("short\n"), "short");
        let long = "é".repeat(1000);
        let t = status_tail(&long);
        assert!(t.len() <= STATUS_TAIL_BYTES, "{}", t.len());
        assert!(t.starts_with('…') && t.ends_with('é'));
        assert!(t.len() > STATUS_TAIL_BYTES - 4);
    }

    /// The worst status a 5,000-host run can write: every host failed or done in an
    /// alternating pattern (no ranges to compress), the most failures, each with output
    /// of JSON-escaped multibyte characters, every stage list at its schema maximum.
    #[test]
    fn status_of_a_5000_host_run_stays_under_256_kib() {
        let hosts = 5000;
        let mut state = ResumeState::default();
        for i in 0..hosts {
            if i % 2 == 0 {
                state.done.insert(i);
            } else {
                state.failed.insert(i);
                state.rolled_back.insert(i);
                if i % 4 == 1 {
                    state.rollback_failed.insert(i);
                }
            }
        }
        for i in 0..200u32 {
            state.partial.insert(i * 25, 3);
        }
        let noisy: String = "\"\u{1}€\\\n".repeat(2000);
        let failures: Vec<api::HostFailure> = (0..MAX_FAILURES)
            .map(|i| {
                Fold::failure(&plan::HostFailure {
                    host: format!("{:-<60}{i:03}", "host"),
                    stage: "s".repeat(63),
                    attempts: 10,
                    failure: plan::StageFailure {
                        reason: plan::FailureReason::NonZeroExit,
                        exit_code: Some(255),
                        signal: Some("KILL".into()),
                        message: "m".repeat(4096),
                        output_tail: noisy.clone(),
                    },
                })
            })
            .collect();
        let stage = |i: usize| StageProgress {
            name: format!("{:x<60}{i:03}", "stage"),
            succeeded: 5000,
            failed: 5000,
        };
        let progress = Progress {
            v: PROGRESS_VERSION,
            key: format!("{}/{}", "f".repeat(16), "f".repeat(16)),
            hosts: "f".repeat(16),
            state,
        };
        let condition = |t: &str| Condition {
            type_: t.into(),
            status: "False".into(),
            reason: "BudgetExceeded".into(),
            message: "x".repeat(1024),
            observed_generation: Some(1),
            last_transition_time: Time(Timestamp::now()),
        };
        let status = DeploymentPlanStatus {
            observed_generation: Some(1),
            run: Some("r".repeat(128)),
            phase: Some(PlanPhase::RolledBack),
            batch: Some(BatchProgress {
                current: 50,
                total: 50,
            }),
            hosts: Some(HostCounts {
                total: 5000,
                succeeded: 2500,
                failed: 2500,
                running: 0,
                pending: 0,
            }),
            stages: (0..32).map(stage).collect(),
            rollback: (0..16).map(stage).collect(),
            failures,
            started_at: Some(Time(Timestamp::now())),
            finished_at: Some(Time(Timestamp::now())),
            progress: serde_json::to_value(&progress).ok(),
            conditions: vec![condition(READY), condition(PROGRESSING), condition(FAILED)],
        };
        let json = serde_json::to_vec(&status).expect("json");
        assert!(
            json.len() < 256 * 1024,
            "status of a 5,000-host run is {} bytes",
            json.len()
        );
        eprintln!("worst-case status: {} bytes", json.len());
        let back: DeploymentPlanStatus = serde_json::from_slice(&json).expect("parse");
        assert_eq!(
            recorded(Some(&back)),
            Recorded::Readable(Box::new(progress))
        );
    }
}
