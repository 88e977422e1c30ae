//! SSH fan-out benchmark (`make bench-ssh`): `uptime` on a fleet of loopback hosts, outrider
//! side by side with parallel-ssh and ansible, in one run, against one real sshd.
//!
//! One OpenSSH sshd (tests/support/sshd.rs, `MaxStartups 1000:30:1000`) on 0.0.0.0:PORT answers
//! every address 127.0.(20 + i/250).(1 + i%250); every tool gets the same key, the same
//! known_hosts (host keys pinned, strict checking) and the same host list. Each client runs as a
//! subprocess of GNU time (`/usr/bin/time -f '%e %U %S %M'`), so all three are measured the same
//! way: wall time, user+sys CPU of the client and every descendant it waited for, and the peak RSS
//! of the largest single process of that tree. Because fan-out tools differ in how many processes
//! they run, the tree's summed PSS is also sampled (every 500 ms) and reported.
//!
//! The server-bound floor: sshd CPU per connection, measured first with 50 OpenSSH `ssh`
//! connections at parallelism 2, × hosts ÷ cores. sshd's CPU is read (`Sshd::cpu_seconds`) before
//! and after every run, once sshd has reaped every connection, and reported per host.
//!
//! Environment: `BENCH_HOSTS` (500), `BENCH_PARALLELISM` ("20,50,100"),
//! `BENCH_TOOLS` ("outrider,pssh,ansible"). A selected tool that is missing fails the bench.
//! Needs root (the test sshd runs as root); every tool logs in as the unprivileged test user
//! [`BENCH_USER`] (login shell `/bin/sh`, created by `e2e/deps.sh`). Not root: root's shell
//! on these machines is bash, which sources a `.bashrc` running `pyenv init` for every ssh
//! command (~0.15 s of server CPU each, growing under contention) and would swamp what is
//! measured. `e2e/deps.sh` and `e2e/bench/deps.sh` install the rest.
//! The report goes to stdout and to `target/bench/ssh_fanout.md`.

#[path = "support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::*;

const GNU_TIME: &str = "/usr/bin/time";
const PSSH: &str = "parallel-ssh";
const ANSIBLE: &str = "ansible";
const INSTALL_HINT: &str =
    "run e2e/bench/deps.sh as root (apt-get install -y pssh ansible-core time)";
/// Calibration of the server-bound floor: this many OpenSSH connections, this many at a time.
const CALIBRATION_CONNECTIONS: usize = 50;
const CALIBRATION_PARALLELISM: usize = 2;
/// Hosts of the smoke run that proves each tool works before the long runs start.
const SMOKE_HOSTS: usize = 2;
/// A run that takes longer than this is killed (its process group) and reported as such.
const RUN_GUARD: Duration = Duration::from_secs(30 * 60);
/// Pause between runs, after sshd has drained.
const SETTLE: Duration = Duration::from_secs(2);
const SAMPLE_EVERY: Duration = Duration::from_millis(500);
const PSSH_TIMEOUT_SECS: u32 = 60;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tool {
    Outrider,
    Pssh,
    Ansible,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Outrider => "outrider",
            Tool::Pssh => "parallel-ssh",
            Tool::Ansible => "ansible",
        }
    }

    /// How the tool spells its parallelism, for the report ("ansible -f 20").
    fn parallelism_flag(self) -> &'static str {
        match self {
            Tool::Outrider => "--concurrency",
            Tool::Pssh => "-p",
            Tool::Ansible => "-f",
        }
    }

    fn parse(name: &str) -> Tool {
        match name.trim() {
            "outrider" => Tool::Outrider,
            "pssh" | "parallel-ssh" => Tool::Pssh,
            "ansible" => Tool::Ansible,
            other => panic!("BENCH_TOOLS: unknown tool {other:?} (known: outrider, pssh, ansible)"),
        }
    }
}

struct Settings {
    hosts: usize,
    parallelism: Vec<usize>,
    tools: Vec<Tool>,
}

