//! `LogPipeline` (a tenant's: its own namespace's container logs, selected by pod labels) and
//! the pieces it shares with the admin's cluster-scoped
//! [`ClusterLogPipeline`](super::cluster_log_pipeline::ClusterLogPipeline): multiline joining,
//! parsers, filters, sinks, delivery and status.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{
    BYTE_SIZE_PATTERN, DNS1123_LABEL_PATTERN, DNS1123_SUBDOMAIN_PATTERN, DurationString,
    URL_PATTERN, conditions_schema, duration_at_most,
};

/// A tenant's log shipping: the container logs of pods it selects in its own namespace, parsed
/// and enriched by the node agents and shipped to Loki, Elasticsearch or HTTP with no silent
/// loss. It names pods, never paths: the agent derives `/var/log/pods/<ns>_<pod>_<uid>/...`
/// itself, so one namespace can never read another's logs or a node's files.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "outrider.dev",
    version = "v1alpha1",
    kind = "LogPipeline",
    plural = "logpipelines",
    namespaced,
    status = "LogPipelineStatus",
    shortname = "lp",
    category = "outrider",
    doc = "A namespace's container log shipping: pods selected by label, parsed and enriched by the node agents and shipped to sinks",
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.nodes.desired"
    ),
    printcolumn(
        name = "Nodes-Ready",
        type_ = "integer",
        json_path = ".status.nodes.ready"
    ),
    printcolumn(
        name = "Updated",
        type_ = "integer",
        json_path = ".status.nodes.updated"
    ),
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
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new("self.parser != 'regex' || has(self.pattern)")
        .message("pattern is required when parser is regex")
        .field_path(".pattern"),
    validation = Rule::new("!has(self.pattern) || self.parser == 'regex'")
        .message("pattern is only used with parser regex")
        .field_path(".pattern"),
)]
#[serde(rename_all = "camelCase")]
pub struct LogPipelineSpec {
    /// The pods (of this namespace only) whose container logs are shipped.
    pub pods: PodSelection,
    /// Joins continuation lines (stack traces) to the line that starts a record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiline: Option<Multiline>,
    /// How a container's log line becomes fields; the container runtime's (CRI) framing is
    /// removed first, and partial lines are joined.
    #[serde(default)]
    pub parser: PodParser,
    /// Regular expression with named groups, for `parser: regex`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub pattern: Option<String>,
    /// Fields added to every record (values may not be overridden by the log line).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = 32,
        "additionalProperties" = {"type": "string", "maxLength": 1024}
    ))]
    #[x_kube(validation = Rule::new("self.all(k, size(k) <= 63 && k.matches('^[A-Za-z_][A-Za-z0-9_.]*$'))")
        .message("field names must match [A-Za-z_][A-Za-z0-9_.]* (at most 63 characters)"))]
    pub fields: BTreeMap<String, String>,
    /// Filters applied in order; a record must pass every one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub filters: Vec<Filter>,
    /// Sinks; every record goes to every output. Names are unique. Secrets come from this
    /// namespace.
    #[schemars(length(min = 1, max = 8))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["name".into()]))]
    pub outputs: Vec<PodOutput>,
    /// Batching and buffering towards the outputs.
    #[serde(default)]
    pub delivery: Delivery,
}

/// Pods of the pipeline's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodSelection {
    /// Label selector over the namespace's pods (`{}` selects every pod).
    pub selector: LabelSelector,
    /// Containers shipped; every container of a selected pod when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 16),
        inner(length(min = 1, max = 63), regex(pattern = DNS1123_LABEL_PATTERN))
    )]
    pub containers: Vec<String>,
}

/// How a container log line (after the CRI framing) becomes fields.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PodParser {
    /// The line is the `message` field.
    #[default]
    None,
    /// The line is a JSON object; its keys become fields (`message` when not JSON).
    Json,
    /// `pattern`'s named groups become fields.
    Regex,
}

/// A tenant's sink: exactly one of loki, elasticsearch or http (files on the node are the
/// admin's, in a ClusterLogPipeline).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new("[has(self.loki), has(self.elasticsearch), has(self.http)].exists_one(x, x)")
        .message("exactly one of loki, elasticsearch or http must be set"),
    validation = Rule::new("[has(self.loki) && has(self.loki.secretRef) && has(self.loki.secretRef.__namespace__), has(self.elasticsearch) && has(self.elasticsearch.secretRef) && has(self.elasticsearch.secretRef.__namespace__), has(self.http) && has(self.http.secretRef) && has(self.http.secretRef.__namespace__)].all(x, !x)")
        .message("secretRef.namespace is not allowed: a LogPipeline reads Secrets of its own namespace only"),
)]
#[serde(rename_all = "camelCase")]
pub struct PodOutput {
    /// Unique name (DNS-1123 label); used in metrics and checkpoints.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS1123_LABEL_PATTERN))]
    pub name: String,
    /// Grafana Loki push API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loki: Option<LokiSink>,
    /// Elasticsearch bulk API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elasticsearch: Option<ElasticsearchSink>,
    /// Generic HTTP POST of newline-delimited JSON records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSink>,
}

