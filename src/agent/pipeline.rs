//! One running pipeline: discovery and tailers per input feed a bounded buffer with groups
//! of records; one shipper assembles batches, delivers each batch to every output, and
//! only then moves the checkpoints of the files the batch came from. Several batches may be
//! on the wire, but acknowledgements are taken in batch order, so checkpoints only move
//! over records every output has. Checkpoints are written on a blocking thread while the
//! shipper goes on; the newest state is written whenever the previous write is done.
//!
//! With `buffer.type: disk`, a spool writer moves items from the (small) memory buffer
//! into the disk spool and checkpoints the source files once the records are durable
//! there; the shipper reads the spool and acknowledges in the spool instead.
//!
//! This file wires a pipeline; the loops live in [`super::ship`], [`super::spool_write`]
//! and [`super::spool_ship`], checkpoint writing in [`super::checkpoint_writer`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::AgentError;
use super::batch::Batch;
use super::buffer;
use super::checkpoint::Checkpoints;
use super::checkpoint_writer::CheckpointWriter;
use super::config::{OutputKind, Pipeline};
use super::confine::{self, Confinement};
use super::discover::{self, OpenedRecords};
use super::metrics::AgentMetrics;
use super::record::RecordContext;
use super::ship::{Shipper, ship_loop};
use super::sink::{self, Backoff, DeadLetter, Output, SecretMaterial, Sink};
use super::spool::{self, BadFrameHandler};
use super::spool_ship::{SpoolShipTask, spool_ship_loop};
use super::spool_write::{SpoolWriteTask, spool_write_loop};
use super::tail::{GroupLimits, InputShared, TailOptions};
use super::truncate::TruncatedFiles;

/// What every pipeline of the agent shares.
#[derive(Clone, Debug)]
pub struct AgentEnv {
    pub state_dir: PathBuf,
    pub node_name: String,
    pub secret_dir: Option<PathBuf>,
    pub scan_interval: Duration,
    pub tail: TailOptions,
    pub gzip: bool,
    pub request_timeout: Duration,
    pub backoff: Backoff,
    /// Where inputs may read (allowed roots, never-read paths).
    pub confine: Arc<Confinement>,
    /// The only directory `file:` outputs may write beneath (none: `file:` is refused).
    pub file_output_dir: Option<PathBuf>,
    /// Batches of a pipeline delivered at once (1 for file and stdout outputs, which must
    /// stay in order).
    pub batches_in_flight: usize,
    /// Size cap of each dead-letter file (one rotation to `.1`, then drops are counted).
    pub dead_letter_max_bytes: u64,
    /// The admin's caps on buffer and batch sizes; a pipeline over one is refused.
    pub limits: super::limits::Limits,
}

/// A started pipeline.
pub struct RunningPipeline {
    pub pipeline: Pipeline,
    stop: CancellationToken,
    abort: CancellationToken,
    inputs: Vec<JoinHandle<()>>,
    shipper: JoinHandle<()>,
}

