//! The controller process against the real API server: Inventory status, Events, spec
//! ownership, pinned host keys, metrics, and leader election between replicas.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::ListParams;
use outrider::api::Inventory;

use crate::support::*;

fn ready_reason(inv: &Inventory) -> Option<(String, String)> {
    let status = inv.status.as_ref()?;
    let c = status.conditions.iter().find(|c| c.type_ == "Ready")?;
    Some((c.status.clone(), c.reason.clone()))
}

async fn wait_ready(api: &Api<Inventory>, name: &str, status: &str, reason: &str) -> Inventory {
    eventually(
        Duration::from_secs(60),
        &format!("{name} Ready={status}/{reason}"),
        || async {
            let inv = api.get_opt(name).await.ok().flatten()?;
            (ready_reason(&inv) == Some((status.into(), reason.into()))).then_some(inv)
        },
    )
    .await
}

#[tokio::test]
async fn inventory_without_secret_turns_ready_when_the_secret_appears() {
    let kc = kubeconfig();
    let ns = namespace("inv-secret");
    let _controller = ControllerProcess::start(&ns, "outrider", "solo", &[]);
    let client = client().await;
    let api: Api<Inventory> = Api::namespaced(client.clone(), &ns);

    apply(&kc, &inventory_yaml("fleet", &ns, "fleet-ssh", 3));
    let inv = wait_ready(&api, "fleet", "False", "SecretNotFound").await;
    let status = inv.status.expect("status");
    assert_eq!(status.hosts, 3);
    assert_eq!(status.observed_generation, inv.metadata.generation);
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready");
    assert!(
        ready.message.contains("fleet-ssh"),
        "message should name the Secret: {}",
        ready.message
    );

    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    eventually(
        Duration::from_secs(30),
        "a SecretNotFound Warning Event",
        || async {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some("SecretNotFound")
                        && e.type_.as_deref() == Some("Warning")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("fleet")
                })
                .map(|_| ())
        },
    )
    .await;

    // the controller watches Secrets: no restart, no resync wait
    apply(&kc, &secret_yaml("fleet-ssh", &ns));
    let inv = wait_ready(&api, "fleet", "True", "AllReachable").await;
    assert_eq!(inv.status.as_ref().and_then(|s| s.reachable), Some(3));
    let text = serde_json::to_string(&inv.status).expect("status json");
    assert!(
        !text.contains("PRIVATE KEY"),
        "Secret data leaked into status: {text}"
    );
}

#[tokio::test]
async fn secret_missing_a_key_is_reported_as_secret_invalid() {
    let kc = kubeconfig();
    let ns = namespace("inv-badsecret");
    let _controller = ControllerProcess::start(&ns, "outrider", "solo", &[]);
    let api: Api<Inventory> = Api::namespaced(client().await, &ns);
    let secret = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: only-key, namespace: {ns}}}\nstringData: {{ssh-privatekey: x}}\n"
    );
    apply(&kc, &secret);
    apply(&kc, &inventory_yaml("fleet", &ns, "only-key", 1));
    let inv = wait_ready(&api, "fleet", "False", "SecretInvalid").await;
    let msg = &inv.status.expect("status").conditions[0].message;
    assert!(
        msg.contains("known_hosts"),
        "message should name the missing key: {msg}"
    );
}

