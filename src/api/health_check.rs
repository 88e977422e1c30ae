//! `HealthCheck`: scheduled probes of hosts (over SSH) and endpoints (from the controller),
//! learned baselines, and an optional remediation plan.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{
    DNS1123_LABEL_PATTERN, DurationString, LocalObjectReference, Targets, URL_PATTERN,
    conditions_schema, duration_at_least, duration_at_most,
};

/// `host:port` or `[ipv6]:port` with a port 1-65535, for TCP and TLS probes.
pub const HOST_PORT_PATTERN: &str = r"^([A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$";

/// Probes run every `interval`: `checks` on every target host over SSH, `endpoints` from
/// the controller. A target turns Unhealthy after `failureThreshold` consecutive failures.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "outrider.dev",
    version = "v1alpha1",
    kind = "HealthCheck",
    plural = "healthchecks",
    namespaced,
    status = "HealthCheckStatus",
    shortname = "hc",
    category = "outrider",
    doc = "Scheduled probes of hosts and endpoints, with learned baselines and remediation",
    printcolumn(
        name = "Healthy",
        type_ = "integer",
        json_path = ".status.summary.healthy"
    ),
    printcolumn(
        name = "Unhealthy",
        type_ = "integer",
        json_path = ".status.summary.unhealthy"
    ),
    printcolumn(
        name = "Unknown",
        type_ = "integer",
        json_path = ".status.summary.unknown"
    ),
    printcolumn(
        name = "Degraded",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Degraded\")].status"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        priority = 1
    ),
    printcolumn(name = "Last Run", type_ = "date", json_path = ".status.lastRunAt"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new("(has(self.checks) ? size(self.checks) : 0) + (has(self.endpoints) ? size(self.endpoints) : 0) > 0")
        .message("at least one of checks or endpoints must be set"),
    validation = Rule::new("!has(self.checks) || size(self.checks) == 0 || has(self.targets)")
        .message("targets is required when checks are set: checks run on inventory hosts")
        .field_path(".targets"),
    validation = Rule::new("!has(self.successThreshold) || !has(self.failureThreshold) || self.successThreshold <= self.failureThreshold")
        .message("successThreshold must not be greater than failureThreshold")
        .field_path(".successThreshold"),
)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheckSpec {
    /// How often every check and endpoint is probed (5s to 24h).
    #[serde(default = "default_interval")]
    #[x_kube(
        validation = duration_at_least("interval", "5s"),
        validation = duration_at_most("interval", "24h")
    )]
    pub interval: DurationString,
    /// Inventory hosts the `checks` run on; required when `checks` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<Targets>,
    /// Probes run on every target host over SSH. Names are unique.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["name".into()]))]
    pub checks: Vec<Check>,
    /// Network endpoints probed from the controller. Names are unique.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["name".into()]))]
    pub endpoints: Vec<Endpoint>,
    /// Consecutive failures before a target is Unhealthy.
    #[serde(default = "default_failure_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_threshold: u32,
    /// Consecutive successes before an Unhealthy target is Healthy again.
    #[serde(default = "default_success_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub success_threshold: u32,
    /// Learns a per target and metric baseline and flags values far from it as Anomalous.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Baseline>,
    /// A DeploymentPlan rerun, for the unhealthy hosts only, when hosts turn Unhealthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remediation: Option<Remediation>,
    /// Quiet times: probes still run and report, but no state changes and no remediation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<Maintenance>,
}

/// Maintenance: `suspend` for an open-ended one, or windows with a start and an end.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Maintenance {
    /// In maintenance until set back to false.
    #[serde(default)]
    pub suspend: bool,
    /// Planned windows (RFC 3339 times); in maintenance while now is in any of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub windows: Vec<MaintenanceWindow>,
}

/// One planned maintenance window.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("self.end > self.start")
    .message("end must be after start")
    .field_path(".end"))]
#[serde(rename_all = "camelCase")]
pub struct MaintenanceWindow {
    pub start: Time,
    pub end: Time,
}

fn default_interval() -> DurationString {
    DurationString("30s".into())
}

fn default_failure_threshold() -> u32 {
    3
}

fn default_success_threshold() -> u32 {
    1
}

fn default_probe_timeout() -> DurationString {
    DurationString("10s".into())
}

/// A probe run on each target host: exactly one of disk, memory, load, process or exec.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("[has(self.disk), has(self.memory), has(self.load), has(self.process), has(self.exec)].exists_one(x, x)")
    .message("exactly one of disk, memory, load, process or exec must be set"))]
