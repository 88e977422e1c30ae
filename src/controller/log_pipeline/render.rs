//! What goes into the agents' `agent.yaml`: every valid LogPipeline with the pods its
//! selector matches in its own namespace, and every valid ClusterLogPipeline with its
//! Secrets' namespaces filled in. A pipeline that is not valid is left out and its reason
//! kept for its own status, so it never takes the others down.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::ResourceExt;
use kube::core::{DeserializeGuard, PartialObjectMeta, Selector, SelectorExt};
use kube::runtime::reflector::{ObjectRef, Store};

use super::super::conditions::{Desired, READY};
use super::super::runtime::Stores;
use super::super::{AgentPaths, Tenants};
use crate::agent::config::{
    self, AgentConfigFile, ClusterPipelineEntry, Pipeline, PipelineEntry, PodLogs, Sources,
};
use crate::agent::confine::check_pipeline;
use crate::agent::limits::check_limits;
use crate::agent::report::config_hash;
use crate::api::cluster_log_pipeline::{ClusterLogPipeline, Output};
use crate::api::log_pipeline::{LogPipeline, SecretRef};

/// The last rendered agent configuration.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rendered {
    pub hash: String,
    /// Agent key (`namespace/name`, or `name` of a ClusterLogPipeline) of each pipeline left
    /// out, with why.
    pub problems: HashMap<String, Desired>,
}

/// What rendering reads besides the pipelines.
pub struct World<'a> {
    pub secrets: &'a Stores<PartialObjectMeta<Secret>>,
    pub pods: &'a Stores<PartialObjectMeta<Pod>>,
    pub tenants: &'a Tenants,
    pub paths: &'a AgentPaths,
    /// Where a ClusterLogPipeline's `secretRef` without a namespace points.
    pub operator_namespace: &'a str,
}

/// Renders every valid pipeline of both caches: the result and the config text.
pub fn render(
    pipelines: &Store<DeserializeGuard<LogPipeline>>,
    cluster: Option<&Store<DeserializeGuard<ClusterLogPipeline>>>,
    world: &World<'_>,
) -> (Rendered, String) {
    // a pipeline that does not deserialize is skipped (its own reconcile reports it)
    let mut tenants: Vec<LogPipeline> = pipelines
        .state()
        .iter()
        .filter_map(|g| g.0.as_ref().ok().cloned())
        .collect();
    tenants.sort_by_key(|lp| (lp.namespace(), lp.name_any()));
    let mut admins: Vec<ClusterLogPipeline> = cluster
        .map(|c| {
            c.state()
                .iter()
                .filter_map(|g| g.0.as_ref().ok().cloned())
                .collect()
        })
        .unwrap_or_default();
    admins.sort_by_key(ResourceExt::name_any);
    let pods = pods_by_namespace(world.pods);
    let mut file = AgentConfigFile::default();
    let mut problems = HashMap::new();
    for lp in &tenants {
        let key = format!("{}/{}", lp.namespace().unwrap_or_default(), lp.name_any());
        match tenant_entry(lp, &pods, world) {
            Ok(entry) => file.pipelines.push(entry),
            Err(p) => {
                problems.insert(key, p);
            }
        }
    }
    for clp in &admins {
        match cluster_entry(clp, world) {
            Ok(entry) => file.cluster_pipelines.push(entry),
            Err(p) => {
                problems.insert(clp.name_any(), p);
            }
        }
    }
    let text = serde_yaml::to_string(&file).unwrap_or_default();
    let hash = config_hash(text.as_bytes());
    (Rendered { hash, problems }, text)
}

/// Pod metadata grouped by namespace, so each pipeline only looks at its own.
fn pods_by_namespace(
    pods: &Stores<PartialObjectMeta<Pod>>,
) -> HashMap<String, Vec<Arc<PartialObjectMeta<Pod>>>> {
    let mut by: HashMap<String, Vec<_>> = HashMap::new();
    for pod in pods.state() {
        by.entry(pod.namespace().unwrap_or_default())
            .or_default()
            .push(pod);
    }
    by
}

