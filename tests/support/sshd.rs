//! Real OpenSSH `sshd` for integration tests: one sshd on `0.0.0.0:<free port>` answers every
//! `127.x.y.z` address, so a "fleet" of hundreds of hosts costs one process. A remote command
//! learns which "host" it runs on from the third field of `$SSH_CONNECTION`.
//!
//! Usage from `tests/<name>.rs`:
//!
//! ```ignore
//! #[path = "support/sshd.rs"]
//! mod sshd;
//!
//! let server = sshd::Sshd::start(); // or Sshd::start_with("PermitTTY no")
//! let keys = tempfile::tempdir().unwrap();
//! let (private_key, public_key) = sshd::user_key(keys.path(), "ed25519", None, "openssh");
//! server.authorize("root", &public_key); // also "outrider-sudo", "outrider-nosudo"
//! let known_hosts = server.known_hosts_for(&["127.0.10.7", "127.0.10.8"]);
//! // connect to 127.0.10.7:server.port as root with private_key, pinning known_hosts
//! ```
//!
//! Requirements (never skipped: a missing piece is a test failure):
//! - `/usr/sbin/sshd` and `ssh-keygen` (Debian: openssh-server, openssh-client);
//! - the users `outrider-sudo` (passwordless sudo) and `outrider-nosudo` (no sudo);
//! - the directory `/run/sshd` (sshd's privilege separation directory);
//! - **root**: sshd must switch to the user that logs in, which only root can do. CI runs the
//!   tests as root. `UsePAM no` means sshd refuses accounts whose password field is locked with
//!   `!`, so the test users (and root) carry `*` instead.
//!
//! `e2e/deps.sh`, run as root, installs and creates all of that, and makes sure no system sshd
//! runs.
//!
//! The generated config accepts logins from loopback addresses only (a `Match` block denies every
//! user from any other source), although it listens on 0.0.0.0.
//!
//! [`Sshd::start_in_netns`] runs sshd on port 22 inside a network namespace instead (the firewall
//! test hosts of `tests/support/netns.rs`), with a tmpfs of its own at `/var/lib/outrider`; that
//! one also lets in sources in 198.18.0.0/15 (the veth links to the namespaces).
//!
//! An sshd never outlives the test process that started it, even one killed with SIGKILL: next to
//! each sshd runs a reaper (`sh`, in a process group of its own) that blocks reading a pipe whose
//! only write end the test process holds. When that process dies, however it dies, the kernel
//! closes the write end, the reaper reads EOF, finds the listener by the config path in its
//! command line, stops and kills it and every process below it (its connections and their
//! sessions), and removes the temp dir. Dropping the `Sshd` stops sshd, then kills the reaper
//! before it can act; a static `Sshd` that is never dropped goes when the test process exits.
#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const SSHD: &str = "/usr/sbin/sshd";
const SSH_KEYGEN: &str = "ssh-keygen";
const INSTALL_HINT: &str = "install openssh-server (run e2e/deps.sh)";
const START_TIMEOUT: Duration = Duration::from_secs(10);
const HOST_KEY_KINDS: [&str; 3] = ["ed25519", "ecdsa", "rsa"];
/// Sources the `Match` block lets in: loopback, plus (namespace hosts only) the benchmarking range
/// 198.18.0.0/15 the veth links of `tests/support/netns.rs` use.
const LOOPBACK_SOURCES: &[&str] = &["127.0.0.0/8"];
const NETNS_SOURCES: &[&str] = &["127.0.0.0/8", "198.18.0.0/15"];
/// Run by `ip netns exec` (which gives it a mount namespace of its own, `/` made rslave): a tmpfs
/// at /var/lib/outrider that only this sshd and its sessions see, then sshd itself ($1: config).
const NETNS_SSHD_SCRIPT: &str = "mkdir -p /var/lib/outrider \
    && mount -t tmpfs -o mode=0755 tmpfs /var/lib/outrider \
    && exec /usr/sbin/sshd -D -e -f \"$1\"";

