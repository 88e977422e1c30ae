//! Runs the real `outrider agent` binary for integration tests, and small helpers:
//! numbered-line writers, metrics scraping, polling with a deadline.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running agent process; killed when dropped.
pub struct Agent {
    child: Option<Child>,
    pub metrics_port: u16,
    args: Vec<String>,
    log: PathBuf,
    /// The test's directory: the agent's allowed root and file-output directory unless
    /// the test's own arguments set them.
    dir: PathBuf,
}

impl Agent {
    /// Starts `outrider agent <args> --metrics-addr 127.0.0.1:<free>` with fast timings.
    pub fn start(dir: &Path, args: &[&str]) -> Self {
        let a = Self::spawn(dir, args);
        a.wait_ready();
        a
    }

    /// Starts the agent without waiting for `/readyz` (it may have nothing to run yet).
    pub fn spawn(dir: &Path, args: &[&str]) -> Self {
        let mut a = Self {
            child: None,
            metrics_port: 0,
            args: args.iter().map(|s| s.to_string()).collect(),
            log: dir.join("agent.log"),
            dir: dir.to_path_buf(),
        };
        a.spawn_again();
        a
    }

    /// The process's peak resident memory (VmHWM), KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let pid = self.child.as_ref().expect("agent running").id();
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&self) {
        let port = self.metrics_port;
        wait_for("agent /readyz", Duration::from_secs(30), || {
            http_get(port, "/readyz").is_some_and(|(code, _)| code == 200)
        });
    }

    /// `/readyz`'s status code (None: no answer).
    pub fn readyz(&self) -> Option<u16> {
        http_get(self.metrics_port, "/readyz").map(|(code, _)| code)
    }

    /// Runs one LogPipeline manifest with its state in `<dir>/state`:
    /// `--pipeline <lp> --state-dir <dir>/state --node-name <node> <extra>`.
    pub fn run_pipeline(dir: &Path, lp: &Path, node: &str, extra: &[&str]) -> Self {
        let state = dir.join("state");
        let mut args = vec![
            "--pipeline",
            lp.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--node-name",
            node,
        ];
        args.extend_from_slice(extra);
        Self::start(dir, &args)
    }

    /// Starts the agent again with the same arguments (after a kill).
    pub fn restart(&mut self) {
        self.spawn_again();
        self.wait_ready();
    }

    fn spawn_again(&mut self) {
        assert!(self.child.is_none(), "agent still running");
        self.metrics_port = free_port();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_outrider"))
            .arg("agent")
            .args(&self.args)
            .args([
                "--metrics-addr",
                &format!("127.0.0.1:{}", self.metrics_port),
            ])
            .args(self.fast_defaults())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn outrider agent");
        self.child = Some(child);
    }

    /// Fast timings for tests, the test's directory as the allowed root and file-output
    /// directory, and `test` as the Secrets' namespace (`<secret-dir>/test/<name>`), each
    /// unless the test's own arguments set it.
    fn fast_defaults(&self) -> Vec<String> {
        let dir = self.dir.to_string_lossy();
        let defaults = [
            ("--scan-interval", "200ms"),
            ("--poll-interval", "50ms"),
            ("--reload-interval", "300ms"),
            ("--retry-initial", "50ms"),
            ("--retry-max", "500ms"),
            ("--allowed-root", &dir),
            ("--file-output-dir", &dir),
            ("--secret-namespace", "test"),
        ];
        defaults
            .iter()
            .filter(|(flag, _)| !self.args.iter().any(|a| a == flag))
            .flat_map(|(flag, v)| [flag.to_string(), v.to_string()])
            .collect()
    }

    /// SIGKILL: no flush, no checkpoint write.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = c.id().to_string();
            Command::new("kill").args(["-TERM", &pid]).status().unwrap();
            let status = c.wait().unwrap();
            assert!(
                status.success(),
                "agent exited with {status}; log: {}",
                self.log_text()
            );
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The `/metrics` text.
    pub fn metrics(&self) -> String {
        http_get(self.metrics_port, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// Sum of a metric's samples whose line contains every `filter` string.
    pub fn metric(&self, name: &str, filters: &[&str]) -> f64 {
        metric_sum(&self.metrics(), name, filters)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- agent log (last 40 lines) ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

pub fn metric_sum(text: &str, name: &str, filters: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| filters.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Minimal HTTP/1.0 GET on loopback (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let code = resp.split(' ').nth(1)?.parse().ok()?;
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

/// Polls `cond` until it holds, panicking with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// Appends lines `prefix-<n>` for n in `range` (zero-padded, newline-terminated).
pub fn append_numbered(path: &Path, prefix: &str, range: std::ops::Range<u64>) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let mut buf = String::new();
    for n in range {
        buf.push_str(&format!("{prefix}-{n:08}\n"));
    }
    f.write_all(buf.as_bytes()).unwrap();
}

/// Sequence numbers in messages `prefix-<n>`, with how often each arrived.
pub fn count_numbers(messages: &[String], prefix: &str) -> std::collections::BTreeMap<u64, usize> {
    let mut m = std::collections::BTreeMap::new();
    for msg in messages {
        if let Some(n) = msg
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|r| r.parse::<u64>().ok())
        {
            *m.entry(n).or_insert(0) += 1;
        }
    }
    m
}

/// Missing numbers of `0..n` and how many extra copies arrived.
pub fn missing_and_dups(
    counts: &std::collections::BTreeMap<u64, usize>,
    n: u64,
) -> (Vec<u64>, usize) {
    let missing = (0..n).filter(|i| !counts.contains_key(i)).collect();
    let dups = counts.values().map(|c| c - 1).sum();
    (missing, dups)
}

/// A ClusterLogPipeline manifest with one input and one output (YAML flow snippets).
pub fn pipeline_yaml(name: &str, input: &str, output: &str, extra: &str) -> String {
    format!(
        "apiVersion: outrider.dev/v1alpha1\nkind: ClusterLogPipeline\nmetadata: {{name: {name}}}\nspec:\n  inputs: [{input}]\n  outputs: [{output}]\n{extra}"
    )
}
