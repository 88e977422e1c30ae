//! The agent's Prometheus metrics, registered in the process registry that
//! [`crate::telemetry::serve`] exposes on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of per-input metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InputLabels {
    pub pipeline: String,
    pub input: String,
}

/// Labels of refusals: the pipeline (and input, `""` for a whole pipeline) and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub pipeline: String,
    pub input: String,
    pub reason: String,
}

/// Labels of per-output metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutputLabels {
    pub pipeline: String,
    pub output: String,
}

/// Labels of per-pipeline metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PipelineLabels {
    pub pipeline: String,
}

/// Labels of dead-letter metrics: the pipeline and the file's name (one per output, and
/// `<pipeline>.spool.ndjson` for the disk buffer's bad frames).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeadLetterLabels {
    pub pipeline: String,
    pub file: String,
}

/// Labels of disk-buffer frame checks: `reason` is `checksum` (CRC32C mismatch or a
/// length that cannot be right), `record` (the payload is not a record), `too_large`
/// (a record bigger than the maximum frame, never written) or `missing` (a segment file
/// is gone).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpoolFrameLabels {
    pub pipeline: String,
    pub reason: String,
}

/// Labels of disk-buffer task restarts: `task` is `writer` or `reader`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpoolTaskLabels {
    pub pipeline: String,
    pub task: String,
}

/// Label of the configuration an agent runs: `sha256:<hex>` of its `agent.yaml`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfigLabel {
    pub hash: String,
}

/// Label of config reload results (`ok`, `invalid`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

/// Every agent metric. Cheap to clone.
#[derive(Clone, Default)]
pub struct AgentMetrics {
    pub lines_read: Family<InputLabels, Counter>,
    pub bytes_read: Family<InputLabels, Counter>,
    pub lines_truncated: Family<InputLabels, Counter>,
    pub parse_errors: Family<InputLabels, Counter>,
    pub files_open: Family<InputLabels, Gauge>,
    pub truncations: Family<InputLabels, Counter>,
    pub files_refused: Family<RefusedLabels, Counter>,
    pub pipelines_refused: Family<RefusedLabels, Counter>,
    pub scans_capped: Family<InputLabels, Counter>,
    pub checkpoints_set_aside: Family<PipelineLabels, Counter>,
    pub records_shipped: Family<OutputLabels, Counter>,
    pub records_failed: Family<OutputLabels, Counter>,
    pub records_retried: Family<OutputLabels, Counter>,
    pub records_dead_lettered: Family<OutputLabels, Counter>,
    pub records_duplicate: Family<OutputLabels, Counter>,
    pub checkpoint_lag_bytes: Family<PipelineLabels, Gauge>,
    pub buffer_bytes: Family<PipelineLabels, Gauge>,
    pub buffer_capacity_bytes: Family<PipelineLabels, Gauge>,
    pub config_reloads: Family<ResultLabel, Counter>,
    pub config_info: Family<ConfigLabel, Gauge>,
    pub dead_letter_dropped: Family<DeadLetterLabels, Counter>,
    pub spool_bad_frames: Family<SpoolFrameLabels, Counter>,
    pub spool_bad_bytes: Family<PipelineLabels, Counter>,
    pub spool_restarts: Family<SpoolTaskLabels, Counter>,
}

