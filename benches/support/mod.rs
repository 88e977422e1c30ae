//! What the benchmarks share: one real sshd playing a fleet of loopback hosts, the files every
//! client reads, and the /proc readings (CPU, PSS, process trees) they are measured with.
#![allow(dead_code)] // each bench uses its own subset

#[path = "../../tests/support/sshd.rs"]
pub mod sshd;

/// `(pid, ppid)` of every process: the harness reads /proc the same way.
pub use sshd::process_table;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The account every tool logs in as: unprivileged, `/bin/sh`, no rc files (`e2e/deps.sh`).
/// Not root: root's shell on these machines is bash, which sources a `.bashrc` running
/// `pyenv init` for every ssh command (~0.15 s of server CPU each, more under contention).
pub const BENCH_USER: &str = "outrider-nosudo";
pub const CONNECT_TIMEOUT_SECS: u32 = 30;
/// How long to wait for sshd to reap every connection of a run.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

/// Ansible's environment for one run, everything under `dir`: an empty config file (no
/// /etc/ansible/ansible.cfg or ~/.ansible.cfg leaks in), its own control-path dir (the default
/// ssh_args keep ControlPersist=60s: close the masters with [`close_control_masters`] on
/// `dir/cp` after the run), host keys checked, no warnings or colours in the output.
pub fn ansible_env(cmd: &mut Command, dir: &Path) {
    let control = dir.join("cp");
    let local_tmp = dir.join("ansible-tmp");
    let config = dir.join("ansible.cfg");
    fs::create_dir_all(&control).expect("create the ansible control path dir");
    fs::create_dir_all(&local_tmp).expect("create the ansible local temp dir");
    fs::write(&config, "").expect("write ansible.cfg");
    cmd.env("ANSIBLE_CONFIG", &config)
        .env("ANSIBLE_HOST_KEY_CHECKING", "True")
        .env("ANSIBLE_SSH_CONTROL_PATH_DIR", &control)
        .env("ANSIBLE_LOCAL_TEMP", &local_tmp)
        .env("ANSIBLE_HOME", dir.join("ansible-home"))
        .env("ANSIBLE_TIMEOUT", CONNECT_TIMEOUT_SECS.to_string())
        .env("ANSIBLE_DEPRECATION_WARNINGS", "False")
        .env("ANSIBLE_SYSTEM_WARNINGS", "False")
        .env("ANSIBLE_LOCALHOST_WARNING", "False")
        .env("ANSIBLE_NOCOLOR", "True");
}

/// Fails with a hint when the bench user is missing.
pub fn require_bench_user() {
    let exists = Command::new("id")
        .args(["-u", BENCH_USER])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        exists,
        "the test user {BENCH_USER} does not exist: run e2e/deps.sh as root (make deps)"
    );
}

/// The sshd, the addresses it plays, and every input file the clients read.
pub struct Fleet {
    pub server: sshd::Sshd,
    pub work: tempfile::TempDir,
    pub addrs: Vec<String>,
    /// ed25519 private key (mode 0600), authorized for [`BENCH_USER`].
    pub key: PathBuf,
    /// known_hosts pinning every address's host keys (`[addr]:port` form).
    pub known_hosts: PathBuf,
    /// Secret-like directory for outrider: `ssh-privatekey`, `known_hosts`.
    pub secret_dir: PathBuf,
}

impl Fleet {
    /// OpenSSH client options that trust exactly this fleet's host keys, non-interactively:
    /// `-i KEY -o UserKnownHostsFile=… -o GlobalKnownHostsFile=/dev/null
    /// -o StrictHostKeyChecking=yes -o BatchMode=yes -o ConnectTimeout=SECS`.
    pub fn ssh_options(&self, connect_timeout_secs: u32) -> Vec<String> {
        vec![
            "-i".into(),
            self.key.display().to_string(),
            "-o".into(),
            format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "-o".into(),
            "GlobalKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            format!("ConnectTimeout={connect_timeout_secs}"),
        ]
    }

    pub fn start(hosts: usize) -> Fleet {
        Fleet::start_with(hosts, "")
    }

