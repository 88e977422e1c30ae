//! DeploymentPlan benchmark (`make bench-plan`): a 3-stage plan on `BENCH_HOSTS` (500) loopback
//! hosts, `maxParallel: 100`, end to end through `outrider controller` and the real API server
//! of `e2e/cluster.sh`, side by side with `ansible-playbook` running the same three scripts on
//! the same hosts (`serial: 100%`, `-f 50`, `raw` tasks, its default ControlPersist).
//!
//! Every stage appends `<stage> $SSH_CONNECTION` to one file, so the bench counts what each
//! tool really did: every host ran every stage once, and how many SSH connections it took.
//!
//! Reported for outrider: wall time (from `kubectl apply` of the plan to phase Succeeded, seen
//! by a watch), writes to the plan object (resourceVersion changes seen by that watch: the
//! finalizer, then status), the controller's peak RSS (VmHWM), sshd CPU per host. For
//! ansible-playbook: wall time, client CPU, peak RSS (GNU time), sshd CPU per host.
//!
//! The server-bound floor: sshd CPU per host for the same three stages over one connection, at
//! low contention (`outrider plan run`, the same engine without a cluster, maxParallel 2 on 50
//! hosts), × hosts ÷ cores.
//!
//! Environment: `BENCH_HOSTS` (500), `BENCH_MAX_PARALLEL` (100), `BENCH_FORKS` (50).
//! Needs root (the test sshd), the test user (`e2e/deps.sh`), ansible (`e2e/bench/deps.sh`)
//! and the control plane (`make tools`). The report goes to stdout and `target/bench/plan_rollout.md`.

#[path = "support/mod.rs"]
mod support;

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

const STAGES: [&str; 3] = ["check", "deploy", "verify"];
const CALIBRATION_HOSTS: usize = 50;
const CALIBRATION_PARALLEL: usize = 2;
/// Longest a run may take before the bench gives up on it.
const RUN_LIMIT: Duration = Duration::from_secs(20 * 60);

/// The script of one stage: the work (`uptime` for the first), then one line in the log.
fn stage_script(stage: &str, log: &Path) -> String {
    let work = if stage == "check" {
        "uptime >/dev/null && "
    } else {
        ""
    };
    format!(
        "{work}echo \"{stage} $SSH_CONNECTION\" >> {}",
        log.display()
    )
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name} must be a number, not {v:?}"))
        })
        .unwrap_or(default)
}

fn plan_manifest(hosts_log: &Path, max_parallel: usize, name: &str) -> String {
    let mut y = format!(
        "apiVersion: outrider.dev/v1alpha1\nkind: DeploymentPlan\nmetadata: {{name: {name}}}\nspec:\n  \
         targets: {{inventoryRef: {{name: bench}}}}\n  \
         strategy: {{batchSize: 100%, maxParallel: {max_parallel}, maxUnavailable: 0}}\n  stages:\n"
    );
    for stage in STAGES {
        let _ = writeln!(
            y,
            "    - name: {stage}\n      timeout: 60s\n      script: {:?}",
            stage_script(stage, hosts_log)
        );
    }
    y
}

fn playbook(log: &Path) -> String {
    let mut y = String::from("- hosts: all\n  gather_facts: false\n  serial: \"100%\"\n  tasks:\n");
    for stage in STAGES {
        let _ = writeln!(
            y,
            "    - name: {stage}\n      raw: {:?}",
            stage_script(stage, log)
        );
    }
    y
}

/// What the stage log says: hosts that ran every stage exactly once, and SSH connections
/// (distinct client address:port) per host.
struct LogCheck {
    complete_hosts: usize,
    repeated: usize,
    connections_per_host_max: usize,
    connections_total: usize,
}

