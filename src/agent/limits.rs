//! The cluster admin's caps on what one pipeline may ask of a node (chart `agent.limits`,
//! agent flags `--max-memory-buffer`, `--max-disk-buffer`, `--max-batch-bytes`,
//! `--max-batch-events`, and the controller's `--agent-max-*` copies). Any namespace may
//! write a LogPipeline, so its buffer and batch sizes are untrusted input: without a cap one
//! tenant's `buffer.maxSize: 100Gi` takes the node's memory or disk from everyone else.
//!
//! The same [`check_limits`] runs in the controller (the pipeline is `Ready=False`, reason
//! `LimitExceeded`, and is not rendered) and in the agent (the pipeline is refused at start,
//! counted in `outrider_agent_pipelines_refused{reason="limit_exceeded"}`, and the other
//! pipelines run), so a pipeline given to the agent directly (`--pipeline`) meets it too.

use super::AgentError;
use super::config::{Pipeline, parse_byte_size};

/// Default cap of a memory buffer, `64Mi`: the chart gives the agent container a 128Mi
/// memory limit and the agent itself peaks near 42 MiB (README, `make bench-agent`), so a
/// larger buffer would get the agent OOM-killed, stopping every pipeline on the node.
pub const DEFAULT_MAX_MEMORY_BUFFER: &str = "64Mi";
/// Default cap of a disk buffer, `1Gi`: the spool lives on the node's root filesystem next to
/// images and other Pods' logs, where kubelet starts evicting Pods when free space runs
/// low; 1Gi rides out minutes to hours of an output's outage at typical rates and stays
/// small beside a node disk. Admins with a dedicated state volume raise it.
pub const DEFAULT_MAX_DISK_BUFFER: &str = "1Gi";
/// Default cap of a batch, `8Mi` (eight times the CRD default): a batch is encoded in
/// memory for every output and up to `--batches-in-flight` of them are on the wire at once,
/// so the batch size multiplies into the agent's memory beyond the buffer.
pub const DEFAULT_MAX_BATCH_BYTES: &str = "8Mi";
/// Default cap of records per batch: the CRD's own maximum, so it restricts nothing until
/// an admin lowers it (for a store that refuses large bulk requests).
pub const DEFAULT_MAX_BATCH_EVENTS: usize = 100_000;

/// The caps, in bytes and records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// `buffer.maxSize` of a `type: memory` buffer.
    pub max_memory_buffer_bytes: usize,
    /// `buffer.maxSize` of a `type: disk` buffer.
    pub max_disk_buffer_bytes: usize,
    /// `batch.maxBytes`.
    pub max_batch_bytes: usize,
    /// `batch.maxEvents`.
    pub max_batch_events: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_memory_buffer_bytes: 64 << 20,
            max_disk_buffer_bytes: 1 << 30,
            max_batch_bytes: 8 << 20,
            max_batch_events: DEFAULT_MAX_BATCH_EVENTS,
        }
    }
}

/// Checks a validated pipeline against the caps: `Err((field, why))`, the message naming
/// the value asked for, the cap, and where the admin sets it.
pub fn check_limits(p: &Pipeline, l: &Limits) -> Result<(), (String, String)> {
    let delivery = p.delivery();
    let (cap, kind, value, flag) = if p.disk_buffer {
        (
            l.max_disk_buffer_bytes,
            "disk",
            "diskBuffer",
            "max-disk-buffer",
        )
    } else {
        (
            l.max_memory_buffer_bytes,
            "memory",
            "memoryBuffer",
            "max-memory-buffer",
        )
    };
    if p.buffer_bytes > cap {
        return Err((
            "spec.delivery.buffer.maxSize".into(),
            over(&delivery.buffer.max_size, &size(cap), kind, value, flag),
        ));
    }
    if p.batch.max_bytes > l.max_batch_bytes {
        return Err((
            "spec.delivery.batch.maxBytes".into(),
            over(
                &delivery.batch.max_bytes,
                &size(l.max_batch_bytes),
                "batch",
                "batchBytes",
                "max-batch-bytes",
            ),
        ));
    }
    if p.batch.max_events > l.max_batch_events {
        return Err((
            "spec.delivery.batch.maxEvents".into(),
            over(
                &delivery.batch.max_events.to_string(),
                &l.max_batch_events.to_string(),
                "batch",
                "batchEvents",
                "max-batch-events",
            ),
        ));
    }
    Ok(())
}

/// The refusal message: what was asked, the cap, and the chart value and agent flag that set it.
fn over(asked: &str, cap: &str, kind: &str, value: &str, flag: &str) -> String {
    format!(
        "{asked} is over the node agents' {kind} cap of {cap} (set by the cluster admin: chart agent.limits.{value}, agent flag --{flag})"
    )
}

/// The agent's side of [`check_limits`]: a refusal naming the pipeline and the field.
pub fn refuse_over_limits(p: &Pipeline, l: &Limits) -> Result<(), AgentError> {
    check_limits(p, l).map_err(|(field, message)| AgentError::LimitExceeded {
        pipeline: p.key.clone(),
        field,
        message,
    })
}

/// A cap flag's value: a byte size like `64Mi` (the CRD's size syntax), above zero.
pub fn parse_cap(s: &str) -> Result<usize, String> {
    match parse_byte_size(s) {
        Some(0) => Err(format!("{s:?}: a cap of 0 would refuse every pipeline")),
        Some(n) => Ok(n),
        None => Err(format!("{s:?} is not a size like 1048576, 64Ki or 1Mi")),
    }
}

