//! Running a staged plan over a fleet: batches, bounded parallelism, per-stage timeouts and
//! retries, run-once stages, a failure budget and a rollback. Plain values in, events and an
//! outcome out, so the controller (which persists [`ResumeState`] in status and runs Jobs),
//! `outrider plan run` and the tests drive one scheduler. No `kube` or API types here: the
//! conversion from a `DeploymentPlan` lives in `crate::targets`.

pub mod batches;
pub mod resume;
pub mod run;
pub mod ssh_runner;
pub mod supervise;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use crate::ssh::Endpoint;

pub use resume::{HostSet, ResumeState};
pub use run::run_plan;
pub use ssh_runner::SshRunner;

/// A number of hosts, absolute or relative to the targets of the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Amount {
    Count(u32),
    Percent(u32),
}

/// What a stage does.
#[derive(Clone, Debug, PartialEq)]
pub enum StageAction {
    /// Fed to `sh -s` on stdin.
    Script(String),
    /// An argv, run without a shell.
    Command(Vec<String>),
    /// An in-cluster Job; opaque here (the pod template), run by the controller's runner.
    Job(serde_json::Value),
}

/// One stage of a plan or of its rollback.
#[derive(Clone, Debug, PartialEq)]
pub struct StageSpec {
    pub name: String,
    pub action: StageAction,
    pub env: BTreeMap<String, String>,
    /// Variables whose values come from Secrets (resolved by the controller before a run).
    pub secret_env: Vec<SecretEnv>,
    /// Limit of one attempt.
    pub timeout: Duration,
    /// Extra attempts after a failed one.
    pub retries: u32,
    /// Once for the whole run instead of on every host.
    pub run_once: bool,
}

/// An environment variable taken from a Secret key. Its value is never printed (`Debug`
/// shows `<redacted>`): plans are logged and compared, values must not be.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretEnv {
    pub name: String,
    pub secret: String,
    pub key: String,
    /// Filled in by whoever can read Secrets (wiped when dropped); a stage whose value is
    /// missing fails.
    pub value: Option<zeroize::Zeroizing<String>>,
}

impl std::fmt::Debug for SecretEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretEnv")
            .field("name", &self.name)
            .field("secret", &self.secret)
            .field("key", &self.key)
            .field("value", &self.value.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

pub use crate::backoff::Backoff;

/// Stage retries wait 1 s, 2 s, 4 s… up to 30 s, jittered so failing hosts spread out.
pub const STAGE_BACKOFF: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));

/// Everything the scheduler needs to know about a plan.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanSpec {
    pub stages: Vec<StageSpec>,
    pub rollback: Vec<StageSpec>,
    pub batch_size: Amount,
    pub max_parallel: usize,
    pub max_unavailable: Amount,
    pub pause_between_batches: Duration,
    pub backoff: Backoff,
    /// Host handles (SSH connections) kept open after a host's stages so a rollback reuses
    /// them; past this many, handles are dropped and a rollback reconnects. Bounds the file
    /// descriptors and memory a very large run holds.
    pub retain_handles: usize,
    /// What a resumed run does with hosts that were mid-run when it was interrupted.
    pub on_interrupt: OnInterrupt,
}

/// Handling of hosts a resumed run finds started but not finished.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnInterrupt {
    /// Run the interrupted stage again (stages should be idempotent).
    #[default]
    Rerun,
    /// Count the host as failed ([`FailureReason::Interrupted`]).
    Fail,
}

impl PlanSpec {
    /// A plan with the API's defaults for everything but the stages.
    pub fn new(stages: Vec<StageSpec>) -> Self {
        Self {
            stages,
            rollback: Vec::new(),
            batch_size: Amount::Percent(25),
            max_parallel: 10,
            max_unavailable: Amount::Count(0),
            pause_between_batches: Duration::ZERO,
            backoff: STAGE_BACKOFF,
            retain_handles: 1000,
            on_interrupt: OnInterrupt::Rerun,
        }
    }
}

/// Why a stage failed on a host. Status keeps these apart: an unreachable host is a failure
/// the user must see, not a silent skip.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FailureReason {
    /// The host could not be reached, or the connection was lost.
    Unreachable,
    /// The attempt ran past the stage timeout and was killed.
    TimedOut,
    /// The program exited non-zero or was killed by a signal.
    NonZeroExit,
    /// The host is not in known_hosts (and the policy is Strict).
    HostKeyUnknown,
    /// The host presented a different (or revoked) key than known_hosts pins.
    HostKeyMismatch,
    AuthFailed,
    /// `sudo -n` refused.
    BecomeFailed,
    /// The host was mid-run when the controller stopped, and `onInterrupt: Fail` asks to
    /// count that as a failure rather than run the stage again.
    Interrupted,
    /// The stage could not be run at all (e.g. a Job stage without a cluster).
    Other,
}