#[tokio::test]
async fn controller_never_writes_spec_so_apply_and_diff_see_no_drift() {
    let kc = kubeconfig();
    let ns = namespace("inv-drift");
    let _controller = ControllerProcess::start(&ns, "outrider", "solo", &[]);
    let api: Api<Inventory> = Api::namespaced(client().await, &ns);
    let manifest = format!(
        "{}---\n{}",
        secret_yaml("fleet-ssh", &ns),
        inventory_yaml("fleet", &ns, "fleet-ssh", 5)
    );
    let out = kubectl_stdin(&kc, &["apply", "--server-side", "-f", "-"], &manifest);
    assert!(out.status.success(), "{}", stderr(&out));
    let before = wait_ready(&api, "fleet", "True", "AllReachable").await;

    let out = kubectl_stdin(&kc, &["diff", "--server-side", "-f", "-"], &manifest);
    assert_eq!(
        out.status.code(),
        Some(0),
        "kubectl diff found drift:\n{}{}",
        stdout(&out),
        stderr(&out)
    );
    let out = kubectl_stdin(&kc, &["apply", "--server-side", "-f", "-"], &manifest);
    assert!(out.status.success(), "{}", stderr(&out));
    let after = api.get("fleet").await.expect("get");
    assert_eq!(
        before.metadata.generation, after.metadata.generation,
        "re-apply changed the spec"
    );
    assert_eq!(
        before.metadata.resource_version, after.metadata.resource_version,
        "re-apply changed the object"
    );
    let managers: Vec<_> = after
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.manager.as_deref() == Some("outrider"))
        .collect();
    assert!(
        !managers.is_empty(),
        "status should be owned by field manager outrider"
    );
    for m in managers {
        assert_eq!(
            m.subresource.as_deref(),
            Some("status"),
            "outrider must only manage status: {m:?}"
        );
    }
}

#[tokio::test]
async fn a_host_on_a_closed_port_is_listed_unreachable_and_the_rest_count_as_reachable() {
    let kc = kubeconfig();
    let ns = namespace("inv-reach");
    let _controller = ControllerProcess::start(&ns, "outrider", "solo", &[]);
    let api: Api<Inventory> = Api::namespaced(client().await, &ns);
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    // five hosts on the real sshd, the sixth on a loopback port nothing listens on
    let inventory = format!(
        "{}    - {{name: down, address: 127.0.0.1, port: {closed}}}\n",
        inventory_yaml("fleet", &ns, "fleet-ssh", 5)
    );
    let manifest = format!("{}---\n{}", secret_yaml("fleet-ssh", &ns), inventory);
    apply(&kc, &manifest);
    let inv = wait_ready(&api, "fleet", "False", "HostsUnreachable").await;
    let status = inv.status.expect("status");
    assert_eq!((status.hosts, status.reachable), (6, Some(5)));
    assert_eq!(status.unreachable.len(), 1, "{:?}", status.unreachable);
    assert_eq!(status.unreachable[0].host, "down");
    assert_eq!(status.unreachable[0].reason, "Unreachable");
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready");
    assert!(
        ready
            .message
            .contains("1 of 6 hosts unreachable: down (Unreachable)"),
        "{}",
        ready.message
    );
}

#[tokio::test]
async fn accept_new_records_and_then_pins_first_seen_host_keys() {
    let kc = kubeconfig();
    let ns = namespace("inv-tofu");
    let _controller = ControllerProcess::start(&ns, "outrider", "solo", &[]);
    let api: Api<Inventory> = Api::namespaced(client().await, &ns);
    // a Secret with the key but no known_hosts: only AcceptNew can work
    let key: String = hosts()
        .private_key
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect();
    let secret = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: key-only, namespace: {ns}}}\nstringData:\n  ssh-privatekey: |\n{key}"
    );
    let inventory = inventory_yaml("fleet", &ns, "key-only", 2).replace(
        &format!("    user: {TEST_USER}\n"),
        &format!("    user: {TEST_USER}\n    hostKeyPolicy: AcceptNew\n"),
    );
    apply(&kc, &format!("{secret}---\n{inventory}"));
    let inv = wait_ready(&api, "fleet", "True", "AllReachable").await;
    let keys = inv.status.expect("status").host_keys.expect("hostKeys");
    assert_eq!(keys.pinned, 2);
    assert_eq!(keys.config_map, "fleet-host-keys");
    let mut recent: Vec<&str> = keys.recent.iter().map(|k| k.host.as_str()).collect();
    recent.sort();
    assert_eq!(recent, ["host-0", "host-1"]);
    // the pins themselves: one entry per host in a ConfigMap the Inventory owns
    let cm = Api::<ConfigMap>::namespaced(client().await, &ns)
        .get("fleet-host-keys")
        .await
        .expect("pins ConfigMap");
    let data = cm.data.expect("data");
    let fingerprints = hosts().server.fingerprints();
    for (i, host) in ["host-0", "host-1"].into_iter().enumerate() {
        let entry = data
            .get(host)
            .unwrap_or_else(|| panic!("{host} pinned: {data:?}"));
        let prefix = format!("{} {} ", host_addr(i), hosts().server.port);
        let fp = entry
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("{entry}"));
        assert!(
            fingerprints.iter().any(|f| f == fp),
            "{fp} not in {fingerprints:?}"
        );
    }
    let owner = cm.metadata.owner_references.expect("owned")[0].clone();
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Inventory", "fleet")
    );
}

