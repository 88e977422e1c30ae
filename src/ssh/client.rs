//! One SSH connection per host: TCP + handshake under a timeout, retried when a busy sshd
//! resets the handshake; the host key checked against `known_hosts`; public-key auth.
//! Channels (exec, upload) are opened on the one connection for as long as a run lasts.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use russh::Preferred;
use russh::client::{self, AuthResult, Handle};
use russh::keys::{Algorithm, HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};

use super::known_hosts::{self, CertVerdict, HostKeyVerdict, KnownHosts};
use super::pins::{PinVerdict, Pins};
use super::{ClientConfig, Endpoint, Error, HostKeyPolicy};

/// Credentials decoded once per run and shared by every connection.
pub struct Credentials {
    key: Arc<PrivateKey>,
    known_hosts: KnownHosts,
    /// Keys pinned on first use, checked when `known_hosts` does not know a host.
    pins: Pins,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("key", &self.key.algorithm())
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Decodes an OpenSSH or PEM private key (optionally encrypted) and parses `known_hosts`.
    pub fn new(
        private_key: &str,
        passphrase: Option<&str>,
        known_hosts_text: &str,
    ) -> Result<Self, Error> {
        // not russh's decode_secret_key alone: it refuses ~1 in 512 ssh-keygen P-256 keys
        let key = super::keys::decode_private_key(private_key, passphrase)?;
        let known_hosts =
            KnownHosts::parse(known_hosts_text).map_err(|e| Error::BadKnownHosts(e.to_string()))?;
        Ok(Self {
            key: Arc::new(key),
            known_hosts,
            pins: Pins::default(),
        })
    }

    /// Adds the host keys pinned on first use (see [`Pins`]).
    pub fn with_pins(mut self, pins: Pins) -> Self {
        self.pins = pins;
        self
    }
}

/// What the host-key check concluded, read back after the handshake.
#[derive(Debug, Clone)]
enum Verdict {
    Trusted,
    AcceptedNew { fingerprint: String, line: String },
    Refused(Error),
}

pub(crate) struct Verifier {
    host: String,
    address: String,
    port: u16,
    policy: HostKeyPolicy,
    credentials: Arc<Credentials>,
    verdict: Arc<Mutex<Option<Verdict>>>,
}

impl client::Handler for Verifier {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = match server_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key,
            PublicKeyOrCertificate::Certificate(cert) => {
                let verdict = self.certificate(cert);
                let ok = !matches!(verdict, Verdict::Refused(_));
                self.set(verdict);
                return Ok(ok);
            }
        };
        let fingerprint = known_hosts::fingerprint(key);
        let verdict = match self
            .credentials
            .known_hosts
            .verify(&self.address, self.port, key)
        {
            HostKeyVerdict::Trusted => Verdict::Trusted,
            HostKeyVerdict::Unknown => match self.credentials.pins.verify_fingerprint(
                &self.address,
                self.port,
                &fingerprint,
            ) {
                PinVerdict::Matches => Verdict::Trusted,
                PinVerdict::Differs { pinned } => Verdict::Refused(Error::HostKeyMismatch {
                    host: self.host.clone(),
                    presented: fingerprint,
                    expected: format!("{pinned} (pinned on first use)"),
                }),
                PinVerdict::Unpinned => self.unknown(key, fingerprint),
            },
            HostKeyVerdict::Mismatch { expected } => Verdict::Refused(Error::HostKeyMismatch {
                host: self.host.clone(),
                presented: fingerprint,
                expected: expected.join(", "),
            }),
            HostKeyVerdict::Revoked => Verdict::Refused(Error::HostKeyRevoked {
                host: self.host.clone(),
                fingerprint,
            }),
        };
        let ok = !matches!(verdict, Verdict::Refused(_));
        self.set(verdict);
        Ok(ok)
    }
}

impl Verifier {
    /// A host certificate: trusted only through a `@cert-authority` line (never pinned or
    /// trusted on first use).
    fn certificate(&self, cert: &russh::keys::Certificate) -> Verdict {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let fingerprint = cert.public_key().fingerprint(HashAlg::Sha256).to_string();
        match self
            .credentials
            .known_hosts
            .verify_certificate(&self.address, self.port, cert, now)
        {
            CertVerdict::Trusted => Verdict::Trusted,
            CertVerdict::Revoked => Verdict::Refused(Error::HostKeyRevoked {
                host: self.host.clone(),
                fingerprint,
            }),
            CertVerdict::NoAuthority => Verdict::Refused(Error::HostKeyUnknown {
                host: self.host.clone(),
                fingerprint,
            }),
            CertVerdict::Invalid(reason) => Verdict::Refused(Error::HostKeyMismatch {
                host: self.host.clone(),
                presented: format!("a host certificate for key {fingerprint}: {reason}"),
                expected: "a valid host certificate from a @cert-authority key".into(),
            }),
        }
    }

