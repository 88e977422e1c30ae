//! The Helm chart as users install it: it installs, its Deployment becomes available, and
//! its RBAC is exactly enough for the controller to do its work.

use std::time::Duration;

use kube::Api;
use outrider::api::Inventory;

use crate::support::*;

#[tokio::test]
async fn chart_installs_and_its_rbac_is_enough_for_the_controller() {
    let kc = kubeconfig();
    let release_ns = namespace("chart");
    let watched = namespace("chart-watched");
    // cluster-scoped names (ClusterRole) carry the release name: unique per run
    let release = format!("outrider-{}", std::process::id() % 100_000);
    let out = helm(&[
        "upgrade",
        "--install",
        &release,
        "charts/outrider",
        "-n",
        &release_ns,
        "--set",
        "controller.leaseDuration=10",
        "--wait",
        "--timeout",
        "120s",
    ]);
    assert!(
        out.status.success(),
        "helm install failed:\n{}{}",
        stdout(&out),
        stderr(&out)
    );
    let out = kubectl(
        &kc,
        &[
            "get",
            "deploy",
            &release,
            "-n",
            &release_ns,
            "-o",
            "jsonpath={.status.availableReplicas}",
        ],
    );
    assert_eq!(
        stdout(&out),
        "2",
        "both replicas available (kwok runs the pods): {}",
        stderr(&out)
    );

    // the chart's pods run on kwok's simulated nodes, so run the same binary locally with the
    // chart's ServiceAccount: anything its RBAC lacks fails here
    let sa_config = service_account_kubeconfig(&release_ns, &release);
    let controller =
        ControllerProcess::start_with(&sa_config, &watched, &release_ns, "outrider-sa", "sa", &[]);
    let manifest = format!(
        "{}---\n{}",
        secret_yaml("fleet-ssh", &watched),
        inventory_yaml("fleet", &watched, "fleet-ssh", 2)
    );
    apply(&kc, &manifest);
    let api: Api<Inventory> = Api::namespaced(client().await, &watched);
    eventually(
        Duration::from_secs(60),
        "Inventory Ready under the chart's RBAC",
        || async {
            let inv = api.get_opt("fleet").await.ok().flatten()?;
            inv.status?
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                .then_some(())
        },
    )
    .await;
    let log = controller.log_text();
    assert!(
        !log.contains("forbidden"),
        "the controller hit RBAC denials:\n{log}"
    );

    let out = helm(&["uninstall", &release, "-n", &release_ns, "--wait"]);
    assert!(out.status.success(), "helm uninstall: {}", stderr(&out));
}
