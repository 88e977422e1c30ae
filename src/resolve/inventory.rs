//! Inventory → SSH transport: the Secret's material, the pinned host keys, connection
//! settings and the selected hosts, built into one [`Fleet`] by [`fleet`]. Every caller
//! (the Inventory prober, DeploymentPlan runs, `outrider exec`, `outrider plan run`) goes
//! through [`fleet`], so keys pinned on first use are honoured everywhere.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Selector, SelectorExt};
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use super::ResolveError;
use crate::api::inventory::{HostKeyPolicy, Inventory};
use crate::engine::inventory as checks;
use crate::ssh::{self, ClientConfig, Credentials, Endpoint, Fleet, Pins};

/// The SSH material a Secret (or a directory of files named like its keys) carries.
/// Lives only in memory, wiped when dropped; never logged.
pub struct SshMaterial {
    pub private_key: Zeroizing<String>,
    pub passphrase: Option<Zeroizing<String>>,
    pub known_hosts: String,
}

impl std::fmt::Debug for SshMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SshMaterial { <redacted> }")
    }
}

/// Reads the keys SSH needs through `lookup` (a Secret's data, or files in a directory).
pub fn ssh_material(
    secret: &str,
    policy: HostKeyPolicy,
    lookup: impl Fn(&str) -> Option<Vec<u8>>,
) -> Result<SshMaterial, ResolveError> {
    checks::check_secret(secret, policy == HostKeyPolicy::Strict, |k| {
        lookup(k).map(|v| v.len())
    })?;
    // what the lookup hands over is wiped here whether or not it is text
    let text = |key: &'static str| -> Result<Option<Zeroizing<String>>, ResolveError> {
        lookup(key)
            .map(|v| {
                let v = Zeroizing::new(v);
                std::str::from_utf8(&v)
                    .map(|s| Zeroizing::new(s.to_string()))
                    .map_err(|_| ResolveError::NotText {
                        secret: secret.to_string(),
                        key,
                    })
            })
            .transpose()
    };
    Ok(SshMaterial {
        private_key: text(checks::KEY_PRIVATE_KEY)?.unwrap_or_default(),
        passphrase: text(checks::KEY_PASSPHRASE)?
            .filter(|p| !p.trim().is_empty())
            .map(|p| Zeroizing::new(p.trim_end().to_string())),
        known_hosts: text(checks::KEY_KNOWN_HOSTS)?
            .map(|t| t.to_string())
            .unwrap_or_default(),
    })
}

/// The transport settings an Inventory asks for.
pub fn client_config(inv: &Inventory) -> Result<ClientConfig, ResolveError> {
    let s = &inv.spec.ssh;
    let mut config = ClientConfig::new(s.user.clone());
    config.connect_timeout =
        s.connect_timeout
            .to_std()
            .map_err(|e| ResolveError::InvalidField {
                field: "spec.ssh.connectTimeout",
                message: e.to_string(),
            })?;
    config.host_key_policy = match s.host_key_policy {
        HostKeyPolicy::Strict => ssh::HostKeyPolicy::Strict,
        HostKeyPolicy::AcceptNew => ssh::HostKeyPolicy::AcceptNew,
    };
    config.jump_host = s.jump_host.as_ref().map(|j| ssh::JumpHost {
        address: j.address.clone(),
        port: j.port,
        user: j.user.clone().unwrap_or_else(|| s.user.clone()),
    });
    config.become_user = s.become_.as_ref().map(|b| b.user.clone());
    Ok(config)
}

/// A label every Inventory host carries implicitly, its name: selectors can pick hosts by
/// name (`outrider.dev/host In (web-7)`), which is how remediation scopes a plan.
pub const HOST_LABEL: &str = "outrider.dev/host";

/// The inventory's hosts, in spec order, optionally narrowed by a label selector (which
/// also sees [`HOST_LABEL`]).
pub fn endpoints(
    inv: &Inventory,
    selector: Option<&LabelSelector>,
) -> Result<Vec<Endpoint>, ResolveError> {
    let selector = selector
        .map(|s| Selector::try_from(s.clone()))
        .transpose()
        .map_err(|e| ResolveError::InvalidField {
            field: "spec.targets.selector",
            message: e.to_string(),
        })?;
    Ok(inv
        .spec
        .hosts
        .iter()
        .filter(|h| {
            selector.as_ref().is_none_or(|s| {
                let mut labels = h.labels.clone();
                labels.insert(HOST_LABEL.to_string(), h.name.clone());
                s.matches(&labels)
            })
        })
        .map(|h| {
            Endpoint::new(
                h.name.clone(),
                h.address.clone(),
                h.port.unwrap_or(inv.spec.ssh.port),
            )
        })
        .collect())
}