impl Settings {
    fn from_env() -> Settings {
        let hosts = env_or("BENCH_HOSTS", "500")
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=20_000).contains(n))
            .expect("BENCH_HOSTS must be a number of hosts between 1 and 20000");
        let parallelism: Vec<usize> = env_or("BENCH_PARALLELISM", "20,50,100")
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|p| *p > 0)
                    .unwrap_or_else(|| panic!("BENCH_PARALLELISM: bad parallelism {s:?}"))
            })
            .collect();
        assert!(
            !parallelism.is_empty(),
            "BENCH_PARALLELISM lists no parallelism"
        );
        let mut tools = Vec::new();
        for name in env_or("BENCH_TOOLS", "outrider,pssh,ansible")
            .split(',')
            .filter(|s| !s.trim().is_empty())
        {
            let tool = Tool::parse(name);
            if !tools.contains(&tool) {
                tools.push(tool);
            }
        }
        assert!(!tools.is_empty(), "BENCH_TOOLS lists no tool");
        Settings {
            hosts,
            parallelism,
            tools,
        }
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// One measured invocation of a tool.
#[derive(Clone)]
struct Run {
    tool: Tool,
    parallelism: usize,
    /// outrider's --handshakes (None: its default).
    handshakes: Option<usize>,
    hosts: usize,
}

impl Run {
    fn label(&self) -> String {
        match (self.tool, self.handshakes) {
            (Tool::Outrider, Some(h)) => format!("outrider (--handshakes {h})"),
            (Tool::Outrider, None) => "outrider (--handshakes default)".into(),
            (tool, _) => tool.name().into(),
        }
    }

    /// "ansible -f 20", "outrider --concurrency 50 --handshakes 50".
    fn invocation(&self) -> String {
        let mut s = format!(
            "{} {} {}",
            self.tool.name(),
            self.tool.parallelism_flag(),
            self.parallelism
        );
        if let Some(h) = self.handshakes {
            let _ = write!(s, " --handshakes {h}");
        }
        s
    }
}

struct Measurement {
    run: Run,
    succeeded: usize,
    wall: f64,
    client_cpu: f64,
    max_rss_kib: u64,
    tree_pss_peak_kib: u64,
    sshd_cpu: f64,
    /// GNU time's note on the exit ("Command exited with non-zero status 4"), or the guard's.
    exit_note: String,
    /// The run's inputs and outputs (in the temp work dir).
    dir: PathBuf,
}

impl Measurement {
    fn complete(&self) -> bool {
        self.succeeded == self.run.hosts
    }
}

/// Paths of the files a run writes.
struct RunFiles {
    dir: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
    time: PathBuf,
}

