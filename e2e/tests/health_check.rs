//! HealthCheck through the real API server and the controller process: status with
//! summary and results, Events on transitions only, no status writes in a steady state,
//! metrics, and remediation that reruns a plan for exactly the unhealthy host and then
//! honours its cooldown.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::ListParams;
use outrider::api::DeploymentPlan;
use outrider::api::health_check::{HealthCheck, ProbeState};

use crate::support::*;

fn condition(hc: &HealthCheck, type_: &str) -> Option<(String, String)> {
    let c = hc
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone()))
}

async fn events(client: &kube::Client, ns: &str, reason: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect()
}

fn manifests(ns: &str, dir: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        r#"apiVersion: outrider.dev/v1alpha1
kind: DeploymentPlan
metadata: {{name: fix, namespace: {ns}}}
spec:
  targets: {{inventoryRef: {{name: fleet}}}}
  paused: true
  stages:
    - name: repair
      script: |
        h=$(echo $SSH_CONNECTION | cut -d' ' -f3)
        rm -f "{d}/broken-$h"
        echo fixed >> "{d}/fixed-$h"
      timeout: 30s
---
apiVersion: outrider.dev/v1alpha1
kind: HealthCheck
metadata: {{name: web, namespace: {ns}}}
spec:
  interval: 5s
  targets: {{inventoryRef: {{name: fleet}}}}
  failureThreshold: 2
  successThreshold: 1
  checks:
    - name: alive
      exec:
        script: |
          h=$(echo $SSH_CONNECTION | cut -d' ' -f3)
          if [ -e "{d}/broken-$h" ]; then echo "app down on $h"; exit 1; fi
    - {{name: mem, memory: {{maxUsedPercent: 100}}}}
  endpoints:
    - {{name: api, tcp: {{address: "127.0.0.1:{port}"}}, timeout: 2s}}
  remediation:
    deploymentPlanRef: {{name: fix}}
    cooldown: 1h
    maxPerHour: 4
"#
    )
}

