//! Outputs. Each sink turns a slice of records into one request and reports, per record,
//! whether it was delivered, must be retried, or was rejected for good. [`deliver`] owns
//! the retry loop (exponential backoff with jitter) and the dead-letter file, so every
//! sink gets the same rules: retry only what can succeed later, never drop silently.

pub mod dead_letter;
pub mod elasticsearch;
pub mod file;
pub mod http;
pub mod loki;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::config::{OutputConfig, OutputKind};
use super::metrics::AgentMetrics;
use super::record::Encoded;
pub use dead_letter::DeadLetter;

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
    fn apply(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
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
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let ders = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate bundle: {e}"))?;
    if ders.is_empty() {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into());
    }
    let mut store = rustls::RootCertStore::empty();
    ders.iter()
        .enumerate()
        .map(|(n, der)| {
            store
                .add(der.clone())
                .map_err(|e| format!("certificate {}: {e}", n + 1))?;
            reqwest::Certificate::from_der(der)
                .map_err(|e| format!("certificate {}: {}", n + 1, error_chain(&e)))
        })
        .collect()
}

/// An error with its sources (`a: b: c`): reqwest's own message hides the cause, such as a
/// certificate the server presented that is not trusted.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}

/// Settings every HTTP sink shares.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    pub client: reqwest::Client,
    pub auth: Option<Auth>,
    pub gzip: bool,
}

/// Builds the HTTP client the agent's outputs share (rustls with the built-in public roots;
/// a timeout on every request). An output whose Secret carries TLS material gets its own.
pub fn http_client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    client_builder(timeout).build()
}

/// The most of a sink's answer the agent reads (a `_bulk` answer for a full batch fits):
/// a sink answering without end can neither hold a batch until its timeout nor grow the
/// agent's memory.
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;

pub(crate) fn client_builder(timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        // a redirect is an answer, not a delivery: following a 302 to some 200 page would
        // count records as delivered that no sink stored
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout)
        .pool_max_idle_per_host(4)
}

impl HttpOptions {
    /// Posts `body` with the content type, gzip and auth settings.
    async fn post(
        &self,
        url: reqwest::Url,
        content_type: &str,
        body: impl Into<Payload>,
        extra: &[(&str, &str)],
    ) -> Result<(reqwest::StatusCode, Vec<u8>), String> {
        let mut req = self.client.post(url).header("Content-Type", content_type);
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let body = match body.into() {
            Payload::Whole(b) if self.gzip => {
                req = req.header("Content-Encoding", "gzip");
                reqwest::Body::from(gzip(&[&b]).map_err(|e| format!("gzip: {e}"))?)
            }
            Payload::Chunks(c) if self.gzip => {
                req = req.header("Content-Encoding", "gzip");
                let parts: Vec<&[u8]> = c.iter().map(|b| b.as_ref()).collect();
                reqwest::Body::from(gzip(&parts).map_err(|e| format!("gzip: {e}"))?)
            }
            Payload::Whole(b) => reqwest::Body::from(b),
            Payload::Chunks(c) => reqwest::Body::wrap(ChunkBody::new(c)),
        };
        if let Some(a) = &self.auth {
            req = a.apply(req);
        }
        let resp = req.body(body).send().await.map_err(|e| error_chain(&e))?;
        let status = resp.status();
        let bytes = read_capped(resp, MAX_RESPONSE_BYTES).await?;
        Ok((status, bytes))
    }
}