fn main() {
    let settings = Settings::from_env();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { root.join(p) })
        .unwrap_or_else(|| root.join("target"));
    // Built by the same `cargo bench` (release profile): never stale.
    let outrider_bin = PathBuf::from(env!("CARGO_BIN_EXE_outrider"));
    let load_before = load_average();

    // Every selected tool is there (and works) before anything is measured.
    preflight(&settings, &outrider_bin);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);

    eprintln!(
        "[bench] {} hosts, parallelism {:?}, tools {:?}, {cores} cores",
        settings.hosts,
        settings.parallelism,
        settings.tools.iter().map(|t| t.name()).collect::<Vec<_>>()
    );
    let fleet = Fleet::start(settings.hosts);
    eprintln!(
        "[bench] sshd pid {} on port {}; work dir {}",
        fleet.server.pid(),
        fleet.port(),
        fleet.work.path().display()
    );

    // Server-bound floor, measured at low contention before anything else runs.
    let calibration = calibrate(&fleet);
    let floor = calibration.sshd_cpu_per_connection * settings.hosts as f64 / cores as f64;
    eprintln!(
        "[bench] floor: sshd {:.4} s CPU/connection ({} connections at parallelism {}) × {} hosts ÷ {cores} cores = {floor:.1} s",
        calibration.sshd_cpu_per_connection,
        calibration.connections,
        CALIBRATION_PARALLELISM,
        settings.hosts
    );

    // Smoke run: each tool on a couple of hosts, unmeasured; a tool that can't log in fails the
    // bench now rather than after twenty minutes.
    let mut seq = 0usize;
    for &tool in &settings.tools {
        let run = Run {
            tool,
            parallelism: 2,
            handshakes: None,
            hosts: SMOKE_HOSTS.min(settings.hosts),
        };
        seq += 1;
        let m = measure(&fleet, &outrider_bin, &run, &format!("{seq:02}-smoke"));
        if !m.complete() {
            panic!(
                "smoke run of {} failed ({}/{} hosts succeeded; {})\n--- stdout ---\n{}\n--- stderr ---\n{}",
                run.invocation(),
                m.succeeded,
                run.hosts,
                m.exit_note,
                tail(&m.dir.join("stdout"), 20),
                tail(&m.dir.join("stderr"), 20)
            );
        }
    }

    // The runs: every tool at every parallelism (interleaved, so that a change of background
    // load does not land on one tool only), then outrider once with --handshakes = the largest
    // parallelism.
    let mut runs = Vec::new();
    for &p in &settings.parallelism {
        for &tool in &settings.tools {
            runs.push(Run {
                tool,
                parallelism: p,
                handshakes: None,
                hosts: settings.hosts,
            });
        }
    }
    if settings.tools.contains(&Tool::Outrider) {
        let p = *settings.parallelism.iter().max().expect("a parallelism");
        runs.push(Run {
            tool: Tool::Outrider,
            parallelism: p,
            handshakes: Some(p),
            hosts: settings.hosts,
        });
    }
    let mut results = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        seq += 1;
        eprintln!(
            "[bench] run {}/{}: {} on {} hosts",
            i + 1,
            runs.len(),
            run.invocation(),
            run.hosts
        );
        let m = measure(&fleet, &outrider_bin, run, &format!("{seq:02}"));
        eprintln!(
            "[bench]   {}/{} ok, {:.1} s wall ({:.2}x floor), {:.3} s client CPU/host, {:.1} MiB peak RSS, \
             {:.1} MiB tree PSS, {:.4} s sshd CPU/host{}",
            m.succeeded,
            run.hosts,
            m.wall,
            m.wall / floor,
            m.client_cpu / run.hosts as f64,
            m.max_rss_kib as f64 / 1024.0,
            m.tree_pss_peak_kib as f64 / 1024.0,
            m.sshd_cpu / run.hosts as f64,
            if m.exit_note.is_empty() {
                String::new()
            } else {
                format!(" [{}]", m.exit_note)
            }
        );
        results.push(m);
    }

    let report = render_report(
        &settings,
        cores,
        &calibration,
        floor,
        &results,
        &outrider_bin,
        (load_before, load_average()),
    );
    print!("{report}");
    let out_dir = target_dir.join("bench");
    fs::create_dir_all(&out_dir).expect("create target/bench");
    let out = out_dir.join("ssh_fanout.md");
    fs::write(&out, &report).unwrap_or_else(|e| panic!("write {}: {e}", out.display()));
    eprintln!("[bench] report written to {}", out.display());

    // Keep the output of every run in which a host failed (the work dir goes away).
    let kept = out_dir.join("ssh_fanout-failed-runs");
    let _ = fs::remove_dir_all(&kept);
    for m in results.iter().filter(|m| !m.complete()) {
        let name = m.dir.file_name().expect("a run dir name").to_string_lossy();
        fs::create_dir_all(&kept).expect("create the failed-runs dir");
        for file in ["stdout", "stderr", "time"] {
            let _ = fs::copy(m.dir.join(file), kept.join(format!("{name}.{file}")));
        }
    }
    if results.iter().any(|m| !m.complete()) {
        eprintln!(
            "[bench] the output of the runs in which hosts failed is in {}",
            kept.display()
        );
    }
    let dead: Vec<String> = results
        .iter()
        .filter(|m| m.succeeded == 0)
        .map(|m| m.run.invocation())
        .collect();
    if !dead.is_empty() {
        eprintln!("[bench] FAILED: no host succeeded in: {}", dead.join(", "));
        std::process::exit(1);
    }
}

/// Fails (with the install hint) when a selected tool or GNU time is missing, or when the outrider
/// binary lacks the `exec` subcommand.
fn preflight(settings: &Settings, outrider_bin: &Path) {
    let runs = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    let gnu_time = Command::new(GNU_TIME)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("GNU"));
    assert!(
        gnu_time,
        "{GNU_TIME} (GNU time, which measures every client) not found: {INSTALL_HINT}"
    );
    require_bench_user();
    for &tool in &settings.tools {
        match tool {
            Tool::Pssh => assert!(
                runs(PSSH, &["--version"]),
                "{PSSH} not found (Debian package pssh): {INSTALL_HINT}"
            ),
            Tool::Ansible => assert!(
                runs(ANSIBLE, &["--version"]),
                "{ANSIBLE} not found (Debian package ansible-core): {INSTALL_HINT}"
            ),
            Tool::Outrider => {
                assert!(
                    outrider_bin.exists(),
                    "{} not found: `cargo bench --bench ssh_fanout` builds it",
                    outrider_bin.display()
                );
                let bin = outrider_bin.to_str().expect("a UTF-8 path");
                assert!(
                    runs(bin, &["exec", "--help"]),
                    "`{bin} exec --help` failed: this outrider has no `exec` subcommand"
                );
            }
        }
    }
}

