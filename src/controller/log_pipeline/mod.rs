//! LogPipeline controller: validates every pipeline the way the agent will (regexes compile,
//! URLs parse, referenced Secrets exist), renders the valid ones into ONE ConfigMap the node
//! agents mount (`outrider-agent`, key `agent.yaml`, in the operator's namespace, with the
//! content hash as an annotation), and reports each pipeline's rollout: how many selected
//! nodes run an agent, how many are ready, and how many report the current config hash.
//!
//! The config is rendered by one singleton task from the pipeline cache, triggered by any
//! pipeline change (deletions included) and by Secret changes — never by every pipeline
//! listing every pipeline. Each pipeline's reconcile only reads the last render and the
//! cached agent Pods and Nodes, so a DaemonSet rollout costs no API reads.
//!
//! A broken pipeline is left out of the rendered config and reported on its own status, so it
//! never takes the others down. Agents report the hash of the config they run as the
//! annotation `outrider.dev/config-hash` on their own Pod.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::core::{DeserializeGuard, PartialObjectMeta, Selector, SelectorExt};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::conditions::{self, Desired, READY};
use super::runtime::{self, Obj, Shared, Stores};
use super::{AgentPaths, At, Context, Error, Stage, Tenants, WatchNamespace};
use crate::agent::config::{AgentConfigFile, PipelineEntry, validate};
use crate::agent::confine::check_pipeline;
use crate::agent::limits::check_limits;
use crate::agent::report::{CONFIG_HASH_ANNOTATION, config_hash};
use crate::api::FIELD_MANAGER;
use crate::api::log_pipeline::{LogPipeline, LogPipelineSpec, LogPipelineStatus, NodeCounts};

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

/// The last rendered agent configuration.
#[derive(Clone, Debug, Default, PartialEq)]
struct Rendered {
    hash: String,
    /// `namespace/name` of each pipeline left out, with why.
    problems: HashMap<String, Desired>,
}

/// What the LogPipeline controller keeps besides the shared [`Context`].
struct PipelineState {
    rendered: watch::Receiver<Option<Rendered>>,
    /// When each pipeline's status was last written (rollout progress is written at most
    /// once per [`PROGRESS_WRITE_INTERVAL`]).
    written: Mutex<HashMap<String, std::time::Instant>>,
    agents: Store<Pod>,
    /// Node labels; absent when the install cannot read Nodes (namespace-scoped).
    nodes: Option<Store<PartialObjectMeta<Node>>>,
}