fn check_log(path: &Path) -> LogCheck {
    let text = fs::read_to_string(path).unwrap_or_default();
    // host -> stage -> count ; host -> client endpoints
    let mut runs: HashMap<String, HashMap<String, usize>> = HashMap::new();
    let mut conns: HashMap<String, HashSet<String>> = HashMap::new();
    for line in text.lines() {
        // "<stage> <client ip> <client port> <server ip> <server port>"
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() != 5 {
            continue;
        }
        *runs
            .entry(f[3].to_string())
            .or_default()
            .entry(f[0].to_string())
            .or_default() += 1;
        conns
            .entry(f[3].to_string())
            .or_default()
            .insert(format!("{}:{}", f[1], f[2]));
    }
    let complete_hosts = runs
        .values()
        .filter(|stages| STAGES.iter().all(|s| stages.get(*s) == Some(&1)))
        .count();
    let repeated = runs
        .values()
        .flat_map(|stages| stages.values())
        .map(|n| n.saturating_sub(1))
        .sum();
    LogCheck {
        complete_hosts,
        repeated,
        connections_per_host_max: conns.values().map(HashSet::len).max().unwrap_or(0),
        connections_total: conns.values().map(HashSet::len).sum(),
    }
}

/// A log file every host can append to (the sessions run as the unprivileged bench user).
fn shared_log(dir: &Path, name: &str) -> PathBuf {
    let sub = dir.join(format!("{name}-log"));
    fs::create_dir_all(&sub).expect("create the log dir");
    fs::set_permissions(&sub, fs::Permissions::from_mode(0o777)).expect("chmod the log dir");
    sub.join("stages.log")
}

/// `kubectl get -w` on the plan: every resourceVersion it goes through, when, and its phase.
struct PlanWatch {
    child: Child,
    seen: Arc<Mutex<Vec<(Instant, String, String)>>>,
}

impl PlanWatch {
    fn start(cluster: &Cluster, name: &str) -> PlanWatch {
        let ns = cluster.ns.as_str();
        let mut child = cluster
            .kubectl()
            // a list watch by name: it sees the plan from its creation on
            .args(["get", "deploymentplans", "-n", ns, "--watch"])
            .arg(format!("--field-selector=metadata.name={name}"))
            .args(["--output-watch-events", "-o"])
            .arg("jsonpath={.object.metadata.resourceVersion} {.object.status.phase}{\"\\n\"}")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("kubectl get --watch");
        let stdout = child.stdout.take().expect("piped stdout");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut f = line.split_whitespace();
                let rv = f.next().unwrap_or_default().to_string();
                let phase = f.next().unwrap_or_default().to_string();
                if let Ok(mut s) = sink.lock() {
                    s.push((Instant::now(), rv, phase));
                }
            }
        });
        PlanWatch { child, seen }
    }

    /// When the plan first reached `phase`, if it has.
    fn reached(&self, phase: &str) -> Option<Instant> {
        let seen = self.seen.lock().ok()?;
        seen.iter().find(|(_, _, p)| p == phase).map(|(t, _, _)| *t)
    }

    fn last_phase(&self) -> String {
        self.seen
            .lock()
            .ok()
            .and_then(|s| s.last().map(|(_, _, p)| p.clone()))
            .unwrap_or_default()
    }

    fn versions(&self) -> usize {
        self.seen
            .lock()
            .map(|s| {
                s.iter()
                    .map(|(_, rv, _)| rv.clone())
                    .collect::<HashSet<_>>()
                    .len()
            })
            .unwrap_or(0)
    }
}

impl Drop for PlanWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Outcome {
    label: String,
    complete_hosts: usize,
    wall: f64,
    sshd_cpu: f64,
    connections_max: usize,
    connections_total: usize,
    repeated: usize,
    client_cpu: Option<f64>,
    peak_rss_kib: u64,
    plan_writes: Option<usize>,
}

