//! The `outrider` binary: one executable, several roles.

mod cli;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use outrider::agent::limits;
use outrider::controller::{self, Context, WatchNamespace, leader};
use outrider::telemetry::{self, LogFormat, Metrics, Readiness};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "outrider",
    version,
    about = "Day-2 operations on machines outside the cluster, from Kubernetes"
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "OUTRIDER_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print every CustomResourceDefinition as multi-document YAML (what crds/ holds).
    Crd,
    /// Run the operator.
    Controller(ControllerArgs),
    /// Run one command on every host of an Inventory file over SSH (no cluster needed).
    Exec(cli::exec::ExecArgs),
    /// Work with DeploymentPlan files locally (`plan run`: no cluster needed).
    Plan(cli::plan::PlanArgs),
    /// Try a HealthCheck file locally (`check run`: no cluster needed).
    Check(cli::check::CheckArgs),
    /// Render or push a SecurityPolicy file (`policy render`, `policy apply`: no cluster needed).
    Policy(cli::policy::PolicyArgs),
    /// Run the node log agent: tail, parse, enrich and ship log files (a DaemonSet; or
    /// `--pipeline lp.yaml` to run LogPipeline manifests with no cluster).
    Agent(cli::agent::AgentArgs),
}

#[derive(Args)]
struct ControllerArgs {
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "OUTRIDER_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Watch only this namespace (all namespaces when unset).
    #[arg(long, env = "OUTRIDER_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Elect a leader among replicas on a Lease; disable only for a single local process.
    #[arg(long, env = "OUTRIDER_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Name of the leader election Lease.
    #[arg(
        long,
        env = "OUTRIDER_LEASE_NAME",
        default_value = "outrider-controller"
    )]
    lease_name: String,
    /// The operator's namespace (the pod's, in a cluster): its Lease, and the node agents' ConfigMap and Pods.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Seconds a leader holds the Lease without renewing it.
    #[arg(long, env = "OUTRIDER_LEASE_DURATION", default_value_t = 15)]
    lease_duration: u64,
    /// Unique identity of this replica (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// A reconcile running longer than this fails `/healthz` (the liveness probe), so a wedged
    /// replica is restarted instead of holding the Lease while doing nothing.
    #[arg(long, env = "OUTRIDER_STUCK_RECONCILE_AFTER", default_value = "10m", value_parser = cli::agent::duration)]
    stuck_reconcile_after: std::time::Duration,
    /// Let DeploymentPlan Job stages ask for host paths, host namespaces, privileged
    /// containers, added capabilities or another ServiceAccount (refused by default: the
    /// controller creates the Job with its own rights).
    #[arg(long, env = "OUTRIDER_ALLOW_PRIVILEGED_JOBS")]
    allow_privileged_jobs: bool,
    /// Namespaces that opted in (comma-separated): Secrets are read and Jobs run only there,
    /// and objects elsewhere are reported `NamespaceNotOptedIn`. Unset: every namespace.
    #[arg(long, env = "OUTRIDER_TENANT_NAMESPACES", value_delimiter = ',', value_parser = namespace_name)]
    tenant_namespaces: Vec<String>,
    /// The node agents' allowed roots (the chart's `agent.logRoots`, comma-separated): a
    /// LogPipeline whose input globs start elsewhere is `Ready=False` and not rendered.
    #[arg(long, env = "OUTRIDER_AGENT_ALLOWED_ROOTS", value_delimiter = ',', default_value = "/var/log", value_parser = agent_path)]
    agent_allowed_roots: Vec<std::path::PathBuf>,
    /// The node agents' `--file-output-dir` (the chart's `agent.fileOutputDir`); unset, a
    /// LogPipeline with a `file:` output is `Ready=False`.
    #[arg(long, env = "OUTRIDER_AGENT_FILE_OUTPUT_DIR", value_parser = agent_path)]
    agent_file_output_dir: Option<std::path::PathBuf>,
    /// Only the ClusterLogPipelines with these labels (`k=v,k2=v2`). A cluster-wide
    /// controller renders every ClusterLogPipeline without it; one limited to a namespace
    /// (`--watch-namespace`) renders ClusterLogPipelines only when this is given.
    #[arg(long, env = "OUTRIDER_CLUSTER_PIPELINE_SELECTOR")]
    cluster_pipeline_selector: Option<String>,
    /// The node agents' `--max-memory-buffer` (chart `agent.limits.memoryBuffer`): a
    /// LogPipeline asking for more is `Ready=False/LimitExceeded` and not rendered.
    #[arg(long, default_value = limits::DEFAULT_MAX_MEMORY_BUFFER, value_parser = limits::parse_cap)]
    agent_max_memory_buffer: usize,
    /// The node agents' `--max-disk-buffer` (chart `agent.limits.diskBuffer`).
    #[arg(long, default_value = limits::DEFAULT_MAX_DISK_BUFFER, value_parser = limits::parse_cap)]
    agent_max_disk_buffer: usize,
    /// The node agents' `--max-batch-bytes` (chart `agent.limits.batchBytes`).
    #[arg(long, default_value = limits::DEFAULT_MAX_BATCH_BYTES, value_parser = limits::parse_cap)]
    agent_max_batch_bytes: usize,
    /// The node agents' `--max-batch-events` (chart `agent.limits.batchEvents`).
    #[arg(long, default_value_t = limits::DEFAULT_MAX_BATCH_EVENTS, value_parser = limits::parse_event_cap)]
    agent_max_batch_events: usize,
}

