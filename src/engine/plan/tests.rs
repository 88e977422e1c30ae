//! Scheduler tests against a fake runner: deterministic outcomes, millisecond backoff.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::*;

/// Scripted outcomes per (host, stage): one entry per attempt, the last one repeating;
/// everything else succeeds. Every call is logged as `"<stage> <host> <attempt>"`.
#[derive(Default)]
struct Fake {
    outcomes: HashMap<(String, String), Vec<Result<(), FailureReason>>>,
    unreachable: HashSet<String>,
    delay: Duration,
    /// Reports a host key trusted on first use for every host.
    tofu: bool,
    log: Mutex<Vec<String>>,
    opens: Mutex<Vec<String>>,
}

impl Fake {
    fn fail(mut self, host: &str, stage: &str, attempts: Vec<Result<(), FailureReason>>) -> Self {
        self.outcomes
            .insert((host.to_string(), stage.to_string()), attempts);
        self
    }
    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
    /// Hosts that ran `stage`, in order of first start.
    fn hosts_of(&self, stage: &str) -> Vec<String> {
        let mut seen = Vec::new();
        for line in self.log() {
            let mut it = line.split(' ');
            if it.next() == Some(stage) {
                let h = it.next().unwrap().to_string();
                if !seen.contains(&h) {
                    seen.push(h);
                }
            }
        }
        seen
    }
    async fn attempt(
        &self,
        host: &str,
        stage: &StageSpec,
        attempt: u32,
    ) -> Result<StageOutcome, StageFailure> {
        self.log
            .lock()
            .unwrap()
            .push(format!("{} {host} {attempt}", stage.name));
        tokio::time::sleep(self.delay).await;
        let planned = self
            .outcomes
            .get(&(host.to_string(), stage.name.clone()))
            .map(|v| v[(attempt as usize - 1).min(v.len() - 1)])
            .unwrap_or(Ok(()));
        match planned {
            Ok(()) => Ok(StageOutcome::default()),
            Err(reason) => Err(StageFailure {
                exit_code: (reason == FailureReason::NonZeroExit).then_some(1),
                ..StageFailure::new(reason, "scripted failure")
            }),
        }
    }
}

impl StageRunner for Fake {
    type Host = String;
    async fn open(&self, host: &Endpoint) -> Result<String, StageFailure> {
        self.opens.lock().unwrap().push(host.name.clone());
        if self.unreachable.contains(&host.name) {
            return Err(StageFailure::new(
                FailureReason::Unreachable,
                "connection refused",
            ));
        }
        Ok(host.name.clone())
    }
    fn accepted_host_key(&self, host: &String) -> Option<(String, String)> {
        self.tofu
            .then(|| (format!("SHA256:{host}"), format!("{host} ssh-ed25519 AAAA")))
    }
    async fn run(
        &self,
        host: &String,
        stage: &StageSpec,
        attempt: u32,
    ) -> Result<StageOutcome, StageFailure> {
        self.attempt(host, stage, attempt).await
    }
}

fn stage(name: &str) -> StageSpec {
    StageSpec {
        name: name.into(),
        action: StageAction::Script("true".into()),
        env: Default::default(),
        secret_env: Vec::new(),
        timeout: Duration::from_secs(5),
        retries: 0,
        run_once: false,
    }
}

fn hosts(n: usize) -> Vec<Endpoint> {
    (0..n)
        .map(|i| Endpoint::new(format!("h{i}"), "127.0.0.1", 22))
        .collect()
}

fn plan(
    stages: &[&str],
    rollback: &[&str],
    batch: Amount,
    parallel: usize,
    budget: Amount,
) -> PlanSpec {
    PlanSpec {
        rollback: rollback.iter().map(|s| stage(s)).collect(),
        batch_size: batch,
        max_parallel: parallel,
        max_unavailable: budget,
        backoff: Backoff::new(Duration::from_millis(1), Duration::from_millis(4)).exact(),
        ..PlanSpec::new(stages.iter().map(|s| stage(s)).collect())
    }
}

/// Runs to the end with `Control::Run`; returns the outcome and every event.
async fn run(
    spec: &PlanSpec,
    n: usize,
    fake: &Fake,
    resume: ResumeState,
) -> (PlanOutcome, Vec<PlanEvent>) {
    let (_tx, rx) = watch::channel(Control::Run);
    let (etx, mut erx) = mpsc::channel(100_000);
    let collect = async {
        let mut events = Vec::new();
        while let Some(e) = erx.recv().await {
            if let PlanEvent::Checkpoint { ack } = &e {
                ack.done();
            }
            events.push(e);
        }
        events
    };
    tokio::join!(run_plan(spec, hosts(n), fake, resume, rx, etx), collect)
}

