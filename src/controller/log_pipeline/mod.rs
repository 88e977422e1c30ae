//! LogPipeline and ClusterLogPipeline controllers: validate every pipeline the way the agent
//! will (regexes compile, URLs parse, paths stay under the agents' roots, referenced Secrets
//! exist), resolve each LogPipeline's pod selector in its own namespace, render the valid
//! ones into ONE ConfigMap the node agents mount (`outrider-agent`, key `agent.yaml`, in the
//! operator's namespace, with the content hash as an annotation), and report each
//! pipeline's rollout: how many nodes it runs on have an agent, how many are ready, and how
//! many report the current config hash.
//!
//! The config is rendered by one singleton task from the caches, triggered by any pipeline
//! change (deletions included), by Secret changes and by pod changes — never by every
//! pipeline listing every pipeline. Each pipeline's reconcile only reads the last render and
//! the cached agent Pods and Nodes, so a DaemonSet rollout costs no API reads.
//!
//! A broken pipeline is left out of the rendered config and reported on its own status, so it
//! never takes the others down. Agents export the hash of the config they run on their
//! `/metrics`, which the controller scrapes ([`agents`]): they hold no Kubernetes token.

mod agents;
mod render;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::core::{DeserializeGuard, PartialObjectMeta, Selector, SelectorExt};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::conditions::{self, Desired, READY};
use super::runtime::{self, Kind, Obj, Shared, TenantWatch};
use super::{At, Context, Error, Stage, WatchNamespace};
use crate::agent::report::CONFIG_HASH_ANNOTATION;
use crate::api::FIELD_MANAGER;
use crate::api::cluster_log_pipeline::ClusterLogPipeline;
use crate::api::log_pipeline::{LogPipeline, LogPipelineStatus, NodeCounts};
use agents::AgentHashes;
use render::{Rendered, World};

/// The agent configuration: this ConfigMap, this key, in the operator's namespace.
pub const AGENT_CONFIGMAP: &str = "outrider-agent";
pub const AGENT_CONFIG_KEY: &str = "agent.yaml";
/// Label selecting the node agents' Pods.
pub const AGENT_POD_SELECTOR: &str = "app.kubernetes.io/name=outrider-agent";
/// Rollout state is re-read this often even without a Pod change.
const RESYNC: Duration = Duration::from_secs(60);
/// Changes arriving within this long of each other are rendered once.
const RENDER_DEBOUNCE: Duration = Duration::from_millis(200);
/// A pipeline's rollout progress (node counts, same Ready reason) is written at most this
/// often: a DaemonSet rollout changes every pipeline's counts on every agent Pod change,
/// which would otherwise cost pods × pipelines status writes.
const PROGRESS_WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// How long to hold back a status write that only moves progress, if the last write of the
/// same pipeline was less than `min` ago; `None` writes now. A new Ready reason (or config
/// hash) is never held back.
fn hold_back(
    last_write: Option<std::time::Instant>,
    now: std::time::Instant,
    min: Duration,
    progress_only: bool,
) -> Option<Duration> {
    let since = now.saturating_duration_since(last_write?);
    (progress_only && since < min).then(|| min - since)
}

/// What the LogPipeline controller keeps besides the shared [`Context`].
struct PipelineState {
    rendered: watch::Receiver<Option<Rendered>>,
    /// When each pipeline's status was last written (rollout progress is written at most
    /// once per [`PROGRESS_WRITE_INTERVAL`]).
    written: Mutex<HashMap<String, std::time::Instant>>,
    agents: Store<Pod>,
    /// The configuration each agent Pod runs, as scraped.
    hashes: Arc<AgentHashes>,
    /// Node labels; absent when the install cannot read Nodes (namespace-scoped).
    nodes: Option<Store<PartialObjectMeta<Node>>>,
}

