//! SSH transport over russh: strict host-key checks, public-key auth, exec with timeouts and
//! capped output, `become`, jump hosts, uploads, and bounded fan-out. No kube types here.

pub mod capture;
pub mod client;
pub mod error;
pub mod exec;
pub mod fanout;
pub mod keys;
pub mod known_hosts;
pub mod pins;
pub mod quote;

use std::time::Duration;

pub use client::{Credentials, Session};
pub use error::Error;
pub use exec::{Command, ExecOutput, Program};
pub use fanout::{Fleet, HostResult};
pub use pins::{Pin, Pins};

/// A host as the transport sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Name used in results and messages (the Inventory host name).
    pub name: String,
    /// IP address or DNS name.
    pub address: String,
    pub port: u16,
}

impl Endpoint {
    pub fn new(name: impl Into<String>, address: impl Into<String>, port: u16) -> Self {
        Self {
            name: name.into(),
            address: address.into(),
            port,
        }
    }
}

/// What to do with a host key `known_hosts` does not list. A changed key is always refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HostKeyPolicy {
    #[default]
    Strict,
    /// Trust on first use: accept and report the fingerprint so the caller can record it.
    AcceptNew,
}

/// A bastion every connection is tunnelled through (`direct-tcpip`, like ProxyJump).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JumpHost {
    pub address: String,
    pub port: u16,
    pub user: String,
}

/// Connection settings shared by every host of a run.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub user: String,
    /// Bounds TCP connect plus SSH handshake, per attempt.
    pub connect_timeout: Duration,
    pub host_key_policy: HostKeyPolicy,
    pub jump_host: Option<JumpHost>,
    /// `sudo -n -u USER` for every command when set.
    pub become_user: Option<String>,
    /// Keepalive interval: a silent long command must not look like a dead peer.
    pub keepalive: Duration,
    /// Handshake attempts when the server resets a connection mid-handshake (busy sshd).
    pub handshake_attempts: u32,
}

impl ClientConfig {
    pub fn new(user: impl Into<String>) -> Self {
        Self {
            user: user.into(),
            connect_timeout: Duration::from_secs(10),
            host_key_policy: HostKeyPolicy::Strict,
            jump_host: None,
            become_user: None,
            keepalive: Duration::from_secs(15),
            handshake_attempts: 5,
        }
    }
}
