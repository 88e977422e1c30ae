//! SecurityPolicy through the real API server and the controller process, pushed to three
//! network-namespace hosts (each its own kernel firewall and sshd): canary first, status
//! counts and hash, Events per host, packets filtered for real, drift reported and then
//! repaired when the policy says Reconcile.

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use outrider::api::security_policy::SecurityPolicy;
use outrider::engine::firewall::{Meta, compile};

use crate::netns::NetnsHost;
use crate::support::*;

const USER: &str = "outrider-sudo";
const PROBE: Duration = Duration::from_millis(700);

fn ready(sp: &SecurityPolicy) -> Option<(String, String)> {
    let c = sp
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")?;
    Some((c.status.clone(), c.reason.clone()))
}

async fn events(client: &kube::Client, ns: &str, reason: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    let mut list: Vec<Event> = api
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect();
    list.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
    list
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

fn manifests(ns: &str, hosts: &[NetnsHost], private_key: &str) -> String {
    let known: String = hosts.iter().map(|h| h.known_hosts()).collect();
    let mut y = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: fw-ssh, namespace: {ns}}}\ntype: Opaque\nstringData:\n  ssh-privatekey: |\n{}  known_hosts: |\n{}---\n",
        indent(private_key),
        indent(&known)
    );
    y.push_str(&format!(
        "apiVersion: outrider.dev/v1alpha1\nkind: Inventory\nmetadata: {{name: fleet, namespace: {ns}}}\nspec:\n  ssh:\n    user: {USER}\n    port: 22\n    connectTimeout: 3s\n    secretRef: {{name: fw-ssh}}\n    become: {{method: sudo, user: root}}\n  probe: {{interval: 30s}}\n  hosts:\n"
    ));
    for (i, h) in hosts.iter().enumerate() {
        y.push_str(&format!(
            "    - {{name: host-{i}, address: \"{}\"}}\n",
            h.addr
        ));
    }
    let trust: Vec<String> = hosts
        .iter()
        .map(|h| format!("\"{}/32\"", h.operator))
        .collect();
    y.push_str(&format!(
        r#"---
apiVersion: outrider.dev/v1alpha1
kind: SecurityPolicy
metadata: {{name: fw, namespace: {ns}}}
spec:
  targets: {{inventoryRef: {{name: fleet}}}}
  zones:
    trust: [{}]
  defaultInput: drop
  rules:
    - {{name: allow_web, action: allow, protocol: tcp, ports: [80]}}
    - {{name: allow_admin, action: allow, from: trust, protocol: tcp, ports: [8080]}}
  failsafe: {{ports: [22], sources: [198.18.0.0/15]}}
  apply: {{confirmTimeout: 10s, batchSize: 1, maxUnavailable: 0}}
  driftCheckInterval: 10s
  driftPolicy: Report
"#,
        trust.join(", ")
    ));
    y
}

