//! `DeploymentPlan`: staged scripts run over SSH on a fleet (or as in-cluster Jobs), in
//! batches, with a failure budget and a rollback.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{
    DNS1123_LABEL_PATTERN, DurationString, LocalObjectReference, NON_NEGATIVE_INT_OR_PERCENT_RULE,
    POSITIVE_INT_OR_PERCENT_RULE, Targets, conditions_schema, duration_at_most,
};

/// Annotation whose new value starts a new run of a plan without a spec change.
pub const RERUN_ANNOTATION: &str = "outrider.dev/rerun";

/// A staged rollout: stages run host by host in batches; a run stops and rolls back when
/// the failure budget is spent. A plan runs once per `metadata.generation` (or rerun annotation).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "outrider.dev",
    version = "v1alpha1",
    kind = "DeploymentPlan",
    plural = "deploymentplans",
    namespaced,
    status = "DeploymentPlanStatus",
    shortname = "dp",
    category = "outrider",
    doc = "Staged scripts run over SSH on a fleet, or as in-cluster Jobs, in batches with a failure budget",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Batch", type_ = "integer", json_path = ".status.batch.current"),
    printcolumn(name = "Batches", type_ = "integer", json_path = ".status.batch.total"),
    printcolumn(name = "Hosts", type_ = "integer", json_path = ".status.hosts.total"),
    printcolumn(
        name = "Succeeded",
        type_ = "integer",
        json_path = ".status.hosts.succeeded"
    ),
    printcolumn(name = "Failed", type_ = "integer", json_path = ".status.hosts.failed"),
    printcolumn(
        name = "Run",
        type_ = "string",
        json_path = ".status.run",
        priority = 1
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
#[x_kube(validation = Rule::new("!has(self.strategy) || !has(self.strategy.healthCheckRef)")
    .message("spec.strategy.healthCheckRef: health gates are not supported yet")
    .field_path(".strategy.healthCheckRef"))]
#[serde(rename_all = "camelCase")]
pub struct DeploymentPlanSpec {
    /// The Inventory hosts the stages run on.
    pub targets: Targets,
    /// Batching and failure budget of a run.
    #[serde(default)]
    pub strategy: Strategy,
    /// Stages, run in order on every host of a batch (a `runOnce` stage: once per run).
    /// Names are unique.
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["name".into()]))]
    pub stages: Vec<Stage>,
    /// Stages run, in order, on the hosts already changed when the failure budget is spent.
    /// Names are unique.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["name".into()]))]
    pub rollback: Vec<Stage>,
    /// Stops starting new batches while true; hosts already running finish their stage.
    #[serde(default)]
    pub paused: bool,
}

/// How a run is cut into batches and how many failures it tolerates.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Strategy {
    /// Hosts per batch: an integer >= 1 or a percentage of the targets ('25%'), like
    /// Ansible's `serial`. The first batch is the canary.
    #[serde(default = "default_batch_size")]
    #[schemars(extend("maxLength" = 4, "nullable" = false))]
    #[x_kube(validation = Rule::new(POSITIVE_INT_OR_PERCENT_RULE)
        .message("batchSize must be an integer >= 1 or a percentage between 1% and 100%"))]
    pub batch_size: IntOrString,
    /// Hosts worked on concurrently inside a batch.
    #[serde(default = "default_max_parallel")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_parallel: u32,
    /// Failure budget across the whole run: an integer >= 0 or a percentage of the targets.
    /// Exceeding it stops the run and starts the rollback.
    #[serde(default = "default_max_unavailable")]
    #[schemars(extend("maxLength" = 4, "nullable" = false))]
    #[x_kube(validation = Rule::new(NON_NEGATIVE_INT_OR_PERCENT_RULE)
        .message("maxUnavailable must be an integer >= 0 or a percentage between 0% and 100%"))]
    pub max_unavailable: IntOrString,
    /// Wait between two batches, e.g. to watch the canary (at most 24h; `paused` holds a run
    /// for longer).
    #[serde(default = "default_pause")]
    #[x_kube(validation = duration_at_most("pauseBetweenBatches", "24h"))]
    pub pause_between_batches: DurationString,
    /// What to do with a host whose stage was running when the controller was interrupted
    /// (restart, lost leadership): run the stage again, or count the host as failed.
    #[serde(default)]
    pub on_interrupt: OnInterrupt,
    /// Reserved: a HealthCheck that gates each batch. Not supported yet; the API server
    /// rejects it so it is never silently ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_ref: Option<LocalObjectReference>,
}

