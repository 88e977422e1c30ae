//! `outrider policy render` prints the exact ruleset a SecurityPolicy file compiles to, with
//! the static checks; `outrider policy apply` pushes it to the hosts of an Inventory file
//! with the controller's rollout (canary, batches, commit-confirmed over a new connection),
//! printing each step as it happens. No cluster needed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use outrider::api::inventory::Inventory;
use outrider::api::security_policy::{Backend, DriftPolicy, SecurityPolicy};
use outrider::engine::firewall::apply::Step;
use outrider::engine::firewall::rollout::{self, HostResult, Progress, Settings};
use outrider::engine::firewall::{Finding, Meta, Severity, compile_for};
use outrider::resolve::inventory as resolve_inv;
use outrider::resolve::security_policy::{self as resolve_sp, PolicyError};

use super::read_yaml;

#[derive(Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Print the ruleset a SecurityPolicy file compiles to (and its static-check findings on
    /// stderr).
    Render(RenderArgs),
    /// Push a SecurityPolicy file to the hosts of an Inventory file, safely.
    Apply(ApplyArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    Nftables,
    Iptables,
}

#[derive(Args)]
struct RenderArgs {
    /// SecurityPolicy manifest (YAML).
    #[arg(long, short = 'f')]
    file: PathBuf,
    /// Render for this backend instead of the spec's.
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
}

#[derive(Args)]
struct ApplyArgs {
    /// SecurityPolicy manifest (YAML).
    #[arg(long, short = 'f')]
    file: PathBuf,
    /// Inventory manifest (YAML) named by `spec.targets.inventoryRef`.
    #[arg(long, short = 'i')]
    inventory: PathBuf,
    /// Directory with files `ssh-privatekey`, `known_hosts` and optionally `passphrase`.
    #[arg(long)]
    secret_dir: PathBuf,
}

/// Runs the subcommand; returns whether it fully succeeded.
pub async fn run(args: PolicyArgs) -> anyhow::Result<bool> {
    match args.command {
        PolicyCommand::Render(args) => render(args),
        PolicyCommand::Apply(args) => apply(args).await,
    }
}

fn print_findings(findings: &[Finding]) {
    for f in findings {
        let rule = f
            .rule
            .as_deref()
            .map(|r| format!(" [{r}]"))
            .unwrap_or_default();
        eprintln!(
            "{}: {}{rule}: {}",
            f.severity.as_str().to_lowercase(),
            f.code,
            f.message
        );
    }
}

fn render(args: RenderArgs) -> anyhow::Result<bool> {
    let sp: SecurityPolicy = read_yaml(&args.file, "SecurityPolicy")?;
    let backend = match args.backend {
        None => sp.spec.backend,
        Some(BackendArg::Nftables) => Backend::Nftables,
        Some(BackendArg::Iptables) => Backend::Iptables,
    };
    let meta = Meta {
        policy: resolve_sp::policy_id(&sp),
        generation: sp.metadata.generation.unwrap_or(0),
    };
    match compile_for(&sp.spec, backend, &meta) {
        Ok(c) => {
            print!("{}", c.text());
            print_findings(&c.findings);
            eprintln!("ruleset hash: {}", c.hash);
            Ok(true)
        }
        Err(e) => {
            print_findings(&e.0);
            bail!("{} does not compile: {e}", args.file.display())
        }
    }
}

async fn apply(args: ApplyArgs) -> anyhow::Result<bool> {
    let sp: SecurityPolicy = read_yaml(&args.file, "SecurityPolicy")?;
    let resolved = match resolve_sp::resolve(&sp) {
        Ok(r) => r,
        Err(PolicyError::Compile(e)) => {
            print_findings(&e.0);
            bail!("{} does not compile: {e}", args.file.display())
        }
        Err(e) => bail!("{}: {e}", args.file.display()),
    };
    print_findings(&resolved.compiled.findings);
    if resolved
        .compiled
        .findings
        .iter()
        .any(|f| f.severity == Severity::Error)
    {
        bail!("the policy has errors");
    }
    let inv: Inventory = read_yaml(&args.inventory, "Inventory")?;
    if Some(sp.spec.targets.inventory_ref.name.as_str()) != inv.metadata.name.as_deref() {
        bail!(
            "the SecurityPolicy targets Inventory {:?} but {} is Inventory {:?}",
            sp.spec.targets.inventory_ref.name,
            args.inventory.display(),
            inv.metadata.name.as_deref().unwrap_or_default()
        );
    }
    let secret = args.secret_dir.display().to_string();
    let targets = resolve_inv::fleet(
        &inv,
        resolve_inv::FleetInput {
            secret_name: &secret,
            lookup: &resolve_inv::secret_dir_lookup(&args.secret_dir),
            pins: Default::default(),
            selector: sp.spec.targets.selector.as_ref(),
            selector_field: "spec.targets.selector",
            shared_handshakes: None,
        },
    )
    .with_context(|| format!("{}", args.inventory.display()))?;
    let settings = Settings {
        policy: resolve_sp::policy_id(&sp),
        batch_size: resolved.batch_size,
        max_unavailable: resolved.max_unavailable,
        confirm: resolved.confirm,
        repair_drift: sp.spec.drift_policy == DriftPolicy::Reconcile,
        hold: BTreeMap::new(),
    };
    eprintln!(
        "ruleset {} ({:?}) to {} hosts; confirm within {:?}",
        resolved.compiled.hash,
        resolved.compiled.backend,
        targets.hosts.len(),
        resolved.confirm
    );
    let compiled = Arc::new(resolved.compiled);
    let progress = |p: Progress| match p {
        Progress::Planned { pending } => {
            eprintln!("{} hosts need the ruleset", pending.len());
        }
        Progress::Batch { index, hosts } => {
            let what = if index == 0 { "canary" } else { "batch" };
            eprintln!("{what} {index}: {}", hosts.join(", "));
        }
        Progress::Step { host, step } => {
            let step = match step {
                Step::Uploading => "checking, arming the restore timer, applying",
                Step::Confirming => "confirming over a new connection",
            };
            eprintln!("  {host}: {step}");
        }
        Progress::Done { host, result } => eprintln!("  {host}: {}", describe(&result)),
        Progress::Halted { failed, budget } => {
            eprintln!("stopped: {failed} hosts failed, more than maxUnavailable ({budget}) allows")
        }
    };
    // the confirm dials anew through the same fleet (and its pins)
    let report = rollout::run(
        &targets.fleet,
        &targets.hosts,
        &compiled,
        &BTreeMap::new(),
        &settings,
        &progress,
    )
    .await;
    println!("HOST\tRESULT");
    let mut ok = !report.halted;
    for (host, result) in &report.hosts {
        println!("{host}\t{}", describe(result));
        ok &= matches!(
            result,
            HostResult::Applied { .. } | HostResult::Unchanged { .. }
        );
    }
    Ok(ok)
}

fn describe(r: &HostResult) -> String {
    match r {
        HostResult::Unchanged { .. } => "unchanged (already runs this ruleset)".into(),
        HostResult::Applied { .. } => "applied and confirmed".into(),
        HostResult::Drifted { message } => format!("drifted: {message}"),
        HostResult::Failed {
            reason,
            message,
            rolled_back,
        } => {
            let what = if *rolled_back {
                "rolled back"
            } else {
                "failed"
            };
            format!("{what} ({reason}): {message}")
        }
        HostResult::Skipped => "skipped (the rollout stopped)".into(),
    }
}
