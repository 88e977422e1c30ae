//! Logs, metrics and the health endpoints every role serves.
//!
//! One [`Metrics`] registry is built in `main` and shared; `/metrics`, `/healthz` and
//! `/readyz` are served from [`serve`] on the address the operator configures.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

pub use crate::liveness::{Liveness, Running};

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Installs the global tracing subscriber; `RUST_LOG` overrides the default filter.
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,kube=warn,kube_lease_manager=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Labels of per-kind metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

/// Labels of error metrics: the kind and a short static category (never user data).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: String,
    pub category: String,
}

/// Label of plan run results: Succeeded, Failed or RolledBack.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

/// Labels of one probe's series, as blackbox_exporter has them: the HealthCheck
/// (`namespace/name`), the target (host or endpoint) and the probe (check or endpoint name).
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct ProbeLabels {
    pub check: String,
    pub target: String,
    pub probe: String,
}

/// Labels of the targets-per-state gauge of one HealthCheck.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckStateLabels {
    pub check: String,
    pub state: String,
}

/// Labels of the hosts-per-state gauge of one SecurityPolicy.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyStateLabels {
    pub policy: String,
    pub state: String,
}

/// Labels of Inventory host gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InventoryStateLabels {
    /// `namespace/name`.
    pub inventory: String,
    /// `reachable` or `unreachable` at the last probe.
    pub state: String,
}

/// The operator's metrics. Cheap to clone: every family is reference-counted.
#[derive(Clone)]
pub struct Metrics {
    pub reconciles: Family<KindLabel, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Family<KindLabel, Histogram>,
    pub queue_depth: Family<KindLabel, Gauge>,
    pub leader: Gauge,
    /// DeploymentPlan runs that ended, per result.
    pub plan_runs: Family<ResultLabel, Counter>,
    /// Duration of one stage (all its attempts) on one host.
    pub plan_host_stage_duration: Histogram,
    /// Hosts with a plan stage in progress, over all plans.
    pub plan_hosts_in_flight: Gauge,
    /// Status writes sent to the API server, per kind (writes skipped as unchanged are not
    /// counted): the cost the controller puts on the API server.
    pub status_writes: Family<KindLabel, Counter>,
    /// 1 when the probe's last result passed, else 0.
    pub probe_success: Family<ProbeLabels, Gauge>,
    /// Seconds the probe's last run took.
    pub probe_duration: Family<ProbeLabels, Gauge<f64, AtomicU64>>,
    /// The probe's last measured value (percent, load per core, ms, days).
    pub probe_value: Family<ProbeLabels, Gauge<f64, AtomicU64>>,
    /// Targets per state, per HealthCheck.
    pub check_state: Family<CheckStateLabels, Gauge>,
    /// How late a HealthCheck round started against its schedule.
    pub health_schedule_lag: Histogram,
    /// HealthCheck rounds run.
    pub health_rounds: Counter,
    /// SSH connections opened by HealthChecks (a steady state opens none).
    pub health_handshakes: Counter,
    /// Hosts per state (applied, drifted, failed, rolled_back, pending), per SecurityPolicy.
    pub policy_hosts: Family<PolicyStateLabels, Gauge>,
    /// Ruleset pushes to one host, per result (applied, failed, rolled_back).
    pub policy_applies: Family<ResultLabel, Counter>,
    /// SecurityPolicy passes (read every host, push where needed).
    pub policy_passes: Counter,
    /// Hosts per probe result (reachable, unreachable), per Inventory: what an
    /// "hosts unreachable" alert watches.
    pub inventory_hosts: Family<InventoryStateLabels, Gauge>,
    /// Running reconciles, for `/healthz`.
    pub liveness: Liveness,
}

impl Metrics {
    /// Creates the metrics and registers them under the `outrider` prefix.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            reconciles: Family::default(),
            reconcile_errors: Family::default(),
            reconcile_duration: Family::new_with_constructor(|| {
                Histogram::new([
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ])
            }),
            queue_depth: Family::default(),
            leader: Gauge::default(),
            plan_runs: Family::default(),
            plan_host_stage_duration: Histogram::new([
                0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0,
            ]),
            plan_hosts_in_flight: Gauge::default(),
            status_writes: Family::default(),
            probe_success: Family::default(),
            probe_duration: Family::default(),
            probe_value: Family::default(),
            check_state: Family::default(),
            health_schedule_lag: Histogram::new([
                0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            health_rounds: Counter::default(),
            health_handshakes: Counter::default(),
            policy_hosts: Family::default(),
            policy_applies: Family::default(),
            policy_passes: Counter::default(),
            inventory_hosts: Family::default(),
            liveness: Liveness::default(),
        };
        let r = registry.sub_registry_with_prefix("outrider");
        r.register(
            "reconciles",
            "Reconciles started, per kind",
            m.reconciles.clone(),
        );
        r.register(
            "reconcile_errors",
            "Reconciles that failed, per kind and error category",
            m.reconcile_errors.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile, per kind",
            m.reconcile_duration.clone(),
        );
        r.register(
            "reconcile_queue_depth",
            "Objects changed but not yet reconciled, per kind",
            m.queue_depth.clone(),
        );
        r.register(
            "leader",
            "1 while this replica holds the leader Lease",
            m.leader.clone(),
        );
        r.register(
            "plan_runs",
            "DeploymentPlan runs that ended, per result",
            m.plan_runs.clone(),
        );
        r.register(
            "plan_host_stage_duration_seconds",
            "Time one plan stage took on one host, retries included",
            m.plan_host_stage_duration.clone(),
        );
        r.register(
            "status_writes",
            "Status writes sent to the API server, per kind",
            m.status_writes.clone(),
        );
        r.register(
            "probe_success",
            "1 when the HealthCheck probe's last result passed",
            m.probe_success.clone(),
        );
        r.register(
            "probe_duration_seconds",
            "Time the HealthCheck probe's last run took",
            m.probe_duration.clone(),
        );
        r.register(
            "probe_value",
            "The HealthCheck probe's last measured value",
            m.probe_value.clone(),
        );
        r.register(
            "check_state",
            "HealthCheck targets per state",
            m.check_state.clone(),
        );
        r.register(
            "health_schedule_lag_seconds",
            "How late a HealthCheck round started against its schedule",
            m.health_schedule_lag.clone(),
        );
        r.register(
            "health_rounds",
            "HealthCheck rounds run",
            m.health_rounds.clone(),
        );
        r.register(
            "health_ssh_handshakes",
            "SSH connections opened by HealthChecks",
            m.health_handshakes.clone(),
        );
        r.register(
            "inventory_hosts",
            "Inventory hosts per result of the last reachability probe",
            m.inventory_hosts.clone(),
        );
        r.register(
            "policy_hosts",
            "SecurityPolicy target hosts per state",
            m.policy_hosts.clone(),
        );
        r.register(
            "policy_applies",
            "SecurityPolicy ruleset pushes to one host, per result",
            m.policy_applies.clone(),
        );
        r.register(
            "policy_passes",
            "SecurityPolicy passes (every host read, pushed where needed)",
            m.policy_passes.clone(),
        );
        r.register(
            "plan_hosts_in_flight",
            "Hosts with a DeploymentPlan stage in progress",
            m.plan_hosts_in_flight.clone(),
        );
        m
    }

