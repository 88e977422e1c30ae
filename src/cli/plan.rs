//! `outrider plan run`: a DeploymentPlan file run against the SSH hosts of an Inventory
//! file, through the same engine the controller uses, no cluster needed. Progress is
//! printed as plain lines (one per host and stage), then a per-host table.

use std::collections::{HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};

use super::read_yaml;
use clap::{Args, Subcommand};
use outrider::api::deployment_plan::DeploymentPlan;
use outrider::api::inventory::Inventory;
use outrider::engine::plan::{
    self, Control, HostState, Phase, PlanEvent, PlanOutcome, ResumeState, RollbackState, SshRunner,
    StageAction,
};
use outrider::resolve::{deployment_plan as resolve_plan, inventory as resolve_inv};
use tokio::sync::{mpsc, watch};

#[derive(Args)]
pub struct PlanArgs {
    #[command(subcommand)]
    command: PlanCommand,
}

#[derive(Subcommand)]
enum PlanCommand {
    /// Run a DeploymentPlan file against its Inventory's hosts over SSH (SSH stages only).
    Run(RunArgs),
}

#[derive(Args)]
struct RunArgs {
    /// DeploymentPlan manifest (YAML).
    #[arg(long, short = 'f')]
    file: PathBuf,
    /// Inventory manifest (YAML) named by the plan's `spec.targets.inventoryRef`.
    #[arg(long, short = 'i')]
    inventory: PathBuf,
    /// Directory with files `ssh-privatekey`, `known_hosts` and optionally `passphrase`
    /// (a mounted Secret has exactly this layout).
    #[arg(long)]
    secret_dir: PathBuf,
    /// SSH handshakes in flight at once (they cost the servers far more than commands).
    #[arg(long, default_value_t = 16)]
    handshakes: usize,
    /// Host keys pinned on first use, one `host address port SHA256:…` line each (an
    /// Inventory's `<name>-host-keys` ConfigMap holds the same entries).
    #[arg(long)]
    host_keys: Option<PathBuf>,
    /// Directory holding one directory per Secret that `secretEnv` names, one file per key
    /// (`DIR/<secret>/<key>`: mounted Secrets have this layout).
    #[arg(long)]
    env_secret_dir: Option<PathBuf>,
}

/// Runs the subcommand; returns whether the plan succeeded.
pub async fn run(args: PlanArgs) -> anyhow::Result<bool> {
    match args.command {
        PlanCommand::Run(args) => run_plan(args).await,
    }
}

async fn run_plan(args: RunArgs) -> anyhow::Result<bool> {
    let plan: DeploymentPlan = read_yaml(&args.file, "DeploymentPlan")?;
    let inv: Inventory = read_yaml(&args.inventory, "Inventory")?;
    let wanted = &plan.spec.targets.inventory_ref.name;
    let have = inv.metadata.name.as_deref().unwrap_or_default();
    if wanted != have {
        bail!(
            "the plan targets Inventory {wanted:?} but {} is Inventory {have:?}",
            args.inventory.display()
        );
    }
    if plan.spec.paused {
        bail!(
            "{} has spec.paused: true; set it to false to run it",
            args.file.display()
        );
    }
    let mut spec = resolve_plan::plan_spec(&plan.spec)
        .with_context(|| format!("{} is not a valid plan", args.file.display()))?;
    for stage in spec.stages.iter_mut().chain(spec.rollback.iter_mut()) {
        for v in &mut stage.secret_env {
            let Some(dir) = &args.env_secret_dir else {
                bail!(
                    "stage {:?} takes {} from Secret {:?}: pass --env-secret-dir DIR with DIR/{}/{}",
                    stage.name,
                    v.name,
                    v.secret,
                    v.secret,
                    v.key
                );
            };
            // names are DNS-1123 and key patterns in the schema; checked again before a path join
            if v.secret.contains('/')
                || v.secret.starts_with('.')
                || v.key.contains('/')
                || v.key.starts_with("..")
            {
                bail!("Secret {:?} key {:?}: not a plain name", v.secret, v.key);
            }
            let path = dir.join(&v.secret).join(&v.key);
            v.value = Some(zeroize::Zeroizing::new(
                std::fs::read_to_string(&path).with_context(|| {
                    format!(
                        "reading {} (stage {:?} secretEnv {})",
                        path.display(),
                        stage.name,
                        v.name
                    )
                })?,
            ));
        }
    }
    if let Some(s) = spec
        .stages
        .iter()
        .chain(&spec.rollback)
        .find(|s| matches!(s.action, StageAction::Job(_)))
    {
        bail!(
            "stage {:?} is a Job stage: Jobs need a cluster, `outrider plan run` runs SSH \
             stages only (apply the plan to a cluster with the controller instead)",
            s.name
        );
    }
    let secret = args.secret_dir.display().to_string();
    let targets = resolve_inv::fleet(
        &inv,
        resolve_inv::FleetInput {
            secret_name: &secret,
            lookup: &resolve_inv::secret_dir_lookup(&args.secret_dir),
            pins: read_pins(args.host_keys.as_deref())?,
            selector: plan.spec.targets.selector.as_ref(),
            selector_field: "spec.targets.selector",
            shared_handshakes: None,
        },
    )
    .with_context(|| format!("{}", args.inventory.display()))?;
    let endpoints = targets.hosts;
    let runner = SshRunner::new(targets.fleet.with_handshakes(args.handshakes));

    let (control, control_rx) = watch::channel(Control::Run);
    // Ctrl-C: stop starting hosts and stages, let in-flight stages finish, report.
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("interrupted: finishing in-flight stages (Ctrl-C again to abort)");
            let _ = control.send(Control::Stop);
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
        std::future::pending::<()>().await;
    });
    let (events, events_rx) = mpsc::channel(1024);
    let started = Instant::now();
    let stage_count = spec.stages.len();
    let (outcome, printed) = tokio::join!(
        plan::run_plan(
            &spec,
            endpoints,
            &runner,
            ResumeState::default(),
            control_rx,
            events
        ),
        print_progress(events_rx, stage_count),
    );
    printed?;
    print_summary(&outcome, started.elapsed().as_secs_f64())?;
    Ok(outcome.phase == Phase::Succeeded)
}

