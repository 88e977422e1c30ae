//! `outrider exec`: one command on every (selected) host of an Inventory file, the way
//! `parallel-ssh` or `ansible -m raw` are used, through the same transport the controller
//! uses. Credentials come from a directory laid out like a mounted Secret.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use outrider::api::inventory::Inventory;
use outrider::resolve::inventory as resolve_inv;
use outrider::ssh::Command;

#[derive(Args)]
pub struct ExecArgs {
    /// Inventory manifest (YAML).
    #[arg(long, short = 'i')]
    inventory: PathBuf,
    /// Directory with files `ssh-privatekey`, `known_hosts` and optionally `passphrase`
    /// (a mounted Secret has exactly this layout).
    #[arg(long)]
    secret_dir: PathBuf,
    /// Only hosts with these labels: `key=value[,key=value…]`.
    #[arg(long, short = 'l')]
    selector: Option<String>,
    /// Host keys pinned on first use, one `host address port SHA256:…` line each.
    #[arg(long)]
    host_keys: Option<PathBuf>,
    /// Hosts in flight at once.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// SSH handshakes in flight at once (they cost the servers far more than commands).
    #[arg(long, default_value_t = 16)]
    handshakes: usize,
    /// Per-host command timeout.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    timeout: Duration,
    /// Deadline for the whole run.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    deadline: Duration,
    /// The command and its arguments (each reaches the host as one literal argument).
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<kube::core::Duration>()
        .map(Into::into)
        .map_err(|e| e.to_string())
}

fn selector(spec: &str) -> anyhow::Result<LabelSelector> {
    let mut labels = std::collections::BTreeMap::new();
    for pair in spec.split(',').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            bail!("--selector: expected key=value, got {pair:?}")
        };
        labels.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(LabelSelector {
        match_labels: Some(labels),
        ..Default::default()
    })
}

/// Runs the command everywhere; returns whether every host succeeded.
pub async fn run(args: ExecArgs) -> anyhow::Result<bool> {
    let text = std::fs::read_to_string(&args.inventory)
        .with_context(|| format!("reading {}", args.inventory.display()))?;
    let inv: Inventory = serde_yaml::from_str(&text)
        .with_context(|| format!("{} is not an Inventory", args.inventory.display()))?;
    let secret = args.secret_dir.display().to_string();
    let selector = args.selector.as_deref().map(selector).transpose()?;
    let targets = resolve_inv::fleet(
        &inv,
        resolve_inv::FleetInput {
            secret_name: &secret,
            lookup: &resolve_inv::secret_dir_lookup(&args.secret_dir),
            pins: super::plan::read_pins(args.host_keys.as_deref())?,
            selector: selector.as_ref(),
            selector_field: "--selector",
            shared_handshakes: None,
        },
    )
    .with_context(|| format!("{}", args.inventory.display()))?;
    let endpoints = targets.hosts;
    let fleet = targets
        .fleet
        .with_concurrency(args.concurrency)
        .with_handshakes(args.handshakes);
    let command = Command::argv(args.command.clone())
        .timeout(args.timeout)
        .capture(4096, 4096);

    let total = endpoints.len();
    let started = Instant::now();
    let mut results = fleet.run(endpoints, args.deadline, move |session| {
        let command = command.clone();
        async move {
            let out = session.exec(&command).await?;
            out.check(&session.endpoint().name)
        }
    });
    let (mut ok, mut failed) = (0usize, 0usize);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    while let Some(r) = results.next().await {
        let line = match &r.result {
            Ok(output) => {
                ok += 1;
                let text = output.stdout.to_string_lossy();
                format!(
                    "{}\tok\t{}",
                    r.endpoint.name,
                    text.lines().next().unwrap_or_default()
                )
            }
            Err(e) => {
                failed += 1;
                format!(
                    "{}\tfailed\t{}",
                    r.endpoint.name,
                    e.to_string().replace('\n', " ")
                )
            }
        };
        writeln!(out, "{line}")?;
        if let Some((fingerprint, _)) = &r.accepted_host_key {
            writeln!(out, "{}\thost-key-accepted\t{fingerprint}", r.endpoint.name)?;
        }
    }
    out.flush()?;
    eprintln!(
        "{ok} succeeded, {failed} failed ({total} hosts, {:.1}s)",
        started.elapsed().as_secs_f64()
    );
    Ok(failed == 0)
}
