//! Which configuration an agent runs: the sha256 of the `agent.yaml` it loaded, exported as
//! `outrider_agent_config_info{hash="sha256:..."} 1` on its `/metrics`. The LogPipeline
//! controller scrapes its agents' Pods for it and compares it with the hash of what it
//! rendered to count updated nodes, so the agent holds no Kubernetes token.

use sha2::{Digest, Sha256};

/// On the agent ConfigMap: the hash of `agent.yaml`.
pub const CONFIG_HASH_ANNOTATION: &str = "outrider.dev/config-hash";

/// The metric line an agent exports and the controller reads.
pub const CONFIG_INFO_METRIC: &str = "outrider_agent_config_info";

/// `sha256:<hex>` of a rendered configuration, the same on both sides.
pub fn config_hash(text: &[u8]) -> String {
    let digest = Sha256::digest(text);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
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
