//! SecurityPolicy benchmark (`make bench-policy`): the firewall compiler against Aerleon 1.18.0
//! (the maintained Capirca successor), the rulesets in real kernels, and the commit-confirmed
//! rollout to network-namespace hosts, all in one run.
//!
//! 1. compile: `e2e/bench/policy_gen.py` writes `POLICY_BENCH_RULES` (10,000) rules over
//!    `POLICY_BENCH_ZONES` (200) zones (seed 1); the bench puts its probe zones and rules first
//!    (see below), parses the YAML as a `SecurityPolicy` and times `compile` (nftables) and
//!    `compile_for(.., Iptables, ..)`, median of `POLICY_BENCH_RUNS` (20) after two warm-ups, with
//!    the phases timed alone (`Policy::from_spec`, `lint::check`, the renderers, the hash). Aerleon
//!    compiles the same YAML (`e2e/bench/aerleon_compile.py --repeat 3`, its fastest run);
//!    its iptables time is iptables + ip6tables, since Outrider renders both families.
//! 2. kernel load: `nft -f` of Outrider's output at `POLICY_BENCH_LOAD_SIZES` (1k, 3k, 10k,
//!    20k rules; same generator, same zones, seed 1), `POLICY_BENCH_LOAD_REPEAT` (3) times each,
//!    each into a fresh network namespace (`ip netns add`, no interfaces but lo, deleted after),
//!    and Aerleon's nftables output at `POLICY_BENCH_AERLEON_LOAD_SIZES` (1k, 3k, 10k) once each
//!    under `timeout` (`POLICY_BENCH_AERLEON_LOAD_TIMEOUT`, 900 s; `POLICY_BENCH_SKIP_AERLEON_10K=1`
//!    skips the loads of 10k rules and more). Packet path: Outrider's ruleset of step 1 is loaded
//!    into a `NetnsHost` (tests/support/netns.rs) with listeners on 80, 8080 and 9000, and real
//!    connections from the root namespace's two addresses on its veth must meet the probe rules
//!    (8080 only from `operator`, 80 from anywhere, 9000 denied, 22 through the failsafe); the
//!    same for Aerleon's output of step 1, loaded (and timed) in that host after `nft flush
//!    ruleset` (the probe zones name its addresses), when it loads within the timeout.
//! 3. apply: `POLICY_BENCH_HOSTS` (20) `NetnsHost`s (listener on 80), a `POLICY_BENCH_APPLY_RULES`
//!    (200) rule / 20 zone policy (the generator's failsafe: tcp/22 from 198.18.0.0/15) rolled out
//!    with `rollout::run` as `outrider-sudo` with become root (as tests/security_policy.rs does):
//!    canary + batches of 5, maxUnavailable 1, confirmTimeout 20 s. Then a lock-out on one host
//!    (tcp/22 denied from everywhere, failsafe on 2222) with confirmTimeout 5 s: the time from
//!    the start of that apply until a new TCP connection to port 22 from `operator` succeeds
//!    again (probed every 100 ms).
//!
//! The issue's targets are printed next to the figures, never asserted (timings depend on the
//! machine). `POLICY_BENCH_AERLEON=0` leaves Aerleon out. `POLICY_BENCH_PHASES`
//! (`compile,load,apply`) picks phases (`load` needs `compile`). `POLICY_BENCH_KEEP=1` keeps the
//! work dir (policies, outputs). Needs root (network namespaces, the hosts' sshd), the test users
//! (`e2e/deps.sh`), nft, python3, and Aerleon (`e2e/bench/aerleon_install.sh`, which the bench
//! runs to find its python; `POLICY_BENCH_AERLEON_PYTHON` overrides). Traffic stays on veths
//! inside 198.18.0.0/15; the load namespaces have no interface but lo. The report goes to stdout
//! and `target/bench/policy.md`.

#[path = "support/mod.rs"]
mod support;
// tests/support/netns.rs reaches the sshd module as `crate::sshd`.
use support::sshd;
#[path = "../tests/support/netns.rs"]
mod netns;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netns::NetnsHost;
use outrider::api::security_policy::{
    Backend, FirewallRule, Protocol, RuleAction, SecurityPolicy, SecurityPolicySpec, Zone,
};
use outrider::engine::firewall::apply::Step;
use outrider::engine::firewall::rollout::{self, HostResult, Progress, Report, Settings};
use outrider::engine::firewall::{
    Compiled, Meta, Output, compile, compile_for, iptables, lint, model, nft, sha256,
};
use outrider::engine::plan::Amount;
use outrider::ssh::{Endpoint, Fleet};
use support::{cpu_model, load_average, write_report};

const POLICY: &str = "bench/policy";
const PROBE: Duration = Duration::from_millis(700);
/// Ports the packet-path hosts listen on: the probe rules' ports.
const PROBE_PORTS: [u16; 3] = [80, 8080, 9000];
/// Compile targets from the issue.
const TARGET_RATIO: f64 = 50.0;
const TARGET_COMPILE_MS: f64 = 50.0;
/// Kernel load target from the issue, at 10,000 rules.
const TARGET_LOAD_S: f64 = 2.0;
/// Outrider's own loads are bounded too (they take seconds; a hang must not stall the run).
const OUTRIDER_LOAD_TIMEOUT_S: u64 = 300;

struct Config {
    rules: usize,
    zones: usize,
    runs: usize,
    aerleon: bool,
    aerleon_repeat: usize,
    load_sizes: Vec<usize>,
    load_repeat: usize,
    aerleon_load_sizes: Vec<usize>,
    aerleon_load_timeout: u64,
    skip_aerleon_10k: bool,
    hosts: usize,
    apply_rules: usize,
    apply_zones: usize,
    phases: Vec<String>,
    keep: bool,
}

fn env_str(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_string())
}

fn env_usize(name: &str, default: usize) -> usize {
    let v = env_str(name, &default.to_string());
    v.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
}

fn env_flag(name: &str) -> bool {
    matches!(env_str(name, "0").trim(), "1" | "true" | "yes")
}

fn env_list(name: &str, default: &str) -> Vec<usize> {
    env_str(name, default)
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("{name}: {s:?} is not a number"))
        })
        .collect()
}

