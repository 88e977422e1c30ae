//! How sinks talk HTTP: the shared client (rustls, timeouts, no redirects), request
//! bodies (gzip, existing NDJSON slices sent without copying), answers read up to a cap,
//! and what an answer's status means for the batch.

use std::io::Write;
use std::time::Duration;

use bytes::Bytes;

use super::{Auth, SinkError};

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
    pub(super) async fn post(
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
}