    /// Like [`Fleet::start`], with `extra_config` added to sshd's config (see
    /// [`sshd::Sshd::start_with`]).
    pub fn start_with(hosts: usize, extra_config: &str) -> Fleet {
        let server = sshd::Sshd::start_with(extra_config);
        let work = tempfile::Builder::new()
            .prefix("outrider-bench-")
            .tempdir()
            .expect("create the bench work dir");
        let keys = work.path().join("keys");
        fs::create_dir(&keys).expect("create the key dir");
        let (private_key, public_key) = sshd::user_key(&keys, "ed25519", None, "openssh");
        server.authorize(BENCH_USER, &public_key);
        let key = work.path().join("id_ed25519");
        write_private(&key, &private_key);

        let addrs: Vec<String> = (0..hosts).map(address).collect();
        let addr_refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let known_hosts_text = server.known_hosts_for(&addr_refs);
        let known_hosts = work.path().join("known_hosts");
        fs::write(&known_hosts, &known_hosts_text).expect("write known_hosts");

        let secret_dir = work.path().join("secret");
        fs::create_dir(&secret_dir).expect("create the secret dir");
        write_private(&secret_dir.join("ssh-privatekey"), &private_key);
        fs::write(secret_dir.join("known_hosts"), &known_hosts_text)
            .expect("write the secret's known_hosts");

        // pssh's -x is split like a shell line: keep the paths free of blanks and quotes.
        let path_text = work.path().display().to_string();
        assert!(
            !path_text.contains(|c: char| c.is_whitespace() || "'\"\\".contains(c)),
            "the temp dir {path_text:?} must not hold blanks or quotes"
        );
        Fleet {
            server,
            work,
            addrs,
            key,
            known_hosts,
            secret_dir,
        }
    }

    pub fn port(&self) -> u16 {
        self.server.port
    }

    /// The first `hosts` hosts as an outrider Inventory manifest.
    pub fn write_outrider_inventory(&self, path: &Path, hosts: usize) {
        let mut y = format!(
            "apiVersion: outrider.dev/v1alpha1\nkind: Inventory\nmetadata: {{name: bench}}\nspec:\n  \
             ssh: {{user: {BENCH_USER}, port: {}, secretRef: {{name: bench}}, connectTimeout: {}s, hostKeyPolicy: Strict}}\n  \
             hosts:\n",
            self.port(),
            CONNECT_TIMEOUT_SECS
        );
        for (i, addr) in self.addrs.iter().take(hosts).enumerate() {
            let _ = writeln!(y, "    - {{name: h{i}, address: {addr}}}");
        }
        fs::write(path, y).expect("write the outrider inventory");
    }

    /// The first `hosts` addresses, one a line (parallel-ssh's -h file).
    pub fn write_pssh_hosts(&self, path: &Path, hosts: usize) {
        let mut text = String::new();
        for addr in self.addrs.iter().take(hosts) {
            let _ = writeln!(text, "{addr}");
        }
        fs::write(path, text).expect("write the parallel-ssh hosts file");
    }

    /// The first `hosts` hosts as an ansible INI inventory.
    pub fn write_ansible_inventory(&self, path: &Path, hosts: usize) {
        let mut text = String::from("[fleet]\n");
        for (i, addr) in self.addrs.iter().take(hosts).enumerate() {
            let _ = writeln!(
                text,
                "h{i} ansible_host={addr} ansible_port={}",
                self.port()
            );
        }
        let _ = writeln!(
            text,
            "\n[fleet:vars]\nansible_ssh_common_args='-o UserKnownHostsFile={} \
             -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes'",
            self.known_hosts.display()
        );
        fs::write(path, text).expect("write the ansible inventory");
    }

    /// Direct children of the sshd listener: one per connection not yet reaped.
    pub fn connections(&self) -> usize {
        let pid = self.server.pid();
        process_table()
            .iter()
            .filter(|(_, ppid)| *ppid == pid)
            .count()
    }