#[tokio::test]
async fn health_check_reports_transitions_once_and_remediates_exactly_the_unhealthy_host_within_its_cooldown()
 {
    let kc = kubeconfig();
    let ns = namespace("hc");
    let controller = ControllerProcess::start(&ns, "outrider", "solo", &[]);
    let client = client().await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("endpoint listener");
    let port = listener.local_addr().expect("addr").port();

    apply(&kc, &secret_yaml("fleet-ssh", &ns));
    apply(&kc, &inventory_yaml("fleet", &ns, "fleet-ssh", 2));
    apply(&kc, &manifests(&ns, dir.path(), port));
    let api: Api<HealthCheck> = Api::namespaced(client.clone(), &ns);

    let hc = eventually(Duration::from_secs(90), "3 healthy targets", || async {
        let hc = api.get_opt("web").await.ok().flatten()?;
        let s = hc.status.as_ref()?.summary?;
        (s.healthy == 3
            && condition(&hc, "Degraded") == Some(("False".into(), "AllHealthy".into())))
        .then_some(hc)
    })
    .await;
    assert_eq!(
        condition(&hc, "Ready"),
        Some(("True".into(), "Probing".into()))
    );
    assert!(hc.status.as_ref().is_some_and(|s| s.last_run_at.is_some()));

    // steady state: no status writes between heartbeats
    let metrics = || async {
        http_get(&controller.metrics_url())
            .await
            .unwrap_or_default()
    };
    let writes = r#"outrider_status_writes_total{kind="HealthCheck"}"#;
    let before = metric(&metrics().await, writes);
    tokio::time::sleep(Duration::from_secs(16)).await;
    let body = metrics().await;
    assert_eq!(
        metric(&body, writes),
        before,
        "three healthy rounds wrote nothing"
    );
    assert!(
        metric(&body, "outrider_health_rounds_total") >= 3.0,
        "{body}"
    );
    assert_eq!(
        metric(
            &body,
            &format!(r#"outrider_probe_success{{check="{ns}/web",target="host-0",probe="alive"}}"#)
        ),
        1.0,
        "{body}"
    );
    assert_eq!(
        metric(
            &body,
            &format!(r#"outrider_check_state{{check="{ns}/web",state="Healthy"}}"#)
        ),
        3.0
    );
    assert_eq!(
        metric(&body, "outrider_health_ssh_handshakes_total"),
        2.0,
        "one kept-open connection per host: {body}"
    );

    // host-1 breaks: Unhealthy after 2 failing rounds, remediated alone
    let broken = dir.path().join(format!("broken-{}", host_addr(1)));
    std::fs::write(&broken, "").expect("break host-1");
    let hc = eventually(
        Duration::from_secs(60),
        "a remediation of host-1",
        || async {
            let hc = api.get_opt("web").await.ok().flatten()?;
            (!hc.status.as_ref()?.remediations.is_empty()).then_some(hc)
        },
    )
    .await;
    let status = hc.status.expect("status");
    assert_eq!(status.remediations[0].hosts, vec!["host-1".to_string()]);
    assert_eq!(status.remediations[0].plan, "fix");
    let plans: Api<DeploymentPlan> = Api::namespaced(client.clone(), &ns);
    let copies = plans
        .list(&ListParams::default().labels("outrider.dev/remediation-of=web"))
        .await
        .expect("list plans")
        .items;
    assert_eq!(copies.len(), 1);
    let owner = &copies[0].metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("HealthCheck", "web")
    );
    // the user's plan is untouched (still paused); the copy runs for host-1 only
    let source = plans.get("fix").await.expect("source plan");
    assert!(source.spec.paused);
    let fixed1 = dir.path().join(format!("fixed-{}", host_addr(1)));
    eventually(
        Duration::from_secs(60),
        "the copy repaired host-1",
        || async { fixed1.exists().then_some(()) },
    )
    .await;
    assert!(
        !dir.path().join(format!("fixed-{}", host_addr(0))).exists(),
        "host-0 was healthy and must not be touched"
    );
    eventually(Duration::from_secs(60), "host-1 healthy again", || async {
        let hc = api.get_opt("web").await.ok().flatten()?;
        (hc.status.as_ref()?.summary?.healthy == 3).then_some(())
    })
    .await;
    let unhealthy = events(&client, &ns, "TargetUnhealthy").await;
    assert_eq!(
        unhealthy.len(),
        1,
        "one Event for the transition, not one per round"
    );
    assert!(
        unhealthy[0]
            .note
            .as_deref()
            .unwrap_or_default()
            .contains("host-1/alive"),
        "{:?}",
        unhealthy[0].note
    );
    assert!(!events(&client, &ns, "TargetHealthy").await.is_empty());
    assert_eq!(events(&client, &ns, "Remediating").await.len(), 1);

    // host-1 breaks again within the cooldown: reported, not remediated
    std::fs::write(&broken, "").expect("break host-1 again");
    let hc = eventually(
        Duration::from_secs(60),
        "host-1 unhealthy again",
        || async {
            let hc = api.get_opt("web").await.ok().flatten()?;
            let s = hc.status.as_ref()?;
            s.results
                .iter()
                .any(|r| {
                    r.target == "host-1" && r.check == "alive" && r.state == ProbeState::Unhealthy
                })
                .then_some(hc)
        },
    )
    .await;
    let status = hc.status.expect("status");
    let result = status
        .results
        .iter()
        .find(|r| r.target == "host-1")
        .expect("result");
    assert!(result.message.contains("app down on"), "{}", result.message);
    assert!(result.since.is_some());
    assert_eq!(
        condition_of(&status.conditions, "Degraded"),
        Some(("True".into(), "TargetsUnhealthy".into()))
    );
    tokio::time::sleep(Duration::from_secs(12)).await;
    let hc = api.get("web").await.expect("hc");
    assert_eq!(
        hc.status.expect("status").remediations.len(),
        1,
        "cooldown 1h"
    );
    assert_eq!(
        std::fs::read_to_string(&fixed1)
            .expect("fixed")
            .lines()
            .count(),
        1
    );
    drop(listener);
}

fn condition_of(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> Option<(String, String)> {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

#[tokio::test]
async fn a_health_check_with_a_bad_reference_or_an_unresolvable_endpoint_is_reported_not_fatal() {
    let kc = kubeconfig();
    let ns = namespace("hc-bad");
    let controller = ControllerProcess::start(&ns, "outrider", "solo", &[]);
    let client = client().await;
    let api: Api<HealthCheck> = Api::namespaced(client.clone(), &ns);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    apply(
        &kc,
        &format!(
            "apiVersion: outrider.dev/v1alpha1\nkind: HealthCheck\nmetadata: {{name: orphan, namespace: {ns}}}\n\
             spec:\n  interval: 5s\n  targets: {{inventoryRef: {{name: missing}}}}\n  \
             checks: [{{name: mem, memory: {{maxUsedPercent: 90}}}}]\n---\n\
             apiVersion: outrider.dev/v1alpha1\nkind: HealthCheck\nmetadata: {{name: closed, namespace: {ns}}}\n\
             spec:\n  interval: 5s\n  failureThreshold: 1\n  \
             endpoints: [{{name: db, tcp: {{address: '127.0.0.1:{port}'}}, timeout: 1s}}]\n"
        ),
    );
    let hc = eventually(Duration::from_secs(60), "orphan Ready=False", || async {
        let hc = api.get_opt("orphan").await.ok().flatten()?;
        (condition(&hc, "Ready") == Some(("False".into(), "InventoryNotFound".into())))
            .then_some(hc)
    })
    .await;
    let ready = &hc.status.expect("status").conditions;
    assert!(
        ready
            .iter()
            .any(|c| c.message.contains("spec.targets.inventoryRef")),
        "{ready:?}"
    );
    let hc = eventually(
        Duration::from_secs(60),
        "closed endpoint Unhealthy",
        || async {
            let hc = api.get_opt("closed").await.ok().flatten()?;
            (hc.status.as_ref()?.summary?.unhealthy == 1).then_some(hc)
        },
    )
    .await;
    let r = &hc.status.expect("status").results[0];
    assert!(r.message.contains("refused"), "{}", r.message);
    // the controller is alive and serving after both
    let series = format!(r#"check="{ns}/closed""#);
    let body = http_get(&controller.metrics_url()).await.expect("metrics");
    assert!(body.contains(&series), "{body}");
    // a deleted HealthCheck stops probing: its series go away with its task
    let out = kubectl(&kc, &["delete", "healthcheck", "closed", "-n", &ns]);
    assert!(out.status.success(), "{}", stderr(&out));
    eventually(
        Duration::from_secs(30),
        "the deleted check's series gone",
        || async {
            let body = http_get(&controller.metrics_url()).await?;
            (!body.contains(&series)).then_some(())
        },
    )
    .await;
}

/// Learned samples per series in the `<name>-baselines` ConfigMap.
async fn learned(client: &kube::Client, ns: &str, name: &str) -> Option<u64> {
    let api: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), ns);
    let cm = api.get_opt(&format!("{name}-baselines")).await.ok()??;
    let text = cm.data?.get("baselines.json")?.clone();
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("host-0/mem")?.get("n")?.as_u64()
}

#[tokio::test]
async fn baselines_survive_a_controller_restart() {
    let kc = kubeconfig();
    let ns = namespace("hc-base");
    let mut controller = ControllerProcess::start(&ns, "outrider", "solo", &[]);
    let client = client().await;
    apply(&kc, &secret_yaml("fleet-ssh", &ns));
    apply(&kc, &inventory_yaml("fleet", &ns, "fleet-ssh", 1));
    apply(
        &kc,
        &format!(
            "apiVersion: outrider.dev/v1alpha1\nkind: HealthCheck\nmetadata: {{name: learn, namespace: {ns}}}\n\
             spec:\n  interval: 5s\n  targets: {{inventoryRef: {{name: fleet}}}}\n  \
             baseline: {{enabled: true, warmup: 50}}\n  \
             checks: [{{name: mem, memory: {{maxUsedPercent: 100}}}}]\n"
        ),
    );
    let api: Api<HealthCheck> = Api::namespaced(client.clone(), &ns);
    eventually(Duration::from_secs(60), "a few rounds", || async {
        let body = http_get(&controller.metrics_url()).await?;
        (metric(&body, "outrider_health_rounds_total") >= 3.0).then_some(())
    })
    .await;
    assert!(api.get("learn").await.is_ok());
    // a graceful stop saves what was learned
    assert!(controller.terminate().success());
    let first = learned(&client, &ns, "learn")
        .await
        .expect("baselines saved on shutdown");
    assert!(first >= 3, "{first} samples learned");

    let mut controller = ControllerProcess::start(&ns, "outrider", "solo-2", &[]);
    eventually(
        Duration::from_secs(60),
        "rounds after the restart",
        || async {
            let body = http_get(&controller.metrics_url()).await?;
            (metric(&body, "outrider_health_rounds_total") >= 2.0).then_some(())
        },
    )
    .await;
    assert!(controller.terminate().success());
    let second = learned(&client, &ns, "learn")
        .await
        .expect("baselines saved again");
    assert!(
        second >= first + 2,
        "learning continued from {first} samples instead of starting over: {second}"
    );
}
