//! Outputs. Each sink turns a slice of records into one request and reports, per record,
//! whether it was delivered, must be retried, or was rejected for good. [`deliver`] owns
//! the retry loop (exponential backoff with jitter) and the dead-letter file, so every
//! sink gets the same rules: retry only what can succeed later, never drop silently.

pub mod elasticsearch;
pub mod file;
pub mod http;
pub mod loki;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

use super::config::{OutputConfig, OutputKind};
use super::metrics::AgentMetrics;
use super::record::Encoded;

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
    /// Reads `<secret-dir>/<namespace>/<name>/{username,password,token,apiKey}` (the
    /// layout of Secrets mounted per namespace); `None` when the Secret has none of them.
    pub fn from_secret_dir(dir: &Path, namespace: &str, name: &str) -> Option<Self> {
        let base = dir.join(namespace).join(name);
        let read = |k: &str| {
            std::fs::read_to_string(base.join(k))
                .ok()
                .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
        };
        if let (Some(username), Some(password)) = (read("username"), read("password")) {
            return Some(Auth::Basic { username, password });
        }
        if let Some(t) = read("token") {
            return Some(Auth::Bearer(t));
        }
        read("apiKey").map(Auth::ApiKey)
    }

    fn apply(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            Auth::Basic { username, password } => req.basic_auth(username, Some(password)),
            Auth::Bearer(t) => req.bearer_auth(t),
            Auth::ApiKey(k) => req.header("Authorization", format!("ApiKey {k}")),
        }
    }
}

/// Settings every HTTP sink shares.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    pub client: reqwest::Client,
    pub auth: Option<Auth>,
    pub gzip: bool,
}

/// Builds the one HTTP client the agent uses (rustls; a timeout on every request).
pub fn http_client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout)
        .pool_max_idle_per_host(4)
        .build()
}

impl HttpOptions {
    /// Posts `body` with the content type, gzip and auth settings.
    async fn post(
        &self,
        url: reqwest::Url,
        content_type: &str,
        body: Vec<u8>,
        extra: &[(&str, &str)],
    ) -> Result<(reqwest::StatusCode, Vec<u8>), String> {
        let mut req = self.client.post(url).header("Content-Type", content_type);
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let body = if self.gzip {
            req = req.header("Content-Encoding", "gzip");
            gzip(&body).map_err(|e| format!("gzip: {e}"))?
        } else {
            body
        };
        if let Some(a) = &self.auth {
            req = a.apply(req);
        }
        let resp = req.body(body).send().await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
        Ok((status, bytes.to_vec()))
    }
}

fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(body)?;
    enc.finish()
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
                ..
            } => Sink::Loki(loki::LokiSink::new(
                url.clone(),
                labels,
                tenant_id.clone(),
                opts,
            )),
            OutputKind::File { path } => Sink::File(file::FileSink::new(Some(path.clone()))),
            OutputKind::Stdout => Sink::File(file::FileSink::new(None)),
        }
    }

    async fn attempt(&mut self, records: &[&Encoded]) -> Result<Attempt, SinkError> {
        match self {
            Sink::Http(s) => s.send(records).await,
            Sink::Elasticsearch(s) => s.send(records).await,
            Sink::Loki(s) => s.send(records).await,
            Sink::File(s) => s.send(records).await,
        }
    }
}

/// Retry timing: exponential from `initial` to `max`, with full jitter.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// Delay before retry number `attempt` (0-based): uniform in [cap/2, cap].
    pub fn delay(&self, attempt: u32) -> Duration {
        let cap = self
            .initial
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max);
        let half = cap / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }
}

/// A delivery to one output, with where its rejects go.
#[derive(Debug)]
pub struct Output {
    pub name: String,
    pub sink: Sink,
    pub dead_letter: PathBuf,
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
    out: &mut Output,
    records: &[&Encoded],
    metrics: &AgentMetrics,
    pipeline: &str,
    abort: &CancellationToken,
) -> Delivered {
    let labels = AgentMetrics::output(pipeline, &out.name);
    let mut pending: Vec<&Encoded> = records.to_vec();
    let mut attempt_no = 0u32;
    while !pending.is_empty() {
        let result = tokio::select! {
            r = out.sink.attempt(&pending) => r,
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

/// Appends rejected records with their reasons (one write and one fsync per call). A
/// failing dead-letter write is logged: the records are still counted, so the loss is
/// visible in metrics.
fn dead_letter(path: &Path, rejected: &[(&Encoded, &str)]) {
    if rejected.is_empty() {
        return;
    }
    let mut buf = Vec::new();
    for (rec, reason) in rejected {
        let line = serde_json::json!({
            "reason": reason,
            "id": rec.id,
            "record": String::from_utf8_lossy(&rec.json),
        });
        buf.extend_from_slice(line.to_string().as_bytes());
        buf.push(b'\n');
    }
    let res = (|| -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        f.write_all(&buf)?;
        f.sync_data()
    })();
    if let Err(e) = res {
        tracing::error!(path = %path.display(), error = %e, "cannot write the dead-letter file");
    }
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
    fn backoff_grows_exponentially_with_jitter_and_a_cap() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        for _ in 0..50 {
            let d0 = b.delay(0);
            assert!(d0 >= Duration::from_millis(50) && d0 <= Duration::from_millis(100));
            let d3 = b.delay(3);
            assert!(d3 >= Duration::from_millis(400) && d3 <= Duration::from_millis(800));
            let d20 = b.delay(20);
            assert!(d20 >= Duration::from_secs(1) && d20 <= Duration::from_secs(2));
        }
    }

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

    #[test]
    fn secret_dir_yields_basic_then_bearer_then_api_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("prod").join("es-creds");
        std::fs::create_dir_all(&s).unwrap();
        std::fs::write(s.join("token"), "t0k\n").unwrap();
        assert!(
            matches!(Auth::from_secret_dir(dir.path(), "prod", "es-creds"), Some(Auth::Bearer(t)) if t == "t0k")
        );
        std::fs::write(s.join("username"), "u").unwrap();
        std::fs::write(s.join("password"), "p").unwrap();
        let a = Auth::from_secret_dir(dir.path(), "prod", "es-creds").unwrap();
        assert_eq!(format!("{a:?}"), "Basic(u, ***)");
        assert!(Auth::from_secret_dir(dir.path(), "prod", "missing").is_none());
    }
}