/// The ConfigMap (owned by the Inventory, in its namespace) that holds the host keys
/// `hostKeyPolicy: AcceptNew` pinned: one data key per host, `address port SHA256:…`.
/// Kept out of status so that a 5,000-host fleet's status stays small.
pub fn pins_configmap_name(inventory: &str) -> String {
    const SUFFIX: &str = "-host-keys";
    const MAX: usize = 253;
    if inventory.len() + SUFFIX.len() <= MAX {
        return format!("{inventory}{SUFFIX}");
    }
    // a long name keeps its start and gets a hash of the whole name, still unique
    let hash = crate::resolve::deployment_plan::fnv(inventory.as_bytes());
    let keep = crate::text::head(inventory, MAX - SUFFIX.len() - hash.len() - 1);
    format!("{}-{hash}{SUFFIX}", keep.trim_end_matches(['-', '.']))
}

/// The pins stored in a pins ConfigMap's data (absent ConfigMap: no pins). Only pins of
/// hosts the inventory still lists at the same address and port are kept.
pub fn pins_from_data(
    inv: &Inventory,
    data: Option<&BTreeMap<String, String>>,
) -> Result<Pins, ResolveError> {
    let name = inv.metadata.name.clone().unwrap_or_default();
    let mut pins = Pins::default();
    for (host, value) in data.into_iter().flatten() {
        let pin = Pins::parse_entry(host, value).map_err(|e| ResolveError::Pins {
            source_name: format!("ConfigMap {:?} key {host:?}", pins_configmap_name(&name)),
            message: e.message,
        })?;
        pins.insert(pin);
    }
    let listed: std::collections::HashSet<(String, String, u16)> = endpoints(inv, None)?
        .into_iter()
        .map(|e| (e.name, e.address.to_ascii_lowercase(), e.port))
        .collect();
    pins.retain(|p| listed.contains(&(p.host.clone(), p.address.to_ascii_lowercase(), p.port)));
    Ok(pins)
}

/// What a run needs to reach its hosts.
pub struct Targets {
    pub fleet: Fleet,
    /// The selected hosts, in inventory order (never empty).
    pub hosts: Vec<Endpoint>,
}

impl std::fmt::Debug for Targets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Targets")
            .field("hosts", &self.hosts.len())
            .finish_non_exhaustive()
    }
}

/// Everything [`fleet`] takes besides the Inventory.
pub struct FleetInput<'a> {
    /// Name of the credentials source, for messages (the Secret's name, or a directory).
    pub secret_name: &'a str,
    /// A key of the Secret (or a file of the directory).
    pub lookup: &'a dyn Fn(&str) -> Option<Vec<u8>>,
    /// Keys pinned on first use (see [`pins_from_data`]).
    pub pins: Pins,
    /// Narrows the hosts; `field` names it in messages.
    pub selector: Option<&'a LabelSelector>,
    pub selector_field: &'static str,
    /// A process-wide cap on handshakes in flight, if the caller has one.
    pub shared_handshakes: Option<Arc<Semaphore>>,
}

/// The one Fleet builder: validates the host list, reads the Secret, adds the pinned host
/// keys to the Secret's `known_hosts`, applies the Inventory's connection settings and
/// selects the hosts.
pub fn fleet(inv: &Inventory, input: FleetInput<'_>) -> Result<Targets, ResolveError> {
    checks::check_hosts(inv.spec.hosts.iter().map(|h| h.name.as_str()))?;
    let config = client_config(inv)?;
    let material = ssh_material(
        input.secret_name,
        inv.spec.ssh.host_key_policy,
        input.lookup,
    )?;
    let credentials = Credentials::new(
        &material.private_key,
        material.passphrase.as_deref().map(String::as_str),
        &material.known_hosts,
    )
    .map_err(|source| ResolveError::Credentials {
        secret: input.secret_name.to_string(),
        source,
    })?
    .with_pins(input.pins);
    let hosts = endpoints(inv, input.selector).map_err(|e| match e {
        ResolveError::InvalidField { message, .. } => ResolveError::InvalidField {
            field: input.selector_field,
            message,
        },
        other => other,
    })?;
    if hosts.is_empty() {
        return Err(ResolveError::NoTargets {
            inventory: inv.metadata.name.clone().unwrap_or_default(),
            field: input.selector_field,
        });
    }
    let mut fleet = Fleet::new(config, credentials);
    if let Some(limit) = input.shared_handshakes {
        fleet = fleet.with_shared_handshakes(limit);
    }
    Ok(Targets { fleet, hosts })
}

