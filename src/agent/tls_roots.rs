//! `tls.replaceRoots` on the Loki, Elasticsearch and HTTP outputs: the output's client trusts
//! only the CAs of its Secret's `ca.crt`, not the built-in public (webpki) roots as well. A
//! private log store is then not impersonated by anyone holding a publicly issued
//! certificate for its name.
//!
//! The client gets a rustls configuration built here from a root store holding exactly the
//! `ca.crt` certificates ([`only_these_roots`]), handed to reqwest with
//! `use_preconfigured_tls`, which uses it as given (no roots added). Building the store here
//! rather than asking reqwest to leave its roots out (`tls_built_in_root_certs(false)`) is
//! what lets a test count the trusted roots: reqwest does not expose its store.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::sink::{SecretError, SecretMaterial, TlsMaterial, client_builder, error_chain};
use crate::api::cluster_log_pipeline::Output;

/// Why a Secret without `ca.crt` cannot serve an output with `replaceRoots`.
const MISSING_CA: &str = "missing, and tls.replaceRoots trusts only the CAs in it";

/// The output's `tls.replaceRoots`, refused without a `secretRef` (there would be no CA to
/// trust at all): `Err((field below the output, why))`.
pub fn replace_roots(o: &Output) -> Result<bool, (String, String)> {
    let (kind, tls, has_secret) = if let Some(s) = &o.loki {
        ("loki", &s.tls, s.secret_ref.is_some())
    } else if let Some(s) = &o.elasticsearch {
        ("elasticsearch", &s.tls, s.secret_ref.is_some())
    } else if let Some(s) = &o.http {
        ("http", &s.tls, s.secret_ref.is_some())
    } else {
        return Ok(false);
    };
    let on = tls.as_ref().is_some_and(|t| t.replace_roots);
    if on && !has_secret {
        return Err((
            format!(".{kind}.tls.replaceRoots"),
            "needs secretRef: a Secret whose ca.crt holds the only CAs trusted".into(),
        ));
    }
    Ok(on)
}

/// The client of an output with this Secret: [`SecretMaterial::client`] unless
/// `replace_roots`, then one trusting only the Secret's `ca.crt` (an error naming `ca.crt`
/// when the Secret has none).
pub fn output_client(
    m: &SecretMaterial,
    replace_roots: bool,
    secret: &str,
    default: &reqwest::Client,
    timeout: Duration,
) -> Result<reqwest::Client, SecretError> {
    if !replace_roots {
        return m.client(secret, default, timeout);
    }
    let bad = |(key, message): (&'static str, String)| SecretError::Tls {
        secret: secret.to_string(),
        key,
        message,
    };
    let tls = m
        .tls
        .as_ref()
        .ok_or_else(|| bad(("ca.crt", MISSING_CA.into())))?;
    let config = replaced_roots_config(tls).map_err(bad)?;
    client_builder(timeout)
        .use_preconfigured_tls(config)
        .build()
        .map_err(|e| bad(("ca.crt", error_chain(&e))))
}

/// A root store holding exactly the certificates of the PEM bundle; an error names the
/// first one that is not a usable trust anchor.
pub fn only_these_roots(pem: &[u8]) -> Result<rustls::RootCertStore, String> {
    super::sink::secret::trust_anchors(pem).map(|(_, store)| store)
}

