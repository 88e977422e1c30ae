//! HealthCheck benchmark (`make bench-health`): `HC_BENCH_HOSTS` (1,000) loopback SSH hosts in
//! HealthChecks of 10 hosts each (one Inventory and Secret per HealthCheck), 5 host checks per
//! host (disk, memory, load, process, exec) plus 10 HTTP endpoint probes per HealthCheck
//! against a local HTTP server this bench runs (as many endpoints as hosts), every 10 s,
//! end to end through `outrider controller` and the real API server of `e2e/cluster.sh`.
//!
//! Phases, all on the same sshd and hosts:
//! 1. peer, first, on a quiet machine: Nagios' way, `check_by_ssh` (monitoring-plugins) with one
//!    SSH connection per check, driven by a pool of `HC_BENCH_PEER_WORKERS` (16) threads at the
//!    same 10 s interval over N hosts × 5 checks, N = 10, 15, 20, 25, 30, 40, 50, … (up to the
//!    host count), `HC_BENCH_PEER_ROUNDS` (3) rounds each, stopping at the first N where a round
//!    overran its interval: the largest N that kept every round on schedule, and its CPU per
//!    host-round (check_by_ssh and ssh clients, from this process's reaped children, plus sshd);
//! 2. outrider warm-up: the controller opens its connections (and probes the Inventories once);
//!    the clock starts when every target is Healthy in status, plus two intervals;
//! 3. steady state, `HC_BENCH_SECS` (300): schedule lag p50/p99 (interpolated in the
//!    `outrider_health_schedule_lag_seconds` buckets), rounds run against rounds due,
//!    controller CPU-s per host-round (/proc utime+stime), sshd CPU-s per host-round (the
//!    listener and every process below it, reaped children included), status writes per
//!    minute (`outrider_status_writes_total{kind="HealthCheck"}`), SSH handshakes;
//! 4. flapping, `HC_BENCH_FLAP_SECS` (120): every 20th host (5%) has its flag file created and
//!    removed every `HC_BENCH_FLAP_PERIOD` (40) seconds, so its `flag` check fails for longer
//!    than `failureThreshold: 3` rounds and passes again: status writes per minute; then the
//!    controller's peak RSS (VmHWM).
//!
//! The `sshd` process check reads the test sshd's pid file on both sides
//! (`HC_BENCH_PROCESS_CHECK=pidfile`, the default): every host here shares one /proc holding
//! all hosts' sessions, so a check by name (`HC_BENCH_PROCESS_CHECK=name`) scans ~2,100 entries
//! per host and round at 1,000 hosts, a cost of the loopback fleet, not of a real host.
//!
//! The targets are printed next to the figures, never asserted (timings depend on the
//! machine). `HC_BENCH_PHASES` (`outrider,peer`) runs one side only. Needs root (the test
//! sshd), the test user (`e2e/deps.sh`), check_by_ssh (`e2e/bench/deps.sh`) and the control
//! plane (`make tools`). Only 127.0.0.0/8 is used; nothing is looked up in DNS. The report
//! goes to stdout and `target/bench/health_checks.md`.

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

const INTERVAL: Duration = Duration::from_secs(10);
const HOSTS_PER_CHECK: usize = 10;
const ENDPOINTS_PER_CHECK: usize = 10;
const CHECKS: [&str; 5] = ["disk", "mem", "load", "sshd", "flag"];
/// The controller rewrites an unchanged status this often (src/controller/health_check/task.rs).
const HEARTBEAT_SECS: f64 = 300.0;
/// Every FLAP_EVERY-th host flaps in the flapping phase (5%).
const FLAP_EVERY: usize = 20;
const WARMUP_LIMIT: Duration = Duration::from_secs(15 * 60);
const PEER_SERIES: [usize; 16] = [
    10, 15, 20, 25, 30, 40, 50, 60, 80, 100, 150, 200, 300, 400, 600, 1000,
];
/// The peer phase stops starting new steps after this long.
const PEER_LIMIT: Duration = Duration::from_secs(240);
const CHECK_BY_SSH: &str = "/usr/lib/nagios/plugins/check_by_ssh";
const PLUGINS: &str = "/usr/lib/nagios/plugins";

/// How the `sshd` check finds its process, on both sides.
#[derive(Clone, Debug)]
enum ProcessCheck {
    /// By name: a scan of /proc (`process: {name: sshd}`; `check_procs -C sshd`). Every host
    /// here shares this machine's /proc, which holds the sessions of all hosts (two sshd
    /// processes per kept-open connection): at 1,000 hosts a scan reads ~2,100 entries,
    /// ~40 ms of CPU per host and round, where a real host has a few hundred processes.
    Name,
    /// By the test sshd's pid file (`process: {pidfile: …}`; `read` and `test -d /proc/$p`):
    /// the same question at the same cost as on a real host. The default.
    Pidfile(PathBuf),
}

impl ProcessCheck {
    fn yaml(&self) -> String {
        match self {
            ProcessCheck::Name => "{name: sshd}".into(),
            ProcessCheck::Pidfile(p) => format!("{{pidfile: {}}}", p.display()),
        }
    }

    fn label(&self) -> &'static str {
        match self {
            ProcessCheck::Name => "by name (/proc scan)",
            ProcessCheck::Pidfile(_) => "by pid file",
        }
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.trim()
                .replace('_', "")
                .parse()
                .unwrap_or_else(|_| panic!("{name} must be a number, not {v:?}"))
        })
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// /proc readings

/// CPU seconds of `root` and every process below it, the children they reaped included: the
/// sshd listener and its kept-open connections with their sessions.
fn tree_cpu(root: u32) -> f64 {
    let table = process_table();
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (pid, ppid) in &table {
        children.entry(*ppid).or_default().push(*pid);
    }
    let mut total = 0.0;
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        total += cpu_seconds_with_children(pid);
        if let Some(kids) = children.get(&pid) {
            stack.extend(kids);
        }
    }
    total
}

