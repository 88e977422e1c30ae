//! Fencing: a leader cut off from the API server (a loopback proxy in front of the API server
//! that the test blackholes) stops by itself before the standby may take the Lease, so two
//! replicas never lead at once, and a stage the old leader started is never run beside it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use outrider::api::deployment_plan::{DeploymentPlan, PlanPhase};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// A TCP proxy to the API server. `cut` turns it into a black hole: nothing more is
/// forwarded either way and new connections hang, as in a network partition (no reset).
struct Partition {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Partition {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let cut = Arc::new(AtomicBool::new(false));
        let flag = cut.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((client, _)) = listener.accept().await {
                if flag.load(Ordering::SeqCst) {
                    held.push(client); // open, never answered
                    continue;
                }
                tokio::spawn(forward(client, upstream, flag.clone()));
            }
        });
        Self { addr, cut, task }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(client: TcpStream, upstream: SocketAddr, cut: Arc<AtomicBool>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::join!(pipe(cr, sw, cut.clone()), pipe(sr, cw, cut));
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    cut: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if cut.load(Ordering::SeqCst) {
            // the partition: keep both sockets open, forward nothing, ever
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The test kubeconfig with its API server address replaced by `proxy`.
fn kubeconfig_via(proxy: SocketAddr, dir: &std::path::Path) -> (std::path::PathBuf, SocketAddr) {
    let text = std::fs::read_to_string(kubeconfig()).expect("kubeconfig");
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("server: https://"))
        .expect("server line");
    let upstream: SocketAddr = line
        .trim_start()
        .trim_start_matches("server: https://")
        .trim()
        .parse()
        .expect("server address ip:port");
    let path = dir.join("kubeconfig-via-proxy");
    std::fs::write(
        &path,
        text.replace(line, &format!("    server: https://{proxy}")),
    )
    .expect("write kubeconfig");
    (path, upstream)
}

async fn lease(api: &Api<Lease>, name: &str) -> Option<(String, Option<Timestamp>)> {
    let spec = api.get_opt(name).await.ok().flatten()?.spec?;
    let holder = spec.holder_identity.filter(|h| !h.is_empty())?;
    Some((holder, spec.acquire_time.map(|t| t.0)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_api_server_exits_before_the_standby_takes_the_lease() {
    const LEASE_SECS: u64 = 9;
    const NAME: &str = "outrider-fence";
    let ns = namespace("fence");
    let leases: Api<Lease> = Api::namespaced(client().await, &ns);
    let dir = tempfile::tempdir().expect("tempdir");
    // the port is needed before the proxy exists: read it once, then write the real file
    let (_, upstream) = kubeconfig_via("127.0.0.1:1".parse().expect("addr"), dir.path());
    let partition = Partition::start(upstream).await;
    let (via_proxy, _) = kubeconfig_via(partition.addr, dir.path());
    let extra = ["--lease-duration", "9"];

    let mut leader = ControllerProcess::start_with(&via_proxy, &ns, &ns, NAME, "replica-a", &extra);
    eventually(
        Duration::from_secs(60),
        "replica-a holds the Lease",
        || async {
            lease(&leases, NAME)
                .await
                .filter(|(h, _)| h == "replica-a")
                .map(|_| ())
        },
    )
    .await;
    let standby = ControllerProcess::start(&ns, NAME, "replica-b", &extra);
    let standby_url = standby.metrics_url();
    eventually(Duration::from_secs(30), "the standby runs", || async {
        http_get(&standby_url)
            .await
            .filter(|m| m.contains("outrider_leader 0"))
    })
    .await;
    // a few renewals through the proxy first
    tokio::time::sleep(Duration::from_secs(3)).await;

    partition.cut();
    let cut_at = Instant::now();
    let (status, exited_at) = loop {
        if let Some(status) = leader.child.try_wait().expect("try_wait") {
            break (status, SystemTime::now());
        }
        assert!(
            cut_at.elapsed() < Duration::from_secs(LEASE_SECS + 30),
            "the partitioned leader is still running {:?} after the cut:\n{}",
            cut_at.elapsed(),
            leader.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stopped_after = cut_at.elapsed();
    assert!(!status.success(), "exit status {status:?}");
    let log = leader.log_text();
    assert!(
        log.contains("no renewal of the Lease"),
        "the leader says why it stopped:\n{log}"
    );
    assert!(
        stopped_after < Duration::from_secs(LEASE_SECS),
        "stopped {stopped_after:?} after the cut, not within the {LEASE_SECS}s Lease"
    );

    let (_, acquired) = eventually(
        Duration::from_secs(LEASE_SECS + 30),
        "the standby takes the Lease",
        || async { lease(&leases, NAME).await.filter(|(h, _)| h == "replica-b") },
    )
    .await;
    let acquired = acquired.expect("acquireTime on the taken Lease");
    let exited = Timestamp::try_from(exited_at).expect("timestamp");
    assert!(
        exited < acquired,
        "the old leader was seen running until {exited}, the standby acquired the Lease at {acquired}"
    );
    drop(partition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_partitioned_mid_stage_hands_over_without_two_attempts_on_a_host() {
    const NAME: &str = "outrider-fence-plan";
    let kc = kubeconfig();
    let ns = namespace("fence-plan");
    let leases: Api<Lease> = Api::namespaced(client().await, &ns);
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, upstream) = kubeconfig_via("127.0.0.1:1".parse().expect("addr"), dir.path());
    let partition = Partition::start(upstream).await;
    let (via_proxy, _) = kubeconfig_via(partition.addr, dir.path());
    let extra = ["--lease-duration", "6"];
    let mut leader = ControllerProcess::start_with(&via_proxy, &ns, &ns, NAME, "replica-a", &extra);
    eventually(
        Duration::from_secs(60),
        "replica-a holds the Lease",
        || async {
            lease(&leases, NAME)
                .await
                .filter(|(h, _)| h == "replica-a")
                .map(|_| ())
        },
    )
    .await;
    let _standby = ControllerProcess::start(&ns, NAME, "replica-b", &extra);

    let out = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        out.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    // the stage outlives the takeover (fence < 6 s, Lease 6 s): the standby's attempt
    // would start beside it if nothing on the host stopped it
    let plan = format!(
        "apiVersion: outrider.dev/v1alpha1\nkind: DeploymentPlan\nmetadata: {{name: rollout, namespace: {ns}}}\nspec:\n  targets: {{inventoryRef: {{name: fleet}}}}\n  strategy: {{batchSize: 100%, maxParallel: 2}}\n  stages:\n{}",
        timed_stage_yaml(out.path(), 15)
    );
    let manifest = format!(
        "{}---\n{}---\n{plan}",
        secret_yaml("fleet-ssh", &ns),
        inventory_yaml("fleet", &ns, "fleet-ssh", 2),
    );
    apply(&kc, &manifest);
    let first_host = out.path().join(host_addr(0));
    eventually(Duration::from_secs(60), "the stage to start", || async {
        first_host.exists().then_some(())
    })
    .await;
    partition.cut();
    let cut_at = Instant::now();
    while leader.child.try_wait().expect("try_wait").is_none() {
        assert!(
            cut_at.elapsed() < Duration::from_secs(30),
            "the partitioned leader still runs:\n{}",
            leader.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let plans: Api<DeploymentPlan> = Api::namespaced(client().await, &ns);
    eventually(
        Duration::from_secs(120),
        "the standby finishes the run",
        || async {
            let dp = plans.get_opt("rollout").await.ok().flatten()?;
            (dp.status?.phase == Some(PlanPhase::Succeeded)).then_some(())
        },
    )
    .await;
    for i in 0..2 {
        let log: Vec<String> = std::fs::read_to_string(out.path().join(host_addr(i)))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        assert_attempts_never_overlap(&host_addr(i), &log);
    }
    drop(partition);
}
