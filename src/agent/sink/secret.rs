//! An output's Secret, read from its mounted files: credentials for the request and TLS
//! material (extra CAs, a client certificate) for a client of the output's own. Errors name
//! the Secret and the key, never a value.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::transport::{client_builder, error_chain};

/// Credentials for an HTTP sink, read from the referenced Secret's mounted files.
#[derive(Clone)]
pub enum Auth {
    Basic { username: String, password: String },
    Bearer(String),
    ApiKey(String),
}

impl std::fmt::Debug for Auth {
    // Never print secret values.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Basic { username, .. } => write!(f, "Basic({username}, ***)"),
            Auth::Bearer(_) => f.write_str("Bearer(***)"),
            Auth::ApiKey(_) => f.write_str("ApiKey(***)"),
        }
    }
}

impl Auth {
    pub(super) fn apply(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            Auth::Basic { username, password } => req.basic_auth(username, Some(password)),
            Auth::Bearer(t) => req.bearer_auth(t),
            Auth::ApiKey(k) => req.header("Authorization", format!("ApiKey {k}")),
        }
    }
}

/// What an output's Secret provides, read from its mounted files
/// (`<secret-dir>/<namespace>/<name>/<key>`, the layout of Secrets mounted per namespace):
/// credentials, TLS material, or both. Every key is optional; at least one must be there.
#[derive(Clone, Debug, Default)]
pub struct SecretMaterial {
    /// `username` + `password` (basic), else `token` (bearer), else `apiKey`.
    pub auth: Option<Auth>,
    /// `ca.crt` and/or `tls.crt` + `tls.key` (the `kubernetes.io/tls` key names).
    pub tls: Option<TlsMaterial>,
}

/// PEM files for an output's TLS connections.
#[derive(Clone, Default)]
pub struct TlsMaterial {
    /// `ca.crt`: CA certificates trusted in addition to the built-in public roots.
    pub ca: Option<Vec<u8>>,
    /// `tls.crt` + `tls.key`: the client certificate (chain) and its private key (mTLS).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for TlsMaterial {
    // Never print the private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca", &self.ca.as_ref().map(|c| c.len()))
            .field("identity", &self.identity.as_ref().map(|_| "***"))
            .finish()
    }
}

/// Why an output's Secret cannot be used. Messages name keys, never values.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "Secret {secret} has none of username+password, token, apiKey, ca.crt or tls.crt+tls.key under {dir}"
    )]
    Empty { secret: String, dir: PathBuf },
    #[error("Secret {secret}: {present} is set without {missing}")]
    Incomplete {
        secret: String,
        present: &'static str,
        missing: &'static str,
    },
    #[error("Secret name {name:?} is not a DNS-1123 subdomain: not read")]
    BadName { name: String },
    #[error("Secret {secret}: cannot read {key}: {source}")]
    Read {
        secret: String,
        key: &'static str,
        source: std::io::Error,
    },
    #[error("Secret {secret}: {key}: {message}")]
    Tls {
        secret: String,
        key: &'static str,
        message: String,
    },
}

impl SecretMaterial {
    /// Reads the Secret `namespace/name` under `dir`. A missing key is absent; a key that
    /// exists but cannot be read is an error, as is a Secret with no usable key at all.
    pub fn read(dir: &Path, namespace: &str, name: &str) -> Result<Self, SecretError> {
        // checked before any path is joined: `..` or `a/b` would read another tenant's keys
        for n in [namespace, name] {
            if !crate::api::common::is_dns1123_subdomain(n) {
                return Err(SecretError::BadName { name: n.to_owned() });
            }
        }
        let secret = format!("{namespace}/{name}");
        let base = dir.join(namespace).join(name);
        let bytes = |key: &'static str| match std::fs::read(base.join(key)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SecretError::Read {
                secret: secret.clone(),
                key,
                source,
            }),
        };
        let text = |key: &'static str| {
            bytes(key).map(|b| {
                b.map(|b| {
                    String::from_utf8_lossy(&b)
                        .trim_end_matches(['\n', '\r'])
                        .to_string()
                })
            })
        };
        let auth = match (text("username")?, text("password")?) {
            (Some(username), Some(password)) => Some(Auth::Basic { username, password }),
            _ => match text("token")? {
                Some(t) => Some(Auth::Bearer(t)),
                None => text("apiKey")?.map(Auth::ApiKey),
            },
        };
        let identity = match (bytes("tls.crt")?, bytes("tls.key")?) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(SecretError::Incomplete {
                    secret,
                    present: "tls.crt",
                    missing: "tls.key",
                });
            }
            (None, Some(_)) => {
                return Err(SecretError::Incomplete {
                    secret,
                    present: "tls.key",
                    missing: "tls.crt",
                });
            }
        };
        let ca = bytes("ca.crt")?;
        let tls = (ca.is_some() || identity.is_some()).then_some(TlsMaterial { ca, identity });
        if auth.is_none() && tls.is_none() {
            return Err(SecretError::Empty {
                secret,
                dir: dir.to_path_buf(),
            });
        }
        Ok(Self { auth, tls })
    }

    /// The client for an output with this Secret: `default` unless the Secret carries TLS
    /// material, which needs a client of its own. Bad PEM is an error naming the key.
    pub fn client(
        &self,
        secret: &str,
        default: &reqwest::Client,
        timeout: Duration,
    ) -> Result<reqwest::Client, SecretError> {
        match &self.tls {
            None => Ok(default.clone()),
            Some(tls) => tls
                .client(timeout)
                .map_err(|(key, message)| SecretError::Tls {
                    secret: secret.to_string(),
                    key,
                    message,
                }),
        }
    }
}

