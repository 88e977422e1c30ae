//! The agent process: loads and validates the configuration, runs one
//! [`RunningPipeline`] per pipeline, reloads the configuration file when it changes
//! (validate first, then swap only the pipelines that changed; checkpoints carry over),
//! and on shutdown stops reading, ships what is buffered and writes the checkpoints.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::AgentError;
use super::config::{self, Pipeline};
use super::metrics::{AgentMetrics, ConfigLabel, RefusedLabels, ResultLabel};
use super::pipeline::{AgentEnv, RunningPipeline};
use super::report::config_hash;
use crate::telemetry::Readiness;

/// Where the pipelines come from.
#[derive(Clone, Debug)]
pub enum ConfigSource {
    /// `agent.yaml` rendered by the controller (watched for changes).
    File(PathBuf),
    /// LogPipeline manifests given on the command line (watched too).
    Manifests(Vec<PathBuf>),
}

impl ConfigSource {
    fn load(&self, sources: &config::Sources) -> Result<Vec<Pipeline>, config::ConfigError> {
        match self {
            ConfigSource::File(p) => config::load_agent_file(p, sources),
            ConfigSource::Manifests(ps) => config::load_manifests(ps, sources),
        }
    }

    /// The raw bytes of every file, to notice a change cheaply.
    fn snapshot(&self) -> Vec<Option<Vec<u8>>> {
        let paths: Vec<&PathBuf> = match self {
            ConfigSource::File(p) => vec![p],
            ConfigSource::Manifests(ps) => ps.iter().collect(),
        };
        paths.iter().map(|p| std::fs::read(p).ok()).collect()
    }
}

/// Everything `outrider agent` needs.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub source: ConfigSource,
    /// The pod log root and default Secret namespace pipelines are validated against.
    pub sources: config::Sources,
    pub env: AgentEnv,
    /// How often the configuration files are checked for changes.
    pub reload_interval: Duration,
    /// How long shutdown waits for the outputs to acknowledge what is buffered.
    pub shutdown_grace: Duration,
}

impl AgentOptions {
    /// Reports the running configuration (only for a controller-rendered `agent.yaml`) as
    /// `outrider_agent_config_info{hash}`: the controller scrapes it, so the agent needs no
    /// Kubernetes token.
    fn report(&self, snapshot: &[Option<Vec<u8>>], metrics: &AgentMetrics) {
        let (ConfigSource::File(_), [Some(bytes)]) = (&self.source, snapshot) else {
            return;
        };
        let hash = config_hash(bytes);
        metrics.config_info.clear();
        metrics
            .config_info
            .get_or_create(&ConfigLabel { hash: hash.clone() })
            .set(1);
        tracing::info!(%hash, "running configuration");
    }
}

/// Runs the agent until `shutdown` fires. An invalid configuration at start is an error;
/// an invalid configuration later keeps the running one and is logged and counted. A
/// pipeline that cannot start never stops the others.
pub async fn run(
    opts: AgentOptions,
    metrics: AgentMetrics,
    ready: Readiness,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    std::fs::create_dir_all(&opts.env.state_dir).map_err(|source| AgentError::StateDir {
        path: opts.env.state_dir.clone(),
        source,
    })?;
    // In a DaemonSet the config is an optional ConfigMap volume the controller creates once it
    // runs: until then there is nothing to ship, which is no reason to crash-loop.
    if let ConfigSource::File(path) = &opts.source
        && !wait_for_file(path, opts.reload_interval, &shutdown).await
    {
        return Ok(());
    }
    let mut snapshot = opts.source.snapshot();
    let pipelines = opts.source.load(&opts.sources)?;
    let mut running: BTreeMap<String, RunningPipeline> = BTreeMap::new();
    let mut failed = Failed::default();
    for p in pipelines {
        let key = p.key.clone();
        if let Some(r) = start(p, &opts.env, &metrics, &mut failed) {
            running.insert(key, r);
        }
    }
    ready.set(true);
    opts.report(&snapshot, &metrics);
    tracing::info!(pipelines = running.len(), node = %opts.env.node_name, "agent running");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(opts.reload_interval) => {}
        }
        for p in failed.due() {
            let key = p.key.clone();
            if let Some(r) = start(p, &opts.env, &metrics, &mut failed) {
                tracing::info!(pipeline = %key, "pipeline started after earlier failures");
                running.insert(key, r);
            }
        }
        let now = opts.source.snapshot();
        if now == snapshot {
            continue;
        }
        snapshot = now;
        match opts.source.load(&opts.sources) {
            Ok(new) => {
                failed = Failed::default();
                running = swap(running, new, &opts, &metrics, &mut failed).await;
                opts.report(&snapshot, &metrics);
                metrics
                    .config_reloads
                    .get_or_create(&ResultLabel {
                        result: "ok".into(),
                    })
                    .inc();
            }
            Err(e) => {
                tracing::error!(error = %e, "new configuration is invalid; keeping the running one");
                metrics
                    .config_reloads
                    .get_or_create(&ResultLabel {
                        result: "invalid".into(),
                    })
                    .inc();
            }
        }
    }
    ready.set(false);
    tracing::info!("shutting down: shipping what is buffered and writing checkpoints");
    stop_all(running, opts.shutdown_grace).await;
    Ok(())
}

