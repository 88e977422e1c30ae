//! Generic HTTP output: each batch is one POST of `application/x-ndjson`.

use super::{Attempt, HttpOptions, SinkError, classify, ndjson};
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

    pub async fn send(&self, records: &[&Encoded]) -> Result<Attempt, SinkError> {
        let (status, body) = self
            .opts
            .post(
                self.url.clone(),
                "application/x-ndjson",
                ndjson(records),
                &[],
            )
            .await
            .map_err(SinkError::Retryable)?;
        classify(status, &body)?;
        Ok(Attempt::default())
    }
}
