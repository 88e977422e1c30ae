//! `outrider exec`: one command on every (selected) host of an Inventory file, the way
//! `parallel-ssh` or `ansible -m raw` are used, through the same transport the controller
//! uses. Credentials come from a directory laid out like a mounted Secret.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use outrider::api::inventory::Inventory;
use outrider::ssh::{Command, Credentials, Fleet};
use outrider::targets;

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

fn read_secret_dir(dir: &Path, key: &str) -> Option<Vec<u8>> {
    std::fs::read(dir.join(key)).ok()
}

/// Runs the command everywhere; returns whether every host succeeded.
pub async fn run(args: ExecArgs) -> anyhow::Result<bool> {
    let text = std::fs::read_to_string(&args.inventory)
        .with_context(|| format!("reading {}", args.inventory.display()))?;
    let inv: Inventory = serde_yaml::from_str(&text)
        .with_context(|| format!("{} is not an Inventory", args.inventory.display()))?;
    let secret = args.secret_dir.display().to_string();
    let material = targets::ssh_material(&secret, inv.spec.ssh.host_key_policy, |k| {
        read_secret_dir(&args.secret_dir, k)
    })?;
    let credentials = Credentials::new(
        &material.private_key,
        material.passphrase.as_deref(),
        &material.known_hosts,
    )?;
    let selector = args.selector.as_deref().map(selector).transpose()?;
    let endpoints = targets::endpoints(&inv, selector.as_ref())?;
    if endpoints.is_empty() {
        bail!("no host of {} matches", args.inventory.display());
    }
    let fleet = Fleet::new(targets::client_config(&inv)?, credentials)
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
