//! `ClusterLogPipeline`: the admin's log shipping from node files, cluster-scoped. Tenants
//! ship their pods' logs with a namespaced [`LogPipeline`](super::log_pipeline::LogPipeline).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::DNS1123_LABEL_PATTERN;
use super::log_pipeline::{
    Delivery, ElasticsearchSink, Filter, HttpSink, LogPipelineStatus, LokiSink, Multiline,
    SecretRef, sink_secret,
};

/// An admin's log shipping from node files (syslog, journal exports, apps outside pods) to Loki,
/// Elasticsearch, HTTP or files, with no silent loss. Cluster-scoped, so only who may write
/// cluster objects (RBAC) writes one; its paths stay under the agents' allowed roots
/// (`agent.logRoots`) and its `file:` outputs under `agent.fileOutputDir`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "outrider.dev",
    version = "v1alpha1",
    kind = "ClusterLogPipeline",
    plural = "clusterlogpipelines",
    status = "LogPipelineStatus",
    shortname = "clp",
    category = "outrider",
    doc = "An admin's node log shipping: files under the allowed roots tailed, parsed and enriched by the node agents and shipped to sinks",
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
#[serde(rename_all = "camelCase")]
pub struct ClusterLogPipelineSpec {
    /// Nodes whose agent runs this pipeline; every node when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// Files to tail. Names are unique.
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["name".into()]))]
    pub inputs: Vec<Input>,
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
    /// Sinks; every record goes to every output. Names are unique. A `secretRef` without a
    /// namespace names a Secret of the operator's namespace.
    #[schemars(length(min = 1, max = 8))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["name".into()]))]
    pub outputs: Vec<Output>,
    /// Batching and buffering towards the outputs.
    #[serde(default)]
    pub delivery: Delivery,
}

/// Files tailed on each node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new("self.parser != 'regex' || has(self.pattern)")
        .message("pattern is required when parser is regex")
        .field_path(".pattern"),
    validation = Rule::new("!has(self.pattern) || self.parser == 'regex'")
        .message("pattern is only used with parser regex")
        .field_path(".pattern"),
)]
#[serde(rename_all = "camelCase")]
pub struct Input {
    /// Unique name (DNS-1123 label); recorded as the `input` field and in metrics.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS1123_LABEL_PATTERN))]
    pub name: String,
    /// Absolute paths or globs (`/var/log/app/*.log`) on the node, beneath the agents' allowed
    /// roots.
    #[schemars(
        length(min = 1, max = 32),
        inner(length(min = 1, max = 1024), regex(pattern = r"^/"))
    )]
    pub paths: Vec<String>,
    /// File name globs skipped even when a path matches (`*.gz`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 256)))]
    pub exclude: Vec<String>,
    /// Joins continuation lines (stack traces) to the line that starts a record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiline: Option<Multiline>,
    /// How a line becomes fields.
    #[serde(default)]
    pub parser: Parser,
    /// Regular expression with named groups, for `parser: regex`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub pattern: Option<String>,
}

/// Line parser.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Parser {
    /// The line is the `message` field.
    #[default]
    None,
    /// The line is a JSON object; its keys become fields (`message` when not JSON).
    Json,
    /// `pattern`'s named groups become fields.
    Regex,
    /// Container runtime (CRI) log format; partial lines are joined.
    Cri,
}

/// A sink: exactly one of loki, elasticsearch, http, file or stdout.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("[has(self.loki), has(self.elasticsearch), has(self.http), has(self.file), has(self.stdout)].exists_one(x, x)")
    .message("exactly one of loki, elasticsearch, http, file or stdout must be set"))]
#[serde(rename_all = "camelCase")]
pub struct Output {
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
    /// Appends newline-delimited JSON records to a file on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileSink>,
    /// Writes newline-delimited JSON records to the agent's stdout (debugging).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<StdoutSink>,
}

impl Output {
    /// The sink's Secret, if it names one.
    pub fn secret_ref(&self) -> Option<&SecretRef> {
        sink_secret(
            self.loki.as_ref(),
            self.elasticsearch.as_ref(),
            self.http.as_ref(),
        )
    }
}

/// File sink.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileSink {
    /// Absolute path on the node, beneath the agents' `agent.fileOutputDir`.
    #[schemars(length(min = 2, max = 1024), regex(pattern = r"^/"))]
    pub path: String,
}

/// Stdout sink; takes no settings (`stdout: {}`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct StdoutSink {}
