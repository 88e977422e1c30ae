//! Firewall test hosts: each [`NetnsHost`] is a Linux network namespace with its own OpenSSH
//! sshd (port 22) and TCP listeners, linked to the test's (root) namespace by a veth pair, so a
//! test can push an nftables/iptables ruleset to it over SSH and then prove, with real TCP
//! connections from chosen source addresses, which ports the ruleset leaves open.
//!
//! Usage from `tests/<name>.rs` (needs `sshd` next to it):
//!
//! ```ignore
//! #[path = "support/sshd.rs"]
//! mod sshd;
//! #[path = "support/netns.rs"]
//! mod netns;
//!
//! let host = netns::NetnsHost::start(&[80, 443]);
//! host.sshd.authorize("outrider-sudo", &public_key); // then ssh to host.addr:22
//! let known_hosts = host.known_hosts();
//! // … push a ruleset (sudo nft -f …) …
//! assert!(host.tcp_open(host.operator, 443, Duration::from_secs(1)));
//! assert!(!host.tcp_open(host.other, 80, Duration::from_secs(1)));
//! ```
//!
//! Addressing: host slot N (1..=250) owns 198.18.N.0/24 (RFC 2544 benchmarking space, never
//! routed anywhere real). The root side of the veth (`ortv<N>`) has .1 (`operator`, the source the
//! kernel picks for connections to the host) and .3 (`other`, a second source to bind to); the
//! namespace side (`eth0` in namespace `ortest-<pid>-<N>`) has .2 (`addr`). The namespace has no
//! default route: it can only talk to its /24.
//!
//! State: sshd runs under `ip netns exec`, which gives it a mount namespace of its own (`/` made
//! rslave), and mounts a tmpfs on `/var/lib/outrider` there, so each host (its sshd, its SSH
//! sessions and [`NetnsHost::exec`]) has its own, empty state dir and nothing leaks into the
//! root mount namespace. Only the (empty) mount point directory is created on the shared disk.
//!
//! Slots are shared by every test process on the machine: a slot is taken by creating the veth
//! `ortv<N>`, which the kernel does atomically ("File exists" = taken).
//!
//! Cleanup: dropping a host kills every process in its namespace, deletes the veth and the
//! namespace. If the test process dies instead (even by SIGKILL), a reaper (`sh`, one per test
//! process, blocking on a pipe only that process holds) does the same for all of that process's
//! namespaces; the sshd's own reaper (sshd.rs) kills sshd too. Leftovers of a run whose reaper
//! could not act (it was killed too) are swept by the next [`NetnsHost::start`] of any test
//! process: namespaces `ortest-<pid>-*` whose pid is gone.
//!
//! Nothing for a host may leave through the machine's default route, not even a late FIN of a
//! connection that outlives its host's veth: the first host of each test process makes sure the
//! root namespace has the route `unreachable 198.18.0.0/15` (left in place: the per-slot /24 routes
//! of the veths are more specific, and any other 198.18.x.y fails fast with "No route to host").
//! [`NetnsHost::tcp_open`] binds its socket to the veth on top of that.
//!
//! Requirements (never skipped): root; `ip` (iproute2), `nsenter` (util-linux), `python3`, `nft`
//! (nftables), plus everything `sshd.rs` needs. `e2e/deps.sh`, run as root, installs them.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::Duration;

use crate::sshd;

/// Slots 1..=250: 198.18.<slot>.0/24.
const SLOTS: std::ops::RangeInclusive<u8> = 1..=250;
const NETNS_PREFIX: &str = "ortest-";
const VETH_PREFIX: &str = "ortv";
/// The whole test range; slot N's veth routes 198.18.N.0/24.
const FENCE: &str = "198.18.0.0/15";
const LISTENER_START_TIMEOUT: Duration = Duration::from_secs(20);
const INSTALL_HINT: &str = "run e2e/deps.sh as root";

