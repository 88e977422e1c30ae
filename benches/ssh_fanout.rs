//! SSH fan-out benchmark (`make bench-ssh`): `uptime` on a fleet of loopback hosts, outrider
//! side by side with parallel-ssh, ansible and asyncssh (Python, PyPI), in one run, against one
//! real sshd.
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
//! Server cost per connection, first: `BENCH_SEQUENTIAL` (200) sequential connections, each
//! running `true`, against an sshd of their own that offers one algorithm of each kind
//! (curve25519-sha256, chacha20-poly1305@openssh.com, ssh-ed25519 host key and user key), so
//! every client negotiates the same ones: outrider (`exec --concurrency 1 --handshakes 1`),
//! asyncssh (`--parallelism 1`) and, for reference, one OpenSSH `ssh` process per connection.
//! sshd's CPU (listener + reaped children) is read before and after each batch, once every
//! connection is reaped; `BENCH_SEQUENTIAL_ROUNDS` (3) rounds, interleaved, give a median and a
//! range in ms of sshd CPU per connection.
//!
//! Environment: `BENCH_HOSTS` (500; 0 runs only the sequential part), `BENCH_PARALLELISM`
//! ("20,50,100"), `BENCH_TOOLS` ("outrider,pssh,ansible,asyncssh"), `BENCH_SEQUENTIAL` (200;
//! 0 skips it), `BENCH_SEQUENTIAL_ROUNDS` (3), `BENCH_OUTRIDER` (another outrider binary to
//! measure instead of the one this `cargo bench` built). A selected tool that is missing fails the bench:
//! asyncssh is installed by `e2e/bench/asyncssh_install.sh` (a venv under ~/.cache/outrider,
//! pinned version from PyPI) in the preflight, and the bench fails saying so when it cannot be.
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
    "run e2e/bench/deps.sh as root (apt-get install -y pssh ansible-core time python3-venv)";
/// Installs asyncssh into its venv (idempotent) and prints the venv's python.
const ASYNCSSH_INSTALL: &str = "e2e/bench/asyncssh_install.sh";
const ASYNCSSH_FANOUT: &str = "e2e/bench/asyncssh_fanout.py";
/// The algorithms the sequential measurement's sshd offers, one of each kind.
const SEQUENTIAL_SSHD_CONFIG: &str = "KexAlgorithms curve25519-sha256
Ciphers chacha20-poly1305@openssh.com
HostKeyAlgorithms ssh-ed25519
PubkeyAcceptedAlgorithms ssh-ed25519
";
const SEQUENTIAL_ALGORITHMS: &str =
    "curve25519-sha256, chacha20-poly1305@openssh.com, ssh-ed25519 host and user keys";
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
    Asyncssh,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Outrider => "outrider",
            Tool::Pssh => "parallel-ssh",
            Tool::Ansible => "ansible",
            Tool::Asyncssh => "asyncssh",
        }
    }

    /// How the tool spells its parallelism, for the report ("ansible -f 20").
    fn parallelism_flag(self) -> &'static str {
        match self {
            Tool::Outrider => "--concurrency",
            Tool::Pssh => "-p",
            Tool::Ansible => "-f",
            Tool::Asyncssh => "--parallelism",
        }
    }

    fn parse(name: &str) -> Tool {
        match name.trim() {
            "outrider" => Tool::Outrider,
            "pssh" | "parallel-ssh" => Tool::Pssh,
            "ansible" => Tool::Ansible,
            "asyncssh" => Tool::Asyncssh,
            other => panic!(
                "BENCH_TOOLS: unknown tool {other:?} (known: outrider, pssh, ansible, asyncssh)"
            ),
        }
    }
}

struct Settings {
    /// 0: only the sequential measurement.
    hosts: usize,
    parallelism: Vec<usize>,
    tools: Vec<Tool>,
    /// Connections per tool in the sequential measurement (0: skipped).
    sequential: usize,
    sequential_rounds: usize,
}

