//! Outrider: a Kubernetes operator for day-2 operations on machines outside the cluster.
//!
//! Layers (data flows one way): [`api`] → [`controller`] → [`engine`] → transports.

pub mod agent;
pub mod api;
pub mod controller;
pub mod engine;
pub mod ssh;
pub mod targets;
pub mod telemetry;