impl Config {
    fn from_env() -> Config {
        let rules = env_usize("POLICY_BENCH_RULES", 10_000);
        Config {
            rules,
            zones: env_usize("POLICY_BENCH_ZONES", 200),
            runs: env_usize("POLICY_BENCH_RUNS", 20).max(1),
            aerleon: env_str("POLICY_BENCH_AERLEON", "1") != "0",
            aerleon_repeat: env_usize("POLICY_BENCH_AERLEON_REPEAT", 3).max(1),
            load_sizes: env_list("POLICY_BENCH_LOAD_SIZES", "1000,3000,10000,20000"),
            load_repeat: env_usize("POLICY_BENCH_LOAD_REPEAT", 3).max(1),
            aerleon_load_sizes: env_list("POLICY_BENCH_AERLEON_LOAD_SIZES", "1000,3000,10000"),
            aerleon_load_timeout: env_usize("POLICY_BENCH_AERLEON_LOAD_TIMEOUT", 900) as u64,
            skip_aerleon_10k: env_flag("POLICY_BENCH_SKIP_AERLEON_10K"),
            hosts: env_usize("POLICY_BENCH_HOSTS", 20).max(1),
            apply_rules: env_usize("POLICY_BENCH_APPLY_RULES", 200),
            apply_zones: env_usize("POLICY_BENCH_APPLY_ZONES", 20),
            phases: env_str("POLICY_BENCH_PHASES", "compile,load,apply")
                .split(',')
                .map(|s| s.trim().to_string())
                .collect(),
            keep: env_flag("POLICY_BENCH_KEEP"),
        }
    }

    fn phase(&self, name: &str) -> bool {
        self.phases.iter().any(|p| p == name)
    }
}

/// Median, min and max of timed runs, in seconds.
#[derive(Clone, Copy, Debug)]
struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

impl Stats {
    fn of(mut samples: Vec<f64>) -> Stats {
        assert!(!samples.is_empty());
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        let median = if n % 2 == 1 {
            samples[n / 2]
        } else {
            (samples[n / 2 - 1] + samples[n / 2]) / 2.0
        };
        Stats {
            median,
            min: samples[0],
            max: samples[n - 1],
        }
    }
}

/// Runs `f` twice untimed, then `runs` times timed.
fn time_runs<T>(runs: usize, mut f: impl FnMut() -> T) -> Stats {
    for _ in 0..2 {
        black_box(f());
    }
    let samples = (0..runs)
        .map(|_| {
            let t = Instant::now();
            black_box(f());
            t.elapsed().as_secs_f64()
        })
        .collect();
    Stats::of(samples)
}

fn ms(s: f64) -> String {
    let ms = s * 1e3;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{s:.2} s")
    }
}