/// CPU seconds of the children this process has reaped (cutime + cstime): the peer's
/// check_by_ssh processes and the ssh clients they ran.
fn reaped_children_cpu() -> f64 {
    let stat = fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat");
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields
        .get(13..15)
        .map(|f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    ticks as f64 / 100.0
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free port")
}

// ---------------------------------------------------------------------------------------------
// The HTTP server the endpoint probes hit

/// A tiny HTTP/1.1 server on 127.0.0.1: `200 ok` to every GET, keep-alive honoured, one
/// thread per connection. Counts the requests it answered.
struct HttpServer {
    port: u16,
    requests: Arc<AtomicU64>,
}

impl HttpServer {
    fn start() -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the HTTP server");
        let port = listener.local_addr().expect("HTTP server address").port();
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let counter = counter.clone();
                let _ = std::thread::Builder::new()
                    .stack_size(64 * 1024)
                    .spawn(move || serve_connection(stream, &counter));
            }
        });
        HttpServer { port, requests }
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

fn serve_connection(mut stream: TcpStream, requests: &AtomicU64) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(120)));
    let _ = stream.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if buf.len() > 64 * 1024 {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        buf.drain(..end);
        let close = head.contains("\r\nconnection: close");
        requests.fetch_add(1, Ordering::Relaxed);
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n{}\r\nok\n",
            if close { "Connection: close\r\n" } else { "" }
        );
        if stream.write_all(response.as_bytes()).is_err() || close {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The controller's /metrics

#[derive(Default)]
struct Scrape {
    /// (metric name, label text without braces, value)
    series: Vec<(String, String, f64)>,
}

impl Scrape {
    fn get(port: u16) -> Option<Scrape> {
        let out = Command::new("curl")
            .args(["-sf", "--max-time", "10"])
            .arg(format!("http://127.0.0.1:{port}/metrics"))
            .stdin(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let mut s = Scrape::default();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.trim().parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (series, ""),
            };
            s.series.push((name.to_string(), labels.to_string(), value));
        }
        Some(s)
    }

    /// Sum of the series named `name` whose labels contain every one of `labels`.
    fn sum(&self, name: &str, labels: &[&str]) -> f64 {
        self.series
            .iter()
            .filter(|(n, l, _)| n == name && labels.iter().all(|want| l.contains(want)))
            .map(|(_, _, v)| *v)
            .sum()
    }

    /// Cumulative buckets `(le, count)` of a histogram, by `le`.
    fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let bucket = format!("{name}_bucket");
        let mut b: Vec<(f64, f64)> = self
            .series
            .iter()
            .filter(|(n, _, _)| *n == bucket)
            .filter_map(|(_, l, v)| {
                let le = l.split("le=\"").nth(1)?.split('"').next()?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, *v))
            })
            .collect();
        b.sort_by(|a, b| a.0.total_cmp(&b.0));
        b
    }
}

const LAG: &str = "outrider_health_schedule_lag_seconds";
const ROUNDS: &str = "outrider_health_rounds_total";
const HANDSHAKES: &str = "outrider_health_ssh_handshakes_total";
const WRITES: &str = "outrider_status_writes_total";
const CHECK_STATE: &str = "outrider_check_state";

