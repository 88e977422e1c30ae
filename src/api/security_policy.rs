//! `SecurityPolicy`: abstract allow/deny rules compiled to an nftables (or iptables) ruleset,
//! pushed to many hosts with an automatic restore, and checked for drift.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{
    CIDR_PATTERN, DurationString, NON_NEGATIVE_INT_OR_PERCENT_RULE, POSITIVE_INT_OR_PERCENT_RULE,
    Targets, conditions_schema, duration_at_least, duration_at_most,
};

/// What rule and zone names look like: DNS-1123 label characters plus `_`
/// (`block_external_ssh`), at most 63 characters.
pub const RULE_NAME_PATTERN: &str = r"^[a-z0-9]([-_a-z0-9]*[a-z0-9])?$";

/// A host firewall for the targets. Outrider owns one table (`table inet outrider`, or
/// `OUTRIDER-*` chains with iptables) on each host and never touches others.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "outrider.dev",
    version = "v1alpha1",
    kind = "SecurityPolicy",
    plural = "securitypolicies",
    namespaced,
    status = "SecurityPolicyStatus",
    shortname = "secpol",
    category = "outrider",
    doc = "Host firewall rules compiled to nftables or iptables, pushed safely, checked for drift",
    printcolumn(name = "Backend", type_ = "string", json_path = ".spec.backend"),
    printcolumn(name = "Hosts", type_ = "integer", json_path = ".status.hosts.total"),
    printcolumn(
        name = "Applied",
        type_ = "integer",
        json_path = ".status.hosts.applied"
    ),
    printcolumn(
        name = "Drifted",
        type_ = "integer",
        json_path = ".status.hosts.drifted"
    ),
    printcolumn(name = "Failed", type_ = "integer", json_path = ".status.hosts.failed"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = 1
    ),
    printcolumn(
        name = "Hash",
        type_ = "string",
        json_path = ".status.rulesetHash",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("!has(self.rules) || self.rules.all(r, !has(r.from) || (has(self.zones) && r.from in self.zones))")
    .message("every rule's from must name a key of spec.zones")
    .field_path(".rules"))]
#[serde(rename_all = "camelCase")]
pub struct SecurityPolicySpec {
    /// The Inventory hosts the ruleset is pushed to.
    pub targets: Targets,
    /// Firewall the ruleset is compiled for.
    #[serde(default)]
    pub backend: Backend,
    /// Named sets of source networks that rules refer to with `from`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    #[x_kube(validation = Rule::new("self.all(z, size(z) <= 63 && z.matches('^[a-z0-9]([-_a-z0-9]*[a-z0-9])?$'))")
        .message("zone names must be lowercase alphanumerics, '-' or '_', at most 63 characters"))]
    pub zones: BTreeMap<String, Zone>,
    /// Verdict for inbound traffic no rule matches (established connections and loopback
    /// are always accepted).
    pub default_input: DefaultAction,
    /// Rules, evaluated in order; the first match decides. Names are unique.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["name".into()]))]
    pub rules: Vec<FirewallRule>,
    /// Management access that no rule can block, accepted before every rule.
    pub failsafe: Failsafe,
    /// How a new ruleset is rolled out.
    #[serde(default)]
    pub apply: ApplySettings,
    /// How often the live ruleset is compared with the rendered one (10s to 24h).
    #[serde(default = "default_drift_interval")]
    #[x_kube(
        validation = duration_at_least("driftCheckInterval", "10s"),
        validation = duration_at_most("driftCheckInterval", "24h")
    )]
    pub drift_check_interval: DurationString,
    /// What to do when a host's ruleset differs from the rendered one.
    #[serde(default)]
    pub drift_policy: DriftPolicy,
}

fn default_drift_interval() -> DurationString {
    DurationString("5m".into())
}

/// A list of IPv4/IPv6 networks (`10.0.0.0/8`, `::/0`) or single addresses.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(transparent)]
pub struct Zone(pub Vec<String>);

impl JsonSchema for Zone {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Zone".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "array",
            "minItems": 1,
            "maxItems": 64,
            "items": {"type": "string", "maxLength": 43, "pattern": CIDR_PATTERN},
        })
    }
}

/// Firewall implementation on the hosts.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// One `inet` table, replaced atomically with `nft -f`.
    #[default]
    Nftables,
    /// `OUTRIDER-*` chains, replaced with `iptables-restore --noflush` (IPv4 and IPv6).
    Iptables,
}

/// Verdict for unmatched inbound traffic.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    /// Accept it.
    Accept,
    /// Drop it silently.
    Drop,
}

/// One rule for inbound traffic.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("!has(self.ports) || self.protocol == 'tcp' || self.protocol == 'udp'")
    .message("ports require protocol tcp or udp")
    .field_path(".ports"))]
#[serde(rename_all = "camelCase")]
pub struct FirewallRule {
    /// Unique name (lowercase, digits, `-`, `_`); becomes the rule's comment on the host.
    #[schemars(length(min = 1, max = 63), regex(pattern = RULE_NAME_PATTERN))]
    pub name: String,
    /// Verdict for matching packets.
    pub action: RuleAction,
    /// Source zone (a key of `spec.zones`); any source when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub from: Option<String>,
    /// Transport protocol.
    #[serde(default)]
    pub protocol: Protocol,
    /// Destination ports (tcp and udp only); every port when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), inner(range(min = 1, max = 65535)))]
    pub ports: Option<Vec<u16>>,
}

