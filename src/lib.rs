//! Outrider: a Kubernetes operator for day-2 operations on machines outside the cluster.
//!
//! Layers (data flows one way): [`api`] → [`resolve`] → [`controller`] → [`engine`] → transports.

pub mod agent;
pub mod api;
pub mod backoff;
pub mod controller;
pub mod deadline;
pub mod engine;
pub mod liveness;
pub mod process;
pub mod resolve;
pub mod ssh;
pub mod telemetry;
pub mod text;
