//! `outrider check run`: a HealthCheck file probed against the hosts of an Inventory file
//! and its endpoints, through the same engine the controller uses, no cluster needed.
//! Every round prints a table (the way people try a checker before deploying it); the
//! SSH connections stay open between rounds as they do in the controller.

use std::io::Write;
use std::path::PathBuf;

use super::read_yaml;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use outrider::api::health_check::HealthCheck;
use outrider::api::inventory::Inventory;
use outrider::engine::health::Outcome;
use outrider::engine::health::baseline::Baselines;
use outrider::engine::health::endpoint::{EndpointProbe, Resolver};
use outrider::engine::health::evaluate::{Evaluator, Policy, State};
use outrider::engine::health::host::HostChecks;
use outrider::engine::health::pool::Pool;
use outrider::engine::health::round::{Checker, RoundReport};
use outrider::resolve::inventory as resolve_inv;

#[derive(Args)]
pub struct CheckArgs {
    #[command(subcommand)]
    command: CheckCommand,
}

#[derive(Subcommand)]
enum CheckCommand {
    /// Probe a HealthCheck file's hosts and endpoints for a number of rounds.
    Run(RunArgs),
}

#[derive(Args)]
struct RunArgs {
    /// HealthCheck manifest (YAML).
    #[arg(long, short = 'f')]
    file: PathBuf,
    /// Inventory manifest (YAML) named by `spec.targets.inventoryRef` (needed for checks).
    #[arg(long, short = 'i')]
    inventory: Option<PathBuf>,
    /// Directory with files `ssh-privatekey`, `known_hosts` and optionally `passphrase`.
    #[arg(long)]
    secret_dir: Option<PathBuf>,
    /// Directory holding one directory per CA Secret (`DIR/<secret>/ca.crt`).
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// Rounds to run (the spec's interval apart).
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// Overrides the spec's interval between rounds (e.g. `2s` to try thresholds fast).
    #[arg(long)]
    interval: Option<String>,
}

/// Runs the subcommand; returns whether every target ended Healthy.
pub async fn run(args: CheckArgs) -> anyhow::Result<bool> {
    match args.command {
        CheckCommand::Run(args) => run_checks(args).await,
    }
}

async fn run_checks(args: RunArgs) -> anyhow::Result<bool> {
    let hc: HealthCheck = read_yaml(&args.file, "HealthCheck")?;
    let spec = &hc.spec;
    let checks = HostChecks::new(&spec.checks)
        .with_context(|| format!("{} is not a valid HealthCheck", args.file.display()))?;
    let mut endpoints = Vec::new();
    for e in &spec.endpoints {
        let ca_ref = e.ca_secret_ref();
        let ca = match ca_ref {
            None => None,
            Some(r) => {
                let Some(dir) = &args.ca_dir else {
                    bail!(
                        "endpoint {:?} has a caSecretRef: pass --ca-dir DIR with DIR/{}/ca.crt",
                        e.name,
                        r.name
                    );
                };
                let path = dir.join(&r.name).join("ca.crt");
                Some(std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?)
            }
        };
        endpoints.push(
            EndpointProbe::new(e, ca.as_deref(), Resolver::System)
                .with_context(|| format!("{} is not a valid HealthCheck", args.file.display()))?,
        );
    }
    let (hosts, pool) = if checks.is_empty() {
        (Vec::new(), None)
    } else {
        let (Some(inv_path), Some(secret_dir)) = (&args.inventory, &args.secret_dir) else {
            bail!("the HealthCheck has host checks: pass --inventory FILE and --secret-dir DIR");
        };
        let inv: Inventory = read_yaml(inv_path, "Inventory")?;
        if let Some(t) = &spec.targets
            && Some(t.inventory_ref.name.as_str()) != inv.metadata.name.as_deref()
        {
            bail!(
                "the HealthCheck targets Inventory {:?} but {} is Inventory {:?}",
                t.inventory_ref.name,
                inv_path.display(),
                inv.metadata.name.as_deref().unwrap_or_default()
            );
        }
        let secret = secret_dir.display().to_string();
        let targets = resolve_inv::fleet(
            &inv,
            resolve_inv::FleetInput {
                secret_name: &secret,
                lookup: &resolve_inv::secret_dir_lookup(secret_dir),
                pins: Default::default(),
                selector: spec.targets.as_ref().and_then(|t| t.selector.as_ref()),
                selector_field: "spec.targets.selector",
                shared_handshakes: None,
            },
        )
        .with_context(|| format!("{}", inv_path.display()))?;
        (targets.hosts, Some(Pool::new(targets.fleet)))
    };
    let interval = match &args.interval {
        Some(i) => outrider::api::common::parse_duration(i).context("--interval")?,
        None => spec.interval.to_std().context("spec.interval")?,
    }
    .clamp(Duration::from_millis(100), Duration::from_secs(24 * 3600));
    let evaluator = Evaluator::new(
        Policy {
            failure_threshold: spec.failure_threshold,
            success_threshold: spec.success_threshold,
            baseline: spec.baseline.clone(),
        },
        Baselines::new(),
    );
    let mut checker = Checker::new(checks, endpoints, hosts, pool, evaluator);
    let maintenance_spec = spec.maintenance.clone();
    let mut next = tokio::time::Instant::now();
    let mut all_healthy = false;
    for round in 1..=args.rounds.max(1) {
        tokio::time::sleep_until(next).await;
        next += interval;
        let maintenance = maintenance_spec
            .as_ref()
            .is_some_and(|m| m.is_open(k8s_openapi::jiff::Timestamp::now()));
        let report = checker.round(interval, maintenance).await;
        print_round(round, &report, maintenance);
        all_healthy = report
            .probed
            .iter()
            .all(|p| matches!(p.state, State::Healthy | State::Anomalous));
    }
    checker.close().await;
    Ok(all_healthy)
}

fn print_round(round: u32, report: &RoundReport, maintenance: bool) {
    let mut out = std::io::stdout().lock();
    let (pass, fail, unknown) = report.counts();
    let _ = writeln!(
        out,
        "round {round}: {pass} passed, {fail} failed, {unknown} unknown in {:.2}s{}",
        report.duration.as_secs_f64(),
        if maintenance {
            " (in maintenance: states frozen)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "{:<20} {:<16} {:<8} {:<8} {:<10} {:>10} {:>9}  MESSAGE",
        "TARGET", "CHECK", "PROBE", "RESULT", "STATE", "VALUE", "LATENCY"
    );
    for p in &report.probed {
        let o = &p.observation;
        let result = match o.outcome {
            Outcome::Pass => "pass",
            Outcome::Fail => "FAIL",
            Outcome::Unknown => "unknown",
        };
        let value = o.value.map_or_else(|| "-".to_string(), |v| format!("{v}"));
        let _ = writeln!(
            out,
            "{:<20} {:<16} {:<8} {:<8} {:<10} {:>10} {:>7}ms  {}",
            p.target,
            p.check,
            p.kind,
            result,
            p.state.as_str(),
            value,
            o.latency.as_millis(),
            o.message
        );
    }
    for t in &report.transitions {
        let _ = writeln!(
            out,
            "  {}/{}: {} -> {}",
            t.target,
            t.check,
            t.from.as_str(),
            t.to.as_str()
        );
    }
    let _ = out.flush();
}