impl FailureReason {
    /// CamelCase name for status, Events and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Unreachable => "Unreachable",
            FailureReason::TimedOut => "TimedOut",
            FailureReason::NonZeroExit => "NonZeroExit",
            FailureReason::HostKeyUnknown => "HostKeyUnknown",
            FailureReason::HostKeyMismatch => "HostKeyMismatch",
            FailureReason::AuthFailed => "AuthFailed",
            FailureReason::BecomeFailed => "BecomeFailed",
            FailureReason::Interrupted => "Interrupted",
            FailureReason::Other => "Other",
        }
    }

    /// Whether another attempt can help: not for key, auth or configuration problems.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            FailureReason::Unreachable | FailureReason::TimedOut | FailureReason::NonZeroExit
        )
    }
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Most characters of output a failure carries (status must stay small).
pub const OUTPUT_TAIL_MAX: usize = 2048;

/// One failed attempt of a stage.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct StageFailure {
    pub reason: FailureReason,
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    /// Human-readable cause; never contains key material.
    pub message: String,
    /// Last output of the attempt, at most [`OUTPUT_TAIL_MAX`] characters.
    pub output_tail: String,
}

impl StageFailure {
    pub fn new(reason: FailureReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            exit_code: None,
            signal: None,
            message: message.into(),
            output_tail: String::new(),
        }
    }
}

/// A successful attempt.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StageOutcome {
    pub duration: Duration,
    /// Last output, at most [`OUTPUT_TAIL_MAX`] characters (for logs, not status).
    pub output_tail: String,
}

/// Executes stages. The SSH implementation is [`SshRunner`]; the controller adds Jobs; the
/// tests fake it. The scheduler never runs two stages of one host at once.
pub trait StageRunner: Send + Sync {
    /// Whatever a host needs for the run: for SSH, ONE connection reused for every stage of
    /// that host, rollback included. Dropping it closes it.
    type Host: Send + Sync;

    /// Connects to a host before its first stage.
    fn open(
        &self,
        host: &Endpoint,
    ) -> impl Future<Output = Result<Self::Host, StageFailure>> + Send;

    /// One attempt (1-based) of a per-host stage.
    fn run(
        &self,
        host: &Self::Host,
        stage: &StageSpec,
        attempt: u32,
    ) -> impl Future<Output = Result<StageOutcome, StageFailure>> + Send;

    /// Under trust-on-first-use: `(fingerprint, known_hosts line)` of a host key accepted
    /// when `host` was opened, so the driver can record it.
    fn accepted_host_key(&self, _host: &Self::Host) -> Option<(String, String)> {
        None
    }

    /// One attempt of a `runOnce` stage, on behalf of the whole run. `host` is the host that
    /// reached the stage first (an SSH runner runs it there; a Job runner ignores it).
    fn run_once(
        &self,
        host: &Self::Host,
        stage: &StageSpec,
        attempt: u32,
    ) -> impl Future<Output = Result<StageOutcome, StageFailure>> + Send {
        self.run(host, stage, attempt)
    }
}

/// What the driver of a run asks of it, through a `watch` channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Control {
    #[default]
    Run,
    /// Start no new host (hosts in flight finish all their stages). A rollback, once
    /// started, is not held: it is what makes the fleet safe again.
    Pause,
    /// End the run: start no new host or stage; in-flight stages finish. Used when the spec
    /// changes or the plan is deleted. Dropping the sender means the same.
    Stop,
}

/// A host in events and results: its index in the run's host list, and its name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostRef {
    pub index: usize,
    pub name: String,
}

