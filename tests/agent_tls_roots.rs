//! `tls.replaceRoots` through the real `outrider agent` binary, on loopback: an HTTPS
//! receiver whose certificate CA-1 signed gets every line of the output whose Secret's
//! `ca.crt` is CA-1, nothing from the one whose `ca.crt` is CA-2 (the handshake fails), and
//! an output whose Secret has no `ca.crt` is refused naming it. What this does not show
//! (offline, it cannot): that a server with a publicly issued certificate is refused; the
//! unit tests in `src/agent/tls_roots.rs` show the trusted store holds only `ca.crt`.

#[path = "support/agent.rs"]
mod agent;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent::{Agent, append_numbered, pipeline_yaml, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LONG: Duration = Duration::from_secs(60);

/// A CA's certificate PEM and its signer.
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

/// Lines received per request path.
type Seen = Arc<Mutex<BTreeMap<String, Vec<String>>>>;

/// An HTTPS receiver on 127.0.0.1 with a certificate `issuer` signed: records each POST's
/// body lines under its path and answers 200, one request per connection.
fn https_receiver(
    rt: &tokio::runtime::Runtime,
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
) -> (SocketAddr, Seen) {
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
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let store = seen.clone();
    rt.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, store) = (acceptor.clone(), store.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                let (head_end, length) = loop {
                    match tls.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        break (i + 4, length);
                    }
                };
                while buf.len() < head_end + length {
                    match tls.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let path = head.split(' ').nth(1).unwrap_or("").to_string();
                let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).to_string();
                store
                    .lock()
                    .unwrap()
                    .entry(path)
                    .or_default()
                    .extend(body.lines().map(String::from));
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (addr, seen)
}

/// `<dir>/secrets/test/<name>/` with the given files.
fn secret(dir: &Path, name: &str, files: &[(&str, &str)]) {
    let s = dir.join("secrets/test").join(name);
    std::fs::create_dir_all(&s).unwrap();
    for (k, v) in files {
        std::fs::write(s.join(k), v).unwrap();
    }
}

#[test]
fn replace_roots_ships_to_the_secrets_ca_only_and_needs_a_ca_crt() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca1, issuer1) = ca("ca-1");
    let (ca2, _) = ca("ca-2");
    let (addr, seen) = https_receiver(&rt, &issuer1);
    secret(d, "ca1", &[("ca.crt", &ca1)]);
    secret(d, "ca2", &[("ca.crt", &ca2)]);
    secret(d, "token-only", &[("token", "t0k")]);
    std::fs::create_dir_all(d.join("logs")).unwrap();

    let mut args = Vec::new();
    for (name, secret) in [
        ("trusted", "ca1"),
        ("wrong", "ca2"),
        ("nocacrt", "token-only"),
    ] {
        let yaml = pipeline_yaml(
            name,
            &format!(
                "{{name: app, paths: [\"{}/logs/{name}.log\"]}}",
                d.display()
            ),
            &format!(
                "{{name: rx, http: {{url: \"https://{addr}/{name}\", secretRef: {{name: {secret}}}, tls: {{replaceRoots: true}}}}}}"
            ),
            "  delivery: {batch: {maxWait: 50ms}}\n",
        );
        let path = d.join(format!("{name}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        args.push("--pipeline".to_string());
        args.push(path.display().to_string());
    }
    let root = d.display().to_string();
    args.extend(
        [
            "--state-dir",
            &format!("{root}/state"),
            "--secret-dir",
            &format!("{root}/secrets"),
            "--allowed-root",
            &root,
            "--node-name",
            "n1",
        ]
        .map(String::from),
    );
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start(d, &argv);

    for name in ["trusted", "wrong", "nocacrt"] {
        append_numbered(&d.join(format!("logs/{name}.log")), name, 0..100);
    }
    let lines = |path: &str| seen.lock().unwrap().get(path).map_or(0, Vec::len);
    wait_for("the trusted output's 100 lines", LONG, || {
        lines("/trusted") == 100
    });
    wait_for("the wrong CA's handshake failing", LONG, || {
        let log = agent.log_text();
        log.contains("UnknownIssuer") || log.contains("invalid peer certificate")
    });
    wait_for("the Secret without ca.crt refused", LONG, || {
        agent.metric(
            "outrider_agent_pipelines_refused_total",
            &["pipeline=\"nocacrt\"", "reason=\"secret\""],
        ) >= 1.0
    });
    let log = agent.log_text();
    assert!(
        log.contains("ca.crt: missing, and tls.replaceRoots trusts only the CAs in it"),
        "{log}"
    );
    assert_eq!(
        lines("/wrong"),
        0,
        "nothing reaches a server CA-2 did not sign"
    );
    assert_eq!(lines("/nocacrt"), 0);
    let trusted = seen.lock().unwrap().get("/trusted").cloned().unwrap();
    assert!(
        trusted.iter().all(|l| l.contains("trusted-")),
        "{:?}",
        &trusted[..3]
    );
}