impl RunningPipeline {
    /// Starts a validated pipeline from its checkpoints.
    pub fn start(
        pipeline: Pipeline,
        env: &AgentEnv,
        metrics: &AgentMetrics,
    ) -> Result<Self, AgentError> {
        check_paths(&pipeline, env)?;
        super::limits::refuse_over_limits(&pipeline, &env.limits)?;
        let key: Arc<str> = Arc::from(pipeline.key.as_str());
        let cp_path = Checkpoints::path_for(&env.state_dir, &pipeline.key);
        let (checkpoints, set_aside) = Checkpoints::load_or_set_aside(cp_path)?;
        if let Some(aside) = set_aside {
            tracing::error!(pipeline = %pipeline.key, moved_to = %aside.display(), "checkpoint file was corrupt: moved aside; this pipeline reads its files again from the start (duplicates, no loss)");
            metrics
                .checkpoints_set_aside
                .get_or_create(&AgentMetrics::pipeline(&pipeline.key))
                .inc();
        }
        let saved_all = checkpoints.entries().clone();
        // Each input's record of the files it opens, and what it held when the agent stopped.
        let (opened, mut opened_before) = OpenedRecords::load(
            &env.state_dir,
            &pipeline.key,
            pipeline.inputs.iter().map(|i| i.name.as_str()),
        );
        let outputs = build_outputs(&pipeline, env, metrics)?;
        // With a disk buffer, memory only holds what waits to be spooled.
        let memory_bytes = if pipeline.disk_buffer {
            pipeline
                .buffer_bytes
                .min((4 * pipeline.batch.max_bytes).max(4 << 20))
        } else {
            pipeline.buffer_bytes
        };
        let (tx, rx) = buffer::bounded(memory_bytes);
        metrics
            .buffer_capacity_bytes
            .get_or_create(&AgentMetrics::pipeline(&key))
            .set(pipeline.buffer_bytes as i64);
        let stop = CancellationToken::new();
        let abort = CancellationToken::new();
        let lag = Arc::new(AtomicI64::new(0));
        let truncated: TruncatedFiles = TruncatedFiles::default();
        let filters = Arc::new(pipeline.filters.clone());
        let spool_dir = env
            .state_dir
            .join("spool")
            .join(pipeline.key.replace('/', "_"));
        let shipper: futures::future::BoxFuture<'static, ()> = if pipeline.disk_buffer {
            let dir = spool_dir;
            let (writer, reader) = spool::open(&dir, pipeline.buffer_bytes as u64)
                .map_err(|source| AgentError::StateDir { path: dir, source })?;
            reader.report_bad_frames(spool_bad_frames(&key, env, metrics));
            let write = spool_write_loop(SpoolWriteTask {
                key: key.clone(),
                rx,
                writer,
                checkpoints: CheckpointWriter::new(key.clone(), checkpoints)
                    .with_opened(opened.clone()),
                metrics: metrics.clone(),
                lag: lag.clone(),
                stop: stop.clone(),
            });
            let ship = spool_ship_loop(SpoolShipTask {
                key: key.clone(),
                limits: pipeline.batch,
                reader,
                outputs,
                metrics: metrics.clone(),
                abort: abort.clone(),
                stop: stop.clone(),
            });
            Box::pin(async move {
                futures::join!(write, ship);
            })
        } else {
            // Switched from a disk buffer: its records are already checkpointed in the
            // source files, so the leftover spool must still be shipped.
            let mut drain = None;
            if spool_dir.exists() {
                let (writer, reader) = spool::open(&spool_dir, pipeline.buffer_bytes as u64)
                    .map_err(|source| AgentError::StateDir {
                        path: spool_dir.clone(),
                        source,
                    })?;
                drop(writer);
                reader.report_bad_frames(spool_bad_frames(&key, env, metrics));
                if reader.used() > 0 {
                    tracing::info!(pipeline = %key, bytes = reader.used(), "shipping the leftover disk buffer");
                    drain = Some(SpoolShipTask {
                        key: key.clone(),
                        limits: pipeline.batch,
                        reader,
                        outputs: build_outputs(&pipeline, env, metrics)?,
                        metrics: metrics.clone(),
                        abort: abort.clone(),
                        stop: stop.clone(),
                    });
                }
            }
            let ordered = outputs.iter().any(|o| matches!(o.sink, Sink::File(_)));
            let memory = ship_loop(Shipper {
                key: key.clone(),
                batch: Batch::new(pipeline.batch),
                rx,
                outputs: Arc::new(outputs),
                in_flight: if ordered {
                    1
                } else {
                    env.batches_in_flight.max(1)
                },
                checkpoints: CheckpointWriter::new(key.clone(), checkpoints)
                    .with_opened(opened.clone()),
                metrics: metrics.clone(),
                lag: lag.clone(),
                abort: abort.clone(),
            });
            Box::pin(async move {
                let drain = async {
                    if let Some(d) = drain {
                        spool_ship_loop(d).await;
                    }
                };
                futures::join!(memory, drain);
            })
        };
        let mut inputs = Vec::new();
        for input in &pipeline.inputs {
            let prefix = format!("{}/", input.name);
            let saved: BTreeMap<_, _> = saved_all
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let shared = Arc::new(InputShared {
                pipeline: key.clone(),
                input: input.clone(),
                ctx: RecordContext {
                    node: env.node_name.clone(),
                    input: input.name.clone(),
                    fields: pipeline.fields.clone(),
                },
                filters: filters.clone(),
                tx: tx.clone(),
                metrics: metrics.clone(),
                labels: AgentMetrics::input(&key, &input.name),
                lag: lag.clone(),
                opts: env.tail,
                truncated: truncated.clone(),
                group: GroupLimits::for_batch(pipeline.batch.max_events, pipeline.batch.max_bytes),
                ids: pipeline
                    .outputs
                    .iter()
                    .any(|o| matches!(o.kind, OutputKind::Elasticsearch { .. })),
                confine: env.confine.clone(),
                opened: opened.get(&input.name),
            });
            let before = opened_before.remove(&input.name).unwrap_or_default();
            inputs.push(tokio::spawn(discover::run_input(
                shared,
                saved,
                before,
                env.scan_interval,
                stop.clone(),
            )));
        }
        drop(tx);
        let shipper = tokio::spawn(shipper);
        tracing::info!(pipeline = %key, "pipeline started");
        Ok(Self {
            pipeline,
            stop,
            abort,
            inputs,
            shipper,
        })
    }

    /// Stops reading, ships and checkpoints what is buffered, and gives up on delivery
    /// after `grace` (what was not acknowledged is re-read from the checkpoint next time).
    pub async fn shutdown(self, grace: Duration) {
        self.stop.cancel();
        for i in self.inputs {
            let _ = i.await;
        }
        let abort = self.abort.clone();
        let mut shipper = self.shipper;
        tokio::select! {
            _ = &mut shipper => {}
            _ = tokio::time::sleep(grace) => {
                tracing::warn!(pipeline = %self.pipeline.key, "outputs did not drain within the grace period; unacknowledged records will be re-read on restart");
                abort.cancel();
                let _ = shipper.await;
            }
        }
        tracing::info!(pipeline = %self.pipeline.key, "pipeline stopped");
    }
}