/// The start of an answer's body, at most `cap` bytes; the rest is never read.
async fn read_capped(mut resp: reqwest::Response, cap: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| error_chain(&e))? {
        let room = cap.saturating_sub(out.len());
        if chunk.len() >= room {
            out.extend_from_slice(&chunk[..room]);
            break;
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

fn gzip(parts: &[&[u8]]) -> std::io::Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    for p in parts {
        enc.write_all(p)?;
    }
    enc.finish()
}

/// A request body.
pub enum Payload {
    /// Built for this request.
    Whole(Vec<u8>),
    /// Slices that already exist (the NDJSON of record groups), sent as they are.
    Chunks(Vec<Bytes>),
}

impl From<Vec<u8>> for Payload {
    fn from(b: Vec<u8>) -> Self {
        Payload::Whole(b)
    }
}

/// A body of existing slices with a known total length (so it goes out with a
/// `Content-Length`, not chunked), written without copying them into one buffer.
struct ChunkBody {
    chunks: std::collections::VecDeque<Bytes>,
    remaining: u64,
}

impl ChunkBody {
    fn new(chunks: Vec<Bytes>) -> Self {
        let remaining = chunks.iter().map(|c| c.len() as u64).sum();
        Self {
            chunks: chunks.into(),
            remaining,
        }
    }
}

impl http_body::Body for ChunkBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let next = self.chunks.pop_front();
        if let Some(c) = &next {
            self.remaining -= c.len() as u64;
        }
        std::task::Poll::Ready(next.map(|c| Ok(http_body::Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}

/// What happened to one attempt, per record (indices into the slice sent).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Attempt {
    /// Records to send again later.
    pub retry: Vec<usize>,
    /// Records rejected for good, with the reason.
    pub dead: Vec<(usize, String)>,
    /// Records the sink already had (count as delivered).
    pub duplicates: usize,
}

/// An attempt that failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Network error, timeout, 429 or 5xx: the same request may succeed later.
    #[error("retryable: {0}")]
    Retryable(String),
    /// The sink refused the request itself (4xx): retrying cannot help.
    #[error("rejected: {0}")]
    Rejected(String),
}

/// Classifies a whole-request HTTP status.
pub fn classify(status: reqwest::StatusCode, body: &[u8]) -> Result<(), SinkError> {
    if status.is_success() {
        return Ok(());
    }
    if status.is_redirection() {
        return Err(SinkError::Rejected(format!(
            "HTTP {}: a redirect, which is never followed (point the output at the sink itself)",
            status.as_u16()
        )));
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
    let msg = format!("HTTP {}: {text}", status.as_u16());
    if status.as_u16() == 429 || status.is_server_error() || status.as_u16() == 408 {
        Err(SinkError::Retryable(msg))
    } else {
        Err(SinkError::Rejected(msg))
    }
}

/// One configured output.
#[derive(Debug)]
pub enum Sink {
    Http(http::HttpSink),
    Elasticsearch(elasticsearch::EsSink),
    Loki(loki::LokiSink),
    File(file::FileSink),
}

impl Sink {
    /// Builds the sink for an output; `auth` comes from its Secret, if any.
    pub fn new(o: &OutputConfig, client: reqwest::Client, auth: Option<Auth>, gzip: bool) -> Self {
        let opts = HttpOptions { client, auth, gzip };
        match &o.kind {
            OutputKind::Http { url, .. } => Sink::Http(http::HttpSink::new(url.clone(), opts)),
            OutputKind::Elasticsearch { url, index, .. } => {
                Sink::Elasticsearch(elasticsearch::EsSink::new(url.clone(), index.clone(), opts))
            }
            OutputKind::Loki {
                url,
                labels,
                tenant_id,
                encoding,
                ..
            } => Sink::Loki(loki::LokiSink::new(
                url.clone(),
                labels,
                tenant_id.clone(),
                *encoding,
                opts,
            )),
            OutputKind::File { path } => Sink::File(file::FileSink::new(Some(path.clone()))),
            OutputKind::Stdout => Sink::File(file::FileSink::new(None)),
        }
    }

    /// `ndjson`: the records' NDJSON as it already exists, when `records` are exactly the
    /// groups it was cut from (a batch's first attempt).
    async fn attempt(
        &self,
        records: &[&Encoded],
        ndjson: Option<&[Bytes]>,
    ) -> Result<Attempt, SinkError> {
        match self {
            Sink::Http(s) => s.send(records, ndjson).await,
            Sink::Elasticsearch(s) => s.send(records).await,
            Sink::Loki(s) => s.send(records).await,
            Sink::File(s) => s.send(records).await,
        }
    }
}

pub use crate::backoff::Backoff;

/// Sink retries: 100 ms doubling to 10 s, jittered.
pub const SINK_BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));

/// A delivery to one output, with where its rejects go.
#[derive(Debug)]
pub struct Output {
    pub name: String,
    pub sink: Sink,
    pub dead_letter: Arc<DeadLetter>,
    pub backoff: Backoff,
}

/// How a delivery ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivered {
    /// Every record is delivered or dead-lettered: the batch may be checkpointed.
    Done,
    /// Shutdown came first: the batch is not acknowledged and will be re-read.
    Aborted,
}

