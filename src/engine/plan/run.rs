//! The scheduler. Hosts run in inventory order, batch by batch (batch 0 is the canary), at
//! most `maxParallel` at once; a host runs its stages in order on one handle and stops at
//! its first failed stage. Failed hosts count against the budget; once it is exceeded no
//! new host or stage starts, in-flight stages finish (a host mid-way stops before its next
//! stage rather than change more), and every host that started a stage, failed ones
//! included, is rolled back, last batch first. Everything runs on the caller's task (no spawns), so
//! dropping the future cancels the run and closes every connection.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, watch};

use super::batches::{batch_size, batches, max_unavailable};
use super::{
    Ack, Control, FailureReason, HostFailure, HostRef, HostReport, HostState, OnInterrupt, Phase,
    PlanEvent, PlanOutcome, PlanSpec, ResumeState, RollbackState, StageCount, StageFailure,
    StageRunner, StageSpec,
};
use crate::ssh::Endpoint;

/// Extra time the engine grants a runner past a stage's timeout (to kill the remote process
/// and collect its output) before it gives up on the attempt itself.
const TIMEOUT_GRACE: Duration = Duration::from_secs(15);

/// Runs `spec` over `hosts`, skipping what `resume` lists as done, obeying `control`, and
/// reporting progress on `events` (a full channel slows the run down; a closed one is
/// ignored). Never fails as a whole: every problem ends up in the outcome.
pub async fn run_plan<R: StageRunner>(
    spec: &PlanSpec,
    hosts: Vec<Endpoint>,
    runner: &R,
    resume: ResumeState,
    control: watch::Receiver<Control>,
    events: mpsc::Sender<PlanEvent>,
) -> PlanOutcome {
    let run = Run {
        spec,
        hosts: &hosts,
        runner,
        events,
        abort: AtomicBool::new(false),
        once: spec
            .stages
            .iter()
            .enumerate()
            .map(|(i, _)| {
                let done = resume.run_once_done.contains(&(i as u32));
                tokio::sync::Mutex::new(done.then_some(true))
            })
            .collect(),
        rollback_once: spec
            .rollback
            .iter()
            .map(|_| tokio::sync::Mutex::new(None))
            .collect(),
        counts: Mutex::new(counts(&spec.stages)),
        rollback_counts: Mutex::new(counts(&spec.rollback)),
    };
    run.drive(resume, control).await
}

fn counts(stages: &[StageSpec]) -> Vec<StageCount> {
    stages
        .iter()
        .map(|s| StageCount {
            name: s.name.clone(),
            ..Default::default()
        })
        .collect()
}

/// What one host's pass over the stages (or the rollback) produced.
struct HostRun<H> {
    index: usize,
    state: HostState,
    started: bool,
    stages_done: usize,
    failure: Option<HostFailure>,
    /// A failed runOnce stage: the run cannot go on.
    fatal: bool,
    handle: Option<H>,
}

/// Shared, read-mostly state of one run; host futures borrow it.
struct Run<'a, R: StageRunner> {
    spec: &'a PlanSpec,
    hosts: &'a [Endpoint],
    runner: &'a R,
    events: mpsc::Sender<PlanEvent>,
    /// Set when the budget is exceeded or the run is stopped: no host starts another stage.
    abort: AtomicBool,
    /// Per stage: result of a runOnce stage once run (`Some(true)` ok, `Some(false)` failed).
    once: Vec<tokio::sync::Mutex<Option<bool>>>,
    rollback_once: Vec<tokio::sync::Mutex<Option<bool>>>,
    counts: Mutex<Vec<StageCount>>,
    rollback_counts: Mutex<Vec<StageCount>>,
}

/// The next control value, or `Stop` once when the driver dropped the sender.
async fn control_changed(control: &mut watch::Receiver<Control>, open: &mut bool) -> Control {
    if !*open {
        return std::future::pending().await;
    }
    match control.changed().await {
        Ok(()) => *control.borrow_and_update(),
        Err(_) => {
            *open = false;
            Control::Stop
        }
    }
}

/// Scheduler state that only the driving loop touches.
struct Book<H> {
    reports: Vec<HostReport>,
    failures: Vec<HostFailure>,
    failed: usize,
    allowed: usize,
    exceeded: bool,
    stopped: bool,
    control: Control,
    handles: HashMap<usize, H>,
}

