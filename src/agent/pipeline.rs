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

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use futures::future::join_all;
use futures::stream::FuturesOrdered;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::AgentError;
use super::batch::Batch;
use super::buffer::{self, BufferRx, Taken};
use super::checkpoint::{Checkpoints, write_atomic};
use super::config::{BatchConfig, OutputKind, Pipeline};
use super::confine::{self, Confinement};
use super::discover;
use super::metrics::AgentMetrics;
use super::record::{Encoded, Item, RecordContext};
use super::sink::{self, Backoff, DeadLetter, Delivered, Output, SecretMaterial, Sink};
use super::spool::{self, BadFrameHandler, SpoolReader, SpoolWriter};
use super::tail::{GroupLimits, InputShared, TailOptions, TruncatedFiles};

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
                checkpoints,
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
                checkpoints,
                writing: None,
                unwritten: 0,
                covered: 0,
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
                opened: Default::default(),
            });
            let safe = |s: &str| s.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_");
            let opened_file = env.state_dir.join("opened").join(format!(
                "{}_{}.json",
                safe(&key),
                safe(&input.name)
            ));
            inputs.push(tokio::spawn(discover::run_input(
                shared,
                saved,
                env.scan_interval,
                opened_file,
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
    let namespace = p.key.split('/').next().unwrap_or_default();
    let mut out = Vec::new();
    for (i, o) in p.outputs.iter().enumerate() {
        let secret = match &o.kind {
            OutputKind::Loki { secret, .. }
            | OutputKind::Elasticsearch { secret, .. }
            | OutputKind::Http { secret, .. } => secret.clone(),
            _ => None,
        };
        let (output_client, auth) = match (&secret, &env.secret_dir) {
            (None, _) => (client.clone(), None),
            (Some(name), Some(dir)) => {
                let bad = |e: sink::SecretError| AgentError::Secret {
                    pipeline: p.key.clone(),
                    field: format!("spec.outputs[{i}].secretRef"),
                    message: e.to_string(),
                };
                let m = SecretMaterial::read(dir, namespace, name).map_err(bad)?;
                let secret = format!("{namespace}/{name}");
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
            (Some(name), None) => {
                tracing::warn!(pipeline = %p.key, output = %o.name, secret = %name, "no --secret-dir: sending without the Secret's credentials and CA");
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

struct Shipper {
    key: Arc<str>,
    batch: Batch,
    rx: BufferRx,
    outputs: Arc<Vec<Output>>,
    /// Batches delivered at the same time, at most; acknowledged in order regardless.
    in_flight: usize,
    checkpoints: Checkpoints,
    /// The checkpoint write running on a blocking thread: the shipper never waits for the
    /// disk between batches. While it runs, later acknowledgements only update the
    /// checkpoints in memory; the newest state is written as soon as it completes.
    writing: Option<Writing>,
    /// Batches acknowledged whose checkpoint is not on disk yet. They count against
    /// `in_flight`, so a kill -9 still re-sends at most `in_flight` batches.
    unwritten: usize,
    /// Of those, the ones the running write covers.
    covered: usize,
    metrics: AgentMetrics,
    lag: Arc<AtomicI64>,
    abort: CancellationToken,
}

/// A checkpoint write in progress, and whether it fsyncs.
struct Writing(JoinHandle<std::io::Result<()>>, bool);

/// A batch on its way to the outputs: its items back, and whether delivery completed.
type Delivery = futures::future::BoxFuture<'static, (Vec<Taken>, bool)>;

async fn ship_loop(mut s: Shipper) {
    ship_until_done(&mut s).await;
    if let Some(Writing(handle, sync)) = s.writing.take() {
        written(&mut s.checkpoints, &s.key, handle.await, sync);
    }
    // Whatever was written since the last fsync reaches the disk before the pipeline ends.
    persist(&mut s.checkpoints, &s.key, true).await;
}

/// Starts writing the checkpoints if they changed and no write is running.
fn start_write(s: &mut Shipper) {
    if s.writing.is_none() {
        s.writing = spawn_write(&mut s.checkpoints, false);
        s.covered = s.unwritten;
        if s.writing.is_none() {
            // Nothing changed: what was acknowledged is on disk already.
            s.unwritten = 0;
        }
    }
}

/// Starts writing the checkpoints on a blocking thread, if they changed.
fn spawn_write(c: &mut Checkpoints, final_write: bool) -> Option<Writing> {
    let w = c.pending_write(final_write)?;
    let sync = w.sync;
    let handle = tokio::task::spawn_blocking(move || write_atomic(&w.path, &w.body, w.sync));
    Some(Writing(handle, sync))
}

/// Fills batches and delivers up to `in_flight` of them at once (so the next batch is on the
/// wire while the outputs answer the previous one). Acknowledgements are taken strictly in
/// batch order, so checkpoints only ever move over records every output has.
async fn ship_until_done(s: &mut Shipper) {
    let buffer_gauge = s
        .metrics
        .buffer_bytes
        .get_or_create(&AgentMetrics::pipeline(&s.key))
        .clone();
    let mut deliveries: FuturesOrdered<Delivery> = FuturesOrdered::new();
    // An item that did not fit the full batch: it starts the next one.
    let mut carry: Option<Taken> = None;
    let mut done = false;
    loop {
        let deadline = s.batch.deadline();
        let due = deadline.is_some_and(|d| d <= tokio::time::Instant::now());
        let ready = !s.batch.is_empty() && (s.batch.is_full() || carry.is_some() || due || done);
        if ready && deliveries.len() + s.unwritten < s.in_flight {
            let items = s.batch.take();
            deliveries.push_back(deliver_batch(s, items));
            if let Some(t) = carry.take() {
                s.batch.push(t, tokio::time::Instant::now);
            }
            buffer_gauge.set(s.rx.used() as i64);
            continue;
        }
        if done && s.batch.is_empty() && carry.is_none() && deliveries.is_empty() {
            return;
        }
        let room = deliveries.len() + s.unwritten < s.in_flight;
        let sleep = async {
            match deadline {
                Some(d) if room && !due => tokio::time::sleep_until(d).await,
                _ => std::future::pending().await,
            }
        };
        let take = !done && carry.is_none() && !s.batch.is_full();
        let write_done = async {
            match s.writing.as_mut() {
                Some(w) => (&mut w.0).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some((items, delivered)) = deliveries.next(), if !deliveries.is_empty() => {
                if !delivered {
                    return;
                }
                acknowledge(s, &items);
                s.unwritten += 1;
                start_write(s);
            }
            r = write_done => {
                let ok = matches!(r, Ok(Ok(())));
                if let Some(Writing(_, sync)) = s.writing.take() {
                    written(&mut s.checkpoints, &s.key, r, sync);
                }
                // What was acknowledged meanwhile is written now. After a failure it is
                // written with the next acknowledgement (a full disk is not retried in a
                // loop), and shipping does not wait for a disk that fails.
                if ok {
                    s.unwritten = s.unwritten.saturating_sub(s.covered);
                    s.covered = 0;
                    start_write(s);
                } else {
                    s.unwritten = 0;
                    s.covered = 0;
                }
            }
            t = s.rx.recv(), if take => {
                // Then everything already queued, without a trip through select! per item.
                let mut next = t;
                loop {
                    match next {
                        Some(t) if s.batch.fits(&t) => s.batch.push(t, tokio::time::Instant::now),
                        Some(t) => {
                            carry = Some(t);
                            break;
                        }
                        None => {
                            done = true;
                            break;
                        }
                    }
                    if s.batch.is_full() {
                        break;
                    }
                    match s.rx.try_recv() {
                        Some(t) => next = Some(t),
                        None => break,
                    }
                }
            }
            _ = sleep => {}
        }
    }
}

/// Starts delivering one batch to every output.
fn deliver_batch(s: &Shipper, items: Vec<Taken>) -> Delivery {
    let outputs = s.outputs.clone();
    let metrics = s.metrics.clone();
    let key = s.key.clone();
    let abort = s.abort.clone();
    Box::pin(async move {
        let delivered = {
            let records: Vec<&Encoded> = items
                .iter()
                .flat_map(|t| match &t.item {
                    Item::Event(e) => e.records.as_slice(),
                    Item::Forget(_) => &[],
                })
                .collect();
            let groups: Vec<bytes::Bytes> = items
                .iter()
                .filter_map(|t| match &t.item {
                    Item::Event(e) if !e.records.is_empty() => Some(e.ndjson.clone()),
                    _ => None,
                })
                .collect();
            deliver_all(&outputs, &records, Some(&groups), &metrics, &key, &abort).await
        };
        (items, delivered)
    })
}

/// A delivered batch: checkpoints move over it (in memory; [`start_write`] persists them)
/// and its room in the buffer is given back.
fn acknowledge(s: &mut Shipper, items: &[Taken]) {
    let (weight, consumed) = advance(&mut s.checkpoints, items);
    s.lag.fetch_sub(consumed as i64, Ordering::Relaxed);
    s.metrics
        .checkpoint_lag_bytes
        .get_or_create(&AgentMetrics::pipeline(&s.key))
        .set(s.lag.load(Ordering::Relaxed).max(0));
    s.rx.release(weight);
}

/// Delivers records to every output at once; false when shutdown aborted a delivery.
/// `ndjson`: the records' groups as NDJSON, when the batch is made of whole groups.
async fn deliver_all(
    outputs: &[Output],
    records: &[&Encoded],
    ndjson: Option<&[bytes::Bytes]>,
    metrics: &AgentMetrics,
    key: &str,
    abort: &CancellationToken,
) -> bool {
    if records.is_empty() {
        return true;
    }
    let results = join_all(
        outputs
            .iter()
            .map(|o| sink::deliver(o, records, ndjson, metrics, key, abort)),
    )
    .await;
    !results.contains(&Delivered::Aborted)
}

/// Moves items from memory to the disk spool. Source checkpoints move as soon as the
/// records are durable in the spool: from then on the spool owns them.
struct SpoolWriteTask {
    key: Arc<str>,
    rx: BufferRx,
    writer: SpoolWriter,
    checkpoints: Checkpoints,
    metrics: AgentMetrics,
    lag: Arc<AtomicI64>,
    stop: CancellationToken,
}

/// Items (groups of records) spooled per fsync at most.
const SPOOL_GROUP: usize = 64;

async fn spool_write_loop(mut w: SpoolWriteTask) {
    loop {
        let Some(first) = w.rx.recv().await else {
            break;
        };
        let mut taken = vec![first];
        while taken.len() < SPOOL_GROUP {
            match w.rx.try_recv() {
                Some(t) => taken.push(t),
                None => break,
            }
        }
        // A full spool stops taking items: memory fills and the readers pause. Waiting
        // for room for the whole group keeps the spool at its cap. When stopping, nothing
        // frees room any more: leave the rest unspooled (and unchecked), to be read again
        // from the files next time.
        let need = spool::frames_len(taken.iter().flat_map(|t| match &t.item {
            Item::Event(e) => e.records.as_slice(),
            Item::Forget(_) => &[],
        }));
        tokio::select! {
            _ = w.writer.wait_room_for(need) => {}
            _ = w.stop.cancelled(), if !w.writer.has_room_for(need) => break,
        }
        if !spool_group(&mut w, &taken).await {
            // Stopping while the disk fails: these records are neither spooled nor
            // checkpointed, and are read again from their files next time.
            break;
        }
        let (weight, consumed) = advance(&mut w.checkpoints, &taken);
        persist(&mut w.checkpoints, &w.key, false).await;
        w.lag.fetch_sub(consumed as i64, Ordering::Relaxed);
        let labels = AgentMetrics::pipeline(&w.key);
        w.metrics
            .checkpoint_lag_bytes
            .get_or_create(&labels)
            .set(w.lag.load(Ordering::Relaxed).max(0));
        w.metrics
            .buffer_bytes
            .get_or_create(&labels)
            .set(w.writer.used() as i64);
        w.rx.release(weight);
    }
    persist(&mut w.checkpoints, &w.key, true).await;
    // Dropping the writer tells the shipper that nothing more will come.
}

/// Spools one group of items, supervised: after a failed append or commit the writer
/// restarts (what was not committed is discarded and the segment is cut back to its
/// durable end) and the group is appended again, with backoff, until it is durable.
/// Never checkpoints what may not be on disk. False when `stop` came first.
async fn spool_group(w: &mut SpoolWriteTask, taken: &[Taken]) -> bool {
    let mut attempt = 0u32;
    loop {
        let written = taken
            .iter()
            .try_for_each(|t| match &t.item {
                Item::Event(e) => e.records.iter().try_for_each(|r| w.writer.append(r)),
                Item::Forget(_) => Ok(()),
            })
            .and_then(|()| w.writer.commit());
        let Err(mut error) = written else {
            return true;
        };
        loop {
            w.metrics
                .spool_restarts
                .get_or_create(&AgentMetrics::spool_task(&w.key, "writer"))
                .inc();
            let delay = sink::SINK_BACKOFF.delay(attempt);
            attempt = attempt.saturating_add(1);
            tracing::error!(pipeline = %w.key, %error, retry_in = ?delay, "writing the disk buffer failed; the writer restarts");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = w.stop.cancelled() => return false,
            }
            match w.writer.restart() {
                Ok(()) => break,
                Err(e) => error = e,
            }
        }
    }
}

/// Ships records from the disk spool in batches and acknowledges them in the spool.
struct SpoolShipTask {
    key: Arc<str>,
    limits: BatchConfig,
    reader: SpoolReader,
    outputs: Vec<Output>,
    metrics: AgentMetrics,
    abort: CancellationToken,
    stop: CancellationToken,
}

async fn spool_ship_loop(mut s: SpoolShipTask) {
    let labels = AgentMetrics::pipeline(&s.key);
    let mut batch: Vec<Encoded> = Vec::new();
    let mut bytes = 0usize;
    let mut end = 0u64;
    let mut started: Option<tokio::time::Instant> = None;
    // Read failures in a row: the reader restarts after each, with backoff.
    let mut failures = 0u32;
    loop {
        let deadline = started.map(|t| t + s.limits.max_wait);
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let mut ship_now = false;
        let mut last = false;
        let mut carry = None;
        let mut failed = false;
        tokio::select! {
            r = s.reader.next() => match r {
                Ok(Some((rec, e))) => {
                    failures = 0;
                    let len = rec.json.len() + 1;
                    if !batch.is_empty() && bytes + len > s.limits.max_bytes {
                        ship_now = true;
                        carry = Some((rec, e, len));
                    } else {
                        bytes += len;
                        batch.push(rec);
                        end = e;
                        started.get_or_insert_with(tokio::time::Instant::now);
                        ship_now = batch.len() >= s.limits.max_events || bytes >= s.limits.max_bytes;
                    }
                }
                Ok(None) => last = true,
                Err(e) => {
                    let delay = sink::SINK_BACKOFF.delay(failures);
                    failures = failures.saturating_add(1);
                    s.metrics
                        .spool_restarts
                        .get_or_create(&AgentMetrics::spool_task(&s.key, "reader"))
                        .inc();
                    tracing::error!(pipeline = %s.key, error = %e, retry_in = ?delay, "reading the disk buffer failed; the reader restarts");
                    s.reader.restart();
                    failed = true;
                    // What was read is shipped first; the next read waits for the backoff.
                    ship_now = true;
                }
            },
            _ = sleep => ship_now = true,
            // Stopping: what is spooled stays there for the next start.
            _ = s.stop.cancelled() => last = true,
        }
        if (ship_now || last) && !batch.is_empty() {
            let refs: Vec<&Encoded> = batch.iter().collect();
            if !deliver_all(&s.outputs, &refs, None, &s.metrics, &s.key, &s.abort).await {
                return;
            }
            if let Err(e) = s.reader.ack(end) {
                tracing::error!(pipeline = %s.key, error = %e, "writing the disk buffer cursor failed");
            }
            batch.clear();
            bytes = 0;
            started = None;
        }
        if let Some((rec, e, len)) = carry {
            bytes += len;
            batch.push(rec);
            end = e;
            started = Some(tokio::time::Instant::now());
        }
        s.metrics
            .buffer_bytes
            .get_or_create(&labels)
            .set(s.reader.used() as i64);
        if last {
            return;
        }
        if failed {
            tokio::select! {
                _ = tokio::time::sleep(sink::SINK_BACKOFF.delay(failures.saturating_sub(1))) => {}
                _ = s.stop.cancelled() => return,
            }
        }
    }
}

/// Moves the checkpoints past `items` (acknowledged or spooled), in order; returns their
/// buffer weight and the file bytes they account for. Of a run of events from one file only
/// the last is applied: it is the furthest, and the others would be overwritten by it.
fn advance(checkpoints: &mut Checkpoints, items: &[Taken]) -> (u64, u64) {
    let mut weight = 0u64;
    let mut consumed = 0u64;
    for (i, t) in items.iter().enumerate() {
        weight += u64::from(t.weight);
        match &t.item {
            Item::Event(e) => {
                consumed += e.consumed;
                let superseded = matches!(
                    items.get(i + 1).map(|n| &n.item),
                    Some(Item::Event(next)) if Arc::ptr_eq(&next.pos.file, &e.pos.file)
                        && Arc::ptr_eq(&next.pos.fingerprint, &e.pos.fingerprint)
                );
                if !superseded {
                    checkpoints.set(&e.pos.file, &e.pos.path, e.pos.offset, &e.pos.fingerprint);
                }
            }
            Item::Forget(k) => checkpoints.forget(k),
        }
    }
    (weight, consumed)
}

/// Writes the checkpoints if they changed (fsynced once per [`super::checkpoint::SYNC_INTERVAL`] while
/// shipping, and always when `final_write`).
async fn persist(c: &mut Checkpoints, key: &str, final_write: bool) {
    if let Some(Writing(handle, sync)) = spawn_write(c, final_write) {
        written(c, key, handle.await, sync);
    }
}

/// Records how a checkpoint write went; a failed one is written again next time.
fn written(
    c: &mut Checkpoints,
    key: &str,
    res: Result<std::io::Result<()>, tokio::task::JoinError>,
    sync: bool,
) {
    match res {
        Ok(Ok(())) => c.written(sync),
        Ok(Err(e)) => {
            c.write_failed();
            tracing::error!(pipeline = %key, error = %e, "writing checkpoints failed; will retry after the next batch")
        }
        Err(e) => {
            c.write_failed();
            tracing::error!(pipeline = %key, error = %e, "checkpoint writer panicked")
        }
    }
}