/// A LogPipeline as the agents get it (the pods its selector matches, sorted), or why not.
fn tenant_entry(
    lp: &LogPipeline,
    pods: &HashMap<String, Vec<Arc<PartialObjectMeta<Pod>>>>,
    world: &World<'_>,
) -> Result<PipelineEntry, Desired> {
    let ns = lp.namespace().unwrap_or_default();
    if let Some(why) = world.tenants.refusal(&ns) {
        return Err(Desired::new(READY, false, "NamespaceNotOptedIn", why));
    }
    let selector = Selector::try_from(lp.spec.pods.selector.clone()).map_err(|e| {
        Desired::new(
            READY,
            false,
            "InvalidSpec",
            format!("spec.pods.selector: {e}"),
        )
    })?;
    let mut selected: Vec<PodLogs> = pods
        .get(&ns)
        .into_iter()
        .flatten()
        .filter(|p| selector.matches(p.labels()))
        .filter_map(|p| {
            Some(PodLogs {
                name: p.name_any(),
                uid: p.uid()?,
            })
        })
        .collect();
    selected.sort();
    let entry = PipelineEntry {
        namespace: ns.clone(),
        name: lp.name_any(),
        spec: lp.spec.clone(),
        pods: selected,
    };
    admitted(config::validate(entry.clone(), &sources(world)), world)?;
    Ok(entry)
}

/// A ClusterLogPipeline as the agents get it (every `secretRef` with its namespace), or why
/// not.
fn cluster_entry(
    clp: &ClusterLogPipeline,
    world: &World<'_>,
) -> Result<ClusterPipelineEntry, Desired> {
    let mut spec = clp.spec.clone();
    for o in &mut spec.outputs {
        if let Some(r) = secret_ref_mut(o) {
            r.namespace
                .get_or_insert_with(|| world.operator_namespace.to_string());
        }
    }
    let entry = ClusterPipelineEntry {
        name: clp.name_any(),
        spec,
    };
    admitted(
        config::validate_cluster(entry.clone(), &sources(world)),
        world,
    )?;
    Ok(entry)
}

fn sources(world: &World<'_>) -> Sources {
    Sources {
        default_secret_namespace: world.operator_namespace.to_string(),
        ..Sources::default()
    }
}

fn secret_ref_mut(o: &mut Output) -> Option<&mut SecretRef> {
    if let Some(l) = o.loki.as_mut() {
        l.secret_ref.as_mut()
    } else if let Some(e) = o.elasticsearch.as_mut() {
        e.secret_ref.as_mut()
    } else {
        o.http.as_mut().and_then(|h| h.secret_ref.as_mut())
    }
}

/// Whether the agents will run a pipeline as validated: what they would refuse (the spec,
/// paths, sizes) or could not find (a Secret) shows on the resource instead.
fn admitted(
    validated: Result<Pipeline, config::ConfigError>,
    world: &World<'_>,
) -> Result<(), Desired> {
    let pipeline =
        validated.map_err(|e| Desired::new(READY, false, "InvalidSpec", e.to_string()))?;
    confined(&pipeline, world)?;
    secrets_exist(&pipeline, world)
}

/// The same path and size checks the agents make, so a refusal shows on the resource.
fn confined(pipeline: &Pipeline, world: &World<'_>) -> Result<(), Desired> {
    check_pipeline(
        pipeline,
        &world.paths.confine,
        world.paths.file_output_dir.as_deref(),
    )
    .map_err(|(field, why)| {
        Desired::new(
            READY,
            false,
            "PathNotAllowed",
            format!("{field}: {why} (the node agents' agent.logRoots / agent.fileOutputDir)"),
        )
    })?;
    check_limits(pipeline, &world.paths.limits).map_err(|(field, why)| {
        Desired::new(READY, false, "LimitExceeded", format!("{field}: {why}"))
    })
}

