//! Node agent throughput benchmark (`make bench-agent`): `BENCH_AGENT_BYTES` (1 GiB) of
//! 200-byte lines across 10 files, shipped by `outrider agent` pinned to ONE core (`taskset -c
//! 0`), three ways, each from a cold start with no checkpoints:
//!
//! 1. outrider file → generic HTTP sink (NDJSON) into a local receiver that only counts lines;
//! 2. outrider file → Loki push (JSON) into a real VictoriaLogs, verified by counting the rows
//!    stored afterwards;
//! 3. the peer: rsyslog (`imfile` → `omfwd` over TCP, its defaults otherwise), into a local TCP
//!    receiver that only counts lines.
//!
//! Everything else — the receivers, VictoriaLogs, this process — runs on the other core, so
//! the shipper's core is its own. Reported per run: wall time from start until the last line
//! arrived, MB/s of file bytes (10^6), lines/s, the shipper's CPU seconds (utime+stime from
//! /proc), its peak RSS (VmHWM), and outrider's speed as a ratio of rsyslog's.
//!
//! The pipeline keeps the default batch limits (1000 records, 1Mi) but sets `maxWait: 100ms`:
//! with the default 1 s the last, partial batch alone would add up to a second to the wall
//! time (rsyslog forwards as it reads).
//!
//! Environment: `BENCH_AGENT_BYTES` (1073741824), `BENCH_AGENT_RUNS` (`http,loki,rsyslog`).
//! Needs `rsyslogd` (`e2e/bench/deps.sh`), `taskset` and the VictoriaLogs binary (`make tools`).
//! The report goes to stdout and `target/bench/agent_throughput.md`.

#[path = "support/mod.rs"]
mod support;

#[path = "../tests/support/victorialogs.rs"]
mod victorialogs;

#[path = "../tests/support/agent.rs"]
mod agent_support;

