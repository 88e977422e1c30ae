//! The Helm chart as users install it: it installs, its Deployment becomes available, and
//! its RBAC is exactly enough for the controller to do its work, cluster-wide and scoped to
//! one namespace (`controller.watchNamespace`).

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, ResourceExt};
use outrider::api::deployment_plan::{DeploymentPlan, PlanPhase};
use outrider::api::{Inventory, LogPipeline};

use crate::support::*;

/// The node agents' ConfigMap the LogPipeline controller renders in the operator namespace.
const AGENT_CONFIGMAP: &str = "outrider-agent";
const CONFIG_HASH: &str = "outrider.dev/config-hash";

/// `helm upgrade --install` of the chart as release `release` in `ns`, waiting for it.
fn install(release: &str, ns: &str, sets: &[&str]) {
    let mut args = vec![
        "upgrade",
        "--install",
        release,
        "charts/outrider",
        "-n",
        ns,
        "--set",
        "controller.leaseDuration=10",
    ];
    for s in sets {
        args.extend(["--set", s]);
    }
    args.extend(["--wait", "--timeout", "120s"]);
    let out = helm(&args);
    assert!(
        out.status.success(),
        "helm install failed:\n{}{}",
        stdout(&out),
        stderr(&out)
    );
    let out = kubectl(
        &kubeconfig(),
        &[
            "get",
            "deploy",
            release,
            "-n",
            ns,
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
    assert_agents_ready_on_every_node(&format!("{release}-agent"), ns);
}

/// The agent DaemonSet has a ready pod on every node of the test cluster (kwok runs them).
fn assert_agents_ready_on_every_node(daemonset: &str, ns: &str) {
    let out = kubectl(&kubeconfig(), &["get", "nodes", "-o", "name"]);
    let nodes = stdout(&out).lines().count();
    assert!(nodes >= 2, "test cluster nodes: {}", stdout(&out));
    let out = kubectl(
        &kubeconfig(),
        &[
            "rollout",
            "status",
            "daemonset",
            daemonset,
            "-n",
            ns,
            "--timeout=120s",
        ],
    );
    assert!(out.status.success(), "agent rollout: {}", stderr(&out));
    let out = kubectl(
        &kubeconfig(),
        &[
            "get",
            "daemonset",
            daemonset,
            "-n",
            ns,
            "-o",
            "jsonpath={.status.desiredNumberScheduled} {.status.numberReady}",
        ],
    );
    assert_eq!(
        stdout(&out),
        format!("{nodes} {nodes}"),
        "an agent scheduled and ready on each node: {}",
        stderr(&out)
    );
}

fn uninstall(release: &str, ns: &str) {
    let out = helm(&["uninstall", release, "-n", ns, "--wait"]);
    assert!(out.status.success(), "helm uninstall: {}", stderr(&out));
}

/// `helm template` of the chart (no cluster involved), as YAML documents.
fn template(release: &str, ns: &str, sets: &[&str]) -> Vec<serde_yaml::Value> {
    let mut cmd = std::process::Command::new(repo().join("e2e/bin/helm"));
    cmd.args(["template", release, "charts/outrider", "-n", ns])
        .args(["--kube-version", "1.37.2"])
        .current_dir(repo());
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd
        .output()
        .expect("running e2e/bin/helm (run `make tools`)");
    assert!(out.status.success(), "helm template: {}", stderr(&out));
    serde_yaml::Deserializer::from_str(&stdout(&out))
        .map(|d| serde::Deserialize::deserialize(d).expect("rendered YAML"))
        .filter(|v: &serde_yaml::Value| !v.is_null())
        .collect()
}

/// The rendered object of `kind` named `name`.
fn find<'a>(
    docs: &'a [serde_yaml::Value],
    kind: &str,
    name: &str,
) -> Option<&'a serde_yaml::Value> {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
}