fn secs(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

fn kib(bytes: usize) -> String {
    format!("{:.0} KiB", bytes as f64 / 1024.0)
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn k(n: usize) -> String {
    if n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        thousands(n)
    }
}

fn pass(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

// ---------------------------------------------------------------------------------------------
// policies

/// The two root-side addresses of the packet-path host: the probe zones.
#[derive(Clone, Copy)]
struct Probe {
    operator: Ipv4Addr,
    other: Ipv4Addr,
}

/// Runs `e2e/bench/policy_gen.py` (deterministic: seed 1).
fn generate(repo: &Path, out: &Path, rules: usize, zones: usize) {
    let status = Command::new("python3")
        .arg(repo.join("e2e/bench/policy_gen.py"))
        .args(["--rules", &rules.to_string()])
        .args(["--zones", &zones.to_string()])
        .args(["--seed", "1"])
        .arg("--out")
        .arg(out)
        .stdin(Stdio::null())
        .status()
        .expect("run python3 e2e/bench/policy_gen.py");
    assert!(status.success(), "policy_gen.py failed: {status}");
}

fn read_policy(path: &Path) -> SecurityPolicy {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn rule(name: &str, allow: bool, from: Option<&str>, port: u16) -> FirewallRule {
    FirewallRule {
        name: name.into(),
        action: if allow {
            RuleAction::Allow
        } else {
            RuleAction::Deny
        },
        from: from.map(str::to_string),
        protocol: Protocol::Tcp,
        ports: Some(vec![port]),
    }
}

/// The probe zones and rules, first: 8080 from the operator only (an allow and a deny by
/// source), 80 from anywhere, 9000 denied from anywhere. They decide every probe connection
/// whatever the generated rules behind them say (first match wins).
fn add_probes(policy: &mut SecurityPolicy, probe: Probe) {
    let spec = &mut policy.spec;
    spec.zones.insert(
        "bench_operator".into(),
        Zone(vec![format!("{}/32", probe.operator)]),
    );
    spec.zones.insert(
        "bench_other".into(),
        Zone(vec![format!("{}/32", probe.other)]),
    );
    let probes = [
        rule("bench_admin_operator", true, Some("bench_operator"), 8080),
        rule("bench_admin_other", false, Some("bench_other"), 8080),
        rule("bench_web", true, None, 80),
        rule("bench_deny_9000", false, None, 9000),
    ];
    spec.rules.splice(0..0, probes);
}

/// A generated policy with the probe rules first, written back as YAML (what Aerleon reads).
fn probe_policy(
    repo: &Path,
    work: &Path,
    rules: usize,
    zones: usize,
    probe: Probe,
) -> (SecurityPolicy, PathBuf) {
    let raw = work.join(format!("policy-{rules}-raw.yaml"));
    generate(repo, &raw, rules, zones);
    let mut policy = read_policy(&raw);
    add_probes(&mut policy, probe);
    let path = work.join(format!("policy-{rules}.yaml"));
    fs::write(
        &path,
        serde_yaml::to_string(&policy).expect("serialize the policy"),
    )
    .expect("write the policy");
    (policy, path)
}

fn meta() -> Meta {
    Meta {
        policy: POLICY.into(),
        generation: 1,
    }
}

fn nft_text(c: &Compiled) -> &str {
    match &c.output {
        Output::Nft(t) => t,
        Output::Iptables { .. } => unreachable!("an nftables compile"),
    }
}

fn output_bytes(c: &Compiled) -> usize {
    match &c.output {
        Output::Nft(t) => t.len(),
        Output::Iptables { v4, v6 } => v4.len() + v6.len(),
    }
}

/// Rule statements in an Outrider nft file (every rule carries a comment; sets do not).
fn nft_rule_lines(text: &str) -> usize {
    text.lines()
        .filter(|l| l.starts_with("\t\t") && l.contains(" comment \""))
        .count()
}

fn ipt_rule_lines(c: &Compiled) -> usize {
    match &c.output {
        Output::Iptables { v4, v6 } => v4
            .lines()
            .chain(v6.lines())
            .filter(|l| l.starts_with("-A "))
            .count(),
        Output::Nft(_) => 0,
    }
}

// ---------------------------------------------------------------------------------------------
// Aerleon

struct Aerleon {
    python: String,
    script: PathBuf,
}

/// One aerleon_compile.py result line.
#[derive(Clone, Debug)]
struct AerleonRun {
    version: String,
    nft_s: f64,
    ipt_s: f64,
    ip6t_s: f64,
    nft_bytes: usize,
    ipt_bytes: usize,
    nft_file: PathBuf,
}

impl Aerleon {
    fn find(repo: &Path) -> Aerleon {
        let python = match std::env::var("POLICY_BENCH_AERLEON_PYTHON") {
            Ok(p) if !p.is_empty() => p,
            _ => {
                let out = Command::new(repo.join("e2e/bench/aerleon_install.sh"))
                    .stdin(Stdio::null())
                    .stderr(Stdio::inherit())
                    .output()
                    .expect("run e2e/bench/aerleon_install.sh");
                assert!(
                    out.status.success(),
                    "e2e/bench/aerleon_install.sh failed (run e2e/bench/deps.sh as root), \
                     or set POLICY_BENCH_AERLEON=0"
                );
                String::from_utf8_lossy(&out.stdout).trim().to_string()
            }
        };
        Aerleon {
            python,
            script: repo.join("e2e/bench/aerleon_compile.py"),
        }
    }

    fn compile(&self, policy: &Path, out_dir: &Path, repeat: usize) -> AerleonRun {
        let out = Command::new(&self.python)
            .arg(&self.script)
            .arg(policy)
            .arg("--out-dir")
            .arg(out_dir)
            .args(["--repeat", &repeat.to_string()])
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .expect("run aerleon_compile.py");
        assert!(
            out.status.success(),
            "aerleon_compile.py {} failed",
            policy.display()
        );
        let line = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .unwrap_or_else(|e| panic!("aerleon_compile.py printed {line:?}: {e}"));
        let f = |k: &str| {
            v[k].as_f64()
                .unwrap_or_else(|| panic!("aerleon_compile.py: no {k} in {line}"))
        };
        AerleonRun {
            version: v["aerleon_version"].as_str().unwrap_or("?").to_string(),
            nft_s: f("nft_seconds"),
            ipt_s: f("iptables_seconds"),
            ip6t_s: f("ip6tables_seconds"),
            nft_bytes: f("nft_bytes") as usize,
            ipt_bytes: f("iptables_bytes") as usize + f("ip6tables_bytes") as usize,
            nft_file: PathBuf::from(v["nft_file"].as_str().expect("nft_file")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// kernel loads

/// A network namespace of this bench with nothing but lo, deleted on drop. Named like the
/// NetnsHost namespaces (`ortest-<pid>-…`), so their reaper and sweep clean it up too if this
/// process dies.
struct BareNs {
    name: String,
}

impl BareNs {
    fn new(tag: &str) -> BareNs {
        let name = format!("ortest-{}-{tag}", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip netns add");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        BareNs { name }
    }
}

impl Drop for BareNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[derive(Clone, Debug)]
enum Load {
    Ok(f64),
    Failed(f64, String),
    TimedOut(u64),
    Skipped,
}

impl Load {
    fn seconds(&self) -> Option<f64> {
        match self {
            Load::Ok(s) => Some(*s),
            _ => None,
        }
    }

    fn text(&self) -> String {
        match self {
            Load::Ok(s) => secs(*s),
            Load::Failed(s, e) => format!("FAILED after {} ({e})", secs(*s)),
            Load::TimedOut(t) => format!("> {t} s (timeout)"),
            Load::Skipped => "skipped".into(),
        }
    }
}

/// `nft -f file` inside the network namespace `netns` (from /run/netns), under `timeout`.
fn nft_load(netns: &str, file: &Path, timeout_s: u64) -> Load {
    let t = Instant::now();
    let out = Command::new("timeout")
        .args(["--kill-after=10", &timeout_s.to_string()])
        .arg("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .args(["--", "nft", "-f"])
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .expect("run timeout nsenter nft");
    let dt = t.elapsed().as_secs_f64();
    match out.status.code() {
        Some(0) => Load::Ok(dt),
        Some(124) | Some(137) | None => Load::TimedOut(timeout_s),
        Some(code) => {
            let err = String::from_utf8_lossy(&out.stderr);
            let first: String = err.lines().next().unwrap_or("").chars().take(200).collect();
            Load::Failed(dt, format!("exit {code}: {first}"))
        }
    }
}

/// Fits t = a·n^b through the first and last point: b ≈ 1 is linear, 2 quadratic.
fn exponent(points: &[(usize, f64)]) -> Option<f64> {
    let (first, last) = (points.first()?, points.last()?);
    if last.0 <= first.0 || first.1 <= 0.0 {
        return None;
    }
    Some((last.1 / first.1).ln() / (last.0 as f64 / first.0 as f64).ln())
}

/// Real connections against the probe rules: (description, expected open, got open).
fn probe_checks(h: &NetnsHost) -> Vec<(String, bool, bool)> {
    let cases = [
        ("operator", h.operator, 8080, true),
        ("other", h.other, 8080, false),
        ("operator", h.operator, 80, true),
        ("other", h.other, 80, true),
        ("other", h.other, 9000, false),
        ("operator", h.operator, 22, true),
    ];
    cases
        .iter()
        .map(|(who, from, port, want)| {
            let got = h.tcp_open(*from, *port, PROBE);
            (format!("{who}→{port}"), *want, got)
        })
        .collect()
}

/// Every probe port answers from both addresses (no ruleset in the way).
fn all_open(h: &NetnsHost) -> bool {
    [h.operator, h.other].iter().all(|from| {
        PROBE_PORTS
            .iter()
            .chain(&[22])
            .all(|port| h.tcp_open(*from, *port, PROBE))
    })
}

fn checks_text(checks: &[(String, bool, bool)]) -> (bool, String) {
    let ok = checks.iter().all(|(_, want, got)| want == got);
    let text = checks
        .iter()
        .map(|(what, want, got)| {
            let state = if *got { "open" } else { "blocked" };
            let mark = if want == got { "" } else { " (WRONG)" };
            format!("{what} {state}{mark}")
        })
        .collect::<Vec<_>>()
        .join(", ");
    (ok, text)
}

// ---------------------------------------------------------------------------------------------
// rollout

fn fleet(hosts: &[&NetnsHost], keys: &Path) -> Fleet {
    netns::sudo_fleet(hosts, keys)
}

fn endpoints(hosts: &[&NetnsHost]) -> Vec<Endpoint> {
    netns::endpoints(hosts)
}

/// One rollout with every progress event timestamped.
fn run_rollout(
    rt: &tokio::runtime::Runtime,
    fleet: &Fleet,
    hosts: &[Endpoint],
    compiled: &Arc<Compiled>,
    recorded: &BTreeMap<String, String>,
    settings: &Settings,
) -> (Report, Vec<(Instant, Progress)>, Instant, Instant) {
    let log = Mutex::new(Vec::new());
    let progress = |p: Progress| log.lock().unwrap().push((Instant::now(), p));
    let started = Instant::now();
    let report = rt.block_on(rollout::run(
        fleet, hosts, compiled, recorded, settings, &progress,
    ));
    let ended = Instant::now();
    (report, log.into_inner().unwrap(), started, ended)
}

/// Starts `n` hosts, a few at a time (each generates sshd host keys).
fn start_hosts(n: usize, ports: &[u16]) -> Vec<NetnsHost> {
    let mut hosts = Vec::with_capacity(n);
    while hosts.len() < n {
        let batch = (n - hosts.len()).min(5);
        let started: Vec<NetnsHost> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..batch)
                .map(|_| s.spawn(|| NetnsHost::start(ports)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("start a netns host"))
                .collect()
        });
        hosts.extend(started);
    }
    hosts
}

// ---------------------------------------------------------------------------------------------

struct CompileResult {
    rules: usize,
    nft: Stats,
    ipt: Stats,
    nft_bytes: usize,
    ipt_bytes: usize,
    nft_rules: usize,
    ipt_rules: usize,
    checks: Stats,
    from_spec: Stats,
    lint: Stats,
    nft_render: Stats,
    nft_hash_file: Stats,
    ipt_render: Stats,
    yaml_parse: f64,
    yaml_bytes: usize,
    findings: usize,
    compiled_nft: Compiled,
}

fn bench_compile(
    cfg: &Config,
    spec: &SecurityPolicySpec,
    yaml_parse: f64,
    yaml_bytes: usize,
) -> CompileResult {
    let m = meta();
    let compiled_nft = compile(spec, &m).expect("the bench policy compiles");
    let compiled_ipt = compile_for(spec, Backend::Iptables, &m).expect("compiles for iptables");
    eprintln!(
        "[bench] compile: {} findings, nft {} rule lines, iptables {} -A lines",
        compiled_nft.findings.len(),
        nft_rule_lines(nft_text(&compiled_nft)),
        ipt_rule_lines(&compiled_ipt)
    );
    let nft = time_runs(cfg.runs, || compile(spec, &m).unwrap());
    let ipt = time_runs(cfg.runs, || {
        compile_for(spec, Backend::Iptables, &m).unwrap()
    });
    let checks = time_runs(cfg.runs, || {
        let (p, f) = model::Policy::from_spec(spec);
        let p = p.unwrap();
        (lint::check(&p), f)
    });
    let from_spec = time_runs(cfg.runs, || model::Policy::from_spec(spec));
    let policy = model::Policy::from_spec(spec).0.unwrap();
    let lint = time_runs(cfg.runs, || lint::check(&policy));
    let nft_render = time_runs(cfg.runs, || nft::Body::render(&policy));
    let body = nft::Body::render(&policy);
    let nft_hash_file = time_runs(cfg.runs, || {
        let hash = sha256(body.rules().as_bytes());
        body.file(&hash)
    });
    let ipt_render = time_runs(cfg.runs, || iptables::render(&policy));
    CompileResult {
        rules: spec.rules.len(),
        nft,
        ipt,
        nft_bytes: output_bytes(&compiled_nft),
        ipt_bytes: output_bytes(&compiled_ipt),
        nft_rules: nft_rule_lines(nft_text(&compiled_nft)),
        ipt_rules: ipt_rule_lines(&compiled_ipt),
        checks,
        from_spec,
        lint,
        nft_render,
        nft_hash_file,
        ipt_render,
        yaml_parse,
        yaml_bytes,
        findings: compiled_nft.findings.len(),
        compiled_nft,
    }
}

struct LoadPoint {
    rules: usize,
    kernel_rules: usize,
    bytes: usize,
    runs: Vec<Load>,
}

impl LoadPoint {
    fn median(&self) -> Option<f64> {
        let ok: Vec<f64> = self.runs.iter().filter_map(Load::seconds).collect();
        (ok.len() == self.runs.len() && !ok.is_empty()).then(|| Stats::of(ok).median)
    }
}

struct AerleonLoad {
    rules: usize,
    bytes: usize,
    load: Load,
}

struct ApplyResult {
    hosts: usize,
    setup_s: f64,
    rules: usize,
    kernel_rules: usize,
    total_s: f64,
    read_s: f64,
    applied: usize,
    failed: Vec<String>,
    batches: Vec<usize>,
    to_confirming: Option<Stats>,
    to_done: Option<Stats>,
    rerun_s: f64,
    rerun_unchanged: usize,
    heal: Option<HealResult>,
}

struct HealResult {
    confirm_s: f64,
    blocked_at: Option<f64>,
    restored_at: Option<f64>,
    run_returned: f64,
    outcome: String,
    back_to_good: bool,
}

fn main() {
    let cfg = Config::from_env();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let load_before = load_average();
    let work = tempfile::Builder::new()
        .prefix("outrider-policy-bench-")
        .tempdir()
        .expect("create the work dir");
    eprintln!("[bench] work dir {}", work.path().display());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let aerleon = cfg.aerleon.then(|| Aerleon::find(&repo));

    // The packet-path host comes first: its addresses are the probe zones of every policy.
    eprintln!("[bench] starting the packet-path host");
    let probe_host = NetnsHost::start(&PROBE_PORTS);
    let probe = Probe {
        operator: probe_host.operator,
        other: probe_host.other,
    };
    let before = all_open(&probe_host);
    eprintln!(
        "[bench] before any ruleset, every probe port open: {}",
        pass(before)
    );

    let mut report = String::new();
    let _ = writeln!(
        report,
        "# policy bench — {}, {} cores, load average before {load_before}",
        cpu_model(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let _ = writeln!(
        report,
        "nft {}; kernel {}",
        support::command_line("nft", &["--version"]),
        support::command_line("uname", &["-r"])
    );

    // -- 1. compile ----------------------------------------------------------------------------
    let mut compiled_10k: Option<CompileResult> = None;
    let mut aerleon_main: Option<AerleonRun> = None;
    let mut main_policy_path = None;
    if cfg.phase("compile") {
        eprintln!("[bench] compile: {} rules / {} zones", cfg.rules, cfg.zones);
        let (_, path) = probe_policy(&repo, work.path(), cfg.rules, cfg.zones, probe);
        let text = fs::read_to_string(&path).expect("read the policy");
        let t = Instant::now();
        let policy: SecurityPolicy = serde_yaml::from_str(&text).expect("parse the policy");
        let yaml_parse = t.elapsed().as_secs_f64();
        let c = bench_compile(&cfg, &policy.spec, yaml_parse, text.len());
        eprintln!(
            "[bench] outrider: nft {} (min {}), iptables {}",
            ms(c.nft.median),
            ms(c.nft.min),
            ms(c.ipt.median)
        );
        if let Some(a) = &aerleon {
            eprintln!("[bench] aerleon compile (--repeat {})", cfg.aerleon_repeat);
            let run = a.compile(
                &path,
                &work.path().join(format!("aerleon-{}", cfg.rules)),
                cfg.aerleon_repeat,
            );
            eprintln!(
                "[bench] aerleon {}: nft {:.2} s, iptables {:.2} s + ip6tables {:.2} s",
                run.version, run.nft_s, run.ipt_s, run.ip6t_s
            );
            aerleon_main = Some(run);
        }
        main_policy_path = Some(path);
        compiled_10k = Some(c);
    }

    // -- 2. kernel loads -----------------------------------------------------------------------
    let mut outrider_loads: Vec<LoadPoint> = Vec::new();
    let mut aerleon_loads: Vec<AerleonLoad> = Vec::new();
    let mut packet_outrider: Option<(Load, bool, String)> = None;
    let mut packet_aerleon: Option<(Load, Option<(bool, String)>)> = None;
    if cfg.phase("load") {
        let main = compiled_10k
            .as_ref()
            .expect("the load phase needs the compile phase");
        // Outrider: fresh namespaces, each size `load_repeat` times.
        for &n in &cfg.load_sizes {
            let text = if n == cfg.rules {
                nft_text(&main.compiled_nft).to_string()
            } else {
                let (policy, _) = probe_policy(&repo, work.path(), n, cfg.zones, probe);
                nft_text(&compile(&policy.spec, &meta()).expect("compiles")).to_string()
            };
            let file = work.path().join(format!("outrider-{n}.nft"));
            fs::write(&file, &text).expect("write the nft file");
            let mut runs = Vec::new();
            for r in 0..cfg.load_repeat {
                let ns = BareNs::new(&format!("load{n}r{r}"));
                let l = nft_load(&ns.name, &file, OUTRIDER_LOAD_TIMEOUT_S);
                eprintln!("[bench] outrider nft -f {n} rules (run {r}): {}", l.text());
                runs.push(l);
            }
            outrider_loads.push(LoadPoint {
                rules: n,
                kernel_rules: nft_rule_lines(&text),
                bytes: text.len(),
                runs,
            });
        }
        // Packet path on Outrider's ruleset of step 1.
        let file = work.path().join("outrider-packet.nft");
        fs::write(&file, nft_text(&main.compiled_nft)).expect("write the nft file");
        let l = nft_load(&probe_host.netns, &file, OUTRIDER_LOAD_TIMEOUT_S);
        let (ok, text) = if l.seconds().is_some() {
            checks_text(&probe_checks(&probe_host))
        } else {
            (false, "not loaded".into())
        };
        eprintln!(
            "[bench] outrider {} rules in the packet-path host: {}; {text}",
            cfg.rules,
            l.text()
        );
        packet_outrider = Some((l, ok, text));

        // Aerleon: one load each, in a fresh namespace; the step-1 size in the packet-path host.
        if let Some(a) = &aerleon {
            for &n in &cfg.aerleon_load_sizes {
                let (nft_file, bytes) = if n == cfg.rules {
                    let run = aerleon_main.as_ref().expect("aerleon ran in step 1");
                    (run.nft_file.clone(), run.nft_bytes)
                } else {
                    let (_, path) = probe_policy(&repo, work.path(), n, cfg.zones, probe);
                    let run = a.compile(&path, &work.path().join(format!("aerleon-{n}")), 1);
                    (run.nft_file, run.nft_bytes)
                };
                if cfg.skip_aerleon_10k && n >= 10_000 {
                    eprintln!("[bench] aerleon nft -f {n} rules: skipped");
                    aerleon_loads.push(AerleonLoad {
                        rules: n,
                        bytes,
                        load: Load::Skipped,
                    });
                    if n == cfg.rules {
                        packet_aerleon = Some((Load::Skipped, None));
                    }
                    continue;
                }
                eprintln!(
                    "[bench] aerleon nft -f {n} rules (timeout {} s) ...",
                    cfg.aerleon_load_timeout
                );
                let load = if n == cfg.rules {
                    // the packet-path host again (its addresses are the probe zones), emptied
                    let out = probe_host.exec(&["nft", "flush", "ruleset"]);
                    assert!(
                        out.status.success(),
                        "nft flush ruleset: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    assert!(
                        all_open(&probe_host),
                        "the packet-path host still filters after nft flush ruleset"
                    );
                    let l = nft_load(&probe_host.netns, &nft_file, cfg.aerleon_load_timeout);
                    let checks = l.seconds().map(|_| checks_text(&probe_checks(&probe_host)));
                    packet_aerleon = Some((l.clone(), checks));
                    l
                } else {
                    let ns = BareNs::new(&format!("aerleon{n}"));
                    nft_load(&ns.name, &nft_file, cfg.aerleon_load_timeout)
                };
                eprintln!("[bench] aerleon nft -f {n} rules: {}", load.text());
                aerleon_loads.push(AerleonLoad {
                    rules: n,
                    bytes,
                    load,
                });
            }
        }
    }
    drop(probe_host);

    // -- 3. apply --------------------------------------------------------------------------------
    let apply = cfg
        .phase("apply")
        .then(|| bench_apply(&cfg, &repo, work.path(), &rt));

    // -- report ----------------------------------------------------------------------------------
    if let Some(c) = &compiled_10k {
        write_compile_report(&mut report, &cfg, c, aerleon_main.as_ref());
    }
    if cfg.phase("load") {
        write_load_report(
            &mut report,
            &cfg,
            &outrider_loads,
            &aerleon_loads,
            packet_outrider.as_ref(),
            packet_aerleon.as_ref(),
        );
    }
    if let Some(a) = &apply {
        write_apply_report(&mut report, a);
    }
    let _ = writeln!(report, "\nload average after: {}", load_average());
    if let Some(p) = &main_policy_path {
        let _ = writeln!(report, "policy: {}", p.display());
    }
    println!("{report}");
    write_report(&repo, "policy.md", &report);
    if cfg.keep {
        let kept = work.keep();
        eprintln!("[bench] kept {}", kept.display());
    }
}

fn bench_apply(
    cfg: &Config,
    repo: &Path,
    work: &Path,
    rt: &tokio::runtime::Runtime,
) -> ApplyResult {
    eprintln!("[bench] apply: starting {} hosts", cfg.hosts);
    let t = Instant::now();
    let hosts = start_hosts(cfg.hosts, &[80]);
    let setup_s = t.elapsed().as_secs_f64();
    eprintln!("[bench] {} hosts up in {setup_s:.1} s", hosts.len());
    let refs: Vec<&NetnsHost> = hosts.iter().collect();
    let keys = tempfile::tempdir().expect("key dir");
    let fleet = fleet(&refs, keys.path());
    let eps = endpoints(&refs);

    let path = work.join(format!("apply-{}.yaml", cfg.apply_rules));
    generate(repo, &path, cfg.apply_rules, cfg.apply_zones);
    let policy = read_policy(&path);
    assert_eq!(
        (
            policy.spec.failsafe.ports.as_slice(),
            policy.spec.failsafe.sources.as_slice()
        ),
        (&[22u16][..], &["198.18.0.0/15".to_string()][..]),
        "the generator's failsafe must keep SSH from 198.18.0.0/15 open"
    );
    let compiled = Arc::new(compile(&policy.spec, &meta()).expect("the apply policy compiles"));
    let kernel_rules = nft_rule_lines(nft_text(&compiled));
    let settings = Settings {
        policy: POLICY.into(),
        batch_size: Amount::Count(5),
        max_unavailable: Amount::Count(1),
        confirm: Duration::from_secs(20),
        repair_drift: false,
        hold: BTreeMap::new(),
    };
    eprintln!("[bench] rollout to {} hosts", eps.len());
    let (report, log, started, ended) =
        run_rollout(rt, &fleet, &eps, &compiled, &BTreeMap::new(), &settings);
    let total_s = (ended - started).as_secs_f64();
    let read_s = log
        .iter()
        .find(|(_, p)| matches!(p, Progress::Planned { .. }))
        .map_or(0.0, |(t, _)| (*t - started).as_secs_f64());
    let mut uploading: BTreeMap<String, Instant> = BTreeMap::new();
    let mut confirming: BTreeMap<String, Instant> = BTreeMap::new();
    let mut done: BTreeMap<String, Instant> = BTreeMap::new();
    let mut batches = Vec::new();
    for (t, p) in &log {
        match p {
            Progress::Step { host, step } => {
                let map = match step {
                    Step::Uploading => &mut uploading,
                    Step::Confirming => &mut confirming,
                };
                map.entry(host.clone()).or_insert(*t);
            }
            Progress::Done { host, .. } => {
                done.insert(host.clone(), *t);
            }
            Progress::Batch { hosts, .. } => batches.push(hosts.len()),
            _ => {}
        }
    }
    let spans = |until: &BTreeMap<String, Instant>| {
        let v: Vec<f64> = uploading
            .iter()
            .filter_map(|(h, u)| until.get(h).map(|d| (*d - *u).as_secs_f64()))
            .collect();
        (!v.is_empty()).then(|| Stats::of(v))
    };
    let applied = report
        .hosts
        .values()
        .filter(|r| matches!(r, HostResult::Applied { .. }))
        .count();
    let failed: Vec<String> = report
        .hosts
        .iter()
        .filter(|(_, r)| !matches!(r, HostResult::Applied { .. }))
        .map(|(h, r)| format!("{h}: {r:?}"))
        .collect();
    eprintln!(
        "[bench] rollout: {applied}/{} applied in {total_s:.2} s",
        eps.len()
    );
    let recorded: BTreeMap<String, String> = report
        .hosts
        .iter()
        .filter_map(|(h, r)| match r {
            HostResult::Applied { digest } => Some((h.clone(), digest.clone())),
            _ => None,
        })
        .collect();

    // A second pass: every host current, nothing pushed.
    let (again, _, s2, e2) = run_rollout(rt, &fleet, &eps, &compiled, &recorded, &settings);
    let rerun_s = (e2 - s2).as_secs_f64();
    let rerun_unchanged = again
        .hosts
        .values()
        .filter(|r| matches!(r, HostResult::Unchanged { .. }))
        .count();

    let heal = recorded
        .get("host-0")
        .map(|good| bench_heal(rt, &fleet, &hosts[0], &eps[0], &compiled, good));

    ApplyResult {
        hosts: eps.len(),
        setup_s,
        rules: policy.spec.rules.len(),
        kernel_rules,
        total_s,
        read_s,
        applied,
        failed,
        batches,
        to_confirming: spans(&confirming),
        to_done: spans(&done),
        rerun_s,
        rerun_unchanged,
        heal,
    }
}

/// Pushes a policy that denies tcp/22 from everywhere (failsafe on 2222) to one host with
/// confirmTimeout 5 s and times how long until a new connection to port 22 works again.
fn bench_heal(
    rt: &tokio::runtime::Runtime,
    fleet: &Fleet,
    host: &NetnsHost,
    ep: &Endpoint,
    good: &Arc<Compiled>,
    good_digest: &str,
) -> HealResult {
    let lockout: SecurityPolicySpec = serde_yaml::from_str(
        r#"
targets: {inventoryRef: {name: bench}}
defaultInput: drop
rules:
  - {name: deny_ssh, action: deny, protocol: tcp, ports: [22]}
  - {name: allow_web, action: allow, protocol: tcp, ports: [80]}
failsafe: {ports: [2222]}
"#,
    )
    .expect("lock-out policy");
    let lockout = Arc::new(
        compile(
            &lockout,
            &Meta {
                policy: POLICY.into(),
                generation: 2,
            },
        )
        .expect("the lock-out policy compiles"),
    );
    let confirm = Duration::from_secs(5);
    let settings = Settings {
        policy: POLICY.into(),
        batch_size: Amount::Count(1),
        max_unavailable: Amount::Count(0),
        confirm,
        repair_drift: false,
        hold: BTreeMap::new(),
    };
    let hosts = [ep.clone()];
    let recorded = BTreeMap::from([(ep.name.clone(), good_digest.to_string())]);
    eprintln!("[bench] lock-out on {} (confirmTimeout 5 s)", ep.name);
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let deadline = confirm + Duration::from_secs(60);
    let (blocked_at, restored_at, report, run_returned) = std::thread::scope(|s| {
        let poller = s.spawn(|| {
            let mut blocked_at = None;
            let mut next = Instant::now();
            while started.elapsed() < deadline && !stop.load(Ordering::Relaxed) {
                let open = host.tcp_open(host.operator, 22, Duration::from_millis(100));
                let at = started.elapsed().as_secs_f64();
                match (open, blocked_at) {
                    (false, None) => blocked_at = Some(at),
                    (true, Some(_)) => return (blocked_at, Some(at)),
                    _ => {}
                }
                next += Duration::from_millis(100);
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            (blocked_at, None)
        });
        let report = rt.block_on(rollout::run(
            fleet,
            &hosts,
            &lockout,
            &recorded,
            &settings,
            &|_| {},
        ));
        let run_returned = started.elapsed().as_secs_f64();
        // the poller stops by itself once SSH works again; only a run that never blocked
        // SSH would leave it polling until the deadline
        if !matches!(
            report.hosts.get(&ep.name),
            Some(HostResult::Failed {
                rolled_back: true,
                ..
            })
        ) {
            stop.store(true, Ordering::Relaxed);
        }
        let (b, r) = poller.join().expect("poller");
        (b, r, report, run_returned)
    });
    let outcome = match report.hosts.get(&ep.name) {
        Some(HostResult::Failed {
            reason,
            rolled_back,
            ..
        }) => format!(
            "Failed {reason}{}",
            if *rolled_back { ", rolled back" } else { "" }
        ),
        other => format!("{other:?}"),
    };
    eprintln!(
        "[bench] lock-out: blocked at {blocked_at:?} s, SSH back at {restored_at:?} s, run returned at {run_returned:.2} s: {outcome}"
    );
    // the restored ruleset is the good one, byte for byte: a pass with it finds the host current
    let back = rt.block_on(rollout::run(
        fleet,
        &hosts,
        good,
        &recorded,
        &Settings {
            confirm: Duration::from_secs(20),
            ..settings.clone()
        },
        &|_| {},
    ));
    let back_to_good = matches!(
        back.hosts.get(&ep.name),
        Some(HostResult::Unchanged { digest }) if digest == good_digest
    );
    HealResult {
        confirm_s: confirm.as_secs_f64(),
        blocked_at,
        restored_at,
        run_returned,
        outcome,
        back_to_good,
    }
}

// ---------------------------------------------------------------------------------------------
// report

fn write_compile_report(r: &mut String, cfg: &Config, c: &CompileResult, a: Option<&AerleonRun>) {
    let _ = writeln!(
        r,
        "\n## policy compile, {} rules / {} zones (+4 probe rules, 2 probe zones; {} findings)\n",
        thousands(cfg.rules),
        cfg.zones,
        c.findings
    );
    let _ = writeln!(
        r,
        "outrider: median of {} runs after 2 warm-ups (min–max); aerleon: fastest of {}",
        cfg.runs, cfg.aerleon_repeat
    );
    let version = a.map_or("aerleon (not run)".to_string(), |a| {
        format!("aerleon {}", a.version)
    });
    let _ = writeln!(
        r,
        "\n{:<22}{:<32}{:<18}{:<10}target",
        "", "outrider", version, "ratio"
    );
    let rows = [
        ("nftables compile", c.nft, a.map(|a| a.nft_s)),
        ("iptables compile", c.ipt, a.map(|a| a.ipt_s + a.ip6t_s)),
    ];
    for (name, s, peer) in rows {
        let ratio = peer.map(|p| p / s.median);
        let ratio_text = ratio.map_or("-".into(), |x| format!("{x:.0}x"));
        let peer_text = peer.map_or("-".into(), |p| format!("{p:.2} s"));
        let ok_ratio = ratio.is_none_or(|x| x >= TARGET_RATIO);
        let ok_ms = s.median * 1e3 < TARGET_COMPILE_MS;
        let verdict = match ratio {
            Some(x) => format!(
                ">=50x: {} ({x:.0}x), <50ms: {}{}",
                pass(ok_ratio),
                pass(ok_ms),
                if ok_ms {
                    String::new()
                } else {
                    format!(
                        " (+{:.0}%)",
                        (s.median * 1e3 / TARGET_COMPILE_MS - 1.0) * 100.0
                    )
                }
            ),
            None => format!("<50ms: {}", pass(ok_ms)),
        };
        let _ = writeln!(
            r,
            "{name:<22}{:<32}{peer_text:<18}{ratio_text:<10}{verdict}",
            format!("{} ({}–{})", ms(s.median), ms(s.min), ms(s.max)),
        );
    }
    let _ = writeln!(
        r,
        "{:<22}{:<32}(part of both compiles: Policy::from_spec + lint::check)",
        "static checks (incl.)",
        format!(
            "{} ({:.0}% of nft)",
            ms(c.checks.median),
            c.checks.median / c.nft.median * 100.0
        )
    );
    // what the nft compile is made of besides the static checks, each phase timed alone
    let rest = c.from_spec.median + c.nft_render.median + c.nft_hash_file.median;
    let _ = writeln!(
        r,
        "{:<22}{:<32}{}",
        "nft without lint",
        format!("~{} (sum of the phases)", ms(rest)),
        a.map_or(String::new(), |a| format!(
            "would be ~{:.0}x aerleon",
            a.nft_s / rest
        ))
    );
    let _ = writeln!(
        r,
        "{:<22}{:<32}{}",
        "output bytes",
        format!("nft {}, ipt {}", kib(c.nft_bytes), kib(c.ipt_bytes)),
        a.map_or(String::new(), |a| format!(
            "aerleon nft {}, ipt+ip6t {}",
            kib(a.nft_bytes),
            kib(a.ipt_bytes)
        ))
    );
    let _ = writeln!(
        r,
        "{:<22}nft {:.0}k rules/s, iptables {:.0}k rules/s ({} nft rule statements, {} iptables -A lines)",
        "throughput",
        c.rules as f64 / c.nft.median / 1e3,
        c.rules as f64 / c.ipt.median / 1e3,
        thousands(c.nft_rules),
        thousands(c.ipt_rules)
    );
    let _ = writeln!(r, "\nwhere the time goes (each phase timed alone, median):");
    let _ = writeln!(
        r,
        "  Policy::from_spec  {:>10}   (zones parsed and aggregated, rules checked)",
        ms(c.from_spec.median)
    );
    let _ = writeln!(
        r,
        "  lint::check        {:>10}   (shadowed/overlap: each rule against the earlier ones its zone, protocol and ports meet)",
        ms(c.lint.median)
    );
    let _ = writeln!(r, "  nft::Body::render  {:>10}", ms(c.nft_render.median));
    let _ = writeln!(
        r,
        "  nft hash + file    {:>10}   (sha256 of the body, the file with its tag)",
        ms(c.nft_hash_file.median)
    );
    let _ = writeln!(
        r,
        "  iptables::render   {:>10}   (both families; + hash and files in the compile)",
        ms(c.ipt_render.median)
    );
    let _ = writeln!(
        r,
        "  (serde_yaml parse of the {} policy: {}, not counted in compile; Aerleon's time does not count YAML either)",
        kib(c.yaml_bytes),
        ms(c.yaml_parse)
    );
}

fn write_load_report(
    r: &mut String,
    cfg: &Config,
    outrider: &[LoadPoint],
    aerleon: &[AerleonLoad],
    packet_outrider: Option<&(Load, bool, String)>,
    packet_aerleon: Option<&(Load, Option<(bool, String)>)>,
) {
    let _ = writeln!(
        r,
        "\n## kernel load (nft -f into a fresh network namespace)\n"
    );
    let _ = writeln!(
        r,
        "outrider: median of {} loads per size; aerleon: one load, timeout {} s",
        cfg.load_repeat, cfg.aerleon_load_timeout
    );
    let _ = writeln!(
        r,
        "\n{:<8}| {:<10}{:<10}{:<10}{:<8}{:<16}| {:<10}{:<18}ms/1k",
        "rules", "outrider", "file", "load", "ms/1k", "(min–max)", "aerleon", "load"
    );
    let _ = writeln!(r, "{:<8}| {:<10}{:<44}| file", "", "nft rules", "");
    let mut sizes: Vec<usize> = outrider.iter().map(|p| p.rules).collect();
    sizes.extend(aerleon.iter().map(|a| a.rules));
    sizes.sort_unstable();
    sizes.dedup();
    for n in &sizes {
        let o = outrider.iter().find(|p| p.rules == *n);
        let a = aerleon.iter().find(|x| x.rules == *n);
        let (otext, per, range, kr, obytes) = match o {
            Some(p) => {
                let ok: Vec<f64> = p.runs.iter().filter_map(Load::seconds).collect();
                match p.median() {
                    Some(m) => {
                        let s = Stats::of(ok);
                        (
                            secs(m),
                            format!("{:.0} ms", m * 1e3 / (*n as f64 / 1000.0)),
                            format!("{}–{}", secs(s.min), secs(s.max)),
                            thousands(p.kernel_rules),
                            kib(p.bytes),
                        )
                    }
                    None => (
                        p.runs
                            .iter()
                            .find(|l| l.seconds().is_none())
                            .map_or("?".into(), Load::text),
                        "-".into(),
                        "-".into(),
                        thousands(p.kernel_rules),
                        kib(p.bytes),
                    ),
                }
            }
            None => ("-".into(), "-".into(), "-".into(), "-".into(), "-".into()),
        };
        let (atext, abytes, aper) = match a {
            Some(x) => (
                x.load.text(),
                kib(x.bytes),
                x.load.seconds().map_or("-".into(), |s| {
                    format!("{:.0} ms", s * 1e3 / (*n as f64 / 1000.0))
                }),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let _ = writeln!(
            r,
            "{:<8}| {kr:<10}{obytes:<10}{otext:<10}{per:<8}{range:<16}| {abytes:<10}{atext:<18}{aper}",
            thousands(*n)
        );
    }
    let opoints: Vec<(usize, f64)> = outrider
        .iter()
        .filter_map(|p| p.median().map(|m| (p.rules, m)))
        .collect();
    let apoints: Vec<(usize, f64)> = aerleon
        .iter()
        .filter_map(|a| a.load.seconds().map(|s| (a.rules, s)))
        .collect();
    let oexp = exponent(&opoints);
    let aexp = exponent(&apoints);
    let fmt_exp = |e: Option<f64>, p: &[(usize, f64)]| match (e, p.first(), p.last()) {
        (Some(e), Some(f), Some(l)) => format!("n^{e:.2} ({}→{})", k(f.0), k(l.0)),
        _ => "-".into(),
    };
    let _ = writeln!(
        r,
        "growth (t = a·n^b through the smallest and largest size): outrider {}, aerleon {}",
        fmt_exp(oexp, &opoints),
        fmt_exp(aexp, &apoints)
    );
    let at_10k = outrider
        .iter()
        .find(|p| p.rules == 10_000)
        .and_then(LoadPoint::median);
    let linear = oexp.map(|e| e <= 1.2);
    let _ = writeln!(
        r,
        "target: outrider <= 2 s at 10,000 rules: {}; linear (b <= 1.2): {}",
        at_10k.map_or("not measured".into(), |s| format!(
            "{} ({})",
            pass(s <= TARGET_LOAD_S),
            secs(s)
        )),
        linear.map_or("not measured".into(), |l| pass(l).to_string())
    );
    if let Some((l, ok, text)) = packet_outrider {
        let _ = writeln!(
            r,
            "\npacket path, outrider {} rules loaded into a netns host ({}): {} — {text}",
            thousands(cfg.rules),
            l.text(),
            pass(*ok)
        );
    }
    match packet_aerleon {
        Some((l, Some((ok, text)))) => {
            let _ = writeln!(
                r,
                "packet path, aerleon {} rules loaded into a netns host ({}): {} — {text}",
                thousands(cfg.rules),
                l.text(),
                pass(*ok)
            );
        }
        Some((l, None)) => {
            let _ = writeln!(
                r,
                "packet path, aerleon {} rules: not checked (load {})",
                thousands(cfg.rules),
                l.text()
            );
        }
        None => {}
    }
}

fn write_apply_report(r: &mut String, a: &ApplyResult) {
    let _ = writeln!(
        r,
        "\n## apply: {} netns hosts, {} rules ({} nft rule statements), canary + batches of 5, maxUnavailable 1, confirmTimeout 20s\n",
        a.hosts, a.rules, a.kernel_rules
    );
    let _ = writeln!(
        r,
        "hosts started in {:.1} s (not counted); batches {:?}",
        a.setup_s, a.batches
    );
    let _ = writeln!(
        r,
        "rollout wall time     {}   (read of every host {}, then the batches)",
        secs(a.total_s),
        secs(a.read_s)
    );
    let span = |s: &Option<Stats>| {
        s.map_or("-".into(), |s| {
            format!(
                "min {} / median {} / max {}",
                secs(s.min),
                secs(s.median),
                secs(s.max)
            )
        })
    };
    let _ = writeln!(
        r,
        "per host, Uploading → Done        {}   (Done is reported when the host's whole batch ends)",
        span(&a.to_done)
    );
    let _ = writeln!(
        r,
        "per host, Uploading → Confirming  {}   (upload, nft -c, timer armed, nft -f)",
        span(&a.to_confirming)
    );
    let _ = writeln!(
        r,
        "applied: {}/{} {}",
        a.applied,
        a.hosts,
        pass(a.applied == a.hosts)
    );
    for f in &a.failed {
        let _ = writeln!(r, "  {f}");
    }
    let _ = writeln!(
        r,
        "second pass, nothing to push: {} ({}/{} Unchanged)",
        secs(a.rerun_s),
        a.rerun_unchanged,
        a.hosts
    );
    match &a.heal {
        Some(h) => {
            let f = |x: Option<f64>| x.map_or("never".into(), |s| format!("+{s:.2} s"));
            let _ = writeln!(
                r,
                "\nlock-out healing (deny tcp/22 from everywhere, failsafe on 2222), confirmTimeout {:.0} s:",
                h.confirm_s
            );
            let _ = writeln!(
                r,
                "  SSH blocked first seen {}, new connection to :22 from operator succeeds again {} after the apply started",
                f(h.blocked_at),
                f(h.restored_at)
            );
            let _ = writeln!(
                r,
                "  rollout::run returned at +{:.2} s: {}; previous ruleset back byte for byte: {}",
                h.run_returned,
                h.outcome,
                pass(h.back_to_good)
            );
            if let (Some(b), Some(back)) = (h.blocked_at, h.restored_at) {
                let _ = writeln!(
                    r,
                    "  locked out for {:.2} s; healed {:.2} s after confirmTimeout",
                    back - b,
                    back - h.confirm_s
                );
            }
        }
        None => {
            let _ = writeln!(r, "\nlock-out healing: not run (host-0 was not applied)");
        }
    }
}