use std::fmt::Write as _;
use std::fs;
use std::io::{BufWriter, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::{cpu_model, cpu_seconds, load_average, vm_hwm_kib};

const FILES: usize = 10;
/// Bytes per line, the newline included.
const LINE: usize = 200;
/// Longest a run may take before the bench gives up on it.
const RUN_LIMIT: Duration = Duration::from_secs(15 * 60);
/// The shipper's core; everything else runs on [`OTHER_CORE`].
const SHIPPER_CORE: &str = "0";
const OTHER_CORE: &str = "1";

struct Outcome {
    label: String,
    lines: u64,
    wall: f64,
    cpu: f64,
    rss_kib: u64,
    /// The shipper core's time during the run: (idle + iowait, steal) as fractions. Steal is
    /// time the hypervisor gave the core to someone else: neither tool can use it.
    core: (f64, f64),
    note: String,
}

/// Jiffies of the shipper core: (total, idle + iowait, steal), from /proc/stat.
fn core_times() -> (u64, u64, u64) {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat
        .lines()
        .find(|l| l.starts_with(&format!("cpu{SHIPPER_CORE} ")))
        .unwrap_or_default();
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    (v.iter().take(8).sum(), get(3) + get(4), get(7))
}

/// Fractions of the shipper core's time since `before` that were idle and stolen.
fn core_since(before: (u64, u64, u64)) -> (f64, f64) {
    let now = core_times();
    let total = (now.0 - before.0).max(1) as f64;
    (
        (now.1 - before.1) as f64 / total,
        (now.2 - before.2) as f64 / total,
    )
}

fn main() {
    let total: u64 = env_u64("BENCH_AGENT_BYTES", 1 << 30);
    let runs = std::env::var("BENCH_AGENT_RUNS").unwrap_or_else(|_| "http,loki,rsyslog".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        cores >= 2,
        "bench-agent needs two cores: one for the shipper, one for the receivers"
    );
    require("taskset", "apt-get install util-linux");
    // Pin this process (and every thread and child it starts from now on) to the other core.
    let pinned = Command::new("taskset")
        .args(["-pc", OTHER_CORE, &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(pinned, "taskset -pc {OTHER_CORE} <bench pid> failed");

    let work = tempfile::Builder::new()
        .prefix("outrider-bench-agent-")
        .tempdir()
        .expect("create the bench dir");
    let logs = work.path().join("logs");
    let started = Instant::now();
    let lines = generate(&logs, total);
    let bytes = lines * LINE as u64;
    eprintln!(
        "[bench-agent] {lines} lines ({:.1} MiB) in {FILES} files written in {:.1} s",
        bytes as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");

    let mut outcomes = Vec::new();
    for run in runs.split(',').map(str::trim) {
        let outcome = match run {
            "http" => outrider_http(&rt, work.path(), &logs, lines),
            "loki" => outrider_loki(&rt, work.path(), &logs, lines),
            "rsyslog" => rsyslog(work.path(), &logs, lines),
            other => panic!("unknown run {other:?} in BENCH_AGENT_RUNS (http, loki, rsyslog)"),
        };
        eprintln!(
            "[bench-agent] {}: {}/{lines} lines in {:.1} s, {:.2} CPU-s, {:.1} MiB",
            outcome.label,
            outcome.lines,
            outcome.wall,
            outcome.cpu,
            outcome.rss_kib as f64 / 1024.0
        );
        outcomes.push(outcome);
    }
    let report = report(&outcomes, lines, bytes);
    println!("{report}");
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    fs::create_dir_all(&out).expect("create target/bench");
    fs::write(out.join("agent_throughput.md"), &report).expect("write the report");
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
        })
        .unwrap_or(default)
}

fn require(program: &str, hint: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{program} is missing: {hint} (or run e2e/bench/deps.sh)"
    );
}

/// Writes `FILES` files of numbered 200-byte lines that look like application logs; returns
/// the number of lines.
fn generate(dir: &Path, total: u64) -> u64 {
    fs::create_dir_all(dir).expect("create the log dir");
    let per_file = total / (FILES * LINE) as u64;
    let levels = ["INFO ", "WARN ", "DEBUG", "ERROR"];
    for f in 0..FILES {
        let file = fs::File::create(dir.join(format!("app-{f}.log"))).expect("create a log file");
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let mut line = String::with_capacity(LINE);
        for i in 0..per_file {
            line.clear();
            let seq = f as u64 * per_file + i;
            let _ = write!(
                line,
                "2026-11-28T12:{:02}:{:02}.{:03}Z {} service=checkout node=node-7 seq={seq:012} \
                 request_id={:016x} user={} path=/api/v1/cart/items status=200 msg=",
                (i / 60_000) % 60,
                (i / 1000) % 60,
                i % 1000,
                levels[(i % 4) as usize],
                seq.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                seq % 9973,
            );
            while line.len() < LINE - 1 {
                line.push_str("item added ");
            }
            line.truncate(LINE - 1);
            line.push('\n');
            w.write_all(line.as_bytes()).expect("write a log line");
        }
        w.flush().expect("flush a log file");
    }
    per_file * FILES as u64
}

/// A ClusterLogPipeline reading every file of `logs` into `output`.
fn pipeline(dir: &Path, logs: &Path, output: &str) -> PathBuf {
    let path = dir.join("lp.yaml");
    let yaml = format!(
        "apiVersion: outrider.dev/v1alpha1\nkind: ClusterLogPipeline\nmetadata: {{name: bench}}\n\
         spec:\n  inputs: [{{name: app, paths: [\"{}/*.log\"]}}]\n  fields: {{service: checkout, env: bench}}\n  outputs: [{output}]\n  \
         delivery: {{batch: {{maxWait: 100ms}}}}\n",
        logs.display()
    );
    fs::write(&path, yaml).expect("write the pipeline");
    path
}

/// `outrider agent --pipeline <lp>` on the shipper core, with a fresh state dir.
fn start_agent(dir: &Path, lp: &Path) -> (Child, u16) {
    let state = dir.join("agent-state");
    let _ = fs::remove_dir_all(&state);
    let port = free_port();
    let child = Command::new("taskset")
        .args(["-c", SHIPPER_CORE])
        .arg(env!("CARGO_BIN_EXE_outrider"))
        .args(["agent", "--pipeline"])
        .arg(lp)
        .arg("--state-dir")
        .arg(&state)
        .args(["--node-name", "bench-node"])
        .arg("--allowed-root")
        .arg(dir)
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("agent.log")).expect("create agent.log"))
        .spawn()
        .expect("spawn outrider agent");
    (child, port)
}