/// Deletes one namespace: kills every process in it (frozen first, round after round, so none
/// forks away unseen), deletes its veth from the inside (which takes the root-side end along, and
/// cannot hit another run's veth of the same name), then the namespace. Idempotent; `$ns` must
/// not be empty.
const CLEAN_NS_FN: &str = r#"
clean_ns() {
    ns=$1
    case $ns in ortest-*) ;; *) return 2 ;; esac
    n=0
    while [ $n -lt 100 ]; do
        pids=$(ip netns pids "$ns" 2>/dev/null)
        [ -z "$pids" ] && break
        kill -STOP $pids 2>/dev/null
        kill -KILL $pids 2>/dev/null
        sleep 0.01
        n=$((n + 1))
    done
    ip -n "$ns" link del eth0 2>/dev/null
    ip netns del "$ns" 2>/dev/null
    return 0
}
"#;

/// The per-process reaper: $1 is `ortest-<pid>-`. Blocks until its stdin (a pipe whose write end
/// only the test process holds) reaches EOF, i.e. until that process is gone, then deletes every
/// namespace of that process. HUP/INT are ignored so a Ctrl-C of the test run leaves it to act.
const REAPER_SCRIPT: &str = r#"
trap '' HUP INT
prefix=$1
case $prefix in ortest-[0-9]*-) ;; *) exit 2 ;; esac
while read -r line; do :; done
for ns in $(ip netns list 2>/dev/null | cut -d' ' -f1); do
    case $ns in "$prefix"*) clean_ns "$ns" ;; esac
done
"#;

/// Accepts and closes connections on every port in argv, on 0.0.0.0, forever. Prints `ready`
/// once all of them listen. Exits when stdin (a pipe from the test process) reaches EOF: the
/// host was dropped or the test process died. (Not PR_SET_PDEATHSIG: that fires when the *thread*
/// that spawned the child ends, and every Rust test runs on a thread of its own.)
const LISTENER_SCRIPT: &str = r#"
import os, selectors, socket, sys, threading

def watch_stdin():
    try:
        sys.stdin.buffer.read()
    finally:
        os._exit(0)

threading.Thread(target=watch_stdin, daemon=True).start()
sel = selectors.DefaultSelector()
for port in sys.argv[1:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(port)))
    s.listen(512)
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        try:
            conn, _ = key.fileobj.accept()
            conn.close()
        except OSError:
            pass
"#;

/// One firewall test host. Dropping it kills its listeners, sshd and sessions, and deletes its
/// veth and namespace.
pub struct NetnsHost {
    /// The network namespace, `ortest-<pid>-<slot>`.
    pub netns: String,
    /// N: the host uses 198.18.N.0/24.
    pub slot: u8,
    /// 198.18.N.2, the namespace side of the veth: the host's address (sshd on port 22).
    pub addr: Ipv4Addr,
    /// 198.18.N.1, the root side's primary address: the source of connections to `addr` that do
    /// not bind one (the tests' SSH connections).
    pub operator: Ipv4Addr,
    /// 198.18.N.3, the root side's second address: an "untrusted" source to bind to.
    pub other: Ipv4Addr,
    /// The root-side end of the veth, `ortv<N>`.
    pub veth: String,
    /// The ports the listener accepts connections on (inside the namespace, on 0.0.0.0).
    pub tcp_ports: Vec<u16>,
    /// The sshd inside the namespace (port 22, logins from 198.18.0.0/15 and loopback).
    pub sshd: sshd::Sshd,
    listener: Option<Child>,
    namespace: Namespace,
}

impl NetnsHost {
    /// Creates the namespace, veth, addresses, lo up, a tmpfs at /var/lib/outrider visible only to
    /// this host's sshd and its sessions, starts sshd (port 22) and TCP listeners on `tcp_ports`
    /// inside it, and returns once all of them accept connections from `operator`.
    pub fn start(tcp_ports: &[u16]) -> NetnsHost {
        NetnsHost::start_with(tcp_ports, "")
    }

