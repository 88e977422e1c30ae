//! Harness for the cluster tests: the real control plane from `e2e/cluster.sh`, kubectl
//! from `e2e/bin`, and controller processes started from the built binary.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The admin kubeconfig of the test cluster, bringing the cluster up on first use.
/// A missing tool fails the test with the command that provides it, never skips it.
pub fn kubeconfig() -> PathBuf {
    static UP: OnceLock<PathBuf> = OnceLock::new();
    UP.get_or_init(|| {
        let dir = std::env::var("OUTRIDER_CLUSTER_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| repo().join("e2e/.cluster"));
        let out = Command::new(repo().join("e2e/cluster.sh"))
            .arg("up")
            .env("OUTRIDER_CLUSTER_DIR", &dir)
            .output()
            .expect("running e2e/cluster.sh (is bash installed?)");
        assert!(
            out.status.success(),
            "e2e/cluster.sh up failed (build the tools with `make tools`):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let path = dir.join("kubeconfig");
        assert!(
            path.exists(),
            "cluster.sh up did not write {}",
            path.display()
        );
        // CRDs are installed once for all tests, from the checked-in crds/ (what users apply)
        let out = kubectl(
            &path,
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=e2e",
                "-f",
                "crds/",
            ],
        );
        assert!(
            out.status.success(),
            "installing crds/ failed: {}",
            stderr(&out)
        );
        let names: Vec<String> = outrider::api::crds()
            .iter()
            .map(|c| format!("crd/{}", c.metadata.name.as_deref().unwrap_or_default()))
            .collect();
        let out = Command::new(repo().join("e2e/cluster.sh"))
            .arg("wait-crds")
            .args(&names)
            .current_dir(repo())
            .output()
            .expect("running e2e/cluster.sh wait-crds");
        assert!(
            out.status.success(),
            "CRDs not established: {}",
            stderr(&out)
        );
        path
    })
    .clone()
}

pub async fn client() -> Client {
    let path = kubeconfig();
    let kc = Kubeconfig::read_from(&path).expect("reading the test kubeconfig");
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    Client::try_from(config).expect("kube client")
}

pub fn kubectl(kubeconfig: &Path, args: &[&str]) -> Output {
    Command::new(repo().join("e2e/bin/kubectl"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .current_dir(repo())
        .output()
        .expect("running e2e/bin/kubectl (run `make tools`)")
}

/// kubectl with a manifest on stdin.
pub fn kubectl_stdin(kubeconfig: &Path, args: &[&str], stdin: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(repo().join("e2e/bin/kubectl"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .current_dir(repo())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running e2e/bin/kubectl (run `make tools`)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("writing kubectl stdin");
    child.wait_with_output().expect("kubectl output")
}

/// `kubectl apply -f -` of `manifest`, failing the test with kubectl's message.
pub fn apply(kubeconfig: &Path, manifest: &str) {
    let out = kubectl_stdin(kubeconfig, &["apply", "-f", "-"], manifest);
    assert!(
        out.status.success(),
        "kubectl apply failed: {}\n{manifest}",
        stderr(&out)
    );
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh namespace per test, so tests run in parallel without seeing each other.
pub fn namespace(prefix: &str) -> String {
    let ns = format!("{prefix}-{}", std::process::id() % 100_000);
    let out = kubectl(&kubeconfig(), &["create", "namespace", &ns]);
    assert!(
        out.status.success() || stderr(&out).contains("AlreadyExists"),
        "create ns: {}",
        stderr(&out)
    );
    ns
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free loopback port")
}

/// A controller process started from the crate's binary; killed when dropped.
pub struct ControllerProcess {
    pub child: Child,
    pub metrics_port: u16,
    pub identity: String,
    pub log: PathBuf,
}

impl ControllerProcess {
    /// Starts `outrider controller` watching `namespace`, electing on `lease` in `namespace`.
    pub fn start(namespace: &str, lease: &str, identity: &str, extra: &[&str]) -> Self {
        Self::start_with(&kubeconfig(), namespace, namespace, lease, identity, extra)
    }

    /// Starts the controller with its own kubeconfig (e.g. a ServiceAccount's), watching
    /// `namespace` and electing on `lease` in `lease_namespace`.
    pub fn start_with(
        kubeconfig: &Path,
        namespace: &str,
        lease_namespace: &str,
        lease: &str,
        identity: &str,
        extra: &[&str],
    ) -> Self {
        let metrics_port = free_port();
        let log = repo().join(format!("target/e2e-logs/{namespace}-{identity}.log"));
        std::fs::create_dir_all(log.parent().expect("log dir")).expect("log dir");
        let file = std::fs::File::create(&log).expect("controller log file");
        let child = Command::new(env!("CARGO_BIN_EXE_outrider"))
            .args([
                "controller",
                "--watch-namespace",
                namespace,
                "--lease-name",
                lease,
                "--lease-namespace",
                lease_namespace,
            ])
            .args([
                "--identity",
                identity,
                "--metrics-addr",
                &format!("127.0.0.1:{metrics_port}"),
            ])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,outrider=debug")
            .stdout(Stdio::null())
            .stderr(file.try_clone().expect("log fd"))
            .spawn()
            .expect("starting the outrider binary");
        Self {
            child,
            metrics_port,
            identity: identity.to_string(),
            log,
        }
    }

    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.metrics_port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no chance to release the Lease.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a graceful exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "controller did not exit within 30s of SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn http_get(url: &str) -> Option<String> {
    let resp = reqwest::get(url).await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.text().await.ok()
}

/// One real sshd for all cluster tests (it answers on every 127.x address) and a user key
/// it accepts for root.
/// The user the suites log in as: unprivileged, with a shell that reads no rc files (root's
/// rc files here cost ~0.15 CPU-s per session and made tight timeouts flaky).
pub const TEST_USER: &str = "outrider-nosudo";

pub struct TestHosts {
    pub server: crate::sshd::Sshd,
    pub private_key: String,
    _keys: tempfile::TempDir,
}

pub fn hosts() -> &'static TestHosts {
    static HOSTS: OnceLock<TestHosts> = OnceLock::new();
    HOSTS.get_or_init(|| {
        let server = crate::sshd::Sshd::start();
        let keys = tempfile::tempdir().expect("tempdir");
        let (private_key, public_key) =
            crate::sshd::user_key(keys.path(), "ed25519", None, "openssh");
        server.authorize(TEST_USER, &public_key);
        TestHosts {
            server,
            private_key,
            _keys: keys,
        }
    })
}

/// Loopback address of test host `i`.
pub fn host_addr(i: usize) -> String {
    format!("127.0.10.{}", i + 1)
}

/// An Inventory manifest with `hosts` hosts on the test sshd, using Secret `secret`.
pub fn inventory_yaml(name: &str, namespace: &str, secret: &str, hosts: usize) -> String {
    let port = self::hosts().server.port;
    let mut y = format!(
        "apiVersion: outrider.dev/v1alpha1\nkind: Inventory\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  ssh:\n    user: {TEST_USER}\n    port: {port}\n    connectTimeout: 5s\n    secretRef: {{name: {secret}}}\n  probe: {{interval: 30s}}\n  hosts:\n"
    );
    for i in 0..hosts {
        y.push_str(&format!(
            "    - {{name: host-{i}, address: {}, labels: {{role: web}}}}\n",
            host_addr(i)
        ));
    }
    y
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

/// A Secret with the test user key and known_hosts pinning test hosts 0..32.
pub fn secret_yaml(name: &str, namespace: &str) -> String {
    let h = hosts();
    let addrs: Vec<String> = (0..32).map(host_addr).collect();
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {namespace}\ntype: Opaque\nstringData:\n  ssh-privatekey: |\n{}  known_hosts: |\n{}",
        indent(&h.private_key),
        indent(&h.server.known_hosts_for(&refs))
    )
}

/// helm from `e2e/bin` against the test cluster.
pub fn helm(args: &[&str]) -> Output {
    Command::new(repo().join("e2e/bin/helm"))
        .arg("--kubeconfig")
        .arg(kubeconfig())
        .args(args)
        .current_dir(repo())
        .output()
        .expect("running e2e/bin/helm (run `make tools`)")
}

/// A kubeconfig that authenticates as ServiceAccount `sa` in `namespace` (a bound token),
/// so a process runs with exactly the RBAC the chart grants.
pub fn service_account_kubeconfig(namespace: &str, sa: &str) -> PathBuf {
    let admin = kubeconfig();
    let out = kubectl(
        &admin,
        &["create", "token", sa, "-n", namespace, "--duration=1h"],
    );
    assert!(out.status.success(), "create token: {}", stderr(&out));
    let token = stdout(&out).trim().to_string();
    let text = std::fs::read_to_string(&admin).expect("admin kubeconfig");
    let mut config: serde_yaml::Value = serde_yaml::from_str(&text).expect("kubeconfig yaml");
    let users = config["users"].as_sequence_mut().expect("users");
    users.truncate(1);
    let mut user = serde_yaml::Mapping::new();
    user.insert("token".into(), token.into());
    users[0]["user"] = serde_yaml::Value::Mapping(user);
    let path = repo().join(format!("target/e2e-logs/{namespace}-{sa}.kubeconfig"));
    std::fs::create_dir_all(path.parent().expect("dir")).expect("dir");
    std::fs::write(&path, serde_yaml::to_string(&config).expect("yaml")).expect("write kubeconfig");
    path
}

/// The value of the first sample of `name` (name and labels, as printed) in a Prometheus
/// text body; 0 when absent.
pub fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// A stage (YAML list item) that appends `start <t>`, sleeps `secs`, then appends `end <t>`
/// to `<dir>/<host address>`: what [`assert_attempts_never_overlap`] reads.
pub fn timed_stage_yaml(dir: &Path, secs: u32) -> String {
    format!(
        "    - name: deploy\n      env: {{OUT: \"{out}\"}}\n      script: |\n        h=$(echo $SSH_CONNECTION | cut -d' ' -f3)\n        echo \"start $(date +%s.%N)\" >> \"$OUT/$h\"\n        sleep {secs}\n        echo \"end $(date +%s.%N)\" >> \"$OUT/$h\"\n      timeout: 120s\n",
        out = dir.display()
    )
}

/// The `start`/`end` lines one host recorded never show an attempt starting while another
/// ran (an attempt with no `end` ran on until the next one started, at least).
pub fn assert_attempts_never_overlap(host: &str, log: &[String]) {
    let mut spans: Vec<(f64, Option<f64>)> = Vec::new();
    for line in log {
        let (what, t) = line.split_once(' ').expect("start/end line");
        let t: f64 = t.parse().expect("time");
        if what == "start" {
            spans.push((t, None));
        } else if let Some(open) = spans.iter_mut().rev().find(|s| s.1.is_none()) {
            open.1 = Some(t);
        }
    }
    assert!(!spans.is_empty(), "{host} never ran the stage");
    for (a, b) in spans.iter().zip(spans.iter().skip(1)) {
        assert!(
            a.1.unwrap_or(f64::INFINITY) <= b.0,
            "{host}: an attempt started at {} while the one from {} ran (ended {:?}): {log:?}",
            b.0,
            a.0,
            a.1
        );
    }
}

/// A node agent's Pod (kwok runs it on `node`) that declares its metrics port `port`, the
/// port the controller scrapes for the configuration the agent runs.
pub fn agent_pod_yaml(name: &str, ns: &str, node: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app.kubernetes.io/name: outrider-agent}}}}\nspec:\n  nodeName: {node}\n  containers: [{{name: agent, image: example.com/outrider:test, ports: [{{name: metrics, containerPort: {port}}}]}}]\n"
    )
}

