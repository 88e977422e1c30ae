//! Local commands of the binary: the same engine and transport as the controller, driven
//! from files instead of the API server.

pub mod agent;
pub mod check;
pub mod exec;
pub mod plan;
pub mod policy;

use std::path::Path;

use anyhow::Context;

/// A manifest file of `kind`, with the path in every error.
pub fn read_yaml<T: serde::de::DeserializeOwned>(path: &Path, kind: &str) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_yaml::from_str(&text).with_context(|| format!("{} is not a {kind}", path.display()))
}
