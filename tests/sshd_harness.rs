//! Proves the real-OpenSSH test harness (tests/support/sshd.rs) with the system OpenSSH client.
//! Needs root, `/usr/sbin/sshd`, `ssh` and the test users: run e2e/deps.sh as root first.

#[path = "support/sshd.rs"]
mod sshd;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sshd::{Sshd, user_key};

const SSH_TIMEOUT: Duration = Duration::from_secs(60);

struct Client {
    _dir: tempfile::TempDir,
    key: PathBuf,
    known_hosts: PathBuf,
}

/// A key authorized for `users` and a known_hosts file pinning `addrs` to `server`.
fn client(server: &Sshd, users: &[&str], addrs: &[&str]) -> Client {
    let dir = tempfile::tempdir().unwrap();
    let (_, public) = user_key(dir.path(), "ed25519", None, "openssh");
    for user in users {
        server.authorize(user, &public);
    }
    let key = dir.path().join(find_private_key(dir.path()));
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(&known_hosts, server.known_hosts_for(addrs)).unwrap();
    Client {
        _dir: dir,
        key,
        known_hosts,
    }
}

fn find_private_key(dir: &Path) -> String {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("id_") && !name.ends_with(".pub"))
        .expect("a private key in the key dir")
}

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn ssh_command(server: &Sshd, key: &Path, known_hosts: &Path, target: &str) -> Command {
    ssh_command_to_port(server.port, key, known_hosts, target)
}