    /// Waits (bounded) until sshd has reaped every connection, then returns its CPU seconds.
    pub fn drained_cpu_seconds(&self) -> f64 {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            let open = self.connections();
            if open == 0 {
                break;
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "[bench] warning: sshd still has {open} connection(s) after {DRAIN_TIMEOUT:?}; \
                     their CPU is not counted yet"
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.server.cpu_seconds()
    }
}

pub fn address(i: usize) -> String {
    format!("127.0.{}.{}", 20 + i / 250, 1 + i % 250)
}

pub fn write_private(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod 600 {}: {e}", path.display()));
}

/// `ssh -O exit` on every control socket in `dir` (outside the measurement).
pub fn close_control_masters(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let sockets: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    for chunk in sockets.chunks(50) {
        let children: Vec<_> = chunk
            .iter()
            .filter_map(|socket| {
                Command::new("ssh")
                    .args(["-F", "/dev/null", "-O", "exit", "-o"])
                    .arg(format!("ControlPath={}", socket.display()))
                    .arg("127.0.0.1")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .ok()
            })
            .collect();
        for mut child in children {
            let _ = child.wait();
        }
    }
}

/// (wall s, user+sys s, max RSS KiB, exit note) from GNU time's `-o` file: its last line is
/// `%e %U %S %M`; a line before it tells a non-zero exit or a signal.
pub fn parse_time(path: &Path) -> Option<(f64, f64, u64, String)> {
    let text = fs::read_to_string(path).ok()?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let last = lines.last()?;
    let fields: Vec<&str> = last.split_whitespace().collect();
    if fields.len() != 4 {
        return None;
    }
    let wall = fields[0].parse::<f64>().ok()?;
    let user = fields[1].parse::<f64>().ok()?;
    let sys = fields[2].parse::<f64>().ok()?;
    let rss = fields[3].parse::<u64>().ok()?;
    let note = lines[..lines.len() - 1].join("; ");
    Some((wall, user + sys, rss, note))
}

/// Summed PSS (KiB) of `root` and every process below it.
pub fn tree_pss_kib(root: u32) -> u64 {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (pid, ppid) in process_table() {
        children.entry(ppid).or_default().push(pid);
    }
    let mut total = 0;
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        total += pss_kib(pid);
        if let Some(kids) = children.get(&pid) {
            stack.extend(kids);
        }
    }
    total
}

/// Peak resident set (VmHWM, KiB) of a running process; 0 once it is gone.
pub fn vm_hwm_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system, /proc/<pid>/stat fields 14 and 15) a running process used.
pub fn cpu_seconds(pid: u32) -> f64 {
    stat_seconds(pid, 11..13)
}

/// [`cpu_seconds`] plus that of its reaped children (fields 16 and 17).
pub fn cpu_seconds_with_children(pid: u32) -> f64 {
    stat_seconds(pid, 11..15)
}

/// The sum of /proc/<pid>/stat clock-tick fields `range` (counted after the command name).
fn stat_seconds(pid: u32, range: std::ops::Range<usize>) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name (field 2) may hold spaces: count fields after its closing paren.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields
        .get(range)
        .map(|f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    // USER_HZ is 100 on every Linux this runs on.
    ticks as f64 / 100.0
}

pub fn pss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .unwrap_or(0)
}

/// First line of a command's output (stdout, else stderr), or "?".
pub fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            let text = if o.stdout.iter().any(|b| !b.is_ascii_whitespace()) {
                o.stdout
            } else {
                o.stderr
            };
            String::from_utf8_lossy(&text)
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "?".into())
}

/// The 1, 5 and 15 minute load averages ("0.52 0.58 0.59"): other work on the machine skews
/// every number here.
pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

pub fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The test control plane of `e2e/cluster.sh` (started if it is not up) and a namespace of
/// this run's own.
pub struct Cluster {
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
    pub ns: String,
}

impl Cluster {
    /// Brings the cluster up; the namespace is `<prefix>-<pid>`.
    pub fn up(repo: &Path, prefix: &str) -> Cluster {
        let dir = std::env::var("OUTRIDER_CLUSTER_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| repo.join("e2e/.cluster"));
        let out = Command::new(repo.join("e2e/cluster.sh"))
            .arg("up")
            .env("OUTRIDER_CLUSTER_DIR", &dir)
            .output()
            .expect("running e2e/cluster.sh");
        assert!(
            out.status.success(),
            "e2e/cluster.sh up failed (build the tools with `make tools`):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Cluster {
            kubeconfig: dir.join("kubeconfig"),
            kubectl: repo.join("e2e/bin/kubectl"),
            ns: format!("{prefix}-{}", std::process::id()),
        }
    }

    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(&self.kubectl);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs kubectl and returns its stdout; a failure fails the bench.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self
            .kubectl()
            .args(args)
            .output()
            .expect("running e2e/bin/kubectl");
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Writes `report` to `target/bench/<file>` (or under `CARGO_TARGET_DIR`) and says where.
pub fn write_report(repo: &Path, file: &str, report: &str) {
    let out_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { repo.join(p) })
        .unwrap_or_else(|| repo.join("target"))
        .join("bench");
    fs::create_dir_all(&out_dir).expect("create target/bench");
    fs::write(out_dir.join(file), report).expect("write the report");
    eprintln!("[bench] report written to {}", out_dir.join(file).display());
}

/// Waits up to a minute for the controller's `/readyz` on `metrics_port`; `log` is named
/// when it does not come up.
pub fn wait_ready(metrics_port: u16, log: &Path) {
    let started = Instant::now();
    while Command::new("curl")
        .args(["-sf", &format!("http://127.0.0.1:{metrics_port}/readyz")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_or(true, |s| !s.success())
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the controller did not become ready; see {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