/// Pinned host keys from `--host-keys` (none without it).
pub fn read_pins(path: Option<&Path>) -> anyhow::Result<outrider::ssh::Pins> {
    let Some(path) = path else {
        return Ok(outrider::ssh::Pins::default());
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    outrider::ssh::Pins::parse(&text).with_context(|| format!("{}", path.display()))
}

/// One plain line per finished host stage (and per notable run event); on a terminal, a
/// live counter stays below them.
async fn print_progress(
    mut events: mpsc::Receiver<PlanEvent>,
    stages: usize,
) -> anyhow::Result<()> {
    let live = std::io::stdout().is_terminal();
    let mut running = HashSet::new();
    let mut failed_hosts = 0usize;
    let mut batch = (0, 0);
    let mut done_hosts = 0usize;
    let mut total_hosts = 0usize;
    let mut stage_started: HashMap<(usize, bool), Instant> = HashMap::new();
    let stdout = std::io::stdout();
    while let Some(event) = events.recv().await {
        let line = match event {
            PlanEvent::RunStarted {
                hosts,
                batches,
                allowed_failures,
            } => {
                total_hosts = hosts;
                format!(
                    "plan: {hosts} hosts, {batches} batches, {stages} stages, up to {allowed_failures} failures allowed"
                )
            }
            PlanEvent::BatchStarted {
                index,
                total,
                hosts,
            } => {
                batch = (index + 1, total);
                format!(
                    "[batch {}/{}] starting {}{}",
                    index + 1,
                    total,
                    plural(hosts.len(), "host"),
                    if index == 0 { " (canary)" } else { "" }
                )
            }
            PlanEvent::HostStageStarted { host, rollback, .. } => {
                stage_started.insert((host.index, rollback), Instant::now());
                if !rollback {
                    running.insert(host.index);
                }
                if live {
                    redraw(
                        &stdout,
                        &status(&running, done_hosts, failed_hosts, total_hosts),
                    )?;
                }
                continue;
            }
            PlanEvent::HostKeyAccepted {
                host, fingerprint, ..
            } => format!(
                "{} host key {fingerprint} trusted on first use (hostKeyPolicy: AcceptNew)",
                host.name
            ),
            PlanEvent::HostStageRetrying {
                host,
                stage,
                attempt,
                failure,
                retry_in,
            } => format!(
                "[batch {}/{}] {} {stage} attempt {attempt} failed ({}), retrying in {:.1}s",
                batch.0,
                batch.1,
                host.name,
                failure.reason,
                retry_in.as_secs_f64()
            ),
            PlanEvent::HostStageFinished {
                host,
                stage,
                attempts,
                result,
                rollback,
                ..
            } => {
                let secs = stage_started
                    .remove(&(host.index, rollback))
                    .map(|t| t.elapsed().as_secs_f64())
                    .unwrap_or_default();
                let prefix = if rollback {
                    "[rollback]".to_string()
                } else {
                    format!("[batch {}/{}]", batch.0, batch.1)
                };
                match result {
                    Ok(_) => format!(
                        "{prefix} {} {stage} ok (attempt {attempts}, {secs:.1}s)",
                        host.name
                    ),
                    Err(f) => format!(
                        "{prefix} {} {stage} FAILED: {}{} (attempt {attempts}, {secs:.1}s)",
                        host.name,
                        f.reason,
                        exit_text(f.exit_code, f.signal.as_deref())
                            .map(|t| format!(", {t}"))
                            .unwrap_or_default()
                    ),
                }
            }
            PlanEvent::HostFinished { host, result, .. } => {
                running.remove(&host.index);
                done_hosts += 1;
                if result == HostState::Failed {
                    failed_hosts += 1;
                }
                if result == HostState::Succeeded {
                    format!(
                        "[batch {}/{}] {} done ({done_hosts}/{total_hosts} hosts finished)",
                        batch.0, batch.1, host.name
                    )
                } else {
                    continue;
                }
            }
            PlanEvent::BudgetExceeded { failed, allowed } => format!(
                "failure budget exceeded: {} failed, {allowed} allowed; stopping",
                plural(failed, "host")
            ),
            PlanEvent::RunOnceFailed { stage } => {
                format!("runOnce stage {stage} failed; stopping")
            }
            PlanEvent::RollbackStarted { hosts } => {
                format!("[rollback] rolling back {}", plural(hosts, "host"))
            }
            PlanEvent::RollbackHostFinished { .. } => continue,
            PlanEvent::Paused => "paused".into(),
            PlanEvent::Resumed => "resumed".into(),
            PlanEvent::Stopping => "stopping: no new hosts or stages".into(),
            PlanEvent::Finished { .. } | PlanEvent::Checkpoint { .. } => continue,
        };
        let mut out = stdout.lock();
        if live {
            // clear the status line, print the event, redraw the status below it
            write!(out, "\r\x1b[2K{line}\n")?;
            write!(
                out,
                "{}",
                status(&running, done_hosts, failed_hosts, total_hosts)
            )?;
        } else {
            writeln!(out, "{line}")?;
        }
        out.flush()?;
    }
    if live {
        redraw(&stdout, "")?;
    }
    Ok(())
}

/// The live counter shown under the progress lines on a terminal.
fn status(running: &HashSet<usize>, done: usize, failed: usize, total: usize) -> String {
    format!(
        "{done}/{total} hosts finished, {} running, {failed} failed",
        running.len()
    )
}

fn redraw(stdout: &std::io::Stdout, status: &str) -> std::io::Result<()> {
    let mut out = stdout.lock();
    write!(out, "\r\x1b[2K{status}")?;
    out.flush()
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn exit_text(code: Option<i32>, signal: Option<&str>) -> Option<String> {
    match (code, signal) {
        (Some(c), _) => Some(format!("exit code {c}")),
        (None, Some(s)) => Some(format!("signal {s}")),
        _ => None,
    }
}

/// The per-host table, the failures' output tails, and the phase.
fn print_summary(outcome: &PlanOutcome, secs: f64) -> anyhow::Result<()> {
    let mut rows = vec![[
        "HOST".to_string(),
        "RESULT".into(),
        "FAILED STAGE".into(),
        "REASON".into(),
        "EXIT".into(),
        "ROLLBACK".into(),
    ]];
    for h in &outcome.hosts {
        let f = h.failure.as_ref().or(h.rollback_failure.as_ref());
        rows.push([
            h.name.clone(),
            match h.state {
                HostState::Pending => "not run",
                HostState::Succeeded => "ok",
                HostState::Failed => "FAILED",
                HostState::Aborted => "stopped",
            }
            .into(),
            f.map(|f| f.stage.clone()).unwrap_or_else(|| "-".into()),
            f.map(|f| f.failure.reason.as_str().to_string())
                .unwrap_or_else(|| "-".into()),
            f.and_then(|f| exit_text(f.failure.exit_code, f.failure.signal.as_deref()))
                .map(|t| t.replace("exit code ", ""))
                .unwrap_or_else(|| "-".into()),
            match h.rollback {
                RollbackState::NotRun => "-",
                RollbackState::Succeeded => "rolled back",
                RollbackState::Failed => "FAILED",
            }
            .into(),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out)?;
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        writeln!(out, "{}", line.join("  ").trim_end())?;
    }
    for f in &outcome.failures {
        writeln!(out, "\n{} (stage {})", f.failure.message, f.stage)?;
        let tail: Vec<&str> = f.failure.output_tail.lines().collect();
        for l in &tail[tail.len().saturating_sub(5)..] {
            writeln!(out, "    {l}")?;
        }
    }
    let ok = outcome
        .hosts
        .iter()
        .filter(|h| h.state == HostState::Succeeded)
        .count();
    let within = if outcome.phase == Phase::Succeeded && outcome.failed > 0 {
        " with failures within the budget"
    } else {
        ""
    };
    writeln!(
        out,
        "\nphase: {}{within} ({ok}/{} hosts succeeded, {} failed, {} allowed; {} batches, {secs:.1}s)",
        outcome.phase.as_str(),
        outcome.hosts.len(),
        outcome.failed,
        outcome.allowed_failures,
        outcome.batches
    )?;
    out.flush()?;
    Ok(())
}