fn strings(v: &serde_yaml::Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Each rule of a (Cluster)Role as (resources, resourceNames, verbs) for the core group.
fn core_rules(role: &serde_yaml::Value) -> Vec<(Vec<String>, Vec<String>, Vec<String>)> {
    role["rules"]
        .as_sequence()
        .expect("rules")
        .iter()
        .filter(|r| strings(&r["apiGroups"]) == [""])
        .map(|r| {
            (
                strings(&r["resources"]),
                strings(&r["resourceNames"]),
                strings(&r["verbs"]),
            )
        })
        .collect()
}

/// `kubectl auth can-i` as whoever `kubeconfig` authenticates (a SelfSubjectAccessReview).
fn can_i(kubeconfig: &Path, verb: &str, resource: &str, ns: &str) -> bool {
    let out = kubectl(kubeconfig, &["auth", "can-i", verb, resource, "-n", ns]);
    let answer = stdout(&out).trim().to_string();
    assert!(
        answer == "yes" || answer == "no",
        "auth can-i {verb} {resource} -n {ns}: {answer} {}",
        stderr(&out)
    );
    answer == "yes"
}

/// Runs the controller locally under the chart's ServiceAccount (the chart's pods run on
/// kwok's simulated nodes, so the real binary runs here with exactly the chart's RBAC),
/// watching `watched` with the operator namespace `release_ns`, and drives one of each
/// implemented kind to its expected status: an Inventory Ready, a DeploymentPlan (a Job
/// stage and an SSH stage) Succeeded, and a LogPipeline rendered into the agents' ConfigMap
/// in `release_ns`, counting the chart's agent Pods there (Ready reason `RollingOut`: kwok runs
/// them, so none reports the config hash). Anything the RBAC lacks fails.
async fn controller_works_under_the_chart_rbac(
    sa_config: &Path,
    release: &str,
    watched: &str,
    release_ns: &str,
    extra: &[&str],
) {
    let kc = kubeconfig();
    let client = client().await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), release_ns);
    assert!(
        maps.get_opt(AGENT_CONFIGMAP).await.expect("get").is_none(),
        "the agents' ConfigMap does not exist before the controller creates it"
    );
    // the chart's Lease Role names the release's Lease only
    let controller =
        ControllerProcess::start_with(sa_config, watched, release_ns, release, "sa", extra);
    let plan = format!(
        "apiVersion: outrider.dev/v1alpha1\nkind: DeploymentPlan\nmetadata: {{name: rollout, namespace: {watched}}}\nspec:\n  targets: {{inventoryRef: {{name: fleet}}}}\n  strategy: {{batchSize: 100%}}\n  stages:\n    - name: migrate\n      runOnce: true\n      timeout: 2m\n      job:\n        template: {{spec: {{containers: [{{name: m, image: example.com/migrate:42}}], restartPolicy: Never}}}}\n    - name: rollout\n      command: [\"true\"]\n      timeout: 60s\n"
    );
    let pipeline = format!(
        "apiVersion: outrider.dev/v1alpha1\nkind: LogPipeline\nmetadata: {{name: shop, namespace: {watched}}}\nspec:\n  pods: {{selector: {{matchLabels: {{app: shop}}}}}}\n  outputs:\n    - {{name: out, http: {{url: \"http://127.0.0.1:9/ingest\"}}}}\n"
    );
    let manifest = format!(
        "{}---\n{}---\n{plan}---\n{pipeline}",
        secret_yaml("fleet-ssh", watched),
        inventory_yaml("fleet", watched, "fleet-ssh", 2),
    );
    apply(&kc, &manifest);

    let inventories: Api<Inventory> = Api::namespaced(client.clone(), watched);
    eventually(
        Duration::from_secs(60),
        "Inventory Ready under the chart's RBAC",
        || async {
            let inv = inventories.get_opt("fleet").await.ok().flatten()?;
            inv.status?
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                .then_some(())
        },
    )
    .await;

    let plans: Api<DeploymentPlan> = Api::namespaced(client.clone(), watched);
    let dp = eventually(
        Duration::from_secs(120),
        "DeploymentPlan Succeeded under the chart's RBAC",
        || async {
            let dp = plans.get_opt("rollout").await.ok().flatten()?;
            (dp.status.as_ref()?.phase == Some(PlanPhase::Succeeded)).then_some(dp)
        },
    )
    .await;
    let counts: Vec<(String, u32, u32)> = dp
        .status
        .expect("status")
        .stages
        .iter()
        .map(|s| (s.name.clone(), s.succeeded, s.failed))
        .collect();
    assert_eq!(
        counts,
        vec![("migrate".into(), 1, 0), ("rollout".into(), 2, 0)]
    );

    let pipelines: Api<LogPipeline> = Api::namespaced(client.clone(), watched);
    let hash = eventually(
        Duration::from_secs(60),
        "LogPipeline rendered (configHash, the chart's agents counted, Ready reason RollingOut) under the chart's RBAC",
        || async {
            let lp = pipelines.get_opt("shop").await.ok().flatten()?;
            let status = lp.status?;
            let rolling_out = status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "False" && c.reason == "RollingOut");
            let counted = status.nodes.is_some_and(|n| n.desired >= 1 && n.updated == 0);
            (rolling_out && counted).then_some(status.config_hash?)
        },
    )
    .await;
    let cm = maps
        .get_opt(AGENT_CONFIGMAP)
        .await
        .expect("get")
        .expect("the agents' ConfigMap in the release namespace");
    assert_eq!(
        cm.annotations().get(CONFIG_HASH),
        Some(&hash),
        "the ConfigMap carries the hash the LogPipeline reports"
    );
    let text = cm
        .data
        .clone()
        .unwrap_or_default()
        .remove("agent.yaml")
        .expect("agent.yaml");
    assert!(text.contains("name: shop"), "{text}");
    // written by the controller's server-side apply (which created it: absent above)
    let managers: Vec<(String, String)> = cm
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .map(|m| {
            (
                m.manager.clone().unwrap_or_default(),
                m.operation.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        managers,
        vec![("outrider".to_string(), "Apply".to_string())]
    );
    if watched != release_ns {
        let elsewhere: Api<ConfigMap> = Api::namespaced(client.clone(), watched);
        assert!(
            elsewhere
                .get_opt(AGENT_CONFIGMAP)
                .await
                .expect("get")
                .is_none(),
            "the agents' ConfigMap is rendered in the operator namespace only"
        );
    }

    let log = controller.log_text();
    assert!(
        !log.contains("forbidden") && !log.contains("Forbidden"),
        "the controller hit RBAC denials:\n{log}"
    );
}

#[tokio::test]
async fn chart_installs_and_its_rbac_is_enough_for_the_controller() {
    let release_ns = namespace("chart");
    let watched = namespace("chart-watched");
    // cluster-scoped names (ClusterRole) carry the release name: unique per run
    let release = format!("outrider-{}", std::process::id() % 100_000);
    install(&release, &release_ns, &[]);
    let out = kubectl(&kubeconfig(), &["get", "clusterrole", &release]);
    assert!(
        out.status.success(),
        "cluster-wide install: a ClusterRole: {}",
        stderr(&out)
    );

    let sa_config = service_account_kubeconfig(&release_ns, &release);
    controller_works_under_the_chart_rbac(&sa_config, &release, &watched, &release_ns, &[]).await;
    users_get_the_kinds_through_view_and_edit_but_never_status(&watched).await;

    uninstall(&release, &release_ns);
}

/// `auth can-i` as ServiceAccount `sa` of `ns`; `resource` may end in `/status` (the subresource).
fn user_can(ns: &str, sa: &str, verb: &str, resource: &str) -> bool {
    let who = format!("system:serviceaccount:{ns}:{sa}");
    let mut args = vec!["auth", "can-i", verb, "-n", ns, "--as", &who];
    match resource.strip_suffix("/status") {
        Some(r) => args.extend([r, "--subresource", "status"]),
        None => args.push(resource),
    }
    let out = kubectl(&kubeconfig(), &args);
    let answer = stdout(&out).trim().to_string();
    assert!(
        answer == "yes" || answer == "no",
        "auth can-i {args:?}: {answer} {}",
        stderr(&out)
    );
    answer == "yes"
}

/// Kubernetes' own `view` and `edit` roles, bound in a namespace, carry the chart's aggregated
/// rules: readers read the five kinds, editors write their spec, nobody but the controller
/// writes status.
async fn users_get_the_kinds_through_view_and_edit_but_never_status(ns: &str) {
    for (sa, role) in [("viewer", "view"), ("editor", "edit")] {
        let out = kubectl(&kubeconfig(), &["create", "serviceaccount", sa, "-n", ns]);
        assert!(out.status.success(), "{}", stderr(&out));
        let out = kubectl(
            &kubeconfig(),
            &[
                "create",
                "rolebinding",
                sa,
                "-n",
                ns,
                "--clusterrole",
                role,
                "--serviceaccount",
                &format!("{ns}:{sa}"),
            ],
        );
        assert!(out.status.success(), "{}", stderr(&out));
    }
    // the clusterrole-aggregation controller copies the rules in shortly after install
    eventually(
        Duration::from_secs(60),
        "aggregated view/edit rules",
        || async {
            (user_can(ns, "viewer", "list", "deploymentplans.outrider.dev")
                && user_can(ns, "editor", "create", "securitypolicies.outrider.dev"))
            .then_some(())
        },
    )
    .await;
    for kind in [
        "inventories",
        "deploymentplans",
        "healthchecks",
        "securitypolicies",
        "logpipelines",
    ] {
        let r = format!("{kind}.outrider.dev");
        assert!(user_can(ns, "viewer", "watch", &r), "view reads {kind}");
        assert!(
            !user_can(ns, "viewer", "create", &r),
            "view cannot create {kind}"
        );
        assert!(user_can(ns, "editor", "patch", &r), "edit writes {kind}");
        assert!(user_can(ns, "editor", "delete", &r), "edit deletes {kind}");
        let status = format!("{r}/status");
        for sa in ["viewer", "editor"] {
            assert!(
                !user_can(ns, sa, "patch", &status),
                "{sa} cannot patch {kind} status"
            );
            assert!(
                !user_can(ns, sa, "update", &status),
                "{sa} cannot update {kind} status"
            );
        }
    }
}

#[tokio::test]
async fn scoped_chart_grants_the_watched_namespace_and_only_the_agents_objects_in_its_own() {
    let kc = kubeconfig();
    let release_ns = namespace("chart-scoped");
    let watched = namespace("chart-scoped-watched");
    // a namespace the install knows nothing of (it need not exist to ask)
    let other = format!("chart-scoped-other-{}", std::process::id() % 100_000);
    let release = format!("outrider-scoped-{}", std::process::id() % 100_000);
    let watch = format!("controller.watchNamespace={watched}");
    install(&release, &release_ns, &[&watch]);
    let out = kubectl(&kc, &["get", "clusterrole", &release]);
    assert!(
        !out.status.success() && stderr(&out).contains("NotFound"),
        "a scoped install creates no ClusterRole: {}{}",
        stdout(&out),
        stderr(&out)
    );

    let sa = service_account_kubeconfig(&release_ns, &release);
    let lease = format!("leases.coordination.k8s.io/{release}");
    // in the release namespace: the agents' ConfigMap by name (create included: a
    // server-side apply that creates it is authorized as create of that name), their Pods
    let agent_cm = format!("configmaps/{AGENT_CONFIGMAP}");
    for (verb, resource, ns, want) in [
        ("get", agent_cm.as_str(), release_ns.as_str(), true),
        ("patch", &agent_cm, &release_ns, true),
        ("create", &agent_cm, &release_ns, true),
        ("update", &agent_cm, &release_ns, false),
        ("delete", &agent_cm, &release_ns, false),
        ("create", "configmaps", &release_ns, false),
        ("get", "configmaps/other", &release_ns, false),
        ("patch", "configmaps/other", &release_ns, false),
        ("list", "configmaps", &release_ns, false),
        ("list", "pods", &release_ns, true),
        ("watch", "pods", &release_ns, true),
        ("get", "pods", &release_ns, false),
        ("get", "secrets", &release_ns, false),
        ("list", "inventories.outrider.dev", &release_ns, false),
        // its own Lease only (creating one cannot be limited by name)
        ("update", &lease, &release_ns, true),
        (
            "update",
            "leases.coordination.k8s.io/another",
            &release_ns,
            false,
        ),
        ("create", "leases.coordination.k8s.io", &release_ns, true),
        // the watched namespace: the resources, their ConfigMaps (pinned host keys), Jobs
        ("list", "inventories.outrider.dev", &watched, true),
        (
            "patch",
            "deploymentplans.outrider.dev/status",
            &watched,
            true,
        ),
        ("create", "configmaps", &watched, true),
        ("patch", "configmaps/fleet", &watched, true),
        ("create", "jobs.batch", &watched, true),
        ("list", "pods", &watched, true),
        ("get", "secrets", &watched, true),
        // anywhere else: nothing
        ("list", "inventories.outrider.dev", &other, false),
        ("get", &agent_cm, &other, false),
        ("list", "pods", &other, false),
        ("list", "nodes", "default", false),
    ] {
        assert_eq!(
            can_i(&sa, verb, resource, ns),
            want,
            "the chart's ServiceAccount: can-i {verb} {resource} -n {ns}"
        );
    }
    // and for real, under its token: no other ConfigMap can be made in the release namespace,
    // neither by a POST nor by a server-side apply
    let out = kubectl(
        &sa,
        &["create", "configmap", "not-the-agents", "-n", &release_ns],
    );
    assert!(
        !out.status.success() && stderr(&out).contains("forbidden"),
        "POST create of another ConfigMap: {}",
        stderr(&out)
    );
    let out = kubectl_stdin(
        &sa,
        &[
            "apply",
            "--server-side",
            "--field-manager=outrider",
            "-f",
            "-",
        ],
        &format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: not-the-agents, namespace: {release_ns}}}\n"
        ),
    );
    assert!(
        !out.status.success() && stderr(&out).contains("forbidden"),
        "server-side apply creating another ConfigMap: {}",
        stderr(&out)
    );

    controller_works_under_the_chart_rbac(&sa, &release, &watched, &release_ns, &[]).await;

    uninstall(&release, &release_ns);
}