impl TlsMaterial {
    /// A client like [`http_client`] that also trusts `ca.crt` and presents `tls.crt`.
    /// Errors are `(key, message)`.
    fn client(&self, timeout: Duration) -> Result<reqwest::Client, (&'static str, String)> {
        let mut builder = client_builder(timeout);
        if let Some(pem) = &self.ca {
            for cert in ca_certificates(pem).map_err(|m| ("ca.crt", m))? {
                builder = builder.add_root_certificate(cert);
            }
        }
        if let Some((cert, key)) = &self.identity {
            let mut pem = cert.clone();
            pem.push(b'\n');
            pem.extend_from_slice(key);
            let id = reqwest::Identity::from_pem(&pem)
                .map_err(|e| ("tls.crt/tls.key", error_chain(&e)))?;
            builder = builder.identity(id);
        }
        // The CAs were checked above: what fails now is the client certificate or its key.
        builder
            .build()
            .map_err(|e| ("tls.crt/tls.key", error_chain(&e)))
    }
}

/// Parses a PEM bundle into certificates, each checked to be a usable trust anchor.
fn ca_certificates(pem: &[u8]) -> Result<Vec<reqwest::Certificate>, String> {
    let (ders, _) = trust_anchors(pem)?;
    ders.iter()
        .enumerate()
        .map(|(n, der)| {
            reqwest::Certificate::from_der(der)
                .map_err(|e| format!("certificate {}: {}", n + 1, error_chain(&e)))
        })
        .collect()
}

/// The certificates of a PEM bundle and a root store holding exactly them; an error names
/// the first one that is not a usable trust anchor, or says the bundle holds none.
pub(crate) fn trust_anchors(
    pem: &[u8],
) -> Result<
    (
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::RootCertStore,
    ),
    String,
> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let ders = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate bundle: {e}"))?;
    if ders.is_empty() {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into());
    }
    let mut store = rustls::RootCertStore::empty();
    for (n, der) in ders.iter().enumerate() {
        store
            .add(der.clone())
            .map_err(|e| format!("certificate {}: {e}", n + 1))?;
    }
    Ok((ders, store))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::sink::http_client;

    /// `<dir>/prod/<name>/` with the given files.
    fn secret(dir: &Path, name: &str, files: &[(&str, &[u8])]) {
        let s = dir.join("prod").join(name);
        std::fs::create_dir_all(&s).unwrap();
        for (k, v) in files {
            std::fs::write(s.join(k), v).unwrap();
        }
    }

    /// A self-signed CA and a client certificate it signed, as PEM.
    fn ca_and_client() -> (String, String, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(params, ca_key);
        let client_key = rcgen::KeyPair::generate().unwrap();
        let client = rcgen::CertificateParams::new(vec!["shipper".to_string()])
            .unwrap()
            .signed_by(&client_key, &issuer)
            .unwrap();
        (ca.pem(), client.pem(), client_key.serialize_pem())
    }

    #[test]
    fn secret_dir_yields_basic_then_bearer_then_api_key() {
        let dir = tempfile::tempdir().unwrap();
        secret(dir.path(), "es-creds", &[("token", b"t0k\n")]);
        let m = SecretMaterial::read(dir.path(), "prod", "es-creds").unwrap();
        assert!(matches!(m.auth, Some(Auth::Bearer(t)) if t == "t0k"));
        assert!(m.tls.is_none());
        secret(
            dir.path(),
            "es-creds",
            &[("username", b"u"), ("password", b"p")],
        );
        let m = SecretMaterial::read(dir.path(), "prod", "es-creds").unwrap();
        assert_eq!(format!("{:?}", m.auth.unwrap()), "Basic(u, ***)");
        secret(dir.path(), "keyed", &[("apiKey", b"k")]);
        let m = SecretMaterial::read(dir.path(), "prod", "keyed").unwrap();
        assert!(matches!(m.auth, Some(Auth::ApiKey(k)) if k == "k"));
    }

    #[test]
    fn secret_with_only_a_ca_is_tls_material_without_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _, _) = ca_and_client();
        secret(dir.path(), "ca-only", &[("ca.crt", ca.as_bytes())]);
        let m = SecretMaterial::read(dir.path(), "prod", "ca-only").unwrap();
        assert!(m.auth.is_none());
        let tls = m.tls.as_ref().unwrap();
        assert_eq!(tls.ca.as_deref(), Some(ca.as_bytes()));
        assert!(tls.identity.is_none());
        let default = http_client(Duration::from_secs(1)).unwrap();
        m.client("prod/ca-only", &default, Duration::from_secs(1))
            .unwrap();
    }

    #[test]
    fn secret_with_no_usable_key_or_half_a_key_pair_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = SecretMaterial::read(dir.path(), "prod", "missing")
            .unwrap_err()
            .to_string();
        assert!(err.contains("prod/missing has none of"), "{err}");
        assert!(err.contains("ca.crt"), "{err}");
        secret(dir.path(), "other", &[("unrelated", b"x")]);
        let err = SecretMaterial::read(dir.path(), "prod", "other").unwrap_err();
        assert!(matches!(err, SecretError::Empty { .. }), "{err}");
        let (_, cert, _) = ca_and_client();
        secret(dir.path(), "half", &[("tls.crt", cert.as_bytes())]);
        let err = SecretMaterial::read(dir.path(), "prod", "half")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "Secret prod/half: tls.crt is set without tls.key");
    }

    #[test]
    fn client_certificate_and_ca_build_a_client_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = ca_and_client();
        secret(
            dir.path(),
            "mtls",
            &[
                ("ca.crt", ca.as_bytes()),
                ("tls.crt", cert.as_bytes()),
                ("tls.key", key.as_bytes()),
                ("token", b"t"),
            ],
        );
        let m = SecretMaterial::read(dir.path(), "prod", "mtls").unwrap();
        assert!(matches!(m.auth, Some(Auth::Bearer(_))));
        let tls = m.tls.as_ref().unwrap();
        assert!(tls.identity.is_some());
        assert!(!format!("{tls:?}").contains("PRIVATE KEY"));
        let default = http_client(Duration::from_secs(1)).unwrap();
        m.client("prod/mtls", &default, Duration::from_secs(1))
            .unwrap();
    }

    #[test]
    fn bad_pem_is_an_error_naming_the_secret_key() {
        let default = http_client(Duration::from_secs(1)).unwrap();
        let (ca, cert, key) = ca_and_client();
        let client_err = |files: &[(&str, &[u8])]| {
            let dir = tempfile::tempdir().unwrap();
            secret(dir.path(), "bad", files);
            SecretMaterial::read(dir.path(), "prod", "bad")
                .unwrap()
                .client("prod/bad", &default, Duration::from_secs(1))
                .unwrap_err()
                .to_string()
        };
        let err = client_err(&[("ca.crt", b"not a certificate")]);
        assert!(
            err.starts_with("Secret prod/bad: ca.crt: holds no PEM"),
            "{err}"
        );
        let broken = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let err = client_err(&[("ca.crt", broken.as_bytes())]);
        assert!(
            err.starts_with("Secret prod/bad: ca.crt: certificate 1"),
            "{err}"
        );
        let err = client_err(&[
            ("ca.crt", ca.as_bytes()),
            ("tls.crt", cert.as_bytes()),
            ("tls.key", b"garbage"),
        ]);
        assert!(
            err.starts_with("Secret prod/bad: tls.crt/tls.key: "),
            "{err}"
        );
        let err = client_err(&[("tls.crt", key.as_bytes()), ("tls.key", key.as_bytes())]);
        assert!(
            err.starts_with("Secret prod/bad: tls.crt/tls.key: "),
            "{err}"
        );
    }
}
