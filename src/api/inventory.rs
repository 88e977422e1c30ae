//! `Inventory`: the hosts outside the cluster and how to reach them over SSH.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{
    DurationString, LocalObjectReference, conditions_schema, duration_at_least, duration_at_most,
};

/// The hosts a team operates and the SSH settings they share.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "outrider.dev",
    version = "v1alpha1",
    kind = "Inventory",
    plural = "inventories",
    namespaced,
    status = "InventoryStatus",
    shortname = "inv",
    category = "outrider",
    doc = "Hosts outside the cluster and how to reach them over SSH",
    printcolumn(name = "Hosts", type_ = "integer", json_path = ".status.hosts"),
    printcolumn(name = "Reachable", type_ = "integer", json_path = ".status.reachable"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct InventorySpec {
    /// How every host in this inventory is reached.
    pub ssh: SshSettings,
    /// The hosts. Names are unique (the API server rejects duplicates).
    #[schemars(length(min = 1, max = 10000))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["name".into()]))]
    pub hosts: Vec<Host>,
    /// How often every host is probed (connect, authenticate, run `true`).
    #[serde(default)]
    pub probe: ProbeSettings,
}

/// Reachability probing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProbeSettings {
    /// Interval between probes of the whole inventory (1s to 24h).
    #[serde(default = "default_probe_interval")]
    #[x_kube(
        validation = duration_at_least("interval", "1s"),
        validation = duration_at_most("interval", "24h")
    )]
    pub interval: DurationString,
    /// Hosts probed at once.
    #[serde(default = "default_probe_concurrency")]
    #[schemars(range(min = 1, max = 500))]
    pub concurrency: u32,
}

impl Default for ProbeSettings {
    fn default() -> Self {
        Self {
            interval: default_probe_interval(),
            concurrency: default_probe_concurrency(),
        }
    }
}

fn default_probe_interval() -> DurationString {
    DurationString("5m".into())
}

fn default_probe_concurrency() -> u32 {
    50
}

/// SSH connection settings shared by all hosts of an inventory.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SshSettings {
    /// Remote login user.
    #[schemars(
        length(min = 1, max = 64),
        regex(pattern = r"^[a-z_][a-z0-9_.-]*[$]?$")
    )]
    pub user: String,
    /// Default port; a host may override it.
    #[serde(default = "default_ssh_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// Secret in this namespace with keys `ssh-privatekey`, `known_hosts` and optionally `passphrase`.
    pub secret_ref: LocalObjectReference,
    /// TCP connect plus handshake timeout per host (at most 5m).
    #[serde(default = "default_connect_timeout")]
    #[x_kube(validation = duration_at_most("connectTimeout", "5m"))]
    pub connect_timeout: DurationString,
    /// What to do with a host key that is not in `known_hosts`. A changed key is always refused.
    #[serde(default)]
    pub host_key_policy: HostKeyPolicy,
    /// Optional bastion every connection goes through (ProxyJump).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jump_host: Option<JumpHost>,
    /// Optional privilege escalation for commands, non-interactive only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "become")]
    pub become_: Option<Become>,
}

fn default_ssh_port() -> u16 {
    22
}

fn default_connect_timeout() -> DurationString {
    DurationString("10s".into())
}

/// Host key trust policy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum HostKeyPolicy {
    /// Only keys present in `known_hosts` are accepted.
    #[default]
    Strict,
    /// An unknown host's key is accepted once and recorded in status (trust on first use).
    AcceptNew,
}

/// A bastion host.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JumpHost {
    /// Address (IP or DNS name) of the jump host.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[A-Za-z0-9.:_-]+$"))]
    pub address: String,
    /// SSH port of the jump host.
    #[serde(default = "default_ssh_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// User on the jump host; the inventory's user when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub user: Option<String>,
}

/// Non-interactive privilege escalation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Become {
    /// Escalation program.
    #[serde(default)]
    pub method: BecomeMethod,
    /// Target user.
    #[serde(default = "default_become_user")]
    #[schemars(
        length(min = 1, max = 64),
        regex(pattern = r"^[a-z_][a-z0-9_.-]*[$]?$")
    )]
    pub user: String,
}

fn default_become_user() -> String {
    "root".into()
}

/// How privileges are raised.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BecomeMethod {
    /// `sudo -n -u USER`: a password prompt is an error, not a hang.
    #[default]
    Sudo,
}

/// One host.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Host {
    /// Unique name, used in status and Events (DNS-1123 label).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// IP address or DNS name.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[A-Za-z0-9.:_-]+$"))]
    pub address: String,
    /// Overrides `ssh.port` for this host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// Labels other resources select hosts by.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub labels: BTreeMap<String, String>,
}

/// What the controller last observed about an inventory.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InventoryStatus {
    /// `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Number of hosts listed.
    #[serde(default)]
    pub hosts: u32,
    /// Hosts that answered the last reachability probe (absent until probed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reachable: Option<u32>,
    /// Hosts that failed the last probe, with the reason (at most 50 listed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("maxItems" = 50))]
    pub unreachable: Vec<UnreachableHost>,
    /// Host keys trusted on first use (`hostKeyPolicy: AcceptNew`): how many are pinned and
    /// where. The pins themselves live in a ConfigMap the Inventory owns, so status stays
    /// small for any fleet size and key type; a later change of a pinned key is refused
    /// like any mismatch, by the Inventory's probes and by every plan alike.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_keys: Option<PinnedHostKeys>,
    /// Deprecated: where Outrider 0.1 kept pinned keys. Read once and moved into the
    /// ConfigMap named in `hostKeys`; never written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("maxItems" = 10000))]
    pub accepted_host_keys: Vec<AcceptedHostKey>,
    /// Ready: the SSH Secret resolves, the host list is valid and every host answered.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// A host the last probe could not use.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UnreachableHost {
    pub host: String,
    /// Unreachable, HostKeyUnknown, HostKeyMismatch, AuthFailed, TimedOut, …
    pub reason: String,
    #[schemars(length(max = 1024))]
    pub message: String,
}

/// Where the pinned host keys are, and the most recent ones.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PinnedHostKeys {
    /// Number of host keys pinned.
    pub pinned: u32,
    /// The ConfigMap (in this namespace, owned by this Inventory) holding them: one key per
    /// host, `address port SHA256:fingerprint`.
    #[schemars(length(max = 253))]
    pub config_map: String,
    /// The last keys trusted on first use (at most 20), newest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("maxItems" = 20))]
    pub recent: Vec<RecentHostKey>,
}

/// A host key trusted on first use.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecentHostKey {
    #[schemars(length(max = 63))]
    pub host: String,
    /// `SHA256:…`, as `ssh-keygen -lf` prints it.
    #[schemars(length(max = 64))]
    pub fingerprint: String,
}

/// A host key accepted on first use (Outrider 0.1's status form, deprecated).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AcceptedHostKey {
    pub host: String,
    /// `SHA256:…`, as `ssh-keygen -lf` prints it.
    pub fingerprint: String,
    /// The known_hosts line that pins it.
    #[schemars(length(max = 16384))]
    pub known_hosts_line: String,
}
