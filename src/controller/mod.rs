//! kube-runtime adapters, one folder per kind, all of one shape: `run` builds the kind's
//! controller with [`runtime::controller`] (adding only its `watches`/`owns`), and a plain
//! `async fn reconcile(&K, &Context) -> Result<Action, Error>` wrapped by
//! [`runtime::reconciler`] does validate → resolve → act → report. Long-running work
//! (plan runs, inventory probing) goes through the [`tasks`] registry and writes status
//! through a [`status::StatusWriter`]; short reconciles report through
//! [`conditions::report`]. The shared machinery lives beside the kinds.

pub mod backoff;
pub mod conditions;
pub mod deployment_plan;
pub mod health_check;
pub mod inventory;
pub mod leader;
pub mod log_pipeline;
pub mod runtime;
pub mod security_policy;
pub mod status;
pub mod tasks;

use std::sync::Arc;

use k8s_openapi::NamespaceResourceScope;
use kube::runtime::events::{Recorder, Reporter};
use kube::{Api, Client, Resource};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Metrics;

/// Handshakes in flight at once over every SSH fleet of the process.
pub const MAX_HANDSHAKES: usize = 32;

/// Which namespaces the controller watches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchNamespace {
    All,
    One(String),
}

impl WatchNamespace {
    pub fn from_option(ns: Option<String>) -> Self {
        ns.map_or(WatchNamespace::All, WatchNamespace::One)
    }
}

/// The namespaces whose Secrets the controller may read and where it may run Jobs: all
/// (`--tenant-namespaces` unset), or only those that opted in (the chart binds its
/// `<release>-tenant` ClusterRole in each). Objects elsewhere are reported
/// `Ready=False/NamespaceNotOptedIn` and left alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tenants {
    All,
    Only(std::collections::BTreeSet<String>),
}

impl Tenants {
    pub fn from_list(namespaces: Vec<String>) -> Self {
        if namespaces.is_empty() {
            Tenants::All
        } else {
            Tenants::Only(namespaces.into_iter().collect())
        }
    }

    /// May the controller act for objects of `namespace`?
    pub fn admits(&self, namespace: &str) -> bool {
        match self {
            Tenants::All => true,
            Tenants::Only(set) => set.contains(namespace),
        }
    }

    /// Why an object of `namespace` is left alone; `None` when it is admitted.
    pub fn refusal(&self, namespace: &str) -> Option<String> {
        (!self.admits(namespace)).then(|| {
            format!(
                "namespace {namespace:?} has not opted in to Outrider: the controller may not read its Secrets or run Jobs in it (an admin adds it to the chart's rbac.tenantNamespaces)"
            )
        })
    }
}

/// Everything a reconciler needs, built once in `main` and shared. Kind-specific state
/// lives with the kind (captured by its reconcile closure), not here.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub backoff: backoff::ErrorBackoff,
    pub scope: WatchNamespace,
    /// The operator's own namespace: the node agents' ConfigMap and Pods live there.
    pub operator_namespace: String,
    /// The process-wide cap on SSH handshakes in flight, handed to every Fleet.
    pub handshakes: Arc<Semaphore>,
    /// Long-running per-object work (plan runs, inventory probes).
    pub tasks: tasks::Registry,
    /// Job stages may ask for host access or another ServiceAccount
    /// (`--allow-privileged-jobs`); refused by default.
    pub allow_privileged_jobs: bool,
    /// Where Secrets are read and Jobs run (`--tenant-namespaces`).
    pub tenants: Tenants,
    /// What the node agents may read and write (`--agent-allowed-roots`,
    /// `--agent-file-output-dir`): a LogPipeline outside them is `Ready=False`, not rendered.
    pub agent_paths: AgentPaths,
}

/// The node agents' path limits as the chart gives them to both the agents and the controller.
#[derive(Clone, Debug, Default)]
pub struct AgentPaths {
    pub confine: crate::agent::confine::Confinement,
    pub file_output_dir: Option<std::path::PathBuf>,
    /// Labels selecting the ClusterLogPipelines this controller renders (see `main`).
    pub cluster_pipeline_selector: Option<String>,
    /// The agents' caps on buffer and batch sizes (`--agent-max-*`, chart `agent.limits`).
    pub limits: crate::agent::limits::Limits,
}

impl Context {
    pub fn new(
        client: Client,
        metrics: Metrics,
        instance: Option<String>,
        scope: WatchNamespace,
        operator_namespace: String,
    ) -> Self {
        let reporter = Reporter {
            controller: "outrider".into(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            backoff: backoff::ErrorBackoff::default(),
            scope,
            operator_namespace,
            handshakes: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
            tasks: tasks::Registry::default(),
            allow_privileged_jobs: false,
            tenants: Tenants::All,
            agent_paths: AgentPaths::default(),
        }
    }

    /// An Api over the watched scope (one namespace, or all).
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        match &self.scope {
            WatchNamespace::All => Api::all(self.client.clone()),
            WatchNamespace::One(ns) => Api::namespaced(self.client.clone(), ns),
        }
    }

