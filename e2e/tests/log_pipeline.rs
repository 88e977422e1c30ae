//! The LogPipeline and ClusterLogPipeline controllers against the real API server: the
//! rendered agent ConfigMap, broken pipelines kept out of it and reported, rollout counts
//! from agent Pods (kwok runs them; the controller scrapes real agents on their Pod IPs for
//! the config hash they run), and a
//! tenant's LogPipeline shipping only its own namespace's selected pods into a real store.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::DeleteParams;
use kube::{Api, ResourceExt};
use outrider::api::cluster_log_pipeline::ClusterLogPipeline;
use outrider::api::log_pipeline::{LogPipeline, LogPipelineStatus};

use crate::support::*;

use crate::victorialogs;

/// A ClusterLogPipeline `<ns>-<name>`, labelled for the controller of namespace `ns` (its
/// `--cluster-pipeline-selector`): cluster-scoped names are shared by every test.
fn pipeline(name: &str, ns: &str, extra_input: &str, output: &str) -> String {
    format!(
        "apiVersion: outrider.dev/v1alpha1\nkind: ClusterLogPipeline\nmetadata: {{name: {ns}-{name}, labels: {{outrider.dev/e2e: {ns}}}}}\nspec:\n  nodeSelector: {{matchLabels: {{kubernetes.io/os: linux}}}}\n  inputs:\n    - {{name: app, paths: [\"/var/log/app/*.log\"]{extra_input}}}\n  fields: {{service: shop}}\n  outputs:\n    - {output}\n"
    )
}

