//! Stages over SSH: one connection per host, opened before its first stage and reused for
//! every later stage and for its rollback (a fleet of N hosts costs N handshakes per run).
//! A connection lost mid-run is re-opened on the next attempt.

use std::sync::Arc;

use tokio::sync::Mutex;

use super::supervise::{self, LOCK_BUSY_EXIT, TIMED_OUT_EXIT, TIMED_OUT_MARK};
use super::{
    FailureReason, OUTPUT_TAIL_MAX, StageAction, StageFailure, StageOutcome, StageRunner, StageSpec,
};
use crate::ssh::{self, Command, Endpoint, ExecOutput, Fleet, Session};

/// Runs script and command stages over SSH, each under the host-side supervisor of
/// [`supervise`]; Job stages need the controller's runner. Handshakes are bounded by the
/// [`Fleet`] (they cost the servers far more than commands, and a stock sshd drops
/// handshakes past `MaxStartups`).
pub struct SshRunner {
    fleet: Fleet,
    /// What names this run in the host-side stage locks: the same for every attempt of the
    /// run, whichever controller makes it.
    lock_scope: String,
}

impl SshRunner {
    /// A runner whose stage locks are its own (a local `plan run`).
    pub fn new(fleet: Fleet) -> Self {
        Self {
            fleet,
            lock_scope: format!("local/{:016x}", rand::random::<u64>()),
        }
    }

    /// Names the run in the host-side locks (the controller: the plan and its run id), so
    /// a resumed or taken-over run waits for its own attempts still running on a host.
    pub fn with_lock_scope(mut self, scope: impl Into<String>) -> Self {
        self.lock_scope = scope.into();
        self
    }

    async fn connect(&self, endpoint: &Endpoint) -> Result<Session, StageFailure> {
        self.fleet.connect(endpoint).await.map_err(failure)
    }

    /// The host's session, re-opened if an earlier attempt lost it.
    async fn session(&self, host: &SshHost) -> Result<Arc<Session>, StageFailure> {
        let mut slot = host.session.lock().await;
        if let Some(s) = slot.as_ref() {
            return Ok(s.clone());
        }
        let session = Arc::new(self.connect(&host.endpoint).await?);
        *slot = Some(session.clone());
        Ok(session)
    }
}

/// One host's connection for the run. Dropping it closes the connection.
pub struct SshHost {
    endpoint: Endpoint,
    session: Mutex<Option<Arc<Session>>>,
    accepted_host_key: Option<(String, String)>,
}

impl SshHost {
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }
}

/// Maps a transport error to the reasons a plan's status distinguishes.
pub fn failure(e: ssh::Error) -> StageFailure {
    use ssh::Error as E;
    let reason = match &e {
        E::Unreachable { .. } | E::Protocol { .. } => FailureReason::Unreachable,
        E::HostKeyUnknown { .. } => FailureReason::HostKeyUnknown,
        E::HostKeyMismatch { .. } | E::HostKeyRevoked { .. } => FailureReason::HostKeyMismatch,
        E::AuthFailed { .. } => FailureReason::AuthFailed,
        E::BecomeFailed { .. } => FailureReason::BecomeFailed,
        E::TimedOut { .. } => FailureReason::TimedOut,
        E::NonZeroExit { .. } => FailureReason::NonZeroExit,
        E::BadKey(_) | E::BadKnownHosts(_) | E::BadCommand(_) => FailureReason::Other,
    };
    let output_tail = match &e {
        E::TimedOut { output, .. } => crate::text::tail(output, OUTPUT_TAIL_MAX),
        _ => String::new(),
    };
    StageFailure {
        reason,
        exit_code: None,
        signal: None,
        message: e.to_string(),
        output_tail,
    }
}

/// The last output of a finished command: stdout, then stderr, within the cap.
fn output_tail(out: &ExecOutput) -> String {
    let stdout = out.stdout.to_string_lossy();
    let stderr = out.stderr.to_string_lossy();
    let both = match (stdout.trim_end().is_empty(), stderr.trim_end().is_empty()) {
        (_, true) => stdout,
        (true, false) => stderr,
        (false, false) => format!("{}\n{}", stdout.trim_end(), stderr),
    };
    crate::text::tail(&both, OUTPUT_TAIL_MAX)
}