/// Waits until `path` exists; `false` when shut down first.
async fn wait_for_file(path: &Path, poll: Duration, shutdown: &CancellationToken) -> bool {
    let mut warned = false;
    while !path.exists() {
        if !warned {
            tracing::warn!(path = %path.display(), "no agent configuration yet (the controller renders it); waiting");
            warned = true;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(poll) => {}
        }
    }
    true
}

/// Replaces the pipelines whose spec changed, stops removed ones and starts new ones.
/// A changed pipeline is stopped (drained and checkpointed) before its successor starts
/// from the same checkpoints: no gap and no duplicates.
async fn swap(
    mut running: BTreeMap<String, RunningPipeline>,
    new: Vec<Pipeline>,
    opts: &AgentOptions,
    metrics: &AgentMetrics,
    failed: &mut Failed,
) -> BTreeMap<String, RunningPipeline> {
    let mut next = BTreeMap::new();
    let mut wanted: BTreeMap<String, Pipeline> =
        new.into_iter().map(|p| (p.key.clone(), p)).collect();
    let keys: Vec<String> = running.keys().cloned().collect();
    for key in keys {
        let unchanged = wanted.get(&key).is_some_and(|p| {
            running
                .get(&key)
                .is_some_and(|r| r.pipeline.source == p.source)
        });
        if let Some(r) = running.remove(&key) {
            if unchanged {
                wanted.remove(&key);
                next.insert(key, r);
            } else {
                tracing::info!(pipeline = %key, "configuration changed; restarting the pipeline");
                r.shutdown(opts.shutdown_grace).await;
            }
        }
    }
    for (key, p) in wanted {
        if let Some(r) = start(p, &opts.env, metrics, failed) {
            next.insert(key, r);
        }
    }
    next
}

/// Pipelines that could not start for a reason that may pass (a Secret not mounted yet,
/// the state directory), retried with backoff (the reload interval doubling, at most 5
/// minutes). A pipeline refused for what it asks (a path it may not read, a size over a
/// cap) is not retried: only a new configuration changes that.
#[derive(Default)]
struct Failed(BTreeMap<String, (Pipeline, u32, std::time::Instant)>);

impl Failed {
    const BACKOFF: crate::backoff::Backoff =
        crate::backoff::Backoff::new(Duration::from_secs(2), Duration::from_secs(300));

    fn record(&mut self, p: Pipeline) {
        let attempts = self
            .0
            .get(&p.key)
            .map_or(0, |(_, n, _)| n.saturating_add(1));
        let at = std::time::Instant::now() + Self::BACKOFF.delay(attempts);
        self.0.insert(p.key.clone(), (p, attempts, at));
    }

    /// The pipelines whose retry time has come (they stay recorded until one starts).
    fn due(&mut self) -> Vec<Pipeline> {
        let now = std::time::Instant::now();
        self.0
            .values()
            .filter(|(_, _, at)| *at <= now)
            .map(|(p, _, _)| p.clone())
            .collect()
    }
}

/// Starts one pipeline; one that cannot start (a path it may not read, a bad Secret, its
/// state) is logged and counted, and the others run; what may pass is retried later.
fn start(
    p: Pipeline,
    env: &AgentEnv,
    metrics: &AgentMetrics,
    failed: &mut Failed,
) -> Option<RunningPipeline> {
    let key = p.key.clone();
    match RunningPipeline::start(p.clone(), env, metrics) {
        Ok(r) => {
            failed.0.remove(&key);
            Some(r)
        }
        Err(e) => {
            if !matches!(
                e,
                AgentError::Refused { .. } | AgentError::LimitExceeded { .. }
            ) {
                failed.record(p);
            }
            let reason = match &e {
                AgentError::Refused { refusal, .. } => refusal.reason(),
                AgentError::LimitExceeded { .. } => "limit_exceeded",
                AgentError::Secret { .. } => "secret",
                AgentError::Checkpoint(_) => "checkpoint",
                AgentError::StateDir { .. } => "state_dir",
                _ => "error",
            };
            tracing::error!(pipeline = %key, reason, error = %e, "cannot start pipeline; the others run");
            metrics
                .pipelines_refused
                .get_or_create(&RefusedLabels {
                    pipeline: key,
                    input: String::new(),
                    reason: reason.into(),
                })
                .inc();
            None
        }
    }
}

async fn stop_all(running: BTreeMap<String, RunningPipeline>, grace: Duration) {
    futures::future::join_all(running.into_values().map(|r| r.shutdown(grace))).await;
}
