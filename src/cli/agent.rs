//! `outrider agent`: the node log shipper. Runs the pipelines of the controller-rendered
//! `agent.yaml` (`--config`), or LogPipeline manifests directly (`--pipeline`, no cluster),
//! and serves /metrics /healthz /readyz.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use outrider::agent::config::{self, parse_byte_size};
use outrider::agent::confine::Confinement;
use outrider::agent::limits::{self, Limits};
use outrider::agent::metrics::AgentMetrics;
use outrider::agent::pipeline::AgentEnv;
use outrider::agent::run::{self, AgentOptions, ConfigSource};
use outrider::agent::sink::Backoff;
use outrider::agent::tail::TailOptions;
use outrider::api::common::DurationString;
use outrider::telemetry::{self, Readiness};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

#[derive(Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["config", "pipeline"])))]
pub struct AgentArgs {
    /// Agent configuration rendered by the controller (`agent.yaml` from the ConfigMap).
    #[arg(long, env = "OUTRIDER_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// A LogPipeline manifest to run directly, without a cluster (repeatable).
    #[arg(long)]
    pipeline: Vec<PathBuf>,
    /// Directory for checkpoints and dead-letter files (a hostPath in a DaemonSet).
    #[arg(
        long,
        env = "OUTRIDER_STATE_DIR",
        default_value = "/var/lib/outrider-agent"
    )]
    state_dir: PathBuf,
    /// This node's name, added to every record as `node`.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Mounted Secrets, as `<dir>/<namespace>/<name>/<key>` files.
    #[arg(long, env = "OUTRIDER_SECRET_DIR")]
    secret_dir: Option<PathBuf>,
    /// Directories inputs may read beneath (repeatable; the chart's `agent.allowedPaths`).
    /// Globs must start below one; files are opened without following any symlink; /proc,
    /// /sys, /dev, Secret volumes, the state and the secret directory are never read.
    #[arg(
        long = "allowed-root",
        env = "OUTRIDER_AGENT_ALLOWED_ROOTS",
        value_delimiter = ',',
        default_value = "/var/log",
        value_parser = allowed_root
    )]
    allowed_roots: Vec<PathBuf>,
    /// The only directory `file:` outputs may write beneath (unset: `file:` is refused).
    #[arg(long, env = "OUTRIDER_AGENT_FILE_OUTPUT_DIR", value_parser = allowed_root)]
    file_output_dir: Option<PathBuf>,
    /// Where the kubelet keeps pod logs: a LogPipeline reads
    /// `<root>/<namespace>_<pod>_<uid>/<container>/*.log` of its selected pods only.
    #[arg(long, env = "OUTRIDER_AGENT_POD_LOG_ROOT", default_value = config::POD_LOG_ROOT, value_parser = allowed_root)]
    pod_log_root: PathBuf,
    /// Namespace of a ClusterLogPipeline `secretRef` that names none (the operator's; the
    /// controller fills it in, this is for `--pipeline` manifests).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    secret_namespace: String,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "OUTRIDER_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// gzip request bodies of the HTTP, Loki and Elasticsearch outputs.
    #[arg(long, env = "OUTRIDER_AGENT_GZIP")]
    gzip: bool,
    /// How often paths are re-globbed for new and rotated files.
    #[arg(long, default_value = "2s", value_parser = duration)]
    scan_interval: Duration,
    /// Wait at end of file before reading again.
    #[arg(long, default_value = "250ms", value_parser = duration)]
    poll_interval: Duration,
    /// Most files one input's globs may match at a scan; beyond it the scan stops and is
    /// counted (`outrider_agent_scans_capped`), so a hostile glob cannot open every file.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_files_per_input: u32,
    /// Longest line kept; longer lines are truncated and counted (`1Mi`).
    #[arg(long, default_value = "1Mi", value_parser = size)]
    max_line_bytes: usize,
    /// How long shutdown waits for outputs to acknowledge buffered records.
    #[arg(long, default_value = "10s", value_parser = duration)]
    shutdown_grace: Duration,
    /// How often the configuration files are checked for changes.
    #[arg(long, default_value = "2s", value_parser = duration)]
    reload_interval: Duration,
    /// Timeout of one request to an output.
    #[arg(long, default_value = "30s", value_parser = duration)]
    request_timeout: Duration,
    /// Batches of a pipeline on their way to the outputs at once (acknowledged in order).
    /// More hides the outputs' round trips; a crash re-sends at most this many batches.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=16))]
    batches_in_flight: u16,
    /// First retry delay (doubles per attempt, with jitter).
    #[arg(long, default_value = "200ms", value_parser = duration)]
    retry_initial: Duration,
    /// Longest retry delay.
    #[arg(long, default_value = "30s", value_parser = duration)]
    retry_max: Duration,
    /// Size cap of each dead-letter file: when full it is renamed to `<file>.1` once, then
    /// further rejected records are dropped and counted
    /// (`outrider_agent_dead_letter_dropped_total`).
    #[arg(long, env = "OUTRIDER_DEAD_LETTER_MAX_BYTES", default_value = "64Mi", value_parser = size)]
    dead_letter_max_bytes: usize,
    /// Largest `buffer.maxSize` of a memory buffer a pipeline may ask for (chart
    /// `agent.limits.memoryBuffer`); a pipeline over it is refused, the others run.
    #[arg(long, env = "OUTRIDER_AGENT_MAX_MEMORY_BUFFER", default_value = limits::DEFAULT_MAX_MEMORY_BUFFER, value_parser = limits::parse_cap)]
    max_memory_buffer: usize,
    /// Largest `buffer.maxSize` of a disk buffer (chart `agent.limits.diskBuffer`).
    #[arg(long, env = "OUTRIDER_AGENT_MAX_DISK_BUFFER", default_value = limits::DEFAULT_MAX_DISK_BUFFER, value_parser = limits::parse_cap)]
    max_disk_buffer: usize,
    /// Largest `batch.maxBytes` (chart `agent.limits.batchBytes`).
    #[arg(long, env = "OUTRIDER_AGENT_MAX_BATCH_BYTES", default_value = limits::DEFAULT_MAX_BATCH_BYTES, value_parser = limits::parse_cap)]
    max_batch_bytes: usize,
    /// Largest `batch.maxEvents` (chart `agent.limits.batchEvents`).
    #[arg(long, env = "OUTRIDER_AGENT_MAX_BATCH_EVENTS", default_value_t = limits::DEFAULT_MAX_BATCH_EVENTS, value_parser = limits::parse_event_cap)]
    max_batch_events: usize,
}

