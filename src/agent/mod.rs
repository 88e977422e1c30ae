//! The node log agent: discover files, tail them, parse and enrich lines into records,
//! batch, ship to the outputs, and move checkpoints only when the outputs acknowledged.
//!
//! Data flows one way: [`discover`] → [`tail`] (with [`truncate`], and [`assemble`] over
//! [`reader`], [`multiline`], [`parse`], [`record`], [`filter`]) → [`buffer`] → [`ship`]
//! (with [`batch`]; or [`spool_write`] → [`spool`] → [`spool_ship`]) → [`sink`] →
//! [`checkpoint`] (written by [`checkpoint_writer`]); [`pipeline`] wires one pipeline,
//! [`run`] the whole agent. [`confine`] keeps every read beneath the admin's allowed roots.

pub mod assemble;
pub mod batch;
pub mod buffer;
pub mod checkpoint;
pub mod checkpoint_writer;
pub mod config;
pub mod confine;
pub mod discover;
pub mod filter;
pub mod identity;
pub mod limits;
pub mod metrics;
pub mod multiline;
pub mod parse;
pub mod pipeline;
pub mod reader;
pub mod record;
pub mod report;
pub mod run;
pub mod ship;
pub mod sink;
pub mod spool;
pub mod spool_ship;
pub mod spool_write;
pub mod tail;
pub mod tls_roots;
pub mod truncate;

/// Why the agent (or one pipeline) could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(#[source] reqwest::Error),
    #[error("pipeline {pipeline}: {field}: {message}")]
    Secret {
        pipeline: String,
        field: String,
        message: String,
    },
    /// A path the pipeline names is not the agent's to read or write.
    #[error("pipeline {pipeline}: {field}: {refusal}")]
    Refused {
        pipeline: String,
        field: String,
        refusal: confine::Refusal,
    },
    /// The pipeline asks for more than the admin's caps allow ([`limits`]).
    #[error("pipeline {pipeline}: {field}: {message}")]
    LimitExceeded {
        pipeline: String,
        field: String,
        message: String,
    },
    #[error("state directory {path}: {source}")]
    StateDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}