fn names(v: &[usize]) -> Vec<String> {
    v.iter().map(|i| format!("h{i}")).collect()
}

#[tokio::test(start_paused = true)]
async fn every_host_runs_every_stage_batch_by_batch() {
    let fake = Fake::default();
    let spec = plan(
        &["check", "deploy"],
        &[],
        Amount::Percent(25),
        2,
        Amount::Count(0),
    );
    let (out, events) = run(&spec, 10, &fake, ResumeState::default()).await;
    assert_eq!(out.phase, Phase::Succeeded);
    assert_eq!(out.batches, 4); // 25% of 10 rounds up to 3: 3+3+3+1
    let batches: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            PlanEvent::BatchStarted { hosts, .. } => Some(hosts.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(batches, vec![0..3, 3..6, 6..9, 9..10]);
    assert_eq!(fake.hosts_of("deploy").len(), 10);
    assert_eq!(
        out.stages[1],
        StageCount {
            name: "deploy".into(),
            succeeded: 10,
            failed: 0
        }
    );
    assert!(
        out.hosts
            .iter()
            .all(|h| h.state == HostState::Succeeded && h.stages_done == 2)
    );
    // one open per host for all its stages
    assert_eq!(fake.opens.lock().unwrap().len(), 10);
    // a host's stages run in order and no host of a batch starts before the previous batch ended
    let log = fake.log();
    let first_of_batch2 = log.iter().position(|l| l.contains(" h3 ")).unwrap();
    for h in ["h0", "h1", "h2"] {
        let last = log
            .iter()
            .rposition(|l| l.contains(&format!(" {h} ")))
            .unwrap();
        assert!(last < first_of_batch2, "{log:?}");
    }
    // events fold into a state that says everything is done
    let mut state = ResumeState::default();
    events.iter().for_each(|e| state.record(e));
    assert_eq!(state.done.to_string(), "0-9");
    assert!(state.partial.is_empty());
}

#[tokio::test(start_paused = true)]
async fn budget_exceeded_rolls_back_exactly_the_started_hosts_last_batch_first() {
    let fake = Fake::default()
        .fail("h2", "deploy", vec![Err(FailureReason::NonZeroExit)])
        .fail("h5", "deploy", vec![Err(FailureReason::NonZeroExit)]);
    let spec = plan(
        &["check", "deploy"],
        &["undo"],
        Amount::Count(2),
        2,
        Amount::Count(1),
    );
    let (out, events) = run(&spec, 10, &fake, ResumeState::default()).await;
    assert_eq!(out.phase, Phase::RolledBack);
    assert_eq!(out.failed, 2);
    assert_eq!(out.allowed_failures, 1);
    let failed: Vec<_> = out
        .failures
        .iter()
        .map(|f| (f.host.as_str(), f.stage.as_str(), f.failure.exit_code))
        .collect();
    assert_eq!(
        failed,
        vec![("h2", "deploy", Some(1)), ("h5", "deploy", Some(1))]
    );
    assert!(events.contains(&PlanEvent::BudgetExceeded {
        failed: 2,
        allowed: 1
    }));
    // batches 0..=2 started; nothing after the batch where the budget ran out
    let started = fake.hosts_of("check");
    let mut sorted = started.clone();
    sorted.sort();
    assert_eq!(sorted, names(&[0, 1, 2, 3, 4, 5]));
    // rollback: exactly the started hosts (failed ones included), last batch first
    let undone = fake.hosts_of("undo");
    let batch_of = |h: &String| h[1..].parse::<usize>().unwrap() / 2;
    let mut undone_sorted = undone.clone();
    undone_sorted.sort();
    assert_eq!(undone_sorted, sorted);
    let order: Vec<usize> = undone.iter().map(batch_of).collect();
    assert!(
        order.windows(2).all(|w| w[0] >= w[1]),
        "reverse batch order: {undone:?}"
    );
    assert_eq!(order.first(), Some(&2));
    assert!(
        out.hosts[6..]
            .iter()
            .all(|h| h.state == HostState::Pending && h.rollback == RollbackState::NotRun)
    );
    assert!(
        out.hosts[..6]
            .iter()
            .all(|h| h.rollback == RollbackState::Succeeded)
    );
    assert_eq!(out.rollback_stages[0].succeeded, 6);
    // rollback reuses each host's handle
    assert_eq!(fake.opens.lock().unwrap().len(), 6);
}

#[tokio::test(start_paused = true)]
async fn budget_exceeded_without_rollback_stages_fails() {
    let fake = Fake::default().fail("h0", "deploy", vec![Err(FailureReason::TimedOut)]);
    let spec = plan(&["deploy"], &[], Amount::Count(1), 1, Amount::Count(0));
    let (out, events) = run(&spec, 3, &fake, ResumeState::default()).await;
    assert_eq!(out.phase, Phase::Failed);
    assert_eq!(fake.hosts_of("deploy"), names(&[0]));
    assert_eq!(out.failures[0].failure.reason, FailureReason::TimedOut);
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, PlanEvent::RollbackStarted { .. }))
    );
}