impl Default for Strategy {
    fn default() -> Self {
        Self {
            batch_size: default_batch_size(),
            max_parallel: default_max_parallel(),
            max_unavailable: default_max_unavailable(),
            pause_between_batches: default_pause(),
            on_interrupt: OnInterrupt::default(),
            health_check_ref: None,
        }
    }
}

fn default_batch_size() -> IntOrString {
    IntOrString::String("25%".into())
}

fn default_max_parallel() -> u32 {
    10
}

fn default_max_unavailable() -> IntOrString {
    IntOrString::Int(0)
}

fn default_pause() -> DurationString {
    DurationString("0s".into())
}

/// One environment variable taken from a Secret key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretEnvVar {
    /// Variable name.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")
    )]
    pub name: String,
    /// The Secret key holding the value.
    pub secret_key_ref: SecretKeyRef,
}

/// A key of a Secret in the object's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name (DNS-1123 subdomain).
    #[schemars(length(min = 1, max = 253), regex(pattern = super::common::DNS1123_SUBDOMAIN_PATTERN))]
    pub name: String,
    /// Key in the Secret's data.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// Handling of a stage interrupted by a controller restart.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum OnInterrupt {
    /// Run the interrupted stage again on that host (stages should be idempotent).
    #[default]
    Rerun,
    /// Mark the host failed (counts against `maxUnavailable`).
    Fail,
}

/// One step of a plan: exactly one of `script`, `command` or `job`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("[has(self.script), has(self.command), has(self.job)].exists_one(x, x)")
    .message("exactly one of script, command or job must be set"))]
#[serde(rename_all = "camelCase")]
pub struct Stage {
    /// Unique name within the list (DNS-1123 label); used in status and Events.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS1123_LABEL_PATTERN))]
    pub name: String,
    /// Shell script run with `sh -s` on the host; the script goes over stdin, never argv.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65536))]
    pub script: Option<String>,
    /// Program and arguments run without a shell (each element passed as one argument).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), inner(length(max = 4096)))]
    pub command: Option<Vec<String>>,
    /// Runs the stage as an in-cluster Job instead of over SSH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobStage>,
    /// Environment variables for the script, command or Job containers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = 64,
        "additionalProperties" = {"type": "string", "maxLength": 4096}
    ))]
    #[x_kube(validation = Rule::new("self.all(k, k.matches('^[A-Za-z_][A-Za-z0-9_]*$'))")
        .message("env names must match [A-Za-z_][A-Za-z0-9_]*"))]
    pub env: BTreeMap<String, String>,
    /// Environment variables whose values come from Secrets in this namespace. The values
    /// reach the host over the SSH session's stdin (Jobs: `valueFrom.secretKeyRef`) and are
    /// never written to status, Events or logs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["name".into()]))]
    pub secret_env: Vec<SecretEnvVar>,
    /// Time limit of one attempt on one host (at most 24h); the process is killed after it.
    #[serde(default = "default_stage_timeout")]
    #[x_kube(validation = duration_at_most("timeout", "24h"))]
    pub timeout: DurationString,
    /// Extra attempts after a failed one (0: a failure is final).
    #[serde(default)]
    #[schemars(range(min = 0, max = 10))]
    pub retries: u32,
    /// Run once per run (on the first target host, or as one Job) instead of on every host.
    #[serde(default)]
    pub run_once: bool,
}

fn default_stage_timeout() -> DurationString {
    DurationString("30m".into())
}

/// A stage run as a Kubernetes Job in the plan's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobStage {
    /// Pod template of the Job (a `PodTemplateSpec`). The schema checks its outline
    /// (containers with name and image, restartPolicy Never or OnFailure); the Job API
    /// validates the rest when the Job is created.
    #[schemars(schema_with = "pod_template_schema")]
    pub template: serde_json::Value,
}

impl JobStage {
    /// The template as a typed `PodTemplateSpec`; an error becomes a `Ready=False` condition.
    pub fn pod_template(&self) -> Result<PodTemplateSpec, serde_json::Error> {
        serde_json::from_value(self.template.clone())
    }
}