impl Settings {
    fn from_env() -> Settings {
        let hosts = env_or("BENCH_HOSTS", "500")
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| (0..=20_000).contains(n))
            .expect("BENCH_HOSTS must be a number of hosts between 0 and 20000");
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
        for name in env_or("BENCH_TOOLS", "outrider,pssh,ansible,asyncssh")
            .split(',')
            .filter(|s| !s.trim().is_empty())
        {
            let tool = Tool::parse(name);
            if !tools.contains(&tool) {
                tools.push(tool);
            }
        }
        assert!(!tools.is_empty(), "BENCH_TOOLS lists no tool");
        let sequential = env_or("BENCH_SEQUENTIAL", "200")
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n <= 20_000)
            .expect("BENCH_SEQUENTIAL must be a number of connections between 0 and 20000");
        let sequential_rounds = env_or("BENCH_SEQUENTIAL_ROUNDS", "3")
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=100).contains(n))
            .expect("BENCH_SEQUENTIAL_ROUNDS must be between 1 and 100");
        assert!(
            hosts > 0 || sequential > 0,
            "BENCH_HOSTS=0 and BENCH_SEQUENTIAL=0: nothing to measure"
        );
        Settings {
            hosts,
            parallelism,
            tools,
            sequential,
            sequential_rounds,
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

/// The programs the bench runs.
struct Clients {
    outrider: PathBuf,
    /// The asyncssh venv's python (when asyncssh is selected).
    asyncssh_python: Option<PathBuf>,
    /// e2e/bench/asyncssh_fanout.py
    asyncssh_script: PathBuf,
}

impl Clients {
    fn asyncssh_python(&self) -> &Path {
        self.asyncssh_python
            .as_deref()
            .expect("asyncssh is installed by the preflight when it is selected")
    }
}

/// The fan-out runs and what they are compared with.
struct Fanout {
    calibration: Calibration,
    floor: f64,
    results: Vec<Measurement>,
}

fn main() {
    let settings = Settings::from_env();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { root.join(p) })
        .unwrap_or_else(|| root.join("target"));
    let out_dir = target_dir.join("bench");
    fs::create_dir_all(&out_dir).expect("create target/bench");
    let load_before = load_average();

    // Every selected tool is there (and works) before anything is measured. The outrider binary
    // is built by the same `cargo bench` (release profile): never stale, unless BENCH_OUTRIDER
    // names another build to compare with.
    let outrider_bin = std::env::var_os("BENCH_OUTRIDER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_outrider")));
    let clients = preflight(&settings, &root, outrider_bin);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);

    let sequential = (settings.sequential > 0).then(|| sequential(&settings, &clients));
    let fanout = (settings.hosts > 0).then(|| fanout(&settings, &clients, cores, &out_dir));

    let report = render_report(
        &settings,
        cores,
        sequential.as_deref(),
        fanout.as_ref(),
        &clients,
        (load_before, load_average()),
    );
    print!("{report}");
    let out = out_dir.join("ssh_fanout.md");
    fs::write(&out, &report).unwrap_or_else(|e| panic!("write {}: {e}", out.display()));
    eprintln!("[bench] report written to {}", out.display());

    let mut dead: Vec<String> = sequential
        .iter()
        .flatten()
        .filter(|s| s.rounds.iter().all(|r| r.succeeded == 0))
        .map(|s| format!("{} (sequential)", s.tool))
        .collect();
    if let Some(f) = &fanout {
        dead.extend(
            f.results
                .iter()
                .filter(|m| m.succeeded == 0)
                .map(|m| m.run.invocation()),
        );
    }
    if !dead.is_empty() {
        eprintln!("[bench] FAILED: no host succeeded in: {}", dead.join(", "));
        std::process::exit(1);
    }
}

