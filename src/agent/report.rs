//! The agent tells the controller which configuration it runs: the sha256 of the `agent.yaml`
//! it loaded, as the annotation `outrider.dev/config-hash` on its own Pod (named by the
//! downward API: `POD_NAME`, `POD_NAMESPACE`). The LogPipeline controller compares it with the
//! hash of what it rendered to count updated nodes. Outside a cluster nothing is reported.

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{Patch, PatchParams};
use sha2::{Digest, Sha256};

/// On the agent ConfigMap: the hash of `agent.yaml`. On an agent's Pod: the hash it runs.
pub const CONFIG_HASH_ANNOTATION: &str = "outrider.dev/config-hash";

/// `sha256:<hex>` of a rendered configuration, the same on both sides.
pub fn config_hash(text: &[u8]) -> String {
    let digest = Sha256::digest(text);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The agent's own Pod, when it runs in one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl PodRef {
    /// From `POD_NAMESPACE` and `POD_NAME`; `None` unless both are set.
    pub fn from_env() -> Option<Self> {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Some(Self {
            namespace: get("POD_NAMESPACE")?,
            name: get("POD_NAME")?,
        })
    }

    /// Annotates the Pod with `hash`. Best effort: a failure is logged, shipping goes on.
    pub async fn report(&self, hash: &str) {
        let result = async {
            let client = kube::Client::try_default().await?;
            let pods: Api<Pod> = Api::namespaced(client, &self.namespace);
            let patch = serde_json::json!({
                "metadata": {"annotations": {CONFIG_HASH_ANNOTATION: hash}}
            });
            pods.patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            Ok::<_, kube::Error>(())
        }
        .await;
        match result {
            Ok(()) => tracing::info!(pod = %self.name, %hash, "reported the running configuration"),
            Err(e) => {
                tracing::warn!(pod = %self.name, error = %e, "could not report the running configuration on the Pod")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_hash_is_sha256_of_the_bytes() {
        assert_eq!(
            config_hash(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
