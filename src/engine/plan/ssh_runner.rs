//! Stages over SSH: one connection per host, opened before its first stage and reused for
//! every later stage and for its rollback (a fleet of N hosts costs N handshakes per run).
//! A connection lost mid-run is re-opened on the next attempt.

use std::sync::Arc;

use tokio::sync::Mutex;

use super::{
    FailureReason, OUTPUT_TAIL_MAX, StageAction, StageFailure, StageOutcome, StageRunner, StageSpec,
};
use crate::ssh::{self, Command, Endpoint, ExecOutput, Fleet, Session};

/// Runs script and command stages over SSH; Job stages need the controller's runner.
/// Handshakes are bounded by the [`Fleet`] (they cost the servers far more than commands,
/// and a stock sshd drops handshakes past `MaxStartups`).
pub struct SshRunner {
    fleet: Fleet,
}

impl SshRunner {
    pub fn new(fleet: Fleet) -> Self {
        Self { fleet }
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

/// The transport command for a stage.
fn command(stage: &StageSpec) -> Result<Command, StageFailure> {
    let cmd = match &stage.action {
        StageAction::Script(s) => Command::script(s.clone()),
        StageAction::Command(argv) => Command::argv(argv.clone()),
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
    let mut cmd = cmd.timeout(stage.timeout).capture(512, OUTPUT_TAIL_MAX);
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
        cmd.env.insert(v.name.clone(), value.clone());
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
        let cmd = command(stage)?;
        let session = self.session(host).await?;
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