/// A namespace name (DNS-1123 label): it becomes part of API paths.
/// An agent path flag: absolute, no `..` (the agent's own `--allowed-root` rule).
fn agent_path(s: &str) -> Result<std::path::PathBuf, String> {
    let p = std::path::PathBuf::from(s);
    outrider::agent::confine::Confinement::check_root(&p).map_err(|e| e.to_string())?;
    Ok(p)
}

fn namespace_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not a namespace name (a DNS-1123 label)"))
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!(
                "{}",
                outrider::api::crds_yaml().context("rendering the CRDs")?
            );
            Ok(())
        }
        Command::Exec(args) => {
            telemetry::init_tracing(cli.log_format);
            let all_ok = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(cli::exec::run(args))?;
            std::process::exit(if all_ok { 0 } else { 2 });
        }
        Command::Plan(args) => {
            telemetry::init_tracing(cli.log_format);
            let succeeded = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(cli::plan::run(args))?;
            std::process::exit(if succeeded { 0 } else { 1 });
        }
        Command::Check(args) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            telemetry::init_tracing(cli.log_format);
            let healthy = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(cli::check::run(args))?;
            std::process::exit(if healthy { 0 } else { 2 });
        }
        Command::Policy(args) => {
            telemetry::init_tracing(cli.log_format);
            let ok = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(cli::policy::run(args))?;
            std::process::exit(if ok { 0 } else { 2 });
        }
        Command::Agent(args) => {
            cli::agent::limit_malloc_arenas();
            // it holds sink credentials: no core file, no ptrace by its uid
            if let Err(e) = outrider::process::no_core_dumps() {
                eprintln!("could not disable core dumps: {e}");
            }
            // reqwest uses rustls with ring, like kube: install that one provider first.
            let _ = rustls::crypto::ring::default_provider().install_default();
            telemetry::init_tracing(cli.log_format);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(async {
                    let shutdown = CancellationToken::new();
                    tokio::spawn(wait_for_signal(shutdown.clone()));
                    cli::agent::run(args, shutdown).await
                })
        }
        Command::Controller(args) => {
            // kube's TLS uses rustls; exactly one crypto provider must be installed before
            // the first TLS connection, or a second provider pulled in later would panic.
            let _ = rustls::crypto::ring::default_provider().install_default();
            telemetry::init_tracing(cli.log_format);
            // it holds every tenant's SSH keys: no core file, no ptrace by its uid
            if let Err(e) = outrider::process::no_core_dumps() {
                tracing::warn!(error = %e, "could not disable core dumps");
            }
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(run_controller(args))
        }
    }
}

