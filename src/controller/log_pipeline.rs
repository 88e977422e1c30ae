//! LogPipeline controller: validates every pipeline the way the agent will (regexes compile,
//! URLs parse, referenced Secrets exist), renders the valid ones into ONE ConfigMap the node
//! agents mount (`outrider-agent`, key `agent.yaml`, in the operator's namespace, with the
//! content hash as an annotation), and reports each pipeline's rollout: how many selected
//! nodes run an agent, how many are ready, and how many report the current config hash.
//!
//! A broken pipeline is left out of the rendered config and reported on its own status, so it
//! never takes the others down. Agents report the hash of the config they run as the
//! annotation `outrider.dev/config-hash` on their own Pod.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams};
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;

use super::conditions::{self, Desired};
use super::runtime;
use super::{Context, Error, status};
use crate::agent::config::{AgentConfigFile, PipelineEntry, validate};
use crate::agent::report::{CONFIG_HASH_ANNOTATION, config_hash};
use crate::api::FIELD_MANAGER;
use crate::api::log_pipeline::{LogPipeline, LogPipelineSpec, LogPipelineStatus, NodeCounts};

const KIND: &str = "LogPipeline";
const READY: &str = "Ready";
/// The agent configuration: this ConfigMap, this key, in the operator's namespace.
pub const AGENT_CONFIGMAP: &str = "outrider-agent";
pub const AGENT_CONFIG_KEY: &str = "agent.yaml";
/// Label selecting the node agents' Pods.
pub const AGENT_POD_SELECTOR: &str = "app.kubernetes.io/name=outrider-agent";
/// Rollout state is re-read this often even without a Pod change.
const RESYNC: Duration = Duration::from_secs(60);

/// Runs the LogPipeline controller until `stop` fires.
pub async fn run(ctx: Arc<Context>, stop: CancellationToken) {
    let pipelines: Api<DeserializeGuard<LogPipeline>> = match &ctx.namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let pods: Api<PartialObjectMeta<Pod>> =
        Api::namespaced(ctx.client.clone(), &ctx.operator_namespace);
    let queue = runtime::queue_depth(&ctx, KIND);
    let (trigger, store) = runtime::watch::<LogPipeline>(pipelines.clone(), queue.clone());
    // any change of an agent Pod (created, ready, reporting a hash) re-reads every rollout
    let agent_changes = watcher(
        pods,
        watcher::Config::default()
            .labels(AGENT_POD_SELECTOR)
            .any_semantic(),
    )
    .default_backoff()
    .touched_objects()
    .map(|_| ());
    // a deleted pipeline leaves the rendered config: re-render on every deletion
    let deletions = {
        let ctx = ctx.clone();
        let metas: Api<PartialObjectMeta<LogPipeline>> = match &ctx.namespace {
            Some(ns) => Api::namespaced(ctx.client.clone(), ns),
            None => Api::all(ctx.client.clone()),
        };
        watcher(metas, watcher::Config::default().any_semantic())
            .default_backoff()
            .for_each(move |event| {
                let ctx = ctx.clone();
                async move {
                    if let Ok(watcher::Event::Delete(_)) = event
                        && let Err(e) = render(&ctx).await
                    {
                        tracing::warn!(error = %e, "re-rendering the agent config after a deletion failed");
                    }
                }
            })
    };
    let controller = Controller::for_stream(trigger, store)
        .reconcile_all_on(agent_changes)
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(
            move |obj, ctx| {
                queue.started(&runtime::object_key(obj.as_ref()));
                reconcile(obj, ctx)
            },
            runtime::error_policy,
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));
    tokio::select! {
        () = controller => {}
        () = deletions => {}
    }
}