impl<'a, R: StageRunner> Run<'a, R> {
    async fn emit(&self, event: PlanEvent) {
        let _ = self.events.send(event).await;
    }

    /// Waits until the consumer has made every event so far durable (or dropped the ask).
    async fn checkpoint(&self) {
        let (ack, done) = Ack::new();
        self.emit(PlanEvent::Checkpoint { ack }).await;
        let _ = done.await;
    }

    fn host_ref(&self, index: usize) -> HostRef {
        HostRef {
            index,
            name: self.hosts[index].name.clone(),
        }
    }

    async fn apply_control(&self, book: &mut Book<R::Host>, next: Control) {
        if next == book.control || book.stopped {
            return;
        }
        let previous = std::mem::replace(&mut book.control, next);
        match next {
            Control::Pause => self.emit(PlanEvent::Paused).await,
            Control::Run if previous == Control::Pause => self.emit(PlanEvent::Resumed).await,
            Control::Run => {}
            Control::Stop => {
                book.stopped = true;
                self.abort.store(true, Ordering::SeqCst);
                self.emit(PlanEvent::Stopping).await;
            }
        }
    }

    async fn drive(
        &self,
        resume: ResumeState,
        mut control: watch::Receiver<Control>,
    ) -> PlanOutcome {
        let spec = self.spec;
        let total = self.hosts.len();
        let ranges = batches(total, batch_size(spec.batch_size, total));
        let allowed = max_unavailable(spec.max_unavailable, total);
        let all = spec.stages.len();
        let mut book = Book {
            reports: self
                .hosts
                .iter()
                .enumerate()
                .map(|(i, h)| HostReport {
                    name: h.name.clone(),
                    state: if resume.done.contains(i) {
                        HostState::Succeeded
                    } else if resume.failed.contains(i) {
                        HostState::Failed
                    } else {
                        HostState::Pending
                    },
                    started: resume.started(i),
                    stages_done: if resume.done.contains(i) {
                        all
                    } else {
                        resume.stages_done(i).unwrap_or(0)
                    },
                    failure: None,
                    rollback: match (
                        resume.rolled_back.contains(i),
                        resume.rollback_failed.contains(i),
                    ) {
                        (false, _) => RollbackState::NotRun,
                        (true, false) => RollbackState::Succeeded,
                        (true, true) => RollbackState::Failed,
                    },
                    rollback_failure: None,
                })
                .collect(),
            failures: Vec::new(),
            failed: resume.failed.len(),
            allowed,
            exceeded: resume.budget_exceeded,
            stopped: false,
            control: Control::Run,
            handles: HashMap::new(),
        };
        let mut control_open = true;
        let initial = *control.borrow_and_update();
        self.apply_control(&mut book, initial).await;
        if book.exceeded {
            self.abort.store(true, Ordering::SeqCst);
        }
        self.emit(PlanEvent::RunStarted {
            hosts: total,
            batches: ranges.len(),
            allowed_failures: allowed,
        })
        .await;

        if spec.on_interrupt == OnInterrupt::Fail {
            self.fail_interrupted(&mut book, &resume).await;
        }

        let mut ran_a_batch = false;
        for (bi, range) in ranges.iter().enumerate() {
            if book.exceeded || book.stopped {
                break;
            }
            let mut queue: VecDeque<usize> = range
                .clone()
                .filter(|&i| book.reports[i].state == HostState::Pending)
                .collect();
            if queue.is_empty() {
                continue;
            }
            if ran_a_batch && !spec.pause_between_batches.is_zero() {
                let sleep = tokio::time::sleep(spec.pause_between_batches);
                tokio::pin!(sleep);
                while !book.stopped {
                    tokio::select! {
                        _ = &mut sleep => break,
                        c = control_changed(&mut control, &mut control_open) => {
                            self.apply_control(&mut book, c).await;
                        }
                    }
                }
                if book.stopped {
                    break;
                }
            }
            ran_a_batch = true;
            self.emit(PlanEvent::BatchStarted {
                index: bi,
                total: ranges.len(),
                hosts: range.clone(),
            })
            .await;
            let mut in_flight = FuturesUnordered::new();
            loop {
                while !book.stopped
                    && !book.exceeded
                    && book.control != Control::Pause
                    && in_flight.len() < spec.max_parallel.max(1)
                {
                    let Some(i) = queue.pop_front() else { break };
                    let report = &book.reports[i];
                    in_flight.push(self.run_host(i, report.stages_done, report.started));
                }
                if in_flight.is_empty() && (queue.is_empty() || book.stopped || book.exceeded) {
                    break;
                }
                tokio::select! {
                    Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                        self.finish_host(&mut book, done).await;
                    }
                    c = control_changed(&mut control, &mut control_open) => {
                        self.apply_control(&mut book, c).await;
                    }
                }
            }
        }