/// A records-per-batch cap flag's value: a whole number above zero.
pub fn parse_event_cap(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err(format!("{s:?}: a cap of 0 would refuse every pipeline")),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

/// `bytes` in the largest binary unit that divides it (`64Mi`), else plain bytes.
fn size(bytes: usize) -> String {
    for (shift, unit) in [(40, "Ti"), (30, "Gi"), (20, "Mi"), (10, "Ki")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::config::{ClusterPipelineEntry, Sources, validate_cluster};

    fn pipeline(delivery: &str) -> Pipeline {
        let yaml = format!(
            r#"
inputs: [{{name: app, paths: ["/var/log/app/*.log"]}}]
outputs: [{{name: out, http: {{url: "http://127.0.0.1:9/ingest"}}}}]
delivery: {delivery}
"#
        );
        validate_cluster(
            ClusterPipelineEntry {
                name: "shop".into(),
                spec: serde_yaml::from_str(&yaml).unwrap(),
            },
            &Sources::default(),
        )
        .unwrap()
    }

    #[test]
    fn defaults_match_their_documented_sizes() {
        let l = Limits::default();
        assert_eq!(
            Some(l.max_memory_buffer_bytes),
            parse_byte_size(DEFAULT_MAX_MEMORY_BUFFER)
        );
        assert_eq!(
            Some(l.max_disk_buffer_bytes),
            parse_byte_size(DEFAULT_MAX_DISK_BUFFER)
        );
        assert_eq!(
            Some(l.max_batch_bytes),
            parse_byte_size(DEFAULT_MAX_BATCH_BYTES)
        );
    }

    #[test]
    fn the_crd_defaults_are_within_the_default_caps() {
        assert_eq!(check_limits(&pipeline("{}"), &Limits::default()), Ok(()));
    }

    #[test]
    fn a_memory_buffer_over_its_cap_is_refused_naming_field_value_and_cap() {
        let p = pipeline("{buffer: {maxSize: 65Mi}}");
        let (field, why) = check_limits(&p, &Limits::default()).unwrap_err();
        assert_eq!(field, "spec.delivery.buffer.maxSize");
        assert!(why.starts_with("65Mi is over"), "{why}");
        assert!(why.contains("memory cap of 64Mi"), "{why}");
        assert!(why.contains("agent.limits.memoryBuffer"), "{why}");
        assert!(why.contains("--max-memory-buffer"), "{why}");
        assert_eq!(
            check_limits(&pipeline("{buffer: {maxSize: 64Mi}}"), &Limits::default()),
            Ok(())
        );
    }

    #[test]
    fn a_disk_buffer_is_held_to_the_disk_cap_not_the_memory_one() {
        let l = Limits::default();
        assert_eq!(
            check_limits(&pipeline("{buffer: {type: disk, maxSize: 1Gi}}"), &l),
            Ok(())
        );
        let (field, why) =
            check_limits(&pipeline("{buffer: {type: disk, maxSize: 2Gi}}"), &l).unwrap_err();
        assert_eq!(field, "spec.delivery.buffer.maxSize");
        assert!(why.contains("disk cap of 1Gi"), "{why}");
        assert!(why.contains("--max-disk-buffer"), "{why}");
    }

    #[test]
    fn batch_bytes_and_events_over_their_caps_are_refused() {
        let l = Limits {
            max_batch_events: 500,
            ..Limits::default()
        };
        let (field, why) = check_limits(
            &pipeline("{batch: {maxBytes: 9Mi}, buffer: {maxSize: 16Mi}}"),
            &l,
        )
        .unwrap_err();
        assert_eq!(field, "spec.delivery.batch.maxBytes");
        assert!(why.contains("batch cap of 8Mi"), "{why}");
        assert!(why.contains("--max-batch-bytes"), "{why}");
        let (field, why) = check_limits(&pipeline("{batch: {maxEvents: 501}}"), &l).unwrap_err();
        assert_eq!(field, "spec.delivery.batch.maxEvents");
        assert!(why.contains("501 is over"), "{why}");
        assert!(why.contains("cap of 500"), "{why}");
        assert!(why.contains("agent.limits.batchEvents"), "{why}");
    }

    #[test]
    fn the_agent_refusal_names_pipeline_and_field() {
        let err = refuse_over_limits(&pipeline("{buffer: {maxSize: 65Mi}}"), &Limits::default())
            .unwrap_err();
        assert!(matches!(err, AgentError::LimitExceeded { .. }));
        let text = err.to_string();
        assert!(
            text.starts_with("pipeline shop: spec.delivery.buffer.maxSize: 65Mi is over"),
            "{text}"
        );
    }

    #[test]
    fn cap_flags_parse_sizes_and_refuse_zero_and_garbage() {
        assert_eq!(parse_cap("64Mi"), Ok(64 << 20));
        assert_eq!(parse_cap("1G"), Ok(1_000_000_000));
        assert!(parse_cap("0").unwrap_err().contains("refuse every"));
        assert!(parse_cap("lots").is_err());
        assert_eq!(parse_event_cap("500"), Ok(500));
        assert!(parse_event_cap("0").is_err());
        assert!(parse_event_cap("5k").is_err());
    }

    #[test]
    fn sizes_print_in_the_largest_unit_that_divides() {
        assert_eq!(size(64 << 20), "64Mi");
        assert_eq!(size(1 << 30), "1Gi");
        assert_eq!(size(1536), "1536");
        assert_eq!(size(3 << 10), "3Ki");
        assert_eq!(size(1_000_000), "1000000");
    }
}
