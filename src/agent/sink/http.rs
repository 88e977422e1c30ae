//! Generic HTTP output: each batch is one POST of `application/x-ndjson`.

use bytes::Bytes;

use super::{Attempt, HttpOptions, Payload, SinkError, classify, ndjson};
use crate::agent::record::Encoded;

#[derive(Debug)]
pub struct HttpSink {
    url: reqwest::Url,
    opts: HttpOptions,
}

impl HttpSink {
    pub fn new(url: reqwest::Url, opts: HttpOptions) -> Self {
        Self { url, opts }
    }

    /// `groups`: the records' NDJSON as it already exists (sent without a copy).
    pub async fn send(
        &self,
        records: &[&Encoded],
        groups: Option<&[Bytes]>,
    ) -> Result<Attempt, SinkError> {
        let payload = match groups {
            Some(g) => Payload::Chunks(g.to_vec()),
            None => Payload::Whole(ndjson(records)),
        };
        let (status, body) = self
            .opts
            .post(self.url.clone(), "application/x-ndjson", payload, &[])
            .await
            .map_err(SinkError::Retryable)?;
        classify(status, &body)?;
        Ok(Attempt::default())
    }
}