#[tokio::test(start_paused = true)]
async fn failures_within_the_budget_still_succeed_and_a_failed_rollback_fails() {
    let fake = Fake::default().fail("h1", "deploy", vec![Err(FailureReason::NonZeroExit)]);
    let spec = plan(
        &["deploy"],
        &["undo"],
        Amount::Percent(100),
        4,
        Amount::Percent(25),
    );
    let (out, _) = run(&spec, 4, &fake, ResumeState::default()).await;
    assert_eq!(out.phase, Phase::Succeeded); // 25% of 4 = 1 failure allowed
    assert_eq!(out.hosts[1].state, HostState::Failed);
    assert!(fake.hosts_of("undo").is_empty());

    let fake = Fake::default()
        .fail("h1", "deploy", vec![Err(FailureReason::NonZeroExit)])
        .fail("h0", "undo", vec![Err(FailureReason::NonZeroExit)]);
    let spec = plan(
        &["deploy"],
        &["undo", "undo2"],
        Amount::Percent(100),
        4,
        Amount::Count(0),
    );
    let (out, _) = run(&spec, 4, &fake, ResumeState::default()).await;
    assert_eq!(out.phase, Phase::Failed);
    assert_eq!(out.hosts[0].rollback, RollbackState::Failed);
    // h0's rollback stopped at its failed stage; every other host that started rolled back
    // fully (which hosts started before the budget ran out depends on scheduling)
    let mut undo2 = fake.hosts_of("undo2");
    undo2.sort();
    let mut started: Vec<String> = fake
        .hosts_of("deploy")
        .into_iter()
        .filter(|h| h != "h0")
        .collect();
    started.sort();
    assert!(started.contains(&"h1".to_string()), "{started:?}");
    assert_eq!(undo2, started);
}

#[tokio::test(start_paused = true)]
async fn unreachable_hosts_count_against_the_budget_and_are_not_rolled_back() {
    let mut fake = Fake::default();
    fake.unreachable.insert("h1".into());
    let spec = plan(
        &["deploy"],
        &["undo"],
        Amount::Count(4),
        4,
        Amount::Count(0),
    );
    let (out, events) = run(&spec, 4, &fake, ResumeState::default()).await;
    assert_eq!(out.phase, Phase::RolledBack);
    assert_eq!(out.failures[0].failure.reason, FailureReason::Unreachable);
    assert_eq!(out.failures[0].stage, "deploy");
    assert!(!out.hosts[1].started);
    let mut undone = fake.hosts_of("undo");
    undone.sort();
    assert!(!undone.contains(&"h1".to_string()), "{undone:?}");
    let mut state = ResumeState::default();
    events.iter().for_each(|e| state.record(e));
    assert!(state.failed_unstarted.contains(1) && state.budget_exceeded);
}