/// Schema for a pod template: the outline is validated, everything else is kept as written.
///
/// The full `PodTemplateSpec` schema would make the CRD several hundred KiB and carries
/// list-map keys that are not valid in a CRD structural schema.
fn pod_template_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "required": ["spec"],
        "properties": {
            "metadata": {
                "description": "Labels and annotations of the Job's pods.",
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": true,
            },
            "spec": {
                "description": "A core/v1 PodSpec.",
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": true,
                "required": ["containers"],
                "properties": {
                    "containers": {
                        "description": "Containers of the pod (core/v1 Container).",
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 16,
                        "items": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": true,
                            "required": ["name", "image"],
                            "properties": {
                                "name": {
                                    "description": "Container name (DNS-1123 label).",
                                    "type": "string",
                                    "minLength": 1,
                                    "maxLength": 63,
                                },
                                "image": {
                                    "description": "Container image reference.",
                                    "type": "string",
                                    "minLength": 1,
                                    "maxLength": 1024,
                                },
                            },
                        },
                    },
                    "restartPolicy": {
                        "description": "Never or OnFailure, as a Job requires.",
                        "type": "string",
                        "enum": ["Never", "OnFailure"],
                    },
                },
            },
        },
    })
}

/// Progress of the current run. Written by the controller only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentPlanStatus {
    /// `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Identity of the run this status describes: the generation, plus the value of the
    /// `outrider.dev/rerun` annotation when set. A different value means a new run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub run: Option<String>,
    /// Where the run is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<PlanPhase>,
    /// Batch being worked on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchProgress>,
    /// Host counts per state for this run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<HostCounts>,
    /// Per-stage counts for the stages of `spec.stages`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub stages: Vec<StageProgress>,
    /// Per-stage counts for the stages of `spec.rollback`, once a rollback started.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub rollback: Vec<StageProgress>,
    /// Failed hosts only, at most 100; the full output goes to Events and logs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub failures: Vec<HostFailure>,
    /// When this run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When this run reached Succeeded, Failed or RolledBack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// Internal bookkeeping of the run for a restarted controller: which hosts are done,
    /// failed or mid-way, as index ranges (small for any fleet size). Not for users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "progress_schema")]
    pub progress: Option<serde_json::Value>,
    /// Ready (the run finished successfully), Progressing (a batch is running) and
    /// Failed (the run failed or rolled back).
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// Schema of `status.progress`: an object whose content only the controller interprets.
fn progress_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "Internal resume state of the run (host index ranges); written by the controller only.",
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// Phase of a plan's current run.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PlanPhase {
    /// Accepted, not started (waiting for the Inventory or the SSH Secret).
    Pending,
    /// Batches are being worked on.
    Running,
    /// `spec.paused` is true; no new batch starts.
    Paused,
    /// Every stage succeeded on every target (within the failure budget).
    Succeeded,
    /// The failure budget was spent and there was no rollback, or the rollback failed.
    Failed,
    /// The failure budget was spent and the rollback stages succeeded.
    RolledBack,
}

/// Batch counter.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchProgress {
    /// 1-based number of the batch being worked on.
    #[serde(default)]
    pub current: u32,
    /// Number of batches of the run.
    #[serde(default)]
    pub total: u32,
}

/// Hosts per state.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostCounts {
    /// Target hosts of the run.
    #[serde(default)]
    pub total: u32,
    /// Hosts that completed every stage.
    #[serde(default)]
    pub succeeded: u32,
    /// Hosts with a failed stage.
    #[serde(default)]
    pub failed: u32,
    /// Hosts with a stage in progress.
    #[serde(default)]
    pub running: u32,
    /// Hosts not started yet.
    #[serde(default)]
    pub pending: u32,
}

/// Counts for one stage.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StageProgress {
    /// Stage name.
    #[schemars(length(max = 63))]
    pub name: String,
    /// Hosts (or Jobs) on which the stage succeeded.
    #[serde(default)]
    pub succeeded: u32,
    /// Hosts (or Jobs) on which the stage failed after its retries.
    #[serde(default)]
    pub failed: u32,
}

/// Why one host failed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostFailure {
    /// Inventory host name.
    #[schemars(length(max = 63))]
    pub host: String,
    /// Stage that failed.
    #[schemars(length(max = 63))]
    pub stage: String,
    /// CamelCase cause: NonZeroExit (with exitCode or signal), TimedOut, Unreachable,
    /// HostKeyUnknown, HostKeyMismatch, AuthFailed, BecomeFailed, Interrupted or Other.
    #[schemars(length(max = 64))]
    pub reason: String,
    /// Exit status of the last attempt, when the process exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Signal that ended the last attempt (e.g. `KILL`), when it was killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub signal: Option<String>,
    /// Attempts made (1 + retries used).
    #[serde(default)]
    pub attempts: u32,
    /// Last bytes of stdout and stderr of the last attempt (at most 2048 characters).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 2048))]
    pub output_tail: String,
    /// When the last attempt ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
}
