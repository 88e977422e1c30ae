//! HealthCheck endpoint probes against real servers on loopback: an HTTP server, a TLS
//! server with a short-lived self-signed certificate, closed ports and silent peers.
//!
//! Network rule: everything here talks to 127.0.0.0/8 only. Host names go through a
//! `Resolver::Static` map, so no test ever asks the machine's DNS server.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::get;
use axum::serve::ListenerExt;
use outrider::api::health_check::Endpoint;
use outrider::engine::health::endpoint::{EndpointProbe, Resolver};
use outrider::engine::health::{Observation, Outcome};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// The only names the tests use, all pinned to loopback.
fn resolver() -> Resolver {
    Resolver::Static(Arc::new(HashMap::from([
        ("app.test".to_string(), vec![LOOPBACK]),
        ("secure.test".to_string(), vec![LOOPBACK]),
    ])))
}

fn endpoint(yaml: &str) -> Endpoint {
    serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{e}: {yaml}"))
}

async fn run(yaml: &str, ca: Option<&[u8]>) -> Observation {
    let probe = EndpointProbe::new(&endpoint(yaml), ca, resolver())
        .unwrap_or_else(|e| panic!("{e}: {yaml}"));
    probe.probe().await
}

fn assert_outcome(o: &Observation, outcome: Outcome, needle: &str) {
    eprintln!("{:?}: {}", o.outcome, o.message);
    assert_eq!(o.outcome, outcome, "{o:?}");
    assert!(o.message.contains(needle), "{needle:?} not in {o:?}");
}

/// An HTTP server on 127.0.0.1 and the number of connections it has accepted.
async fn http_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let big = {
        let mut body = "a".repeat(70 * 1024);
        body.push_str("needle");
        body
    };
    let app = Router::new()
        .route("/ok", get(|| async { "ok" }))
        .route(
            "/down",
            get(|| async { (StatusCode::SERVICE_UNAVAILABLE, "down") }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(400)).await;
                "ok"
            }),
        )
        .route(
            "/hang",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        )
        .route("/big", get(move || async move { big }))
        .route(
            "/moved",
            get(|| async { (StatusCode::FOUND, [(header::LOCATION, "/ok")], "") }),
        )
        .route(
            "/agent",
            get(|headers: HeaderMap| async move {
                headers
                    .get(header::USER_AGENT)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
                    .to_string()
            }),
        );
    let listener = TcpListener::bind((LOOPBACK, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let listener = listener.tap_io(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, accepted)
}

/// A self-signed certificate for secure.test and 127.0.0.1, valid for `valid` from now.
fn self_signed(valid: Duration) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["secure.test".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    params.not_before = (SystemTime::now() - Duration::from_secs(3600)).into();
    params.not_after = (SystemTime::now() + valid).into();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "secure.test");
    let cert = params.self_signed(&key).unwrap();
    (cert, key)
}