struct Calibration {
    connections: usize,
    sshd_cpu_per_connection: f64,
}

/// `uptime` over `CALIBRATION_CONNECTIONS` OpenSSH connections, `CALIBRATION_PARALLELISM` at a
/// time: sshd's CPU per connection at low contention.
fn calibrate(fleet: &Fleet) -> Calibration {
    let connections = CALIBRATION_CONNECTIONS.min(fleet.addrs.len());
    let before = fleet.drained_cpu_seconds();
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    std::thread::scope(|scope| {
        for _ in 0..CALIBRATION_PARALLELISM {
            let next = Arc::clone(&next);
            let failures = Arc::clone(&failures);
            scope.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= connections {
                        break;
                    }
                    let out = Command::new("ssh")
                        .args(fleet.ssh_options(CONNECT_TIMEOUT_SECS))
                        .arg("-p")
                        .arg(fleet.port().to_string())
                        .args(["-l", BENCH_USER, &fleet.addrs[i], "uptime"])
                        .stdin(Stdio::null())
                        .output();
                    let ok = matches!(&out, Ok(o) if o.status.success()
                        && String::from_utf8_lossy(&o.stdout).contains("load average"));
                    if !ok {
                        failures.fetch_add(1, Ordering::Relaxed);
                        if let Ok(o) = &out {
                            eprintln!(
                                "[bench] calibration ssh to {} failed: {}",
                                fleet.addrs[i],
                                String::from_utf8_lossy(&o.stderr).trim()
                            );
                        }
                    }
                }
            });
        }
    });
    let failed = failures.load(Ordering::Relaxed);
    assert!(
        failed == 0,
        "{failed} of {connections} calibration connections (OpenSSH ssh, parallelism \
         {CALIBRATION_PARALLELISM}) failed: the fleet is broken (is `ssh` installed? run e2e/deps.sh)"
    );
    let after = fleet.drained_cpu_seconds();
    std::thread::sleep(SETTLE);
    Calibration {
        connections,
        sshd_cpu_per_connection: (after - before) / connections as f64,
    }
}