/// Waits until `count()` reaches `lines` (or the run limit); returns (lines seen, wall s).
fn wait_lines(
    started: Instant,
    lines: u64,
    child: &mut Child,
    count: impl Fn() -> u64,
) -> (u64, f64) {
    loop {
        let n = count();
        if n >= lines {
            return (n, started.elapsed().as_secs_f64());
        }
        if started.elapsed() > RUN_LIMIT || child.try_wait().ok().flatten().is_some() {
            return (n, started.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A shipper started at `started` (core times `before`): waits until `count()` reaches
/// `lines`, reads its CPU, peak RSS and the core's idle/steal, then stops it.
fn measure(
    label: &str,
    mut child: Child,
    (before, started): ((u64, u64, u64), Instant),
    lines: u64,
    count: impl Fn() -> u64,
) -> Outcome {
    let (seen, wall) = wait_lines(started, lines, &mut child, count);
    let outcome = Outcome {
        label: label.into(),
        lines: seen,
        wall,
        cpu: cpu_seconds(child.id()),
        rss_kib: vm_hwm_kib(child.id()),
        core: core_since(before),
        note: String::new(),
    };
    stop(child);
    outcome
}

fn outrider_http(rt: &tokio::runtime::Runtime, dir: &Path, logs: &Path, lines: u64) -> Outcome {
    let count = Arc::new(AtomicU64::new(0));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind the counting receiver");
    let port = listener.local_addr().expect("receiver address").port();
    let app = axum::Router::new()
        .route("/ingest", axum::routing::post(count_ndjson))
        .with_state(count.clone());
    rt.spawn(async move { axum::serve(listener, app).await });
    let lp = pipeline(
        dir,
        logs,
        &format!("{{name: recv, http: {{url: \"http://127.0.0.1:{port}/ingest\"}}}}"),
    );
    let run = (core_times(), Instant::now());
    let (child, _) = start_agent(dir, &lp);
    measure(
        "outrider file → HTTP (counting receiver)",
        child,
        run,
        lines,
        || count.load(Ordering::Relaxed),
    )
}

async fn count_ndjson(
    axum::extract::State(count): axum::extract::State<Arc<AtomicU64>>,
    body: axum::body::Bytes,
) -> axum::http::StatusCode {
    count.fetch_add(
        memchr::memchr_iter(b'\n', &body).count() as u64,
        Ordering::Relaxed,
    );
    axum::http::StatusCode::OK
}

fn outrider_loki(rt: &tokio::runtime::Runtime, dir: &Path, logs: &Path, lines: u64) -> Outcome {
    let store = victorialogs::VictoriaLogs::start();
    let lp = pipeline(
        dir,
        logs,
        &format!(
            "{{name: loki, loki: {{url: \"{}/insert?_msg_field=message&_time_field=timestamp\", labels: {{service: \"{{{{service}}}}\", node: \"{{{{node}}}}\"}}}}}}",
            store.base_url()
        ),
    );
    let run = (core_times(), Instant::now());
    let (child, port) = start_agent(dir, &lp);
    let shipped = || {
        agent_support::http_get(port, "/metrics")
            .map(|(_, text)| {
                agent_support::metric_sum(&text, "outrider_agent_records_shipped_total", &[]) as u64
            })
            .unwrap_or(0)
    };
    let outcome = measure(
        "outrider file → Loki JSON → VictoriaLogs",
        child,
        run,
        lines,
        shipped,
    );
    let stored = rt.block_on(async {
        store.flush().await;
        store.count("*").await
    });
    Outcome {
        note: format!("{stored} rows stored"),
        ..outcome
    }
}

fn rsyslog(dir: &Path, logs: &Path, lines: u64) -> Outcome {
    require("rsyslogd", "apt-get install rsyslog");
    let count = Arc::new(AtomicU64::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the TCP receiver");
    let port = listener.local_addr().expect("receiver address").port();
    let c = count.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let c = c.clone();
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    c.fetch_add(
                        memchr::memchr_iter(b'\n', &buf[..n]).count() as u64,
                        Ordering::Relaxed,
                    );
                }
            });
        }
    });
    let state = dir.join("rsyslog-state");
    let _ = fs::remove_dir_all(&state);
    fs::create_dir_all(&state).expect("create the rsyslog work dir");
    let conf = dir.join("rsyslog.conf");
    fs::write(
        &conf,
        format!(
            "global(workDirectory=\"{state}\")\n\
             module(load=\"imfile\" mode=\"inotify\")\n\
             ruleset(name=\"ship\") {{\n  action(type=\"omfwd\" target=\"127.0.0.1\" port=\"{port}\" protocol=\"tcp\" template=\"RSYSLOG_ForwardFormat\")\n}}\n\
             input(type=\"imfile\" file=\"{logs}/*.log\" tag=\"app\" ruleset=\"ship\")\n",
            state = state.display(),
            logs = logs.display(),
        ),
    )
    .expect("write rsyslog.conf");
    let version = support::command_line("rsyslogd", &["-v"]);
    let run = (core_times(), Instant::now());
    let child = Command::new("taskset")
        .args(["-c", SHIPPER_CORE, "rsyslogd", "-n", "-f"])
        .arg(&conf)
        .arg("-i")
        .arg(dir.join("rsyslogd.pid"))
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("rsyslog.log")).expect("create rsyslog.log"))
        .spawn()
        .expect("spawn rsyslogd");
    let outcome = measure(
        "rsyslog imfile → omfwd TCP (counting receiver)",
        child,
        run,
        lines,
        || count.load(Ordering::Relaxed),
    );
    Outcome {
        note: version,
        ..outcome
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn report(outcomes: &[Outcome], lines: u64, bytes: u64) -> String {
    let mut r = String::new();
    let _ = writeln!(
        r,
        "# bench-agent: {:.0} MiB of {LINE}-byte lines in {FILES} files, shipper on one core\n",
        bytes as f64 / (1 << 20) as f64
    );
    let _ = writeln!(
        r,
        "{} · 2 cores · load before: {} · {lines} lines\n",
        cpu_model(),
        load_average()
    );
    let _ = writeln!(
        r,
        "| run | lines | wall s | MB/s | lines/s | CPU s | MB per CPU-s | peak RSS MiB | core idle / stolen | note |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for o in outcomes {
        let complete = if o.lines >= lines {
            ""
        } else {
            " (INCOMPLETE)"
        };
        let _ = writeln!(
            r,
            "| {}{complete} | {} | {:.1} | {:.1} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0}% / {:.0}% | {} |",
            o.label,
            o.lines,
            o.wall,
            bytes as f64 / o.wall / 1e6,
            o.lines as f64 / o.wall,
            o.cpu,
            bytes as f64 / o.cpu.max(1e-9) / 1e6,
            o.rss_kib as f64 / 1024.0,
            o.core.0 * 100.0,
            o.core.1 * 100.0,
            o.note
        );
    }
    let find = |p: &str| outcomes.iter().find(|o| o.label.starts_with(p));
    if let (Some(ours), Some(peer)) = (find("outrider file → HTTP"), find("rsyslog")) {
        let _ = writeln!(
            r,
            "\noutrider file → HTTP is {:.2}× rsyslog's speed ({:.2}× its CPU per line).",
            peer.wall / ours.wall,
            ours.cpu / peer.cpu.max(1e-9)
        );
    }
    r
}
