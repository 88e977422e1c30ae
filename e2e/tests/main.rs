//! Cluster tests: a real etcd + kube-apiserver + controller-manager + scheduler + kwok,
//! started on loopback by `e2e/cluster.sh`, with the `outrider` binary as the controller.

mod api;
mod argocd;
mod chart;
mod demo;
mod health_check;
mod image;
mod inventory;
mod leader;
mod log_pipeline;
#[path = "../../tests/support/netns.rs"]
mod netns;
mod plan;
mod security_policy;
#[path = "../../tests/support/sshd.rs"]
mod sshd;
mod support;
#[path = "../../tests/support/victorialogs.rs"]
mod victorialogs;