/// A `lookup` over a directory laid out like a mounted Secret (the CLI's `--secret-dir`).
pub fn secret_dir_lookup(dir: &std::path::Path) -> impl Fn(&str) -> Option<Vec<u8>> + '_ {
    move |key: &str| std::fs::read(dir.join(key)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inventory() -> Inventory {
        serde_yaml::from_str(
            r#"
apiVersion: outrider.dev/v1alpha1
kind: Inventory
metadata: {name: fleet}
spec:
  ssh: {user: deploy, port: 2200, secretRef: {name: s}, connectTimeout: 3s,
        jumpHost: {address: 127.0.0.9}, become: {user: root}}
  hosts:
    - {name: a, address: 127.0.10.1, labels: {role: web}}
    - {name: b, address: 127.0.10.2, port: 22, labels: {role: db}}
"#,
        )
        .expect("inventory yaml")
    }

    #[test]
    fn hosts_inherit_the_inventory_port_and_selectors_narrow_them() {
        let inv = inventory();
        let all = endpoints(&inv, None).unwrap();
        assert_eq!(
            all,
            vec![
                Endpoint::new("a", "127.0.10.1", 2200),
                Endpoint::new("b", "127.0.10.2", 22)
            ]
        );
        let web = LabelSelector {
            match_labels: Some(BTreeMap::from([("role".to_string(), "web".to_string())])),
            ..Default::default()
        };
        assert_eq!(
            endpoints(&inv, Some(&web)).unwrap(),
            vec![Endpoint::new("a", "127.0.10.1", 2200)]
        );
    }

    #[test]
    fn jump_host_user_defaults_to_the_inventory_user() {
        let c = client_config(&inventory()).unwrap();
        assert_eq!(c.connect_timeout, std::time::Duration::from_secs(3));
        let j = c.jump_host.expect("jump host");
        assert_eq!(
            (j.address.as_str(), j.port, j.user.as_str()),
            ("127.0.0.9", 22, "deploy")
        );
        assert_eq!(c.become_user.as_deref(), Some("root"));
    }

    #[test]
    fn material_requires_known_hosts_only_under_strict() {
        let files = BTreeMap::from([
            ("ssh-privatekey", b"KEY".to_vec()),
            ("passphrase", b"pw\n".to_vec()),
        ]);
        let lookup = |k: &str| files.get(k).cloned();
        assert!(matches!(
            ssh_material("s", HostKeyPolicy::Strict, lookup),
            Err(ResolveError::Secret(_))
        ));
        let m = ssh_material("s", HostKeyPolicy::AcceptNew, lookup).unwrap();
        assert_eq!(
            (
                m.private_key.as_str(),
                m.passphrase.as_deref().map(String::as_str)
            ),
            ("KEY", Some("pw"))
        );
    }

    #[test]
    fn stored_pins_apply_only_to_hosts_still_listed_at_the_same_address() {
        let inv = inventory();
        let data = BTreeMap::from([
            ("a".to_string(), "127.0.10.1 2200 SHA256:aaa".to_string()),
            // b moved to another address since its key was pinned
            ("b".to_string(), "127.0.99.2 22 SHA256:bbb".to_string()),
            // c is no longer listed
            ("c".to_string(), "127.0.10.3 2200 SHA256:ccc".to_string()),
        ]);
        let pins = pins_from_data(&inv, Some(&data)).unwrap();
        assert_eq!(pins.len(), 1);
        assert_eq!(pins.sorted()[0].host, "a");
        let bad = BTreeMap::from([("a".to_string(), "127.0.10.1 x SHA256:aaa".to_string())]);
        let err = pins_from_data(&inv, Some(&bad)).unwrap_err();
        assert_eq!(err.reason(), "HostKeysInvalid");
        assert!(err.to_string().contains("fleet-host-keys"), "{err}");
    }

    #[test]
    fn pins_configmap_names_stay_valid_and_distinct_for_long_inventory_names() {
        assert_eq!(pins_configmap_name("web"), "web-host-keys");
        let long_a = format!("{}a", "x".repeat(250));
        let long_b = format!("{}b", "x".repeat(250));
        let (a, b) = (pins_configmap_name(&long_a), pins_configmap_name(&long_b));
        assert!(a.len() <= 253 && b.len() <= 253, "{} {}", a.len(), b.len());
        assert_ne!(a, b);
    }

    #[test]
    fn the_fleet_builder_carries_pins_and_reports_each_problem_with_its_reason() {
        let inv = inventory();
        fn no_secret(_: &str) -> Option<Vec<u8>> {
            None
        }
        fn garbage(k: &str) -> Option<Vec<u8>> {
            (k == "ssh-privatekey" || k == "known_hosts").then(|| b"x".to_vec())
        }
        let input = |lookup: &'static dyn Fn(&str) -> Option<Vec<u8>>| FleetInput {
            secret_name: "s",
            lookup,
            pins: Pins::default(),
            selector: None,
            selector_field: "spec.targets.selector",
            shared_handshakes: None,
        };
        let err = fleet(&inv, input(&no_secret)).unwrap_err();
        assert_eq!(err.reason(), "SecretInvalid");
        let err = fleet(&inv, input(&garbage)).unwrap_err();
        assert_eq!(err.reason(), "SecretInvalid");
        assert!(!err.to_string().contains("\"x\""), "{err}");
    }
}