/// The `p` quantile of the observations between two scrapes, interpolated linearly inside
/// its bucket (from 0 for the first); infinity when it lies above the last finite bound.
fn lag_quantile(before: &Scrape, after: &Scrape, p: f64) -> Option<f64> {
    let a = before.buckets(LAG);
    let b = after.buckets(LAG);
    let delta: Vec<(f64, f64)> = b
        .iter()
        .map(|(le, c)| {
            let prev = a.iter().find(|(l, _)| l == le).map_or(0.0, |(_, c0)| *c0);
            (*le, c - prev)
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let target = p * total;
    let (mut prev_le, mut prev_c) = (0.0, 0.0);
    for (le, c) in delta {
        if c >= target {
            if le.is_infinite() {
                return Some(f64::INFINITY);
            }
            let frac = if c > prev_c {
                (target - prev_c) / (c - prev_c)
            } else {
                0.0
            };
            return Some(prev_le + frac * (le - prev_le));
        }
        prev_le = le;
        prev_c = c;
    }
    None
}

/// Rounds between two scrapes that started more than `late` seconds after their slot
/// (`late` must be a bucket bound).
fn late_rounds(before: &Scrape, after: &Scrape, late: f64) -> f64 {
    let count = |s: &Scrape| {
        let b = s.buckets(LAG);
        let total = b.last().map_or(0.0, |x| x.1);
        let under = b.iter().find(|(le, _)| *le == late).map_or(0.0, |x| x.1);
        total - under
    };
    count(after) - count(before)
}

fn fmt_lag(v: Option<f64>) -> String {
    match v {
        None => "—".into(),
        Some(x) if x.is_infinite() => "> 30 s".into(),
        Some(x) if x < 1.0 => format!("{:.0} ms", x * 1000.0),
        Some(x) => format!("{x:.2} s"),
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster

/// The CRDs of the binary under test (not the checked-in copy, which may be mid-edit).
fn install_crds(cluster: &Cluster, outrider: &Path) {
    let crds = Command::new(outrider)
        .arg("crd")
        .output()
        .expect("outrider crd");
    assert!(crds.status.success(), "outrider crd failed");
    let mut apply = cluster
        .kubectl()
        .args(["apply", "--server-side", "--force-conflicts", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl apply");
    apply
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(&crds.stdout)
        .expect("write the CRDs to kubectl");
    let out = apply.wait_with_output().expect("kubectl apply");
    assert!(
        out.status.success(),
        "installing the CRDs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    cluster.run(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/healthchecks.outrider.dev",
        "crd/inventories.outrider.dev",
    ]);
}

/// Deletes the bench namespace when dropped (also on a panic).
struct Namespace<'a>(&'a Cluster);

impl Drop for Namespace<'_> {
    fn drop(&mut self) {
        let _ = self
            .0
            .kubectl()
            .args(["delete", "namespace", &self.0.ns, "--wait=false"])
            .output();
    }
}

/// The controller process; killed when dropped.
struct Controller {
    child: Child,
    metrics_port: u16,
    log: PathBuf,
}

impl Controller {
    fn start(outrider: &Path, cluster: &Cluster, log: PathBuf) -> Controller {
        let metrics_port = free_port();
        let log_file = fs::File::create(&log).expect("controller log");
        let child = Command::new(outrider)
            .args(["controller", "--watch-namespace", &cluster.ns])
            .args(["--leader-elect", "false"])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .env("KUBECONFIG", &cluster.kubeconfig)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start outrider controller");
        let c = Controller {
            child,
            metrics_port,
            log,
        };
        wait_ready(metrics_port, &c.log);
        c
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn scrape(&self) -> Scrape {
        Scrape::get(self.metrics_port).unwrap_or_else(|| {
            panic!(
                "the controller's /metrics did not answer; see {}",
                self.log.display()
            )
        })
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Manifests

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

/// One Secret, Inventory and HealthCheck per group of HOSTS_PER_CHECK hosts.
fn manifests(
    fleet: &Fleet,
    hosts: usize,
    http_port: u16,
    flap_dir: &Path,
    process: &ProcessCheck,
) -> String {
    let key = fs::read_to_string(fleet.secret_dir.join("ssh-privatekey")).expect("read the key");
    let checks = hosts.div_ceil(HOSTS_PER_CHECK);
    let mut y = String::new();
    for k in 0..checks {
        let group: Vec<usize> =
            (k * HOSTS_PER_CHECK..((k + 1) * HOSTS_PER_CHECK).min(hosts)).collect();
        let addrs: Vec<&str> = group.iter().map(|i| fleet.addrs[*i].as_str()).collect();
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: fleet-{k}}}\ntype: Opaque\nstringData:\n  \
             ssh-privatekey: |\n{}  known_hosts: |\n{}",
            indent(&key),
            indent(&fleet.server.known_hosts_for(&addrs))
        );
        let _ = write!(
            y,
            "---\napiVersion: outrider.dev/v1alpha1\nkind: Inventory\nmetadata: {{name: fleet-{k}}}\nspec:\n  \
             ssh: {{user: {BENCH_USER}, port: {}, secretRef: {{name: fleet-{k}}}, connectTimeout: {CONNECT_TIMEOUT_SECS}s, hostKeyPolicy: Strict}}\n  \
             probe: {{interval: 24h}}\n  hosts:\n",
            fleet.port()
        );
        for i in &group {
            let _ = writeln!(y, "    - {{name: h{i}, address: {}}}", fleet.addrs[*i]);
        }
        let _ = write!(
            y,
            "---\napiVersion: outrider.dev/v1alpha1\nkind: HealthCheck\nmetadata: {{name: hc-{k}}}\nspec:\n  \
             interval: {}s\n  targets: {{inventoryRef: {{name: fleet-{k}}}}}\n  failureThreshold: 3\n  checks:\n    \
             - {{name: disk, disk: {{path: /, maxUsedPercent: 99}}}}\n    \
             - {{name: mem, memory: {{maxUsedPercent: 100}}}}\n    \
             - {{name: load, load: {{maxPerCore: 1000}}}}\n    \
             - {{name: sshd, process: {}}}\n    \
             - {{name: flag, exec: {{script: 'test ! -e {}/flap-$(echo $SSH_CONNECTION | cut -d\" \" -f3)'}}}}\n  \
             endpoints:\n",
            INTERVAL.as_secs(),
            process.yaml(),
            flap_dir.display()
        );
        for e in 1..=ENDPOINTS_PER_CHECK {
            let _ = writeln!(
                y,
                "    - {{name: ep-{e}, http: {{url: \"http://127.0.0.1:{http_port}/hc-{k}/ep-{e}\", expectStatus: [200]}}, timeout: 2s}}"
            );
        }
    }
    y
}

// ---------------------------------------------------------------------------------------------
// outrider

/// Readings at one moment of the outrider run.
struct Mark {
    at: Instant,
    scrape: Scrape,
    controller_cpu: f64,
    sshd_cpu: f64,
    http_requests: u64,
}

impl Mark {
    fn take(controller: &Controller, fleet: &Fleet, http: &HttpServer) -> Mark {
        Mark {
            at: Instant::now(),
            scrape: controller.scrape(),
            controller_cpu: cpu_seconds(controller.pid()),
            sshd_cpu: tree_cpu(fleet.server.pid()),
            http_requests: http.requests(),
        }
    }
}

/// What one measured window of the outrider run gave.
struct Window {
    secs: f64,
    lag_p50: Option<f64>,
    lag_p99: Option<f64>,
    lag_max_bucket: String,
    late_over_1s: f64,
    rounds: f64,
    rounds_due: f64,
    host_rounds: f64,
    handshakes: f64,
    writes: f64,
    controller_cpu: f64,
    sshd_cpu: f64,
    http_requests: u64,
    peak_unhealthy: f64,
}

impl Window {
    fn between(a: &Mark, b: &Mark, checks: usize, hosts: usize, peak_unhealthy: f64) -> Window {
        let secs = b.at.duration_since(a.at).as_secs_f64();
        let d =
            |name: &str, labels: &[&str]| b.scrape.sum(name, labels) - a.scrape.sum(name, labels);
        let rounds = d(ROUNDS, &[]);
        // the smallest bucket bound that holds every round of the window
        let lag_max_bucket = {
            let before = a.scrape.buckets(LAG);
            let delta: Vec<(f64, f64)> = b
                .scrape
                .buckets(LAG)
                .iter()
                .map(|(le, c)| {
                    let c0 = before.iter().find(|(l, _)| l == le).map_or(0.0, |x| x.1);
                    (*le, c - c0)
                })
                .collect();
            let total = delta.last().map_or(0.0, |x| x.1);
            match delta.iter().find(|(_, c)| total > 0.0 && *c >= total) {
                Some((le, _)) if le.is_infinite() => "> 30 s".to_string(),
                Some((le, _)) => format!("≤ {le} s"),
                None => "—".to_string(),
            }
        };
        Window {
            secs,
            lag_p50: lag_quantile(&a.scrape, &b.scrape, 0.50),
            lag_p99: lag_quantile(&a.scrape, &b.scrape, 0.99),
            lag_max_bucket,
            late_over_1s: late_rounds(&a.scrape, &b.scrape, 1.0),
            rounds,
            rounds_due: checks as f64 * secs / INTERVAL.as_secs_f64(),
            // every HealthCheck has HOSTS_PER_CHECK hosts, the last one perhaps fewer
            host_rounds: rounds * hosts as f64 / checks as f64,
            handshakes: d(HANDSHAKES, &[]),
            writes: d(WRITES, &["kind=\"HealthCheck\""]),
            controller_cpu: b.controller_cpu - a.controller_cpu,
            sshd_cpu: b.sshd_cpu - a.sshd_cpu,
            http_requests: b.http_requests - a.http_requests,
            peak_unhealthy,
        }
    }

    fn writes_per_min(&self) -> f64 {
        self.writes * 60.0 / self.secs
    }
}

struct OutriderRun {
    hosts: usize,
    checks: usize,
    warmup_secs: f64,
    /// SSH connections opened in the warm-up (one per host, plus retries of those that timed
    /// out while the handshakes queued for the CPU).
    warmup_handshakes: f64,
    warmup_note: String,
    steady: Window,
    flap: Window,
    flapping_hosts: usize,
    peak_rss_kib: u64,
}

fn sum_column(text: &str) -> u64 {
    text.split_whitespace()
        .filter_map(|v| v.parse::<u64>().ok())
        .sum()
}

/// Toggles the flag files of `hosts` every `period` until `stop`; the first toggle creates them.
fn flapper(
    dir: PathBuf,
    addrs: Vec<String>,
    period: Duration,
    stop: Arc<AtomicBool>,
    toggles: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut on = false;
        while !stop.load(Ordering::Relaxed) {
            on = !on;
            for a in &addrs {
                let f = dir.join(format!("flap-{a}"));
                if on {
                    let _ = fs::write(&f, "");
                } else {
                    let _ = fs::remove_file(&f);
                }
            }
            toggles.fetch_add(1, Ordering::Relaxed);
            let until = Instant::now() + period;
            while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        for a in &addrs {
            let _ = fs::remove_file(dir.join(format!("flap-{a}")));
        }
    })
}

/// Sleeps `secs` while sampling the Unhealthy targets gauge every 5 s; returns its peak.
fn observe(controller: &Controller, secs: u64, label: &str) -> f64 {
    let end = Instant::now() + Duration::from_secs(secs);
    let mut peak: f64 = 0.0;
    let mut last_report = Instant::now();
    while Instant::now() < end {
        std::thread::sleep(
            Duration::from_secs(5).min(end.saturating_duration_since(Instant::now())),
        );
        if let Some(s) = Scrape::get(controller.metrics_port) {
            peak = peak.max(s.sum(CHECK_STATE, &["state=\"Unhealthy\""]));
        }
        if last_report.elapsed() >= Duration::from_secs(60) {
            eprintln!(
                "[bench] {label}: {:.0} s to go, load average {}",
                end.saturating_duration_since(Instant::now()).as_secs_f64(),
                load_average()
            );
            last_report = Instant::now();
        }
    }
    peak
}

#[allow(clippy::too_many_arguments)]
fn run_outrider(
    repo: &Path,
    outrider: &Path,
    fleet: &Fleet,
    hosts: usize,
    steady_secs: u64,
    flap_secs: u64,
    flap_period: Duration,
    flap_dir: &Path,
    process: &ProcessCheck,
) -> OutriderRun {
    let work = fleet.work.path();
    let cluster = Cluster::up(repo, "bench-health");
    install_crds(&cluster, outrider);
    cluster.run(&["create", "namespace", &cluster.ns]);
    let _namespace = Namespace(&cluster);
    let http = HttpServer::start();
    let checks = hosts.div_ceil(HOSTS_PER_CHECK);
    let targets = hosts + checks * ENDPOINTS_PER_CHECK;
    let all = work.join("health-checks.yaml");
    fs::write(&all, manifests(fleet, hosts, http.port, flap_dir, process))
        .expect("write the manifests");
    cluster.run(&[
        "apply",
        "--server-side",
        "-n",
        &cluster.ns,
        "-f",
        &all.display().to_string(),
    ]);
    eprintln!(
        "[bench] outrider: {checks} HealthChecks, {hosts} hosts × {} checks, {} endpoints (HTTP server 127.0.0.1:{}), every {} s",
        CHECKS.len(),
        checks * ENDPOINTS_PER_CHECK,
        http.port,
        INTERVAL.as_secs()
    );

    let started = Instant::now();
    let controller = Controller::start(outrider, &cluster, work.join("controller.log"));
    // warm-up: every target Healthy in status (first rounds, connections, Inventory probes)
    let mut warmup_note = String::new();
    let mut last_print = Instant::now();
    loop {
        let healthy = sum_column(&cluster.run(&[
            "get",
            "healthchecks",
            "-n",
            &cluster.ns,
            "-o",
            "jsonpath={range .items[*]}{.status.summary.healthy}{\" \"}{end}",
        ]));
        let reachable = sum_column(&cluster.run(&[
            "get",
            "inventories",
            "-n",
            &cluster.ns,
            "-o",
            "jsonpath={range .items[*]}{.status.reachable}{\" \"}{end}",
        ]));
        if healthy as usize >= targets && reachable as usize >= hosts {
            break;
        }
        if started.elapsed() > WARMUP_LIMIT {
            warmup_note = format!(
                "warm-up incomplete after {WARMUP_LIMIT:?}: {healthy}/{targets} targets Healthy, \
                 {reachable}/{hosts} hosts reachable by the Inventories; measured anyway"
            );
            eprintln!("[bench] warning: {warmup_note}");
            break;
        }
        if last_print.elapsed() >= Duration::from_secs(15) {
            eprintln!(
                "[bench] warm-up {:.0} s: {healthy}/{targets} targets Healthy, {reachable}/{hosts} reachable, load {}",
                started.elapsed().as_secs_f64(),
                load_average()
            );
            last_print = Instant::now();
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    // two more intervals: rounds delayed by the handshakes settle back on their slots
    std::thread::sleep(INTERVAL * 2);
    let warmup_secs = started.elapsed().as_secs_f64();
    let warmup_handshakes = controller.scrape().sum(HANDSHAKES, &[]);
    eprintln!(
        "[bench] warm-up done in {warmup_secs:.0} s ({warmup_handshakes} handshakes); steady state for {steady_secs} s"
    );

    let a = Mark::take(&controller, fleet, &http);
    let peak_steady = observe(&controller, steady_secs, "steady state");
    let b = Mark::take(&controller, fleet, &http);
    let steady = Window::between(&a, &b, checks, hosts, peak_steady);
    eprintln!(
        "[bench] steady: lag p50 {} p99 {}, {:.0}/{:.0} rounds, {:.1} status writes/min",
        fmt_lag(steady.lag_p50),
        fmt_lag(steady.lag_p99),
        steady.rounds,
        steady.rounds_due,
        steady.writes_per_min()
    );

    let flapping: Vec<String> = (0..hosts)
        .step_by(FLAP_EVERY)
        .map(|i| fleet.addrs[i].clone())
        .collect();
    let flapping_hosts = flapping.len();
    let stop = Arc::new(AtomicBool::new(false));
    let toggles = Arc::new(AtomicUsize::new(0));
    eprintln!(
        "[bench] flapping {flapping_hosts} hosts every {} s for {flap_secs} s",
        flap_period.as_secs()
    );
    let flap_thread = flapper(
        flap_dir.to_path_buf(),
        flapping,
        flap_period,
        stop.clone(),
        toggles.clone(),
    );
    let c = Mark::take(&controller, fleet, &http);
    let peak_flap = observe(&controller, flap_secs, "flapping");
    let d = Mark::take(&controller, fleet, &http);
    stop.store(true, Ordering::Relaxed);
    let _ = flap_thread.join();
    let flap = Window::between(&c, &d, checks, hosts, peak_flap);
    eprintln!(
        "[bench] flapping: {} toggles, peak {:.0} Unhealthy targets, {:.1} status writes/min, lag p99 {}",
        toggles.load(Ordering::Relaxed),
        flap.peak_unhealthy,
        flap.writes_per_min(),
        fmt_lag(flap.lag_p99)
    );
    let peak_rss_kib = vm_hwm_kib(controller.pid());
    drop(controller);
    OutriderRun {
        hosts,
        checks,
        warmup_secs,
        warmup_handshakes,
        warmup_note,
        steady,
        flap,
        flapping_hosts,
        peak_rss_kib,
    }
}

// ---------------------------------------------------------------------------------------------
// check_by_ssh

/// The remote command of each check, Nagios style: the monitoring-plugins where they exist
/// (check_disk, check_load, check_procs by name), a shell line for memory (no plugin in
/// Debian's monitoring-plugins), the pid file test outrider's script does, and the same flag
/// file test as the `flag` exec check.
fn peer_command(check: &str, addr: &str, flap_dir: &Path, process: &ProcessCheck) -> String {
    match check {
        "disk" => format!("{PLUGINS}/check_disk -w 1% -c 1% -p /"),
        "mem" => "awk '/^MemTotal:/{t=$2} /^MemAvailable:/{a=$2} END{u=100*(t-a)/t; \
                  printf \"MEM OK - %.1f%% used\\n\", u; exit (u>100)?2:0}' /proc/meminfo"
            .into(),
        "load" => format!("{PLUGINS}/check_load -r -w 1000,1000,1000 -c 1000,1000,1000"),
        "sshd" => match process {
            ProcessCheck::Name => format!("{PLUGINS}/check_procs -C sshd -c 1:"),
            ProcessCheck::Pidfile(f) => format!(
                "if read -r p < {} && test -d /proc/$p; then echo \"PROCS OK - sshd $p\"; \
                 else echo 'PROCS CRITICAL - sshd'; exit 2; fi",
                f.display()
            ),
        },
        _ => format!(
            "if test -e {}/flap-{addr}; then echo 'FLAG CRITICAL'; exit 2; fi; echo 'FLAG OK'",
            flap_dir.display()
        ),
    }
}

fn check_by_ssh(fleet: &Fleet, addr: &str, command: &str) -> Command {
    let mut cmd = Command::new(CHECK_BY_SSH);
    cmd.args([
        "-H",
        addr,
        "-p",
        &fleet.port().to_string(),
        "-l",
        BENCH_USER,
    ])
    .args(["-F", "/dev/null", "-t", "10"])
    .args(fleet.ssh_options(CONNECT_TIMEOUT_SECS))
    .args(["-C", command])
    .env_remove("SSH_AUTH_SOCK")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd
}

struct PeerStep {
    hosts: usize,
    rounds: usize,
    on_time: usize,
    slowest: f64,
    failures: usize,
    first_failure: String,
    client_cpu: f64,
    sshd_cpu: f64,
}

impl PeerStep {
    fn sustained(&self) -> bool {
        self.on_time == self.rounds && self.failures == 0
    }
    fn per_host_round(&self, cpu: f64) -> f64 {
        cpu / (self.hosts * self.rounds) as f64
    }
}

fn peer_round(
    fleet: &Fleet,
    hosts: usize,
    workers: usize,
    flap_dir: &Path,
    process: &ProcessCheck,
) -> (Duration, usize, String) {
    let tasks: Vec<(String, String)> = (0..hosts)
        .flat_map(|h| {
            let addr = fleet.addrs[h].clone();
            CHECKS
                .iter()
                .map(move |c| (addr.clone(), peer_command(c, &addr, flap_dir, process)))
        })
        .collect();
    let next = AtomicUsize::new(0);
    let failures = AtomicUsize::new(0);
    let first_failure = Mutex::new(String::new());
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..workers.min(tasks.len()) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((addr, command)) = tasks.get(i) else {
                        break;
                    };
                    let out = check_by_ssh(fleet, addr, command).output();
                    let ok = out.as_ref().is_ok_and(|o| o.status.success());
                    if !ok {
                        failures.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut f) = first_failure.lock()
                            && f.is_empty()
                        {
                            *f = match &out {
                                Ok(o) => format!(
                                    "{addr}: {} {}{}",
                                    o.status,
                                    String::from_utf8_lossy(&o.stdout).trim(),
                                    String::from_utf8_lossy(&o.stderr).trim()
                                ),
                                Err(e) => format!("{addr}: {e}"),
                            };
                        }
                    }
                }
            });
        }
    });
    let f = first_failure.into_inner().unwrap_or_default();
    (started.elapsed(), failures.into_inner(), f)
}