/// Verdict of a rule.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    /// Accept the packet.
    Allow,
    /// Drop the packet.
    Deny,
}

/// Transport protocol of a rule.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Any protocol.
    #[default]
    Any,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP (IPv4).
    Icmp,
    /// ICMPv6.
    Icmpv6,
}

/// Ports that stay reachable whatever the rules say.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Failsafe {
    /// TCP ports always accepted (at least one: the SSH port Outrider uses).
    #[schemars(length(min = 1, max = 16), inner(range(min = 1, max = 65535)))]
    pub ports: Vec<u16>,
    /// Sources allowed on those ports; any source when absent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 43), regex(pattern = CIDR_PATTERN)))]
    pub sources: Vec<String>,
}

/// Rollout of a new ruleset.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApplySettings {
    /// A host restores its previous ruleset by itself unless Outrider reconnects and
    /// confirms within this time (protects against locking Outrider out); 3s to 1h.
    #[serde(default = "default_confirm_timeout")]
    #[x_kube(
        validation = duration_at_least("confirmTimeout", "3s"),
        validation = duration_at_most("confirmTimeout", "1h")
    )]
    pub confirm_timeout: DurationString,
    /// Hosts per batch after the canary (one host, always first): an integer >= 1 or a
    /// percentage ('10%').
    #[serde(default = "default_batch_size")]
    #[schemars(extend("maxLength" = 4, "nullable" = false))]
    #[x_kube(validation = Rule::new(POSITIVE_INT_OR_PERCENT_RULE)
        .message("batchSize must be an integer >= 1 or a percentage between 1% and 100%"))]
    pub batch_size: IntOrString,
    /// Hosts that may fail (and be restored) before the rollout stops: an integer >= 0 or
    /// a percentage.
    #[serde(default = "default_max_unavailable")]
    #[schemars(extend("maxLength" = 4, "nullable" = false))]
    #[x_kube(validation = Rule::new(NON_NEGATIVE_INT_OR_PERCENT_RULE)
        .message("maxUnavailable must be an integer >= 0 or a percentage between 0% and 100%"))]
    pub max_unavailable: IntOrString,
}

impl Default for ApplySettings {
    fn default() -> Self {
        Self {
            confirm_timeout: default_confirm_timeout(),
            batch_size: default_batch_size(),
            max_unavailable: default_max_unavailable(),
        }
    }
}

fn default_confirm_timeout() -> DurationString {
    DurationString("30s".into())
}

fn default_batch_size() -> IntOrString {
    IntOrString::String("10%".into())
}

fn default_max_unavailable() -> IntOrString {
    IntOrString::Int(0)
}

/// Reaction to drift.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DriftPolicy {
    /// Record the drift in status and Events, change nothing.
    #[default]
    Report,
    /// Record it and push the rendered ruleset again.
    Reconcile,
}

/// Rollout and drift state. Written by the controller only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecurityPolicyStatus {
    /// `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `sha256:<hex>` of the rendered ruleset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 80))]
    pub ruleset_hash: Option<String>,
    /// Hosts per state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<PolicyHostCounts>,
    /// Drifted hosts, at most 100.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub drift: Vec<DriftRecord>,
    /// Hosts where applying failed (and the previous ruleset was restored), at most 100.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub failures: Vec<ApplyFailure>,
    /// Static-check findings about the rules (shadowed, overlapping, ...), at most 50.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub findings: Vec<PolicyFinding>,
    /// Ready (every host runs the rendered ruleset), Progressing (a rollout is running)
    /// and Degraded (hosts drifted or failed).
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// Hosts per state.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyHostCounts {
    /// Target hosts.
    #[serde(default)]
    pub total: u32,
    /// Hosts running the rendered ruleset.
    #[serde(default)]
    pub applied: u32,
    /// Hosts whose live ruleset differs from the rendered one.
    #[serde(default)]
    pub drifted: u32,
    /// Hosts where the last apply failed (rolled back ones included).
    #[serde(default)]
    pub failed: u32,
    /// Hosts that restored their previous ruleset because the apply was not confirmed.
    #[serde(default)]
    pub rolled_back: u32,
    /// Hosts not yet applied (the rollout is running, stopped, or has not reached them).
    #[serde(default)]
    pub pending: u32,
}

/// One static-check finding.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyFinding {
    /// Error (nothing is pushed) or Warning.
    #[schemars(length(max = 16))]
    pub severity: String,
    /// CamelCase kind: Shadowed, Overlap, FailsafeCovered, UnusedZone, ...
    #[schemars(length(max = 64))]
    pub code: String,
    /// The rule it is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub rule: Option<String>,
    /// What is wrong.
    #[schemars(length(max = 1024))]
    pub message: String,
}

/// Drift found on one host.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DriftRecord {
    /// Inventory host name.
    #[schemars(length(max = 63))]
    pub host: String,
    /// When the drift was first seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detected_at: Option<Time>,
    /// What differs.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 1024))]
    pub message: String,
}

/// Failed apply on one host.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApplyFailure {
    /// Inventory host name.
    #[schemars(length(max = 63))]
    pub host: String,
    /// CamelCase cause: ConnectFailed, RulesetRejected, NotConfirmed, ...
    #[schemars(length(max = 64))]
    pub reason: String,
    /// Details (the firewall tool's error, capped).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 1024))]
    pub message: String,
    /// When it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Time>,
}