fn main() {
    let hosts = env_usize("BENCH_HOSTS", 500);
    let max_parallel = env_usize("BENCH_MAX_PARALLEL", 100);
    let forks = env_usize("BENCH_FORKS", 50);
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let outrider = PathBuf::from(env!("CARGO_BIN_EXE_outrider"));
    require_bench_user();
    assert!(
        Command::new("ansible-playbook")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        "ansible-playbook not found: run e2e/bench/deps.sh as root"
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load_before = load_average();
    let fleet = Fleet::start(hosts);
    let work = fleet.work.path().to_path_buf();
    eprintln!(
        "[bench] {hosts} hosts, maxParallel {max_parallel}, ansible forks {forks}, {cores} cores; sshd port {}",
        fleet.port()
    );
    let cluster = Cluster::up(&repo, "bench-plan");

    // Floor: the same stages, low contention, the local runner (no cluster).
    let calib_hosts = CALIBRATION_HOSTS.min(hosts);
    let calib_log = shared_log(&work, "calibration");
    let calib_plan = work.join("calibration-plan.yaml");
    fs::write(
        &calib_plan,
        plan_manifest(&calib_log, CALIBRATION_PARALLEL, "calibration"),
    )
    .expect("write the calibration plan");
    let calib_inv = work.join("calibration-inventory.yaml");
    fleet.write_outrider_inventory(&calib_inv, calib_hosts);
    let before = fleet.drained_cpu_seconds();
    let out = Command::new(&outrider)
        .args(["plan", "run", "-f"])
        .arg(&calib_plan)
        .arg("--inventory")
        .arg(&calib_inv)
        .arg("--secret-dir")
        .arg(&fleet.secret_dir)
        .stdin(Stdio::null())
        .output()
        .expect("outrider plan run");
    assert!(
        out.status.success(),
        "calibration `outrider plan run` failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let per_host = (fleet.drained_cpu_seconds() - before) / calib_hosts as f64;
    let calib = check_log(&calib_log);
    assert_eq!(
        calib.complete_hosts, calib_hosts,
        "calibration ran every stage once"
    );
    let floor = per_host * hosts as f64 / cores as f64;
    eprintln!(
        "[bench] floor: sshd {per_host:.4} s CPU/host (3 stages, one connection; {calib_hosts} hosts at maxParallel {CALIBRATION_PARALLEL}) × {hosts} ÷ {cores} cores = {floor:.1} s"
    );

    let outrider_run = run_outrider(&cluster, &fleet, &outrider, hosts, max_parallel);
    eprintln!(
        "[bench] outrider: {}/{hosts} hosts, {:.1} s",
        outrider_run.complete_hosts, outrider_run.wall
    );
    let ansible_run = run_ansible(&fleet, hosts, forks);
    eprintln!(
        "[bench] ansible-playbook: {}/{hosts} hosts, {:.1} s",
        ansible_run.complete_hosts, ansible_run.wall
    );

    let report = render(
        hosts,
        cores,
        floor,
        per_host,
        &load_before,
        &[&outrider_run, &ansible_run],
        &outrider,
    );
    println!("{report}");
    write_report(&repo, "plan_rollout.md", &report);
    assert_eq!(
        outrider_run.complete_hosts, hosts,
        "outrider ran every stage on every host once"
    );
    assert_eq!(
        ansible_run.complete_hosts, hosts,
        "ansible ran every stage on every host once"
    );
}

fn run_outrider(
    cluster: &Cluster,
    fleet: &Fleet,
    outrider: &Path,
    hosts: usize,
    max_parallel: usize,
) -> Outcome {
    let work = fleet.work.path();
    let ns = cluster.ns.as_str();
    cluster.run(&["create", "namespace", ns]);
    let secret_dir = fleet.secret_dir.display().to_string();
    cluster.run(&[
        "create",
        "secret",
        "generic",
        "bench",
        "-n",
        ns,
        &format!("--from-file=ssh-privatekey={secret_dir}/ssh-privatekey"),
        &format!("--from-file=known_hosts={secret_dir}/known_hosts"),
    ]);
    let inventory = work.join("inventory.yaml");
    fleet.write_outrider_inventory(&inventory, hosts);
    // the Inventory's probe would add its own connections: once a day is never, here
    let text = fs::read_to_string(&inventory).expect("read the inventory");
    let text = text.replacen("  hosts:\n", "  probe: {interval: 24h}\n  hosts:\n", 1);
    fs::write(&inventory, text).expect("write the inventory");
    cluster.run(&[
        "apply",
        "--server-side",
        "-n",
        ns,
        "-f",
        &inventory.display().to_string(),
    ]);

    let log_file = fs::File::create(work.join("controller.log")).expect("controller log");
    let metrics_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        l.local_addr().expect("addr").port()
    };
    let mut controller = Command::new(outrider)
        .args([
            "controller",
            "--watch-namespace",
            ns,
            "--lease-namespace",
            ns,
        ])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .env("KUBECONFIG", &cluster.kubeconfig)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("start outrider controller");
    wait_ready(metrics_port, &work.join("controller.log"));
    // the Inventory's first probe (one connection per host) is done before the clock starts
    let probing = Instant::now();
    loop {
        let reachable = cluster.run(&[
            "get",
            "inventory",
            "bench",
            "-n",
            ns,
            "-o",
            "jsonpath={.status.reachable}",
        ]);
        if reachable.trim() == hosts.to_string() {
            break;
        }
        assert!(
            probing.elapsed() < Duration::from_secs(300),
            "the Inventory never reported {hosts} reachable hosts (last: {reachable:?}); see {}",
            work.join("controller.log").display()
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    let log = shared_log(work, "outrider");
    let plan = work.join("plan.yaml");
    fs::write(&plan, plan_manifest(&log, max_parallel, "rollout")).expect("write the plan");
    let watch = PlanWatch::start(cluster, "rollout");
    std::thread::sleep(Duration::from_millis(500));
    let sshd_before = fleet.drained_cpu_seconds();
    let started = Instant::now();
    cluster.run(&["apply", "-n", ns, "-f", &plan.display().to_string()]);
    let finished = loop {
        if let Some(t) = watch.reached("Succeeded") {
            break t;
        }
        let last = watch.last_phase();
        assert!(
            !matches!(last.as_str(), "Failed" | "RolledBack"),
            "the plan ended {last}; see {}",
            work.join("controller.log").display()
        );
        assert!(
            started.elapsed() < RUN_LIMIT,
            "the plan did not finish in {RUN_LIMIT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let wall = finished.duration_since(started).as_secs_f64();
    std::thread::sleep(Duration::from_secs(1));
    let peak_rss_kib = vm_hwm_kib(controller.id());
    let plan_writes = watch.versions();
    drop(watch);
    // the controller is still there to release the plan's finalizer
    let _ = cluster
        .kubectl()
        .args([
            "delete",
            "deploymentplan",
            "rollout",
            "-n",
            ns,
            "--timeout=60s",
        ])
        .output();
    let _ = controller.kill();
    let _ = controller.wait();
    let _ = cluster
        .kubectl()
        .args(["delete", "namespace", ns, "--wait=false"])
        .output();
    let sshd_cpu = fleet.drained_cpu_seconds() - sshd_before;
    let check = check_log(&log);
    Outcome {
        label: format!("outrider controller (maxParallel {max_parallel})"),
        complete_hosts: check.complete_hosts,
        wall,
        sshd_cpu,
        connections_max: check.connections_per_host_max,
        connections_total: check.connections_total,
        repeated: check.repeated,
        client_cpu: None,
        peak_rss_kib,
        plan_writes: Some(plan_writes),
    }
}

fn run_ansible(fleet: &Fleet, hosts: usize, forks: usize) -> Outcome {
    let dir = fleet.work.path().join("ansible");
    fs::create_dir_all(&dir).expect("create the ansible dir");
    let log = shared_log(&dir, "ansible");
    let inventory = dir.join("inventory.ini");
    fleet.write_ansible_inventory(&inventory, hosts);
    let book = dir.join("playbook.yml");
    fs::write(&book, playbook(&log)).expect("write the playbook");
    let time = dir.join("time");
    let mut cmd = Command::new("/usr/bin/time");
    cmd.arg("-f").arg("%e %U %S %M").arg("-o").arg(&time);
    cmd.env_remove("SSH_AUTH_SOCK");
    ansible_env(&mut cmd, &dir);
    cmd.arg("ansible-playbook")
        .arg("-i")
        .arg(&inventory)
        .arg("-f")
        .arg(forks.to_string())
        .args(["-u", BENCH_USER, "--private-key"])
        .arg(&fleet.key)
        .arg(&book)
        .stdin(Stdio::null())
        .stdout(fs::File::create(dir.join("stdout")).expect("stdout file"))
        .stderr(fs::File::create(dir.join("stderr")).expect("stderr file"));
    let sshd_before = fleet.drained_cpu_seconds();
    let status = cmd.status().expect("run ansible-playbook");
    close_control_masters(&dir.join("cp"));
    let sshd_cpu = fleet.drained_cpu_seconds() - sshd_before;
    let (wall, cpu, rss, note) = parse_time(&time).unwrap_or((0.0, 0.0, 0, "no time".into()));
    if !status.success() {
        eprintln!("[bench] ansible-playbook: {note}; see {}", dir.display());
    }
    let check = check_log(&log);
    Outcome {
        label: format!("ansible-playbook (serial 100%, -f {forks})"),
        complete_hosts: check.complete_hosts,
        wall,
        sshd_cpu,
        connections_max: check.connections_per_host_max,
        connections_total: check.connections_total,
        repeated: check.repeated,
        client_cpu: Some(cpu),
        peak_rss_kib: rss,
        plan_writes: None,
    }
}

fn render(
    hosts: usize,
    cores: usize,
    floor: f64,
    per_host: f64,
    load_before: &str,
    runs: &[&Outcome],
    outrider: &Path,
) -> String {
    let mut r = String::new();
    let _ = writeln!(
        r,
        "\n## DeploymentPlan rollout: 3 stages on {hosts} loopback hosts\n\n\
         {} · {cores} cores ({}) · load average {load_before} at the start, {} at the end · {} · {}\n",
        chrono_now(),
        cpu_model(),
        load_average(),
        command_line(outrider.to_str().unwrap_or("outrider"), &["--version"]),
        command_line("ansible-playbook", &["--version"]),
    );
    r.push_str("| tool | hosts done | wall s | wall ÷ floor | SSH connections per host (max) | stage re-runs | sshd CPU s/host | client CPU s/host | peak RSS MiB | plan object writes |\n");
    r.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for o in runs {
        r.push_str(&format!(
            "| {} | {}/{hosts} | {:.1} | {:.2} | {} ({} in all) | {} | {:.4} | {} | {:.1} | {} |\n",
            o.label,
            o.complete_hosts,
            o.wall,
            o.wall / floor,
            o.connections_max,
            o.connections_total,
            o.repeated,
            o.sshd_cpu / hosts as f64,
            o.client_cpu
                .map_or("—".into(), |c| format!("{:.3}", c / hosts as f64)),
            o.peak_rss_kib as f64 / 1024.0,
            o.plan_writes.map_or("—".into(), |w| w.to_string()),
        ));
    }
    if let [a, b] = runs {
        let _ = writeln!(
            r,
            "\noutrider is **{:.2}×** faster than ansible-playbook; floor {floor:.1} s.",
            b.wall / a.wall
        );
    }
    let _ = writeln!(
        r,
        "\nFloor: sshd {per_host:.4} s CPU per host for the three stages over one connection \
         (measured first: `outrider plan run`, maxParallel {CALIBRATION_PARALLEL}, {} hosts) \
         × {hosts} hosts ÷ {cores} cores = **{floor:.1} s**. outrider's wall time runs from `kubectl apply` \
         of the plan to the watch seeing phase Succeeded, through the controller and the API server; its \
         peak RSS is the controller's VmHWM (client CPU is not separated from the control plane's). \
         Plan object writes: distinct resourceVersions the watch saw (the finalizer, then status writes, \
         coalesced to ≤ 4/s). Connections per host come from `$SSH_CONNECTION` logged by every stage.",
        CALIBRATION_HOSTS.min(hosts)
    );
    r
}

fn chrono_now() -> String {
    command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
}
