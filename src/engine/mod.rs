//! The operations themselves, independent of Kubernetes: plain Rust values in, results out,
//! so the controller, `outrider plan run` and the tests share one implementation.
//! Nothing here imports `kube`.

pub mod firewall;
pub mod health;
pub mod inventory;
pub mod plan;