    /// Like [`NetnsHost::start`], with `sshd_extra_config` added to the sshd config (see
    /// [`sshd::Sshd::start_with`]).
    pub fn start_with(tcp_ports: &[u16], sshd_extra_config: &str) -> NetnsHost {
        preflight();
        for port in tcp_ports {
            assert!(
                *port != 0 && *port != 22,
                "listener port {port}: 0 is no port and sshd has 22"
            );
        }
        init_process();
        sweep(false);
        let namespace = Namespace::allocate();
        let slot = namespace.slot;
        let netns = namespace.name.clone();
        let veth = format!("{VETH_PREFIX}{slot}");
        let addr = Ipv4Addr::new(198, 18, slot, 2);
        let operator = Ipv4Addr::new(198, 18, slot, 1);
        let other = Ipv4Addr::new(198, 18, slot, 3);

        // .1 first: the first address of a subnet is the primary one, the source the kernel
        // picks for the connected route; .3 becomes secondary.
        ip(&["addr", "add", &format!("{operator}/24"), "dev", &veth]);
        ip(&["addr", "add", &format!("{other}/24"), "dev", &veth]);
        ip(&["link", "set", &veth, "up"]);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        ip(&["-n", &netns, "link", "set", "lo", "up"]);

        let sshd = sshd::Sshd::start_in_netns(&netns, addr, sshd_extra_config);
        let mut host = NetnsHost {
            netns,
            slot,
            addr,
            operator,
            other,
            veth,
            tcp_ports: tcp_ports.to_vec(),
            sshd,
            listener: None,
            namespace,
        };
        if !tcp_ports.is_empty() {
            host.listener = Some(start_listener(&host.netns, tcp_ports));
            for &port in tcp_ports {
                assert!(
                    host.tcp_open(host.operator, port, Duration::from_secs(5)),
                    "listener port {port} of {} does not accept connections from {}",
                    host.netns,
                    host.operator
                );
            }
        }
        host
    }

    /// Whether a TCP connection from `from` (an address of the root side, e.g. `operator` or
    /// `other`) to `addr`:`port` completes within `timeout`. Refused, reset, unreachable or timed
    /// out: false. The socket is bound to `from` and to this host's veth before it connects, so
    /// nothing is ever sent anywhere else; a `from` this machine does not have is a test bug and
    /// panics.
    pub fn tcp_open(&self, from: Ipv4Addr, port: u16, timeout: Duration) -> bool {
        use socket2::{Domain, Protocol, SockAddr, Socket, Type};
        use std::io::ErrorKind;
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
            .expect("create a TCP socket");
        socket
            .bind_device(Some(self.veth.as_bytes()))
            .unwrap_or_else(|e| panic!("bind the probe socket to {}: {e}", self.veth));
        socket
            .bind(&SockAddr::from(SocketAddrV4::new(from, 0)))
            .unwrap_or_else(|e| panic!("bind the probe socket to {from}: {e}"));
        let to = SockAddr::from(SocketAddrV4::new(self.addr, port));
        match socket.connect_timeout(&to, timeout) {
            Ok(()) => true,
            Err(e) => match e.kind() {
                ErrorKind::ConnectionRefused
                | ErrorKind::ConnectionReset
                | ErrorKind::TimedOut
                | ErrorKind::HostUnreachable
                | ErrorKind::NetworkUnreachable => false,
                _ => panic!("connect {from} -> {}:{port}: {e}", self.addr),
            },
        }
    }

    /// Runs `argv` inside the host, as root: in its network namespace and in its sshd's mount
    /// namespace (so /var/lib/outrider is the host's own tmpfs), via `nsenter -t <sshd pid> -n -m`.
    pub fn exec(&self, argv: &[&str]) -> Output {
        assert!(!argv.is_empty(), "exec needs a command");
        Command::new("nsenter")
            .args(["-t", &self.sshd.pid().to_string(), "-n", "-m", "--"])
            .args(argv)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run nsenter (util-linux): {e}: {INSTALL_HINT}"))
    }

