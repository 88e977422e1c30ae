//! Which configuration each node agent runs, read from the agents themselves: every few
//! seconds (and when the agent Pods change) the controller GETs `/metrics` of each ready
//! agent Pod (its IP, the container port named `metrics`) and reads
//! `outrider_agent_config_info{hash="sha256:..."}`. So the agents need no Kubernetes token
//! at all: nothing they could be tricked into doing with one, and no `patch pods` right on
//! the operator's namespace. What an agent answers is untrusted: the body is read up to a
//! cap, only a well-formed hash counts, and nothing is followed (no redirects, no proxy).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::agent::report::CONFIG_INFO_METRIC;

/// How often every agent is asked.
const SCRAPE_INTERVAL: Duration = Duration::from_secs(5);
/// One agent's answer may take this long.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// The most of an answer read: an agent's `/metrics` is tens of KiB.
const MAX_BODY: usize = 1 << 20;
/// Agents asked at once.
const CONCURRENCY: usize = 16;
/// The agents' metrics port when their Pod names none `metrics`.
const DEFAULT_PORT: u16 = 8080;

/// The hash each agent Pod (by uid) last reported.
#[derive(Default)]
pub struct AgentHashes(Mutex<HashMap<String, String>>);

impl AgentHashes {
    /// The hash the agent Pod `uid` runs, if it answered with one.
    pub fn get(&self, uid: &str) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(uid)
            .cloned()
    }

    /// Replaces every hash; whether anything changed.
    fn replace(&self, new: HashMap<String, String>) -> bool {
        let mut cur = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let changed = *cur != new;
        *cur = new;
        changed
    }
}

/// Whether an agent Pod's `Ready` condition is true.
pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Scrapes the agents until `stop` fires: on every change bumps `changed`.
pub async fn scrape_loop(
    agents: Store<Pod>,
    hashes: Arc<AgentHashes>,
    pods_changed: Arc<Notify>,
    changed: watch::Sender<u64>,
    stop: CancellationToken,
) {
    let client = match reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(SCRAPE_TIMEOUT)
        .connect_timeout(SCRAPE_TIMEOUT)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the HTTP client that reads the agents' configuration; rollout stays unknown");
            return;
        }
    };
    loop {
        let targets: Vec<(String, SocketAddr)> = agents
            .state()
            .iter()
            .filter(|p| is_ready(p))
            .filter_map(|p| Some((p.uid()?, metrics_addr(p)?)))
            .collect();
        let found: HashMap<String, String> = futures::stream::iter(targets)
            .map(|(uid, addr)| {
                let client = client.clone();
                async move { scrape(&client, addr).await.map(|h| (uid, h)) }
            })
            .buffer_unordered(CONCURRENCY)
            .filter_map(futures::future::ready)
            .collect()
            .await;
        if hashes.replace(found) {
            changed.send_modify(|n| *n = n.wrapping_add(1));
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(SCRAPE_INTERVAL) => {}
            () = pods_changed.notified() => {}
        }
    }
}

/// The Pod's IP and its container port named `metrics`.
fn metrics_addr(pod: &Pod) -> Option<SocketAddr> {
    let ip: IpAddr = pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok()?;
    let port = pod
        .spec
        .as_ref()
        .into_iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("metrics"))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .unwrap_or(DEFAULT_PORT);
    Some(SocketAddr::new(ip, port))
}

/// One agent's running hash; `None` when it does not answer, or not with one.
async fn scrape(client: &reqwest::Client, addr: SocketAddr) -> Option<String> {
    let mut resp = client
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.ok()? {
        let room = MAX_BODY.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_BODY {
            break;
        }
    }
    config_hash_in(&String::from_utf8_lossy(&body))
}

/// The hash in `outrider_agent_config_info{hash="sha256:<64 hex>"} 1`, if well formed.
pub fn config_hash_in(metrics: &str) -> Option<String> {
    metrics.lines().find_map(|line| {
        let rest = line
            .strip_prefix(CONFIG_INFO_METRIC)?
            .strip_prefix("{hash=\"")?;
        let (hash, value) = rest.split_once("\"}")?;
        let hex = hash.strip_prefix("sha256:")?;
        let well_formed = hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit());
        (well_formed && value.trim() == "1").then(|| hash.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_well_formed_hash_of_value_one_counts() {
        let h = format!("sha256:{}", "ab".repeat(32));
        let text = format!(
            "# HELP x\noutrider_agent_lines_read_total{{pipeline=\"a\"}} 3\n{CONFIG_INFO_METRIC}{{hash=\"{h}\"}} 1\n"
        );
        assert_eq!(config_hash_in(&text), Some(h.clone()));
        for bad in [
            format!("{CONFIG_INFO_METRIC}{{hash=\"{h}\"}} 0"),
            format!("{CONFIG_INFO_METRIC}{{hash=\"sha256:zz\"}} 1"),
            format!("{CONFIG_INFO_METRIC}{{hash=\"{h}x\"}} 1"),
            format!("{CONFIG_INFO_METRIC}_other{{hash=\"{h}\"}} 1"),
            "garbage".to_string(),
        ] {
            assert_eq!(config_hash_in(&bad), None, "{bad}");
        }
    }

    #[test]
    fn the_metrics_port_is_the_one_named_metrics() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a", "uid": "u"},
            "spec": {"containers": [{"name": "agent", "ports": [
                {"name": "other", "containerPort": 9},
                {"name": "metrics", "containerPort": 9100}]}]},
            "status": {"podIP": "127.244.0.7"}
        }))
        .unwrap();
        assert_eq!(
            metrics_addr(&pod),
            Some("127.244.0.7:9100".parse().unwrap())
        );
    }
}