fn run_peer(
    fleet: &Fleet,
    max_hosts: usize,
    workers: usize,
    rounds: usize,
    flap_dir: &Path,
    process: &ProcessCheck,
) -> Vec<PeerStep> {
    let mut series: Vec<usize> = PEER_SERIES
        .iter()
        .copied()
        .filter(|n| *n < max_hosts)
        .collect();
    series.push(max_hosts);
    let started = Instant::now();
    let mut steps = Vec::new();
    for n in series {
        if started.elapsed() > PEER_LIMIT {
            eprintln!("[bench] check_by_ssh: peer phase time limit reached before N = {n}");
            break;
        }
        let sshd_before = fleet.drained_cpu_seconds();
        let client_before = reaped_children_cpu();
        let mut on_time = 0;
        let mut slowest: f64 = 0.0;
        let mut failures = 0;
        let mut first_failure = String::new();
        for r in 0..rounds {
            let slot = Instant::now();
            let (took, failed, first) = peer_round(fleet, n, workers, flap_dir, process);
            slowest = slowest.max(took.as_secs_f64());
            if took <= INTERVAL {
                on_time += 1;
            }
            failures += failed;
            if first_failure.is_empty() {
                first_failure = first;
            }
            eprintln!(
                "[bench] check_by_ssh N = {n} round {}: {:.1} s{}{}",
                r + 1,
                took.as_secs_f64(),
                if took <= INTERVAL { "" } else { " (overran)" },
                if failed > 0 {
                    format!(", {failed} checks failed")
                } else {
                    String::new()
                }
            );
            // the next round starts on its slot (at once when this one overran)
            if r + 1 < rounds {
                std::thread::sleep((slot + INTERVAL).saturating_duration_since(Instant::now()));
            }
        }
        let client_cpu = reaped_children_cpu() - client_before;
        let sshd_cpu = fleet.drained_cpu_seconds() - sshd_before;
        let step = PeerStep {
            hosts: n,
            rounds,
            on_time,
            slowest,
            failures,
            first_failure,
            client_cpu,
            sshd_cpu,
        };
        let sustained = step.sustained();
        steps.push(step);
        if !sustained {
            break;
        }
    }
    steps
}

