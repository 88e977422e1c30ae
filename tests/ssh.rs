//! The SSH transport against a real OpenSSH sshd on loopback (see tests/support/sshd.rs).
//! Run as root (CI is): sshd must switch users.

#[path = "support/sshd.rs"]
mod sshd;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use outrider::ssh::known_hosts::{KnownHosts, fingerprint};
use outrider::ssh::{
    ClientConfig, Command, Credentials, Endpoint, Error, Fleet, HostKeyPolicy, JumpHost, Session,
};

/// A server, a user key authorized for `user`, and known_hosts for `addrs`.
struct Setup {
    server: sshd::Sshd,
    _keys: tempfile::TempDir,
    private_key: String,
    known_hosts: String,
}

fn setup(user: &str, addrs: &[&str]) -> Setup {
    let server = sshd::Sshd::start();
    let keys = tempfile::tempdir().expect("tempdir");
    let (private_key, public_key) = sshd::user_key(keys.path(), "ed25519", None, "openssh");
    server.authorize(user, &public_key);
    let known_hosts = server.known_hosts_for(addrs);
    Setup {
        server,
        _keys: keys,
        private_key,
        known_hosts,
    }
}

impl Setup {
    fn endpoint(&self, addr: &str) -> Endpoint {
        Endpoint::new(format!("host-{addr}"), addr, self.server.port)
    }
    fn credentials(&self) -> Arc<Credentials> {
        Arc::new(Credentials::new(&self.private_key, None, &self.known_hosts).expect("credentials"))
    }
    async fn session(&self, user: &str, addr: &str) -> Result<Session, Error> {
        Session::connect(
            Arc::new(ClientConfig::new(user)),
            self.credentials(),
            &self.endpoint(addr),
            None,
        )
        .await
    }
}

#[tokio::test]
async fn exec_captures_stdout_stderr_and_exit_code_separately() {
    let s = setup("root", &["127.0.10.1"]);
    let session = s.session("root", "127.0.10.1").await.expect("connect");
    let out = session
        .exec(&Command::script("echo out; echo err >&2; exit 0"))
        .await
        .expect("exec");
    assert_eq!(out.exit_status, Some(0));
    assert_eq!(out.stdout.to_string_lossy(), "out\n");
    assert_eq!(out.stderr.to_string_lossy(), "err\n");
    // the remote side sees which "host" it is on
    let out = session
        .exec(&Command::argv(["sh", "-c", "echo $SSH_CONNECTION"]))
        .await
        .expect("exec");
    assert_eq!(
        out.stdout.to_string_lossy().split_whitespace().nth(2),
        Some("127.0.10.1")
    );
}

#[tokio::test]
async fn non_zero_exit_is_a_result_and_check_turns_it_into_non_zero_exit() {
    let s = setup("root", &["127.0.10.2"]);
    let session = s.session("root", "127.0.10.2").await.expect("connect");
    let out = session
        .exec(&Command::script("echo nope >&2; exit 3"))
        .await
        .expect("exec");
    assert_eq!(out.exit_status, Some(3));
    match out.check("host-127.0.10.2") {
        Err(Error::NonZeroExit { status, stderr, .. }) => {
            assert_eq!(status, "exit code 3");
            assert_eq!(stderr, "nope");
        }
        other => panic!("expected NonZeroExit, got {other:?}"),
    }
}

#[tokio::test]
async fn a_command_over_its_timeout_returns_timed_out_promptly_with_output_so_far() {
    let s = setup("root", &["127.0.10.3"]);
    let session = s.session("root", "127.0.10.3").await.expect("connect");
    let started = Instant::now();
    let cmd = Command::script("echo started; sleep 30").timeout(Duration::from_secs(1));
    let err = session.exec(&cmd).await.expect_err("must time out");
    let took = started.elapsed();
    match &err {
        Error::TimedOut { output, .. } => assert!(output.contains("started"), "{err}"),
        other => panic!("expected TimedOut, got {other:?}"),
    }
    assert!(took < Duration::from_secs(10), "timeout took {took:?}");
    // the connection is still usable afterwards
    let out = session
        .exec(&Command::argv(["true"]))
        .await
        .expect("exec after timeout");
    assert!(out.success());
}