/// Where an sshd runs.
#[derive(Clone, Copy)]
enum Placement<'a> {
    /// The test's own network namespace on 0.0.0.0:`port` (a free one when `None`).
    Loopback { port: Option<u16> },
    /// Port 22 inside the network namespace `netns`, ready once `addr`:22 (reachable from the
    /// test's namespace) answers.
    Netns { netns: &'a str, addr: Ipv4Addr },
}

/// One running sshd. Dropping it kills sshd, its connections and their sessions.
pub struct Sshd {
    /// The port sshd listens on, on every address (0.0.0.0).
    pub port: u16,
    /// Config, host keys, authorized keys, pid file and log.
    pub dir: tempfile::TempDir,
    child: Child,
    host_public_keys: Vec<String>,
    reaper: Reaper,
}

impl Sshd {
    /// Starts `/usr/sbin/sshd -D -e -f <generated config>` on 0.0.0.0:<free port> with fresh
    /// ed25519, ecdsa and rsa host keys, and waits (at most 10 s) until it accepts connections.
    pub fn start() -> Sshd {
        Sshd::start_with("")
    }

    /// Like [`Sshd::start`], with `extra_config` added to the generated config. sshd keeps the
    /// first value it reads for an option, so the lines before the first `Match` go to the top of
    /// the config (they override the defaults of this harness, e.g. `MaxStartups 10:30:100`) and
    /// the `Match` blocks go to the end.
    pub fn start_with(extra_config: &str) -> Sshd {
        Sshd::start_inner(extra_config, Placement::Loopback { port: None })
    }

    /// Starts sshd on port 22 inside the existing network namespace `netns` (through `ip netns
    /// exec`, with a tmpfs at `/var/lib/outrider` private to this sshd and its sessions) and waits
    /// until `addr`:22 answers from the caller's namespace, so `addr` must already be routed there.
    /// Logins are accepted from 127.0.0.0/8 and 198.18.0.0/15. `extra_config` as in
    /// [`Sshd::start_with`].
    pub fn start_in_netns(netns: &str, addr: Ipv4Addr, extra_config: &str) -> Sshd {
        assert!(
            !netns.is_empty() && !netns.contains('/') && !netns.starts_with('-'),
            "bad network namespace name {netns:?}"
        );
        Sshd::start_inner(extra_config, Placement::Netns { netns, addr })
    }

    /// Like [`Sshd::start`], on `port` (e.g. the port of an sshd just stopped: the same
    /// host and port answering with new host keys).
    #[allow(dead_code)]
    pub fn start_on_port(port: u16) -> Sshd {
        Sshd::start_inner("", Placement::Loopback { port: Some(port) })
    }

