//! The LogPipeline controller against the real API server: the rendered agent ConfigMap,
//! broken pipelines kept out of it and reported, and rollout counts from agent Pods (kwok
//! runs them; the test annotates them with the config hash the way an agent reports it).

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::DeleteParams;
use kube::{Api, ResourceExt};
use outrider::api::log_pipeline::LogPipeline;

use crate::support::*;

fn pipeline(name: &str, ns: &str, extra_input: &str, output: &str) -> String {
    format!(
        "apiVersion: outrider.dev/v1alpha1\nkind: LogPipeline\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  nodeSelector: {{matchLabels: {{kubernetes.io/os: linux}}}}\n  inputs:\n    - {{name: app, paths: [\"/var/log/app/*.log\"]{extra_input}}}\n  fields: {{service: shop}}\n  outputs:\n    - {output}\n"
    )
}

fn agent_pod(name: &str, ns: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app.kubernetes.io/name: outrider-agent}}}}\nspec:\n  nodeName: {node}\n  containers: [{{name: agent, image: example.com/outrider:test}}]\n"
    )
}

fn ready(lp: &LogPipeline) -> Option<(String, String, String)> {
    let c = lp
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn wait_reason(api: &Api<LogPipeline>, name: &str, reason: &str) -> LogPipeline {
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
    let _controller = ControllerProcess::start(&ns, "outrider", "solo", &[]);
    let client = client().await;
    let api: Api<LogPipeline> = Api::namespaced(client.clone(), &ns);
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
            "apiVersion: outrider.dev/v1alpha1\nkind: LogPipeline\nmetadata: {{name: escape, namespace: {ns}}}\nspec:\n  inputs:\n    - {{name: app, paths: [\"/var/log/app/*.log\", \"/etc/shadow\"]}}\n  outputs:\n    - {{name: out, stdout: {{}}}}\n"
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

    let lp = wait_reason(&api, "shop", "NoAgents").await;
    for (name, field) in [
        ("escape", "spec.inputs[0].paths[1]"),
        ("fileout", "spec.outputs[0].file.path"),
    ] {
        let refused = wait_reason(&api, name, "PathNotAllowed").await;
        let message = ready(&refused).expect("Ready").2;
        assert!(message.contains(field), "{name}: {message}");
    }
    let hash = lp
        .status
        .as_ref()
        .and_then(|s| s.config_hash.clone())
        .expect("configHash");
    let broken = wait_reason(&api, "broken", "InvalidSpec").await;
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
    let nosecret = wait_reason(&api, "nosecret", "SecretNotFound").await;
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
        .pipelines
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    assert_eq!(
        names,
        vec![format!("{ns}/shop")],
        "only the valid pipeline is rendered"
    );

    // two agents come up (kwok makes them Ready) but run no config yet
    apply(&kc, &agent_pod("agent-0", &ns, "kwok-node-0"));
    apply(&kc, &agent_pod("agent-1", &ns, "kwok-node-1"));
    let lp = eventually(
        Duration::from_secs(60),
        "2 ready agents, 0 updated",
        || async {
            let lp = api.get_opt("shop").await.ok().flatten()?;
            let n = lp.status.as_ref()?.nodes?;
            (n.desired == 2 && n.ready == 2).then_some(lp)
        },
    )
    .await;
    let nodes = lp.status.as_ref().and_then(|s| s.nodes).expect("nodes");
    assert_eq!(nodes.updated, 0);
    assert_eq!(ready(&lp).map(|r| r.1), Some("RollingOut".into()));
    // the real agent, given the rendered agent.yaml and its Pod's name, reports what it runs
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("agent.yaml");
    std::fs::write(&config, &text).expect("write agent.yaml");
    let _agents: Vec<AgentProcess> = ["agent-0", "agent-1"]
        .iter()
        .map(|pod| AgentProcess::start(&kc, &ns, pod, &config, dir.path()))
        .collect();
    let lp = wait_reason(&api, "shop", "AllNodesShipping").await;
    let nodes = lp.status.as_ref().and_then(|s| s.nodes).expect("nodes");
    assert_eq!((nodes.desired, nodes.ready, nodes.updated), (2, 2, 2));
    assert_eq!(ready(&lp).map(|r| r.0), Some("True".into()));

    // deleting the pipeline takes it out of the agent config
    api.delete("shop", &DeleteParams::default())
        .await
        .expect("delete");
    eventually(
        Duration::from_secs(30),
        "shop to leave agent.yaml",
        || async {
            let cm = maps.get_opt("outrider-agent").await.ok().flatten()?;
            let text = cm.data?.remove("agent.yaml")?;
            (!text.contains("name: shop")).then_some(())
        },
    )
    .await;
}

/// `outrider agent --config FILE` standing in for the agent in Pod `pod` (POD_NAME and
/// POD_NAMESPACE as the downward API sets them), talking to the test API server.
struct AgentProcess(std::process::Child);

impl AgentProcess {
    fn start(
        kc: &std::path::Path,
        ns: &str,
        pod: &str,
        config: &std::path::Path,
        dir: &std::path::Path,
    ) -> Self {
        let state = dir.join(format!("state-{pod}"));
        let log = std::fs::File::create(dir.join(format!("{pod}.log"))).expect("agent log");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_outrider"))
            .arg("agent")
            .arg("--config")
            .arg(config)
            .arg("--state-dir")
            .arg(&state)
            .args(["--node-name", pod, "--metrics-addr", "127.0.0.1:0"])
            .env("KUBECONFIG", kc)
            .env("POD_NAME", pod)
            .env("POD_NAMESPACE", ns)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start outrider agent");
        Self(child)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