// ---------------------------------------------------------------------------------------------
// Report

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() {
        format!("{:.1}×", a / b)
    } else {
        "—".into()
    }
}

#[allow(clippy::too_many_arguments)]
fn render(
    hosts: usize,
    cores: usize,
    load_before: &str,
    outrider: &Path,
    run: Option<&OutriderRun>,
    peer: &[PeerStep],
    peer_workers: usize,
    flap_period: Duration,
    process: &ProcessCheck,
) -> String {
    let mut r = String::new();
    let _ = writeln!(
        r,
        "\n## HealthCheck: {hosts} loopback hosts × {} checks + {} HTTP endpoints every {} s\n\n\
         {} · {cores} cores ({}) · load average {load_before} at the start, {} at the end · {} · {} · {}\n",
        CHECKS.len(),
        hosts.div_ceil(HOSTS_PER_CHECK) * ENDPOINTS_PER_CHECK,
        INTERVAL.as_secs(),
        command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        cpu_model(),
        load_average(),
        command_line(outrider.to_str().unwrap_or("outrider"), &["--version"]),
        command_line(CHECK_BY_SSH, &["-V"]),
        command_line("ssh", &["-V"]),
    );
    if let Some(o) = run {
        let s = &o.steady;
        let f = &o.flap;
        let heartbeat_per_min = o.checks as f64 * 60.0 / HEARTBEAT_SECS;
        let _ = writeln!(
            r,
            "### outrider controller: {} HealthChecks × {HOSTS_PER_CHECK} hosts, {ENDPOINTS_PER_CHECK} endpoints each\n\n\
             Warm-up (connections, Inventory probes, first rounds until every target is Healthy, + 2 intervals): \
             {:.0} s, {:.0} HealthCheck SSH handshakes for {} hosts{}\n",
            o.checks,
            o.warmup_secs,
            o.warmup_handshakes,
            o.hosts,
            if o.warmup_note.is_empty() {
                String::new()
            } else {
                format!(" — **{}**", o.warmup_note)
            }
        );
        r.push_str("| phase | s | rounds run / due | late > 1 s | lag p50 | lag p99 | slowest lag bucket | SSH handshakes | controller CPU s/host-round | sshd CPU s/host-round | HTTP probes answered | status writes/min | peak Unhealthy targets |\n");
        r.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for (name, w) in [
            ("steady".to_string(), s),
            (
                format!(
                    "{} hosts ({}%) flapping every {} s",
                    o.flapping_hosts,
                    100 / FLAP_EVERY,
                    flap_period.as_secs()
                ),
                f,
            ),
        ] {
            let _ = writeln!(
                r,
                "| {name} | {:.0} | {:.0} / {:.0} | {:.0} | {} | {} | {} | {:.0} | {:.5} | {:.5} | {} | {:.1} | {:.0} |",
                w.secs,
                w.rounds,
                w.rounds_due,
                w.late_over_1s,
                fmt_lag(w.lag_p50),
                fmt_lag(w.lag_p99),
                w.lag_max_bucket,
                w.handshakes,
                w.controller_cpu / w.host_rounds.max(1.0),
                w.sshd_cpu / w.host_rounds.max(1.0),
                w.http_requests,
                w.writes_per_min(),
                w.peak_unhealthy,
            );
        }
        let _ = writeln!(
            r,
            "\nController peak RSS (VmHWM): **{:.1} MiB**. Controller CPU: {:.1} s over {:.0} s of steady state \
             ({:.0}% of one core; it includes the {} endpoint probes). sshd CPU: {:.1} s ({:.0}% of one core). \
             Status writes in steady state: {:.0} in {:.0} s = {:.1}/min; the heartbeat alone \
             (one write per HealthCheck every {HEARTBEAT_SECS:.0} s) averages {heartbeat_per_min:.1}/min.\n",
            o.peak_rss_kib as f64 / 1024.0,
            s.controller_cpu,
            s.secs,
            100.0 * s.controller_cpu / s.secs,
            o.checks * ENDPOINTS_PER_CHECK,
            s.sshd_cpu,
            100.0 * s.sshd_cpu / s.secs,
            s.writes,
            s.secs,
            s.writes_per_min(),
        );
    }
    if !peer.is_empty() {
        let _ = writeln!(
            r,
            "### check_by_ssh: one SSH connection per check, {peer_workers} workers, rounds every {} s\n",
            INTERVAL.as_secs()
        );
        r.push_str("| hosts N | checks/round | rounds on time | slowest round s | failed checks | client CPU s/host-round | sshd CPU s/host-round | total CPU s/host-round |\n");
        r.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for p in peer {
            let _ = writeln!(
                r,
                "| {} | {} | {}/{} | {:.1} | {} | {:.4} | {:.4} | {:.4} |",
                p.hosts,
                p.hosts * CHECKS.len(),
                p.on_time,
                p.rounds,
                p.slowest,
                p.failures,
                p.per_host_round(p.client_cpu),
                p.per_host_round(p.sshd_cpu),
                p.per_host_round(p.client_cpu + p.sshd_cpu),
            );
        }
        if let Some(f) = peer.iter().find(|p| !p.first_failure.is_empty()) {
            let _ = writeln!(r, "\nFirst failed check: `{}`", f.first_failure);
        }
        r.push('\n');
    }

    // summary
    let best_peer = peer.iter().rfind(|p| p.sustained());
    let peer_hosts = best_peer.map_or(0, |p| p.hosts);
    let peer_cpu = best_peer.map(|p| p.per_host_round(p.client_cpu + p.sshd_cpu));
    r.push_str("### Summary (targets from the issue, printed, not asserted)\n\n");
    r.push_str("| figure | outrider | check_by_ssh | ratio | target |\n|---|---:|---:|---:|---|\n");
    if let Some(o) = run {
        let s = &o.steady;
        let on_schedule = s.lag_p99.is_some_and(|p| p < 1.0) && s.rounds >= 0.98 * s.rounds_due;
        let outrider_hosts = if on_schedule { o.hosts } else { 0 };
        let o_cpu = (s.controller_cpu + s.sshd_cpu) / s.host_rounds.max(1.0);
        let _ = writeln!(
            r,
            "| hosts kept on a {} s schedule | {} | {} | {} | ≥ 10× check_by_ssh, every round on schedule at 1,000 hosts |",
            INTERVAL.as_secs(),
            if on_schedule {
                format!("≥ {} (all there were)", o.hosts)
            } else {
                format!("not at {} (lag p99 {})", o.hosts, fmt_lag(s.lag_p99))
            },
            if peer.is_empty() {
                "not run".into()
            } else {
                peer_hosts.to_string()
            },
            if peer_hosts > 0 && outrider_hosts > 0 {
                format!("≥ {}", ratio(outrider_hosts as f64, peer_hosts as f64))
            } else {
                "—".into()
            },
        );
        let _ = writeln!(
            r,
            "| schedule lag p50 / p99 | {} / {} | — | — | p99 < 1 s |",
            fmt_lag(s.lag_p50),
            fmt_lag(s.lag_p99)
        );
        let _ = writeln!(
            r,
            "| CPU s per host-round (client + sshd) | {o_cpu:.4} ({:.4} + {:.4}) | {} | {} | — |",
            s.controller_cpu / s.host_rounds.max(1.0),
            s.sshd_cpu / s.host_rounds.max(1.0),
            best_peer.map_or("—".into(), |p| format!(
                "{:.4} ({:.4} + {:.4})",
                p.per_host_round(p.client_cpu + p.sshd_cpu),
                p.per_host_round(p.client_cpu),
                p.per_host_round(p.sshd_cpu)
            )),
            peer_cpu.map_or("—".into(), |c| format!("{} less", ratio(c, o_cpu))),
        );
        let _ = writeln!(
            r,
            "| controller peak RSS | {:.1} MiB | — | — | ≤ 256 MiB |",
            o.peak_rss_kib as f64 / 1024.0
        );
        let _ = writeln!(
            r,
            "| status writes/min, steady | {:.1} (heartbeat ≈ {:.1}) | — | — | 0 beyond the heartbeat |",
            s.writes_per_min(),
            o.checks as f64 * 60.0 / HEARTBEAT_SECS
        );
        let _ = writeln!(
            r,
            "| status writes/min, 5% flapping | {:.1} | — | — | — |",
            o.flap.writes_per_min()
        );
    } else {
        let _ = writeln!(
            r,
            "| hosts kept on a {} s schedule | not run | {peer_hosts} | — | — |",
            INTERVAL.as_secs()
        );
    }
    let _ = writeln!(
        r,
        "\nOne OpenSSH sshd plays every host (each 127.0.x.y a host), so all hosts share this \
         machine's /proc, which holds every host's sessions. The `sshd` check found its process {}{}. \
         Host-rounds: rounds run × hosts per HealthCheck. outrider's lag is when each round started \
         against its slot (`outrider_health_schedule_lag_seconds`, interpolated within buckets \
         0.01…30 s: all rounds within the first bucket read as 5 ms / 10 ms); a round that overruns \
         its interval skips slots, which `rounds run / due` shows. check_by_ssh: a round is on time \
         when all its N × {} checks finished within {} s; its client CPU is the check_by_ssh and \
         ssh processes this bench reaped, its sshd CPU the listener's reaped connections.",
        process.label(),
        match process {
            ProcessCheck::Name => format!(
                " (a scan of the /proc of all {hosts} hosts' sessions, which a real host would not \
                 pay; HC_BENCH_PROCESS_CHECK=pidfile measures without it)"
            ),
            ProcessCheck::Pidfile(_) =>
                " (the test sshd's pid file, on both sides: a scan by name \
                 would read the /proc entries of all hosts' sessions, ~2,100 at 1,000 hosts, \
                 ~40 ms per host and round that a real host with a few hundred processes would not \
                 pay; HC_BENCH_PROCESS_CHECK=name runs it anyway)"
                    .to_string(),
        },
        CHECKS.len(),
        INTERVAL.as_secs()
    );
    r
}