/// Runs the LogPipeline and ClusterLogPipeline controllers until `stop` fires.
pub async fn run(ctx: Arc<Context>, shared: &Shared, stop: CancellationToken) {
    let render_needed = Arc::new(Notify::new());
    let (pipelines, writer) = reflector::store::<DeserializeGuard<LogPipeline>>();
    let notify = render_needed.clone();
    // every pipeline event (deletions included) asks for a render; applied ones reconcile
    let trigger = watcher(
        ctx.api::<DeserializeGuard<LogPipeline>>(),
        watcher::Config::default().any_semantic(),
    )
    .default_backoff()
    .modify(|obj| obj.managed_fields_mut().clear())
    .reflect(writer)
    .inspect_ok(move |_| notify.notify_one())
    .applied_objects()
    .filter_map(|r| futures::future::ready(r.ok().map(Arc::new)));
    // a Secret appearing or going away changes which pipelines are valid
    let notify = render_needed.clone();
    let secret_changes = shared.secrets.subscribe().for_each(move |_| {
        notify.notify_one();
        futures::future::ready(())
    });
    // pods coming and going change what a LogPipeline's selector matches; their metadata
    // is all that is kept (no annotations: they can be large and are never read)
    let (pods, pod_drivers) = TenantWatch::start(
        ctx.tenant_apis::<PartialObjectMeta<Pod>>(),
        |obj: &mut PartialObjectMeta<Pod>| {
            obj.managed_fields_mut().clear();
            obj.annotations_mut().clear();
            obj.metadata.owner_references = None;
        },
    );
    let notify = render_needed.clone();
    let pod_changes = pods.subscribe().for_each(move |_| {
        notify.notify_one();
        futures::future::ready(())
    });

    let (agents, agent_writer) = reflector::store::<Pod>();
    let agent_changes = watcher(
        ctx.api_in::<Pod>(&ctx.operator_namespace),
        watcher::Config::default()
            .labels(AGENT_POD_SELECTOR)
            .any_semantic(),
    )
    .default_backoff()
    .modify(|obj| obj.managed_fields_mut().clear())
    .reflect(agent_writer)
    .touched_objects()
    .map(|_| ());
    let pods_changed = Arc::new(Notify::new());
    let notify = pods_changed.clone();
    let agent_changes = agent_changes.inspect(move |()| notify.notify_one());
    // Nodes and ClusterLogPipelines are cluster-scoped: only a cluster-wide install reads
    // them, or (ClusterLogPipelines) one told which to render by a label selector
    let cluster_wide = ctx.scope == WatchNamespace::All;
    let selector = ctx.agent_paths.cluster_pipeline_selector.clone();
    let renders_cluster = cluster_wide || selector.is_some();
    let mut cluster_config = watcher::Config::default().any_semantic();
    if let Some(sel) = &selector {
        cluster_config = cluster_config.labels(sel);
    }
    let (nodes, node_driver) = if cluster_wide {
        let (store, writer) = reflector::store::<PartialObjectMeta<Node>>();
        let driver = watcher(
            Api::<PartialObjectMeta<Node>>::all(ctx.client.clone()),
            watcher::Config::default().any_semantic(),
        )
        .default_backoff()
        .modify(|obj| obj.managed_fields_mut().clear())
        .reflect(writer)
        .touched_objects()
        .map(|_| ())
        .boxed();
        (Some(store), driver)
    } else {
        (None, futures::stream::pending().boxed())
    };
    let (cluster_pipelines, cluster_writer) =
        reflector::store::<DeserializeGuard<ClusterLogPipeline>>();
    let notify = render_needed.clone();
    let cluster_trigger = watcher(
        Api::<DeserializeGuard<ClusterLogPipeline>>::all(ctx.client.clone()),
        cluster_config,
    )
    .default_backoff()
    .modify(|obj| obj.managed_fields_mut().clear())
    .reflect(cluster_writer)
    .inspect_ok(move |_| notify.notify_one())
    .applied_objects()
    .filter_map(|r| futures::future::ready(r.ok().map(Arc::new)));

    let (rendered_tx, rendered) = watch::channel(None);
    let state = Arc::new(PipelineState {
        rendered: rendered.clone(),
        written: Mutex::new(HashMap::new()),
        agents: agents.clone(),
        hashes: Arc::new(AgentHashes::default()),
        nodes,
    });
    let (scraped_tx, scraped) = watch::channel(0u64);
    let scraper = agents::scrape_loop(
        agents,
        state.hashes.clone(),
        pods_changed,
        scraped_tx,
        stop.clone(),
    );
    let renderer = render_loop(
        ctx.clone(),
        Sources {
            pipelines: pipelines.clone(),
            cluster: renders_cluster.then(|| cluster_pipelines.clone()),
            shared,
            pods: pods.stores(),
        },
        render_needed,
        rendered_tx,
        stop.clone(),
    );
    // agent Pods and Nodes changing, or a new render: every pipeline's rollout is redone
    let (tick_tx, tick) = watch::channel(0u64);
    let ticker = futures::stream::select(agent_changes.boxed(), node_driver).for_each(move |()| {
        tick_tx.send_modify(|n| *n = n.wrapping_add(1));
        futures::future::ready(())
    });
    let rollout_changes = || {
        futures::stream::select_all([
            changes_of(tick.clone()).boxed(),
            changes_of(scraped.clone()).boxed(),
            changes_of(rendered.clone()).boxed(),
        ])
    };
    let (controller, queue) = runtime::controller::<LogPipeline>(&ctx, trigger, pipelines);
    let controller = controller.reconcile_all_on(rollout_changes());
    let tenant_state = state.clone();
    let reconcile = runtime::reconciler(queue, move |lp: Obj<LogPipeline>, ctx| {
        let state = tenant_state.clone();
        async move {
            let key = format!("{}/{}", lp.ns()?, lp.name_any());
            report_rollout(&*lp, key, None, lp.status.as_ref(), ctx, state).await
        }
    });
    let tenants = runtime::drive(controller, stop.clone(), ctx.clone(), reconcile);
    let admins = async {
        if !renders_cluster {
            return futures::future::pending::<()>().await;
        }
        let (controller, queue) =
            runtime::controller::<ClusterLogPipeline>(&ctx, cluster_trigger, cluster_pipelines);
        let controller = controller.reconcile_all_on(rollout_changes());
        let reconcile = runtime::reconciler(queue, move |clp: Obj<ClusterLogPipeline>, ctx| {
            let state = state.clone();
            async move {
                let selector = clp.spec.node_selector.clone();
                let key = clp.name_any();
                report_rollout(
                    &*clp,
                    key,
                    selector.as_ref(),
                    clp.status.as_ref(),
                    ctx,
                    state,
                )
                .await
            }
        });
        runtime::drive(controller, stop.clone(), ctx.clone(), reconcile).await;
    };
    tokio::select! {
        () = tenants => {}
        () = admins => {}
        () = renderer => {}
        () = secret_changes => {}
        () = pod_changes => {}
        () = ticker => {}
        () = scraper => {}
        _ = futures::future::join_all(pod_drivers) => {}
    }
}