impl PodOutput {
    /// The sink's Secret, if it names one.
    pub fn secret_ref(&self) -> Option<&SecretRef> {
        sink_secret(
            self.loki.as_ref(),
            self.elasticsearch.as_ref(),
            self.http.as_ref(),
        )
    }
}

/// The Secret of whichever sink is set.
pub(crate) fn sink_secret<'a>(
    loki: Option<&'a LokiSink>,
    es: Option<&'a ElasticsearchSink>,
    http: Option<&'a HttpSink>,
) -> Option<&'a SecretRef> {
    loki.and_then(|s| s.secret_ref.as_ref())
        .or_else(|| es.and_then(|s| s.secret_ref.as_ref()))
        .or_else(|| http.and_then(|s| s.secret_ref.as_ref()))
}

/// The Secret a sink reads its credentials and TLS material from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Secret name (a DNS-1123 subdomain).
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS1123_SUBDOMAIN_PATTERN))]
    pub name: String,
    /// ClusterLogPipeline only: the Secret's namespace (the operator's namespace when
    /// absent). A LogPipeline always reads its own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS1123_LABEL_PATTERN))]
    pub namespace: Option<String>,
}

/// Multiline joining.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Multiline {
    /// Regular expression matching the first line of a record.
    #[schemars(length(min = 1, max = 1024))]
    pub start_pattern: String,
    /// A pending record is emitted when no line followed for this long (at most 5m).
    #[serde(default = "default_flush_timeout")]
    #[x_kube(validation = duration_at_most("flushTimeout", "5m"))]
    pub flush_timeout: DurationString,
}

fn default_flush_timeout() -> DurationString {
    DurationString("1s".into())
}

/// A filter: exactly one of include or exclude.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("has(self.include) != has(self.exclude)")
    .message("exactly one of include or exclude must be set"))]
#[serde(rename_all = "camelCase")]
pub struct Filter {
    /// Keep only records that match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include: Option<RecordMatch>,
    /// Drop records that match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude: Option<RecordMatch>,
}

/// A regular expression tested against one field.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecordMatch {
    /// Field tested; the `message` field when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub field: Option<String>,
    /// Regular expression (unanchored).
    #[schemars(length(min = 1, max = 1024))]
    pub pattern: String,
}

/// Loki sink.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = super::output_tls::replace_roots_needs_secret())]
#[serde(rename_all = "camelCase")]
pub struct LokiSink {
    /// Base URL (`/loki/api/v1/push` is appended).
    #[schemars(length(min = 1, max = 2048), regex(pattern = URL_PATTERN))]
    pub url: String,
    /// Stream labels; values may use `{{field}}` templates (`{{node}}`, `{{service}}`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = 16,
        "additionalProperties" = {"type": "string", "maxLength": 256}
    ))]
    #[x_kube(validation = Rule::new("self.all(k, size(k) <= 63 && k.matches('^[A-Za-z_][A-Za-z0-9_]*$'))")
        .message("label names must match [A-Za-z_][A-Za-z0-9_]* (at most 63 characters)"))]
    pub labels: BTreeMap<String, String>,
    /// Tenant sent as `X-Scope-OrgID` (multi-tenant Loki).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub tenant_id: Option<String>,
    /// Push body encoding: `json` (default) or `protobuf` (snappy-compressed logproto).
    #[serde(default)]
    pub encoding: LokiEncoding,
    /// Secret with `username` and `password` (basic auth) or `token` (bearer), and/or TLS
    /// material: `ca.crt` (PEM CAs trusted besides the public roots), `tls.crt` + `tls.key`
    /// (client certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    /// Send the Secret's credentials over plain `http://` (sniffable on the way). Off: an
    /// output whose Secret holds credentials must use `https://`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_allow_http_credentials: bool,
    /// Server certificate verification (`replaceRoots`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<super::output_tls::TlsSettings>,
}

/// How the Loki push request is encoded.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LokiEncoding {
    /// `application/json` push body.
    #[default]
    Json,
    /// `application/x-protobuf`: snappy-compressed logproto `PushRequest` (smaller, and what
    /// Loki's own clients send).
    Protobuf,
}

