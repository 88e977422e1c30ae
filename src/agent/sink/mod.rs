//! Outputs. Each sink turns a slice of records into one request and reports, per record,
//! whether it was delivered, must be retried, or was rejected for good. [`deliver`] owns
//! the retry loop (exponential backoff with jitter) and the dead-letter file, so every
//! sink gets the same rules: retry only what can succeed later, never drop silently.
//!
//! Here: the sink enum and what an attempt reports. Beside it: [`retry`] (delivery to one
//! output), [`transport`] (HTTP client, bodies, answers), [`secret`] (an output's Secret:
//! credentials and TLS material), [`dead_letter`], and one file per sink.

pub mod dead_letter;
pub mod elasticsearch;
pub mod file;
pub mod http;
pub mod loki;
pub mod retry;
pub mod secret;
pub mod transport;

use bytes::Bytes;

use super::config::{OutputConfig, OutputKind};
use super::record::Encoded;
pub use crate::backoff::Backoff;
pub use dead_letter::DeadLetter;
pub use retry::{Delivered, Output, SINK_BACKOFF, deliver};
pub use secret::{Auth, SecretError, SecretMaterial, TlsMaterial};
pub(crate) use transport::client_builder;
pub use transport::{HttpOptions, MAX_RESPONSE_BYTES, Payload, classify, error_chain, http_client};

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
                labels.clone(),
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

/// Joins records as NDJSON.
pub fn ndjson(records: &[&Encoded]) -> Vec<u8> {
    let mut body = Vec::with_capacity(records.iter().map(|r| r.json.len() + 1).sum());
    for r in records {
        body.extend_from_slice(&r.json);
        body.push(b'\n');
    }
    body
}