/// A key pinned by an Inventory under `AcceptNew` binds every kind: when the host later
/// presents another key, a DeploymentPlan on it fails with `HostKeyMismatch` and never
/// runs its stage (before pins were shared, the plan trusted the new key "on first use").
#[tokio::test]
async fn a_plan_refuses_a_host_whose_key_changed_after_the_inventory_pinned_it() {
    let kc = kubeconfig();
    let ns = namespace("inv-pin");
    let _controller = ControllerProcess::start(&ns, "outrider", "solo", &[]);
    let keys = tempfile::tempdir().expect("tempdir");
    let (private_key, public_key) = crate::sshd::user_key(keys.path(), "ed25519", None, "openssh");
    let first = crate::sshd::Sshd::start();
    first.authorize(TEST_USER, &public_key);
    let port = first.port;
    let key: String = private_key.lines().map(|l| format!("    {l}\n")).collect();
    let manifest = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: key-only, namespace: {ns}}}\nstringData:\n  ssh-privatekey: |\n{key}---\n\
apiVersion: outrider.dev/v1alpha1\nkind: Inventory\nmetadata: {{name: pinned, namespace: {ns}}}\nspec:\n  ssh:\n    user: {TEST_USER}\n    port: {port}\n    connectTimeout: 5s\n    hostKeyPolicy: AcceptNew\n    secretRef: {{name: key-only}}\n  probe: {{interval: 1h}}\n  hosts:\n    - {{name: h1, address: 127.0.21.1}}\n"
    );
    apply(&kc, &manifest);
    let api: Api<Inventory> = Api::namespaced(client().await, &ns);
    wait_ready(&api, "pinned", "True", "AllReachable").await;
    let pins: Api<ConfigMap> = Api::namespaced(client().await, &ns);
    let pinned = pins.get("pinned-host-keys").await.expect("pins ConfigMap");
    let entry = pinned
        .data
        .as_ref()
        .and_then(|d| d.get("h1"))
        .cloned()
        .expect("h1 pinned");
    let old_fingerprint = entry
        .strip_prefix(&format!("127.0.21.1 {port} "))
        .unwrap_or_else(|| panic!("{entry}"))
        .to_string();
    assert!(first.fingerprints().contains(&old_fingerprint), "{entry}");

    // h1 is now answered by an sshd with new host keys, on the same address and port
    drop(first);
    let second = crate::sshd::Sshd::start_on_port(port);
    second.authorize(TEST_USER, &public_key);
    assert!(
        !second.fingerprints().contains(&old_fingerprint),
        "new host keys"
    );

    let marker = keys.path().join("stage-ran");
    let plan = format!(
        "apiVersion: outrider.dev/v1alpha1\nkind: DeploymentPlan\nmetadata: {{name: deploy, namespace: {ns}}}\nspec:\n  targets: {{inventoryRef: {{name: pinned}}}}\n  stages:\n    - {{name: touch, script: \"touch {}\", timeout: 10s}}\n",
        marker.display()
    );
    apply(&kc, &plan);
    let plans: Api<outrider::api::DeploymentPlan> = Api::namespaced(client().await, &ns);
    let failed = eventually(Duration::from_secs(60), "plan Failed", || async {
        let dp = plans.get_opt("deploy").await.ok().flatten()?;
        let s = dp.status?;
        matches!(
            s.phase,
            Some(outrider::api::deployment_plan::PlanPhase::Failed)
        )
        .then_some(s)
    })
    .await;
    assert_eq!(failed.failures.len(), 1, "{:?}", failed.failures);
    assert_eq!(failed.failures[0].host, "h1");
    assert_eq!(
        failed.failures[0].reason, "HostKeyMismatch",
        "{:?}",
        failed.failures[0]
    );
    assert!(
        !marker.exists(),
        "the stage must never run on a host whose key changed"
    );
    // and the pin still holds the first key: nothing was re-trusted
    let pinned = pins.get("pinned-host-keys").await.expect("pins ConfigMap");
    assert_eq!(
        pinned.data.as_ref().and_then(|d| d.get("h1")),
        Some(&format!("127.0.21.1 {port} {old_fingerprint}"))
    );
}