#[tokio::test]
async fn opted_in_namespaces_alone_grant_secrets_jobs_and_configmaps_and_others_are_refused() {
    let kc = kubeconfig();
    let release_ns = namespace("chart-optin");
    let tenant = namespace("chart-optin-tenant");
    let outsider = namespace("chart-optin-outsider");
    let release = format!("outrider-optin-{}", std::process::id() % 100_000);
    install(
        &release,
        &release_ns,
        &[&format!("rbac.tenantNamespaces={{{tenant}}}")],
    );
    let sa = service_account_kubeconfig(&release_ns, &release);
    let agent_cm = format!("configmaps/{AGENT_CONFIGMAP}");
    let lease = format!("leases.coordination.k8s.io/{release}");
    for (verb, resource, ns, want) in [
        // the namespace that opted in: its Secrets, Jobs, Pods and ConfigMaps
        ("get", "secrets", tenant.as_str(), true),
        ("watch", "secrets", &tenant, true),
        ("create", "jobs.batch", &tenant, true),
        ("list", "pods", &tenant, true),
        ("create", "configmaps", &tenant, true),
        // one that did not: the resources and their status, nothing else
        ("get", "secrets", &outsider, false),
        ("list", "secrets", &outsider, false),
        ("create", "jobs.batch", &outsider, false),
        ("list", "pods", &outsider, false),
        ("create", "configmaps", &outsider, false),
        ("patch", "configmaps/fleet", &outsider, false),
        ("list", "inventories.outrider.dev", &outsider, true),
        // the release namespace: the agents' ConfigMap and Pods, its own Lease
        ("patch", &agent_cm, &release_ns, true),
        ("create", "configmaps", &release_ns, false),
        ("patch", "configmaps/other", &release_ns, false),
        ("get", "secrets", &release_ns, false),
        ("list", "pods", &release_ns, true),
        ("update", &lease, &release_ns, true),
        (
            "update",
            "leases.coordination.k8s.io/another",
            &release_ns,
            false,
        ),
        // and no cluster-wide Secret list
        ("list", "secrets", "default", false),
    ] {
        assert_eq!(
            can_i(&sa, verb, resource, ns),
            want,
            "the chart's ServiceAccount: can-i {verb} {resource} -n {ns}"
        );
    }
    // for real, under its token: another namespace's Secret stays unreadable
    apply(&kc, &secret_yaml("fleet-ssh", &outsider));
    let out = kubectl(&sa, &["get", "secret", "fleet-ssh", "-n", &outsider]);
    assert!(
        !out.status.success() && stderr(&out).contains("forbidden"),
        "reading a Secret of a namespace that did not opt in: {}{}",
        stdout(&out),
        stderr(&out)
    );

    // a controller told the same, watching the outsider: Ready=False/NamespaceNotOptedIn,
    // and it never even asks for what it may not read
    let tenants = format!("--tenant-namespaces={tenant}");
    let refused = ControllerProcess::start_with(
        &sa,
        &outsider,
        &release_ns,
        &release,
        "refused",
        &["--leader-elect=false", &tenants],
    );
    apply(&kc, &inventory_yaml("fleet", &outsider, "fleet-ssh", 1));
    let inventories: Api<Inventory> = Api::namespaced(client().await, &outsider);
    let message = eventually(
        Duration::from_secs(60),
        "Inventory of the outsider Ready=False/NamespaceNotOptedIn",
        || async {
            let inv = inventories.get_opt("fleet").await.ok().flatten()?;
            inv.status?
                .conditions
                .iter()
                .find(|c| {
                    c.type_ == "Ready" && c.status == "False" && c.reason == "NamespaceNotOptedIn"
                })
                .map(|c| c.message.clone())
        },
    )
    .await;
    assert!(
        message.contains(&outsider) && message.contains("rbac.tenantNamespaces"),
        "{message}"
    );
    let log = refused.log_text();
    assert!(
        !log.contains("forbidden") && !log.contains("Forbidden"),
        "the controller asked for what the chart does not grant:\n{log}"
    );
    drop(refused);

    // the tenant's objects work under exactly these rights
    controller_works_under_the_chart_rbac(&sa, &release, &tenant, &release_ns, &[&tenants]).await;
    uninstall(&release, &release_ns);
}