/// Runs one tool under GNU time and measures it (see the module doc).
fn measure(fleet: &Fleet, outrider_bin: &Path, run: &Run, tag: &str) -> Measurement {
    let dir = fleet
        .work
        .path()
        .join("runs")
        .join(format!("{tag}-{}", run.tool.name()));
    fs::create_dir_all(&dir).expect("create the run dir");
    let files = RunFiles {
        stdout: dir.join("stdout"),
        stderr: dir.join("stderr"),
        time: dir.join("time"),
        dir,
    };
    let mut cmd = Command::new(GNU_TIME);
    cmd.arg("-f").arg("%e %U %S %M").arg("-o").arg(&files.time);
    // No agent: every client authenticates with the one key file.
    cmd.env_remove("SSH_AUTH_SOCK");
    match run.tool {
        Tool::Outrider => {
            let inventory = files.dir.join("inventory.yaml");
            fleet.write_outrider_inventory(&inventory, run.hosts);
            cmd.arg(outrider_bin)
                .arg("exec")
                .arg("--inventory")
                .arg(&inventory)
                .arg("--secret-dir")
                .arg(&fleet.secret_dir)
                .arg("--concurrency")
                .arg(run.parallelism.to_string());
            if let Some(h) = run.handshakes {
                cmd.arg("--handshakes").arg(h.to_string());
            }
            cmd.args(["--", "uptime"]);
        }
        Tool::Pssh => {
            let hosts = files.dir.join("hosts");
            fleet.write_pssh_hosts(&hosts, run.hosts);
            cmd.arg(PSSH)
                .arg("-h")
                .arg(&hosts)
                .arg("-p")
                .arg(run.parallelism.to_string())
                .arg("-t")
                .arg(PSSH_TIMEOUT_SECS.to_string())
                .args(["-l", BENCH_USER, "-x"])
                .arg(format!(
                    "-i {} -o UserKnownHostsFile={} -o GlobalKnownHostsFile=/dev/null \
                     -o StrictHostKeyChecking=yes -o BatchMode=yes -o ConnectTimeout={} -p {}",
                    fleet.key.display(),
                    fleet.known_hosts.display(),
                    CONNECT_TIMEOUT_SECS,
                    fleet.port()
                ))
                .args(["-i", "uptime"]);
        }
        Tool::Ansible => {
            let inventory = files.dir.join("inventory.ini");
            fleet.write_ansible_inventory(&inventory, run.hosts);
            ansible_env(&mut cmd, &files.dir);
            cmd.arg(ANSIBLE)
                .arg("all")
                .arg("-i")
                .arg(&inventory)
                .args(["-m", "raw", "-a", "uptime", "-f"])
                .arg(run.parallelism.to_string())
                .args(["-u", BENCH_USER, "--private-key"])
                .arg(&fleet.key);
        }
    }
    let stdout = fs::File::create(&files.stdout).expect("create the run's stdout file");
    let stderr = fs::File::create(&files.stderr).expect("create the run's stderr file");
    cmd.stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0);

    let sshd_before = fleet.drained_cpu_seconds();
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("start {GNU_TIME}: {e}: {INSTALL_HINT}"));
    let pid = child.id();
    let mut tree_pss_peak_kib = 0;
    let mut guard_note = String::new();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) => {}
            Err(e) => panic!("wait for {}: {e}", run.invocation()),
        }
        tree_pss_peak_kib = tree_pss_peak_kib.max(tree_pss_kib(pid));
        if started.elapsed() > RUN_GUARD {
            guard_note = format!("killed after {RUN_GUARD:?}");
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(SAMPLE_EVERY);
    }
    let elapsed = started.elapsed().as_secs_f64();
    if run.tool == Tool::Ansible {
        // Ansible's ssh (ControlMaster=auto, ControlPersist=60s) leaves one master per host
        // behind, detached from the measured tree, holding its sshd connection: close them.
        close_control_masters(&files.dir.join("cp"));
    }
    let sshd_after = fleet.drained_cpu_seconds();
    std::thread::sleep(SETTLE);

    let stdout = String::from_utf8_lossy(&fs::read(&files.stdout).unwrap_or_default()).into_owned();
    let succeeded = match run.tool {
        Tool::Outrider => count_outrider(&stdout),
        Tool::Pssh => count_pssh(&stdout),
        Tool::Ansible => count_ansible(&stdout),
    };
    let (wall, client_cpu, max_rss_kib, mut exit_note) = match parse_time(&files.time) {
        Some(t) => t,
        None => (
            elapsed,
            f64::NAN,
            0,
            "GNU time wrote no measurement".to_string(),
        ),
    };
    if !guard_note.is_empty() {
        exit_note = guard_note;
    }
    Measurement {
        run: run.clone(),
        succeeded,
        wall,
        client_cpu,
        max_rss_kib,
        tree_pss_peak_kib,
        sshd_cpu: sshd_after - sshd_before,
        exit_note,
        dir: files.dir,
    }
}

/// outrider: `NAME<TAB>ok<TAB>first stdout line` per host that succeeded (the line is uptime's).
fn count_outrider(stdout: &str) -> usize {
    stdout
        .lines()
        .filter(|l| {
            let mut fields = l.split('\t');
            fields.nth(1) == Some("ok") && fields.next().is_some_and(|o| o.contains("load average"))
        })
        .count()
}

/// parallel-ssh -i: `[n] HH:MM:SS [SUCCESS] host` per host that succeeded.
fn count_pssh(stdout: &str) -> usize {
    stdout
        .lines()
        .filter(|l| l.starts_with('[') && l.contains(" [SUCCESS] "))
        .count()
}

/// ansible: `h0 | CHANGED | rc=0 >>` (raw) or `h0 | SUCCESS | ...` per host that succeeded.
fn count_ansible(stdout: &str) -> usize {
    stdout
        .lines()
        .filter(|l| l.contains(" | CHANGED | ") || l.contains(" | SUCCESS | "))
        .count()
}