/// Why a pipeline is left out of the agent config; `None` when it is valid.
async fn problem(ctx: &Context, lp: &LogPipeline) -> Result<Option<Desired>, Error> {
    let ns = lp.namespace().unwrap_or_default();
    let entry = PipelineEntry {
        namespace: ns.clone(),
        name: lp.name_any(),
        spec: lp.spec.clone(),
    };
    if let Err(e) = validate(entry) {
        return Ok(Some(Desired::new(
            READY,
            false,
            "InvalidSpec",
            e.to_string(),
        )));
    }
    // Existence only (metadata; the controller never reads Secret values). Which keys a
    // Secret holds (credentials and/or TLS: `ca.crt`, `tls.crt` + `tls.key`) and whether
    // its PEM parses is the agent's to check, where the values are mounted.
    let secrets: Api<PartialObjectMeta<Secret>> = Api::namespaced(ctx.client.clone(), &ns);
    for (output, secret) in secret_refs(&lp.spec) {
        if secrets.get_metadata_opt(&secret).await?.is_none() {
            return Ok(Some(Desired::new(
                READY,
                false,
                "SecretNotFound",
                format!(
                    "Secret {secret:?} (spec.outputs[{output}].secretRef) does not exist in this namespace"
                ),
            )));
        }
    }
    Ok(None)
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

/// The rendered agent configuration.
struct Rendered {
    hash: String,
    /// `namespace/name` of each pipeline left out, with why.
    problems: HashMap<String, Desired>,
}

/// Renders every valid pipeline into the agent ConfigMap (written only when it changed).
async fn render(ctx: &Context) -> Result<Rendered, Error> {
    let api: Api<DeserializeGuard<LogPipeline>> = match &ctx.namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    // a pipeline that does not deserialize is skipped (its own reconcile reports it)
    let mut all: Vec<LogPipeline> = api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|g| g.0.ok())
        .collect();
    all.sort_by_key(|lp| (lp.namespace(), lp.name_any()));
    let mut pipelines = Vec::new();
    let mut problems = HashMap::new();
    for lp in &all {
        let key = format!("{}/{}", lp.namespace().unwrap_or_default(), lp.name_any());
        match problem(ctx, lp).await? {
            Some(p) => {
                problems.insert(key, p);
            }
            None => pipelines.push(PipelineEntry {
                namespace: lp.namespace().unwrap_or_default(),
                name: lp.name_any(),
                spec: lp.spec.clone(),
            }),
        }
    }
    let text = serde_yaml::to_string(&AgentConfigFile { pipelines }).unwrap_or_default();
    let hash = config_hash(text.as_bytes());
    let maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.operator_namespace);
    let current = maps.get_opt(AGENT_CONFIGMAP).await?;
    let deployed = current
        .as_ref()
        .and_then(|cm| cm.annotations().get(CONFIG_HASH_ANNOTATION).cloned());
    if deployed.as_deref() != Some(hash.as_str()) {
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(AGENT_CONFIGMAP.into()),
                namespace: Some(ctx.operator_namespace.clone()),
                annotations: Some(BTreeMap::from([(
                    CONFIG_HASH_ANNOTATION.to_string(),
                    hash.clone(),
                )])),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    "outrider".to_string(),
                )])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(AGENT_CONFIG_KEY.to_string(), text)])),
            ..Default::default()
        };
        maps.patch(
            AGENT_CONFIGMAP,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&cm),
        )
        .await?;
        tracing::info!(%hash, "rendered the agent configuration");
    }
    Ok(Rendered { hash, problems })
}

/// Whether a node's labels satisfy a selector (absent selector: every node).
fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(sel) = selector else {
        return true;
    };
    let exact = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions = sel.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    exact && expressions
}

/// Agent Pods on the nodes the pipeline selects: desired, ready, and ready with `hash`.
async fn rollout(ctx: &Context, lp: &LogPipeline, hash: &str) -> Result<NodeCounts, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.operator_namespace);
    let pods = pods
        .list(&ListParams::default().labels(AGENT_POD_SELECTOR))
        .await?
        .items;
    let nodes: Api<PartialObjectMeta<Node>> = Api::all(ctx.client.clone());
    // Nodes are cluster-scoped: a namespace-scoped install may not read them, and then every
    // agent counts (the selector cannot be evaluated)
    let node_labels: Option<HashMap<String, BTreeMap<String, String>>> =
        match nodes.list_metadata(&ListParams::default()).await {
            Ok(list) => Some(
                list.items
                    .into_iter()
                    .map(|n| (n.name_any(), n.labels().clone()))
                    .collect(),
            ),
            Err(kube::Error::Api(e)) if e.code == 403 => None,
            Err(e) => return Err(e.into()),
        };
    let mut counts = NodeCounts::default();
    for pod in &pods {
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
    Ok(counts)
}

async fn reconcile(
    guard: Arc<DeserializeGuard<LogPipeline>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started(KIND);
    let key = runtime::object_key(guard.as_ref());
    let ns = guard.namespace().ok_or(Error::NoNamespace)?;
    let Some(lp) = runtime::readable(&ctx, guard.as_ref()).await else {
        return Ok(Action::await_change());
    };
    let rendered = render(&ctx).await?;
    let me = format!("{ns}/{}", lp.name_any());
    let old = lp.status.clone().unwrap_or_default();
    let (ready, config_hash, nodes) = match rendered.problems.get(&me) {
        Some(problem) => (problem.clone(), None, None),
        None => {
            let nodes = rollout(&ctx, lp, &rendered.hash).await?;
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
    let transitioned =
        conditions::find(&old.conditions, READY).is_none_or(|c| c.reason != ready.reason);
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
    let api: Api<LogPipeline> = Api::namespaced(ctx.client.clone(), &ns);
    status::apply_if_changed(&api, &lp.name_any(), lp.status.as_ref(), &new).await?;
    if transitioned && !ready.status {
        runtime::publish_event(
            &ctx,
            lp,
            EventType::Warning,
            ready.reason,
            ready.message.clone(),
        )
        .await;
    }
    ctx.backoff.reset(&key);
    Ok(Action::requeue(RESYNC))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

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
