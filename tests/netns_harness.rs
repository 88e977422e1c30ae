//! Proves the firewall test hosts (tests/support/netns.rs): SSH into a namespace host with the
//! system OpenSSH client, nftables inside a host filtering by source, per-host state tmpfs, and
//! cleanup on drop, on SIGKILL of the owning test process, and of a dead run's leftovers.
//! Needs root, iproute2, util-linux, python3, nftables, openssh and the test users: run
//! e2e/deps.sh as root first. All traffic stays on the veths (198.18.0.0/15).

#[path = "support/sshd.rs"]
mod sshd;

#[path = "support/netns.rs"]
mod netns;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use netns::NetnsHost;

/// Long enough for a loaded machine to complete a handshake over a veth.
const OPEN: Duration = Duration::from_secs(3);
/// How long a dropped SYN is waited for before the port counts as blocked.
const BLOCKED: Duration = Duration::from_secs(1);

/// A user key authorized for `user` on `host` and a known_hosts file pinning the host.
struct Client {
    dir: tempfile::TempDir,
}

impl Client {
    fn new(host: &NetnsHost, user: &str) -> Client {
        let dir = tempfile::tempdir().unwrap();
        let (private, public) = sshd::user_key(dir.path(), "ed25519", None, "openssh");
        host.sshd.authorize(user, &public);
        let key = dir.path().join("key");
        std::fs::write(&key, private).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(dir.path().join("known_hosts"), host.known_hosts()).unwrap();
        Client { dir }
    }

