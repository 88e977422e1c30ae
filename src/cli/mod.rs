//! Local commands of the binary: the same engine and transport as the controller, driven
//! from files instead of the API server.

pub mod agent;
pub mod check;
pub mod exec;
pub mod plan;