/// The fan-out runs (see the module doc) on a fleet of `settings.hosts` hosts.
fn fanout(settings: &Settings, clients: &Clients, cores: usize, out_dir: &Path) -> Fanout {
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
        let m = measure(&fleet, clients, &run, &format!("{seq:02}-smoke"));
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
        let m = measure(&fleet, clients, run, &format!("{seq:02}"));
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
    Fanout {
        calibration,
        floor,
        results,
    }
}

/// Fails (with the install hint) when a selected tool or GNU time is missing, or when the outrider
/// binary lacks the `exec` subcommand. Installs asyncssh (its venv) when it is selected.
fn preflight(settings: &Settings, root: &Path, outrider_bin: PathBuf) -> Clients {
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
    let mut clients = Clients {
        outrider: outrider_bin,
        asyncssh_python: None,
        asyncssh_script: root.join(ASYNCSSH_FANOUT),
    };
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
                    clients.outrider.exists(),
                    "{} not found: `cargo bench --bench ssh_fanout` builds it",
                    clients.outrider.display()
                );
                let bin = clients.outrider.to_str().expect("a UTF-8 path");
                assert!(
                    runs(bin, &["exec", "--help"]),
                    "`{bin} exec --help` failed: this outrider has no `exec` subcommand"
                );
            }
            Tool::Asyncssh => clients.asyncssh_python = Some(install_asyncssh(root, &clients)),
        }
    }
    if settings.sequential > 0 {
        assert!(
            runs("ssh", &["-V"]),
            "OpenSSH's ssh (the sequential measurement's reference) not found: run e2e/deps.sh"
        );
    }
    clients
}

