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