    /// known_hosts lines for `addr` (port 22, so the bare address, as OpenSSH looks it up) with
    /// every host key of the host's sshd.
    pub fn known_hosts(&self) -> String {
        self.sshd.known_hosts_for(&[&self.addr.to_string()])
    }

    /// The pid of the TCP listener process (`None` without `tcp_ports`).
    pub fn listener_pid(&self) -> Option<u32> {
        self.listener.as_ref().map(Child::id)
    }
}

impl Drop for NetnsHost {
    fn drop(&mut self) {
        // Everything in the namespace goes: listener, sshd, sessions. The `sshd` field is dropped
        // after this and finds its process already dead (it only reaps it and removes its dir).
        self.namespace.clean();
        if let Some(mut listener) = self.listener.take() {
            drop(listener.stdin.take());
            let _ = listener.kill();
            let _ = listener.wait();
        }
    }
}

/// A namespace and its veth, owned by this process. Deleted on drop, so a `start` that panics
/// halfway leaves nothing behind.
struct Namespace {
    name: String,
    slot: u8,
    cleaned: bool,
}

impl Namespace {
    /// Takes the first free slot: creates namespace `ortest-<pid>-<N>` (exclusive within this
    /// process) and the veth `ortv<N>` with its peer created directly as `eth0` inside it
    /// (exclusive machine-wide; no half-made pair is ever left in the root namespace).
    fn allocate() -> Namespace {
        let pid = std::process::id();
        for slot in SLOTS {
            let name = format!("{NETNS_PREFIX}{pid}-{slot}");
            let out = ip_output(&["netns", "add", &name]);
            if !out.status.success() {
                let err = String::from_utf8_lossy(&out.stderr);
                if err.contains("File exists") {
                    continue; // another test of this process has the slot
                }
                panic!("ip netns add {name}: {err}");
            }
            let mut namespace = Namespace {
                name,
                slot,
                cleaned: false,
            };
            let veth = format!("{VETH_PREFIX}{slot}");
            let out = ip_output(&[
                "link",
                "add",
                &veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &namespace.name,
            ]);
            if out.status.success() {
                return namespace;
            }
            namespace.clean();
            let err = String::from_utf8_lossy(&out.stderr);
            if !err.contains("File exists") {
                panic!("ip link add {veth} type veth: {err}");
            }
        }
        panic!(
            "no free slot: {VETH_PREFIX}1..{VETH_PREFIX}250 all exist (leftovers? `ip link | grep {VETH_PREFIX}`)"
        );
    }

    fn clean(&mut self) {
        if !self.cleaned {
            clean_ns(&self.name);
            self.cleaned = true;
        }
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        self.clean();
    }
}

