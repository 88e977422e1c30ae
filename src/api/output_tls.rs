//! TLS settings of the HTTP-based LogPipeline outputs (Loki, Elasticsearch, HTTP), beside the
//! Secret's TLS material (`ca.crt`, `tls.crt` + `tls.key`) that `secretRef` names.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How the output's server certificate is verified.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSettings {
    /// Trust only the CAs in the Secret's `ca.crt`, not the built-in public roots as well:
    /// a private log store then cannot be impersonated with any publicly issued
    /// certificate. Needs `secretRef` naming a Secret with `ca.crt`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replace_roots: bool,
}

/// The CEL rule each output puts on itself: `tls.replaceRoots` needs a `secretRef` (whose
/// `ca.crt` the agent checks, as the API server cannot read the Secret).
pub fn replace_roots_needs_secret() -> kube::core::Rule {
    kube::core::Rule::new(
        "!has(self.tls) || !has(self.tls.replaceRoots) || !self.tls.replaceRoots || has(self.secretRef)",
    )
    .message("tls.replaceRoots needs secretRef: a Secret whose ca.crt holds the only CAs trusted")
    .field_path(".tls.replaceRoots")
}