#[tokio::test(start_paused = true)]
async fn retries_back_off_and_succeed_on_a_later_attempt_but_not_for_auth_errors() {
    let fake = Fake::default()
        .fail(
            "h0",
            "deploy",
            vec![Err(FailureReason::NonZeroExit), Ok(())],
        )
        .fail("h1", "deploy", vec![Err(FailureReason::AuthFailed), Ok(())])
        .fail("h2", "deploy", vec![Err(FailureReason::Unreachable)]);
    let mut spec = plan(&["deploy"], &[], Amount::Percent(100), 3, Amount::Count(3));
    spec.stages[0].retries = 2;
    let (out, events) = run(&spec, 3, &fake, ResumeState::default()).await;
    assert_eq!(out.hosts[0].state, HostState::Succeeded);
    let finished = |host: &str| {
        events.iter().find_map(|e| match e {
            PlanEvent::HostStageFinished {
                host: h, attempts, ..
            } if h.name == host => Some(*attempts),
            _ => None,
        })
    };
    assert_eq!(finished("h0"), Some(2));
    assert_eq!(out.hosts[1].failure.as_ref().map(|f| f.attempts), Some(1)); // not retried
    assert_eq!(out.hosts[2].failure.as_ref().map(|f| f.attempts), Some(3)); // 1 + 2 retries
    let delays: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            PlanEvent::HostStageRetrying { host, retry_in, .. } if host.name == "h2" => {
                Some(*retry_in)
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        delays,
        vec![Duration::from_millis(1), Duration::from_millis(2)]
    );
    let stage = crate::engine::plan::STAGE_BACKOFF;
    assert!(
        stage.jitter,
        "stage retries of many hosts must not run in lock step"
    );
    assert_eq!(stage.cap(0), Duration::from_secs(1));
    assert_eq!(stage.cap(2), Duration::from_secs(4));
    assert_eq!(stage.cap(9), Duration::from_secs(30));
}

#[tokio::test(start_paused = true)]
async fn run_once_stage_runs_once_before_any_host_passes_it() {
    let fake = Fake {
        delay: Duration::from_millis(5),
        ..Default::default()
    };
    let mut spec = plan(
        &["pre", "migrate", "post"],
        &[],
        Amount::Count(3),
        3,
        Amount::Count(0),
    );
    spec.stages[1].run_once = true;
    let (out, events) = run(&spec, 9, &fake, ResumeState::default()).await;
    assert_eq!(out.phase, Phase::Succeeded);
    assert_eq!(fake.hosts_of("migrate").len(), 1);
    assert_eq!(fake.hosts_of("post").len(), 9);
    let log = fake.log();
    let migrate = log.iter().position(|l| l.starts_with("migrate ")).unwrap();
    let first_post = log.iter().position(|l| l.starts_with("post ")).unwrap();
    assert!(migrate < first_post, "{log:?}");
    assert_eq!(out.stages[1].succeeded, 1);
    let mut state = ResumeState::default();
    events.iter().for_each(|e| state.record(e));
    assert_eq!(state.run_once_done, vec![1]);
}