        let phase = if book.exceeded {
            if spec.rollback.is_empty() {
                Phase::Failed
            } else {
                self.rollback(&mut book, &ranges).await
            }
        } else if book.stopped {
            Phase::Stopped
        } else {
            Phase::Succeeded
        };
        self.emit(PlanEvent::Finished { phase }).await;
        let lock = |m: &Mutex<Vec<StageCount>>| m.lock().map(|c| c.clone()).unwrap_or_default();
        PlanOutcome {
            phase,
            hosts: book.reports,
            stages: lock(&self.counts),
            rollback_stages: lock(&self.rollback_counts),
            failures: book.failures,
            failed: book.failed,
            allowed_failures: book.allowed,
            batches: ranges.len(),
        }
    }

    /// Under `onInterrupt: Fail`, hosts a previous run left mid-way count as failed.
    async fn fail_interrupted(&self, book: &mut Book<R::Host>, resume: &ResumeState) {
        for (&i, &done) in &resume.partial {
            let i = i as usize;
            if i >= self.hosts.len() || book.reports[i].state != HostState::Pending {
                continue;
            }
            let stage = self
                .spec
                .stages
                .get(done as usize)
                .map(|s| s.name.clone())
                .unwrap_or_default();
            let failure = HostFailure {
                host: self.hosts[i].name.clone(),
                stage,
                attempts: 0,
                failure: StageFailure::new(
                    FailureReason::Interrupted,
                    "the run was interrupted while this host was mid-way (onInterrupt: Fail)",
                ),
            };
            self.emit(PlanEvent::HostFinished {
                host: self.host_ref(i),
                result: HostState::Failed,
                started: true,
                failure: Some(failure.clone()),
            })
            .await;
            let run = HostRun {
                index: i,
                state: HostState::Failed,
                started: true,
                stages_done: done as usize,
                failure: Some(failure),
                fatal: false,
                handle: None,
            };
            self.finish_host(book, run).await;
        }
    }

    /// Books a host's result and decides whether the budget is spent.
    async fn finish_host(&self, book: &mut Book<R::Host>, done: HostRun<R::Host>) {
        let i = done.index;
        let report = &mut book.reports[i];
        report.state = done.state;
        report.started = done.started;
        report.stages_done = done.stages_done;
        report.failure = done.failure.clone();
        // Kept for the rollback (one connection per host for the whole run), within a cap.
        if let Some(handle) = done.handle
            && !self.spec.rollback.is_empty()
            && done.started
            && book.handles.len() < self.spec.retain_handles
        {
            book.handles.insert(i, handle);
        }
        if done.state != HostState::Failed {
            return;
        }
        book.failed += 1;
        if let Some(f) = done.failure {
            book.failures.push(f);
        }
        if book.exceeded {
            return;
        }
        if done.fatal {
            book.exceeded = true;
            self.abort.store(true, Ordering::SeqCst);
            let stage = book.reports[i]
                .failure
                .as_ref()
                .map(|f| f.stage.clone())
                .unwrap_or_default();
            self.emit(PlanEvent::RunOnceFailed { stage }).await;
        } else if book.failed > book.allowed {
            book.exceeded = true;
            self.abort.store(true, Ordering::SeqCst);
            self.emit(PlanEvent::BudgetExceeded {
                failed: book.failed,
                allowed: book.allowed,
            })
            .await;
        }
    }

    /// Runs the remaining stages of one host on one handle.
    async fn run_host(
        &self,
        index: usize,
        first_stage: usize,
        already_started: bool,
    ) -> HostRun<R::Host> {
        let host = self.host_ref(index);
        let mut out = HostRun {
            index,
            state: HostState::Succeeded,
            started: already_started,
            stages_done: first_stage,
            failure: None,
            fatal: false,
            handle: None,
        };
        let stages = &self.spec.stages;
        if first_stage < stages.len() {
            match self.open(&host).await {
                Ok(handle) => {
                    self.run_stages(&host, &handle, stages, first_stage, false, &mut out)
                        .await;
                    out.handle = Some(handle);
                }
                Err(failure) => {
                    self.unreachable(
                        &host,
                        &stages[first_stage],
                        first_stage,
                        failure,
                        false,
                        &mut out,
                    )
                    .await;
                }
            }
        }
        if out.state == HostState::Aborted && !out.started {
            out.state = HostState::Pending;
        }
        self.emit(PlanEvent::HostFinished {
            host,
            result: out.state,
            started: out.started,
            failure: out.failure.clone(),
        })
        .await;
        out
    }

    /// Books a host that could not be opened as a failure of the stage it was about to run.
    /// Opens a host's handle, reporting a host key trusted on first use.
    async fn open(&self, host: &HostRef) -> Result<R::Host, StageFailure> {
        let handle = self.runner.open(&self.hosts[host.index]).await?;
        if let Some((fingerprint, known_hosts_line)) = self.runner.accepted_host_key(&handle) {
            self.emit(PlanEvent::HostKeyAccepted {
                host: host.clone(),
                fingerprint,
                known_hosts_line,
            })
            .await;
        }
        Ok(handle)
    }

    async fn unreachable(
        &self,
        host: &HostRef,
        stage: &StageSpec,
        stage_index: usize,
        failure: StageFailure,
        rollback: bool,
        out: &mut HostRun<R::Host>,
    ) {
        self.count(rollback, stage_index, false);
        self.emit(PlanEvent::HostStageFinished {
            host: host.clone(),
            stage: stage.name.clone(),
            stage_index,
            attempts: 1,
            result: Err(failure.clone()),
            rollback,
            run_once: stage.run_once,
        })
        .await;
        out.state = HostState::Failed;
        out.failure = Some(HostFailure {
            host: host.name.clone(),
            stage: stage.name.clone(),
            attempts: 1,
            failure,
        });
    }

    fn count(&self, rollback: bool, stage_index: usize, ok: bool) {
        let counts = if rollback {
            &self.rollback_counts
        } else {
            &self.counts
        };
        if let Ok(mut counts) = counts.lock()
            && let Some(c) = counts.get_mut(stage_index)
        {
            if ok {
                c.succeeded += 1;
            } else {
                c.failed += 1;
            }
        }
    }

    /// Runs `stages[first..]` in order, stopping at the first failure or when the run aborts
    /// (a rollback never aborts: it always runs to its end).
    async fn run_stages(
        &self,
        host: &HostRef,
        handle: &R::Host,
        stages: &[StageSpec],
        first: usize,
        rollback: bool,
        out: &mut HostRun<R::Host>,
    ) {
        let cells = if rollback {
            &self.rollback_once
        } else {
            &self.once
        };
        for (si, stage) in stages.iter().enumerate().skip(first) {
            if !rollback && self.abort.load(Ordering::SeqCst) {
                out.state = HostState::Aborted;
                return;
            }
            let result = if stage.run_once {
                // The first host to get here runs it for everyone; the others wait for it.
                let mut cell = cells[si].lock().await;
                match *cell {
                    Some(true) => {
                        out.stages_done = si + 1;
                        continue;
                    }
                    Some(false) => {
                        out.state = HostState::Aborted;
                        return;
                    }
                    None => {
                        out.started = true;
                        let r = self.attempts(host, handle, stage, si, rollback).await;
                        if r.is_ok() && !rollback {
                            // still holding the cell: no host passes the stage before this
                            self.checkpoint().await;
                        }
                        *cell = Some(r.is_ok());
                        r
                    }
                }
            } else {
                out.started = true;
                self.attempts(host, handle, stage, si, rollback).await
            };
            match result {
                Ok(_) => out.stages_done = si + 1,
                Err(f) => {
                    out.state = HostState::Failed;
                    out.fatal = stage.run_once;
                    out.failure = Some(f);
                    return;
                }
            }
        }
    }

    /// One stage on one host, with retries and backoff; returns the attempts made.
    async fn attempts(
        &self,
        host: &HostRef,
        handle: &R::Host,
        stage: &StageSpec,
        stage_index: usize,
        rollback: bool,
    ) -> Result<u32, HostFailure> {
        let mut attempt = 1;
        loop {
            self.emit(PlanEvent::HostStageStarted {
                host: host.clone(),
                stage: stage.name.clone(),
                stage_index,
                attempt,
                rollback,
            })
            .await;
            let guard = stage.timeout.saturating_add(TIMEOUT_GRACE);
            let result = if stage.run_once {
                tokio::time::timeout(guard, self.runner.run_once(handle, stage, attempt)).await
            } else {
                tokio::time::timeout(guard, self.runner.run(handle, stage, attempt)).await
            };
            let result = result.unwrap_or_else(|_| {
                Err(StageFailure::new(
                    FailureReason::TimedOut,
                    format!("no result {:?} after the stage timeout", TIMEOUT_GRACE),
                ))
            });
            match result {
                Err(failure) if failure.reason.retryable() && attempt <= stage.retries => {
                    let retry_in = self.spec.backoff.delay(attempt.saturating_sub(1));
                    self.emit(PlanEvent::HostStageRetrying {
                        host: host.clone(),
                        stage: stage.name.clone(),
                        attempt,
                        failure,
                        retry_in,
                    })
                    .await;
                    tokio::time::sleep(retry_in).await;
                    attempt += 1;
                }
                result => {
                    let ok = result.is_ok();
                    self.count(rollback, stage_index, ok);
                    self.emit(PlanEvent::HostStageFinished {
                        host: host.clone(),
                        stage: stage.name.clone(),
                        stage_index,
                        attempts: attempt,
                        result: result.clone(),
                        rollback,
                        run_once: stage.run_once,
                    })
                    .await;
                    return match result {
                        Ok(_) => Ok(attempt),
                        Err(failure) => Err(HostFailure {
                            host: host.name.clone(),
                            stage: stage.name.clone(),
                            attempts: attempt,
                            failure,
                        }),
                    };
                }
            }
        }
    }

    /// Rolls back every host that started a stage: last batch first, each batch's hosts in
    /// parallel. A host's rollback stops at its first failed stage; other hosts go on.
    async fn rollback(&self, book: &mut Book<R::Host>, ranges: &[std::ops::Range<usize>]) -> Phase {
        let targets: Vec<usize> = (0..self.hosts.len())
            .filter(|&i| {
                book.reports[i].started && book.reports[i].rollback == RollbackState::NotRun
            })
            .collect();
        self.emit(PlanEvent::RollbackStarted {
            hosts: targets.len(),
        })
        .await;
        for range in ranges.iter().rev() {
            let jobs: Vec<(usize, Option<R::Host>)> = targets
                .iter()
                .copied()
                .filter(|i| range.contains(i))
                .map(|i| (i, book.handles.remove(&i)))
                .collect();
            let mut results = futures::stream::iter(jobs)
                .map(|(i, handle)| self.rollback_host(i, handle))
                .buffer_unordered(self.spec.max_parallel.max(1));
            while let Some(done) = results.next().await {
                let report = &mut book.reports[done.index];
                if done.state == HostState::Succeeded {
                    report.rollback = RollbackState::Succeeded;
                } else {
                    report.rollback = RollbackState::Failed;
                    report.rollback_failure = done.failure.clone();
                    if let Some(f) = done.failure {
                        book.failures.push(f);
                    }
                }
            }
        }
        if book
            .reports
            .iter()
            .any(|r| r.rollback == RollbackState::Failed)
        {
            Phase::Failed
        } else {
            Phase::RolledBack
        }
    }

    async fn rollback_host(&self, index: usize, handle: Option<R::Host>) -> HostRun<R::Host> {
        let host = self.host_ref(index);
        let mut out = HostRun {
            index,
            state: HostState::Succeeded,
            started: true,
            stages_done: 0,
            failure: None,
            fatal: false,
            handle: None,
        };
        let stages = &self.spec.rollback;
        let handle = match handle {
            Some(h) => Ok(h),
            None => self.open(&host).await,
        };
        match handle {
            Ok(h) => self.run_stages(&host, &h, stages, 0, true, &mut out).await,
            Err(failure) => {
                if let Some(first) = stages.first() {
                    self.unreachable(&host, first, 0, failure, true, &mut out)
                        .await;
                }
            }
        }
        self.emit(PlanEvent::RollbackHostFinished {
            host,
            ok: out.state == HostState::Succeeded,
            failure: out.failure.clone(),
        })
        .await;
        out
    }
}