fn render_report(
    settings: &Settings,
    cores: usize,
    calibration: &Calibration,
    floor: f64,
    results: &[Measurement],
    outrider_bin: &Path,
    load: (String, String),
) -> String {
    // Each tool's best: its fastest run in which every host succeeded.
    let best_of = |tool: Tool| {
        results
            .iter()
            .enumerate()
            .filter(|(_, m)| m.run.tool == tool && m.complete())
            .min_by(|(_, a), (_, b)| a.wall.total_cmp(&b.wall))
            .map(|(i, _)| i)
    };
    let bests: Vec<usize> = settings.tools.iter().filter_map(|&t| best_of(t)).collect();

    let mut r = String::new();
    let _ = writeln!(
        r,
        "\n## SSH fan-out: `uptime` on {} loopback hosts\n",
        settings.hosts
    );
    let _ = writeln!(
        r,
        "{} · {cores} cores ({}) · load average {} at the start, {} at the end · one sshd ({}) · {}\n",
        command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        cpu_model(),
        load.0,
        load.1,
        command_line("ssh", &["-V"]),
        settings
            .tools
            .iter()
            .map(|&t| tool_version(t, outrider_bin))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        r,
        "| tool | parallelism | succeeded | wall s | wall ÷ floor | client CPU s/host | peak RSS MiB | tree PSS MiB | sshd CPU s/host | |"
    );
    let _ = writeln!(r, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for (i, m) in results.iter().enumerate() {
        let mut notes = Vec::new();
        if bests.contains(&i) {
            notes.push("**best**".to_string());
        }
        if !m.complete() {
            notes.push("⚠ hosts failed".to_string());
        }
        if !m.exit_note.is_empty() {
            notes.push(m.exit_note.clone());
        }
        let hosts = m.run.hosts as f64;
        let _ = writeln!(
            r,
            "| {} | {} {} | {}/{} | {:.1} | {:.2} | {:.3} | {:.1} | {:.1} | {:.4} | {} |",
            m.run.label(),
            m.run.tool.parallelism_flag(),
            m.run.parallelism,
            m.succeeded,
            m.run.hosts,
            m.wall,
            m.wall / floor,
            m.client_cpu / hosts,
            m.max_rss_kib as f64 / 1024.0,
            m.tree_pss_peak_kib as f64 / 1024.0,
            m.sshd_cpu / hosts,
            notes.join(", ")
        );
    }
    let _ = writeln!(
        r,
        "\nServer-bound floor: sshd {:.4} s CPU per connection (measured first: {} OpenSSH `ssh` \
         connections at parallelism {}) × {} hosts ÷ {cores} cores = **{floor:.1} s**.\n",
        calibration.sshd_cpu_per_connection,
        calibration.connections,
        CALIBRATION_PARALLELISM,
        settings.hosts
    );

    let best_outrider = best_of(Tool::Outrider).map(|i| &results[i]);
    let best_peer = [Tool::Pssh, Tool::Ansible]
        .iter()
        .filter_map(|&t| best_of(t))
        .map(|i| &results[i])
        .min_by(|a, b| a.wall.total_cmp(&b.wall));
    match (best_outrider, best_peer) {
        (Some(o), Some(p)) => {
            let verdict = if o.wall <= p.wall {
                format!("**{:.1}x faster**", p.wall / o.wall)
            } else {
                format!("**{:.1}x slower**", o.wall / p.wall)
            };
            let _ = writeln!(
                r,
                "outrider is {verdict} than the best peer ({}): {:.1} s ({}) vs {:.1} s.\n",
                p.run.invocation(),
                o.wall,
                o.run.invocation(),
                p.wall
            );
        }
        _ if settings.tools.contains(&Tool::Outrider) && settings.tools.len() > 1 => {
            let _ = writeln!(
                r,
                "No comparison: outrider or every peer lacks a run in which all hosts succeeded.\n"
            );
        }
        _ => {}
    }
    let _ = writeln!(
        r,
        "wall, client CPU (user+sys of the client and every descendant it waited for) and peak RSS \
         (the largest single process of that tree) come from GNU time; tree PSS is the summed PSS of \
         the client's process tree, sampled every {} ms (its peak); sshd CPU is the sshd listener's \
         own and reaped children's CPU over the run (it depends on the algorithms the client \
         negotiates: OpenSSH 9.2's ssh picks sntrup761x25519, russh curve25519, so a client can \
         beat a floor calibrated with OpenSSH's ssh). Best = a tool's fastest run with every host \
         succeeded. Ansible runs with its default ssh_args (ControlPersist=60s): the masters it \
         leaves behind are closed after each run, outside the measurement.",
        SAMPLE_EVERY.as_millis()
    );
    r
}

/// The last `lines` lines of a file.
fn tail(path: &Path, lines: usize) -> String {
    let text = String::from_utf8_lossy(&fs::read(path).unwrap_or_default()).into_owned();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn tool_version(tool: Tool, outrider_bin: &Path) -> String {
    match tool {
        Tool::Outrider => command_line(outrider_bin.to_str().unwrap_or("outrider"), &["--version"]),
        Tool::Pssh => format!("parallel-ssh {}", command_line(PSSH, &["--version"])),
        Tool::Ansible => command_line(ANSIBLE, &["--version"]),
    }
}