/// A stream that yields once per change of `rx`.
fn changes_of<T: Send + Sync + 'static>(
    rx: watch::Receiver<T>,
) -> impl futures::Stream<Item = ()> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    })
}

/// What the render task reads.
struct Sources<'a> {
    pipelines: Store<DeserializeGuard<LogPipeline>>,
    /// Absent when the install cannot read cluster-scoped objects.
    cluster: Option<Store<DeserializeGuard<ClusterLogPipeline>>>,
    shared: &'a Shared,
    pods: runtime::Stores<PartialObjectMeta<Pod>>,
}

/// The singleton render task: renders whenever asked (debounced), publishes the result.
async fn render_loop(
    ctx: Arc<Context>,
    sources: Sources<'_>,
    needed: Arc<Notify>,
    out: watch::Sender<Option<Rendered>>,
    stop: CancellationToken,
) {
    let secrets = sources.shared.secrets.stores();
    let written: Mutex<Option<String>> = Mutex::new(None);
    let backoff = crate::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut failures = 0u32;
    loop {
        tokio::select! {
            () = needed.notified() => {}
            () = stop.cancelled() => return,
        }
        tokio::time::sleep(RENDER_DEBOUNCE).await;
        if sources.pipelines.wait_until_ready().await.is_err() {
            return;
        }
        if let Some(c) = &sources.cluster
            && c.wait_until_ready().await.is_err()
        {
            return;
        }
        let world = World {
            secrets: &secrets,
            pods: &sources.pods,
            tenants: &ctx.tenants,
            paths: &ctx.agent_paths,
            operator_namespace: &ctx.operator_namespace,
        };
        let rendered = render::render(&sources.pipelines, sources.cluster.as_ref(), &world);
        match write_config(&ctx, &rendered.1, &rendered.0.hash, &written).await {
            Ok(()) => {
                failures = 0;
                out.send_if_modified(|cur| {
                    let changed = cur.as_ref() != Some(&rendered.0);
                    if changed {
                        *cur = Some(rendered.0.clone());
                    }
                    changed
                });
            }
            Err(e) => {
                let delay = backoff.delay(failures);
                failures = failures.saturating_add(1);
                ctx.metrics.reconcile_failed("LogPipeline", e.category());
                tracing::warn!(error = %e, retry_in = ?delay, "writing the agent config failed");
                tokio::time::sleep(delay).await;
                needed.notify_one();
            }
        }
    }
}