#[tokio::test]
async fn security_policy_rolls_out_canary_first_and_reports_then_repairs_drift() {
    let kc = kubeconfig();
    let ns = namespace("sp");
    let hosts: Vec<NetnsHost> = (0..3)
        .map(|_| NetnsHost::start(&[80, 8080, 9999]))
        .collect();
    let keys = tempfile::tempdir().expect("tempdir");
    let (private_key, public_key) = crate::sshd::user_key(keys.path(), "ed25519", None, "openssh");
    for h in &hosts {
        h.sshd.authorize(USER, &public_key);
        assert!(h.tcp_open(h.other, 8080, PROBE), "open before any policy");
    }
    let controller = ControllerProcess::start(&ns, "outrider", "solo", &[]);
    let client = client().await;
    apply(&kc, &manifests(&ns, &hosts, &private_key));
    let api: Api<SecurityPolicy> = Api::namespaced(client.clone(), &ns);

    let sp = eventually(Duration::from_secs(120), "3 hosts applied", || async {
        let sp = api.get_opt("fw").await.ok().flatten()?;
        let counts = sp.status.as_ref()?.hosts?;
        (counts.applied == 3 && ready(&sp) == Some(("True".into(), "Applied".into()))).then_some(sp)
    })
    .await;
    let status = sp.status.clone().unwrap();
    let expected = compile(
        &sp.spec,
        &Meta {
            policy: format!("{ns}/fw"),
            generation: sp.metadata.generation.unwrap(),
        },
    )
    .unwrap();
    assert_eq!(status.ruleset_hash.as_deref(), Some(expected.hash.as_str()));
    let counts = status.hosts.unwrap();
    assert_eq!(
        (counts.total, counts.drifted, counts.failed, counts.pending),
        (3, 0, 0, 0)
    );

    let body = http_get(&controller.metrics_url())
        .await
        .unwrap_or_default();
    assert_eq!(
        metric(
            &body,
            &format!(r#"outrider_policy_hosts{{policy="{ns}/fw",state="applied"}}"#)
        ),
        3.0,
        "{body}"
    );
    assert!(metric(&body, r#"outrider_policy_applies_total{result="applied"}"#) >= 3.0);

    // Events: the rollout named its canary, and host-0 was applied before the others
    let started = events(&client, &ns, "RolloutStarted").await;
    assert!(
        started.iter().any(|e| e
            .note
            .as_deref()
            .unwrap_or_default()
            .contains("canary host-0 first")),
        "{started:#?}"
    );
    let applied = events(&client, &ns, "Applied").await;
    let order: Vec<String> = applied
        .iter()
        .map(|e| e.note.clone().unwrap_or_default())
        .collect();
    assert_eq!(order.len(), 3, "{order:#?}\n{applied:#?}");
    assert!(order[0].starts_with("host-0 (canary)"), "{order:#?}");
    assert!(
        order[1..].iter().all(|n| n.contains("(batch ")),
        "{order:#?}"
    );

    // packets, for real, on every host
    for h in &hosts {
        assert!(h.tcp_open(h.other, 80, PROBE));
        assert!(h.tcp_open(h.operator, 8080, PROBE));
        assert!(!h.tcp_open(h.other, 8080, PROBE));
        assert!(!h.tcp_open(h.other, 9999, PROBE));
    }
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let cm = cms.get("fw-firewall").await.expect("digests ConfigMap");
    let digests = &cm.data.unwrap()["digests.json"];
    assert!(
        ["host-0", "host-1", "host-2"]
            .iter()
            .all(|h| digests.contains(h)),
        "{digests}"
    );

    // drift by hand on host-1: reported within one interval, nothing changed
    let out = hosts[1].exec(&[
        "nft",
        "insert rule inet outrider input tcp dport 9999 accept",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sp = eventually(Duration::from_secs(40), "host-1 drifted", || async {
        let sp = api.get_opt("fw").await.ok().flatten()?;
        let s = sp.status.as_ref()?;
        (s.hosts?.drifted == 1 && ready(&sp) == Some(("False".into(), "Drifted".into())))
            .then_some(sp)
    })
    .await;
    let drift = &sp.status.as_ref().unwrap().drift;
    assert_eq!(drift.len(), 1);
    assert_eq!(drift[0].host, "host-1");
    assert!(drift[0].detected_at.is_some());
    assert!(!events(&client, &ns, "Drifted").await.is_empty());
    assert!(
        hosts[1].tcp_open(hosts[1].other, 9999, PROBE),
        "Report changes nothing"
    );

    // Reconcile: pushed again, drift gone, the port closed again
    api.patch(
        "fw",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"driftPolicy": "Reconcile"}})),
    )
    .await
    .expect("patch driftPolicy");
    eventually(Duration::from_secs(60), "drift repaired", || async {
        let sp = api.get_opt("fw").await.ok().flatten()?;
        let s = sp.status.as_ref()?;
        (s.hosts?.drifted == 0
            && s.hosts?.applied == 3
            && ready(&sp) == Some(("True".into(), "Applied".into())))
        .then_some(())
    })
    .await;
    assert!(!hosts[1].tcp_open(hosts[1].other, 9999, PROBE));
}
