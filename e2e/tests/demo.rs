//! `make demo` as a newcomer runs it: `e2e/demo.sh` brings up its fleet (network-namespace
//! hosts with real sshd), VictoriaLogs, the controller and the node agent, and applies
//! `examples/*.yaml`; every kind must then be in its good state, read back through the API (not
//! from the script's output), with the effects real on the hosts and in the log store; `down`
//! must leave no namespace, bridge, process or file behind.
//!
//! The demo runs in a slot of its own (`OUTRIDER_DEMO_SLOT`: fleet 198.19.S.0/24, bridge
//! `ordemoS`, Kubernetes namespace `outrider-demo-S`) with its state in a temp dir
//! (`OUTRIDER_DEMO_DIR`), so a user's `make demo` (slot 0) on the same control plane is left alone.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::Api;
use outrider::api::cluster_log_pipeline::ClusterLogPipeline;
use outrider::api::deployment_plan::DeploymentPlan;
use outrider::api::health_check::HealthCheck;
use outrider::api::inventory::Inventory;
use outrider::api::security_policy::SecurityPolicy;

use crate::support::*;

const HOSTS: [(&str, u8); 3] = [("web-1", 11), ("web-2", 12), ("db-1", 13)];

/// One demo in its slot and temp state dir; `down` on drop unless the test did it.
struct Demo {
    slot: u32,
    dir: tempfile::TempDir,
    cluster: PathBuf,
    down: bool,
}

impl Demo {
    fn new() -> Demo {
        let kc = kubeconfig();
        let cluster = kc.parent().expect("cluster dir").to_path_buf();
        Demo {
            slot: std::process::id() % 250 + 1,
            dir: tempfile::Builder::new()
                .prefix("outrider-demo-test-")
                .tempdir()
                .expect("tempdir"),
            cluster,
            down: false,
        }
    }

    fn run(&self, arg: &str) -> Output {
        Command::new(repo().join("e2e/demo.sh"))
            .arg(arg)
            .env("OUTRIDER_CLUSTER_DIR", &self.cluster)
            .env("OUTRIDER_DEMO_DIR", self.dir.path())
            .env("OUTRIDER_DEMO_SLOT", self.slot.to_string())
            .env("OUTRIDER_DEMO_TIMEOUT", "240")
            .env("OUTRIDER_BIN", env!("CARGO_BIN_EXE_outrider"))
            .stdin(Stdio::null())
            .output()
            .expect("run e2e/demo.sh")
    }

    fn namespace(&self) -> String {
        format!("outrider-demo-{}", self.slot)
    }

    fn net(&self) -> String {
        format!("198.19.{}", self.slot)
    }

    fn netns(&self, host: &str) -> String {
        format!("ordemo{}-{host}", self.slot)
    }

    fn state(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if !self.down {
            let out = self.run("down");
            if !out.status.success() {
                eprintln!("demo.sh down failed:\n{}", stderr(&out));
            }
        }
    }
}

fn condition(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    t: &str,
) -> (String, String) {
    conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.clone(), c.reason.clone()))
        .unwrap_or_default()
}

/// Whether a TCP connection from inside `netns` to `addr` completes within 2 s.
fn connects_from(netns: &str, addr: &str, port: u16) -> bool {
    Command::new("ip")
        .args(["netns", "exec", netns, "timeout", "2", "bash", "-c"])
        .arg(format!("exec 3<>/dev/tcp/{addr}/{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("ip netns exec")
        .success()
}

fn pids_in(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            pids.extend(pids_in(&path));
        } else if path.extension().is_some_and(|e| e == "pid")
            && let Some(pid) = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
        {
            pids.push(pid);
        }
    }
    pids
}