/// Elasticsearch sink.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = super::output_tls::replace_roots_needs_secret())]
#[serde(rename_all = "camelCase")]
pub struct ElasticsearchSink {
    /// Base URL (`/_bulk` is appended).
    #[schemars(length(min = 1, max = 2048), regex(pattern = URL_PATTERN))]
    pub url: String,
    /// Index (or data stream) written to.
    #[schemars(
        length(min = 1, max = 255),
        regex(pattern = r"^[a-z0-9][a-z0-9._+-]*$")
    )]
    pub index: String,
    /// Secret with `username` and `password` (basic auth) or `apiKey`, and/or TLS material:
    /// `ca.crt` (PEM CAs trusted besides the public roots), `tls.crt` + `tls.key` (client
    /// certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    /// Send the Secret's credentials over plain `http://` (sniffable on the way). Off: an
    /// output whose Secret holds credentials must use `https://`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_allow_http_credentials: bool,
    /// Server certificate verification (`replaceRoots`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<super::output_tls::TlsSettings>,
}

/// Generic HTTP sink.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = super::output_tls::replace_roots_needs_secret())]
#[serde(rename_all = "camelCase")]
pub struct HttpSink {
    /// URL that receives each batch as a POST of `application/x-ndjson`.
    #[schemars(length(min = 1, max = 2048), regex(pattern = URL_PATTERN))]
    pub url: String,
    /// Secret with `username` and `password` (basic auth) or `token` (bearer), and/or TLS
    /// material: `ca.crt` (PEM CAs trusted besides the public roots), `tls.crt` + `tls.key`
    /// (client certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    /// Send the Secret's credentials over plain `http://` (sniffable on the way). Off: an
    /// output whose Secret holds credentials must use `https://`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_allow_http_credentials: bool,
    /// Server certificate verification (`replaceRoots`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<super::output_tls::TlsSettings>,
}

/// Batching and buffering.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    /// When a batch is sent: whichever limit is reached first.
    #[serde(default)]
    pub batch: BatchSettings,
    /// Records waiting for the outputs.
    #[serde(default)]
    pub buffer: BufferSettings,
}

/// Batch limits.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchSettings {
    /// Most records per batch.
    #[serde(default = "default_max_events")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_events: u32,
    /// Most bytes per batch (`1Mi`).
    #[serde(default = "default_max_bytes")]
    #[schemars(length(min = 1, max = 16), regex(pattern = BYTE_SIZE_PATTERN))]
    pub max_bytes: String,
    /// Longest a record waits for its batch to fill (at most 5m).
    #[serde(default = "default_max_wait")]
    #[x_kube(validation = duration_at_most("maxWait", "5m"))]
    pub max_wait: DurationString,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            max_events: default_max_events(),
            max_bytes: default_max_bytes(),
            max_wait: default_max_wait(),
        }
    }
}

fn default_max_events() -> u32 {
    1000
}

fn default_max_bytes() -> String {
    "1Mi".into()
}

fn default_max_wait() -> DurationString {
    DurationString("1s".into())
}

/// Buffer between the readers and the outputs. When full, reading pauses (backpressure);
/// records are never dropped silently.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BufferSettings {
    /// Where buffered records live.
    #[serde(default, rename = "type")]
    pub type_: BufferType,
    /// Buffer capacity (`512Mi`). The default (16Mi) holds tens of thousands of records in
    /// memory; give a `disk` buffer room for the outage it should ride out.
    #[serde(default = "default_buffer_size")]
    #[schemars(length(min = 1, max = 16), regex(pattern = BYTE_SIZE_PATTERN))]
    pub max_size: String,
}

impl Default for BufferSettings {
    fn default() -> Self {
        Self {
            type_: BufferType::default(),
            max_size: default_buffer_size(),
        }
    }
}

fn default_buffer_size() -> String {
    "16Mi".into()
}

/// Buffer medium.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BufferType {
    /// In the agent's memory: lost on agent restart, re-read from the checkpoint.
    #[default]
    Memory,
    /// On the node's disk under the agent's state directory: survives restarts.
    Disk,
}

/// Rollout state of the pipeline on the nodes. Written by the controller only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LogPipelineStatus {
    /// `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `sha256:<hex>` of the rendered agent configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 80))]
    pub config_hash: Option<String>,
    /// Agent nodes per state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodeCounts>,
    /// Ready (every selected node ships with the current configuration), Progressing and
    /// Degraded (an output is failing).
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// Agent nodes per state.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCounts {
    /// Nodes the pipeline runs on that run an agent.
    #[serde(default)]
    pub desired: u32,
    /// Agents shipping without errors.
    #[serde(default)]
    pub ready: u32,
    /// Agents running the configuration with the current `configHash`.
    #[serde(default)]
    pub updated: u32,
}