/// The transport command for a stage: its script or argv under the host-side supervisor.
fn command(stage: &StageSpec, lock_key: &str) -> Result<Command, StageFailure> {
    let bad = |what: String| StageFailure::new(FailureReason::Other, what);
    let body = match &stage.action {
        StageAction::Script(s) if s.contains('\0') => {
            return Err(bad(format!(
                "stage {:?}: the script contains a NUL byte",
                stage.name
            )));
        }
        StageAction::Script(s) => s.clone(),
        StageAction::Command(argv) => {
            let line = ssh::quote::command_line(&Default::default(), argv)
                .map_err(|e| bad(format!("stage {:?}: {e}", stage.name)))?;
            format!("exec {line}")
        }
        StageAction::Job(_) => {
            return Err(StageFailure::new(
                FailureReason::Other,
                format!(
                    "stage {:?} is a Job stage: Jobs run only under the controller",
                    stage.name
                ),
            ));
        }
    };
    let script = supervise::wrap(lock_key, &body, stage.timeout);
    let mut cmd = Command::script(script)
        .timeout(stage.timeout.saturating_add(supervise::BACKSTOP))
        .capture(512, OUTPUT_TAIL_MAX);
    cmd.env = stage.env.clone();
    for v in &stage.secret_env {
        let Some(value) = &v.value else {
            return Err(StageFailure::new(
                FailureReason::Other,
                format!(
                    "stage {:?}: {} (Secret {:?} key {:?}) was not resolved",
                    stage.name, v.name, v.secret, v.key
                ),
            ));
        };
        cmd.env.insert(v.name.clone(), value.to_string());
    }
    Ok(cmd)
}

impl StageRunner for SshRunner {
    type Host = SshHost;

    async fn open(&self, host: &Endpoint) -> Result<SshHost, StageFailure> {
        let session = self.connect(host).await?;
        Ok(SshHost {
            endpoint: host.clone(),
            accepted_host_key: session.accepted_host_key.clone(),
            session: Mutex::new(Some(Arc::new(session))),
        })
    }

    fn accepted_host_key(&self, host: &SshHost) -> Option<(String, String)> {
        host.accepted_host_key.clone()
    }

    async fn run(
        &self,
        host: &SshHost,
        stage: &StageSpec,
        _attempt: u32,
    ) -> Result<StageOutcome, StageFailure> {
        let key = supervise::lock_key(&self.lock_scope, &host.endpoint.name, &stage.name);
        let cmd = command(stage, &key)?;
        let session = self.session(host).await?;
        // dropped before the supervisor reported back (the run was cancelled, or the
        // controller's backstop fired): kill the stage's process group on the host
        let mut cancel = KillOnDrop {
            session: Some(session.clone()),
            key,
        };
        let out = match session.exec(&cmd).await {
            Ok(out) => out,
            Err(e) => {
                if matches!(e, ssh::Error::Protocol { .. }) {
                    // the connection is likely gone: the next attempt reconnects
                    host.session.lock().await.take();
                }
                return Err(failure(e));
            }
        };
        cancel.session = None;
        if let Some(reason) = supervisor_failure(&out) {
            return Err(StageFailure {
                reason,
                exit_code: None,
                signal: None,
                message: format!(
                    "{}: {}",
                    host.endpoint.name,
                    crate::text::tail(out.stderr.to_string_lossy().trim(), 256)
                ),
                output_tail: output_tail(&out),
            });
        }
        if out.success() {
            return Ok(StageOutcome {
                duration: out.duration,
                output_tail: output_tail(&out),
            });
        }
        if out.exit_status.is_none() && out.exit_signal.is_none() {
            host.session.lock().await.take();
            return Err(StageFailure {
                reason: FailureReason::Unreachable,
                exit_code: None,
                signal: None,
                message: format!("{}: {}", host.endpoint.name, out.status_text()),
                output_tail: output_tail(&out),
            });
        }
        Err(StageFailure {
            reason: FailureReason::NonZeroExit,
            exit_code: out.exit_status.map(|c| c as i32),
            signal: out.exit_signal.clone(),
            message: format!("{}: exited with {}", host.endpoint.name, out.status_text()),
            output_tail: output_tail(&out),
        })
    }
}

/// A failure the supervisor reported rather than the stage: the watchdog's timeout, or an
/// earlier attempt that held the lock for the whole timeout.
fn supervisor_failure(out: &ExecOutput) -> Option<FailureReason> {
    let stderr = out.stderr.to_string_lossy();
    match out.exit_status {
        Some(TIMED_OUT_EXIT) if stderr.contains(TIMED_OUT_MARK) => Some(FailureReason::TimedOut),
        Some(LOCK_BUSY_EXIT) if stderr.contains("outrider: the earlier attempt") => {
            Some(FailureReason::TimedOut)
        }
        _ => None,
    }
}

/// Kills the stage's process group on the host when dropped with a session still set.
struct KillOnDrop {
    session: Option<Arc<Session>>,
    key: String,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let cmd = Command::script(supervise::kill_script(&self.key)).timeout(KILL_TIMEOUT);
        runtime.spawn(async move {
            if let Err(e) = session.exec(&cmd).await {
                tracing::warn!(host = %session.endpoint.name, error = %e, "could not kill a cancelled stage on its host; its watchdog will");
            }
        });
    }
}

/// How long the kill of a cancelled stage may take.
const KILL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