    fn start_inner(extra_config: &str, placement: Placement) -> Sshd {
        preflight();
        let dir = tempfile::Builder::new()
            .prefix("outrider-sshd-")
            .tempdir()
            .expect("create the sshd temp dir");
        // sshd reads AuthorizedKeysFile as the user logging in: the path must be traversable.
        set_mode(dir.path(), 0o755);
        let host_keys = dir.path().join("host_keys");
        fs::create_dir(&host_keys).expect("create host_keys dir");
        set_mode(&host_keys, 0o700);
        let authorized = dir.path().join("authorized_keys");
        fs::create_dir(&authorized).expect("create authorized_keys dir");
        set_mode(&authorized, 0o755);
        // Before anything else runs: from here on, the death of this process takes the dir and
        // any sshd started on it along.
        let reaper = Reaper::spawn(dir.path());

        // Three host keys, generated in parallel (rsa takes the longest).
        let keygens: Vec<(PathBuf, Child)> = HOST_KEY_KINDS
            .iter()
            .map(|kind| {
                let path = host_keys.join(format!("ssh_host_{kind}_key"));
                let mut cmd = Command::new(SSH_KEYGEN);
                cmd.args(["-q", "-t", kind, "-N", "", "-C", ""]);
                if *kind == "rsa" {
                    cmd.args(["-b", "3072"]);
                }
                cmd.arg("-f").arg(&path).stdin(Stdio::null());
                let child = cmd
                    .spawn()
                    .unwrap_or_else(|e| panic!("run {SSH_KEYGEN}: {e}: {INSTALL_HINT}"));
                (path, child)
            })
            .collect();
        let mut host_key_paths = Vec::new();
        let mut host_public_keys = Vec::new();
        for (path, mut child) in keygens {
            let status = child.wait().expect("wait for ssh-keygen");
            assert!(
                status.success(),
                "ssh-keygen for {} failed: {status}",
                path.display()
            );
            host_public_keys.push(public_key_line(&read_to_string(
                &path.with_extension("pub"),
            )));
            host_key_paths.push(path);
        }

        let (head, tail) = split_extra_config(extra_config);
        let log_path = dir.path().join("sshd.log");
        let mut last_failure = String::new();
        let (fixed_port, ready_addr, sources) = match placement {
            Placement::Loopback { port } => (port, Ipv4Addr::LOCALHOST, LOOPBACK_SOURCES),
            // A namespace of its own: port 22 is free.
            Placement::Netns { addr, .. } => (Some(22), addr, NETNS_SOURCES),
        };
        // A free port can be taken between probing it and sshd binding it: try a few.
        for _attempt in 0..5 {
            let port = fixed_port.unwrap_or_else(free_port);
            let config = render_config(dir.path(), port, &host_key_paths, head, tail, sources);
            let config_path = dir.path().join("sshd_config");
            fs::write(&config_path, config).expect("write sshd_config");
            let log = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .expect("open sshd.log");
            let log_start = log.metadata().map(|m| m.len()).unwrap_or(0) as usize;
            let mut cmd = match placement {
                Placement::Loopback { .. } => {
                    let mut cmd = Command::new(SSHD);
                    cmd.args(["-D", "-e", "-f"]).arg(&config_path);
                    cmd
                }
                Placement::Netns { netns, .. } => {
                    let mut cmd = Command::new("ip");
                    cmd.args(["netns", "exec", netns, "sh", "-c", NETNS_SSHD_SCRIPT])
                        .arg("outrider-sshd-netns")
                        .arg(&config_path);
                    cmd
                }
            };
            let mut child = cmd
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup sshd.log"))
                .stderr(log)
                // Its own process group (Drop kills it, and the connections below it).
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("start {cmd:?}: {e}: {INSTALL_HINT}"));
            match wait_ready(&mut child, ready_addr, port, &log_path, log_start) {
                Ok(()) => {
                    return Sshd {
                        port,
                        dir,
                        child,
                        host_public_keys,
                        reaper,
                    };
                }
                Err(failure) => {
                    stop_process(&mut child);
                    let address_in_use = failure.contains("Address already in use");
                    last_failure = failure;
                    if !address_in_use {
                        break;
                    }
                }
            }
        }
        panic!("sshd did not start: {last_failure}");
    }

    /// Adds `public_key_openssh` (an OpenSSH one-line public key) to the authorized keys of `user`
    /// (`root`, `outrider-sudo`, `outrider-nosudo`). Keys accumulate.
    pub fn authorize(&self, user: &str, public_key_openssh: &str) {
        assert!(
            !user.is_empty() && !user.contains('/') && !user.contains(".."),
            "bad user name {user:?}"
        );
        let line = public_key_openssh.trim();
        assert!(
            !line.is_empty() && !line.contains('\n'),
            "expected one public key line, got {public_key_openssh:?}"
        );
        let path = self.dir.path().join("authorized_keys").join(user);
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        writeln!(file, "{line}").expect("write authorized key");
        set_mode(&path, 0o644);
    }

    /// known_hosts lines `[addr]:port <type> <base64>` for every address and host key type
    /// (`addr <type> <base64>` on port 22: OpenSSH looks a port-22 host up by its bare name).
    pub fn known_hosts_for(&self, addrs: &[&str]) -> String {
        let mut out = String::new();
        for addr in addrs {
            let name = if self.port == 22 {
                addr.to_string()
            } else {
                format!("[{addr}]:{}", self.port)
            };
            for key in &self.host_public_keys {
                out.push_str(&format!("{name} {key}\n"));
            }
        }
        out
    }

    /// The host public keys, `<type> <base64>` (ed25519, ecdsa-sha2-nistp256, rsa).
    pub fn host_public_keys(&self) -> Vec<String> {
        self.host_public_keys.clone()
    }

    /// `SHA256:…` fingerprints of this server's host keys (what a client may pin).
    #[allow(dead_code)]
    pub fn fingerprints(&self) -> Vec<String> {
        self.host_public_keys
            .iter()
            .filter_map(|line| russh::keys::PublicKey::from_openssh(line).ok())
            .map(|k| outrider::ssh::known_hosts::fingerprint(&k))
            .collect()
    }

    /// The sshd log so far (LogLevel VERBOSE).
    pub fn log(&self) -> String {
        read_log(&self.log_path())
    }

    /// CPU time of the sshd listener plus its reaped children (utime + stime + cutime + cstime,
    /// /proc/<pid>/stat fields 14-17), in seconds. A connection counts once it has closed and
    /// sshd has reaped its process; sessions still open are not included.
    pub fn cpu_seconds(&self) -> f64 {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("read /proc/<sshd>/stat (is sshd still running?)");
        // Fields after "(comm)" start at field 3 (state); comm may hold spaces or parentheses.
        let rest = &stat[stat.rfind(')').expect("malformed /proc stat") + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = (14..=17)
            .map(|field| {
                fields[field - 3]
                    .parse::<u64>()
                    .expect("numeric stat field")
            })
            .sum();
        ticks as f64 / clock_ticks_per_second()
    }

    /// Signs this server's ed25519 host key with the CA private key at `ca` for
    /// `principals` (comma-separated) and `validity` (`ssh-keygen -V`, e.g. `-5m:+1h`), and
    /// has sshd present that certificate (config reloaded with SIGHUP). Call again to
    /// replace the certificate.
    #[allow(dead_code)]
    pub fn present_host_certificate(&self, ca: &Path, principals: &str, validity: &str) {
        let public = self.dir.path().join("host_keys/ssh_host_ed25519_key.pub");
        let status = Command::new(SSH_KEYGEN)
            .args(["-q", "-s"])
            .arg(ca)
            .args([
                "-I",
                "outrider-test-host",
                "-h",
                "-n",
                principals,
                "-V",
                validity,
            ])
            .arg(&public)
            .stdin(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("run {SSH_KEYGEN}: {e}: {INSTALL_HINT}"));
        assert!(
            status.success(),
            "ssh-keygen -s (host certificate) failed: {status}"
        );
        let cert = self
            .dir
            .path()
            .join("host_keys/ssh_host_ed25519_key-cert.pub");
        let config_path = self.dir.path().join("sshd_config");
        let config = read_to_string(&config_path);
        if !config.contains("HostCertificate") {
            // before any Match block: a global keyword
            let line = format!("HostCertificate {}\n", cert.display());
            fs::write(&config_path, format!("{line}{config}")).expect("write sshd_config");
        }
        let listening = |log: &str| log.matches("Server listening on").count();
        let before = listening(&self.log());
        let status = Command::new("kill")
            .args(["-HUP", &self.pid().to_string()])
            .status()
            .expect("kill -HUP sshd");
        assert!(status.success(), "SIGHUP to sshd failed");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while listening(&self.log()) <= before || !banner_ok(Ipv4Addr::LOCALHOST, self.port) {
            assert!(
                std::time::Instant::now() < deadline,
                "sshd did not come back after SIGHUP:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The pid of the sshd listener.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("sshd.log")
    }
    fn stop(&mut self) {
        stop_process(&mut self.child);
        self.reaper.disarm();
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Kills the sshd started on a temp dir (and everything below it) and removes the dir once the
/// test process is gone. $1: the temp dir. stdin: a pipe whose write end only the test process
/// holds (Rust opens it close-on-exec, so no other child inherits it).
///
/// The listener is found by `<dir>/sshd_config` in its command line (sshd keeps it in its
/// `[listener]` title), so no pid can be stale or reused, and an sshd spawned a moment before the
/// test process died is found too. grep reads the pattern from a file: given as an argument, it
/// would match grep's own command line. Everything below the listener is stopped before anything
/// is killed, level by level until no new process appears, so none forks away unseen and none is
/// orphaned (and lost) before its children are found.
const REAPER_SCRIPT: &str = r#"
trap '' HUP INT
dir=$1
case $dir in
    /*/outrider-sshd-*) ;;
    *) exit 2 ;;
esac
while read -r line; do :; done
[ -d "$dir" ] || exit 0
printf '%s\n' "$dir/sshd_config" > "$dir/reaper.pattern" || exit 1
all=
for f in $(grep -laFf "$dir/reaper.pattern" /proc/[0-9]*/cmdline 2>/dev/null); do
    p=${f#/proc/}
    all="$all ${p%/cmdline}"
done
while [ -n "$all" ]; do
    kill -STOP $all 2>/dev/null
    new=
    for s in /proc/[0-9]*/stat; do
        read -r stat < "$s" 2>/dev/null || continue
        set -- ${stat##*") "}
        p=${s#/proc/}
        p=${p%/stat}
        case " $all " in
            *" $2 "*) case " $all $new " in *" $p "*) ;; *) new="$new $p" ;; esac ;;
        esac
    done
    [ -z "$new" ] && break
    all="$all $new"
done
[ -n "$all" ] && kill -KILL $all 2>/dev/null
rm -rf -- "$dir"
"#;

/// The reaper process of one sshd temp dir (see [`REAPER_SCRIPT`]). Holds the write end of the
/// reaper's stdin; [`Reaper::disarm`] (also on drop) kills the reaper without letting it act.
struct Reaper {
    child: Child,
}

impl Reaper {
    fn spawn(dir: &Path) -> Reaper {
        let child = Command::new("sh")
            .arg("-c")
            .arg(REAPER_SCRIPT)
            .arg("outrider-sshd-reaper")
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Out of the test's process group: a Ctrl-C or a group kill aimed at the test run
            // must leave the reaper alive to clean up after it.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start the sshd reaper (sh): {e}"));
        Reaper { child }
    }

    /// Kills the reaper (it never sees EOF, so it does nothing) and reaps it. Idempotent.
    fn disarm(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.disarm();
    }
}

/// Generates a user key pair with ssh-keygen in `dir`. `kind`: "ed25519" | "ecdsa" (P-256) |
/// "rsa" (3072 bits); `format`: "openssh" | "pem" (`ssh-keygen -m PEM`: PKCS#1 for rsa, SEC1 for
/// ecdsa; OpenSSH has no PEM form for ed25519 and writes the OpenSSH format anyway).
/// Returns (private key text, public key line `<type> <base64>`). The private key file is left in
/// `dir` (mode 0600), next to `<name>.pub`.
pub fn user_key(
    dir: &Path,
    kind: &str,
    passphrase: Option<&str>,
    format: &str,
) -> (String, String) {
    preflight_keygen();
    assert!(
        HOST_KEY_KINDS.contains(&kind),
        "key kind must be ed25519, ecdsa or rsa, not {kind:?}"
    );
    assert!(
        format == "openssh" || format == "pem",
        "key format must be openssh or pem, not {format:?}"
    );
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let path = loop {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("id_{kind}_{format}_{n}"));
        if !path.exists() {
            break path;
        }
    };
    let mut cmd = Command::new(SSH_KEYGEN);
    cmd.args(["-q", "-t", kind, "-N", passphrase.unwrap_or(""), "-C", ""]);
    if kind == "rsa" {
        cmd.args(["-b", "3072"]);
    }
    if format == "pem" {
        cmd.args(["-m", "PEM"]);
    }
    let out = cmd
        .arg("-f")
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {SSH_KEYGEN}: {e}: {INSTALL_HINT}"));
    assert!(
        out.status.success(),
        "ssh-keygen -t {kind} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let private = read_to_string(&path);
    let public = public_key_line(&read_to_string(&path.with_extension("pub")));
    (private, public)
}

fn read_log(path: &Path) -> String {
    String::from_utf8_lossy(&fs::read(path).unwrap_or_default()).into_owned()
}

/// The last 30 lines of the log from byte `from` on.
fn log_tail(path: &Path, from: usize) -> String {
    let log = read_log(path);
    let log = log.get(from..).unwrap_or(&log);
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Ready = sshd logged that it listens on our port, and `addr`:port answers with an SSH banner.
fn wait_ready(
    child: &mut Child,
    addr: Ipv4Addr,
    port: u16,
    log_path: &Path,
    log_start: usize,
) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    let listening = format!("Server listening on 0.0.0.0 port {port}.");
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "sshd exited with {status}; log:\n{}",
                log_tail(log_path, log_start)
            ));
        }
        let log = read_log(log_path);
        if log.get(log_start..).unwrap_or("").contains(&listening) && banner_ok(addr, port) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "sshd not accepting connections on {addr}:{port} after {START_TIMEOUT:?}; log:\n{}",
                log_tail(log_path, log_start)
            ));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Kills sshd's process group and every process below it (each connection runs in a session of