/// Every named Secret exists (checked from the shared metadata cache; the values are the
/// agents'). A namespace the controller does not watch cannot be checked and is let pass.
fn secrets_exist(pipeline: &Pipeline, world: &World<'_>) -> Result<(), Desired> {
    for o in &pipeline.outputs {
        let Some(r) = o.kind.secret() else { continue };
        let (output, ns) = (&o.name, r.namespace.as_str());
        if world.tenants.refusal(ns).is_some() {
            continue;
        }
        if world
            .secrets
            .get(&ObjectRef::new(&r.name).within(ns))
            .is_none()
        {
            return Err(Desired::new(
                READY,
                false,
                "SecretNotFound",
                format!(
                    "Secret {:?} (spec.outputs[{output}].secretRef) does not exist in namespace {ns}",
                    r.name
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector::store::Writer;
    use kube::runtime::watcher;

    fn store<K>(objects: Vec<K>) -> Store<K>
    where
        K: kube::Resource<DynamicType = ()> + Clone + 'static,
    {
        let mut w: Writer<K> = Writer::default();
        for o in objects {
            w.apply_watcher_event(&watcher::Event::Apply(o));
        }
        w.as_reader()
    }

    fn pod(ns: &str, name: &str, uid: &str, app: &str) -> PartialObjectMeta<Pod> {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": {"app": app}}
        }))
        .unwrap()
    }

    fn lp(ns: &str, name: &str) -> DeserializeGuard<LogPipeline> {
        DeserializeGuard(Ok(serde_json::from_value(serde_json::json!({
            "apiVersion": "outrider.dev/v1alpha1", "kind": "LogPipeline",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"pods": {"selector": {"matchLabels": {"app": "shop"}}},
                "outputs": [{"name": "o", "http": {"url": "https://rx/ingest"}}]}
        }))
        .unwrap()))
    }

    fn clp(name: &str, secret: &str) -> DeserializeGuard<ClusterLogPipeline> {
        DeserializeGuard(Ok(serde_json::from_value(serde_json::json!({
            "apiVersion": "outrider.dev/v1alpha1", "kind": "ClusterLogPipeline",
            "metadata": {"name": name},
            "spec": {"inputs": [{"name": "app", "paths": ["/var/log/app/*.log"]}],
                "outputs": [{"name": "o", "http": {"url": "https://rx/ingest",
                    "secretRef": {"name": secret}}}]}
        }))
        .unwrap()))
    }

    fn secret(ns: &str, name: &str) -> PartialObjectMeta<Secret> {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": ns}
        }))
        .unwrap()
    }

    #[test]
    fn a_tenant_pipeline_gets_only_its_own_namespaces_matching_pods() {
        // a cluster-wide view: the same pod name and labels in another namespace
        let pods = Stores::new(vec![store(vec![
            pod("a", "shop-1", "uid-a1", "shop"),
            pod("a", "web-1", "uid-a2", "web"),
            pod("b", "shop-1", "uid-b1", "shop"),
            pod("a", "shop-0", "uid-a0", "shop"),
        ])]);
        let secrets = Stores::new(vec![store(vec![secret("outrider", "creds")])]);
        let paths = AgentPaths::default();
        let world = World {
            secrets: &secrets,
            pods: &pods,
            tenants: &Tenants::All,
            paths: &paths,
            operator_namespace: "outrider",
        };
        let pipelines = store(vec![lp("a", "shop")]);
        let cluster = store(vec![clp("node", "creds"), clp("other", "missing")]);
        let (rendered, text) = render(&pipelines, Some(&cluster), &world);
        let file: AgentConfigFile = serde_yaml::from_str(&text).unwrap();
        let pods: Vec<(&str, &str)> = file.pipelines[0]
            .pods
            .iter()
            .map(|p| (p.name.as_str(), p.uid.as_str()))
            .collect();
        assert_eq!(pods, [("shop-0", "uid-a0"), ("shop-1", "uid-a1")]);
        // a ClusterLogPipeline's Secret is the operator namespace's, filled in for the agents
        let names: Vec<&str> = file
            .cluster_pipelines
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, ["node"]);
        let r = file.cluster_pipelines[0].spec.outputs[0]
            .secret_ref()
            .unwrap();
        assert_eq!(r.namespace.as_deref(), Some("outrider"));
        let missing = &rendered.problems["other"];
        assert_eq!(missing.reason, "SecretNotFound");
        assert!(
            missing.message.contains("namespace outrider"),
            "{}",
            missing.message
        );
    }
}
