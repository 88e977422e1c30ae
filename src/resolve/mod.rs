//! From API objects (and the Secrets and pinned keys they point at) to the plain values the
//! engine and the SSH transport take. One file per kind, shared by the controller and the
//! CLI, so a plan run by `outrider plan run` reaches hosts exactly as the controller would.
//! This is the only place that builds a [`Fleet`](crate::ssh::Fleet).

pub mod deployment_plan;
pub mod inventory;
pub mod job_policy;
pub mod security_policy;

/// Why an object cannot be turned into engine or transport values. Each variant maps to a
/// `Ready=False` reason (see [`ResolveError::reason`]); messages name fields and keys,
/// never Secret values.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Secret(#[from] crate::engine::inventory::SecretProblem),
    #[error("Secret {secret:?} key {key:?} is not UTF-8 text")]
    NotText { secret: String, key: &'static str },
    #[error("Secret {secret:?}: {source}")]
    Credentials {
        secret: String,
        #[source]
        source: crate::ssh::Error,
    },
    #[error("{field}: {message}")]
    InvalidField {
        field: &'static str,
        message: String,
    },
    #[error("pinned host keys ({source_name}): {message}")]
    Pins {
        source_name: String,
        message: String,
    },
    #[error("{0}")]
    Hosts(#[from] crate::engine::inventory::InventoryProblem),
    #[error("no host of Inventory {inventory:?} matches {field}")]
    NoTargets {
        inventory: String,
        field: &'static str,
    },
    /// A Job stage that asks for host access or another identity.
    #[error("{field}: {message}")]
    PrivilegedJob { field: String, message: String },
}

impl ResolveError {
    /// The `Ready=False` reason this problem is reported with.
    pub fn reason(&self) -> &'static str {
        match self {
            ResolveError::Secret(_)
            | ResolveError::NotText { .. }
            | ResolveError::Credentials { .. } => "SecretInvalid",
            ResolveError::Pins { .. } => "HostKeysInvalid",
            ResolveError::Hosts(_) => "InvalidHosts",
            ResolveError::NoTargets { .. } => "NoTargets",
            ResolveError::InvalidField { .. } => "InvalidSpec",
            ResolveError::PrivilegedJob { .. } => "PrivilegedJobRefused",
        }
    }
}