#[serde(rename_all = "camelCase")]
pub struct Check {
    /// Unique name (DNS-1123 label); used in status, Events and metrics.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS1123_LABEL_PATTERN))]
    pub name: String,
    /// Used space of a filesystem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskProbe>,
    /// Used memory (MemTotal - MemAvailable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryProbe>,
    /// One-minute load average per CPU core.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<LoadProbe>,
    /// A process with this name is running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessProbe>,
    /// A command or script whose exit code decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecProbe>,
    /// Time limit of the probe on one host (at most 5m); a timeout counts as a failure.
    #[serde(default = "default_probe_timeout")]
    #[x_kube(validation = duration_at_most("timeout", "5m"))]
    pub timeout: DurationString,
}

/// Filesystem usage probe.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskProbe {
    /// Absolute path of any file on the filesystem (usually its mount point).
    #[schemars(length(min = 1, max = 4096), regex(pattern = r"^/"))]
    pub path: String,
    /// Highest healthy used percentage.
    #[schemars(range(min = 0, max = 100))]
    pub max_used_percent: u8,
}

/// Memory usage probe.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemoryProbe {
    /// Highest healthy used percentage.
    #[schemars(range(min = 0, max = 100))]
    pub max_used_percent: u8,
}

/// Load average probe.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadProbe {
    /// Highest healthy one-minute load average divided by the number of cores (> 0).
    #[schemars(extend("minimum" = 0, "exclusiveMinimum" = true, "maximum" = 1000))]
    pub max_per_core: f64,
}

/// Process presence probe: exactly one of `name` or `pidfile`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("has(self.name) != has(self.pidfile)")
    .message("exactly one of name or pidfile must be set"))]
#[serde(rename_all = "camelCase")]
pub struct ProcessProbe {
    /// Exact process name (as `pgrep -x` matches it: the kernel's 15-character `comm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 15), regex(pattern = r"^[^/\x00\n]+$"))]
    pub name: Option<String>,
    /// Absolute path of a pidfile; healthy when the process it names is running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 4096), regex(pattern = r"^/[^\x00\n]*$"))]
    pub pidfile: Option<String>,
}

/// Command probe: exactly one of `command` or `script`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("has(self.command) != has(self.script)")
    .message("exactly one of command or script must be set"))]
#[serde(rename_all = "camelCase")]
pub struct ExecProbe {
    /// Program and arguments run without a shell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), inner(length(max = 4096)))]
    pub command: Option<Vec<String>>,
    /// Shell script run with `sh -s` (sent over stdin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16384))]
    pub script: Option<String>,
    /// Exit code that means healthy.
    #[serde(default)]
    #[schemars(range(min = 0, max = 255))]
    pub expect_exit_code: i32,
    /// Regular expression (Rust `regex` syntax) the output (stdout and stderr, the first
    /// 4 KiB) must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub expect_output: Option<String>,
}

/// A network endpoint probed from the controller: exactly one of http, tcp or tls.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("[has(self.http), has(self.tcp), has(self.tls)].exists_one(x, x)")
    .message("exactly one of http, tcp or tls must be set"))]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Unique name (DNS-1123 label); used in status, Events and metrics.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS1123_LABEL_PATTERN))]
    pub name: String,
    /// HTTP(S) GET.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpProbe>,
    /// TCP connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpProbe>,
    /// TLS handshake and certificate expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsProbe>,
    /// Time limit of one probe (at most 5m); a timeout counts as a failure.
    #[serde(default = "default_probe_timeout")]
    #[x_kube(validation = duration_at_most("timeout", "5m"))]
    pub timeout: DurationString,
}

impl Endpoint {
    /// The Secret whose `ca.crt` this endpoint trusts, if any (http and tls only).
    pub fn ca_secret_ref(&self) -> Option<&LocalObjectReference> {
        self.http
            .as_ref()
            .and_then(|h| h.ca_secret_ref.as_ref())
            .or_else(|| self.tls.as_ref().and_then(|t| t.ca_secret_ref.as_ref()))
    }
}

impl Maintenance {
    /// Whether maintenance holds at `now`: suspended, or inside a window (end exclusive).
    pub fn is_open(&self, now: k8s_openapi::jiff::Timestamp) -> bool {
        self.suspend
            || self
                .windows
                .iter()
                .any(|w| w.start.0 <= now && now < w.end.0)
    }
}

/// HTTP probe.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpProbe {
    /// URL fetched with GET.
    #[schemars(length(min = 1, max = 2048), regex(pattern = URL_PATTERN))]
    pub url: String,
    /// Status codes that mean healthy.
    #[serde(default = "default_expect_status")]
    #[schemars(length(min = 1, max = 16), inner(range(min = 100, max = 599)))]
    pub expect_status: Vec<u16>,
    /// Slowest healthy response (time to the full body), at most 5m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = duration_at_most("maxLatency", "5m"))]
    pub max_latency: Option<DurationString>,
    /// Substring the body must contain (the first 64 KiB are read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub body_contains: Option<String>,
    /// Regular expression (Rust `regex` syntax) the body (the first 64 KiB) must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub body_regex: Option<String>,
    /// Secret (same namespace) whose `ca.crt` is trusted in addition to the public roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<LocalObjectReference>,
    /// Skips certificate verification (never the default). The probe still fails on a
    /// broken handshake.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

