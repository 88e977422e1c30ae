//! SecurityPolicy against real kernels: each host is a network namespace with its own sshd
//! and TCP listeners, linked to the root namespace by a veth pair (tests/support/netns.rs).
//! Rulesets are pushed over SSH by the engine the controller uses, then proven by real
//! connections from chosen source addresses. Run as root (CI is).

#[path = "support/netns.rs"]
mod netns;
#[path = "support/sshd.rs"]
mod sshd;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use netns::NetnsHost;
use outrider::api::security_policy::{Backend, SecurityPolicySpec};
use outrider::engine::firewall::apply::{self, Live};
use outrider::engine::firewall::rollout::{self, HostResult, Progress, Report, Settings};
use outrider::engine::firewall::{Compiled, Meta, Output, compile, compile_for, parse_owner};
use outrider::engine::plan::Amount;
use outrider::ssh::{Endpoint, Fleet};

/// Has passwordless sudo: nft needs root.
const USER: &str = "outrider-sudo";
const POLICY: &str = "test/fw";
const PROBE: Duration = Duration::from_millis(700);

fn fleet(hosts: &[&NetnsHost], keys: &Path) -> Fleet {
    netns::sudo_fleet(hosts, keys)
}

fn endpoints(hosts: &[&NetnsHost]) -> Vec<Endpoint> {
    netns::endpoints(hosts)
}

fn spec(yaml: &str) -> SecurityPolicySpec {
    serde_yaml::from_str(yaml).expect("policy yaml")
}

fn compiled(spec: &SecurityPolicySpec, generation: i64) -> Arc<Compiled> {
    Arc::new(
        compile(
            spec,
            &Meta {
                policy: POLICY.into(),
                generation,
            },
        )
        .expect("compiles"),
    )
}

fn settings(confirm: Duration) -> Settings {
    Settings {
        policy: POLICY.into(),
        batch_size: Amount::Count(1),
        max_unavailable: Amount::Count(0),
        confirm,
        repair_drift: false,
        hold: BTreeMap::new(),
    }
}

async fn run(
    fleet: &Fleet,
    hosts: &[Endpoint],
    c: &Arc<Compiled>,
    recorded: &BTreeMap<String, String>,
    s: &Settings,
) -> (Report, Vec<String>) {
    let log = std::sync::Mutex::new(Vec::new());
    let progress = |p: Progress| {
        let line = match p {
            Progress::Batch { index, hosts } => format!("batch {index}: {}", hosts.join(",")),
            Progress::Done { host, result } => format!("done {host}: {result:?}"),
            Progress::Halted { failed, budget } => format!("halted {failed}>{budget}"),
            Progress::Planned { pending } => format!("planned {}", pending.join(",")),
            Progress::Step { host, step } => format!("step {host}: {step:?}"),
        };
        log.lock().unwrap().push(line);
    };
    let report = rollout::run(fleet, hosts, c, recorded, s, &progress).await;
    let log = log.into_inner().unwrap();
    (report, log)
}

fn digest(r: &HostResult) -> String {
    match r {
        HostResult::Applied { digest } | HostResult::Unchanged { digest } => digest.clone(),
        other => panic!("expected an applied host, got {other:?}"),
    }
}