fn ssh_command_to_port(port: u16, key: &Path, known_hosts: &Path, target: &str) -> Command {
    let mut cmd = Command::new("ssh");
    cmd.arg("-F")
        .arg("/dev/null")
        .args(["-o", "BatchMode=yes"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args(["-o", "GlobalKnownHostsFile=/dev/null"])
        .args(["-o", "StrictHostKeyChecking=yes"])
        .args(["-o", "IdentitiesOnly=yes"])
        .args(["-o", "ConnectTimeout=20"])
        .args(["-o", "LogLevel=ERROR"])
        .arg("-i")
        .arg(key)
        .arg("-p")
        .arg(port.to_string())
        .arg(target);
    cmd
}

/// Runs `ssh user@addr remote_command`, killing ssh if it takes longer than a minute.
fn ssh(server: &Sshd, c: &Client, user: &str, addr: &str, remote_command: &str) -> Outcome {
    let mut cmd = ssh_command(server, &c.key, &c.known_hosts, &format!("{user}@{addr}"));
    cmd.arg(remote_command);
    run(cmd)
}

fn run(mut cmd: Command) -> Outcome {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ssh (openssh-client)");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + SSH_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let status = child.wait().unwrap();
            panic!(
                "ssh still running after {SSH_TIMEOUT:?} (killed: {status}); stderr: {}",
                err.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Outcome {
        code: status.code(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

#[test]
fn ssh_connection_names_the_dialled_loopback_address_as_the_host() {
    let server = Sshd::start();
    let c = client(&server, &["root"], &["127.0.10.7"]);
    let out = ssh(&server, &c, "root", "127.0.10.7", "echo $SSH_CONNECTION");
    assert_eq!(
        out.code,
        Some(0),
        "stderr: {}\nsshd log:\n{}",
        out.stderr,
        server.log()
    );
    let line = out.stdout.trim();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields.len(), 4, "SSH_CONNECTION = {line:?}");
    assert_eq!(fields[2], "127.0.10.7", "SSH_CONNECTION = {line:?}");
    assert_eq!(
        fields[3],
        server.port.to_string(),
        "SSH_CONNECTION = {line:?}"
    );
    assert!(
        server.log().contains("Accepted publickey for root"),
        "sshd log:\n{}",
        server.log()
    );
}

#[test]
fn sudo_user_has_passwordless_sudo_and_nosudo_user_is_refused() {
    let server = Sshd::start();
    let c = client(
        &server,
        &["outrider-sudo", "outrider-nosudo"],
        &["127.0.10.21"],
    );

    let sudo = ssh(
        &server,
        &c,
        "outrider-sudo",
        "127.0.10.21",
        "id -un && sudo -n id -u",
    );
    assert_eq!(sudo.code, Some(0), "stderr: {}", sudo.stderr);
    assert_eq!(sudo.stdout, "outrider-sudo\n0\n");

    let nosudo = ssh(
        &server,
        &c,
        "outrider-nosudo",
        "127.0.10.21",
        "id -un; sudo -n true",
    );
    assert_eq!(
        nosudo.stdout, "outrider-nosudo\n",
        "stderr: {}",
        nosudo.stderr
    );
    assert!(
        matches!(nosudo.code, Some(code) if code != 0 && code != 255),
        "sudo -n true must fail on the host, not the connection: {:?}, stderr: {}",
        nosudo.code,
        nosudo.stderr
    );
    assert!(
        nosudo.stderr.contains("sudo"),
        "expected sudo's refusal, stderr: {}",
        nosudo.stderr
    );
}

#[test]
fn fifty_concurrent_connections_to_fifty_addresses_all_succeed() {
    let server = Sshd::start();
    let addrs: Vec<String> = (1..=50).map(|i| format!("127.0.10.{i}")).collect();
    let addr_refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let c = client(&server, &["root"], &addr_refs);

    // All 50 ssh processes start before any is awaited.
    let handles: Vec<_> = addrs
        .iter()
        .map(|addr| {
            let mut cmd = ssh_command(&server, &c.key, &c.known_hosts, &format!("root@{addr}"));
            cmd.arg("echo $SSH_CONNECTION");
            std::thread::spawn(move || run(cmd))
        })
        .collect();

    let mut failures = Vec::new();
    for (addr, handle) in addrs.iter().zip(handles) {
        let out = handle.join().unwrap();
        let host = out
            .stdout
            .split_whitespace()
            .nth(2)
            .unwrap_or("")
            .to_owned();
        if out.code != Some(0) || &host != addr {
            failures.push(format!(
                "{addr}: exit {:?}, stdout {:?}, stderr {:?}",
                out.code, out.stdout, out.stderr
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 50 failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn cpu_seconds_grows_after_connections() {
    let server = Sshd::start();
    let c = client(&server, &["root"], &["127.0.10.30"]);
    let before = server.cpu_seconds();
    for _ in 0..10 {
        let out = ssh(&server, &c, "root", "127.0.10.30", "true");
        assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    }
    // sshd counts a connection's CPU when it reaps the connection's process: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut after = server.cpu_seconds();
    while after <= before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        after = server.cpu_seconds();
    }
    assert!(
        after > before,
        "cpu_seconds did not grow: {before} -> {after}"
    );
}

#[test]
fn host_key_not_in_known_hosts_is_refused_under_strict_checking() {
    let server = Sshd::start();
    // Pinned for .40 only: .41 presents the same keys, but under a name known_hosts lacks.
    let c = client(&server, &["root"], &["127.0.10.40"]);
    let ok = ssh(&server, &c, "root", "127.0.10.40", "true");
    assert_eq!(ok.code, Some(0), "stderr: {}", ok.stderr);
    let refused = ssh(&server, &c, "root", "127.0.10.41", "true");
    assert_eq!(refused.code, Some(255), "stderr: {}", refused.stderr);
    assert!(
        refused.stderr.contains("Host key verification failed"),
        "stderr: {}",
        refused.stderr
    );

    // A different key of the same type for .40: a mismatch, refused.
    let other = Sshd::start();
    let wrong = other.known_hosts_for(&["127.0.10.40"]);
    std::fs::write(&c.known_hosts, wrong).unwrap();
    let mismatch = ssh(&server, &c, "root", "127.0.10.40", "true");
    assert_eq!(mismatch.code, Some(255), "stderr: {}", mismatch.stderr);
    assert_ne!(server.host_public_keys(), other.host_public_keys());
    assert_eq!(server.host_public_keys().len(), 3);
}

#[test]
fn user_keys_of_every_kind_and_format_log_in() {
    let server = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(&known_hosts, server.known_hosts_for(&["127.0.10.50"])).unwrap();
    for kind in ["ed25519", "ecdsa", "rsa"] {
        for format in ["openssh", "pem"] {
            let key_dir = tempfile::tempdir().unwrap();
            let (private, public) = user_key(key_dir.path(), kind, None, format);
            let header = private.lines().next().unwrap_or("");
            let expected = match (kind, format) {
                ("rsa", "pem") => "-----BEGIN RSA PRIVATE KEY-----",
                ("ecdsa", "pem") => "-----BEGIN EC PRIVATE KEY-----",
                _ => "-----BEGIN OPENSSH PRIVATE KEY-----",
            };
            assert_eq!(header, expected, "{kind}/{format}");
            server.authorize("outrider-nosudo", &public);
            let key = key_dir.path().join(find_private_key(key_dir.path()));
            let mut cmd = ssh_command(&server, &key, &known_hosts, "outrider-nosudo@127.0.10.50");
            cmd.arg("id -un");
            let out = run(cmd);
            assert_eq!(out.code, Some(0), "{kind}/{format}: stderr: {}", out.stderr);
            assert_eq!(out.stdout, "outrider-nosudo\n", "{kind}/{format}");
        }
    }
}

#[test]
fn passphrase_protected_user_key_needs_its_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let (private, public) = user_key(dir.path(), "rsa", Some("s3cret"), "pem");
    assert!(private.contains("ENCRYPTED"), "{private}");
    let key = dir.path().join(find_private_key(dir.path()));
    let derive = |pass: &str| {
        Command::new("ssh-keygen")
            .args(["-y", "-P", pass, "-f"])
            .arg(&key)
            .output()
            .unwrap()
    };
    let right = derive("s3cret");
    assert!(right.status.success());
    assert_eq!(String::from_utf8_lossy(&right.stdout).trim(), public);
    assert!(!derive("wrong").status.success());
}

#[test]
fn extra_config_is_applied() {
    // Default: a requested TTY is granted.
    let server = Sshd::start();
    let c = client(&server, &["root"], &["127.0.10.60"]);
    let mut cmd = ssh_command(&server, &c.key, &c.known_hosts, "root@127.0.10.60");
    cmd.args(["-tt", "tty"]);
    let out = run(cmd);
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert!(out.stdout.starts_with("/dev/pts/"), "{:?}", out.stdout);

    // PermitTTY no: sshd refuses the TTY.
    let server = Sshd::start_with("PermitTTY no\n");
    let c = client(&server, &["root"], &["127.0.10.60"]);
    let mut cmd = ssh_command(&server, &c.key, &c.known_hosts, "root@127.0.10.60");
    cmd.args(["-tt", "tty"]);
    let out = run(cmd);
    assert!(
        out.stderr.contains("PTY allocation request failed"),
        "exit {:?}, stdout {:?}, stderr {:?}",
        out.code,
        out.stdout,
        out.stderr
    );

    // An option this harness sets (MaxSessions 1000) is replaced, not doubled (some options
    // keep the last value sshd reads), and Match blocks work.
    let server = Sshd::start_with("MaxSessions 7\nMatch User outrider-nosudo\n    PermitTTY no\n");
    let config = std::fs::read_to_string(server.dir.path().join("sshd_config")).unwrap();
    assert!(config.contains("MaxSessions 7\n"), "{config}");
    assert!(!config.contains("MaxSessions 1000"), "{config}");
    assert!(
        config.find("Match User").unwrap() > config.find("Subsystem").unwrap(),
        "{config}"
    );
}

#[test]
fn dropping_sshd_kills_it_and_its_open_sessions() {
    let server = Sshd::start();
    let c = client(&server, &["root"], &["127.0.10.70"]);
    let port = server.port;
    let pid = server.pid();
    // A session that would outlive the test if Drop left sshd's connection processes behind.
    let mut cmd = ssh_command(&server, &c.key, &c.known_hosts, "root@127.0.10.70");
    cmd.arg("echo started; exec sleep 3171");
    let mut session = cmd
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

    drop(server);

    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "sshd {pid} still exists"
    );
    // The ssh client sees its connection die.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = session.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = session.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.is_some(), "the session survived sshd's drop");
    let deadline = Instant::now() + Duration::from_secs(5);
    while sleeper_running() {
        assert!(
            Instant::now() < deadline,
            "the remote command (sleep 3171) outlived sshd"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port {port} still accepts connections"
    );
}

fn sleeper_running() -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        std::fs::read(entry.path().join("cmdline"))
            .map(|cmdline| cmdline == b"sleep\x003171\x00")
            .unwrap_or(false)
    })
}

fn sleeper_with_arg_running(arg: &str) -> bool {
    let cmdline = format!("sleep\0{arg}\0");
    std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        std::fs::read(entry.path().join("cmdline"))
            .map(|c| c == cmdline.as_bytes())
            .unwrap_or(false)
    })
}

/// Set (to a key dir) in the copy of this test binary that plays the owning test process.
const OWNER_ENV: &str = "OUTRIDER_SSHD_HARNESS_OWNER_KEYS";
const OWNER_TEST: &str = "sshd_dies_when_its_owning_test_process_is_killed";
const OWNER_LINE: &str = "sshd-owner:";

/// A process alive and not a zombie (a killed sshd reparented to an init that does not reap it
/// stays a zombie: it holds no socket and runs nothing).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|close| stat[close + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn parent_of(pid: u32) -> Option<u32> {
    sshd::process_table()
        .into_iter()
        .find(|&(p, _)| p == pid)
        .map(|(_, ppid)| ppid)
}

/// Kills the owner process if the test fails before it does.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The owner role, run in a copy of this test binary: starts an sshd, authorizes the key in
/// `keys`, writes known_hosts there, reports pid, port and dir, and waits to be killed. Never
/// returns, so it never passes as a test of its own.
fn act_as_owner_until_killed(keys: &Path) -> ! {
    let server = Sshd::start();
    let public = std::fs::read_to_string(keys.join("owner_key.pub")).expect("read owner_key.pub");
    server.authorize("outrider-nosudo", &public);
    std::fs::write(
        keys.join("known_hosts"),
        server.known_hosts_for(&["127.0.10.80"]),
    )
    .expect("write known_hosts");
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{OWNER_LINE} {} {} {}",
        server.pid(),
        server.port,
        server.dir.path().display()
    )
    .unwrap();
    out.flush().unwrap();
    drop(out);
    std::thread::sleep(Duration::from_secs(120));
    panic!("the owner role was not killed within 120 s");
}

#[test]
fn sshd_dies_when_its_owning_test_process_is_killed() {
    if let Some(keys) = std::env::var_os(OWNER_ENV) {
        act_as_owner_until_killed(Path::new(&keys));
    }
    let keys = tempfile::tempdir().unwrap();
    let (_, public) = user_key(keys.path(), "ed25519", None, "openssh");
    std::fs::write(keys.path().join("owner_key.pub"), &public).unwrap();
    let key = keys.path().join(find_private_key(keys.path()));

    // The owner: this test binary again, running only this test, in the owner role.
    let owner = Command::new(std::env::current_exe().unwrap())
        .args([OWNER_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(OWNER_ENV, keys.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("re-run this test binary as the owner");
    let mut owner = KillOnDrop(owner);
    let owner_pid = owner.0.id();
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
            if let Some(report) = line.split_once(OWNER_LINE).map(|(_, r)| r.to_owned()) {
                let _ = tx.send(report);
            }
        }
    });
    let report = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(report) => report,
        Err(e) => {
            drop(owner);
            panic!(
                "the owner reported no sshd ({e}); its stderr:\n{}",
                errors.join().unwrap()
            );
        }
    };
    let fields: Vec<&str> = report.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "owner report {report:?}");
    let sshd_pid: u32 = fields[0].parse().unwrap();
    let port: u16 = fields[1].parse().unwrap();
    let dir = PathBuf::from(fields[2]);
    assert_eq!(
        parent_of(sshd_pid),
        Some(owner_pid),
        "the sshd must be a child of the owner"
    );
    assert!(dir.is_dir(), "{} missing", dir.display());

    // A connection with a running session, so that sshd has processes below it.
    let mut cmd = ssh_command_to_port(
        port,
        &key,
        &keys.path().join("known_hosts"),
        "outrider-nosudo@127.0.10.80",
    );
    cmd.arg("echo started; exec sleep 3172");
    let session = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut session = KillOnDrop(session);
    let mut first = [0u8; 8];
    let started = session.0.stdout.as_mut().unwrap().read_exact(&mut first);
    if started.is_err() || &first != b"started\n" {
        let mut err = String::new();
        let _ = session.0.stderr.as_mut().unwrap().read_to_string(&mut err);
        panic!("the session did not start ({started:?}, {first:?}); ssh stderr: {err}");
    }
    // "started" is printed before the shell execs sleep: wait for the exec, not just the echo
    let exec_deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !sleeper_with_arg_running("3172") && std::time::Instant::now() < exec_deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let tree = sshd::descendants(sshd_pid);
    assert!(
        sleeper_with_arg_running("3172") && tree.len() >= 2,
        "expected the connection and the session below sshd {sshd_pid}, found {tree:?}"
    );

    // SIGKILL: no destructor, no atexit handler, nothing in the owner runs.
    owner.0.kill().unwrap();
    let status = owner.0.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "{status}"
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    let leftovers = loop {
        let mut left: Vec<String> = std::iter::once(sshd_pid)
            .chain(tree.iter().copied())
            .filter(|&pid| alive(pid))
            .map(|pid| format!("process {pid}"))
            .collect();
        left.extend(
            sshd::descendants(sshd_pid)
                .into_iter()
                .filter(|&pid| alive(pid) && !tree.contains(&pid))
                .map(|pid| format!("new process {pid}")),
        );
        if sleeper_with_arg_running("3172") {
            left.push("the session's sleep 3172".to_owned());
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            left.push(format!("port {port} accepting connections"));
        }
        if dir.exists() {
            left.push(format!("temp dir {}", dir.display()));
        }
        if left.is_empty() || Instant::now() >= deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if !leftovers.is_empty() {
        // Do not leak them past this failure.
        let mut targets: Vec<String> = sshd::descendants(sshd_pid)
            .iter()
            .chain(tree.iter())
            .map(u32::to_string)
            .collect();
        targets.push(sshd_pid.to_string());
        let _ = Command::new("kill").arg("-KILL").args(&targets).status();
        let _ = std::fs::remove_dir_all(&dir);
        panic!("10 s after the owner was SIGKILLed, still there: {leftovers:?}");
    }
    // The ssh client sees its connection go.
    let deadline = Instant::now() + Duration::from_secs(10);
    while session.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the ssh client still runs 10 s after its sshd went"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