fn default_expect_status() -> Vec<u16> {
    vec![200]
}

/// TCP connect probe.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TcpProbe {
    /// `host:port` to connect to.
    #[schemars(length(min = 1, max = 260), regex(pattern = HOST_PORT_PATTERN))]
    pub address: String,
}

/// TLS certificate probe.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsProbe {
    /// `host:port` to handshake with; the host is also the expected server name.
    #[schemars(length(min = 1, max = 260), regex(pattern = HOST_PORT_PATTERN))]
    pub address: String,
    /// Unhealthy when the certificate expires sooner than this (at most 8760h, a year).
    #[serde(default = "default_min_valid_for")]
    #[x_kube(validation = duration_at_most("minValidFor", "8760h"))]
    pub min_valid_for: DurationString,
    /// Name the certificate must be valid for; the address's host when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub server_name: Option<String>,
    /// Secret (same namespace) whose `ca.crt` is trusted in addition to the public roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<LocalObjectReference>,
}

fn default_min_valid_for() -> DurationString {
    DurationString("336h".into())
}

/// Anomaly detection on probe values.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Baseline {
    /// Turns anomaly detection on.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Standard deviations from the learned mean that count as an anomaly (> 0).
    #[serde(default = "default_sensitivity")]
    #[schemars(extend("minimum" = 0, "exclusiveMinimum" = true, "maximum" = 100))]
    pub sensitivity: f64,
    /// Samples learned before anything is flagged.
    #[serde(default = "default_warmup")]
    #[schemars(range(min = 1, max = 100000))]
    pub warmup: u32,
}

fn default_true() -> bool {
    true
}

fn default_sensitivity() -> f64 {
    3.0
}

fn default_warmup() -> u32 {
    20
}

/// Automatic remediation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Remediation {
    /// DeploymentPlan (same namespace) rerun for the unhealthy hosts only.
    pub deployment_plan_ref: LocalObjectReference,
    /// Quiet time after a remediation before the next one (at most 24h).
    #[serde(default = "default_cooldown")]
    #[x_kube(validation = duration_at_most("cooldown", "24h"))]
    pub cooldown: DurationString,
    /// Most remediations started in any hour.
    #[serde(default = "default_max_per_hour")]
    #[schemars(range(min = 1, max = 60))]
    pub max_per_hour: u32,
}

fn default_cooldown() -> DurationString {
    DurationString("15m".into())
}

fn default_max_per_hour() -> u32 {
    4
}

/// Last probe results. Written by the controller only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheckStatus {
    /// `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the last round of probes finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run_at: Option<Time>,
    /// Targets (hosts and endpoints) per state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<HealthSummary>,
    /// Results that are not Healthy, at most 100.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub results: Vec<CheckResult>,
    /// Most recent remediations, newest first, at most 20.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub remediations: Vec<RemediationRecord>,
    /// True while a maintenance window is open (or `maintenance.suspend`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub in_maintenance: bool,
    /// Ready (the probes run) and Degraded (some target is Unhealthy).
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// Targets per state.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthSummary {
    /// Targets whose probes all pass.
    #[serde(default)]
    pub healthy: u32,
    /// Targets with a probe past `failureThreshold`.
    #[serde(default)]
    pub unhealthy: u32,
    /// Targets that could not be probed (unreachable, timeout).
    #[serde(default)]
    pub unknown: u32,
    /// Healthy targets with a value far from its baseline.
    #[serde(default)]
    pub anomalous: u32,
}

/// State of one probe on one target.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ProbeState {
    /// Within its limits.
    Healthy,
    /// Failed `failureThreshold` times in a row.
    Unhealthy,
    /// Could not be probed.
    Unknown,
    /// Within its limits but far from the learned baseline.
    Anomalous,
}

/// One non-healthy probe result.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckResult {
    /// Host name, or endpoint name for endpoints.
    #[schemars(length(max = 63))]
    pub target: String,
    /// Check or endpoint name.
    #[schemars(length(max = 63))]
    pub check: String,
    /// Current state.
    pub state: ProbeState,
    /// Measured value (percent, load per core, latency in ms, days of validity...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// Configured limit the value is compared with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// Learned baseline mean, for Anomalous results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<f64>,
    /// How long the probe took, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// When the target entered this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// Human-readable explanation.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 1024))]
    pub message: String,
}

/// One remediation started.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RemediationRecord {
    /// DeploymentPlan that was rerun.
    #[schemars(length(max = 253))]
    pub plan: String,
    /// Hosts it was rerun for (at most 100 listed).
    #[serde(default)]
    #[schemars(length(max = 100), inner(length(max = 63)))]
    pub hosts: Vec<String>,
    /// When it was started.
    pub at: Time,
}