#[tokio::test]
async fn metrics_endpoint_counts_inventory_reconciles() {
    let kc = kubeconfig();
    let ns = namespace("inv-metrics");
    let controller = ControllerProcess::start(&ns, "outrider", "solo", &[]);
    let api: Api<Inventory> = Api::namespaced(client().await, &ns);
    apply(&kc, &inventory_yaml("fleet", &ns, "none", 1));
    wait_ready(&api, "fleet", "False", "SecretNotFound").await;
    let url = controller.metrics_url();
    let body = eventually(
        Duration::from_secs(30),
        "reconcile counter on /metrics",
        || async {
            let body = http_get(&url).await?;
            let n: f64 = body
                .lines()
                .find(|l| l.starts_with("outrider_reconciles_total{kind=\"Inventory\"}"))?
                .rsplit(' ')
                .next()?
                .parse()
                .ok()?;
            (n >= 1.0).then_some(body)
        },
    )
    .await;
    assert!(
        body.contains("outrider_reconcile_duration_seconds_bucket"),
        "{body}"
    );
    assert!(body.contains("outrider_leader 1"), "{body}");
    let health = http_get(&format!(
        "http://127.0.0.1:{}/healthz",
        controller.metrics_port
    ))
    .await;
    assert_eq!(health.as_deref(), Some("ok"));
    let ready = http_get(&format!(
        "http://127.0.0.1:{}/readyz",
        controller.metrics_port
    ))
    .await;
    assert_eq!(ready.as_deref(), Some("ok"));
}

async fn lease_holder(api: &Api<Lease>, name: &str) -> Option<String> {
    api.get_opt(name)
        .await
        .ok()
        .flatten()?
        .spec?
        .holder_identity
        .filter(|h| !h.is_empty())
}

#[tokio::test]
async fn one_leader_at_a_time_and_a_standby_takes_over_after_kill_9() {
    const LEASE_SECS: u64 = 6;
    let kc = kubeconfig();
    let ns = namespace("leader");
    let client = client().await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let api: Api<Inventory> = Api::namespaced(client.clone(), &ns);
    let extra = ["--lease-duration", "6"];
    let a = ControllerProcess::start(&ns, "outrider-ha", "replica-a", &extra);
    let b = ControllerProcess::start(&ns, "outrider-ha", "replica-b", &extra);

    let first = eventually(Duration::from_secs(60), "a Lease holder", || {
        lease_holder(&leases, "outrider-ha")
    })
    .await;
    assert!(
        first == "replica-a" || first == "replica-b",
        "unexpected holder {first}"
    );
    // exactly one replica reports leadership, and it is the Lease holder
    let (mut leader, standby) = if first == a.identity { (a, b) } else { (b, a) };
    let leader_url = leader.metrics_url();
    eventually(
        Duration::from_secs(20),
        "leader metric on the holder",
        || async {
            http_get(&leader_url)
                .await
                .filter(|m| m.contains("outrider_leader 1"))
        },
    )
    .await;
    let standby_url = standby.metrics_url();
    let standby_metrics = eventually(Duration::from_secs(20), "standby metrics", || {
        http_get(&standby_url)
    })
    .await;
    assert!(
        standby_metrics.contains("outrider_leader 0"),
        "standby claims leadership:\n{standby_metrics}"
    );
    assert!(
        !standby_metrics.contains("outrider_reconciles_total{kind=\"Inventory\"}"),
        "standby reconciled"
    );

    apply(&kc, &inventory_yaml("before", &ns, "none", 1));
    wait_ready(&api, "before", "False", "SecretNotFound").await;

    leader.kill9();
    let killed_at = Instant::now();
    apply(&kc, &inventory_yaml("after", &ns, "none", 1));
    let new_holder = eventually(
        Duration::from_secs(LEASE_SECS + 30),
        "a new Lease holder",
        || async {
            lease_holder(&leases, "outrider-ha")
                .await
                .filter(|h| *h == standby.identity)
        },
    )
    .await;
    wait_ready(&api, "after", "False", "SecretNotFound").await;
    let took = killed_at.elapsed();
    assert_eq!(new_holder, standby.identity);
    assert!(
        took <= Duration::from_secs(LEASE_SECS + 5),
        "takeover took {took:?}, more than the Lease duration + 5s\nstandby log:\n{}",
        standby.log_text()
    );

    // a graceful stop hands the Lease back at once instead of letting it expire
    let mut standby = standby;
    let code = standby.terminate();
    assert!(
        code.success(),
        "SIGTERM exit: {code:?}\n{}",
        standby.log_text()
    );
    eventually(Duration::from_secs(10), "the Lease released", || async {
        lease_holder(&leases, "outrider-ha")
            .await
            .is_none()
            .then_some(())
    })
    .await;
}