fn ready_of(status: Option<&LogPipelineStatus>) -> Option<(String, String, String)> {
    let c = status?.conditions.iter().find(|c| c.type_ == "Ready")?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn ready(lp: &ClusterLogPipeline) -> Option<(String, String, String)> {
    ready_of(lp.status.as_ref())
}

async fn wait_reason(
    api: &Api<ClusterLogPipeline>,
    name: &str,
    reason: &str,
) -> ClusterLogPipeline {
    eventually(
        Duration::from_secs(60),
        &format!("{name} Ready reason {reason}"),
        || async {
            let lp = api.get_opt(name).await.ok().flatten()?;
            (ready(&lp)?.1 == reason).then_some(lp)
        },
    )
    .await
}

#[tokio::test]
async fn pipelines_render_into_one_configmap_and_report_agent_rollout() {
    let kc = kubeconfig();
    let ns = namespace("lp-render");
    let selector = format!("outrider.dev/e2e={ns}");
    let _controller = ControllerProcess::start(
        &ns,
        "outrider",
        "solo",
        &["--cluster-pipeline-selector", &selector],
    );
    let client = client().await;
    let api: Api<ClusterLogPipeline> = Api::all(client.clone());
    let name = |n: &str| format!("{ns}-{n}");
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);

    apply(
        &kc,
        &pipeline(
            "shop",
            &ns,
            "",
            "{name: out, http: {url: \"http://127.0.0.1:9/ingest\"}}",
        ),
    );
    // a regex the CRD cannot check, and a Secret that does not exist: both left out
    apply(
        &kc,
        &pipeline(
            "broken",
            &ns,
            ", multiline: {startPattern: \"([unclosed\"}",
            "{name: out, stdout: {}}",
        ),
    );
    apply(
        &kc,
        &pipeline(
            "nosecret",
            &ns,
            "",
            "{name: es, elasticsearch: {url: \"http://127.0.0.1:9\", index: logs, secretRef: {name: es-creds}}}",
        ),
    );

    // paths the node agents may not touch: an input outside agent.logRoots (/var/log by
    // default) and a file: output with no agent.fileOutputDir
    apply(
        &kc,
        &format!(
            "apiVersion: outrider.dev/v1alpha1\nkind: ClusterLogPipeline\nmetadata: {{name: {ns}-escape, labels: {{outrider.dev/e2e: {ns}}}}}\nspec:\n  inputs:\n    - {{name: app, paths: [\"/var/log/app/*.log\", \"/etc/shadow\"]}}\n  outputs:\n    - {{name: out, stdout: {{}}}}\n"
        ),
    );
    apply(
        &kc,
        &pipeline(
            "fileout",
            &ns,
            "",
            "{name: archive, file: {path: \"/var/lib/outrider-agent/out/x.ndjson\"}}",
        ),
    );

    let lp = wait_reason(&api, &name("shop"), "NoAgents").await;
    for (n, field) in [
        ("escape", "spec.inputs[0].paths[1]"),
        ("fileout", "spec.outputs[0].file.path"),
    ] {
        let refused = wait_reason(&api, &name(n), "PathNotAllowed").await;
        let message = ready(&refused).expect("Ready").2;
        assert!(message.contains(field), "{n}: {message}");
    }
    let hash = lp
        .status
        .as_ref()
        .and_then(|s| s.config_hash.clone())
        .expect("configHash");
    let broken = wait_reason(&api, &name("broken"), "InvalidSpec").await;
    let message = ready(&broken).expect("Ready").2;
    assert!(
        message.contains("spec.inputs[0].multiline.startPattern"),
        "{message}"
    );
    assert!(
        broken
            .status
            .as_ref()
            .and_then(|s| s.config_hash.clone())
            .is_none()
    );
    let nosecret = wait_reason(&api, &name("nosecret"), "SecretNotFound").await;
    let message = ready(&nosecret).expect("Ready").2;
    assert!(
        message.contains("es-creds") && message.contains("spec.outputs[es].secretRef"),
        "{message}"
    );

    let cm = eventually(Duration::from_secs(30), "the agent ConfigMap", || async {
        let cm = maps.get_opt("outrider-agent").await.ok().flatten()?;
        (cm.annotations().get("outrider.dev/config-hash") == Some(&hash)).then_some(cm)
    })
    .await;
    let text = cm
        .data
        .clone()
        .unwrap_or_default()
        .remove("agent.yaml")
        .expect("agent.yaml");
    assert_eq!(outrider::agent::report::config_hash(text.as_bytes()), hash);
    let file: outrider::agent::config::AgentConfigFile =
        serde_yaml::from_str(&text).expect("agent.yaml parses");
    let names: Vec<String> = file
        .cluster_pipelines
        .iter()
        .map(|p| p.name.clone())
        .collect();
    assert_eq!(
        names,
        vec![name("shop")],
        "only the valid pipeline is rendered"
    );

    // two agents come up (kwok makes them Ready) but run no config yet
    let ports = [free_port(), free_port()];
    apply(
        &kc,
        &agent_pod_yaml("agent-0", &ns, "kwok-node-0", ports[0]),
    );
    apply(
        &kc,
        &agent_pod_yaml("agent-1", &ns, "kwok-node-1", ports[1]),
    );
    let lp = eventually(
        Duration::from_secs(60),
        "2 ready agents, 0 updated",
        || async {
            let lp = api.get_opt(&name("shop")).await.ok().flatten()?;
            let n = lp.status.as_ref()?.nodes?;
            (n.desired == 2 && n.ready == 2).then_some(lp)
        },
    )
    .await;
    let nodes = lp.status.as_ref().and_then(|s| s.nodes).expect("nodes");
    assert_eq!(nodes.updated, 0);
    assert_eq!(ready(&lp).map(|r| r.1), Some("RollingOut".into()));
    // the real agents, given the rendered agent.yaml and serving /metrics on their Pods' IPs
    // (loopback in the test cluster), are scraped for the configuration they run
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("agent.yaml");
    std::fs::write(&config, &text).expect("write agent.yaml");
    let mut agents = Vec::new();
    for (pod, port) in ["agent-0", "agent-1"].into_iter().zip(ports) {
        let ip = pod_ip(&ns, pod).await;
        agents.push(AgentProcess::start(
            &config,
            dir.path(),
            pod,
            &format!("{ip}:{port}"),
        ));
    }
    let lp = wait_reason(&api, &name("shop"), "AllNodesShipping").await;
    let nodes = lp.status.as_ref().and_then(|s| s.nodes).expect("nodes");
    assert_eq!((nodes.desired, nodes.ready, nodes.updated), (2, 2, 2));
    assert_eq!(ready(&lp).map(|r| r.0), Some("True".into()));

    // deleting the pipeline takes it out of the agent config
    for n in ["shop", "broken", "nosecret", "escape", "fileout"] {
        let _ = api.delete(&name(n), &DeleteParams::default()).await;
    }
    eventually(
        Duration::from_secs(30),
        "shop to leave agent.yaml",
        || async {
            let cm = maps.get_opt("outrider-agent").await.ok().flatten()?;
            let text = cm.data?.remove("agent.yaml")?;
            (!text.contains(&name("shop"))).then_some(())
        },
    )
    .await;
}

/// `<root>/<ns>_<pod>_<uid>/app/0.log` of a pod: `n` CRI lines whose JSON message names the
/// namespace and pod it came from.
fn write_pod_log(root: &std::path::Path, ns: &str, pod: &Pod, n: usize) {
    let name = pod.name_any();
    let uid = pod.uid().expect("pod uid");
    let dir = root.join(format!("{ns}_{name}_{uid}")).join("app");
    std::fs::create_dir_all(&dir).expect("pod log dir");
    let text: String = (0..n)
        .map(|i| {
            format!(
                "2026-12-07T10:00:00.{i:09}Z stdout F {{\"msg\":\"{ns}/{name} line {i}\",\"level\":\"info\"}}\n"
            )
        })
        .collect();
    std::fs::write(dir.join("0.log"), text).expect("write pod log");
}