/// its own: sshd calls setsid), then reaps sshd.
fn stop_process(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let pid = child.id();
    // Freeze the listener so that it forks no new connection while we collect its tree.
    let _ = Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
    let mut targets = vec![format!("-{pid}")];
    targets.extend(descendants(pid).iter().map(u32::to_string));
    let killed = Command::new("kill")
        .arg("-KILL")
        .arg("--")
        .args(&targets)
        .stderr(Stdio::null())
        .status();
    if killed.is_err() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

fn preflight_keygen() {
    static OK: OnceLock<()> = OnceLock::new();
    OK.get_or_init(|| {
        let found = Command::new(SSH_KEYGEN)
            .arg("-?")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        assert!(found, "{SSH_KEYGEN} not found: {INSTALL_HINT}");
    });
}

fn preflight() {
    static OK: OnceLock<()> = OnceLock::new();
    OK.get_or_init(|| {
        assert!(Path::new(SSHD).exists(), "{SSHD} not found: {INSTALL_HINT}");
        preflight_keygen();
        assert!(
            effective_uid() == Some(0),
            "the SSH tests need root: sshd has to switch to the users that log in \
             (root, outrider-sudo, outrider-nosudo); run them as root, as CI does"
        );
        assert!(
            Path::new("/run/sshd").is_dir(),
            "/run/sshd (sshd's privilege separation dir) is missing: run e2e/deps.sh"
        );
        for user in ["outrider-sudo", "outrider-nosudo"] {
            let known = Command::new("id")
                .args(["-u", user])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(
                known,
                "test user {user} is missing: run e2e/deps.sh as root"
            );
        }
    });
}

fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// (major, minor) of the installed sshd, from `sshd -V` ("OpenSSH_9.2p1 Debian..., OpenSSL ...").
fn sshd_version() -> (u32, u32) {
    static VERSION: OnceLock<(u32, u32)> = OnceLock::new();
    *VERSION.get_or_init(|| {
        let out = Command::new(SSHD)
            .arg("-V")
            .output()
            .unwrap_or_else(|e| panic!("run {SSHD} -V: {e}: {INSTALL_HINT}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        let version = text
            .split("OpenSSH_")
            .nth(1)
            .unwrap_or_else(|| panic!("unexpected `sshd -V` output: {text}"));
        let mut parts = version.split(|c: char| !c.is_ascii_digit());
        let major = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let minor = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        (major, minor)
    })
}

fn render_config(
    dir: &Path,
    port: u16,
    host_keys: &[PathBuf],
    head: &str,
    tail: &str,
    sources: &[&str],
) -> String {
    let dir = dir.display();
    let mut c = String::from("# Generated by tests/support/sshd.rs\n");
    if !head.trim().is_empty() {
        c.push_str("# extra config (first value wins)\n");
        c.push_str(head.trim_end());
        c.push('\n');
    }
    c.push_str(&format!("ListenAddress 0.0.0.0\nPort {port}\n"));
    for key in host_keys {
        c.push_str(&format!("HostKey {}\n", key.display()));
    }
    // Defaults the extra config does not set itself. Most options keep the first value sshd
    // reads, but some (MaxStartups among them) keep the last, so never emit both.
    let overridden = |line: &str| {
        let key = line.split_whitespace().next().unwrap_or("");
        head.lines().any(|h| {
            h.split_whitespace()
                .next()
                .is_some_and(|k| k.eq_ignore_ascii_case(key))
        })
    };
    let defaults = format!(
        "PidFile {dir}/sshd.pid
LogLevel VERBOSE
MaxStartups 1000:30:1000
MaxSessions 1000
UsePAM no
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
AuthorizedKeysFile {dir}/authorized_keys/%u
AcceptEnv *
ClientAliveInterval 0
UseDNS no
PrintMotd no
PrintLastLog no
Subsystem sftp internal-sftp
"
    );
    for line in defaults.lines().filter(|l| !overridden(l)) {
        c.push_str(line);
        c.push('\n');
    }
    if sshd_version() >= (9, 8) {
        // Tests fail logins on purpose; penalties would then lock 127.0.0.1 out.
        c.push_str("PerSourcePenalties no\n");
    }
    if !tail.trim().is_empty() {
        c.push_str("# extra config (Match blocks)\n");
        c.push_str(tail.trim_end());
        c.push('\n');
    }
    // Last, so that it closes any Match block above: listening on 0.0.0.0 must not let the
    // network in.
    let allowed: String = sources.iter().map(|s| format!(",!{s}")).collect();
    c.push_str(&format!("Match Address *{allowed}\n    DenyUsers *\n"));
    c
}

/// Splits extra config into the lines before the first `Match` and the rest.
fn split_extra_config(extra: &str) -> (&str, &str) {
    let mut offset = 0;
    for line in extra.split_inclusive('\n') {
        let keyword = line.split_whitespace().next().unwrap_or("");
        if keyword.eq_ignore_ascii_case("match") {
            return (&extra[..offset], &extra[offset..]);
        }
        offset += line.len();
    }
    (extra, "")
}

fn free_port() -> u16 {
    TcpListener::bind("0.0.0.0:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free port")
}

fn banner_ok(addr: Ipv4Addr, port: u16) -> bool {
    let addr = SocketAddr::from((addr, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut banner = [0u8; 8];
    stream.read_exact(&mut banner).is_ok() && &banner == b"SSH-2.0-"
}

/// `(pid, ppid)` of every process, from /proc/<pid>/stat.
pub fn process_table() -> Vec<(u32, u32)> {
    let mut table = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return table;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        // After "(comm)": state, ppid, ...
        if let Some(ppid) = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok())
        {
            table.push((pid, ppid));
        }
    }
    table
}

/// Every process below `root` (by parent pid), depth first.
pub fn descendants(root: u32) -> Vec<u32> {
    let parents = process_table();
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(parent) = stack.pop() {
        for &(pid, ppid) in &parents {
            if ppid == parent && !out.contains(&pid) {
                out.push(pid);
                stack.push(pid);
            }
        }
    }
    out
}

fn clock_ticks_per_second() -> f64 {
    static HZ: OnceLock<f64> = OnceLock::new();
    *HZ.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .filter(|hz| *hz > 0.0)
            .unwrap_or(100.0)
    })
}

/// `<type> <base64>` from a public key file's line (drops the comment).
fn public_key_line(text: &str) -> String {
    let mut parts = text.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(kind), Some(blob)) => format!("{kind} {blob}"),
        _ => panic!("malformed public key {text:?}"),
    }
}

fn read_to_string(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {:o} {}: {e}", mode, path.display()));
}
