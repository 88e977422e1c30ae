//! One round of a HealthCheck: the host script on every target host (over the kept-open
//! connections) and every endpoint probe, at the same time, then each result through the
//! [`Evaluator`]. The controller's task and `outrider check run` both drive a [`Checker`].

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use rand::Rng;

use super::endpoint::EndpointProbe;
use super::evaluate::{Evaluator, State, Subject, Transition};
use super::host::{HostChecks, SCRIPT_OUTPUT_MAX};
use super::pool::{HostRun, Pool};
use super::{Observation, Outcome};
use crate::ssh::Endpoint;

/// Endpoint probes of one HealthCheck in flight at once.
pub const ENDPOINT_CONCURRENCY: usize = 64;

/// One result of a round, for the table, metrics and Events.
#[derive(Clone, Debug)]
pub struct Probed {
    pub target: String,
    pub check: String,
    /// `disk`, `memory`, …, `http`, `tcp`, `tls`.
    pub kind: &'static str,
    pub host: bool,
    pub observation: Observation,
    /// The state after this round.
    pub state: State,
}

/// What a round found.
#[derive(Debug, Default)]
pub struct RoundReport {
    pub probed: Vec<Probed>,
    pub transitions: Vec<Transition>,
    /// Host keys trusted on first use this round: `(host, fingerprint, known_hosts line)`.
    pub accepted: Vec<(Endpoint, String, String)>,
    pub duration: Duration,
}

/// A HealthCheck's compiled probes, its connections and its evaluation state.
pub struct Checker {
    pub checks: HostChecks,
    pub endpoints: Vec<Arc<EndpointProbe>>,
    pub hosts: Vec<Endpoint>,
    /// Hosts worked on at once.
    pub concurrency: usize,
    pool: Option<Pool>,
    pub evaluator: Evaluator,
}

impl Checker {
    /// `pool` is required when there are host checks (and hosts).
    pub fn new(
        checks: HostChecks,
        endpoints: Vec<EndpointProbe>,
        hosts: Vec<Endpoint>,
        pool: Option<Pool>,
        evaluator: Evaluator,
    ) -> Self {
        let mut c = Self {
            checks,
            endpoints: endpoints.into_iter().map(Arc::new).collect(),
            hosts,
            concurrency: 50,
            pool,
            evaluator,
        };
        c.forget_removed();
        c
    }

    /// Drops tracked results of targets or checks that are no longer configured.
    fn forget_removed(&mut self) {
        let hosts: std::collections::HashSet<&str> =
            self.hosts.iter().map(|h| h.name.as_str()).collect();
        let checks: std::collections::HashSet<&str> =
            self.checks.checks.iter().map(|c| c.name.as_str()).collect();
        let endpoints: std::collections::HashSet<&str> =
            self.endpoints.iter().map(|e| e.name()).collect();
        self.evaluator.retain(|target, check| {
            (hosts.contains(target) && checks.contains(check))
                || (target == check && endpoints.contains(target))
        });
    }

    /// Connections opened so far.
    pub fn handshakes(&self) -> u64 {
        self.pool.as_ref().map_or(0, Pool::handshakes)
    }

    pub async fn close(&mut self) {
        if let Some(p) = &mut self.pool {
            p.close().await;
        }
    }

    /// Runs one round, bounded by `deadline` (the interval: rounds never overlap), and
    /// evaluates it at `now`. In maintenance results are reported but change no state.
    pub async fn round(&mut self, deadline: Duration, maintenance: bool) -> RoundReport {
        let started = Instant::now();
        let nonce = format!("{:016x}", rand::rng().random::<u64>());
        let host_part = async {
            match &mut self.pool {
                Some(pool) if !self.checks.is_empty() && !self.hosts.is_empty() => {
                    let script = self.checks.script(&nonce);
                    let per_host = self.checks.deadline().min(deadline);
                    pool.run(
                        &self.hosts,
                        self.concurrency,
                        &script,
                        SCRIPT_OUTPUT_MAX,
                        per_host,
                    )
                    .await
                }
                _ => Vec::new(),
            }
        };
        let probes: Vec<(usize, Arc<EndpointProbe>)> =
            self.endpoints.iter().cloned().enumerate().collect();
        let endpoint_part = futures::stream::iter(probes)
            .map(|(i, e)| async move { (i, e.probe().await) })
            .buffer_unordered(ENDPOINT_CONCURRENCY)
            .collect::<Vec<_>>();
        let (host_runs, mut endpoint_obs) = tokio::join!(host_part, endpoint_part);
        endpoint_obs.sort_by_key(|(i, _)| *i);

        let now = SystemTime::now();
        let mut report = RoundReport::default();
        for run in host_runs {
            self.host_results(run, &nonce, now, maintenance, &mut report);
        }
        for (i, obs) in endpoint_obs {
            let Some(e) = self.endpoints.get(i) else {
                continue;
            };
            let (name, kind) = (e.name().to_string(), e.kind());
            let unit = super::endpoint_unit(kind);
            let subject = Subject {
                target: &name,
                check: &name,
                host: false,
                unit,
            };
            let t = self
                .evaluator
                .observe(now, maintenance, subject, obs.clone());
            report.transitions.extend(t);
            report.probed.push(Probed {
                state: self.state_of(&name, &name),
                target: name.clone(),
                check: name,
                kind,
                host: false,
                observation: obs,
            });
        }
        report.duration = started.elapsed();
        report
    }

    fn host_results(
        &mut self,
        run: HostRun,
        nonce: &str,
        now: SystemTime,
        maintenance: bool,
        report: &mut RoundReport,
    ) {
        if let Some((fingerprint, line)) = run.accepted_host_key {
            report.accepted.push((run.host.clone(), fingerprint, line));
        }
        let observations: Vec<Observation> = match &run.output {
            Ok(out) => self.checks.parse(nonce, out, run.latency),
            Err(why) => self
                .checks
                .checks
                .iter()
                .map(|_| Observation::unknown(why.clone()).latency(run.latency))
                .collect(),
        };
        let checks = self.checks.checks.clone();
        for (check, obs) in checks.iter().zip(observations) {
            let subject = Subject {
                target: &run.host.name,
                check: &check.name,
                host: true,
                unit: check.unit(),
            };
            let t = self
                .evaluator
                .observe(now, maintenance, subject, obs.clone());
            report.transitions.extend(t);
            report.probed.push(Probed {
                state: self.state_of(&run.host.name, &check.name),
                target: run.host.name.clone(),
                check: check.name.clone(),
                kind: check.kind(),
                host: true,
                observation: obs,
            });
        }
    }

    fn state_of(&self, target: &str, check: &str) -> State {
        self.evaluator.state(target, check)
    }
}

impl RoundReport {
    /// Results per outcome: `(pass, fail, unknown)`.
    pub fn counts(&self) -> (usize, usize, usize) {
        let n = |o: Outcome| {
            self.probed
                .iter()
                .filter(|p| p.observation.outcome == o)
                .count()
        };
        (n(Outcome::Pass), n(Outcome::Fail), n(Outcome::Unknown))
    }
}