#[tokio::test]
async fn a_closed_port_is_unreachable_quickly() {
    let s = setup("root", &["127.0.10.4"]);
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let endpoint = Endpoint::new("closed", "127.0.0.1", closed);
    let started = Instant::now();
    let err = Session::connect(
        Arc::new(ClientConfig::new("root")),
        s.credentials(),
        &endpoint,
        None,
    )
    .await
    .expect_err("closed port");
    assert!(matches!(err, Error::Unreachable { .. }), "{err:?}");
    assert_eq!(err.reason(), "Unreachable");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_changed_host_key_is_refused_whatever_the_policy() {
    let s = setup("root", &["127.0.10.5"]);
    // known_hosts pins a different key for this host
    let other = sshd::Sshd::start();
    let wrong = other
        .known_hosts_for(&["127.0.10.5"])
        .replace(&format!(":{}", other.port), &format!(":{}", s.server.port));
    for policy in [HostKeyPolicy::Strict, HostKeyPolicy::AcceptNew] {
        let mut config = ClientConfig::new("root");
        config.host_key_policy = policy;
        let creds = Arc::new(Credentials::new(&s.private_key, None, &wrong).expect("creds"));
        let err = Session::connect(Arc::new(config), creds, &s.endpoint("127.0.10.5"), None)
            .await
            .expect_err("mismatch");
        assert!(
            matches!(err, Error::HostKeyMismatch { .. }),
            "{policy:?}: {err:?}"
        );
        assert!(err.to_string().contains("MISMATCH"), "{err}");
    }
}

#[tokio::test]
async fn an_unknown_host_is_refused_under_strict_and_accepted_once_with_accept_new() {
    let s = setup("root", &["127.0.10.6"]);
    let creds = Arc::new(Credentials::new(&s.private_key, None, "").expect("creds"));
    let err = Session::connect(
        Arc::new(ClientConfig::new("root")),
        creds.clone(),
        &s.endpoint("127.0.10.6"),
        None,
    )
    .await
    .expect_err("unknown host");
    assert!(matches!(err, Error::HostKeyUnknown { .. }), "{err:?}");

    let mut config = ClientConfig::new("root");
    config.host_key_policy = HostKeyPolicy::AcceptNew;
    let session = Session::connect(Arc::new(config), creds, &s.endpoint("127.0.10.6"), None)
        .await
        .expect("tofu");
    let (fp, line) = session
        .accepted_host_key
        .clone()
        .expect("accepted key reported");
    let server_fps: Vec<String> = s
        .server
        .host_public_keys()
        .iter()
        .map(|k| fingerprint(&russh::keys::PublicKey::from_openssh(k).expect("host key")))
        .collect();
    assert!(server_fps.contains(&fp), "{fp} not one of {server_fps:?}");
    // the recorded line pins it: a Strict connection with it now succeeds
    let pinned = Arc::new(Credentials::new(&s.private_key, None, &line).expect("creds"));
    Session::connect(
        Arc::new(ClientConfig::new("root")),
        pinned,
        &s.endpoint("127.0.10.6"),
        None,
    )
    .await
    .expect("pinned key trusted");
    assert!(KnownHosts::parse(&line).is_ok());
}

#[tokio::test]
async fn a_key_the_server_does_not_know_is_auth_failed_not_a_hang() {
    let s = setup("root", &["127.0.10.7"]);
    let other_keys = tempfile::tempdir().expect("tmp");
    // ed25519: the key loader rejects about one P-256 key in 256 ("SshKey: length invalid",
    // a known gap noted for the team); this test is about the server, not the key kind.
    let (stranger, _) = sshd::user_key(other_keys.path(), "ed25519", None, "openssh");
    let creds = Arc::new(Credentials::new(&stranger, None, &s.known_hosts).expect("creds"));
    let started = Instant::now();
    let err = Session::connect(
        Arc::new(ClientConfig::new("root")),
        creds,
        &s.endpoint("127.0.10.7"),
        None,
    )
    .await
    .expect_err("auth must fail");
    assert!(matches!(err, Error::AuthFailed { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn rsa_pem_and_passphrase_protected_keys_authenticate() {
    let server = sshd::Sshd::start();
    let keys = tempfile::tempdir().expect("tmp");
    let known_hosts = server.known_hosts_for(&["127.0.10.8"]);
    let endpoint = Endpoint::new("h", "127.0.10.8", server.port);
    for (kind, pass, format) in [
        ("rsa", None, "pem"),
        ("ecdsa", Some("s3cret"), "openssh"),
        ("rsa", Some("pw"), "openssh"),
    ] {
        let dir = keys
            .path()
            .join(format!("{kind}-{format}-{}", pass.is_some()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (private, public) = sshd::user_key(&dir, kind, pass, format);
        server.authorize("root", &public);
        let creds = Arc::new(Credentials::new(&private, pass, &known_hosts).expect("decode key"));
        let session = Session::connect(Arc::new(ClientConfig::new("root")), creds, &endpoint, None)
            .await
            .unwrap_or_else(|e| panic!("{kind}/{format}/{pass:?}: {e}"));
        assert!(
            session
                .exec(&Command::argv(["true"]))
                .await
                .expect("exec")
                .success()
        );
        if pass.is_some() {
            let err = Credentials::new(&private, None, &known_hosts).expect_err("no passphrase");
            assert!(err.to_string().contains("passphrase"), "{err}");
        }
    }
}

#[tokio::test]
async fn a_hostile_spec_value_reaches_the_remote_command_as_one_literal_argument() {
    let s = setup("root", &["127.0.10.9"]);
    let session = s.session("root", "127.0.10.9").await.expect("connect");
    let hostile =
        "$(touch /tmp/outrider-pwned) `id` ; rm -rf / && echo 'single' \"double\"\nnewline * ~ -rf";
    let out = session
        .exec(&Command::argv(["printf", "%s|%s", hostile, "second"]).env("HOSTILE", hostile))
        .await
        .expect("exec");
    assert_eq!(out.stdout.to_string_lossy(), format!("{hostile}|second"));
    let out = session
        .exec(&Command::argv(["sh", "-c", "printf %s \"$HOSTILE\""]).env("HOSTILE", hostile))
        .await
        .expect("exec");
    assert_eq!(out.stdout.to_string_lossy(), hostile);
    assert!(
        !std::path::Path::new("/tmp/outrider-pwned").exists(),
        "command substitution ran"
    );
}

#[tokio::test]
async fn become_uses_non_interactive_sudo_and_a_missing_right_is_a_clear_error() {
    let server = sshd::Sshd::start();
    let keys = tempfile::tempdir().expect("tmp");
    let (private, public) = sshd::user_key(keys.path(), "ed25519", None, "openssh");
    server.authorize("outrider-sudo", &public);
    server.authorize("outrider-nosudo", &public);
    let creds = Arc::new(
        Credentials::new(&private, None, &server.known_hosts_for(&["127.0.10.10"])).expect("creds"),
    );
    let endpoint = Endpoint::new("h", "127.0.10.10", server.port);

    let mut config = ClientConfig::new("outrider-sudo");
    config.become_user = Some("root".into());
    let session = Session::connect(Arc::new(config), creds.clone(), &endpoint, None)
        .await
        .expect("connect");
    let out = session
        .exec(&Command::argv(["id", "-u"]))
        .await
        .expect("sudo exec");
    assert_eq!(out.stdout.to_string_lossy().trim(), "0");
    let out = session
        .exec(&Command::script("id -un"))
        .await
        .expect("sudo script");
    assert_eq!(out.stdout.to_string_lossy().trim(), "root");

    let mut config = ClientConfig::new("outrider-nosudo");
    config.become_user = Some("root".into());
    let session = Session::connect(Arc::new(config), creds, &endpoint, None)
        .await
        .expect("connect");
    let started = Instant::now();
    let err = session
        .exec(&Command::argv(["id", "-u"]).timeout(Duration::from_secs(20)))
        .await
        .expect_err("no sudo");
    assert!(matches!(err, Error::BecomeFailed { .. }), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a password prompt must not hang"
    );
}

#[tokio::test]
async fn a_jump_host_tunnels_the_connection_and_its_refusal_is_reported() {
    let target = setup("root", &["127.0.10.11"]);
    let jump = sshd::Sshd::start();
    let jump_keys = tempfile::tempdir().expect("tmp");
    // the jump host accepts the same user key and is pinned in the same known_hosts
    let public = std::fs::read_to_string(
        std::fs::read_dir(target._keys.path())
            .expect("keys")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "pub"))
            .expect("public key"),
    )
    .expect("read pub");
    jump.authorize("root", public.trim());
    let known = format!(
        "{}{}",
        target.known_hosts,
        jump.known_hosts_for(&["127.0.0.2"])
    );
    let creds = Arc::new(Credentials::new(&target.private_key, None, &known).expect("creds"));
    let mut config = ClientConfig::new("root");
    config.jump_host = Some(JumpHost {
        address: "127.0.0.2".into(),
        port: jump.port,
        user: "root".into(),
    });
    let config = Arc::new(config);
    let j = Session::connect_jump(config.clone(), creds.clone())
        .await
        .expect("jump connect");
    let session = Session::connect(
        config.clone(),
        creds.clone(),
        &target.endpoint("127.0.10.11"),
        j,
    )
    .await
    .expect("via jump");
    assert!(
        session
            .exec(&Command::argv(["true"]))
            .await
            .expect("exec")
            .success()
    );
    drop(jump_keys);

    // a jump host that forbids forwarding: the failure names the jump host
    let strict_jump = sshd::Sshd::start_with("AllowTcpForwarding no");
    strict_jump.authorize("root", public.trim());
    let known = format!(
        "{}{}",
        target.known_hosts,
        strict_jump.known_hosts_for(&["127.0.0.3"])
    );
    let creds = Arc::new(Credentials::new(&target.private_key, None, &known).expect("creds"));
    let mut config = ClientConfig::new("root");
    config.jump_host = Some(JumpHost {
        address: "127.0.0.3".into(),
        port: strict_jump.port,
        user: "root".into(),
    });
    let config = Arc::new(config);
    let j = Session::connect_jump(config.clone(), creds.clone())
        .await
        .expect("jump connect");
    let err = Session::connect(config, creds, &target.endpoint("127.0.10.11"), j)
        .await
        .expect_err("forwarding refused");
    assert!(matches!(err, Error::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().contains("jump host"), "{err}");
}

#[tokio::test]
async fn upload_writes_the_file_with_its_mode_without_a_shell_string() {
    let s = setup("root", &["127.0.10.12"]);
    let session = s.session("root", "127.0.10.12").await.expect("connect");
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("it's $(odd) name.txt");
    let path_str = path.to_str().expect("utf-8");
    session
        .upload(path_str, b"hello\nworld\n", 0o640, Duration::from_secs(10))
        .await
        .expect("upload");
    assert_eq!(std::fs::read(&path).expect("read back"), b"hello\nworld\n");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
        0o640
    );
}

fn fleet_addr(i: usize) -> String {
    format!("127.0.{}.{}", 20 + i / 250, 1 + i % 250)
}

#[tokio::test]
async fn fan_out_to_300_hosts_returns_300_correct_results() {
    let addrs: Vec<String> = (0..300).map(fleet_addr).collect();
    let addr_refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let s = setup("root", &addr_refs);
    let fleet = Fleet::new(
        ClientConfig::new("root"),
        Credentials::new(&s.private_key, None, &s.known_hosts).expect("creds"),
    )
    .with_concurrency(50);
    let endpoints: Vec<Endpoint> = addrs
        .iter()
        .map(|a| Endpoint::new(a.clone(), a.clone(), s.server.port))
        .collect();
    let results: Vec<_> = fleet
        .run(endpoints, Duration::from_secs(240), |session| async move {
            let out = session
                .exec(&Command::argv(["sh", "-c", "echo $SSH_CONNECTION"]))
                .await?;
            let out = out.check(&session.endpoint().name)?;
            Ok(out
                .stdout
                .to_string_lossy()
                .split_whitespace()
                .nth(2)
                .unwrap_or_default()
                .to_string())
        })
        .collect()
        .await;
    assert_eq!(results.len(), 300);
    let mut failures = Vec::new();
    for r in &results {
        match &r.result {
            Ok(seen) if *seen == r.endpoint.address => {}
            Ok(seen) => failures.push(format!("{}: ran on {seen}", r.endpoint.name)),
            Err(e) => failures.push(e.to_string()),
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}",
        failures.len(),
        failures.first()
    );
}

async fn run_true(fleet: &Fleet, addrs: &[String], port: u16) -> Vec<String> {
    let endpoints: Vec<Endpoint> = addrs
        .iter()
        .map(|a| Endpoint::new(a.clone(), a.clone(), port))
        .collect();
    let results: Vec<_> = fleet
        .run(endpoints, Duration::from_secs(120), |session| async move {
            session
                .exec(&Command::argv(["true"]))
                .await?
                .check(&session.endpoint().name)
                .map(|_| ())
        })
        .collect()
        .await;
    results
        .iter()
        .filter_map(|r| r.result.as_ref().err().map(|e| e.to_string()))
        .collect()
}

#[tokio::test]
async fn handshakes_reset_by_a_busy_sshd_are_retried_until_every_host_succeeds() {
    // a stock-like sshd that drops every unauthenticated connection past 4 at once
    let server = sshd::Sshd::start_with("MaxStartups 4:100:4");
    let keys = tempfile::tempdir().expect("tmp");
    let (private, public) = sshd::user_key(keys.path(), "ed25519", None, "openssh");
    // The unprivileged user's shell is /bin/sh with no rc files: root's .bashrc (pyenv) would
    // make 60 sessions load the machine and stretch the burst this test is about.
    server.authorize("outrider-nosudo", &public);
    let addrs: Vec<String> = (0..60).map(fleet_addr).collect();
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let known_hosts = server.known_hosts_for(&refs);
    let fleet = |attempts: u32| {
        let mut config = ClientConfig::new("outrider-nosudo");
        config.handshake_attempts = attempts;
        Fleet::new(
            config,
            Credentials::new(&private, None, &known_hosts).expect("creds"),
        )
        .with_concurrency(60)
        .with_handshakes(30)
    };
    // four half-open connections fill sshd's startup slots for two seconds, as a burst of
    // other clients would
    let hold = |port: u16| {
        let conns: Vec<_> = (0..4)
            .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect"))
            .collect();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(2));
            drop(conns);
        })
    };
    // without retries the busy server visibly drops handshakes…
    let held = hold(server.port);
    let failed = run_true(&fleet(1), &addrs, server.port).await;
    held.join().expect("holder");
    assert!(
        !failed.is_empty(),
        "sshd dropped nothing: the test would prove nothing"
    );
    assert!(
        failed.iter().all(|e| e.contains("unreachable")),
        "{failed:?}"
    );
    // …and with retries every host gets through once the burst is over (20 attempts: up to
    // ~90 s of backoff, since the other tests of this file share the sshd and a loaded CI
    // machine keeps it busy well past the two-second burst)
    let held = hold(server.port);
    let failed = run_true(&fleet(20), &addrs, server.port).await;
    held.join().expect("holder");
    assert!(
        failed.is_empty(),
        "{} of 60 failed, first: {:?}",
        failed.len(),
        failed.first()
    );
}

/// sshd's per-connection processes still alive (children of the listener).
fn sshd_children(listener: u32) -> usize {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            // field 4 (after the parenthesised name) is the parent pid
            stat.rsplit_once(") ")
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .is_some_and(|ppid| ppid == listener.to_string())
        })
        .count()
}