/// Writes the agent ConfigMap unless it already holds `hash` (read once, then remembered).
async fn write_config(
    ctx: &Context,
    text: &str,
    hash: &str,
    written: &Mutex<Option<String>>,
) -> Result<(), Error> {
    let known = written.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let maps: Api<ConfigMap> = ctx.api_in(&ctx.operator_namespace);
    let deployed = match known {
        Some(h) => Some(h),
        None => maps
            .get_opt(AGENT_CONFIGMAP)
            .await
            .at(Stage::Apply)?
            .and_then(|cm| cm.annotations().get(CONFIG_HASH_ANNOTATION).cloned()),
    };
    if deployed.as_deref() != Some(hash) {
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(AGENT_CONFIGMAP.into()),
                namespace: Some(ctx.operator_namespace.clone()),
                annotations: Some(BTreeMap::from([(
                    CONFIG_HASH_ANNOTATION.to_string(),
                    hash.to_string(),
                )])),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    "outrider".to_string(),
                )])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                AGENT_CONFIG_KEY.to_string(),
                text.to_string(),
            )])),
            ..Default::default()
        };
        maps.patch(
            AGENT_CONFIGMAP,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&cm),
        )
        .await
        .at(Stage::Apply)?;
        tracing::info!(%hash, "rendered the agent configuration");
    }
    *written.lock().unwrap_or_else(|p| p.into_inner()) = Some(hash.to_string());
    Ok(())
}

/// Whether a node's labels satisfy a selector (absent selector: every node; a selector
/// that does not parse selects nothing).
fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(sel) = selector else {
        return true;
    };
    Selector::try_from(sel.clone()).is_ok_and(|s| s.matches(labels))
}

/// Agent Pods on the nodes the pipeline selects: desired, ready, and ready with `hash`.
fn rollout(state: &PipelineState, node_selector: Option<&LabelSelector>, hash: &str) -> NodeCounts {
    let node_labels: Option<HashMap<String, BTreeMap<String, String>>> =
        state.nodes.as_ref().map(|nodes| {
            nodes
                .state()
                .iter()
                .map(|n| (n.name_any(), n.labels().clone()))
                .collect()
        });
    let mut counts = NodeCounts::default();
    for pod in state.agents.state() {
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_ref()) else {
            continue;
        };
        if let Some(all) = &node_labels {
            let Some(labels) = all.get(node) else {
                continue;
            };
            if !selects(node_selector, labels) {
                continue;
            }
        }
        counts.desired += 1;
        if agents::is_ready(&pod) {
            counts.ready += 1;
            let runs = pod.uid().and_then(|uid| state.hashes.get(&uid));
            if runs.as_deref() == Some(hash) {
                counts.updated += 1;
            }
        }
    }
    counts
}

