//! HealthCheck host checks against a real sshd: a disk check on a real (small) tmpfs
//! crossing its threshold, thresholds and hysteresis over rounds on kept-open connections,
//! an unreachable host, and `outrider check run` as a user runs it.
//! Run as root (CI is): the tmpfs is mounted and sshd switches users.

#[path = "support/sshd.rs"]
mod sshd;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use outrider::api::health_check::Check;
use outrider::engine::health::Outcome;
use outrider::engine::health::baseline::Baselines;
use outrider::engine::health::evaluate::{Evaluator, Policy, State};
use outrider::engine::health::host::HostChecks;
use outrider::engine::health::pool::Pool;
use outrider::engine::health::round::Checker;
use outrider::ssh::{ClientConfig, Credentials, Endpoint, Fleet};

/// The unprivileged login of the test sshd (its shell reads no rc files).
const USER: &str = "outrider-nosudo";

/// A 1 MiB tmpfs mounted for the test, unmounted on drop.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // the unprivileged test user must reach the mount point to statfs it
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let path = dir.path().join("small");
        std::fs::create_dir(&path).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m,mode=0755", "outrider-test"])
            .arg(&path)
            .output()
            .expect("run mount (util-linux)");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (CI runs tests as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { path, _dir: dir }
    }

    fn fill(&self, kib: usize) {
        std::fs::write(self.path.join("fill"), vec![7u8; kib * 1024]).expect("fill the tmpfs");
    }

    fn empty(&self) {
        let _ = std::fs::remove_file(self.path.join("fill"));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

fn checks(yaml: &str) -> HostChecks {
    let specs: Vec<Check> = serde_yaml::from_str(yaml).expect("checks");
    HostChecks::new(&specs).expect("valid checks")
}

fn fleet(server: &sshd::Sshd, keys: &Path, addrs: &[&str]) -> Fleet {
    let (private_key, public_key) = sshd::user_key(keys, "ed25519", None, "openssh");
    server.authorize(USER, &public_key);
    let credentials =
        Credentials::new(&private_key, None, &server.known_hosts_for(addrs)).expect("credentials");
    Fleet::new(ClientConfig::new(USER), credentials)
}

fn evaluator(fail: u32, ok: u32) -> Evaluator {
    Evaluator::new(
        Policy {
            failure_threshold: fail,
            success_threshold: ok,
            baseline: None,
        },
        Baselines::new(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_flips_unhealthy_after_failure_threshold_rounds_and_back_after_success_threshold_on_one_connection_per_host()
 {
    let server = sshd::Sshd::start();
    let keys = tempfile::tempdir().expect("tempdir");
    let addrs = ["127.0.42.1", "127.0.42.2", "127.0.42.3"];
    let fleet = fleet(&server, keys.path(), &addrs);
    let disk = Tmpfs::mount();
    let hosts: Vec<Endpoint> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| Endpoint::new(format!("web-{i}"), *a, server.port))
        .collect();
    let hc = checks(&format!(
        "- {{name: small, disk: {{path: {}, maxUsedPercent: 50}}}}\n\
         - {{name: mem, memory: {{maxUsedPercent: 100}}}}\n\
         - {{name: sshd, process: {{name: sshd}}}}",
        disk.path.display()
    ));
    let mut checker = Checker::new(
        hc,
        Vec::new(),
        hosts,
        Some(Pool::new(fleet)),
        evaluator(2, 2),
    );
    let round = Duration::from_secs(30);
    let state = |c: &Checker, host: &str| c.evaluator.state(host, "small");

    let r1 = checker.round(round, false).await;
    assert_eq!(r1.counts(), (9, 0, 0), "{:#?}", r1.probed);
    assert!(
        r1.transitions.is_empty(),
        "a fresh healthy target is no news"
    );
    assert_eq!(state(&checker, "web-0"), State::Healthy);

    disk.fill(800);
    let r2 = checker.round(round, false).await;
    let small: Vec<_> = r2.probed.iter().filter(|p| p.check == "small").collect();
    assert!(
        small.iter().all(|p| p.observation.outcome == Outcome::Fail),
        "{small:#?}"
    );
    let msg = &small[0].observation.message;
    assert!(msg.contains("% used (limit 50%)"), "{msg}");
    assert!(small[0].observation.value.is_some_and(|v| v > 50.0));
    assert!(
        r2.transitions.is_empty(),
        "one failure is below failureThreshold 2"
    );
    assert_eq!(state(&checker, "web-0"), State::Healthy);

    let r3 = checker.round(round, false).await;
    assert_eq!(r3.transitions.len(), 3, "{:#?}", r3.transitions);
    assert!(
        r3.transitions
            .iter()
            .all(|t| t.to == State::Unhealthy && t.check == "small")
    );
    assert_eq!(checker.evaluator.unhealthy_hosts().len(), 3);

    disk.empty();
    let r4 = checker.round(round, false).await;
    assert!(
        r4.transitions.is_empty(),
        "one success is below successThreshold 2"
    );
    let r5 = checker.round(round, false).await;
    assert_eq!(r5.transitions.len(), 3);
    assert!(r5.transitions.iter().all(|t| t.to == State::Healthy));

    // five rounds, three checks each, on the three connections of the first round
    assert_eq!(
        checker.handshakes(),
        3,
        "one SSH connection per host, kept open"
    );
    checker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_host_is_unknown_with_the_reason_and_is_not_redialled_every_round() {
    let server = sshd::Sshd::start();
    let keys = tempfile::tempdir().expect("tempdir");
    let fleet = fleet(&server, keys.path(), &["127.0.42.9"]);
    // a closed loopback port: refused at once
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let hosts = vec![
        Endpoint::new("up", "127.0.42.9", server.port),
        Endpoint::new("down", "127.0.0.1", port),
    ];
    let hc = checks("- {name: mem, memory: {maxUsedPercent: 100}}");
    let mut checker = Checker::new(
        hc,
        Vec::new(),
        hosts,
        Some(Pool::new(fleet)),
        evaluator(2, 1),
    );
    let r1 = checker.round(Duration::from_secs(10), false).await;
    let down = r1
        .probed
        .iter()
        .find(|p| p.target == "down")
        .expect("down probed");
    assert_eq!(down.observation.outcome, Outcome::Unknown);
    assert!(
        down.observation.message.contains("unreachable"),
        "{}",
        down.observation.message
    );
    let dialled = checker.handshakes();
    let r2 = checker.round(Duration::from_secs(10), false).await;
    let down = r2
        .probed
        .iter()
        .find(|p| p.target == "down")
        .expect("down probed");
    assert!(
        down.observation.message.contains("next attempt in"),
        "{}",
        down.observation.message
    );
    assert_eq!(
        checker.handshakes(),
        dialled,
        "backoff: no new dial in the next round"
    );
    assert_eq!(checker.evaluator.state("down", "mem"), State::Unknown);
    assert_eq!(checker.evaluator.state("up", "mem"), State::Healthy);
    checker.close().await;
}

#[test]
fn check_run_prints_each_rounds_table_and_exits_by_the_final_states() {
    let server = sshd::Sshd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let (private_key, public_key) = sshd::user_key(dir.path(), "ed25519", None, "openssh");
    server.authorize(USER, &public_key);
    let secret = dir.path().join("secret");
    std::fs::create_dir(&secret).expect("secret dir");
    std::fs::write(secret.join("ssh-privatekey"), &private_key).expect("key");
    std::fs::write(
        secret.join("known_hosts"),
        server.known_hosts_for(&["127.0.42.20"]),
    )
    .expect("known_hosts");
    let inv = dir.path().join("inv.yaml");
    std::fs::write(
        &inv,
        format!(
            "apiVersion: outrider.dev/v1alpha1\nkind: Inventory\nmetadata: {{name: lab}}\n\
             spec:\n  ssh: {{user: {USER}, port: {}, secretRef: {{name: lab-ssh}}}}\n  \
             hosts: [{{name: lab-1, address: 127.0.42.20}}]\n",
            server.port
        ),
    )
    .expect("inventory");
    let hc = dir.path().join("hc.yaml");
    let write_hc = |extra: &str| {
        std::fs::write(
            &hc,
            format!(
                "apiVersion: outrider.dev/v1alpha1\nkind: HealthCheck\nmetadata: {{name: lab}}\n\
                 spec:\n  targets: {{inventoryRef: {{name: lab}}}}\n  failureThreshold: 2\n  checks:\n    \
                 - {{name: root, disk: {{path: /, maxUsedPercent: 100}}}}\n    \
                 - {{name: load, load: {{maxPerCore: 1000}}}}\n{extra}"
            ),
        )
        .expect("hc")
    };
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_outrider"))
            .args(["check", "run", "--rounds", "2", "--interval", "200ms", "-f"])
            .arg(&hc)
            .arg("--inventory")
            .arg(&inv)
            .arg("--secret-dir")
            .arg(&secret)
            .output()
            .expect("run outrider")
    };
    write_hc("");
    let out = run();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("round 1: 2 passed, 0 failed, 0 unknown"),
        "{stdout}"
    );
    assert!(stdout.contains("round 2: 2 passed"), "{stdout}");
    assert!(
        stdout.contains("lab-1") && stdout.contains("/ is "),
        "{stdout}"
    );

    write_hc("    - {name: broken, exec: {command: [sh, -c, 'echo down; exit 3']}}\n");
    let out = run();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(stdout.contains("exited 3, expected 0: down"), "{stdout}");
    assert!(
        stdout.contains("lab-1/broken: Pending -> Unhealthy"),
        "{stdout}"
    );
}