    /// A key neither `known_hosts` nor a pin knows: trusted once under `AcceptNew`.
    fn unknown(&self, key: &russh::keys::PublicKey, fingerprint: String) -> Verdict {
        if self.policy == HostKeyPolicy::AcceptNew {
            Verdict::AcceptedNew {
                line: known_hosts::known_hosts_line(&self.address, self.port, key),
                fingerprint,
            }
        } else {
            Verdict::Refused(Error::HostKeyUnknown {
                host: self.host.clone(),
                fingerprint,
            })
        }
    }

    fn set(&self, v: Verdict) {
        *self.verdict.lock().unwrap_or_else(|p| p.into_inner()) = Some(v);
    }
}

/// How long [`Session::close`] waits for the connection task to write the disconnect and end.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// An authenticated connection to one host.
///
/// It ends with SSH_MSG_DISCONNECT, never by dropping the TCP connection alone: [`Session::close`]
/// sends it and waits until it is written; dropping a `Session` that was not closed sends it from
/// a spawned task. To OpenSSH's sshd the difference is CPU: a client that just closes the socket
/// makes the session's processes take sshd's orderly shutdown (the serverloop sees EOF, the
/// monitor tears the session down, both processes `exit()` through OpenSSL's cleanup): 5–7 ms
/// more sshd CPU per connection than after a disconnect, a third more in all (OpenSSH 9.2,
/// `make bench-ssh`, its sequential part).
pub struct Session {
    /// `Some` until [`Session::close`] or drop takes it.
    handle: Option<Handle<Verifier>>,
    pub(crate) endpoint: Endpoint,
    pub(crate) config: Arc<ClientConfig>,
    /// Kept alive for as long as this session tunnels through it.
    jump: Option<Arc<Session>>,
    /// Under `AcceptNew`: the fingerprint and known_hosts line of a key accepted on first use.
    pub accepted_host_key: Option<(String, String)>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

fn russh_config(config: &ClientConfig, preferred: Preferred) -> Arc<client::Config> {
    Arc::new(client::Config {
        keepalive_interval: Some(config.keepalive),
        keepalive_max: 3,
        inactivity_timeout: None,
        nodelay: true,
        preferred,
        ..Default::default()
    })
}

/// Host key algorithms for one host, as OpenSSH orders them: the types `known_hosts`
/// holds for it first (a host pinned by its RSA key is asked for that key even if the
/// server prefers ed25519, instead of failing as a mismatch), and certificates first
/// when a `@cert-authority` line names it.
fn preferred_for(known: &KnownHosts, address: &str, port: u16) -> Preferred {
    let mut preferred = Preferred::default();
    let known_types = known.known_algorithms(address, port);
    let same_type = |a: &Algorithm, b: &Algorithm| match (a, b) {
        (Algorithm::Rsa { .. }, Algorithm::Rsa { .. }) => true,
        _ => a == b,
    };
    if !known_types.is_empty() {
        let (first, rest): (Vec<Algorithm>, Vec<Algorithm>) = preferred
            .key
            .iter()
            .cloned()
            .partition(|a| known_types.iter().any(|k| same_type(k, a)));
        preferred.key = first.into_iter().chain(rest).collect::<Vec<_>>().into();
    }
    if known.has_authority(address, port) {
        // not ssh-rsa-cert (SHA-1 signatures)
        preferred.host_key_certificates = preferred
            .key
            .iter()
            .filter(|a| !matches!(a, Algorithm::Rsa { hash: None }))
            .cloned()
            .collect::<Vec<_>>()
            .into();
    }
    preferred
}

/// Errors worth another handshake attempt: the server dropped us before auth (MaxStartups).
fn is_transient(e: &russh::Error) -> bool {
    match e {
        russh::Error::IO(io) => matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::ConnectionAborted
        ),
        russh::Error::Disconnect | russh::Error::HUP | russh::Error::Version => true,
        _ => false,
    }
}