#[test]
fn chart_renders_a_cluster_role_or_namespaced_roles_for_the_install_mode() {
    // cluster-wide: one ClusterRole covers every namespace, the release's included
    let docs = template("outrider", "ops", &[]);
    let role = find(&docs, "ClusterRole", "outrider").expect("ClusterRole");
    let rules = core_rules(role);
    for resource in ["configmaps", "pods", "nodes"] {
        assert!(
            rules
                .iter()
                .any(|(r, names, _)| r == &[resource] && names.is_empty()),
            "{resource} in {rules:?}"
        );
    }
    assert!(find(&docs, "ClusterRoleBinding", "outrider").is_some());
    assert!(find(&docs, "Role", "outrider-agents").is_none());
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    // the leader-election Role only (the agent has no rights)
    assert_eq!(
        kinds.iter().filter(|k| **k == "Role").count(),
        1,
        "{kinds:?}"
    );

    // scoped: no cluster-scoped RBAC; the resources' Role in the watched namespace; the
    // agents' ConfigMap (by name) and Pods in the release namespace; the Lease there too
    let docs = template("outrider", "ops", &["controller.watchNamespace=apps"]);
    assert!(find(&docs, "ClusterRole", "outrider").is_none());
    assert!(find(&docs, "ClusterRoleBinding", "outrider").is_none());
    let role = find(&docs, "Role", "outrider").expect("watched-namespace Role");
    assert_eq!(role["metadata"]["namespace"].as_str(), Some("apps"));
    let rules = core_rules(role);
    assert!(
        rules.contains(&(
            vec!["configmaps".into()],
            vec![],
            vec!["get".into(), "create".into(), "patch".into()]
        )),
        "{rules:?}"
    );
    assert!(!rules.iter().any(|(r, _, _)| r == &["nodes"]), "{rules:?}");
    let agents = find(&docs, "Role", "outrider-agents").expect("agents' Role");
    assert_eq!(agents["metadata"]["namespace"].as_str(), Some("ops"));
    assert_eq!(
        core_rules(agents),
        vec![
            (
                vec!["configmaps".into()],
                vec![AGENT_CONFIGMAP.into()],
                vec!["get".into(), "create".into(), "patch".into()]
            ),
            (
                vec!["pods".into()],
                vec![],
                vec!["list".into(), "watch".into()]
            ),
        ]
    );
    assert_eq!(
        agents["rules"].as_sequence().map(Vec::len),
        Some(2),
        "only core rules"
    );
    let binding = find(&docs, "RoleBinding", "outrider-agents").expect("agents' RoleBinding");
    assert_eq!(binding["metadata"]["namespace"].as_str(), Some("ops"));
    assert_eq!(binding["roleRef"]["name"].as_str(), Some("outrider-agents"));
    assert_eq!(binding["subjects"][0]["name"].as_str(), Some("outrider"));
    assert_eq!(binding["subjects"][0]["namespace"].as_str(), Some("ops"));
    let lease = find(&docs, "Role", "outrider-leader-election").expect("Lease Role");
    assert_eq!(lease["metadata"]["namespace"].as_str(), Some("ops"));
    // the node agent has no rights at all (the controller scrapes its config hash)
    assert!(
        find(&docs, "Role", "outrider-agent").is_none(),
        "an agent Role"
    );
    assert!(
        find(&docs, "RoleBinding", "outrider-agent").is_none(),
        "an agent RoleBinding"
    );
}