#[tokio::test]
async fn dropping_a_fan_out_closes_every_connection() {
    let addrs: Vec<String> = (0..10).map(fleet_addr).collect();
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let s = setup("outrider-nosudo", &refs);
    let fleet = Fleet::new(
        ClientConfig::new("outrider-nosudo"),
        Credentials::new(&s.private_key, None, &s.known_hosts).expect("creds"),
    );
    let endpoints: Vec<Endpoint> = addrs
        .iter()
        .map(|a| Endpoint::new(a.clone(), a.clone(), s.server.port))
        .collect();
    let mut stream =
        Box::pin(
            fleet.run(endpoints, Duration::from_secs(120), |session| async move {
                session
                    .exec(&Command::argv(["sleep", "60"]).timeout(Duration::from_secs(90)))
                    .await
                    .map(|_| ())
            }),
        );
    // let every host get its command running
    let _ = tokio::time::timeout(Duration::from_secs(3), stream.next()).await;
    assert!(
        sshd_children(s.server.pid()) >= 10,
        "the sessions should be running now"
    );
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sshd_children(s.server.pid()) > 0 {
        assert!(
            Instant::now() < deadline,
            "{} sshd sessions still open after the run was dropped",
            sshd_children(s.server.pid())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (bounded) until sshd has reaped every connection.
async fn drained(server: &sshd::Sshd) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while sshd_children(server.pid()) > 0 {
        assert!(
            Instant::now() < deadline,
            "{} sshd connections still open",
            sshd_children(server.pid())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn connections_end_with_a_disconnect_message_not_a_bare_tcp_close() {
    // A bare TCP close makes sshd take its orderly shutdown path, which costs it ~5 ms more
    // CPU per connection than SSH_MSG_DISCONNECT (see ssh::client::Session).
    let addrs: Vec<String> = (0..4).map(fleet_addr).collect();
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let s = setup("outrider-nosudo", &refs);
    let fleet = Fleet::new(
        ClientConfig::new("outrider-nosudo"),
        Credentials::new(&s.private_key, None, &s.known_hosts).expect("creds"),
    );
    // a fan-out closes each session once its action is done
    let failures = run_true(&fleet, &addrs[..3], s.server.port).await;
    assert!(failures.is_empty(), "{failures:?}");
    // a session dropped without close() says goodbye too
    let session = s
        .session("outrider-nosudo", &addrs[3])
        .await
        .expect("connect");
    session
        .exec(&Command::argv(["true"]))
        .await
        .expect("exec")
        .check("dropped")
        .expect("true succeeds");
    drop(session);
    drained(&s.server).await;
    let log = s.server.log();
    for addr in &addrs {
        // "Connection from 127.0.0.1 port P on ADDR port …": the client's source port P names
        // the connection in sshd's later lines
        let port = log
            .lines()
            .find(|l| l.contains(&format!(" on {addr} port ")))
            .and_then(|l| l.split(" port ").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no connection to {addr} in the sshd log:\n{log}"));
        assert!(
            log.contains(&format!("Received disconnect from 127.0.0.1 port {port}:")),
            "no SSH_MSG_DISCONNECT on the connection to {addr}:\n{log}"
        );
        assert!(
            !log.contains(&format!("Connection closed by 127.0.0.1 port {port}")),
            "the connection to {addr} was closed without SSH_MSG_DISCONNECT:\n{log}"
        );
    }
}

/// A root-owned script for sshd's AuthorizedKeysCommand (sshd refuses one under /tmp) that
/// never answers in time: the server finishes the key exchange, then stalls authentication.
fn stalling_keys_command() -> std::path::PathBuf {
    let dir = std::path::Path::new("/run/outrider-test");
    std::fs::create_dir_all(dir).expect("create /run/outrider-test (tests run as root)");
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let script = dir.join("stall-auth");
    std::fs::write(&script, "#!/bin/sh\nexec sleep 60\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    script
}

#[tokio::test]
async fn a_host_that_stalls_after_the_key_exchange_fails_within_the_connect_timeout() {
    let script = stalling_keys_command();
    let server = sshd::Sshd::start_with(&format!(
        "AuthorizedKeysCommand {} %u\nAuthorizedKeysCommandUser nobody",
        script.display()
    ));
    let keys = tempfile::tempdir().expect("tempdir");
    // the key is in no authorized_keys file: sshd asks the (stalling) command
    let (private_key, _) = sshd::user_key(keys.path(), "ed25519", None, "openssh");
    let addr = "127.0.10.40";
    let credentials =
        Arc::new(Credentials::new(&private_key, None, &server.known_hosts_for(&[addr])).unwrap());
    let mut config = ClientConfig::new("outrider-nosudo");
    config.connect_timeout = Duration::from_secs(2);
    let started = Instant::now();
    let result = Session::connect(
        Arc::new(config),
        credentials,
        &Endpoint::new("stall", addr, server.port),
        None,
    )
    .await;
    let took = started.elapsed();
    match result {
        Err(Error::Unreachable { reason, .. }) => {
            assert!(reason.contains("did not finish authentication"), "{reason}")
        }
        Err(other) => panic!("expected an authentication deadline, got {other}"),
        Ok(_) => panic!("a stalled authentication cannot succeed"),
    }
    assert!(
        took < Duration::from_secs(10),
        "took {took:?}, sshd's LoginGraceTime is 120 s"
    );
    assert!(
        took >= Duration::from_secs(2),
        "returned before the deadline: {took:?}"
    );
}

#[tokio::test]
async fn a_failed_jump_host_is_retried_after_its_backoff_and_a_dead_one_is_reopened() {
    let target = setup("outrider-nosudo", &["127.0.10.41"]);
    let jump = sshd::Sshd::start();
    let public = std::fs::read_to_string(
        std::fs::read_dir(target._keys.path())
            .expect("keys")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "pub"))
            .expect("public key"),
    )
    .expect("read pub");
    let known = format!(
        "{}{}",
        target.known_hosts,
        jump.known_hosts_for(&["127.0.0.5"])
    );
    let creds = Credentials::new(&target.private_key, None, &known).expect("creds");
    let mut config = ClientConfig::new("outrider-nosudo");
    config.connect_timeout = Duration::from_secs(3);
    config.jump_host = Some(JumpHost {
        address: "127.0.0.5".into(),
        port: jump.port,
        user: "outrider-nosudo".into(),
    });
    let fleet = Fleet::new(config, creds);
    let endpoint = target.endpoint("127.0.10.41");

    // the jump host does not know the key yet: refused, and within the backoff the same
    // failure comes back without dialling again
    let first = fleet.connect(&endpoint).await.expect_err("jump refuses");
    assert!(first.to_string().contains("jump host"), "{first}");
    let dials = jump.log().matches("Connection from").count();
    assert!(
        dials >= 1,
        "the jump sshd logs each connection: {}",
        jump.log()
    );
    let again = fleet
        .connect(&endpoint)
        .await
        .expect_err("still in backoff");
    assert_eq!(again.to_string(), first.to_string());
    assert_eq!(
        jump.log().matches("Connection from").count(),
        dials,
        "no new dial in backoff"
    );

    // fixed on the jump host: after the backoff the fleet dials again and gets through
    jump.authorize("outrider-nosudo", public.trim());
    let deadline = Instant::now() + Duration::from_secs(10);
    let session = loop {
        match fleet.connect(&endpoint).await {
            Ok(s) => break s,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "never retried the jump host: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert!(
        session
            .exec(&Command::argv(["true"]))
            .await
            .unwrap()
            .success()
    );
    drop(session);

    // the jump session dies (its sshd session processes killed): the next connect reopens it
    for pid in sshd::descendants(jump.pid()) {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let session = loop {
        match fleet.connect(&endpoint).await {
            Ok(s) => break s,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "dead jump session not reopened: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert!(
        session
            .exec(&Command::argv(["true"]))
            .await
            .unwrap()
            .success()
    );
}

/// Every process's command line on this machine (the test sshd's sessions run here).
fn all_command_lines() -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(bytes) = std::fs::read(entry.path().join("cmdline")) {
            out.push_str(&String::from_utf8_lossy(&bytes).replace('\0', " "));
            out.push('\n');
        }
    }
    out
}

#[tokio::test]
async fn env_values_reach_the_program_over_stdin_and_never_appear_in_ps() {
    let s = setup("outrider-nosudo", &["127.0.10.42"]);
    let session = Arc::new(
        s.session("outrider-nosudo", "127.0.10.42")
            .await
            .expect("connect"),
    );
    let secret = "hunter2-$(id)'x";
    let cmd = Command::argv(["sh", "-c", "sleep 2; printf '%s' \"$OUTRIDER_SECRET\""])
        .env("OUTRIDER_SECRET", secret);
    let running = {
        let session = session.clone();
        tokio::spawn(async move { session.exec(&cmd).await })
    };
    // look while the remote command runs
    let mut seen_running = false;
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let lines = all_command_lines();
        assert!(
            !lines.contains("hunter2"),
            "the value is visible in ps:\n{lines}"
        );
        seen_running |= lines.contains("sleep 2; printf");
    }
    assert!(seen_running, "the remote command was not observed running");
    let out = running.await.unwrap().expect("exec");
    assert!(out.success(), "{}", out.status_text());
    assert_eq!(out.stdout.to_string_lossy(), secret);
}