/// The rustls configuration of a `replaceRoots` output: roots from `ca.crt` only, the client
/// certificate from `tls.crt` + `tls.key` when present, HTTP/1.1 (as reqwest's own
/// configuration offers without its `http2` feature). Errors are `(key, message)`.
pub fn replaced_roots_config(
    tls: &TlsMaterial,
) -> Result<rustls::ClientConfig, (&'static str, String)> {
    let ca = tls
        .ca
        .as_deref()
        .ok_or(("ca.crt", MISSING_CA.to_string()))?;
    let roots = only_these_roots(ca).map_err(|m| ("ca.crt", m))?;
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ("ca.crt", e.to_string()))?
    .with_root_certificates(roots);
    let mut config = match &tls.identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ("tls.crt", format!("not a PEM certificate chain: {e}")))?;
            if chain.is_empty() {
                return Err(("tls.crt", "holds no PEM certificate".into()));
            }
            let key = PrivateKeyDer::from_pem_slice(key)
                .map_err(|e| ("tls.key", format!("not a PEM private key: {e}")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ("tls.crt/tls.key", e.to_string()))?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A CA (certificate PEM) and what signs with it.
    fn ca(name: &str) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), rcgen::Issuer::new(params, key))
    }

    /// An HTTPS server on 127.0.0.1 whose certificate `issuer` signed, answering 204.
    async fn server(issuer: &rcgen::Issuer<'static, rcgen::KeyPair>) -> SocketAddr {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, issuer)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = tls
                        .write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
                        .await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        addr
    }

    fn material(ca: Option<&str>) -> SecretMaterial {
        SecretMaterial {
            auth: None,
            tls: ca.map(|c| TlsMaterial {
                ca: Some(c.as_bytes().to_vec()),
                identity: None,
            }),
        }
    }

    async fn get(m: &SecretMaterial, replace: bool, addr: SocketAddr) -> Result<u16, String> {
        let default = crate::agent::sink::http_client(Duration::from_secs(5)).unwrap();
        let client = output_client(m, replace, "prod/ca", &default, Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        client
            .get(format!("https://{addr}/"))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .map_err(|e| error_chain(&e))
    }

    #[test]
    fn the_root_store_holds_exactly_the_certificates_of_ca_crt() {
        let (one, _) = ca("one");
        let (two, _) = ca("two");
        assert_eq!(only_these_roots(one.as_bytes()).unwrap().len(), 1);
        let bundle = format!("{one}\n{two}");
        assert_eq!(only_these_roots(bundle.as_bytes()).unwrap().len(), 2);
        // what replaceRoots leaves out: the public roots reqwest would add otherwise
        assert!(webpki_roots::TLS_SERVER_ROOTS.len() > 50);
        let err = only_these_roots(b"no pem here").unwrap_err();
        assert!(err.contains("holds no PEM certificate"), "{err}");
    }

    #[tokio::test]
    async fn replace_roots_trusts_the_secrets_ca_and_refuses_a_server_another_ca_signed() {
        let (ca1, issuer1) = ca("ca-1");
        let (ca2, _) = ca("ca-2");
        let addr = server(&issuer1).await;
        assert_eq!(get(&material(Some(&ca1)), true, addr).await, Ok(204));
        let err = get(&material(Some(&ca2)), true, addr).await.unwrap_err();
        assert!(
            err.contains("UnknownIssuer") || err.contains("invalid peer certificate"),
            "{err}"
        );
        // a bundle with the right CA among others still connects
        let bundle = format!("{ca2}\n{ca1}");
        assert_eq!(get(&material(Some(&bundle)), true, addr).await, Ok(204));
        // without replaceRoots the Secret's CA is trusted beside the public roots, as before
        assert_eq!(get(&material(Some(&ca1)), false, addr).await, Ok(204));
    }

    #[tokio::test]
    async fn replace_roots_with_a_secret_without_ca_crt_is_an_error_naming_the_key() {
        let default = crate::agent::sink::http_client(Duration::from_secs(1)).unwrap();
        let only_creds = SecretMaterial {
            auth: Some(crate::agent::sink::Auth::Bearer("t".into())),
            tls: None,
        };
        let err = output_client(
            &only_creds,
            true,
            "prod/ca",
            &default,
            Duration::from_secs(1),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "Secret prod/ca: ca.crt: missing, and tls.replaceRoots trusts only the CAs in it"
        );
        // without replaceRoots such a Secret is fine
        assert!(
            output_client(
                &only_creds,
                false,
                "prod/ca",
                &default,
                Duration::from_secs(1)
            )
            .is_ok()
        );
    }

    #[test]
    fn a_client_certificate_goes_into_the_replaced_roots_configuration() {
        let (ca_pem, issuer) = ca("ca");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["shipper".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let mut tls = TlsMaterial {
            ca: Some(ca_pem.into_bytes()),
            identity: Some((cert.pem().into_bytes(), key.serialize_pem().into_bytes())),
        };
        let config = replaced_roots_config(&tls).unwrap();
        assert!(config.client_auth_cert_resolver.has_certs());
        tls.identity = Some((cert.pem().into_bytes(), b"garbage".to_vec()));
        let (key, _) = replaced_roots_config(&tls).unwrap_err();
        assert_eq!(key, "tls.key");
    }

    #[test]
    fn replace_roots_without_a_secret_ref_names_the_field() {
        let output = |yaml: &str| serde_yaml::from_str::<Output>(yaml).unwrap();
        let (field, why) = replace_roots(&output(
            "{name: o, http: {url: 'https://rx', tls: {replaceRoots: true}}}",
        ))
        .unwrap_err();
        assert_eq!(field, ".http.tls.replaceRoots");
        assert!(why.contains("secretRef"), "{why}");
        assert_eq!(
            replace_roots(&output(
                "{name: o, loki: {url: 'https://l', secretRef: {name: ca}, tls: {replaceRoots: true}}}"
            )),
            Ok(true)
        );
        assert_eq!(
            replace_roots(&output(
                "{name: o, elasticsearch: {url: 'https://e', index: logs, tls: {}}}"
            )),
            Ok(false)
        );
        assert_eq!(replace_roots(&output("{name: o, stdout: {}}")), Ok(false));
    }
}