/// Runs [`CLEAN_NS_FN`] on one namespace.
fn clean_ns(name: &str) {
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!("{CLEAN_NS_FN}\nclean_ns \"$1\""))
        .arg("outrider-netns-clean")
        .arg(name)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Once per test process, before its first namespace: sweeps namespaces named for this pid (a
/// dead process that had the same pid left them: none of ours exists yet) and starts the reaper.
fn init_process() {
    // The Child keeps the write end of the reaper's stdin until this process exits. The reaper
    // is never waited for: it outlives us by design (and is reparented to init).
    static REAPER: OnceLock<Child> = OnceLock::new();
    REAPER.get_or_init(|| {
        sweep(true);
        fence_off_the_range();
        let prefix = format!("{NETNS_PREFIX}{}-", std::process::id());
        Command::new("sh")
            .arg("-c")
            .arg(format!("{CLEAN_NS_FN}\n{REAPER_SCRIPT}"))
            .arg("outrider-netns-reaper")
            .arg(prefix)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Out of the test's process group: a Ctrl-C or a group kill aimed at the test run
            // must leave the reaper alive to clean up after it.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start the netns reaper (sh): {e}"))
    });
}

/// Makes sure 198.18.0.0/15 is unreachable in the root namespace except through the veths (see
/// the module doc). A route someone else already has for exactly this prefix is kept.
fn fence_off_the_range() {
    let out = ip_output(&["route", "add", "unreachable", FENCE]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || err.contains("File exists"),
        "ip route add unreachable {FENCE}: {err}"
    );
}

/// Deletes namespaces `ortest-<pid>-*` whose pid no longer exists (and, with `own_too`, those
/// named for this process).
fn sweep(own_too: bool) {
    let me = std::process::id();
    for name in netns_names() {
        let Some(pid) = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let stale = if pid == me {
            own_too
        } else {
            !Path::new(&format!("/proc/{pid}")).exists()
        };
        if stale {
            clean_ns(&name);
        }
    }
}

/// Names in `ip netns list` ("name" or "name (id: 3)").
pub fn netns_names() -> Vec<String> {
    let out = ip_output(&["netns", "list"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Whether a network interface of this name exists in the root namespace.
pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Starts [`LISTENER_SCRIPT`] in the namespace and waits until it reports all ports listening.
fn start_listener(netns: &str, ports: &[u16]) -> Child {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "python3", "-c", LISTENER_SCRIPT])
        .args(ports.iter().map(u16::to_string))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start the listener (ip netns exec … python3): {e}"));
    let stdout = child.stdout.take().expect("listener stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    match rx.recv_timeout(LISTENER_START_TIMEOUT) {
        Ok(line) if line.trim() == "ready" => child,
        outcome => {
            let _ = child.kill();
            let _ = child.wait();
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                let _ = stderr.read_to_string(&mut err);
            }
            panic!("the listener on {ports:?} in {netns} did not start ({outcome:?}): {err}");
        }
    }
}

fn ip_output(args: &[&str]) -> Output {
    Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run ip (iproute2): {e}: {INSTALL_HINT}"))
}

/// `ip <args>`, panicking with its stderr on failure.
fn ip(args: &[&str]) {
    let out = ip_output(args);
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

fn preflight() {
    static OK: OnceLock<()> = OnceLock::new();
    OK.get_or_init(|| {
        assert!(
            effective_uid() == Some(0),
            "the netns test hosts need root (network namespaces, veths, mounts, sshd): \
             run the tests as root, as CI does"
        );
        for (cmd, arg, package) in [
            ("ip", "-V", "iproute2"),
            ("nsenter", "--version", "util-linux"),
            ("python3", "--version", "python3"),
            ("nft", "--version", "nftables"),
        ] {
            let ok = Command::new(cmd)
                .arg(arg)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                ok,
                "`{cmd}` not found or not working: install {package} ({INSTALL_HINT})"
            );
        }
    });
}

fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// A Fleet that logs in to `hosts` as `outrider-sudo` (passwordless sudo) with a fresh key
/// made in `keys`, escalating to root (nft and iptables need it), pinning every host's keys.
pub fn sudo_fleet(hosts: &[&NetnsHost], keys: &Path) -> outrider::ssh::Fleet {
    let (private_key, public_key) = sshd::user_key(keys, "ed25519", None, "openssh");
    let mut known = String::new();
    for h in hosts {
        h.sshd.authorize("outrider-sudo", &public_key);
        known.push_str(&h.known_hosts());
    }
    let credentials =
        outrider::ssh::Credentials::new(&private_key, None, &known).expect("credentials");
    let mut config = outrider::ssh::ClientConfig::new("outrider-sudo");
    config.become_user = Some("root".into());
    config.connect_timeout = Duration::from_secs(2);
    outrider::ssh::Fleet::new(config, credentials)
}

/// Endpoints `host-<i>` for `hosts`, port 22.
pub fn endpoints(hosts: &[&NetnsHost]) -> Vec<outrider::ssh::Endpoint> {
    hosts
        .iter()
        .enumerate()
        .map(|(i, h)| outrider::ssh::Endpoint::new(format!("host-{i}"), h.addr.to_string(), 22))
        .collect()
}
