//! File and stdout outputs: NDJSON appended and synced before the batch counts as delivered.

use std::io::Write;
use std::path::PathBuf;

use super::{Attempt, SinkError, ndjson};
use crate::agent::record::Encoded;

#[derive(Debug)]
pub struct FileSink {
    /// `None` is stdout.
    path: Option<PathBuf>,
}

impl FileSink {
    pub fn new(path: Option<PathBuf>) -> Self {
        Self { path }
    }

    pub async fn send(&self, records: &[&Encoded]) -> Result<Attempt, SinkError> {
        let body = ndjson(records);
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            match path {
                Some(p) => {
                    if let Some(dir) = p.parent() {
                        std::fs::create_dir_all(dir)?;
                    }
                    let mut f = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&p)?;
                    f.write_all(&body)?;
                    f.sync_data()
                }
                None => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&body)?;
                    out.flush()
                }
            }
        })
        .await
        .map_err(|e| SinkError::Retryable(e.to_string()))?
        .map_err(|e| SinkError::Retryable(e.to_string()))?;
        Ok(Attempt::default())
    }
}