impl Session {
    /// Connects, verifies the host key and authenticates, through the jump host if any.
    pub async fn connect(
        config: Arc<ClientConfig>,
        credentials: Arc<Credentials>,
        endpoint: &Endpoint,
        jump: Option<Arc<Session>>,
    ) -> Result<Session, Error> {
        let attempts = config.handshake_attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::connect_once(&config, &credentials, endpoint, jump.clone()).await {
                Err((e, true)) if attempt < attempts => {
                    let base = Duration::from_millis(100) * 2u32.pow(attempt.min(6));
                    let delay = base.mul_f64(rand::rng().random_range(0.5..1.5));
                    tracing::debug!(host = %endpoint.name, attempt, error = %e, ?delay, "handshake reset, retrying");
                    tokio::time::sleep(delay).await;
                }
                Err((e, _)) => return Err(e),
                Ok(session) => return Ok(session),
            }
        }
    }

    /// One attempt; the bool says whether a retry may help.
    async fn connect_once(
        config: &Arc<ClientConfig>,
        credentials: &Arc<Credentials>,
        endpoint: &Endpoint,
        jump: Option<Arc<Session>>,
    ) -> Result<Session, (Error, bool)> {
        let host = endpoint.name.clone();
        let verdict = Arc::new(Mutex::new(None));
        let verifier = Verifier {
            host: host.clone(),
            address: endpoint.address.clone(),
            port: endpoint.port,
            policy: config.host_key_policy,
            credentials: credentials.clone(),
            verdict: verdict.clone(),
        };
        let unreachable = |reason: String| Error::Unreachable {
            host: host.clone(),
            reason,
        };
        let preferred = preferred_for(&credentials.known_hosts, &endpoint.address, endpoint.port);
        // Ok(Err(_)) is a transport failure before SSH started; Err(_) from SSH itself.
        let handshake = async {
            let stream = match &jump {
                None => {
                    let addr = (endpoint.address.as_str(), endpoint.port);
                    match tokio::net::TcpStream::connect(addr).await {
                        Ok(tcp) => {
                            let _ = tcp.set_nodelay(true);
                            client::connect_stream(
                                russh_config(config, preferred.clone()),
                                tcp,
                                verifier,
                            )
                            .await
                        }
                        Err(e) => {
                            return Ok(Err(unreachable(format!(
                                "cannot connect to {}:{}: {e}",
                                endpoint.address, endpoint.port
                            ))));
                        }
                    }
                }
                Some(j) => {
                    let tunnel = j
                        .handle()
                        .channel_open_direct_tcpip(
                            endpoint.address.clone(),
                            u32::from(endpoint.port),
                            "127.0.0.1",
                            0,
                        )
                        .await;
                    match tunnel {
                        Ok(channel) => {
                            client::connect_stream(
                                russh_config(config, preferred.clone()),
                                channel.into_stream(),
                                verifier,
                            )
                            .await
                        }
                        Err(e) => {
                            return Ok(Err(unreachable(format!(
                                "jump host {} cannot reach {}:{}: {e}",
                                j.endpoint.name, endpoint.address, endpoint.port
                            ))));
                        }
                    }
                }
            };
            stream.map(Ok)
        };
        // one deadline for TCP connect, key exchange and authentication: a host that stalls
        // after the key exchange must not hold a slot until its LoginGraceTime
        let deadline = crate::deadline::from_now(config.connect_timeout);
        let result = tokio::time::timeout_at(deadline, handshake).await;
        let verdict = verdict.lock().unwrap_or_else(|p| p.into_inner()).take();
        let mut handle = match result {
            Err(_) => {
                let reason = format!(
                    "connect and handshake to {}:{} took longer than {:?}",
                    endpoint.address, endpoint.port, config.connect_timeout
                );
                return Err((unreachable(reason), false));
            }
            Ok(Ok(Err(transport))) => return Err((transport, false)),
            Ok(Err(e)) => {
                if let Some(Verdict::Refused(err)) = verdict {
                    return Err((err, false));
                }
                let transient = is_transient(&e);
                let message = format!(
                    "handshake with {}:{} failed: {e}",
                    endpoint.address, endpoint.port
                );
                let err = if transient {
                    unreachable(message)
                } else {
                    Error::Protocol {
                        host: host.clone(),
                        message,
                    }
                };
                return Err((err, transient));
            }
            Ok(Ok(Ok(handle))) => handle,
        };
        let accepted_host_key = match verdict {
            Some(Verdict::AcceptedNew { fingerprint, line }) => Some((fingerprint, line)),
            _ => None,
        };
        match tokio::time::timeout_at(
            deadline,
            authenticate(&mut handle, config, credentials, &host),
        )
        .await
        {
            Ok(r) => r.map_err(|e| (e, false))?,
            Err(_) => {
                let reason = format!(
                    "{}:{} did not finish authentication within {:?} (connect, key exchange and authentication share connectTimeout)",
                    endpoint.address, endpoint.port, config.connect_timeout
                );
                return Err((unreachable(reason), false));
            }
        }
        Ok(Session {
            handle: Some(handle),
            endpoint: endpoint.clone(),
            config: config.clone(),
            jump,
            accepted_host_key,
        })
    }

    /// Connects to the configured jump host (verified like any host).
    pub async fn connect_jump(
        config: Arc<ClientConfig>,
        credentials: Arc<Credentials>,
    ) -> Result<Option<Arc<Session>>, Error> {
        let Some(j) = config.jump_host.clone() else {
            return Ok(None);
        };
        let mut jump_config = (*config).clone();
        jump_config.user = j.user.clone();
        jump_config.jump_host = None;
        let endpoint = Endpoint::new(format!("jump host {}", j.address), j.address, j.port);
        let session = Self::connect(Arc::new(jump_config), credentials, &endpoint, None).await?;
        Ok(Some(Arc::new(session)))
    }

    /// Whether the connection is gone (peer closed, keepalive gave up): a kept-open
    /// session is reconnected rather than used.
    pub fn is_closed(&self) -> bool {
        self.handle().is_closed()
    }

    pub(crate) fn handle(&self) -> &Handle<Verifier> {
        // taken only by close(self) and drop, after which no &self exists
        self.handle.as_ref().expect("a live session has its handle")
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Closes the connection politely: sends SSH_MSG_DISCONNECT and waits (at most
    /// [`CLOSE_WAIT`]) until the connection task has written it and ended.
    pub async fn close(mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        let jump = self.jump.take();
        disconnect(handle).await;
        drop(jump);
    }
}

/// Sends SSH_MSG_DISCONNECT and waits (bounded) for the connection task to flush it and end.
async fn disconnect(mut handle: Handle<Verifier>) {
    if handle.is_closed() {
        return;
    }
    if handle
        .disconnect(russh::Disconnect::ByApplication, "", "en")
        .await
        .is_ok()
    {
        let _ = tokio::time::timeout(CLOSE_WAIT, &mut handle).await;
    }
}

impl Drop for Session {
    /// A session dropped without [`Session::close`] still says goodbye (see [`Session`]): from a
    /// task on the current runtime, which keeps the jump host session alive until it is done.
    fn drop(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        if handle.is_closed() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let jump = self.jump.take();
        runtime.spawn(async move {
            disconnect(handle).await;
            drop(jump);
        });
    }
}

async fn authenticate(
    handle: &mut Handle<Verifier>,
    config: &ClientConfig,
    credentials: &Credentials,
    host: &str,
) -> Result<(), Error> {
    let auth_failed = |reason: String| Error::AuthFailed {
        host: host.to_string(),
        user: config.user.clone(),
        reason,
    };
    let hash = if credentials.key.algorithm().is_rsa() {
        // OpenSSH >= 8.8 refuses SHA-1 RSA signatures: ask the server, never fall back silently.
        match handle.best_supported_rsa_hash().await {
            Ok(Some(Some(alg))) => Some(alg),
            Ok(Some(None)) => {
                return Err(auth_failed(
                    "the server accepts only SHA-1 (ssh-rsa) RSA signatures, which are refused as insecure; \
                     use an ed25519 or ECDSA key"
                        .into(),
                ));
            }
            Ok(None) | Err(_) => Some(HashAlg::Sha256),
        }
    } else {
        None
    };
    let key = PrivateKeyWithHashAlg::new(credentials.key.clone(), hash);
    match handle.authenticate_publickey(config.user.clone(), key).await {
        Ok(AuthResult::Success) => Ok(()),
        Ok(AuthResult::Failure { .. }) => Err(auth_failed(
            "the server rejected the key from the Secret's ssh-privatekey (is its public key in authorized_keys?)".into(),
        )),
        Err(e) => Err(auth_failed(format!("protocol error during authentication: {e}"))),
    }
}