    /// One Api per namespace the tenants allow, for the kinds only tenants grant
    /// (Secrets, Jobs): a single Api over the watched scope when every namespace is allowed.
    pub fn tenant_apis<K>(&self) -> Vec<Api<K>>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        match (&self.tenants, &self.scope) {
            (Tenants::Only(set), WatchNamespace::All) => {
                set.iter().map(|ns| self.api_in(ns)).collect()
            }
            (Tenants::Only(set), WatchNamespace::One(ns)) => set
                .contains(ns)
                .then(|| self.api_in(ns))
                .into_iter()
                .collect(),
            (Tenants::All, _) => vec![self.api()],
        }
    }

    /// An Api in one namespace (an object's own).
    pub fn api_in<K>(&self, namespace: &str) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), namespace)
    }
}

/// Where in a reconcile an error happened: the `category` label of
/// `outrider_reconcile_errors_total`, as stackable's operators label theirs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Reading what the object refers to (Inventory, Secret, pinned keys, raw spec).
    Resolve,
    /// Doing the work: Jobs, ConfigMaps, pinned keys.
    Apply,
    /// Writing status.
    Status,
    /// Deleting what a deleted object leaves behind.
    Cleanup,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Resolve => "resolve",
            Stage::Apply => "apply",
            Stage::Status => "status",
            Stage::Cleanup => "cleanup",
        }
    }
}

/// Errors a reconcile can return; each becomes a retry with per-object backoff.
/// Problems with the user's objects are not errors: they become status conditions.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed while {}: {source}", .stage.as_str())]
    Kube {
        stage: Stage,
        #[source]
        source: kube::Error,
    },
    #[error("object has no namespace")]
    NoNamespace,
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// A bug met by this object: the reconcile panicked. The process goes on; the object
    /// is retried with backoff like any failure.
    #[error("reconcile panicked: {0}")]
    Panicked(String),
}

impl Error {
    /// Short static category for metrics labels and Event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube { stage, .. } => stage.as_str(),
            Error::NoNamespace => "invalid_object",
            Error::Panicked(_) => "panic",
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.category(),
                _ => "finalizer",
            },
        }
    }
}

/// Tags a kube result with the reconcile stage it belongs to.
pub trait At<T> {
    fn at(self, stage: Stage) -> Result<T, Error>;
}

impl<T> At<T> for Result<T, kube::Error> {
    fn at(self, stage: Stage) -> Result<T, Error> {
        self.map_err(|source| Error::Kube { stage, source })
    }
}

/// Runs every kind's controller until `stop` fires, then lets in-flight reconciles (and
/// their status writes) finish and stops the long-running tasks before returning.
pub async fn run(ctx: Arc<Context>, stop: CancellationToken) {
    let shared = runtime::Shared::start(&ctx);
    tokio::join!(
        shared.drive(stop.clone()),
        inventory::run(ctx.clone(), &shared, stop.clone()),
        deployment_plan::run(ctx.clone(), &shared, stop.clone()),
        health_check::run(ctx.clone(), &shared, stop.clone()),
        security_policy::run(ctx.clone(), &shared, stop.clone()),
        log_pipeline::run(ctx.clone(), &shared, stop),
    );
    ctx.tasks.shutdown(tasks::SHUTDOWN_GRACE).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Secret;

    fn context(scope: WatchNamespace, tenants: Tenants) -> Context {
        // never connects: only request URLs are looked at
        let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        let client = Client::try_from(config).unwrap();
        let metrics = Metrics::new(&mut prometheus_client::registry::Registry::default());
        let mut ctx = Context::new(client, metrics, None, scope, "ops".into());
        ctx.tenants = tenants;
        ctx
    }

    fn urls(ctx: &Context) -> Vec<String> {
        ctx.tenant_apis::<Secret>()
            .iter()
            .map(|a| a.resource_url().to_string())
            .collect()
    }

    #[tokio::test]
    async fn secrets_are_watched_only_in_opted_in_namespaces_never_cluster_wide() {
        let only = |v: &[&str]| Tenants::from_list(v.iter().map(|s| s.to_string()).collect());
        assert_eq!(
            urls(&context(WatchNamespace::All, only(&["b", "a"]))),
            [
                "/api/v1/namespaces/a/secrets",
                "/api/v1/namespaces/b/secrets"
            ]
        );
        assert_eq!(
            urls(&context(WatchNamespace::All, only(&[]))),
            ["/api/v1/secrets"]
        );
        // watching one namespace: it, if it opted in; else nothing at all
        assert_eq!(
            urls(&context(WatchNamespace::One("a".into()), only(&["a"]))),
            ["/api/v1/namespaces/a/secrets"]
        );
        assert!(urls(&context(WatchNamespace::One("c".into()), only(&["a"]))).is_empty());
    }

    #[test]
    fn only_listed_namespaces_are_admitted_and_the_refusal_says_how_to_opt_in() {
        let t = Tenants::from_list(vec!["shop".into()]);
        assert!(t.admits("shop") && !t.admits("other"));
        assert!(t.refusal("shop").is_none());
        let why = t.refusal("other").unwrap();
        assert!(
            why.contains("\"other\"") && why.contains("rbac.tenantNamespaces"),
            "{why}"
        );
        assert!(Tenants::All.admits("anything"));
    }
}