/// A `1m30s`-style duration flag.
pub(crate) fn duration(s: &str) -> Result<Duration, String> {
    DurationString(s.to_string())
        .to_std()
        .map_err(|e| e.to_string())
}

fn allowed_root(s: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(s);
    Confinement::check_root(&p).map_err(|e| e.to_string())?;
    Ok(p)
}

fn size(s: &str) -> Result<usize, String> {
    parse_byte_size(s).ok_or_else(|| format!("{s:?} is not a size like 1048576, 64Ki or 1Mi"))
}

/// One malloc arena for the whole agent. Records are encoded on the blocking reader threads
/// and freed on the shipper; glibc gives every thread an arena of its own and keeps what was
/// freed in each, which cost ~20 MiB of RSS with ten files and no measurable CPU to share.
/// Call before the runtime starts its threads.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it is called before any other thread
    // exists, and a refused value (return 0) leaves glibc's default in place.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(args: AgentArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let source = match args.config {
        Some(c) => ConfigSource::File(c),
        None => ConfigSource::Manifests(args.pipeline),
    };
    let node_name = args
        .node_name
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into());
    let mut registry = Registry::default();
    let metrics = AgentMetrics::new(&mut registry);
    let ready = Readiness::default();
    let (addr, server) = telemetry::serve(
        args.metrics_addr,
        Arc::new(registry),
        ready.clone(),
        telemetry::Liveness::default(),
    )
    .await?;
    tracing::info!(%addr, "serving /metrics /healthz /readyz");
    tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    let never_read: Vec<PathBuf> = std::iter::once(args.state_dir.clone())
        .chain(args.secret_dir.clone())
        .collect();
    let confine = Arc::new(Confinement::new(args.allowed_roots, never_read));
    let opts = AgentOptions {
        source,
        sources: config::Sources {
            pod_log_root: args.pod_log_root,
            default_secret_namespace: args.secret_namespace,
        },
        env: AgentEnv {
            state_dir: args.state_dir,
            node_name,
            secret_dir: args.secret_dir,
            confine,
            file_output_dir: args.file_output_dir,
            scan_interval: args.scan_interval,
            tail: TailOptions {
                poll: args.poll_interval,
                max_line: args.max_line_bytes,
                release_after: args.scan_interval.max(Duration::from_secs(1)),
                max_files: args.max_files_per_input as usize,
            },
            gzip: args.gzip,
            request_timeout: args.request_timeout,
            batches_in_flight: usize::from(args.batches_in_flight),
            backoff: Backoff::new(args.retry_initial, args.retry_max),
            dead_letter_max_bytes: args.dead_letter_max_bytes as u64,
            limits: Limits {
                max_memory_buffer_bytes: args.max_memory_buffer,
                max_disk_buffer_bytes: args.max_disk_buffer,
                max_batch_bytes: args.max_batch_bytes,
                max_batch_events: args.max_batch_events,
            },
        },
        reload_interval: args.reload_interval,
        shutdown_grace: args.shutdown_grace,
    };
    run::run(opts, metrics, ready, shutdown)
        .await
        .context("running the agent")
}