fn main() {
    let hosts = env_usize("HC_BENCH_HOSTS", 1000).max(1);
    let steady_secs = env_usize("HC_BENCH_SECS", 300) as u64;
    let flap_secs = env_usize("HC_BENCH_FLAP_SECS", 120) as u64;
    let flap_period = Duration::from_secs(env_usize("HC_BENCH_FLAP_PERIOD", 40).max(1) as u64);
    let peer_workers = env_usize("HC_BENCH_PEER_WORKERS", 16).max(1);
    let peer_rounds = env_usize("HC_BENCH_PEER_ROUNDS", 3).max(1);
    let phases = std::env::var("HC_BENCH_PHASES").unwrap_or_else(|_| "outrider,peer".into());
    let run_outrider_phase = phases.contains("outrider");
    let run_peer_phase = phases.contains("peer");
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let outrider = PathBuf::from(env!("CARGO_BIN_EXE_outrider"));
    require_bench_user();
    if run_peer_phase {
        assert!(
            Path::new(CHECK_BY_SSH).exists(),
            "{CHECK_BY_SSH} not found: run e2e/bench/deps.sh as root (monitoring-plugins-basic)"
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load_before = load_average();
    let fleet = Fleet::start(hosts);
    // the flag files: a directory the unprivileged bench user can look into
    let flap_dir = tempfile::Builder::new()
        .prefix("outrider-hcbench-")
        .tempdir()
        .expect("create the flag dir");
    fs::set_permissions(flap_dir.path(), fs::Permissions::from_mode(0o755))
        .expect("chmod the flag dir");
    let process = match std::env::var("HC_BENCH_PROCESS_CHECK").as_deref() {
        Ok("name") => ProcessCheck::Name,
        Ok("pidfile") | Err(_) => ProcessCheck::Pidfile(fleet.server.dir.path().join("sshd.pid")),
        Ok(other) => panic!("HC_BENCH_PROCESS_CHECK must be name or pidfile, not {other:?}"),
    };
    if let ProcessCheck::Pidfile(f) = &process {
        let pid = fs::read_to_string(f).unwrap_or_default();
        assert_eq!(
            pid.trim(),
            fleet.server.pid().to_string(),
            "the test sshd's pid file {} names it",
            f.display()
        );
    }
    eprintln!(
        "[bench] {hosts} hosts, {cores} cores, sshd port {}; steady {steady_secs} s, flapping {flap_secs} s; \
         process check {}; phases {phases}",
        fleet.port(),
        process.label()
    );

    // the peer first, on a quiet machine: after the outrider run the API server and the
    // controller manager are still busy deleting its namespace
    let peer = if run_peer_phase {
        run_peer(
            &fleet,
            hosts,
            peer_workers,
            peer_rounds,
            flap_dir.path(),
            &process,
        )
    } else {
        Vec::new()
    };
    let run = run_outrider_phase.then(|| {
        run_outrider(
            &repo,
            &outrider,
            &fleet,
            hosts,
            steady_secs,
            flap_secs,
            flap_period,
            flap_dir.path(),
            &process,
        )
    });

    let report = render(
        hosts,
        cores,
        &load_before,
        &outrider,
        run.as_ref(),
        &peer,
        peer_workers,
        flap_period,
        &process,
    );
    println!("{report}");
    write_report(&repo, "health_checks.md", &report);
}