fn nft_list(host: &NetnsHost) -> String {
    let out = host.exec(&["nft", "list", "ruleset"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn read_live(fleet: &Fleet, ep: &Endpoint, backend: Backend) -> Live {
    let session = fleet.connect(ep).await.expect("ssh to the host");
    let live = apply::read(&session, backend, Duration::from_secs(20))
        .await
        .expect("read-back");
    session.close().await;
    live
}

/// The web policy: HTTP from anywhere, 8080 only from the operator's address, 9000 denied,
/// everything else dropped; SSH is the failsafe from the operator's address only.
fn web_policy(h: &NetnsHost, backend: &str) -> SecurityPolicySpec {
    spec(&format!(
        r#"
targets: {{inventoryRef: {{name: fleet}}}}
backend: {backend}
zones:
  trust: ["{op}/32"]
  untrust: [0.0.0.0/0]
defaultInput: drop
rules:
  - {{name: allow_web, action: allow, from: untrust, protocol: tcp, ports: [80]}}
  - {{name: allow_admin, action: allow, from: trust, protocol: tcp, ports: [8080]}}
  - {{name: deny_9000, action: deny, from: untrust, protocol: tcp, ports: [9000]}}
failsafe: {{ports: [22], sources: ["{op}/32"]}}
"#,
        op = h.operator
    ))
}

fn assert_web_policy_enforced(h: &NetnsHost) {
    let cases = [
        (h.operator, 80, true),
        (h.other, 80, true),
        (h.operator, 8080, true),
        (h.other, 8080, false),
        (h.operator, 9000, false),
        (h.other, 443, false),
        (h.operator, 22, true),
        (h.other, 22, false),
    ];
    for (from, port, open) in cases {
        assert_eq!(
            h.tcp_open(from, port, PROBE),
            open,
            "{from} -> {}:{port} should be {}",
            h.addr,
            if open { "open" } else { "blocked" }
        );
    }
}

#[tokio::test]
async fn an_applied_policy_blocks_and_allows_real_connections_by_source_and_leaves_other_tables_alone()
 {
    let h = NetnsHost::start(&[80, 443, 8080, 9000]);
    // the host's own firewall table must survive every apply
    let own = h.exec(&[
        "nft",
        "add table inet hostfw; add chain inet hostfw c { type filter hook input priority 10; policy accept; }; add rule inet hostfw c tcp dport 7777 drop",
    ]);
    assert!(
        own.status.success(),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );
    let keys = tempfile::tempdir().unwrap();
    let fleet = fleet(&[&h], keys.path());
    let hosts = endpoints(&[&h]);
    // before: everything open
    assert!(h.tcp_open(h.other, 8080, PROBE) && h.tcp_open(h.other, 443, PROBE));

    let c = compiled(&web_policy(&h, "nftables"), 1);
    let (report, log) = run(
        &fleet,
        &hosts,
        &c,
        &BTreeMap::new(),
        &settings(Duration::from_secs(20)),
    )
    .await;
    assert!(
        matches!(report.hosts["host-0"], HostResult::Applied { .. }),
        "{report:?}\n{log:#?}"
    );
    assert!(log.iter().any(|l| l.contains("Confirming")), "{log:#?}");
    assert_web_policy_enforced(&h);
    let ruleset = nft_list(&h);
    assert!(
        ruleset.contains("table inet hostfw") && ruleset.contains("tcp dport 7777 drop"),
        "{ruleset}"
    );
    assert!(
        ruleset.contains(&format!("outrider {POLICY} g1 {}", c.short_hash())),
        "{ruleset}"
    );
    // the timer was cancelled: the ruleset is still there after the confirm window
    let live = read_live(&fleet, &hosts[0], Backend::Nftables).await;
    assert_eq!(
        live.digest.as_deref(),
        Some(digest(&report.hosts["host-0"]).as_str())
    );
    assert_eq!(
        parse_owner(live.tag.as_deref().unwrap()).unwrap().hash32,
        c.short_hash()
    );

    // a second pass finds it current and pushes nothing
    let recorded = BTreeMap::from([("host-0".to_string(), digest(&report.hosts["host-0"]))]);
    let (again, _) = run(
        &fleet,
        &hosts,
        &c,
        &recorded,
        &settings(Duration::from_secs(20)),
    )
    .await;
    assert!(
        matches!(again.hosts["host-0"], HostResult::Unchanged { .. }),
        "{again:?}"
    );
    assert!(again.pushed.is_empty());
}

#[tokio::test]
async fn a_policy_that_locks_out_ssh_is_rolled_back_by_the_host_and_ssh_works_again() {
    let h = NetnsHost::start(&[80, 443, 8080, 9000]);
    let keys = tempfile::tempdir().unwrap();
    let fleet = fleet(&[&h], keys.path());
    let hosts = endpoints(&[&h]);
    // a good ruleset first: the one the host must return to
    let good = compiled(&web_policy(&h, "nftables"), 1);
    let (report, log) = run(
        &fleet,
        &hosts,
        &good,
        &BTreeMap::new(),
        &settings(Duration::from_secs(20)),
    )
    .await;
    assert!(
        matches!(report.hosts["host-0"], HostResult::Applied { .. }),
        "{log:#?}"
    );
    let good_digest = digest(&report.hosts["host-0"]);

    // SSH denied to everyone and no failsafe on it
    let lockout = compiled(
        &spec(
            r#"
targets: {inventoryRef: {name: fleet}}
defaultInput: drop
rules:
  - {name: deny_ssh, action: deny, protocol: tcp, ports: [22]}
  - {name: allow_web, action: allow, protocol: tcp, ports: [80]}
failsafe: {ports: [2222]}
"#,
        ),
        2,
    );
    let confirm = Duration::from_secs(5);
    let started = Instant::now();
    let recorded = BTreeMap::from([("host-0".to_string(), good_digest.clone())]);
    let (report, log) = run(&fleet, &hosts, &lockout, &recorded, &settings(confirm)).await;
    match &report.hosts["host-0"] {
        HostResult::Failed {
            reason,
            rolled_back: true,
            message,
        } => assert_eq!(reason, "NotConfirmed", "{message}"),
        other => panic!("expected RolledBack, got {other:?}\n{log:#?}"),
    }
    // the host restores the good ruleset by itself within confirmTimeout + a few seconds
    let deadline = started + confirm + Duration::from_secs(8);
    while !h.tcp_open(h.operator, 22, PROBE) {
        assert!(
            Instant::now() < deadline,
            "SSH still blocked {:?} after the apply:\n{}",
            started.elapsed(),
            nft_list(&h)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // proven by a new connection: the live ruleset is the good one, byte for byte
    let live = read_live(&fleet, &hosts[0], Backend::Nftables).await;
    assert_eq!(live.digest, Some(good_digest), "{}", nft_list(&h));
    assert_web_policy_enforced(&h);
    let state = h.exec(&["cat", "/var/lib/outrider/firewall/rolled-back"]);
    assert!(
        state.status.success(),
        "the waiter left no rolled-back record"
    );

    // held, not retried with the same ruleset: the next pass leaves the host alone
    let mut s = settings(confirm);
    s.hold
        .insert("host-0".into(), ("NotConfirmed".into(), "x".into()));
    let (again, _) = run(&fleet, &hosts, &lockout, &recorded, &s).await;
    assert!(again.pushed.is_empty(), "{again:?}");
}

#[tokio::test]
async fn a_ruleset_the_kernel_rejects_fails_with_nfts_message_and_changes_nothing() {
    let h = NetnsHost::start(&[80]);
    let keys = tempfile::tempdir().unwrap();
    let fleet = fleet(&[&h], keys.path());
    let hosts = endpoints(&[&h]);
    let good = compiled(&web_policy(&h, "nftables"), 1);
    let (report, _) = run(
        &fleet,
        &hosts,
        &good,
        &BTreeMap::new(),
        &settings(Duration::from_secs(20)),
    )
    .await;
    let good_digest = digest(&report.hosts["host-0"]);

    // what a kernel without a needed feature answers: an expression nft cannot take
    let Output::Nft(text) = &good.output else {
        unreachable!()
    };
    let broken = Arc::new(Compiled {
        output: Output::Nft(text.replace(
            "ct state established,related accept",
            "ct state established,related meta outrider-feature 1 accept",
        )),
        hash: "sha256:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff".into(),
        ..(*good).clone()
    });
    let recorded = BTreeMap::from([("host-0".to_string(), good_digest.clone())]);
    let (report, log) = run(
        &fleet,
        &hosts,
        &broken,
        &recorded,
        &settings(Duration::from_secs(20)),
    )
    .await;
    match &report.hosts["host-0"] {
        HostResult::Failed {
            reason,
            message,
            rolled_back: false,
        } => {
            assert_eq!(reason, "RulesetRejected", "{message}");
            assert!(
                message.contains("nft -c") && message.contains("Error"),
                "{message}"
            );
        }
        other => panic!("expected RulesetRejected, got {other:?}\n{log:#?}"),
    }
    let live = read_live(&fleet, &hosts[0], Backend::Nftables).await;
    assert_eq!(live.digest, Some(good_digest), "nothing may change");
    // and no restore timer is left waiting
    let waiter = h.exec(&[
        "sh",
        "-c",
        // a zombie (this sandbox's init does not reap) is not a waiter
        "p=$(cat /var/lib/outrider/firewall/rollback.pid 2>/dev/null) && [ -e /proc/$p ] && ! grep -q '^State:.*Z' /proc/$p/status && echo alive || echo none",
    ]);
    assert_eq!(String::from_utf8_lossy(&waiter.stdout).trim(), "none");
}

#[tokio::test]
async fn drift_made_by_hand_is_reported_and_repaired_under_reconcile() {
    let h = NetnsHost::start(&[80, 9999]);
    let keys = tempfile::tempdir().unwrap();
    let fleet = fleet(&[&h], keys.path());
    let hosts = endpoints(&[&h]);
    let c = compiled(&web_policy(&h, "nftables"), 1);
    let (report, _) = run(
        &fleet,
        &hosts,
        &c,
        &BTreeMap::new(),
        &settings(Duration::from_secs(20)),
    )
    .await;
    let applied = digest(&report.hosts["host-0"]);
    let recorded = BTreeMap::from([("host-0".to_string(), applied.clone())]);
    assert!(!h.tcp_open(h.other, 9999, PROBE));

    // someone opens a port by hand inside Outrider's table
    let out = h.exec(&[
        "nft",
        "insert rule inet outrider input tcp dport 9999 accept",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(h.tcp_open(h.other, 9999, PROBE));

    let (report, _) = run(
        &fleet,
        &hosts,
        &c,
        &recorded,
        &settings(Duration::from_secs(20)),
    )
    .await;
    match &report.hosts["host-0"] {
        HostResult::Drifted { message } => {
            assert!(message.contains("outside Outrider"), "{message}")
        }
        other => panic!("expected Drifted, got {other:?}"),
    }
    assert!(report.pushed.is_empty(), "Report changes nothing");
    assert!(h.tcp_open(h.other, 9999, PROBE));

    let mut s = settings(Duration::from_secs(20));
    s.repair_drift = true;
    let (report, _) = run(&fleet, &hosts, &c, &recorded, &s).await;
    assert_eq!(report.drift.len(), 1);
    assert_eq!(
        report.hosts["host-0"],
        HostResult::Applied { digest: applied },
        "the repaired table reads back as the original"
    );
    assert!(!h.tcp_open(h.other, 9999, PROBE));

    // a deleted table is drift too
    let out = h.exec(&["nft", "delete table inet outrider"]);
    assert!(out.status.success());
    let (report, _) = run(
        &fleet,
        &hosts,
        &c,
        &recorded,
        &settings(Duration::from_secs(20)),
    )
    .await;
    assert!(
        matches!(&report.hosts["host-0"], HostResult::Drifted { message } if message.contains("removed")),
        "{report:?}"
    );
}

#[tokio::test]
async fn the_iptables_backend_replaces_only_its_own_chain() {
    let h = NetnsHost::start(&[80, 443, 8080, 9000]);
    let own = h.exec(&[
        "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "7777", "-j", "DROP",
    ]);
    assert!(
        own.status.success(),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );
    let keys = tempfile::tempdir().unwrap();
    let fleet = fleet(&[&h], keys.path());
    let hosts = endpoints(&[&h]);
    let s = web_policy(&h, "iptables");
    let c = Arc::new(
        compile_for(
            &s,
            Backend::Iptables,
            &Meta {
                policy: POLICY.into(),
                generation: 1,
            },
        )
        .unwrap(),
    );
    for pass in 0..2 {
        // the second pass re-applies a new generation: still one jump, still the host's rule
        let c = if pass == 0 {
            c.clone()
        } else {
            let mut s2 = s.clone();
            s2.rules.pop();
            Arc::new(
                compile_for(
                    &s2,
                    Backend::Iptables,
                    &Meta {
                        policy: POLICY.into(),
                        generation: 2,
                    },
                )
                .unwrap(),
            )
        };
        let (report, log) = run(
            &fleet,
            &hosts,
            &c,
            &BTreeMap::new(),
            &settings(Duration::from_secs(20)),
        )
        .await;
        assert!(
            matches!(report.hosts["host-0"], HostResult::Applied { .. }),
            "{report:?}\n{log:#?}"
        );
        let save = String::from_utf8_lossy(&h.exec(&["iptables-save", "-t", "filter"]).stdout)
            .into_owned();
        assert_eq!(
            save.matches("-A INPUT -j OUTRIDER-INPUT").count(),
            1,
            "{save}"
        );
        assert!(
            save.contains("-A INPUT -p tcp -m tcp --dport 7777 -j DROP"),
            "{save}"
        );
    }
    // generation 2 dropped deny_9000: 9000 falls to the default drop either way
    assert!(h.tcp_open(h.other, 80, PROBE));
    assert!(!h.tcp_open(h.other, 8080, PROBE));
    assert!(h.tcp_open(h.operator, 8080, PROBE));
    assert!(!h.tcp_open(h.operator, 9000, PROBE));
    assert!(h.tcp_open(h.operator, 22, PROBE) && !h.tcp_open(h.other, 22, PROBE));
}

#[tokio::test]
async fn the_canary_goes_first_and_a_failed_canary_stops_the_rollout() {
    let hs: Vec<NetnsHost> = (0..3).map(|_| NetnsHost::start(&[80])).collect();
    let refs: Vec<&NetnsHost> = hs.iter().collect();
    let keys = tempfile::tempdir().unwrap();
    let fleet = fleet(&refs, keys.path());
    let hosts = endpoints(&refs);
    let policy = spec(
        r#"
targets: {inventoryRef: {name: fleet}}
defaultInput: drop
rules:
  - {name: allow_web, action: allow, protocol: tcp, ports: [80]}
failsafe: {ports: [22], sources: ["198.18.0.0/15"]}
"#,
    );
    let c = compiled(&policy, 1);
    // the canary's state directory is read-only: its apply fails before anything changes
    let ro = hs[0].exec(&["mount", "-o", "remount,ro", "/var/lib/outrider"]);
    assert!(
        ro.status.success(),
        "{}",
        String::from_utf8_lossy(&ro.stderr)
    );
    let (report, log) = run(
        &fleet,
        &hosts,
        &c,
        &BTreeMap::new(),
        &settings(Duration::from_secs(20)),
    )
    .await;
    assert!(report.halted, "{log:#?}");
    assert_eq!(report.pushed, vec!["host-0".to_string()], "{log:#?}");
    assert!(matches!(report.hosts["host-1"], HostResult::Skipped));
    assert!(matches!(report.hosts["host-2"], HostResult::Skipped));
    assert!(!nft_list(&hs[1]).contains("outrider"));

    // fixed: canary alone, then the rest in batches of one, in order
    let rw = hs[0].exec(&["mount", "-o", "remount,rw", "/var/lib/outrider"]);
    assert!(rw.status.success());
    let (report, log) = run(
        &fleet,
        &hosts,
        &c,
        &BTreeMap::new(),
        &settings(Duration::from_secs(20)),
    )
    .await;
    assert!(!report.halted, "{log:#?}");
    assert_eq!(report.pushed, vec!["host-0", "host-1", "host-2"]);
    let batches: Vec<&String> = log.iter().filter(|l| l.starts_with("batch")).collect();
    assert_eq!(
        batches,
        vec!["batch 0: host-0", "batch 1: host-1", "batch 2: host-2"]
    );
    for h in &hs {
        assert!(h.tcp_open(h.other, 80, PROBE));
    }
}

#[tokio::test]
async fn outrider_policy_render_is_deterministic_and_apply_shows_each_step() {
    let h = NetnsHost::start(&[80, 8080]);
    let dir = tempfile::tempdir().unwrap();
    let (private_key, public_key) = sshd::user_key(dir.path(), "ed25519", None, "openssh");
    h.sshd.authorize(USER, &public_key);
    let secrets = dir.path().join("ssh");
    std::fs::create_dir(&secrets).unwrap();
    std::fs::write(secrets.join("ssh-privatekey"), &private_key).unwrap();
    std::fs::write(secrets.join("known_hosts"), h.known_hosts()).unwrap();
    let inventory = dir.path().join("inv.yaml");
    std::fs::write(
        &inventory,
        format!(
            "apiVersion: outrider.dev/v1alpha1\nkind: Inventory\nmetadata: {{name: fleet}}\nspec:\n  ssh: {{user: {USER}, port: 22, secretRef: {{name: ssh}}, become: {{method: sudo, user: root}}}}\n  hosts:\n    - {{name: web-1, address: \"{}\"}}\n",
            h.addr
        ),
    )
    .unwrap();
    let policy = dir.path().join("policy.yaml");
    let spec_yaml = serde_yaml::to_string(&web_policy(&h, "nftables")).unwrap();
    let indented: String = spec_yaml.lines().map(|l| format!("  {l}\n")).collect();
    std::fs::write(
        &policy,
        format!("apiVersion: outrider.dev/v1alpha1\nkind: SecurityPolicy\nmetadata: {{name: fw, namespace: prod}}\nspec:\n{indented}"),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_outrider");
    let render = || {
        std::process::Command::new(bin)
            .args(["policy", "render", "-f"])
            .arg(&policy)
            .output()
            .unwrap()
    };
    let (a, b) = (render(), render());
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert_eq!(a.stdout, b.stdout);
    let text = String::from_utf8_lossy(&a.stdout);
    assert!(text.contains("comment \"outrider prod/fw g0 "), "{text}");
    assert!(String::from_utf8_lossy(&a.stderr).contains("ruleset hash: sha256:"));

    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin)
            .args(["policy", "apply", "-f"])
            .arg(&policy)
            .arg("--inventory")
            .arg(&inventory)
            .arg("--secret-dir")
            .arg(&secrets)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("canary 0: web-1"), "{stderr}");
    assert!(
        stderr.contains("web-1: confirming over a new connection"),
        "{stderr}"
    );
    assert!(stdout.contains("web-1\tapplied and confirmed"), "{stdout}");
    assert!(!h.tcp_open(h.other, 8080, PROBE) && h.tcp_open(h.operator, 8080, PROBE));
}