impl AgentMetrics {
    /// Creates the metrics and registers them under `outrider_agent_`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("outrider_agent");
        r.register("lines_read", "Lines read, per input", m.lines_read.clone());
        r.register(
            "config_info",
            "1 for the hash of the agent.yaml this agent runs (what the controller scrapes for rollout status)",
            m.config_info.clone(),
        );
        r.register(
            "files_refused",
            "Paths an input matched but may not read (symlink, outside the allowed roots, not a regular file), each counted once",
            m.files_refused.clone(),
        );
        r.register(
            "pipelines_refused",
            "Pipelines not started, per reason (a path outside the allowed roots, a bad Secret, ...)",
            m.pipelines_refused.clone(),
        );
        r.register(
            "checkpoints_set_aside",
            "Corrupt checkpoint files moved aside (the pipeline read its files again from the start)",
            m.checkpoints_set_aside.clone(),
        );
        r.register(
            "scans_capped",
            "Scans of an input that stopped at --max-files-per-input matches",
            m.scans_capped.clone(),
        );
        r.register(
            "bytes_read",
            "File bytes read, per input",
            m.bytes_read.clone(),
        );
        r.register(
            "lines_truncated",
            "Lines cut at the maximum line size, per input",
            m.lines_truncated.clone(),
        );
        r.register(
            "parse_errors",
            "Lines the parser could not parse (shipped raw), per input",
            m.parse_errors.clone(),
        );
        r.register(
            "files_open",
            "Files being tailed, per input",
            m.files_open.clone(),
        );
        r.register(
            "truncations",
            "Files found truncated (copytruncate) and re-read from 0, per input",
            m.truncations.clone(),
        );
        r.register(
            "records_shipped",
            "Records acknowledged by the output, per output",
            m.records_shipped.clone(),
        );
        r.register(
            "records_failed",
            "Records in failed delivery attempts, per output",
            m.records_failed.clone(),
        );
        r.register(
            "records_retried",
            "Records sent again after a retryable failure, per output",
            m.records_retried.clone(),
        );
        r.register(
            "records_dead_lettered",
            "Records the output rejected for good, written to the dead-letter file (unless it is full: dead_letter_dropped), per output",
            m.records_dead_lettered.clone(),
        );
        r.register(
            "records_duplicate",
            "Records the output already had (Elasticsearch 409 on create), counted delivered",
            m.records_duplicate.clone(),
        );
        r.register(
            "checkpoint_lag_bytes",
            "File bytes read but not yet acknowledged by every output (not checkpointed)",
            m.checkpoint_lag_bytes.clone(),
        );
        r.register(
            "buffer_bytes",
            "Bytes held in the pipeline buffer, in-flight batch included",
            m.buffer_bytes.clone(),
        );
        r.register(
            "buffer_capacity_bytes",
            "Capacity of the pipeline buffer",
            m.buffer_capacity_bytes.clone(),
        );
        r.register(
            "config_reloads",
            "Configuration reloads, per result (ok, invalid)",
            m.config_reloads.clone(),
        );
        r.register(
            "dead_letter_dropped",
            "Records not written to a dead-letter file: it and its .1 are at --dead-letter-max-bytes, or the write failed",
            m.dead_letter_dropped.clone(),
        );
        r.register(
            "spool_bad_frames",
            "Disk buffer frames skipped (dead-lettered to <pipeline>.spool.ndjson), per reason (checksum, record, too_large, missing)",
            m.spool_bad_frames.clone(),
        );
        r.register(
            "spool_bad_bytes",
            "Disk buffer bytes skipped as bad frames",
            m.spool_bad_bytes.clone(),
        );
        r.register(
            "spool_restarts",
            "Disk buffer writer/reader restarts after an I/O error, per task",
            m.spool_restarts.clone(),
        );
        m
    }

    pub fn input(pipeline: &str, input: &str) -> InputLabels {
        InputLabels {
            pipeline: pipeline.into(),
            input: input.into(),
        }
    }

    pub fn output(pipeline: &str, output: &str) -> OutputLabels {
        OutputLabels {
            pipeline: pipeline.into(),
            output: output.into(),
        }
    }

    pub fn dead_letter(pipeline: &str, file: &str) -> DeadLetterLabels {
        DeadLetterLabels {
            pipeline: pipeline.into(),
            file: file.into(),
        }
    }

    pub fn spool_frame(pipeline: &str, reason: &str) -> SpoolFrameLabels {
        SpoolFrameLabels {
            pipeline: pipeline.into(),
            reason: reason.into(),
        }
    }

    pub fn spool_task(pipeline: &str, task: &str) -> SpoolTaskLabels {
        SpoolTaskLabels {
            pipeline: pipeline.into(),
            task: task.into(),
        }
    }

    pub fn pipeline(pipeline: &str) -> PipelineLabels {
        PipelineLabels {
            pipeline: pipeline.into(),
        }
    }
}