/// Runs the LogPipeline controller until `stop` fires.
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
    // Nodes are cluster-scoped: only a cluster-wide install may read them
    let (nodes, node_driver) = if ctx.scope == WatchNamespace::All {
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

    let (rendered_tx, rendered) = watch::channel(None);
    let render_done = changes_of(rendered.clone());
    let state = Arc::new(PipelineState {
        rendered,
        written: Mutex::new(HashMap::new()),
        agents,
        nodes,
    });
    let renderer = render_loop(
        ctx.clone(),
        pipelines.clone(),
        shared.secrets.stores(),
        render_needed,
        rendered_tx,
        stop.clone(),
    );
    let (controller, queue) = runtime::controller::<LogPipeline>(&ctx, trigger, pipelines);
    let controller = controller.reconcile_all_on(futures::stream::select_all([
        agent_changes.boxed(),
        node_driver,
        render_done.boxed(),
    ]));
    let reconcile = runtime::reconciler(queue, move |lp, ctx| {
        let state = state.clone();
        async move { reconcile(lp, ctx, state).await }
    });
    tokio::select! {
        () = runtime::drive(controller, stop.clone(), ctx, reconcile) => {}
        () = renderer => {}
        () = secret_changes => {}
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

/// The singleton render task: renders whenever asked (debounced), publishes the result.
async fn render_loop(
    ctx: Arc<Context>,
    pipelines: Store<DeserializeGuard<LogPipeline>>,
    secrets: Stores<PartialObjectMeta<Secret>>,
    needed: Arc<Notify>,
    out: watch::Sender<Option<Rendered>>,
    stop: CancellationToken,
) {
    let written: Mutex<Option<String>> = Mutex::new(None);
    let backoff = crate::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut failures = 0u32;
    loop {
        tokio::select! {
            () = needed.notified() => {}
            () = stop.cancelled() => return,
        }
        tokio::time::sleep(RENDER_DEBOUNCE).await;
        if pipelines.wait_until_ready().await.is_err() {
            return;
        }
        let rendered = render(&pipelines, &secrets, &ctx.tenants, &ctx.agent_paths);
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

/// Why a pipeline is left out of the agent config; `None` when it is valid. Secrets are
/// checked for existence from the shared metadata cache (their values are the agent's).
fn problem(
    lp: &LogPipeline,
    secrets: &Stores<PartialObjectMeta<Secret>>,
    tenants: &Tenants,
    paths: &AgentPaths,
) -> Option<Desired> {
    let ns = lp.namespace().unwrap_or_default();
    if let Some(why) = tenants.refusal(&ns) {
        return Some(Desired::new(READY, false, "NamespaceNotOptedIn", why));
    }
    let entry = PipelineEntry {
        namespace: ns.clone(),
        name: lp.name_any(),
        spec: lp.spec.clone(),
    };
    let pipeline = match validate(entry) {
        Ok(p) => p,
        Err(e) => return Some(Desired::new(READY, false, "InvalidSpec", e.to_string())),
    };
    if let Err((field, why)) =
        check_pipeline(&pipeline, &paths.confine, paths.file_output_dir.as_deref())
    {
        return Some(Desired::new(
            READY,
            false,
            "PathNotAllowed",
            format!("{field}: {why} (the node agents' agent.logRoots / agent.fileOutputDir)"),
        ));
    }
    if let Err((field, why)) = check_limits(&pipeline, &paths.limits) {
        return Some(Desired::new(
            READY,
            false,
            "LimitExceeded",
            format!("{field}: {why}"),
        ));
    }
    for (output, secret) in secret_refs(&lp.spec) {
        if secrets.get(&ObjectRef::new(&secret).within(&ns)).is_none() {
            return Some(Desired::new(
                READY,
                false,
                "SecretNotFound",
                format!(
                    "Secret {secret:?} (spec.outputs[{output}].secretRef) does not exist in this namespace"
                ),
            ));
        }
    }
    None
}

/// `(output name, Secret name)` of every output that names a Secret.
fn secret_refs(spec: &LogPipelineSpec) -> Vec<(String, String)> {
    spec.outputs
        .iter()
        .filter_map(|o| {
            let r = o
                .loki
                .as_ref()
                .and_then(|s| s.secret_ref.as_ref())
                .or_else(|| o.elasticsearch.as_ref().and_then(|s| s.secret_ref.as_ref()))
                .or_else(|| o.http.as_ref().and_then(|s| s.secret_ref.as_ref()))?;
            Some((o.name.clone(), r.name.clone()))
        })
        .collect()
}

/// Renders every valid pipeline of the cache: the result and the config text.
fn render(
    pipelines: &Store<DeserializeGuard<LogPipeline>>,
    secrets: &Stores<PartialObjectMeta<Secret>>,
    tenants: &Tenants,
    paths: &AgentPaths,
) -> (Rendered, String) {
    // a pipeline that does not deserialize is skipped (its own reconcile reports it)
    let mut all: Vec<LogPipeline> = pipelines
        .state()
        .iter()
        .filter_map(|g| g.0.as_ref().ok().cloned())
        .collect();
    all.sort_by_key(|lp| (lp.namespace(), lp.name_any()));
    let mut entries = Vec::new();
    let mut problems = HashMap::new();
    for lp in &all {
        let key = format!("{}/{}", lp.namespace().unwrap_or_default(), lp.name_any());
        match problem(lp, secrets, tenants, paths) {
            Some(p) => {
                problems.insert(key, p);
            }
            None => entries.push(PipelineEntry {
                namespace: lp.namespace().unwrap_or_default(),
                name: lp.name_any(),
                spec: lp.spec.clone(),
            }),
        }
    }
    let text = serde_yaml::to_string(&AgentConfigFile { pipelines: entries }).unwrap_or_default();
    let hash = config_hash(text.as_bytes());
    (Rendered { hash, problems }, text)
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
fn rollout(state: &PipelineState, lp: &LogPipeline, hash: &str) -> NodeCounts {
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
            if !selects(lp.spec.node_selector.as_ref(), labels) {
                continue;
            }
        }
        counts.desired += 1;
        let ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if ready {
            counts.ready += 1;
            if pod
                .annotations()
                .get(CONFIG_HASH_ANNOTATION)
                .map(String::as_str)
                == Some(hash)
            {
                counts.updated += 1;
            }
        }
    }
    counts
}

async fn reconcile(
    lp: Obj<LogPipeline>,
    ctx: Arc<Context>,
    state: Arc<PipelineState>,
) -> Result<Action, Error> {
    let ns = lp.ns()?;
    let Some(rendered) = state.rendered.borrow().clone() else {
        // not rendered yet: the first render reconciles every pipeline
        return Ok(Action::requeue(Duration::from_secs(2)));
    };
    let me = format!("{ns}/{}", lp.name_any());
    let old = lp.status.clone().unwrap_or_default();
    let (ready, config_hash, nodes) = match rendered.problems.get(&me) {
        Some(problem) => (problem.clone(), None, None),
        None => {
            let nodes = rollout(&state, &lp, &rendered.hash);
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
        observed_generation: lp.metadata.generation,
        config_hash,
        nodes,
        conditions: conditions::merge(
            &old.conditions,
            std::slice::from_ref(&ready),
            lp.metadata.generation,
            &Time(Timestamp::now()),
        ),
    };
    if lp.status.as_ref() != Some(&new) {
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
        &*lp,
        (lp.status.as_ref(), &new),
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
    fn secret_refs_name_the_secret_of_every_sink_kind() {
        let spec: LogPipelineSpec = serde_yaml::from_str(
            r#"
inputs: [{name: app, paths: ["/var/log/app.log"]}]
outputs:
  - {name: loki, loki: {url: "https://loki:3100", encoding: protobuf, secretRef: {name: loki-ca}}}
  - {name: es, elasticsearch: {url: "https://es:9200", index: logs, secretRef: {name: es-tls}}}
  - {name: web, http: {url: "https://rx/ingest", secretRef: {name: rx-creds}}}
  - {name: plain, http: {url: "http://rx/ingest"}}
  - {name: disk, file: {path: /var/log/out.ndjson}}
"#,
        )
        .unwrap();
        let pair = |o: &str, s: &str| (o.to_string(), s.to_string());
        assert_eq!(
            secret_refs(&spec),
            [
                pair("loki", "loki-ca"),
                pair("es", "es-tls"),
                pair("web", "rx-creds")
            ]
        );
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