/// Delivers records to one output: retries what is retryable until it succeeds,
/// dead-letters what the sink rejected, and gives up only when `abort` fires.
pub async fn deliver(
    out: &Output,
    records: &[&Encoded],
    ndjson: Option<&[Bytes]>,
    metrics: &AgentMetrics,
    pipeline: &str,
    abort: &CancellationToken,
) -> Delivered {
    let labels = AgentMetrics::output(pipeline, &out.name);
    let mut pending: Vec<&Encoded> = records.to_vec();
    let mut attempt_no = 0u32;
    while !pending.is_empty() {
        // Retries may carry a subset: their body is built from the records.
        let whole = ndjson.filter(|_| pending.len() == records.len());
        let result = tokio::select! {
            r = out.sink.attempt(&pending, whole) => r,
            _ = abort.cancelled() => return Delivered::Aborted,
        };
        let next: Vec<&Encoded> = match result {
            Ok(a) => {
                let dead = a.dead.len();
                let rejected: Vec<(&Encoded, &str)> = a
                    .dead
                    .iter()
                    .map(|(i, reason)| (pending[*i], reason.as_str()))
                    .collect();
                dead_letter(&out.dead_letter, &rejected);
                metrics
                    .records_dead_lettered
                    .get_or_create(&labels)
                    .inc_by(dead as u64);
                metrics
                    .records_duplicate
                    .get_or_create(&labels)
                    .inc_by(a.duplicates as u64);
                let ok = pending.len() - a.retry.len() - dead;
                metrics
                    .records_shipped
                    .get_or_create(&labels)
                    .inc_by(ok as u64);
                if !a.retry.is_empty() {
                    metrics
                        .records_failed
                        .get_or_create(&labels)
                        .inc_by(a.retry.len() as u64);
                    tracing::warn!(output = %out.name, %pipeline, records = a.retry.len(), "output asked to retry some records");
                }
                a.retry.iter().map(|i| pending[*i]).collect()
            }
            Err(SinkError::Rejected(msg)) => {
                tracing::warn!(output = %out.name, %pipeline, error = %msg, records = pending.len(), "output rejected the batch; dead-lettering it");
                let rejected: Vec<(&Encoded, &str)> =
                    pending.iter().map(|r| (*r, msg.as_str())).collect();
                dead_letter(&out.dead_letter, &rejected);
                metrics
                    .records_dead_lettered
                    .get_or_create(&labels)
                    .inc_by(pending.len() as u64);
                Vec::new()
            }
            Err(SinkError::Retryable(msg)) => {
                tracing::warn!(output = %out.name, %pipeline, error = %msg, records = pending.len(), attempt = attempt_no, "delivery failed; will retry");
                metrics
                    .records_failed
                    .get_or_create(&labels)
                    .inc_by(pending.len() as u64);
                pending
            }
        };
        pending = next;
        if pending.is_empty() {
            break;
        }
        metrics
            .records_retried
            .get_or_create(&labels)
            .inc_by(pending.len() as u64);
        let delay = out.backoff.delay(attempt_no);
        attempt_no = attempt_no.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = abort.cancelled() => return Delivered::Aborted,
        }
    }
    Delivered::Done
}

/// Appends rejected records with their reasons to the output's bounded dead-letter file
/// (see [`DeadLetter`]: what does not fit is dropped and counted there).
fn dead_letter(file: &DeadLetter, rejected: &[(&Encoded, &str)]) {
    let lines: Vec<serde_json::Value> = rejected
        .iter()
        .map(|(rec, reason)| {
            let mut line = serde_json::json!({
                "reason": reason,
                "record": String::from_utf8_lossy(&rec.json),
            });
            if !rec.id.is_empty() {
                line["id"] = rec.id.as_str().into();
            }
            line
        })
        .collect();
    file.write(&lines);
}

/// Joins records as NDJSON.
pub fn ndjson(records: &[&Encoded]) -> Vec<u8> {
    let mut body = Vec::with_capacity(records.iter().map(|r| r.json.len() + 1).sum());
    for r in records {
        body.extend_from_slice(&r.json);
        body.push(b'\n');
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes_decide_retry_or_reject() {
        use reqwest::StatusCode as S;
        assert!(classify(S::NO_CONTENT, b"").is_ok());
        assert!(matches!(
            classify(S::TOO_MANY_REQUESTS, b""),
            Err(SinkError::Retryable(_))
        ));
        assert!(matches!(
            classify(S::SERVICE_UNAVAILABLE, b""),
            Err(SinkError::Retryable(_))
        ));
        assert!(matches!(
            classify(S::BAD_REQUEST, b"bad"),
            Err(SinkError::Rejected(_))
        ));
    }

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
