//! Kept-open SSH connections, one per host, across rounds: a round costs each host one
//! exec channel, not a handshake. A connection that died since the last round is
//! reopened once at once; a host that cannot be reached is retried with jittered
//! exponential backoff (not every round, and not all at the same moment), and until then
//! its checks are `Unknown` with the last reason.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::backoff::Backoff;
use crate::ssh::{Command, Endpoint, Error, Fleet, Session};

/// Reconnect attempts to an unreachable host: 5 s, 10 s, … up to 5 minutes apart.
pub const RECONNECT: Backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(300));

#[derive(Default)]
struct Conn {
    session: Option<Arc<Session>>,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: String,
}

/// What one host's round gave.
#[derive(Debug)]
pub struct HostRun {
    pub host: Endpoint,
    /// The script's stdout, or why there is none.
    pub output: Result<String, String>,
    /// Time from the start of this host's turn to the end of its script.
    pub latency: Duration,
    /// Under `AcceptNew`: the fingerprint and known_hosts line of a key trusted on first
    /// use by a connection opened this round.
    pub accepted_host_key: Option<(String, String)>,
}

/// The connections of one HealthCheck.
pub struct Pool {
    fleet: Fleet,
    conns: HashMap<String, Conn>,
    handshakes: u64,
}

impl Pool {
    pub fn new(fleet: Fleet) -> Self {
        Self {
            fleet,
            conns: HashMap::new(),
            handshakes: 0,
        }
    }

    /// Connections opened so far (a steady state opens none).
    pub fn handshakes(&self) -> u64 {
        self.handshakes
    }

    /// Open connections.
    pub fn open(&self) -> usize {
        self.conns
            .values()
            .filter(|c| c.session.as_ref().is_some_and(|s| !s.is_closed()))
            .count()
    }

    /// Runs `script` on every host, `concurrency` at a time, each within `deadline`
    /// (connecting included). Hosts no longer listed lose their connection.
    pub async fn run(
        &mut self,
        hosts: &[Endpoint],
        concurrency: usize,
        script: &str,
        output_max: usize,
        deadline: Duration,
    ) -> Vec<HostRun> {
        let mut conns = std::mem::take(&mut self.conns);
        let work: Vec<(Endpoint, Conn)> = hosts
            .iter()
            .map(|h| {
                let c = conns.remove(&h.name).unwrap_or_default();
                (h.clone(), c)
            })
            .collect();
        // what is left belongs to hosts that are gone: closed when dropped
        drop(conns);
        let fleet = self.fleet.clone();
        let script: Arc<str> = Arc::from(script);
        let results: Vec<(HostRun, Conn, u64)> = futures::stream::iter(work)
            .map(move |(host, conn)| {
                let fleet = fleet.clone();
                let script = script.clone();
                async move { one_host(&fleet, host, conn, &script, output_max, deadline).await }
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        let mut runs = Vec::with_capacity(results.len());
        for (run, conn, handshakes) in results {
            self.handshakes += handshakes;
            self.conns.insert(run.host.name.clone(), conn);
            runs.push(run);
        }
        runs
    }

    /// Closes every connection (the HealthCheck is gone or its credentials changed).
    pub async fn close(&mut self) {
        for (_, c) in self.conns.drain() {
            if let Some(s) = c.session
                && let Ok(s) = Arc::try_unwrap(s)
            {
                s.close().await;
            }
        }
    }
}

async fn one_host(
    fleet: &Fleet,
    host: Endpoint,
    mut conn: Conn,
    script: &str,
    output_max: usize,
    deadline: Duration,
) -> (HostRun, Conn, u64) {
    let started = Instant::now();
    let mut handshakes = 0;
    let mut accepted = None;
    let cmd = Command::script(script)
        .timeout(deadline)
        .capture(output_max, 0);
    let work = async {
        if conn.session.as_ref().is_some_and(|s| s.is_closed()) {
            conn.session = None;
        }
        let mut reused = conn.session.is_some();
        loop {
            let session = match &conn.session {
                Some(s) => s.clone(),
                None => {
                    if let Some(at) = conn.retry_at
                        && Instant::now() < at
                    {
                        return Err(format!(
                            "{} (next attempt in {}s)",
                            conn.last_error,
                            at.saturating_duration_since(Instant::now())
                                .as_secs()
                                .max(1)
                        ));
                    }
                    handshakes += 1;
                    match fleet.connect(&host).await {
                        Ok(s) => {
                            accepted = s.accepted_host_key.clone();
                            conn.failures = 0;
                            conn.retry_at = None;
                            let s = Arc::new(s);
                            conn.session = Some(s.clone());
                            s
                        }
                        Err(e) => {
                            conn.last_error = e.to_string();
                            conn.retry_at = Some(Instant::now() + RECONNECT.delay(conn.failures));
                            conn.failures = conn.failures.saturating_add(1);
                            return Err(conn.last_error.clone());
                        }
                    }
                }
            };
            match session.exec(&cmd).await {
                Ok(out) => return Ok(out.stdout.to_string_lossy()),
                // a kept connection that broke since the last round: reopen once, now
                Err(Error::Protocol { .. } | Error::Unreachable { .. }) if reused => {
                    conn.session = None;
                    reused = false;
                }
                Err(e) => {
                    if matches!(e, Error::Protocol { .. } | Error::Unreachable { .. }) {
                        conn.session = None;
                    }
                    return Err(e.to_string());
                }
            }
        }
    };
    // connect + exec under one deadline (a host stalling mid-handshake holds no slot forever)
    let limit = deadline.saturating_add(Duration::from_secs(2));
    let output = match tokio::time::timeout(limit, work).await {
        Ok(r) => r,
        Err(_) => {
            conn.session = None;
            Err(format!(
                "{}: no answer within {}s",
                host.name,
                limit.as_secs()
            ))
        }
    };
    let run = HostRun {
        host,
        output,
        latency: started.elapsed(),
        accepted_host_key: accepted,
    };
    (run, conn, handshakes)
}