/// The IP kwok gave Pod `name` (on loopback: the test cluster's pod CIDR is 127.244.0.0/16).
pub async fn pod_ip(ns: &str, name: &str) -> String {
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(client().await, ns);
    eventually(
        Duration::from_secs(60),
        &format!("an IP for Pod {ns}/{name}"),
        || async {
            let ip = pods.get_opt(name).await.ok().flatten()?.status?.pod_ip?;
            assert!(ip.starts_with("127."), "pod IP {ip} is not on loopback");
            Some(ip)
        },
    )
    .await
}

/// `outrider agent --config FILE` standing in for the agent of a Pod: it serves `/metrics`
/// on the Pod's IP and metrics port, where the controller reads the configuration it runs.
pub struct AgentProcess(std::process::Child);

impl AgentProcess {
    pub fn start(config: &Path, dir: &Path, node: &str, metrics_addr: &str) -> Self {
        let log = std::fs::File::create(dir.join(format!("agent-{metrics_addr}.log")))
            .expect("agent log");
        let child = Command::new(env!("CARGO_BIN_EXE_outrider"))
            .arg("agent")
            .arg("--config")
            .arg(config)
            .arg("--state-dir")
            .arg(dir.join(format!("state-{metrics_addr}")))
            .args(["--node-name", node, "--metrics-addr", metrics_addr])
            .stdout(Stdio::null())
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