    /// `ssh -b <from> <user>@<host.addr> <remote_command>` (port 22, strict host key checking).
    fn ssh(&self, host: &NetnsHost, from: Ipv4Addr, user: &str, remote_command: &str) -> Output {
        Command::new("ssh")
            .args(["-F", "/dev/null"])
            .args(["-o", "BatchMode=yes"])
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                self.dir.path().join("known_hosts").display()
            ))
            .args(["-o", "GlobalKnownHostsFile=/dev/null"])
            .args(["-o", "StrictHostKeyChecking=yes"])
            .args(["-o", "IdentitiesOnly=yes"])
            .args(["-o", "ConnectTimeout=20"])
            .args(["-o", "ServerAliveInterval=5"])
            .args(["-o", "LogLevel=ERROR"])
            .arg("-i")
            .arg(self.dir.path().join("key"))
            .arg("-b")
            .arg(from.to_string())
            .arg(format!("{user}@{}", host.addr))
            .arg(remote_command)
            .stdin(Stdio::null())
            .output()
            .expect("run ssh (openssh-client)")
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `argv` in the host and panics with its output unless it succeeds; returns stdout.
fn exec_ok(host: &NetnsHost, argv: &[&str]) -> String {
    let out = host.exec(argv);
    assert!(
        out.status.success(),
        "{argv:?} in {}: {}\nstdout: {}\nstderr: {}",
        host.netns,
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Whether `path` is a mount point in this process's mount namespace.
fn is_mount_point(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|line| line.split_whitespace().nth(4) == Some(path))
}

/// The interface index of a root-namespace link, if it exists. Another test process may take a
/// freed slot at once and create a veth of the same name: an index is never reused that soon.
fn ifindex(link: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/class/net/{link}/ifindex"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// A process alive and not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|close| stat[close + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

#[test]
fn namespace_host_accepts_ssh_and_listens_on_its_ports() {
    let host = NetnsHost::start(&[8080, 9090]);
    assert_eq!(host.addr, Ipv4Addr::new(198, 18, host.slot, 2));
    assert_eq!(
        host.netns,
        format!("ortest-{}-{}", std::process::id(), host.slot)
    );
    let client = Client::new(&host, "outrider-sudo");

    let out = client.ssh(
        &host,
        host.operator,
        "outrider-sudo",
        "echo \"$SSH_CONNECTION\"; sudo -n nft list ruleset",
    );
    assert!(
        out.status.success(),
        "ssh: {}\nstderr: {}\nsshd log:\n{}",
        out.status,
        text(&out.stderr),
        host.sshd.log()
    );
    let stdout = text(&out.stdout);
    let connection: Vec<&str> = stdout.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        connection,
        [
            host.operator.to_string().as_str(),
            connection[1],
            host.addr.to_string().as_str(),
            "22"
        ],
        "$SSH_CONNECTION: the session runs in the namespace and sees the operator address"
    );

    // The second root-side source is let in by sshd too (only a firewall can tell them apart).
    let out = client.ssh(&host, host.other, "outrider-sudo", "true");
    assert!(
        out.status.success(),
        "ssh from other: {}",
        text(&out.stderr)
    );

    for port in [8080, 9090] {
        assert!(host.tcp_open(host.operator, port, OPEN), "port {port}");
        assert!(host.tcp_open(host.other, port, OPEN), "port {port}");
    }
    assert!(
        !host.tcp_open(host.operator, 8081, OPEN),
        "nothing listens on 8081"
    );
}

#[test]
fn nftables_drop_inside_a_namespace_host_blocks_only_that_source() {
    let host = NetnsHost::start(&[7001, 7002]);
    let other = host.other.to_string();
    exec_ok(&host, &["nft", "add", "table", "inet", "netns_harness"]);
    exec_ok(
        &host,
        &[
            "nft",
            "add",
            "chain",
            "inet",
            "netns_harness",
            "c",
            "{ type filter hook input priority 0; policy accept; }",
        ],
    );
    exec_ok(
        &host,
        &[
            "nft",
            "add",
            "rule",
            "inet",
            "netns_harness",
            "c",
            "ip",
            "saddr",
            &other,
            "tcp",
            "dport",
            "7001",
            "drop",
        ],
    );

    assert!(host.tcp_open(host.operator, 7001, OPEN));
    let started = Instant::now();
    assert!(!host.tcp_open(host.other, 7001, BLOCKED));
    // (socket2 rounds the poll timeout down to whole milliseconds: allow for that.)
    assert!(
        started.elapsed() >= BLOCKED * 9 / 10,
        "a dropped SYN times out rather than being refused: {:?}",
        started.elapsed()
    );
    assert!(host.tcp_open(host.other, 7002, OPEN));
    assert!(host.tcp_open(host.operator, 7002, OPEN));

    // The ruleset lives in the host's namespace only.
    let root = Command::new("nft")
        .args(["list", "table", "inet", "netns_harness"])
        .output()
        .expect("run nft");
    assert!(
        !root.status.success(),
        "the host's table shows in the root namespace: {}",
        text(&root.stdout)
    );
}

#[test]
fn each_host_has_its_own_state_tmpfs() {
    let a = NetnsHost::start(&[]);
    let b = NetnsHost::start(&[]);
    assert_ne!(a.slot, b.slot);
    for host in [&a, &b] {
        assert_eq!(
            exec_ok(host, &["stat", "-f", "-c", "%T", "/var/lib/outrider"]).trim(),
            "tmpfs"
        );
    }
    exec_ok(&a, &["sh", "-c", "echo a > /var/lib/outrider/marker"]);
    assert_eq!(exec_ok(&a, &["cat", "/var/lib/outrider/marker"]), "a\n");

    // The host's SSH sessions see the same tmpfs as exec does, both ways.
    let client = Client::new(&a, "outrider-sudo");
    let out = client.ssh(
        &a,
        a.operator,
        "outrider-sudo",
        "cat /var/lib/outrider/marker && sudo -n sh -c 'echo s > /var/lib/outrider/from-ssh'",
    );
    assert!(out.status.success(), "ssh: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "a\n");
    assert_eq!(exec_ok(&a, &["cat", "/var/lib/outrider/from-ssh"]), "s\n");

    for file in ["marker", "from-ssh"] {
        let path = format!("/var/lib/outrider/{file}");
        let out = b.exec(&["test", "-e", &path]);
        assert!(!out.status.success(), "{path} of host a shows on host b");
        assert!(
            !Path::new(&path).exists(),
            "{path} shows in the root namespace"
        );
    }
    assert!(
        !is_mount_point("/var/lib/outrider"),
        "a host's tmpfs leaked into the root mount namespace"
    );
}

#[test]
fn dropped_host_leaves_no_namespace_or_veth() {
    let host = NetnsHost::start(&[7100]);
    let name = host.netns.clone();
    let veth = host.veth.clone();
    let sshd_pid = host.sshd.pid();
    let listener_pid = host.listener_pid().unwrap();
    let sshd_dir = host.sshd.dir.path().to_owned();
    // A session that would keep the namespace alive if drop left it behind.
    let client = Client::new(&host, "outrider-nosudo");
    let mut session = Command::new("ssh")
        .args(["-F", "/dev/null", "-o", "BatchMode=yes", "-o"])
        .arg(format!(
            "UserKnownHostsFile={}",
            client.dir.path().join("known_hosts").display()
        ))
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .arg("-i")
        .arg(client.dir.path().join("key"))
        .arg(format!("outrider-nosudo@{}", host.addr))
        .arg("echo started; exec sleep 3175")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = [0u8; 8];
    session
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    assert_eq!(&first, b"started\n");
    assert!(netns::netns_names().contains(&name));
    let index = ifindex(&veth);
    assert!(index.is_some(), "no veth {veth}");

    drop(host);

    assert!(
        !netns::netns_names().contains(&name),
        "namespace {name} still listed"
    );
    assert_ne!(ifindex(&veth), index, "veth {veth} still exists");
    assert!(!alive(sshd_pid), "sshd {sshd_pid} still runs");
    assert!(!alive(listener_pid), "listener {listener_pid} still runs");
    assert!(!sshd_dir.exists(), "{} still exists", sshd_dir.display());
    let deadline = Instant::now() + Duration::from_secs(10);
    while session.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = session.kill();
            panic!("the ssh session survived its host");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn leftover_namespace_of_a_dead_test_process_is_swept_by_the_next_start() {
    // A pid that no longer exists: a finished (and reaped) child's.
    let mut gone = Command::new("true").spawn().unwrap();
    let dead_pid = gone.id();
    gone.wait().unwrap();
    assert!(!Path::new(&format!("/proc/{dead_pid}")).exists());
    // Slots 251..=255 are outside the range NetnsHost allocates from; other processes running
    // this test may hold some of them.
    let (name, veth) = (251..=255u8)
        .find_map(|slot| {
            let name = format!("ortest-{dead_pid}-{slot}");
            let veth = format!("ortv{slot}");
            run_ok(Command::new("ip").args(["netns", "add", &name]));
            let out = Command::new("ip")
                .args(["link", "add", &veth, "type", "veth"])
                .args(["peer", "name", "eth0", "netns", &name])
                .output()
                .unwrap();
            if out.status.success() {
                return Some((name, veth));
            }
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
            None
        })
        .expect("a free veth name among ortv251..=ortv255");
    let guard = Leftover(name.clone());
    let index = ifindex(&veth);
    let mut squatter = Command::new("ip")
        .args(["netns", "exec", &name, "sleep", "3174"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();

    let host = NetnsHost::start(&[]);

    assert!(
        !netns::netns_names().contains(&name),
        "leftover namespace {name} survived the sweep"
    );
    assert_ne!(ifindex(&veth), index, "leftover veth {veth} survived");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = squatter.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = squatter.kill();
            panic!("the process in the leftover namespace survived the sweep");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.signal(), Some(9), "{status}");
    drop(host);
    drop(guard);
}

/// Deletes a hand-made leftover namespace (its veth from the inside, which takes the other end
/// along) if the test fails before the sweep does.
struct Leftover(String);

impl Drop for Leftover {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["-n", &self.0, "link", "del", "eth0"])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Set in the copy of this test binary that plays the owning test process.
const OWNER_ENV: &str = "OUTRIDER_NETNS_HARNESS_OWNER";
const OWNER_TEST: &str = "namespace_host_goes_when_its_owning_test_process_is_killed";
const OWNER_LINE: &str = "netns-owner:";

/// Kills the owner process if the test fails before it does.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The owner role, run in a copy of this test binary: starts a host, reports it and waits to be
/// killed. Never returns, so it never passes as a test of its own.
fn act_as_owner_until_killed() -> ! {
    let host = NetnsHost::start(&[7200]);
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{OWNER_LINE} {} {} {} {}",
        host.netns,
        host.veth,
        host.sshd.pid(),
        host.listener_pid().unwrap()
    )
    .unwrap();
    out.flush().unwrap();
    drop(out);
    std::thread::sleep(Duration::from_secs(120));
    panic!("the owner role was not killed within 120 s");
}

#[test]
fn namespace_host_goes_when_its_owning_test_process_is_killed() {
    if std::env::var_os(OWNER_ENV).is_some() {
        act_as_owner_until_killed();
    }
    let owner = Command::new(std::env::current_exe().unwrap())
        .args([OWNER_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(OWNER_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("re-run this test binary as the owner");
    let mut owner = KillOnDrop(owner);
    let stdout = owner.0.stdout.take().unwrap();
    let mut stderr = owner.0.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some((_, report)) = line.split_once(OWNER_LINE) {
                let _ = tx.send(report.to_owned());
            }
        }
    });
    let report = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(report) => report,
        Err(e) => {
            drop(owner);
            panic!(
                "the owner reported no host ({e}); its stderr:\n{}",
                errors.join().unwrap()
            );
        }
    };
    let fields: Vec<&str> = report.split_whitespace().collect();
    assert_eq!(fields.len(), 4, "owner report {report:?}");
    let (name, veth) = (fields[0].to_owned(), fields[1].to_owned());
    let pids: Vec<u32> = fields[2..].iter().map(|p| p.parse().unwrap()).collect();
    assert!(netns::netns_names().contains(&name));
    let index = ifindex(&veth);
    assert!(index.is_some(), "no veth {veth}");
    assert!(pids.iter().all(|&pid| alive(pid)));

    // SIGKILL: no destructor runs in the owner.
    owner.0.kill().unwrap();
    let status = owner.0.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{status}");

    let deadline = Instant::now() + Duration::from_secs(10);
    let leftovers = loop {
        let mut left: Vec<String> = pids
            .iter()
            .filter(|&&pid| alive(pid))
            .map(|pid| format!("process {pid}"))
            .collect();
        if netns::netns_names().contains(&name) {
            left.push(format!("namespace {name}"));
        }
        if ifindex(&veth) == index {
            left.push(format!("veth {veth}"));
        }
        if left.is_empty() || Instant::now() >= deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if !leftovers.is_empty() {
        // Do not leak them past this failure.
        let _ = Command::new("kill")
            .arg("-KILL")
            .args(pids.iter().map(u32::to_string))
            .status();
        let _ = Command::new("ip")
            .args(["-n", &name, "link", "del", "eth0"])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        panic!("10 s after the owner was SIGKILLed, still there: {leftovers:?}");
    }
}