/// Progress, in the order it happens. The controller turns these into status, Events and
/// metrics; [`ResumeState::record`] folds them into what a restarted controller needs.
#[derive(Clone, Debug, PartialEq)]
pub enum PlanEvent {
    RunStarted {
        hosts: usize,
        batches: usize,
        allowed_failures: usize,
    },
    /// `index` is 0-based; `hosts` are the indices of the batch's hosts.
    BatchStarted {
        index: usize,
        total: usize,
        hosts: std::ops::Range<usize>,
    },
    HostStageStarted {
        host: HostRef,
        stage: String,
        stage_index: usize,
        attempt: u32,
        rollback: bool,
    },
    /// A host key unknown to known_hosts was trusted on first use (`AcceptNew`).
    HostKeyAccepted {
        host: HostRef,
        fingerprint: String,
        known_hosts_line: String,
    },
    /// An attempt failed and the stage will be tried again after `retry_in`.
    HostStageRetrying {
        host: HostRef,
        stage: String,
        attempt: u32,
        failure: StageFailure,
        retry_in: Duration,
    },
    HostStageFinished {
        host: HostRef,
        stage: String,
        stage_index: usize,
        /// Attempts made.
        attempts: u32,
        result: Result<StageOutcome, StageFailure>,
        rollback: bool,
        run_once: bool,
    },
    /// A host is done with the run's stages. `started`: it ran at least one stage (it will
    /// be rolled back if the run rolls back). `failure` names the stage that failed.
    HostFinished {
        host: HostRef,
        result: HostState,
        started: bool,
        failure: Option<HostFailure>,
    },
    BudgetExceeded {
        failed: usize,
        allowed: usize,
    },
    /// A `runOnce` stage failed: the run cannot continue whatever the budget says.
    RunOnceFailed {
        stage: String,
    },
    RollbackStarted {
        hosts: usize,
    },
    RollbackHostFinished {
        host: HostRef,
        ok: bool,
        failure: Option<HostFailure>,
    },
    /// A `runOnce` stage succeeded. Nothing goes past it (no host starts its next stage)
    /// until the consumer has made the events so far durable and called [`Ack::done`], so a
    /// restarted controller never runs it twice. Dropping the event lets the run go on.
    Checkpoint {
        ack: Ack,
    },
    Paused,
    Resumed,
    Stopping,
    Finished {
        phase: Phase,
    },
}

/// The signal a [`PlanEvent::Checkpoint`] carries back to the run. Clones share it; it
/// fires once, on [`Ack::done`] or when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct Ack(std::sync::Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>>);

impl Ack {
    /// The ack to send and the receiver the run waits on.
    pub fn new() -> (Self, tokio::sync::oneshot::Receiver<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (
            Self(std::sync::Arc::new(std::sync::Mutex::new(Some(tx)))),
            rx,
        )
    }

    /// What the run waited for is durable: let it go on.
    pub fn done(&self) {
        let sender = match self.0.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(tx) = sender {
            let _ = tx.send(());
        }
    }
}

/// Two acks are equal when they are clones of one signal.
impl PartialEq for Ack {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Where one host ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostState {
    /// Not started (later batch, or the run stopped first).
    Pending,
    Succeeded,
    Failed,
    /// Stopped between stages because the run was aborted or stopped.
    Aborted,
}

/// Where one host's rollback ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RollbackState {
    NotRun,
    Succeeded,
    Failed,
}

/// Why one host failed (a stage after its retries, or the rollback).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFailure {
    pub host: String,
    pub stage: String,
    pub attempts: u32,
    pub failure: StageFailure,
}

/// The end of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Every host ran every stage, or failures stayed within the budget.
    Succeeded,
    /// The budget was exceeded and there is no rollback, or a rollback stage failed.
    Failed,
    /// The budget was exceeded and every rollback succeeded.
    RolledBack,
    /// [`Control::Stop`]: ended early on request.
    Stopped,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
            Phase::RolledBack => "RolledBack",
            Phase::Stopped => "Stopped",
        }
    }
}

/// One host in the outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostReport {
    pub name: String,
    pub state: HostState,
    /// Ran at least one stage in this run (or before a resume).
    pub started: bool,
    /// Stages completed (a resumed host includes the ones completed before).
    pub stages_done: usize,
    pub failure: Option<HostFailure>,
    pub rollback: RollbackState,
    pub rollback_failure: Option<HostFailure>,
}

/// Successes and failures of one stage.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StageCount {
    pub name: String,
    pub succeeded: usize,
    pub failed: usize,
}

/// What a run did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanOutcome {
    pub phase: Phase,
    /// In host order.
    pub hosts: Vec<HostReport>,
    pub stages: Vec<StageCount>,
    pub rollback_stages: Vec<StageCount>,
    /// Failed hosts in the order they failed (stages, then rollback). The controller caps it.
    pub failures: Vec<HostFailure>,
    /// Failed hosts, and how many the budget allowed.
    pub failed: usize,
    pub allowed_failures: usize,
    pub batches: usize,
}

#[cfg(test)]
mod tests;