/// A TLS server on 127.0.0.1 answering every request with 200 "ok", and the PEM of its
/// (self-signed) certificate.
async fn tls_server(valid: Duration) -> (SocketAddr, Vec<u8>) {
    let (cert, key) = self_signed(valid);
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
    let listener = TcpListener::bind((LOOPBACK, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // Handshake failures are what some tests are about: ignore them here.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16384 {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let response =
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";
                let _ = tls.write_all(response).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (addr, cert.pem().into_bytes())
}

/// A port on 127.0.0.1 nobody listens on.
async fn closed_port() -> u16 {
    let listener = TcpListener::bind((LOOPBACK, 0)).await.unwrap();
    listener.local_addr().unwrap().port()
}

/// A peer that accepts connections and never says a word (a hung TLS server).
async fn silent_server() -> SocketAddr {
    let listener = TcpListener::bind((LOOPBACK, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    addr
}

#[tokio::test]
async fn http_200_with_the_expected_body_passes_with_latency_as_value() {
    let (addr, _) = http_server().await;
    let o = run(
        &format!("name: api\nhttp: {{url: 'http://{addr}/ok', bodyContains: ok, bodyRegex: '^o.$', maxLatency: 5s}}\n"),
        None,
    )
    .await;
    assert_outcome(&o, Outcome::Pass, "HTTP 200 in ");
    assert!(o.value.is_some_and(|v| v > 0.0 && v < 5000.0), "{o:?}");
    assert_eq!(o.threshold, Some(5000.0));
    assert!(o.latency > Duration::ZERO);
}

#[tokio::test]
async fn http_503_fails_naming_the_expected_status() {
    let (addr, _) = http_server().await;
    let o = run(
        &format!("name: api\nhttp: {{url: 'http://{addr}/down'}}\n"),
        None,
    )
    .await;
    assert_outcome(&o, Outcome::Fail, "HTTP 503, expected 200");
    let o = run(
        &format!("name: api\nhttp: {{url: 'http://{addr}/down', expectStatus: [200, 503]}}\n"),
        None,
    )
    .await;
    assert_outcome(&o, Outcome::Pass, "HTTP 503");
}

#[tokio::test]
async fn http_missing_text_fails() {
    let (addr, _) = http_server().await;
    let o = run(
        &format!("name: api\nhttp: {{url: 'http://{addr}/ok', bodyContains: healthy}}\n"),
        None,
    )
    .await;
    assert_outcome(&o, Outcome::Fail, "body does not contain \"healthy\"");
}

#[tokio::test]
async fn http_slower_than_max_latency_fails_with_both_numbers() {
    let (addr, _) = http_server().await;
    let o = run(
        &format!("name: api\nhttp: {{url: 'http://{addr}/slow', maxLatency: 200ms}}\n"),
        None,
    )
    .await;
    assert_outcome(&o, Outcome::Fail, "over the 200ms limit");
    assert!(o.message.starts_with("latency "), "{o:?}");
    assert!(o.value.is_some_and(|v| v >= 400.0), "{o:?}");
    assert_eq!(o.threshold, Some(200.0));
}

#[tokio::test]
async fn http_reads_only_the_first_64_kib() {
    let (addr, _) = http_server().await;
    let o = run(
        &format!("name: api\nhttp: {{url: 'http://{addr}/big', bodyContains: needle}}\n"),
        None,
    )
    .await;
    assert_outcome(&o, Outcome::Fail, "(in the first 64 KiB)");
    let o = run(
        &format!("name: api\nhttp: {{url: 'http://{addr}/big', bodyRegex: 'a{{100}}'}}\n"),
        None,
    )
    .await;
    assert_outcome(&o, Outcome::Pass, "HTTP 200");
}

#[tokio::test]
async fn http_redirects_are_not_followed() {
    let (addr, _) = http_server().await;
    let o = run(
        &format!("name: api\nhttp: {{url: 'http://{addr}/moved'}}\n"),
        None,
    )
    .await;
    assert_outcome(&o, Outcome::Fail, "HTTP 302, expected 200");
    let o = run(
        &format!("name: api\nhttp: {{url: 'http://{addr}/moved', expectStatus: [302]}}\n"),
        None,
    )
    .await;
    assert_outcome(&o, Outcome::Pass, "HTTP 302");
}

#[tokio::test]
async fn http_sends_its_user_agent_and_opens_a_fresh_connection_per_probe() {
    let (addr, accepted) = http_server().await;
    let probe = EndpointProbe::new(
        &endpoint(&format!(
            "name: api\nhttp: {{url: 'http://{addr}/agent', bodyContains: 'outrider-healthcheck/{}'}}\n",
            env!("CARGO_PKG_VERSION")
        )),
        None,
        resolver(),
    )
    .unwrap();
    for _ in 0..3 {
        assert_outcome(&probe.probe().await, Outcome::Pass, "HTTP 200");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn http_times_out_within_its_timeout() {
    let (addr, _) = http_server().await;
    let start = Instant::now();
    let o = run(
        &format!("name: api\nhttp: {{url: 'http://{addr}/hang'}}\ntimeout: 300ms\n"),
        None,
    )
    .await;
    let took = start.elapsed();
    assert_outcome(&o, Outcome::Fail, "timed out after 300ms");
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[tokio::test]
async fn http_names_resolve_through_the_static_map_only() {
    let (addr, _) = http_server().await;
    let port = addr.port();
    let o = run(
        &format!("name: api\nhttp: {{url: 'http://app.test:{port}/ok'}}\n"),
        None,
    )
    .await;
    assert_outcome(&o, Outcome::Pass, "HTTP 200");
    let o = run(
        &format!("name: api\nhttp: {{url: 'http://nowhere.test:{port}/ok'}}\n"),
        None,
    )
    .await;
    assert_outcome(&o, Outcome::Fail, "nowhere.test does not resolve");
    assert!(o.message.starts_with("http://nowhere.test:"), "{o:?}");
}

#[tokio::test]
async fn http_connection_refused_is_a_failure_with_the_reason() {
    let port = closed_port().await;
    let o = run(
        &format!("name: api\nhttp: {{url: 'http://127.0.0.1:{port}/'}}\n"),
        None,
    )
    .await;
    assert_outcome(&o, Outcome::Fail, "connection refused");
}

#[tokio::test]
async fn https_probe_trusts_the_ca_secret_and_fails_without_it() {
    let (addr, ca) = tls_server(Duration::from_secs(2 * 86_400)).await;
    let port = addr.port();
    let with_ca = format!(
        "name: web\nhttp: {{url: 'https://secure.test:{port}/', bodyContains: ok, caSecretRef: {{name: web-ca}}}}\n"
    );
    let o = run(&with_ca, Some(&ca)).await;
    assert_outcome(&o, Outcome::Pass, "HTTP 200");

    let o = run(
        &format!("name: web\nhttp: {{url: 'https://secure.test:{port}/'}}\n"),
        None,
    )
    .await;
    assert_outcome(&o, Outcome::Fail, "certificate verify failed");
    assert!(o.message.starts_with("https://secure.test:"), "{o:?}");

    let o = run(
        &format!(
            "name: web\nhttp: {{url: 'https://secure.test:{port}/', insecureSkipVerify: true}}\n"
        ),
        None,
    )
    .await;
    assert_outcome(&o, Outcome::Pass, "HTTP 200");
}

#[tokio::test]
async fn tls_expiry_is_judged_against_min_valid_for() {
    let (addr, ca) = tls_server(Duration::from_secs(2 * 86_400)).await;
    let port = addr.port();
    let o = run(
        &format!("name: cert\ntls: {{address: 'secure.test:{port}', caSecretRef: {{name: ca}}}}\n"),
        Some(&ca),
    )
    .await;
    assert_outcome(
        &o,
        Outcome::Fail,
        "certificate for secure.test expires in 2.0 days",
    );
    assert!(
        o.message.ends_with("less than the 14.0 days required"),
        "{o:?}"
    );
    let days = o.value.unwrap();
    assert!((1.9..=2.0).contains(&days), "{o:?}");
    assert_eq!(o.threshold, Some(14.0));

    let o = run(
        &format!(
            "name: cert\ntls: {{address: 'secure.test:{port}', minValidFor: 24h, caSecretRef: {{name: ca}}}}\n"
        ),
        Some(&ca),
    )
    .await;
    assert_outcome(
        &o,
        Outcome::Pass,
        "certificate for secure.test expires in 2.0 days",
    );
    assert_eq!(o.threshold, Some(1.0));
}

#[tokio::test]
async fn tls_verifies_the_name_and_the_issuer() {
    let (addr, ca) = tls_server(Duration::from_secs(30 * 86_400)).await;
    let port = addr.port();
    let o = run(
        &format!(
            "name: cert\ntls: {{address: 'secure.test:{port}', serverName: other.test, caSecretRef: {{name: ca}}}}\n"
        ),
        Some(&ca),
    )
    .await;
    assert_outcome(&o, Outcome::Fail, "certificate verify failed");
    assert!(o.message.contains("other.test"), "{o:?}");

    let o = run(
        &format!("name: cert\ntls: {{address: 'secure.test:{port}'}}\n"),
        None,
    )
    .await;
    assert_outcome(&o, Outcome::Fail, "unknown issuer");

    // An IP address is checked against the certificate's IP SANs.
    let o = run(
        &format!("name: cert\ntls: {{address: '127.0.0.1:{port}', caSecretRef: {{name: ca}}}}\n"),
        Some(&ca),
    )
    .await;
    assert_outcome(&o, Outcome::Pass, "certificate for 127.0.0.1 expires in ");
}

#[tokio::test]
async fn tls_handshake_with_a_silent_peer_times_out() {
    let addr = silent_server().await;
    let start = Instant::now();
    let o = run(
        &format!("name: cert\ntls: {{address: '{addr}'}}\ntimeout: 300ms\n"),
        None,
    )
    .await;
    let took = start.elapsed();
    assert_outcome(&o, Outcome::Fail, "timed out after 300ms");
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[tokio::test]
async fn tcp_connect_passes_and_refused_fails_fast() {
    let (addr, _) = http_server().await;
    let o = run(
        &format!("name: port\ntcp: {{address: 'app.test:{}'}}\n", addr.port()),
        None,
    )
    .await;
    assert_outcome(&o, Outcome::Pass, &format!("connected to {addr} in "));
    assert!(o.value.is_some());

    let port = closed_port().await;
    let start = Instant::now();
    let o = run(
        &format!("name: port\ntcp: {{address: '127.0.0.1:{port}'}}\n"),
        None,
    )
    .await;
    assert_outcome(&o, Outcome::Fail, "connection refused");
    assert!(start.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn names_missing_from_the_static_map_do_not_resolve() {
    for yaml in [
        "name: x\ntcp: {address: 'nowhere.test:443'}\n",
        "name: x\ntls: {address: 'nowhere.test:443'}\n",
    ] {
        let o = run(yaml, None).await;
        assert_outcome(&o, Outcome::Fail, "nowhere.test does not resolve");
    }
}
