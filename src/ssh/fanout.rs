//! One action on many hosts: bounded concurrency, a separate (smaller) bound on concurrent
//! handshakes — they cost the server far more CPU than the commands, and a stock sshd
//! drops handshakes past `MaxStartups` — an overall deadline, and results yielded as each
//! host finishes. Dropping the stream cancels the run and closes every connection.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::{Mutex, Semaphore};

use super::client::{Credentials, Session};
use super::{ClientConfig, Endpoint, Error};

/// The outcome for one host.
#[derive(Debug)]
pub struct HostResult<T> {
    pub endpoint: Endpoint,
    pub result: Result<T, Error>,
    /// Under `AcceptNew`: `(fingerprint, known_hosts line)` of a key trusted on first use.
    pub accepted_host_key: Option<(String, String)>,
}

/// Shared settings and credentials for running actions across hosts.
#[derive(Clone)]
pub struct Fleet {
    config: Arc<ClientConfig>,
    credentials: Arc<Credentials>,
    /// Hosts in flight at once.
    pub concurrency: usize,
    /// Handshakes in flight at once for this fleet.
    pub handshakes: usize,
    handshake_permits: Arc<Semaphore>,
    /// Handshakes in flight at once across every fleet of the process (the controller
    /// shares one: a hundred Inventories must not open 1,600 handshakes together).
    shared_handshakes: Option<Arc<Semaphore>>,
    /// Hosts in flight at once through one jump host.
    pub per_jump_host: usize,
    jump: Arc<Mutex<JumpState>>,
}

/// Retry timing of a jump host that failed: 1 s doubling to 60 s.
pub const JUMP_RETRY: crate::backoff::Backoff =
    crate::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(60));

/// The fleet's jump host connection: kept while it lives, reopened when it died; after a
/// failure, callers within the backoff get that failure instead of each dialling again.
#[derive(Default)]
struct JumpState {
    session: Option<Arc<Session>>,
    failures: u32,
    /// The last failure and when the next dial may be tried.
    last_error: Option<(tokio::time::Instant, Error)>,
}

impl Fleet {
    pub fn new(config: ClientConfig, credentials: Credentials) -> Self {
        Self {
            config: Arc::new(config),
            credentials: Arc::new(credentials),
            concurrency: 50,
            handshakes: 16,
            handshake_permits: Arc::new(Semaphore::new(16)),
            shared_handshakes: None,
            per_jump_host: 32,
            jump: Arc::new(Mutex::new(JumpState::default())),
        }
    }

    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    pub fn with_handshakes(mut self, handshakes: usize) -> Self {
        self.handshakes = handshakes.max(1);
        self.handshake_permits = Arc::new(Semaphore::new(self.handshakes));
        self
    }

    /// Also holds a permit of `limit` (shared with other fleets) during every handshake.
    pub fn with_shared_handshakes(mut self, limit: Arc<Semaphore>) -> Self {
        self.shared_handshakes = Some(limit);
        self
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// The shared jump host connection. Single-flight: one caller dials while the others
    /// wait on the lock and then share its result. Only a live session is kept; a failure
    /// is answered from memory until its backoff (see [`JUMP_RETRY`]) has passed.
    async fn jump(&self) -> Result<Option<Arc<Session>>, Error> {
        if self.config.jump_host.is_none() {
            return Ok(None);
        }
        let mut state = self.jump.lock().await;
        if let Some(s) = &state.session
            && !s.is_closed()
        {
            return Ok(Some(s.clone()));
        }
        state.session = None;
        if let Some((retry_at, e)) = &state.last_error
            && tokio::time::Instant::now() < *retry_at
        {
            return Err(e.clone());
        }
        match Session::connect_jump(self.config.clone(), self.credentials.clone()).await {
            Ok(session) => {
                state.session = session.clone();
                state.failures = 0;
                state.last_error = None;
                Ok(session)
            }
            Err(e) => {
                let retry_at = crate::deadline::from_now(JUMP_RETRY.delay(state.failures));
                state.failures = state.failures.saturating_add(1);
                state.last_error = Some((retry_at, e.clone()));
                Err(e)
            }
        }
    }

    /// Connects to one host (through the jump host if configured), holding a handshake
    /// permit of this fleet (and of the process, when shared) while it does.
    pub async fn connect(&self, endpoint: &Endpoint) -> Result<Session, Error> {
        let _mine = self.handshake_permits.acquire().await;
        let _shared = match &self.shared_handshakes {
            Some(s) => Some(s.acquire().await),
            None => None,
        };
        let jump = self.jump().await.map_err(|e| Error::Unreachable {
            host: endpoint.name.clone(),
            reason: format!("via jump host: {e}"),
        })?;
        Session::connect(
            self.config.clone(),
            self.credentials.clone(),
            endpoint,
            jump,
        )
        .await
    }

    /// Runs `action` on every host's session and yields results in completion order.
    /// Hosts not finished by `deadline` yield [`Error::TimedOut`].
    pub fn run<T, F, Fut>(
        &self,
        endpoints: Vec<Endpoint>,
        deadline: Duration,
        action: F,
    ) -> impl Stream<Item = HostResult<T>> + Send + 'static
    where
        T: Send + 'static,
        F: Fn(Arc<Session>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<T, Error>> + Send + 'static,
    {
        let fleet = self.clone();
        let until = crate::deadline::from_now(deadline);
        let limit = if self.config.jump_host.is_some() {
            self.concurrency.min(self.per_jump_host)
        } else {
            self.concurrency
        };
        futures::stream::iter(endpoints)
            .map(move |endpoint| {
                let fleet = fleet.clone();
                let action = action.clone();
                async move {
                    let mut accepted_host_key = None;
                    let mut opened = None;
                    let work = async {
                        let session = Arc::new(fleet.connect(&endpoint).await?);
                        accepted_host_key = session.accepted_host_key.clone();
                        opened = Some(session.clone());
                        action(session).await
                    };
                    let (result, in_time) = match tokio::time::timeout_at(until, work).await {
                        Ok(r) => (r, true),
                        Err(_) => (
                            Err(Error::TimedOut {
                                host: endpoint.name.clone(),
                                after: deadline,
                                output: String::new(),
                            }),
                            false,
                        ),
                    };
                    // Disconnect before the result is yielded (a CLI may exit right after the
                    // last one). Past the deadline, or when the action still holds the session,
                    // dropping it says goodbye without waiting (see Session).
                    if in_time
                        && let Some(session) = opened
                        && let Ok(session) = Arc::try_unwrap(session)
                    {
                        session.close().await;
                    }
                    HostResult {
                        endpoint,
                        result,
                        accepted_host_key,
                    }
                }
            })
            .buffer_unordered(limit)
    }
}