#[tokio::test]
async fn demo_brings_every_kind_to_its_good_state_on_a_real_fleet_and_down_leaves_nothing() {
    let mut demo = Demo::new();
    let ns = demo.namespace();
    let out = demo.run("up");
    assert!(
        out.status.success(),
        "e2e/demo.sh up failed:\n{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    let client = client().await;

    // Inventory: every host answers over SSH with the Secret's key and pinned host keys
    let inv = Api::<Inventory>::namespaced(client.clone(), &ns)
        .get("demo-fleet")
        .await
        .expect("Inventory demo-fleet");
    let status = inv.status.expect("Inventory status");
    assert_eq!((status.hosts, status.reachable), (3, Some(3)));
    assert_eq!(
        condition(&status.conditions, "Ready"),
        ("True".into(), "AllReachable".into())
    );

    // DeploymentPlan: the web hosts, canary first, all stages through
    let dp = Api::<DeploymentPlan>::namespaced(client.clone(), &ns)
        .get("shop-v42")
        .await
        .expect("DeploymentPlan shop-v42");
    let status = dp.status.expect("plan status");
    let v = serde_json::to_value(&status).expect("status json");
    assert_eq!(v["phase"], "Succeeded", "{v}");
    assert_eq!(v["hosts"]["total"], 2, "{v}");
    assert_eq!(v["hosts"]["succeeded"], 2, "{v}");
    assert_eq!(v["hosts"]["failed"], 0, "{v}");
    assert_eq!(v["batch"]["total"], 2, "{v}");
    // ... and it is real: both web hosts serve release 42, db-1 still 41
    for (host, octet) in HOSTS {
        let body = http_get(&format!("http://{}.{octet}:8080/", demo.net()))
            .await
            .unwrap_or_else(|| panic!("{host}'s shop does not answer"));
        let release = if host.starts_with("web") { "42" } else { "41" };
        assert!(
            body.contains(&format!("release {release}")),
            "{host}: {body}"
        );
    }

    // HealthCheck: 3 hosts and 3 endpoints healthy
    let hc = Api::<HealthCheck>::namespaced(client.clone(), &ns)
        .get("shop-health")
        .await
        .expect("HealthCheck shop-health");
    let status = hc.status.expect("HealthCheck status");
    let summary = status.summary.expect("summary");
    assert_eq!(
        (summary.healthy, summary.unhealthy, summary.unknown),
        (6, 0, 0),
        "{:?}",
        status.results
    );
    assert_eq!(condition(&status.conditions, "Ready").0, "True");
    assert_eq!(
        condition(&status.conditions, "Degraded"),
        ("False".into(), "AllHealthy".into())
    );

    // SecurityPolicy: applied on all 3 hosts, and it filters for real: the shop is open to the
    // fleet's network, SSH between hosts is dropped, the operator (this machine) still gets in
    let sp = Api::<SecurityPolicy>::namespaced(client.clone(), &ns)
        .get("fleet-firewall")
        .await
        .expect("SecurityPolicy fleet-firewall");
    let status = sp.status.expect("policy status");
    let hosts = status.hosts.expect("host counts");
    assert_eq!((hosts.total, hosts.applied, hosts.failed), (3, 3, 0));
    assert_eq!(
        condition(&status.conditions, "Ready"),
        ("True".into(), "Applied".into())
    );
    assert!(status.ruleset_hash.is_some());
    let web1 = format!("{}.11", demo.net());
    assert!(
        connects_from(&demo.netns("db-1"), &web1, 8080),
        "shop from db-1"
    );
    assert!(
        !connects_from(&demo.netns("db-1"), &web1, 22),
        "SSH from db-1 to web-1 must be dropped"
    );

    // ClusterLogPipeline (the slot's own): the one agent runs the rendered config, and the
    // lines are in the store
    let clp_name = format!("shop-logs-{}", demo.slot);
    let lp = Api::<ClusterLogPipeline>::all(client.clone())
        .get(&clp_name)
        .await
        .expect("the slot's ClusterLogPipeline");
    let status = lp.status.expect("pipeline status");
    let nodes = status.nodes.expect("node counts");
    assert_eq!((nodes.desired, nodes.ready, nodes.updated), (1, 1, 1));
    assert_eq!(
        condition(&status.conditions, "Ready"),
        ("True".into(), "AllNodesShipping".into())
    );
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .get("outrider-agent")
        .await
        .expect("the agents' ConfigMap");
    assert_eq!(
        cm.metadata
            .annotations
            .unwrap_or_default()
            .get("outrider.dev/config-hash"),
        status.config_hash.as_ref()
    );
    let port = std::fs::read_to_string(demo.state().join("demo/store.port"))
        .expect("store.port")
        .trim()
        .to_string();
    let url = reqwest::Url::parse_with_params(
        &format!("http://127.0.0.1:{port}/select/logsql/query"),
        &[("query", "service:shop AND input:deploy AND release:42")],
    )
    .expect("query url");
    // the plan wrote them just before the demo settled: the agent finds a new file on its next
    // scan (every 2 s) and ships within a batch's maxWait
    eventually(
        Duration::from_secs(30),
        "a deploy line of each web host in the store",
        || async {
            let _ = http_get(&format!("http://127.0.0.1:{port}/internal/force_flush")).await;
            let rows = http_get(url.as_str()).await?;
            ["web-1", "web-2"]
                .iter()
                .all(|host| {
                    rows.lines()
                        .any(|r| r.contains(&format!("/{host}/deploy.log")))
                })
                .then_some(())
        },
    )
    .await;

    // down: nothing of the demo is left
    let pids = pids_in(demo.state());
    assert!(
        pids.len() >= 7,
        "pid files of the demo and its fleet: {pids:?}"
    );
    demo.down = true;
    let out = demo.run("down");
    assert!(
        out.status.success(),
        "e2e/demo.sh down failed:\n{}",
        stderr(&out)
    );
    let left: Vec<String> = crate::netns::netns_names()
        .into_iter()
        .filter(|n| n.starts_with(&format!("ordemo{}-", demo.slot)))
        .collect();
    assert!(left.is_empty(), "network namespaces left: {left:?}");
    let clp_left = Api::<ClusterLogPipeline>::all(client.clone())
        .get_opt(&clp_name)
        .await
        .expect("read ClusterLogPipelines");
    assert!(
        clp_left.is_none_or(|c| c.metadata.deletion_timestamp.is_some()),
        "the slot's ClusterLogPipeline is left"
    );
    assert!(!crate::netns::link_exists(&format!("ordemo{}", demo.slot)));
    for (host, _) in HOSTS {
        assert!(!crate::netns::link_exists(&format!(
            "od{}-{host}",
            demo.slot
        )));
    }
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.rsplit(") ").next().is_some_and(|r| r.starts_with('Z'))),
            "process {pid} of the demo still runs"
        );
    }
    assert!(!Path::new(&format!("/var/log/outrider-demo-{}", demo.slot)).exists());
    assert!(!demo.state().join("demo").exists() && !demo.state().join("fleet").exists());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    assert!(
        namespaces
            .get_opt(&ns)
            .await
            .expect("get namespace")
            .is_none(),
        "namespace {ns} still exists"
    );
}