async fn run_controller(args: ControllerArgs) -> anyhow::Result<()> {
    let mut config = kube::Config::infer()
        .await
        .context("loading Kubernetes client configuration")?;
    // the API server names a request's field manager (and the audit log its client) after
    // the User-Agent: without one, the finalizer's patches were recorded as "unknown"
    config.headers.push((
        reqwest::header::USER_AGENT,
        reqwest::header::HeaderValue::from_static(concat!("outrider/", env!("CARGO_PKG_VERSION"))),
    ));
    let client = kube::Client::try_from(config).context("building the Kubernetes client")?;
    let mut registry = Registry::default();
    let mut metrics = Metrics::new(&mut registry);
    metrics.liveness = telemetry::Liveness::new(args.stuck_reconcile_after);
    let ready = Readiness::default();
    let (addr, server) = telemetry::serve(
        args.metrics_addr,
        Arc::new(registry),
        ready.clone(),
        metrics.liveness.clone(),
    )
    .await?;
    tracing::info!(%addr, "serving /metrics /healthz /readyz");
    tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });

    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signal(shutdown.clone()));

    client
        .apiserver_version()
        .await
        .context("reaching the Kubernetes API server")?;
    ready.set(true);

    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let mut ctx = Context::new(
        client.clone(),
        metrics.clone(),
        Some(identity.clone()),
        WatchNamespace::from_option(args.watch_namespace),
        args.lease_namespace.clone(),
    );
    ctx.allow_privileged_jobs = args.allow_privileged_jobs;
    ctx.tenants = controller::Tenants::from_list(args.tenant_namespaces);
    ctx.agent_paths = controller::AgentPaths {
        confine: outrider::agent::confine::Confinement::new(args.agent_allowed_roots, Vec::new()),
        file_output_dir: args.agent_file_output_dir,
        cluster_pipeline_selector: args.cluster_pipeline_selector,
        limits: limits::Limits {
            max_memory_buffer_bytes: args.agent_max_memory_buffer,
            max_disk_buffer_bytes: args.agent_max_disk_buffer,
            max_batch_bytes: args.agent_max_batch_bytes,
            max_batch_events: args.agent_max_batch_events,
        },
    };
    let ctx = Arc::new(ctx);

    if !args.leader_elect {
        controller::run(ctx, shutdown).await;
        return Ok(());
    }
    let config = leader::LeaderConfig::new(
        args.lease_name,
        args.lease_namespace,
        identity.clone(),
        args.lease_duration,
    );
    tracing::info!(%identity, lease = %config.lease_name, "waiting for leadership");
    let Some(mut leadership) = leader::acquire(client, &config, &shutdown).await? else {
        tracing::info!("shut down before becoming leader");
        return Ok(());
    };
    tracing::info!(%identity, "became leader");
    metrics.leader.set(1);
    let stop = shutdown.child_token();
    let lost = tokio::select! {
        _ = controller::run(ctx, stop.clone()) => None,
        why = leadership.lost() => Some(why),
    };
    if let Some(why) = lost {
        // Another replica may already be reconciling, or soon will: stop every run at once
        // (exit, not a graceful drain) and let the pod restart as a candidate.
        metrics.leader.set(0);
        tracing::error!(%why, "lost leadership; exiting now");
        std::process::exit(1);
    }
    metrics.leader.set(0);
    leadership.release().await?;
    tracing::info!("released leadership, bye");
    Ok(())
}

fn default_identity() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "outrider".into());
    format!("{host}-{}", std::process::id())
}

async fn wait_for_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested: finishing in-flight work");
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_namespaces_must_be_namespace_names_before_they_reach_api_paths() {
        let parsed =
            Cli::try_parse_from(["outrider", "controller", "--tenant-namespaces=shop,web-2"])
                .unwrap();
        let Command::Controller(args) = parsed.command else {
            panic!("not the controller")
        };
        assert_eq!(args.tenant_namespaces, ["shop", "web-2"]);
        for bad in ["../kube-system", "a/b", "Shop", "-a", ""] {
            let err = Cli::try_parse_from([
                "outrider",
                "controller",
                &format!("--tenant-namespaces=shop,{bad}"),
            ])
            .err()
            .unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(err.to_string().contains("not a namespace name"), "{err}");
        }
    }
}