/// Runs e2e/bench/asyncssh_install.sh (idempotent) and checks that the python it prints runs
/// e2e/bench/asyncssh_fanout.py; panics saying how to get asyncssh when it cannot.
fn install_asyncssh(root: &Path, clients: &Clients) -> PathBuf {
    let script = root.join(ASYNCSSH_INSTALL);
    let hint = format!(
        "asyncssh (PyPI) is needed for BENCH_TOOLS=…asyncssh: run `{}` (it makes a venv under \
         ~/.cache/outrider and pip-installs the pinned asyncssh; needs python3 >= 3.10 with \
         python3-venv, see e2e/bench/deps.sh, and access to PyPI), or leave asyncssh out of \
         BENCH_TOOLS",
        script.display()
    );
    eprintln!(
        "[bench] installing asyncssh if needed ({})",
        script.display()
    );
    let out = Command::new(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("start {}: {e}\n{hint}", script.display()));
    assert!(
        out.status.success(),
        "{} failed ({}): {hint}",
        script.display(),
        out.status
    );
    let python = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let help = Command::new(&python)
        .arg(&clients.asyncssh_script)
        .arg("--help")
        .stdin(Stdio::null())
        .output();
    assert!(
        help.as_ref().is_ok_and(|o| o.status.success()),
        "`{} {} --help` failed ({:?}): {hint}",
        python.display(),
        clients.asyncssh_script.display(),
        help.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
    );
    python
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
fn measure(fleet: &Fleet, clients: &Clients, run: &Run, tag: &str) -> Measurement {
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
            cmd.arg(&clients.outrider)
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
        Tool::Asyncssh => {
            let hosts = files.dir.join("hosts");
            fleet.write_pssh_hosts(&hosts, run.hosts);
            cmd.arg(clients.asyncssh_python())
                .args(asyncssh_args(fleet, clients, &hosts, run.parallelism))
                .args(["--", "uptime"]);
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
        Tool::Outrider | Tool::Asyncssh => count_tab_separated(&stdout, "load average"),
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

/// outrider and asyncssh_fanout.py: `NAME<TAB>ok<TAB>first stdout line` per host that
/// succeeded, the line holding `expect` (uptime's "load average"; "" for `true`).
fn count_tab_separated(stdout: &str, expect: &str) -> usize {
    stdout
        .lines()
        .filter(|l| {
            let mut fields = l.split('\t');
            fields.nth(1) == Some("ok") && fields.next().is_some_and(|o| o.contains(expect))
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

/// `asyncssh_fanout.py --hosts … --parallelism N`, to run with [`Clients::asyncssh_python`]
/// (the command follows, after `--`): the same key, known_hosts (strict) and user as every
/// other tool.
fn asyncssh_args(
    fleet: &Fleet,
    clients: &Clients,
    hosts: &Path,
    parallelism: usize,
) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec![clients.asyncssh_script.clone().into()];
    let mut push = |flag: &str, value: std::ffi::OsString| {
        args.push(flag.into());
        args.push(value);
    };
    push("--hosts", hosts.into());
    push("--port", fleet.port().to_string().into());
    push("--user", BENCH_USER.into());
    push("--key", fleet.key.clone().into());
    push("--known-hosts", fleet.known_hosts.clone().into());
    push("--parallelism", parallelism.to_string().into());
    push("--connect-timeout", CONNECT_TIMEOUT_SECS.to_string().into());
    push("--timeout", PSSH_TIMEOUT_SECS.to_string().into());
    args
}

/// A client of the sequential measurement.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum SeqClient {
    Outrider,
    Asyncssh,
    /// One OpenSSH `ssh` process per connection (the reference).
    OpenSsh,
}

impl SeqClient {
    fn label(self) -> &'static str {
        match self {
            SeqClient::Outrider => "outrider",
            SeqClient::Asyncssh => "asyncssh",
            SeqClient::OpenSsh => "OpenSSH ssh",
        }
    }

    fn invocation(self, n: usize) -> String {
        match self {
            SeqClient::Outrider => {
                format!("outrider exec --concurrency 1 --handshakes 1 (one process, {n} hosts)")
            }
            SeqClient::Asyncssh => {
                format!("asyncssh_fanout.py --parallelism 1 (one process, {n} hosts)")
            }
            SeqClient::OpenSsh => format!("{n} × `ssh HOST true`, one after another"),
        }
    }
}

/// One batch of `connections` sequential connections.
struct SeqBatch {
    succeeded: usize,
    connections: usize,
    wall: f64,
    sshd_cpu: f64,
}

impl SeqBatch {
    fn ms_per_connection(&self) -> f64 {
        self.sshd_cpu * 1000.0 / self.connections as f64
    }
}

/// One client's batches.
struct Sequential {
    tool: &'static str,
    invocation: String,
    rounds: Vec<SeqBatch>,
}

impl Sequential {
    /// (median, min, max) ms of sshd CPU per connection over the rounds in which every
    /// connection succeeded.
    fn ms_per_connection(&self) -> Option<(f64, f64, f64)> {
        let mut ms: Vec<f64> = self
            .rounds
            .iter()
            .filter(|r| r.succeeded == r.connections)
            .map(SeqBatch::ms_per_connection)
            .collect();
        if ms.is_empty() {
            return None;
        }
        ms.sort_by(f64::total_cmp);
        let median = if ms.len() % 2 == 1 {
            ms[ms.len() / 2]
        } else {
            (ms[ms.len() / 2 - 1] + ms[ms.len() / 2]) / 2.0
        };
        Some((median, ms[0], ms[ms.len() - 1]))
    }
}

/// Server cost per connection: `settings.sequential` connections one after another, each
/// running `true`, per client and round (see the module doc).
fn sequential(settings: &Settings, clients: &Clients) -> Vec<Sequential> {
    let n = settings.sequential;
    let fleet = Fleet::start_with(n, SEQUENTIAL_SSHD_CONFIG);
    eprintln!(
        "[bench] sequential: {n} connections a batch, {} round(s); sshd pid {} on port {} offers only {SEQUENTIAL_ALGORITHMS}",
        settings.sequential_rounds,
        fleet.server.pid(),
        fleet.port()
    );
    let inventory = fleet.work.path().join("sequential-inventory.yaml");
    fleet.write_outrider_inventory(&inventory, n);
    let hosts = fleet.work.path().join("sequential-hosts");
    fleet.write_pssh_hosts(&hosts, n);
    let mut kinds = Vec::new();
    if settings.tools.contains(&Tool::Outrider) {
        kinds.push(SeqClient::Outrider);
    }
    if settings.tools.contains(&Tool::Asyncssh) {
        kinds.push(SeqClient::Asyncssh);
    }
    kinds.push(SeqClient::OpenSsh);
    let mut all: Vec<Sequential> = kinds
        .iter()
        .map(|k| Sequential {
            tool: k.label(),
            invocation: k.invocation(n),
            rounds: Vec::new(),
        })
        .collect();
    for round in 1..=settings.sequential_rounds {
        for (i, &kind) in kinds.iter().enumerate() {
            let batch = sequential_batch(&fleet, clients, kind, &inventory, &hosts, n);
            eprintln!(
                "[bench] sequential round {round}: {}: {}/{} ok, {:.1} s wall, {:.2} ms sshd CPU/connection",
                kind.label(),
                batch.succeeded,
                batch.connections,
                batch.wall,
                batch.ms_per_connection()
            );
            all[i].rounds.push(batch);
            std::thread::sleep(SETTLE);
        }
    }
    all
}

fn sequential_batch(
    fleet: &Fleet,
    clients: &Clients,
    kind: SeqClient,
    inventory: &Path,
    hosts: &Path,
    n: usize,
) -> SeqBatch {
    let before = fleet.drained_cpu_seconds();
    let started = Instant::now();
    let succeeded = match kind {
        SeqClient::Outrider | SeqClient::Asyncssh => {
            let mut cmd = if kind == SeqClient::Outrider {
                let mut cmd = Command::new(&clients.outrider);
                cmd.arg("exec")
                    .arg("--inventory")
                    .arg(inventory)
                    .arg("--secret-dir")
                    .arg(&fleet.secret_dir)
                    .args(["--concurrency", "1", "--handshakes", "1"]);
                cmd
            } else {
                let mut cmd = Command::new(clients.asyncssh_python());
                cmd.args(asyncssh_args(fleet, clients, hosts, 1));
                cmd
            };
            cmd.args(["--", "true"])
                .env_remove("SSH_AUTH_SOCK")
                .stdin(Stdio::null())
                .stderr(Stdio::piped());
            let out = cmd
                .output()
                .unwrap_or_else(|e| panic!("start {}: {e}", kind.label()));
            let ok = count_tab_separated(&String::from_utf8_lossy(&out.stdout), "");
            if ok < n {
                eprintln!(
                    "[bench] sequential {}: {}/{n} ok; stderr: {}",
                    kind.label(),
                    ok,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            ok
        }
        SeqClient::OpenSsh => (0..n)
            .filter(|&i| {
                let out = Command::new("ssh")
                    .args(fleet.ssh_options(CONNECT_TIMEOUT_SECS))
                    .arg("-p")
                    .arg(fleet.port().to_string())
                    .args(["-l", BENCH_USER, &fleet.addrs[i], "true"])
                    .env_remove("SSH_AUTH_SOCK")
                    .stdin(Stdio::null())
                    .output();
                let ok = matches!(&out, Ok(o) if o.status.success());
                if !ok && let Ok(o) = &out {
                    eprintln!(
                        "[bench] sequential ssh to {} failed: {}",
                        fleet.addrs[i],
                        String::from_utf8_lossy(&o.stderr).trim()
                    );
                }
                ok
            })
            .count(),
    };
    let wall = started.elapsed().as_secs_f64();
    let after = fleet.drained_cpu_seconds();
    SeqBatch {
        succeeded,
        connections: n,
        wall,
        sshd_cpu: after - before,
    }
}

fn render_report(
    settings: &Settings,
    cores: usize,
    sequential: Option<&[Sequential]>,
    fanout: Option<&Fanout>,
    clients: &Clients,
    load: (String, String),
) -> String {
    let mut r = String::new();
    let _ = writeln!(
        r,
        "\n{} · {cores} cores ({}) · load average {} at the start, {} at the end · one sshd ({}) · {}",
        command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        cpu_model(),
        load.0,
        load.1,
        command_line("ssh", &["-V"]),
        settings
            .tools
            .iter()
            .map(|&t| tool_version(t, clients))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(seq) = sequential {
        render_sequential(&mut r, settings, seq);
    }
    if let Some(f) = fanout {
        render_fanout(&mut r, settings, cores, f);
    }
    r
}

fn render_sequential(r: &mut String, settings: &Settings, seq: &[Sequential]) {
    let _ = writeln!(
        r,
        "\n## sshd CPU per connection: {} sequential connections running `true`\n",
        settings.sequential
    );
    let _ = writeln!(
        r,
        "| client | invocation | succeeded | sshd CPU ms/connection (median) | range | wall s (median) |"
    );
    let _ = writeln!(r, "|---|---|---:|---:|---:|---:|");
    for s in seq {
        let succeeded: usize = s.rounds.iter().map(|b| b.succeeded).sum();
        let total: usize = s.rounds.iter().map(|b| b.connections).sum();
        let mut walls: Vec<f64> = s.rounds.iter().map(|b| b.wall).collect();
        walls.sort_by(f64::total_cmp);
        let wall = walls.get(walls.len() / 2).copied().unwrap_or(f64::NAN);
        let (median, range) = match s.ms_per_connection() {
            Some((m, lo, hi)) => (format!("**{m:.1}**"), format!("{lo:.1}–{hi:.1}")),
            None => ("–".to_string(), "no complete round".to_string()),
        };
        let _ = writeln!(
            r,
            "| {} | {} | {succeeded}/{total} | {median} | {range} | {wall:.1} |",
            s.tool, s.invocation
        );
    }
    let _ = writeln!(
        r,
        "\nOne sshd of its own offering only {SEQUENTIAL_ALGORITHMS}, so every client negotiates \
         the same; {} round(s), the clients interleaved in each. sshd CPU is the listener's own and \
         its reaped children's (/proc/PID/stat utime+stime+cutime+cstime), read before and after \
         each batch once every connection is reaped, ÷ connections; median and range over the \
         rounds in which every connection succeeded.",
        settings.sequential_rounds
    );
}

fn render_fanout(r: &mut String, settings: &Settings, cores: usize, fanout: &Fanout) {
    let Fanout {
        calibration,
        floor,
        results,
    } = fanout;
    let floor = *floor;
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

    let _ = writeln!(
        r,
        "\n## SSH fan-out: `uptime` on {} loopback hosts\n",
        settings.hosts
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
    let best_peer = [Tool::Pssh, Tool::Ansible, Tool::Asyncssh]
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
}

/// The last `lines` lines of a file.
fn tail(path: &Path, lines: usize) -> String {
    let text = String::from_utf8_lossy(&fs::read(path).unwrap_or_default()).into_owned();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn tool_version(tool: Tool, clients: &Clients) -> String {
    match tool {
        Tool::Outrider => command_line(
            clients.outrider.to_str().unwrap_or("outrider"),
            &["--version"],
        ),
        Tool::Pssh => format!("parallel-ssh {}", command_line(PSSH, &["--version"])),
        Tool::Ansible => command_line(ANSIBLE, &["--version"]),
        Tool::Asyncssh => command_line(
            clients.asyncssh_python().to_str().unwrap_or("python3"),
            &[
                "-c",
                "import warnings; warnings.simplefilter('ignore'); import asyncssh, sys; \
                 print('asyncssh', asyncssh.__version__, 'on Python', sys.version.split()[0])",
            ],
        ),
    }
}