    /// Counts a reconcile and returns a guard that records its duration when dropped,
    /// so no early return can forget to.
    /// `what` names the object for `/healthz` should this reconcile never return.
    pub fn reconcile_started(&self, kind: &str, what: &str) -> ReconcileTimer {
        let label = KindLabel {
            kind: kind.to_string(),
        };
        self.reconciles.get_or_create(&label).inc();
        ReconcileTimer {
            start: Instant::now(),
            histogram: self.reconcile_duration.get_or_create(&label).clone(),
            _running: self.liveness.running(what.to_string()),
        }
    }

    /// Counts one status write of `kind`.
    pub fn status_written(&self, kind: &str) {
        self.status_writes
            .get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
            .inc();
    }

    /// Counts a failed reconcile under a static category.
    pub fn reconcile_failed(&self, kind: &str, category: &'static str) {
        self.reconcile_errors
            .get_or_create(&ErrorLabels {
                kind: kind.to_string(),
                category: category.to_string(),
            })
            .inc();
    }
}

/// Records a reconcile's duration on drop.
pub struct ReconcileTimer {
    start: Instant,
    histogram: Histogram,
    _running: Running,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

/// Readiness shared between the process and `/readyz`.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
struct HttpState {
    registry: Arc<Registry>,
    ready: Readiness,
    liveness: Liveness,
}

/// Errors of the health/metrics server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// Binds `addr` and returns the bound address plus the server future, so callers (and
/// tests using port 0) learn the real port before serving starts.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    ready: Readiness,
    liveness: Liveness,
) -> Result<(SocketAddr, impl Future<Output = Result<(), ServeError>>), ServeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(HttpState {
            registry,
            ready,
            liveness,
        });
    Ok((local, async move {
        axum::serve(listener, app).await.map_err(ServeError::Serve)
    }))
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("encoding metrics failed: {e}"),
        ),
    }
}

/// Fails (503, naming what is stuck) when the process no longer makes progress, so the kubelet
/// restarts it; answering at all already proves the async runtime runs.
async fn healthz(State(state): State<HttpState>) -> impl IntoResponse {
    match state.liveness.check(Instant::now()) {
        Ok(()) => (StatusCode::OK, "ok".to_string()),
        Err(stuck) => {
            tracing::error!(%stuck, "liveness check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("wedged: {stuck}\n"),
            )
        }
    }
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    if state.ready.get() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconcile_timer_records_one_observation_per_reconcile() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        {
            let _t = metrics.reconcile_started("Inventory", "Inventory/ns/a");
        }
        metrics.reconcile_failed("Inventory", "secret");
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(
            out.contains(r#"outrider_reconciles_total{kind="Inventory"} 1"#),
            "{out}"
        );
        assert!(
            out.contains(r#"outrider_reconcile_duration_seconds_count{kind="Inventory"} 1"#),
            "{out}"
        );
        assert!(
            out.contains(
                r#"outrider_reconcile_errors_total{kind="Inventory",category="secret"} 1"#
            ),
            "{out}"
        );
    }

    #[tokio::test]
    async fn healthz_fails_naming_the_stuck_reconcile_and_recovers_when_it_returns() {
        let liveness = Liveness::new(std::time::Duration::from_millis(1));
        let (addr, server) = serve(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(Registry::default()),
            Readiness::default(),
            liveness.clone(),
        )
        .await
        .unwrap();
        tokio::spawn(server);
        let url = format!("http://{addr}/healthz");
        let get = || async {
            let r = reqwest::get(&url).await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        };
        assert_eq!(get().await, (200, "ok".to_string()));
        let stuck = liveness.running("HealthCheck/tenant-a/web".into());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let (code, body) = get().await;
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("HealthCheck/tenant-a/web"), "{body}");
        drop(stuck);
        assert_eq!(get().await, (200, "ok".to_string()));
    }
}
