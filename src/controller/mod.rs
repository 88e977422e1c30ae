//! kube-runtime adapters, one file per kind: read the object, call the engine, write
//! status, emit Events. The shared machinery (status writes, conditions, backoff, leader
//! election, the watch stream) lives beside them.

pub mod backoff;
pub mod conditions;
pub mod deployment_plan;
pub mod inventory;
pub mod leader;
pub mod log_pipeline;
pub mod runtime;
pub mod status;

use std::sync::Arc;

use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use tokio_util::sync::CancellationToken;

use crate::telemetry::Metrics;

/// Everything a reconciler needs, built once in `main` and shared.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub backoff: backoff::ErrorBackoff,
    /// Only this namespace is watched when set; all namespaces otherwise.
    pub namespace: Option<String>,
    /// DeploymentPlan runs in progress (background tasks), by namespace/name.
    pub plans: deployment_plan::Runs,
    /// The operator's own namespace: the node agents' ConfigMap and Pods live there.
    pub operator_namespace: String,
}

impl Context {
    pub fn new(
        client: Client,
        metrics: Metrics,
        instance: Option<String>,
        namespace: Option<String>,
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
            namespace,
            plans: deployment_plan::Runs::default(),
            operator_namespace,
        }
    }
}

/// Errors a reconcile can return; each becomes a retry with per-object backoff.
/// Problems with the user's objects are not errors: they become status conditions.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("object has no namespace")]
    NoNamespace,
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    /// Short static category for metrics labels and Event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube_api",
            Error::NoNamespace => "invalid_object",
            Error::Finalizer(_) => "finalizer",
        }
    }
}

/// Runs every kind's controller until `stop` fires, then lets in-flight reconciles (and
/// their status writes) finish before returning.
pub async fn run(ctx: Arc<Context>, stop: CancellationToken) {
    tokio::join!(
        inventory::run(ctx.clone(), stop.clone()),
        deployment_plan::run(ctx.clone(), stop.clone()),
        log_pipeline::run(ctx, stop),
    );
}