/// Refuses a pipeline that names a path the agent must not read or write, before it
/// touches anything (the same check the controller reports as `Ready=False`).
fn check_paths(p: &Pipeline, env: &AgentEnv) -> Result<(), AgentError> {
    confine::check_pipeline(p, &env.confine, env.file_output_dir.as_deref()).map_err(
        |(field, refusal)| AgentError::Refused {
            pipeline: p.key.clone(),
            field,
            refusal,
        },
    )
}

/// Counts the disk buffer's bad frames and writes them to its dead-letter file,
/// `<state>/dead-letter/<pipeline>.spool.ndjson`.
fn spool_bad_frames(key: &Arc<str>, env: &AgentEnv, metrics: &AgentMetrics) -> BadFrameHandler {
    let name = format!("{}.spool.ndjson", key.replace('/', "_"));
    let file = DeadLetter::new(
        env.state_dir.join("dead-letter").join(&name),
        env.dead_letter_max_bytes,
        metrics
            .dead_letter_dropped
            .get_or_create(&AgentMetrics::dead_letter(key, &name))
            .clone(),
    );
    let metrics = metrics.clone();
    let key = key.clone();
    Arc::new(move |bad: &spool::BadFrame| {
        metrics
            .spool_bad_frames
            .get_or_create(&AgentMetrics::spool_frame(&key, bad.reason.label()))
            .inc();
        metrics
            .spool_bad_bytes
            .get_or_create(&AgentMetrics::pipeline(&key))
            .inc_by(bad.bytes);
        file.write(&[bad.dead_letter_line()]);
    })
}

fn build_outputs(
    p: &Pipeline,
    env: &AgentEnv,
    metrics: &AgentMetrics,
) -> Result<Vec<Output>, AgentError> {
    let client = sink::http_client(env.request_timeout).map_err(AgentError::HttpClient)?;
    let mut out = Vec::new();
    for (i, o) in p.outputs.iter().enumerate() {
        let (output_client, auth) = match (o.kind.secret(), &env.secret_dir) {
            (None, _) => (client.clone(), None),
            (Some(secret), Some(dir)) => {
                let bad = |e: sink::SecretError| AgentError::Secret {
                    pipeline: p.key.clone(),
                    field: format!("spec.outputs[{i}].secretRef"),
                    message: e.to_string(),
                };
                let m = SecretMaterial::read(dir, &secret.namespace, &secret.name).map_err(bad)?;
                let secret = secret.to_string();
                if m.auth.is_some() && !o.insecure_http_credentials && o.kind.is_plain_http() {
                    return Err(AgentError::Secret {
                        pipeline: p.key.clone(),
                        field: format!("spec.outputs[{i}].secretRef"),
                        message: format!(
                            "Secret {secret} holds credentials and the URL is plain http://: use https://, or set insecureAllowHttpCredentials: true"
                        ),
                    });
                }
                let own = super::tls_roots::output_client(
                    &m,
                    o.replace_roots,
                    &secret,
                    &client,
                    env.request_timeout,
                )
                .map_err(bad)?;
                (own, m.auth)
            }
            (Some(_), None) if o.replace_roots => {
                return Err(AgentError::Secret {
                    pipeline: p.key.clone(),
                    field: format!("spec.outputs[{i}].secretRef"),
                    message: "no --secret-dir to read ca.crt from, and tls.replaceRoots trusts only its CAs".into(),
                });
            }
            (Some(secret), None) => {
                tracing::warn!(pipeline = %p.key, output = %o.name, %secret, "no --secret-dir: sending without the Secret's credentials and CA");
                (client.clone(), None)
            }
        };
        out.push(Output {
            name: o.name.clone(),
            sink: Sink::new(o, output_client, auth, env.gzip),
            dead_letter: {
                let name = format!("{}_{}.ndjson", p.key.replace('/', "_"), o.name);
                Arc::new(DeadLetter::new(
                    env.state_dir.join("dead-letter").join(&name),
                    env.dead_letter_max_bytes,
                    metrics
                        .dead_letter_dropped
                        .get_or_create(&AgentMetrics::dead_letter(&p.key, &name))
                        .clone(),
                ))
            },
            backoff: env.backoff,
        });
    }
    Ok(out)
}
