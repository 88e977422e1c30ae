//! Every way an SSH action can fail, each naming the host and what to do about it.

use std::time::Duration;

/// A failed SSH action. Messages never contain key material.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("{host}: unreachable: {reason}")]
    Unreachable { host: String, reason: String },
    #[error(
        "{host}: host key {fingerprint} is not in known_hosts; add it to the Secret's known_hosts \
         (or set hostKeyPolicy: AcceptNew to trust it on first use)"
    )]
    HostKeyUnknown { host: String, fingerprint: String },
    #[error(
        "{host}: HOST KEY MISMATCH: the server presented {presented} but known_hosts expects {expected}; \
         refusing to connect (possible man-in-the-middle). If the host was reinstalled, update known_hosts"
    )]
    HostKeyMismatch {
        host: String,
        presented: String,
        expected: String,
    },
    #[error(
        "{host}: host key {fingerprint} is marked @revoked in known_hosts; refusing to connect"
    )]
    HostKeyRevoked { host: String, fingerprint: String },
    #[error("{host}: authentication as {user:?} failed: {reason}")]
    AuthFailed {
        host: String,
        user: String,
        reason: String,
    },
    #[error("{host}: cannot become {user:?} (sudo -n refused): {message}")]
    BecomeFailed {
        host: String,
        user: String,
        message: String,
    },
    #[error("{host}: timed out after {after:?}{}", if .output.is_empty() { String::new() } else { format!("; output so far: {}", .output) })]
    TimedOut {
        host: String,
        after: Duration,
        output: String,
    },
    #[error("{host}: exited with {status}{}", if .stderr.is_empty() { String::new() } else { format!(": {}", .stderr) })]
    NonZeroExit {
        host: String,
        status: String,
        stderr: String,
    },
    #[error("{host}: SSH protocol error: {message}")]
    Protocol { host: String, message: String },
    #[error("the private key cannot be used: {0}")]
    BadKey(String),
    #[error("known_hosts cannot be parsed: {0}")]
    BadKnownHosts(String),
    #[error("{0}")]
    BadCommand(String),
}

impl Error {
    /// Short CamelCase reason for status conditions and metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Unreachable { .. } => "Unreachable",
            Error::HostKeyUnknown { .. } => "HostKeyUnknown",
            Error::HostKeyMismatch { .. } => "HostKeyMismatch",
            Error::HostKeyRevoked { .. } => "HostKeyRevoked",
            Error::AuthFailed { .. } => "AuthFailed",
            Error::BecomeFailed { .. } => "BecomeFailed",
            Error::TimedOut { .. } => "TimedOut",
            Error::NonZeroExit { .. } => "NonZeroExit",
            Error::Protocol { .. } => "Protocol",
            Error::BadKey(_) => "SecretInvalid",
            Error::BadKnownHosts(_) => "SecretInvalid",
            Error::BadCommand(_) => "InvalidCommand",
        }
    }
}