/// Probing is the Inventory's task, not its reconcile: rounds go on every interval while
/// the reconcile count stays put, because the controller's own status writes do not
/// trigger reconciles (before, every status change started a second full SSH probe); and
/// they stop when the Inventory is deleted.
#[tokio::test]
async fn probe_rounds_run_on_their_interval_without_reconciles_or_repeated_status_writes_and_stop_on_delete()
 {
    let kc = kubeconfig();
    let ns = namespace("inv-rounds");
    let controller = ControllerProcess::start(&ns, "outrider", "solo", &[]);
    let keys = tempfile::tempdir().expect("tempdir");
    let (private_key, public_key) = crate::sshd::user_key(keys.path(), "ed25519", None, "openssh");
    let server = crate::sshd::Sshd::start();
    server.authorize(TEST_USER, &public_key);
    let port = server.port;
    let addr = "127.0.22.1";
    let key: String = private_key.lines().map(|l| format!("    {l}\n")).collect();
    let known: String = server
        .known_hosts_for(&[addr])
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect();
    apply(
        &kc,
        &format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: s, namespace: {ns}}}\nstringData:\n  ssh-privatekey: |\n{key}  known_hosts: |\n{known}---\n\
apiVersion: outrider.dev/v1alpha1\nkind: Inventory\nmetadata: {{name: fleet, namespace: {ns}}}\nspec:\n  ssh:\n    user: {TEST_USER}\n    port: {port}\n    connectTimeout: 5s\n    secretRef: {{name: s}}\n  probe: {{interval: 1s}}\n  hosts:\n    - {{name: h1, address: {addr}}}\n"
        ),
    );
    let api: Api<Inventory> = Api::namespaced(client().await, &ns);
    wait_ready(&api, "fleet", "True", "AllReachable").await;
    let url = controller.metrics_url();
    let reconciles = r#"outrider_reconciles_total{kind="Inventory"}"#;
    let writes = r#"outrider_status_writes_total{kind="Inventory"}"#;
    let logins = || server.log().matches("Accepted publickey").count();
    // settle: the first round's write is done once Ready shows; take the counts now
    let before = eventually(Duration::from_secs(10), "metrics", || http_get(&url)).await;
    let rounds_before = logins();
    // positive marker: at least 4 more probe rounds reached the host
    eventually(Duration::from_secs(60), "4 more probe rounds", || async {
        (logins() >= rounds_before + 4).then_some(())
    })
    .await;
    let after = eventually(Duration::from_secs(10), "metrics", || http_get(&url)).await;
    assert_eq!(
        metric(&after, reconciles),
        metric(&before, reconciles),
        "probe rounds and our own status writes must not reconcile again"
    );
    assert_eq!(
        metric(&after, writes),
        metric(&before, writes),
        "an unchanged status is not written again"
    );
    assert!(metric(&before, writes) >= 1.0, "{before}");

    // deleted: the probe task ends (deletes are not reconciled, and an unchanged status is
    // never written, so the task itself must notice) — no more logins after a grace round
    let out = kubectl(&kc, &["delete", "inventory", "fleet", "-n", &ns]);
    assert!(out.status.success(), "{}", stderr(&out));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let settled = logins();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        logins(),
        settled,
        "a deleted Inventory's hosts are still probed every second"
    );
}