/// Cluster-scoped objects `release` left, by its instance label (CRDs are not labelled).
fn cluster_scoped_leftovers(release: &str) -> Vec<String> {
    let selector = format!("app.kubernetes.io/instance={release}");
    let out = kubectl(
        &kubeconfig(),
        &[
            "get",
            "clusterroles,clusterrolebindings,priorityclasses",
            "-l",
            &selector,
            "-o",
            "name",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).lines().map(str::to_string).collect()
}

#[test]
fn chart_upgrades_from_the_previous_version_and_uninstall_leaves_only_the_crds() {
    let ns = namespace("chart-upgrade");
    let release = format!("outrider-up-{}", std::process::id() % 100_000);
    // the chart as released before (0.1.0: no agent, older values), packaged in testdata
    let previous = repo().join("e2e/testdata/outrider-0.1.0.tgz");
    let out = helm(&[
        "install",
        &release,
        previous.to_str().expect("utf-8 path"),
        "-n",
        &ns,
        "--wait",
        "--timeout",
        "120s",
    ]);
    assert!(
        out.status.success(),
        "install 0.1.0: {}{}",
        stdout(&out),
        stderr(&out)
    );
    install(&release, &ns, &[]);
    let out = helm(&["history", &release, "-n", &ns, "-o", "json"]);
    let history: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("helm history");
    let charts: Vec<&str> = history
        .as_array()
        .expect("revisions")
        .iter()
        .filter_map(|r| r["chart"].as_str())
        .collect();
    assert_eq!(charts, ["outrider-0.1.0", "outrider-0.3.0"], "{history}");
    assert!(
        !cluster_scoped_leftovers(&release).is_empty(),
        "the install has cluster-scoped objects to clean up (ClusterRole, PriorityClass)"
    );

    uninstall(&release, &ns);
    assert_eq!(cluster_scoped_leftovers(&release), Vec::<String>::new());
    let out = kubectl(
        &kubeconfig(),
        &["get", "crd", "deploymentplans.outrider.dev", "-o", "name"],
    );
    assert!(
        out.status.success(),
        "CRDs stay (helm never deletes them): {}",
        stderr(&out)
    );
}

#[test]
fn a_typo_or_wrong_type_in_values_fails_helm_install_naming_the_key() {
    let ns = namespace("chart-values");
    for (set, says) in [
        (
            "controller.replica=3",
            "additional properties 'replica' not allowed",
        ),
        (
            "controller.replicas=two",
            "/controller/replicas': got string, want integer",
        ),
        ("agent.logRoots[0]=var/log", "/agent/logRoots/0"),
        (
            "metrics.serviceMonitor.interval=often",
            "/metrics/serviceMonitor/interval",
        ),
    ] {
        let out = helm(&[
            "install",
            "typo",
            "charts/outrider",
            "-n",
            &ns,
            "--set",
            set,
        ]);
        assert!(!out.status.success(), "{set} was accepted");
        assert!(stderr(&out).contains(says), "{set}: {}", stderr(&out));
    }
    let out = helm(&["list", "-n", &ns, "-q"]);
    assert_eq!(stdout(&out), "", "nothing was installed");
}

#[test]
fn chart_lints_clean_and_every_optional_object_renders_valid_for_the_api_server() {
    let out = helm(&["lint", "--strict", "charts/outrider"]);
    assert!(
        out.status.success(),
        "helm lint: {}{}",
        stdout(&out),
        stderr(&out)
    );
    let ns = namespace("chart-render");
    let docs = template(
        "render",
        &ns,
        &[
            "metrics.serviceMonitor.enabled=true",
            "metrics.prometheusRule.enabled=true",
            "networkPolicy.enabled=true",
            "networkPolicy.apiServerCIDRs={10.96.0.1/32}",
            "controller.egressCIDRs={198.18.0.0/15}",
            "argocd.healthChecks=true",
            "agent.secrets={es-creds}",
        ],
    );
    let kinds: std::collections::BTreeSet<&str> =
        docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in [
        "Deployment",
        "DaemonSet",
        "PodDisruptionBudget",
        "PriorityClass",
        "NetworkPolicy",
        "ServiceMonitor",
        "PrometheusRule",
        "ConfigMap",
    ] {
        assert!(kinds.contains(kind), "{kind} rendered: {kinds:?}");
    }
    // the test cluster has no Prometheus Operator CRDs: the rest is checked by the API server
    let core: Vec<&serde_yaml::Value> = docs
        .iter()
        .filter(|d| d["apiVersion"].as_str() != Some("monitoring.coreos.com/v1"))
        .collect();
    let manifest: String = core
        .iter()
        .map(|d| format!("---\n{}", serde_yaml::to_string(d).expect("yaml")))
        .collect();
    let out = kubectl_stdin(
        &kubeconfig(),
        &["apply", "--dry-run=server", "-n", &ns, "-f", "-"],
        &manifest,
    );
    assert!(out.status.success(), "server dry run: {}", stderr(&out));

    // hardening every pod of the chart keeps
    for (kind, name, token) in [
        ("Deployment", "render-outrider", true),
        ("DaemonSet", "render-outrider-agent", false),
    ] {
        let pod = &find(&docs, kind, name).unwrap_or_else(|| panic!("{kind} {name}"))["spec"]["template"]
            ["spec"];
        assert_eq!(
            pod["automountServiceAccountToken"].as_bool(),
            Some(token),
            "{kind}: a Kubernetes token only for the controller"
        );
        let c = &pod["containers"][0];
        let sc = &c["securityContext"];
        assert_eq!(
            sc["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{kind}"
        );
        assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "{kind}");
        assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"], "{kind}");
        assert_eq!(
            sc["seccompProfile"]["type"].as_str(),
            Some("RuntimeDefault"),
            "{kind}"
        );
        assert!(
            c["resources"]["limits"]["memory"].is_string(),
            "{kind} memory limit"
        );
        assert_eq!(
            c["livenessProbe"]["httpGet"]["path"].as_str(),
            Some("/healthz"),
            "{kind}"
        );
        assert_eq!(
            c["readinessProbe"]["httpGet"]["path"].as_str(),
            Some("/readyz"),
            "{kind}"
        );
    }
    let ds = &find(&docs, "DaemonSet", "render-outrider-agent").expect("agent")["spec"]["template"]
        ["spec"];
    assert_eq!(
        strings(&ds["containers"][0]["securityContext"]["capabilities"]["add"]),
        ["DAC_READ_SEARCH"]
    );
    let mounts = ds["containers"][0]["volumeMounts"]
        .as_sequence()
        .expect("mounts");
    let log_mount = mounts
        .iter()
        .find(|m| m["mountPath"].as_str() == Some("/var/log"))
        .expect("/var/log mounted");
    assert_eq!(
        log_mount["readOnly"].as_bool(),
        Some(true),
        "log roots are read-only"
    );
    assert!(
        ds["tolerations"]
            .as_sequence()
            .is_some_and(|t| t.iter().any(|t| t["operator"].as_str() == Some("Exists"))),
        "runs on every node"
    );
    for sa in ["render-outrider", "render-outrider-agent"] {
        let sa = find(&docs, "ServiceAccount", sa).expect("service account");
        assert_eq!(
            sa["automountServiceAccountToken"].as_bool(),
            Some(false),
            "tokens only where a pod asks"
        );
    }
}

#[test]
fn every_metric_the_prometheus_rules_alert_on_is_one_outrider_exports() {
    let docs = template("alerts", "ops", &["metrics.prometheusRule.enabled=true"]);
    let rule = find(&docs, "PrometheusRule", "alerts-outrider").expect("PrometheusRule");
    let exprs: Vec<&str> = rule["spec"]["groups"][0]["rules"]
        .as_sequence()
        .expect("rules")
        .iter()
        .filter_map(|r| r["expr"].as_str())
        .collect();
    assert!(exprs.len() >= 5, "{exprs:?}");
    // what the controller and the agent register
    let mut registry = prometheus_client::registry::Registry::default();
    let controller = outrider::telemetry::Metrics::new(&mut registry);
    let agent = outrider::agent::metrics::AgentMetrics::new(&mut registry);
    // a family is only printed once it has a series: one each for the families alerted on
    use outrider::agent::metrics::{OutputLabels, PipelineLabels};
    use outrider::telemetry::{InventoryStateLabels, ResultLabel};
    let result = ResultLabel { result: "x".into() };
    controller.plan_runs.get_or_create(&result).inc();
    controller.policy_applies.get_or_create(&result).inc();
    let inventory = InventoryStateLabels {
        inventory: "x".into(),
        state: "x".into(),
    };
    controller.inventory_hosts.get_or_create(&inventory).set(1);
    let pipeline = PipelineLabels {
        pipeline: "x".into(),
    };
    agent.checkpoint_lag_bytes.get_or_create(&pipeline).set(1);
    let output = OutputLabels {
        pipeline: "x".into(),
        output: "x".into(),
    };
    agent.records_dead_lettered.get_or_create(&output).inc();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    let exported: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    for expr in exprs {
        let names = expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("outrider_"));
        for name in names {
            let known = exported.iter().any(|(n, t)| {
                n == name || (t == "counter" && name.strip_suffix("_total") == Some(n))
            });
            assert!(known, "{name} in alert `{expr}` is not exported");
        }
    }
}