fn kwok_pod(name: &str, ns: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}\nspec:\n  nodeName: kwok-node-0\n  containers: [{{name: app, image: example.com/shop:1}}]\n"
    )
}

/// A tenant's LogPipeline in namespace `a` selecting `app=shop`: the controller renders only
/// `a`'s matching pod, and a real agent reading a pod log root that also holds `a`'s other
/// pod and `b`'s pod of the same name and labels ships exactly the selected pod's lines into
/// VictoriaLogs, read back — `b`'s never.
#[tokio::test]
async fn a_tenant_pipeline_ships_only_its_own_namespaces_selected_pods_into_the_store() {
    let kc = kubeconfig();
    let a = namespace("lp-tenant-a");
    let b = namespace("lp-tenant-b");
    let _controller = ControllerProcess::start(&a, "outrider", "solo", &[]);
    let store = victorialogs::VictoriaLogs::start();
    let client = client().await;

    // the same pod name and labels in both namespaces, and an unselected pod in `a`
    apply(&kc, &kwok_pod("shop-1", &a, "shop"));
    apply(&kc, &kwok_pod("web-1", &a, "web"));
    apply(&kc, &kwok_pod("shop-1", &b, "shop"));
    let root = tempfile::tempdir().expect("tempdir");
    let pods_root = root.path().join("pods");
    const LINES: usize = 50;
    for (ns, pod) in [(&a, "shop-1"), (&a, "web-1"), (&b, "shop-1")] {
        let p = Api::<Pod>::namespaced(client.clone(), ns)
            .get(pod)
            .await
            .expect("pod");
        write_pod_log(&pods_root, ns, &p, LINES);
    }

    apply(
        &kc,
        &format!(
            "apiVersion: outrider.dev/v1alpha1\nkind: LogPipeline\nmetadata: {{name: shop, namespace: {a}}}\nspec:\n  pods: {{selector: {{matchLabels: {{app: shop}}}}, containers: [app]}}\n  parser: json\n  fields: {{tenant: {a}}}\n  outputs:\n    - {{name: store, loki: {{url: \"http://127.0.0.1:{}/insert?_msg_field=message&_time_field=timestamp\", labels: {{namespace: \"{{{{namespace}}}}\"}}}}}}\n  delivery: {{batch: {{maxEvents: 100, maxWait: 200ms}}}}\n",
            store.port
        ),
    );
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &a);
    let text = eventually(
        Duration::from_secs(60),
        "agent.yaml with a's selected pod",
        || async {
            let cm = maps.get_opt("outrider-agent").await.ok().flatten()?;
            let text = cm.data?.remove("agent.yaml")?;
            text.contains("shop-1").then_some(text)
        },
    )
    .await;
    let file: outrider::agent::config::AgentConfigFile =
        serde_yaml::from_str(&text).expect("agent.yaml parses");
    let pods: Vec<(String, Vec<String>)> = file
        .pipelines
        .iter()
        .map(|p| {
            (
                format!("{}/{}", p.namespace, p.name),
                p.pods.iter().map(|x| x.name.clone()).collect(),
            )
        })
        .collect();
    assert_eq!(pods, [(format!("{a}/shop"), vec!["shop-1".to_string()])]);

    let config = root.path().join("agent.yaml");
    std::fs::write(&config, &text).expect("write agent.yaml");
    let log = std::fs::File::create(root.path().join("agent.log")).expect("agent log");
    let mut agent = std::process::Command::new(env!("CARGO_BIN_EXE_outrider"))
        .arg("agent")
        .arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(root.path().join("state"))
        .arg("--pod-log-root")
        .arg(&pods_root)
        .arg("--allowed-root")
        .arg(root.path())
        .args([
            "--node-name",
            "kwok-node-0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args(["--scan-interval", "200ms", "--poll-interval", "50ms"])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start outrider agent");

    let rows = store
        .wait_for_count(
            &format!("tenant:{a}"),
            LINES as u64,
            Duration::from_secs(60),
        )
        .await;
    // give stray lines (which must not exist) time to arrive, then count everything
    tokio::time::sleep(Duration::from_secs(2)).await;
    store.flush().await;
    let all = store.count("*").await;
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(
        all,
        LINES as u64,
        "only a/shop-1's lines; agent log:\n{}",
        std::fs::read_to_string(root.path().join("agent.log")).unwrap_or_default()
    );
    for r in &rows {
        let msg = r["_msg"].as_str().unwrap_or_default();
        assert!(msg.starts_with(&format!("{a}/shop-1 line ")), "{r}");
        assert_eq!(r["namespace"], a.as_str(), "{r}");
        assert_eq!(r["pod"], "shop-1", "{r}");
        assert_eq!(r["container"], "app", "{r}");
    }
    let _ = Api::<LogPipeline>::namespaced(client.clone(), &a)
        .delete("shop", &DeleteParams::default())
        .await;
}
