//! Checks on an inventory that no schema can express and that must hold wherever an
//! inventory comes from (the API server, or a file given to `outrider plan run`).

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;

use crate::ssh::{Command, Endpoint, Fleet};

/// Secret key holding the SSH private key (the `kubernetes.io/ssh-auth` convention).
pub const KEY_PRIVATE_KEY: &str = "ssh-privatekey";
/// Secret key holding the `known_hosts` lines hosts are verified against.
pub const KEY_KNOWN_HOSTS: &str = "known_hosts";
/// Optional Secret key with the private key's passphrase.
pub const KEY_PASSPHRASE: &str = "passphrase";

/// Why an inventory cannot be used as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InventoryProblem {
    #[error("host name {0:?} is listed more than once; host names must be unique")]
    DuplicateHost(String),
    #[error("the inventory lists no hosts")]
    NoHosts,
}

/// Why the credentials Secret cannot be used. Messages name keys, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretProblem {
    #[error("Secret {0:?} has no key {1:?}")]
    MissingKey(String, &'static str),
    #[error("Secret {0:?} key {1:?} is empty")]
    EmptyKey(String, &'static str),
}

/// Rejects duplicate or missing host names.
pub fn check_hosts<'a>(
    names: impl IntoIterator<Item = &'a str>,
) -> Result<usize, InventoryProblem> {
    let mut seen = HashSet::new();
    for name in names {
        if !seen.insert(name) {
            return Err(InventoryProblem::DuplicateHost(name.to_string()));
        }
    }
    if seen.is_empty() {
        return Err(InventoryProblem::NoHosts);
    }
    Ok(seen.len())
}

/// Checks that the Secret carries what SSH needs: a private key always, and `known_hosts`
/// unless unknown hosts may be trusted on first use. `lookup` returns a key's value length.
pub fn check_secret(
    secret_name: &str,
    strict_host_keys: bool,
    lookup: impl Fn(&str) -> Option<usize>,
) -> Result<(), SecretProblem> {
    let mut required = vec![KEY_PRIVATE_KEY];
    if strict_host_keys {
        required.push(KEY_KNOWN_HOSTS);
    }
    for key in required {
        match lookup(key) {
            None => return Err(SecretProblem::MissingKey(secret_name.to_string(), key)),
            Some(0) => return Err(SecretProblem::EmptyKey(secret_name.to_string(), key)),
            Some(_) => {}
        }
    }
    Ok(())
}

/// One host the probe could not use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeFailure {
    pub host: String,
    /// Short CamelCase reason (`Unreachable`, `HostKeyMismatch`, `AuthFailed`, …).
    pub reason: &'static str,
    pub message: String,
}

/// A host key trusted on first use during the probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedKey {
    pub host: String,
    pub address: String,
    pub port: u16,
    pub fingerprint: String,
    pub known_hosts_line: String,
}

impl AcceptedKey {
    /// The pin that keeps this key trusted (and any other key for the host refused).
    pub fn pin(&self) -> crate::ssh::Pin {
        crate::ssh::Pin {
            host: self.host.clone(),
            address: self.address.clone(),
            port: self.port,
            fingerprint: self.fingerprint.clone(),
        }
    }
}

/// What one reachability probe of an inventory found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeReport {
    pub total: usize,
    pub reachable: usize,
    /// Sorted by host name.
    pub failures: Vec<ProbeFailure>,
    pub accepted: Vec<AcceptedKey>,
}

/// Probes every host (connect, verify the host key, authenticate, run `true`) with the
/// fleet's concurrency, all within `deadline`.
pub async fn probe(fleet: &Fleet, endpoints: Vec<Endpoint>, deadline: Duration) -> ProbeReport {
    let total = endpoints.len();
    let per_host = fleet.config().connect_timeout + Duration::from_secs(10);
    let mut results = fleet.run(endpoints, deadline, move |session| async move {
        let cmd = Command::argv(["true"]).timeout(per_host).capture(512, 512);
        session
            .exec(&cmd)
            .await?
            .check(&session.endpoint().name)
            .map(|_| ())
    });
    let mut report = ProbeReport {
        total,
        ..Default::default()
    };
    while let Some(r) = results.next().await {
        if let Some((fingerprint, known_hosts_line)) = r.accepted_host_key {
            report.accepted.push(AcceptedKey {
                host: r.endpoint.name.clone(),
                address: r.endpoint.address.clone(),
                port: r.endpoint.port,
                fingerprint,
                known_hosts_line,
            });
        }
        match r.result {
            Ok(()) => report.reachable += 1,
            Err(e) => report.failures.push(ProbeFailure {
                host: r.endpoint.name.clone(),
                reason: e.reason(),
                message: e.to_string(),
            }),
        }
    }
    report.failures.sort_by(|a, b| a.host.cmp(&b.host));
    report.accepted.sort_by(|a, b| a.host.cmp(&b.host));
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_host_names_are_rejected_by_name() {
        assert_eq!(
            check_hosts(["web-1", "web-2", "web-1"]),
            Err(InventoryProblem::DuplicateHost("web-1".into()))
        );
        assert_eq!(check_hosts(["web-1", "web-2"]), Ok(2));
        assert_eq!(check_hosts([]), Err(InventoryProblem::NoHosts));
    }

    #[test]
    fn strict_policy_needs_known_hosts_accept_new_does_not() {
        let only_key = |k: &str| (k == KEY_PRIVATE_KEY).then_some(10);
        assert_eq!(
            check_secret("s", true, only_key),
            Err(SecretProblem::MissingKey("s".into(), KEY_KNOWN_HOSTS))
        );
        assert_eq!(check_secret("s", false, only_key), Ok(()));
        let empty_key = |k: &str| (k == KEY_PRIVATE_KEY).then_some(0);
        assert_eq!(
            check_secret("s", false, empty_key),
            Err(SecretProblem::EmptyKey("s".into(), KEY_PRIVATE_KEY))
        );
    }
}