#[tokio::test(start_paused = true)]
async fn no_host_passes_a_run_once_stage_until_its_success_is_acknowledged_durable() {
    let fake = Fake {
        delay: Duration::from_millis(5),
        ..Default::default()
    };
    let mut spec = plan(
        &["pre", "migrate", "post"],
        &[],
        Amount::Count(3),
        3,
        Amount::Count(0),
    );
    spec.stages[1].run_once = true;
    let (_ctl, rx) = watch::channel(Control::Run);
    let (etx, mut erx) = mpsc::channel(1000);
    let consumer = async {
        let mut seen = Vec::new();
        while let Some(e) = erx.recv().await {
            if let PlanEvent::Checkpoint { ack } = &e {
                // a slow status write: no host may pass the stage meanwhile
                let passed = || fake.log().iter().any(|l| l.starts_with("post "));
                assert!(!passed(), "{:?}", fake.log());
                tokio::time::sleep(Duration::from_secs(30)).await;
                assert!(!passed(), "{:?}", fake.log());
                ack.done();
            }
            seen.push(e);
        }
        seen
    };
    let (out, events) = tokio::join!(
        run_plan(&spec, hosts(3), &fake, ResumeState::default(), rx, etx),
        consumer
    );
    assert_eq!(out.phase, Phase::Succeeded);
    assert_eq!(fake.hosts_of("post").len(), 3);
    // the checkpoint follows the runOnce success and precedes every later stage start
    let at = |f: &dyn Fn(&PlanEvent) -> bool| events.iter().position(f).unwrap();
    let migrated = at(&|e| {
        matches!(
            e,
            PlanEvent::HostStageFinished {
                stage_index: 1,
                run_once: true,
                result: Ok(_),
                ..
            }
        )
    });
    let checkpoint = at(&|e| matches!(e, PlanEvent::Checkpoint { .. }));
    let first_post = at(&|e| matches!(e, PlanEvent::HostStageStarted { stage_index: 2, .. }));
    assert!(
        migrated < checkpoint && checkpoint < first_post,
        "{events:?}"
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, PlanEvent::Checkpoint { .. }))
            .count(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_consumer_that_drops_the_checkpoint_does_not_stall_the_run() {
    let fake = Fake::default();
    let mut spec = plan(
        &["migrate", "post"],
        &[],
        Amount::Count(2),
        2,
        Amount::Count(0),
    );
    spec.stages[0].run_once = true;
    let (_ctl, rx) = watch::channel(Control::Run);
    let (etx, mut erx) = mpsc::channel(1000);
    let drain = async { while erx.recv().await.is_some() {} };
    let (out, ()) = tokio::join!(
        run_plan(&spec, hosts(2), &fake, ResumeState::default(), rx, etx),
        drain
    );
    assert_eq!(out.phase, Phase::Succeeded);
    assert_eq!(fake.hosts_of("post").len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_failed_run_once_stage_aborts_the_run_whatever_the_budget() {
    let fake = Fake::default().fail("h0", "migrate", vec![Err(FailureReason::NonZeroExit)]);
    let mut spec = plan(
        &["pre", "migrate", "post"],
        &["undo"],
        Amount::Count(2),
        2,
        Amount::Count(5),
    );
    spec.stages[1].run_once = true;
    let (out, events) = run(&spec, 6, &fake, ResumeState::default()).await;
    assert!(events.contains(&PlanEvent::RunOnceFailed {
        stage: "migrate".into()
    }));
    assert_eq!(out.phase, Phase::RolledBack);
    assert!(fake.hosts_of("post").is_empty());
    // only the first batch (h0, h1) ever started; h0 ran the runOnce stage after its `pre`
    let pre = fake.hosts_of("pre");
    assert!(pre.contains(&"h0".to_string()), "{pre:?}");
    assert!(pre.iter().all(|h| h == "h0" || h == "h1"), "{pre:?}");
}

#[tokio::test(start_paused = true)]
async fn resume_skips_done_hosts_and_stages() {
    let fake = Fake::default();
    let spec = plan(&["a", "b"], &[], Amount::Count(2), 2, Amount::Count(0));
    let resume = ResumeState {
        done: [0, 1].into_iter().collect(),
        partial: [(2, 1)].into_iter().collect(),
        ..Default::default()
    };
    let json = serde_json::to_string(&resume).unwrap();
    let resume: ResumeState = serde_json::from_str(&json).unwrap();
    let (out, _) = run(&spec, 4, &fake, resume).await;
    assert_eq!(out.phase, Phase::Succeeded);
    assert_eq!(fake.hosts_of("a"), names(&[3]));
    let mut b = fake.hosts_of("b");
    b.sort();
    assert_eq!(b, names(&[2, 3]));
    assert!(out.hosts.iter().all(|h| h.state == HostState::Succeeded));

    // resuming a run whose budget was spent goes straight to the rollback of started hosts
    let fake = Fake::default();
    let spec = plan(&["a"], &["undo"], Amount::Count(2), 2, Amount::Count(0));
    let resume = ResumeState {
        done: [0].into_iter().collect(),
        failed: [1].into_iter().collect(),
        budget_exceeded: true,
        ..Default::default()
    };
    let (out, _) = run(&spec, 4, &fake, resume).await;
    assert_eq!(out.phase, Phase::RolledBack);
    assert!(fake.hosts_of("a").is_empty());
    let mut undone = fake.hosts_of("undo");
    undone.sort();
    assert_eq!(undone, names(&[0, 1]));
}

#[tokio::test(start_paused = true)]
async fn on_interrupt_fail_counts_hosts_left_mid_way_as_failed() {
    let fake = Fake::default();
    let mut spec = plan(
        &["a", "b"],
        &["undo"],
        Amount::Count(2),
        2,
        Amount::Count(0),
    );
    spec.on_interrupt = OnInterrupt::Fail;
    let resume = ResumeState {
        done: [0].into_iter().collect(),
        partial: [(1, 1)].into_iter().collect(),
        ..Default::default()
    };
    let (out, events) = run(&spec, 4, &fake, resume).await;
    assert_eq!(out.failures[0].failure.reason, FailureReason::Interrupted);
    assert_eq!(out.failures[0].stage, "b");
    assert!(events.contains(&PlanEvent::BudgetExceeded {
        failed: 1,
        allowed: 0
    }));
    assert_eq!(out.phase, Phase::RolledBack);
    assert!(fake.hosts_of("a").is_empty() && fake.hosts_of("b").is_empty());
    let mut undone = fake.hosts_of("undo");
    undone.sort();
    assert_eq!(undone, names(&[0, 1]));
}

#[tokio::test(start_paused = true)]
async fn pause_stops_at_host_boundaries_and_resume_continues() {
    let fake = Fake {
        delay: Duration::from_millis(100),
        ..Default::default()
    };
    let spec = plan(&["a", "b"], &[], Amount::Count(4), 2, Amount::Count(0));
    let (ctl, rx) = watch::channel(Control::Run);
    let (etx, mut erx) = mpsc::channel(1000);
    let driver = async {
        let mut seen = Vec::new();
        // pause as soon as the first host starts: the two in flight finish, no third starts
        while let Some(e) = erx.recv().await {
            let first = matches!(e, PlanEvent::HostStageStarted { .. });
            seen.push(e);
            if first {
                ctl.send(Control::Pause).unwrap();
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        let during_pause = fake.hosts_of("a");
        ctl.send(Control::Run).unwrap();
        while let Some(e) = erx.recv().await {
            seen.push(e);
        }
        (during_pause, seen)
    };
    let (out, (during_pause, seen)) = tokio::join!(
        async { run_plan(&spec, hosts(6), &fake, ResumeState::default(), rx, etx).await },
        driver
    );
    assert_eq!(during_pause.len(), 2, "{during_pause:?}");
    assert_eq!(fake.hosts_of("b").len(), 6);
    assert_eq!(out.phase, Phase::Succeeded);
    assert!(seen.contains(&PlanEvent::Paused) && seen.contains(&PlanEvent::Resumed));
}

#[tokio::test(start_paused = true)]
async fn stop_ends_the_run_after_in_flight_stages() {
    let fake = Fake {
        delay: Duration::from_millis(100),
        ..Default::default()
    };
    let spec = plan(
        &["a", "b", "c"],
        &["undo"],
        Amount::Count(2),
        2,
        Amount::Count(0),
    );
    let (ctl, rx) = watch::channel(Control::Run);
    let (etx, mut erx) = mpsc::channel(1000);
    let driver = async {
        while let Some(e) = erx.recv().await {
            if matches!(e, PlanEvent::HostStageStarted { .. }) {
                ctl.send(Control::Stop).unwrap();
                break;
            }
        }
        while erx.recv().await.is_some() {}
    };
    let (out, ()) = tokio::join!(
        async { run_plan(&spec, hosts(6), &fake, ResumeState::default(), rx, etx).await },
        driver
    );
    assert_eq!(out.phase, Phase::Stopped);
    assert!(fake.hosts_of("b").is_empty(), "{:?}", fake.log());
    assert!(fake.hosts_of("undo").is_empty());
    assert!(out.hosts[2..].iter().all(|h| h.state == HostState::Pending));
    assert_eq!(out.hosts[0].state, HostState::Aborted);
}

/// The controller spawns runs on a multi-threaded runtime: the run future must be `Send`,
/// for the fake and for the SSH runner alike (checked at compile time).
#[test]
fn run_futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let spec = PlanSpec::new(vec![stage("a")]);
    let (_tx, rx) = watch::channel(Control::Run);
    let (etx, _erx) = mpsc::channel(1);
    let fake = Fake::default();
    let f = run_plan(&spec, hosts(1), &fake, ResumeState::default(), rx, etx);
    assert_send(&f);
}

#[allow(dead_code)]
fn ssh_run_is_send<'a>(
    spec: &'a PlanSpec,
    runner: &'a SshRunner,
    control: watch::Receiver<Control>,
    events: mpsc::Sender<PlanEvent>,
) -> impl std::future::Future<Output = PlanOutcome> + Send + 'a {
    run_plan(
        spec,
        Vec::new(),
        runner,
        ResumeState::default(),
        control,
        events,
    )
}

#[tokio::test(start_paused = true)]
async fn host_keys_trusted_on_first_use_are_reported_once_per_host() {
    let fake = Fake {
        tofu: true,
        ..Default::default()
    };
    let spec = plan(&["a", "b"], &[], Amount::Count(2), 2, Amount::Count(0));
    let (_, events) = run(&spec, 3, &fake, ResumeState::default()).await;
    let mut accepted: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            PlanEvent::HostKeyAccepted {
                host, fingerprint, ..
            } => Some(format!("{} {fingerprint}", host.name)),
            _ => None,
        })
        .collect();
    accepted.sort();
    assert_eq!(accepted, ["h0 SHA256:h0", "h1 SHA256:h1", "h2 SHA256:h2"]);
}