/// The status of one pipeline of either kind (`me` is its agent key): left out of the
/// rendered config and why, or how far its rollout is.
async fn report_rollout<K: Kind>(
    lp: &K,
    me: String,
    node_selector: Option<&LabelSelector>,
    status: Option<&LogPipelineStatus>,
    ctx: Arc<Context>,
    state: Arc<PipelineState>,
) -> Result<Action, Error> {
    let Some(rendered) = state.rendered.borrow().clone() else {
        // not rendered yet: the first render reconciles every pipeline
        return Ok(Action::requeue(Duration::from_secs(2)));
    };
    let old = status.cloned().unwrap_or_default();
    let generation = lp.meta().generation;
    let (ready, config_hash, nodes) = match rendered.problems.get(&me) {
        Some(problem) => (problem.clone(), None, None),
        None => {
            let nodes = rollout(&state, node_selector, &rendered.hash);
            let ready = if nodes.desired == 0 {
                Desired::new(
                    READY,
                    false,
                    "NoAgents",
                    format!(
                        "no node agent Pod ({AGENT_POD_SELECTOR} in namespace {}) runs on a node this pipeline selects",
                        ctx.operator_namespace
                    ),
                )
            } else if nodes.updated == nodes.desired {
                Desired::new(
                    READY,
                    true,
                    "AllNodesShipping",
                    format!(
                        "{} agents run configuration {}",
                        nodes.updated, rendered.hash
                    ),
                )
            } else {
                Desired::new(
                    READY,
                    false,
                    "RollingOut",
                    format!(
                        "{} of {} agents run configuration {} ({} ready)",
                        nodes.updated, nodes.desired, rendered.hash, nodes.ready
                    ),
                )
            };
            (ready, Some(rendered.hash.clone()), Some(nodes))
        }
    };
    let new = LogPipelineStatus {
        observed_generation: generation,
        config_hash,
        nodes,
        conditions: conditions::merge(
            &old.conditions,
            std::slice::from_ref(&ready),
            generation,
            &Time(Timestamp::now()),
        ),
    };
    if status != Some(&new) {
        let progress_only = old.config_hash == new.config_hash
            && conditions::find(&old.conditions, READY).is_some_and(|c| c.reason == ready.reason);
        let now = std::time::Instant::now();
        let mut written = state.written.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(wait) = hold_back(
            written.get(&me).copied(),
            now,
            PROGRESS_WRITE_INTERVAL,
            progress_only,
        ) {
            return Ok(Action::requeue(wait));
        }
        written.insert(me.clone(), now);
    }
    // Events only for problems (a rollout reaching every node is not news)
    conditions::report(
        &ctx,
        lp,
        (status, &new),
        &old.conditions,
        &ready,
        conditions::Events::OnProblem,
    )
    .await?;
    Ok(Action::requeue(RESYNC))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    #[test]
    fn progress_writes_are_held_back_to_one_per_interval_but_new_reasons_are_not() {
        let t0 = std::time::Instant::now();
        let min = Duration::from_secs(1);
        assert_eq!(
            hold_back(None, t0, min, true),
            None,
            "first write goes at once"
        );
        let soon = t0 + Duration::from_millis(300);
        assert_eq!(
            hold_back(Some(t0), soon, min, true),
            Some(Duration::from_millis(700))
        );
        assert_eq!(hold_back(Some(t0), soon, min, false), None, "a new reason");
        assert_eq!(hold_back(Some(t0), t0 + min, min, true), None);
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn node_selection_follows_match_labels_and_expressions() {
        let linux = labels(&[("kubernetes.io/os", "linux"), ("tier", "edge")]);
        let windows = labels(&[("kubernetes.io/os", "windows")]);
        assert!(selects(None, &windows));
        let sel = LabelSelector {
            match_labels: Some(labels(&[("kubernetes.io/os", "linux")])),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "In".into(),
                values: Some(vec!["edge".into(), "core".into()]),
            }]),
        };
        assert!(selects(Some(&sel), &linux));
        assert!(!selects(Some(&sel), &windows));
        let absent = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "gpu".into(),
                operator: "DoesNotExist".into(),
                values: None,
            }]),
        };
        assert!(selects(Some(&absent), &linux));
    }
}
