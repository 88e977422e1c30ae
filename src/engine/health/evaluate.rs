//! What results mean over time: per target and check, consecutive results before a state
//! flips (`failureThreshold` / `successThreshold`, like Nagios' soft and hard states),
//! the learned baseline on top of Healthy, maintenance freezing both, and the view the
//! controller writes to status: counts per target, the non-healthy results, and a digest
//! that changes only when a state does (so status is not rewritten every round).

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::time::SystemTime;

use super::baseline::{self, Baselines, Settings, Unit, Verdict};
use super::{Observation, Outcome};
use crate::api::health_check::Baseline;

/// The state of one check on one target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    /// Not enough results yet to say anything (a fresh target, or a fresh controller).
    Pending,
    Healthy,
    /// Healthy, but beyond its learned baseline for 3 rounds in a row.
    Anomalous,
    Unknown,
    Unhealthy,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "Pending",
            State::Healthy => "Healthy",
            State::Anomalous => "Anomalous",
            State::Unknown => "Unknown",
            State::Unhealthy => "Unhealthy",
        }
    }

    /// Worse states sort last: a target is as bad as its worst check.
    fn severity(self) -> u8 {
        match self {
            State::Healthy => 0,
            State::Anomalous => 1,
            State::Pending => 2,
            State::Unknown => 3,
            State::Unhealthy => 4,
        }
    }
}

/// The spec's evaluation settings.
#[derive(Clone, Debug)]
pub struct Policy {
    pub failure_threshold: u32,
    pub success_threshold: u32,
    pub baseline: Option<Baseline>,
}

/// One target and check as tracked across rounds.
#[derive(Clone, Debug)]
pub struct Tracked {
    pub state: State,
    /// When `state` was entered.
    pub since: SystemTime,
    /// Consecutive passes / non-passes.
    good: u32,
    bad: u32,
    pub last: Observation,
    /// The learned mean the last value was judged against, when Anomalous.
    pub baseline: Option<f64>,
    /// Whether the target is a host (checks over SSH) rather than an endpoint.
    pub host: bool,
}

/// Which target and check a result is for.
#[derive(Clone, Copy, Debug)]
pub struct Subject<'a> {
    pub target: &'a str,
    pub check: &'a str,
    /// A host (checks over SSH) rather than an endpoint.
    pub host: bool,
    /// The value's unit, for the baseline; `None` when the value is not a level.
    pub unit: Option<Unit>,
}

/// A state change, for Events, metrics and remediation.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    pub target: String,
    pub check: String,
    pub from: State,
    pub to: State,
    pub host: bool,
    pub message: String,
}

/// Targets per state (a target counts once, in its worst check's state).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Summary {
    pub healthy: u32,
    pub unhealthy: u32,
    pub unknown: u32,
    pub anomalous: u32,
}

/// Every tracked result of one HealthCheck, and its baselines.
#[derive(Debug)]
pub struct Evaluator {
    policy: Policy,
    tracked: BTreeMap<(String, String), Tracked>,
    baselines: Baselines,
}

impl Evaluator {
    pub fn new(policy: Policy, baselines: Baselines) -> Self {
        Self {
            policy,
            tracked: BTreeMap::new(),
            baselines,
        }
    }

    /// Seeds a state known from before (status after a controller restart), so a target
    /// that was Unhealthy stays so without a second Event.
    pub fn seed(&mut self, target: &str, check: &str, host: bool, state: State, since: SystemTime) {
        let threshold = match state {
            State::Healthy | State::Anomalous => 0,
            _ => self.policy.failure_threshold,
        };
        self.tracked.insert(
            (target.to_string(), check.to_string()),
            Tracked {
                state,
                since,
                good: 0,
                bad: threshold,
                last: Observation::unknown("restored from status; not probed yet"),
                baseline: None,
                host,
            },
        );
    }

    /// Records one result. In maintenance the result is kept (and shown) but neither the
    /// state, the counters nor the baseline move.
    pub fn observe(
        &mut self,
        now: SystemTime,
        maintenance: bool,
        subject: Subject<'_>,
        mut obs: Observation,
    ) -> Option<Transition> {
        let Subject {
            target,
            check,
            host,
            unit,
        } = subject;
        let key = (target.to_string(), check.to_string());
        let t = self.tracked.entry(key).or_insert_with(|| Tracked {
            state: State::Pending,
            since: now,
            good: 0,
            bad: 0,
            last: obs.clone(),
            baseline: None,
            host,
        });
        t.host = host;
        if maintenance {
            t.last = obs;
            return None;
        }
        match obs.outcome {
            Outcome::Pass => {
                t.good = t.good.saturating_add(1);
                t.bad = 0;
            }
            Outcome::Fail | Outcome::Unknown => {
                t.bad = t.bad.saturating_add(1);
                t.good = 0;
            }
        }
        let failing_for_long = t.bad >= self.policy.failure_threshold.max(1);
        let mut next = match (t.state, obs.outcome) {
            (_, Outcome::Fail) if failing_for_long => State::Unhealthy,
            (_, Outcome::Unknown) if failing_for_long => State::Unknown,
            // a fresh target that passes is Healthy at once: there is nothing to recover from
            (State::Pending, Outcome::Pass) => State::Healthy,
            (State::Unhealthy | State::Unknown, Outcome::Pass)
                if t.good >= self.policy.success_threshold.max(1) =>
            {
                State::Healthy
            }
            (State::Anomalous, Outcome::Pass) => State::Healthy,
            (s, _) => s,
        };
        // the baseline: judged only while Healthy and passing; learned only then too
        t.baseline = None;
        if let (Some(unit), Some(value), Some(b)) = (unit, obs.value, &self.policy.baseline)
            && b.enabled
        {
            let series = self
                .baselines
                .entry(baseline::key(target, check))
                .or_default();
            let healthy = next == State::Healthy && obs.outcome == Outcome::Pass;
            if healthy {
                let verdict = series.observe(value, &Settings::new(b, unit), true);
                if let Verdict::Anomalous {
                    baseline,
                    deviations,
                } = verdict
                {
                    next = State::Anomalous;
                    t.baseline = Some(baseline);
                    let side = if deviations >= 0.0 { "above" } else { "below" };
                    obs.message = crate::text::clip(
                        format!(
                            "{}; {:.1}σ {side} the baseline {baseline:.2}",
                            obs.message,
                            deviations.abs()
                        ),
                        super::MAX_MESSAGE,
                    );
                }
            }
        }
        t.last = obs;
        if next == t.state {
            return None;
        }
        let from = t.state;
        t.state = next;
        t.since = now;
        // the first verdict on a fresh target is news only when it is bad
        if from == State::Pending && next == State::Healthy {
            return None;
        }
        Some(Transition {
            target: target.to_string(),
            check: check.to_string(),
            from,
            to: next,
            host,
            message: t.last.message.clone(),
        })
    }

    /// Forgets targets and checks no longer in the spec or the inventory.
    pub fn retain(&mut self, keep: impl Fn(&str, &str) -> bool) {
        self.tracked.retain(|(t, c), _| keep(t, c));
        self.baselines
            .retain(|k, _| k.split_once('/').is_some_and(|(t, c)| keep(t, c)));
    }

    pub fn tracked(&self) -> impl Iterator<Item = (&str, &str, &Tracked)> {
        self.tracked
            .iter()
            .map(|((t, c), v)| (t.as_str(), c.as_str(), v))
    }

    /// The state of one target and check (Pending when never seen).
    pub fn state(&self, target: &str, check: &str) -> State {
        self.tracked
            .get(&(target.to_string(), check.to_string()))
            .map_or(State::Pending, |t| t.state)
    }

    pub fn baselines(&self) -> &Baselines {
        &self.baselines
    }

    /// Each target once, in its worst check's state (Pending counts as Unknown). A host and an
    /// endpoint that share a name are two targets.
    pub fn summary(&self) -> Summary {
        let mut worst: BTreeMap<(bool, &str), State> = BTreeMap::new();
        for ((target, _), t) in &self.tracked {
            let w = worst.entry((t.host, target)).or_insert(State::Healthy);
            if t.state.severity() > w.severity() {
                *w = t.state;
            }
        }
        let mut s = Summary::default();
        for state in worst.values() {
            match state {
                State::Healthy => s.healthy += 1,
                State::Anomalous => s.anomalous += 1,
                State::Unhealthy => s.unhealthy += 1,
                State::Pending | State::Unknown => s.unknown += 1,
            }
        }
        s
    }

    /// The results that are not Healthy, worst first, at most `cap`.
    pub fn problems(&self, cap: usize) -> Vec<(&str, &str, &Tracked)> {
        let mut v: Vec<_> = self
            .tracked()
            .filter(|(_, _, t)| t.state != State::Healthy)
            .collect();
        v.sort_by(|a, b| {
            b.2.state
                .severity()
                .cmp(&a.2.state.severity())
                .then_with(|| (a.0, a.1).cmp(&(b.0, b.1)))
        });
        v.truncate(cap);
        v
    }

    /// Hosts with an Unhealthy host check: what remediation acts on.
    pub fn unhealthy_hosts(&self) -> BTreeSet<&str> {
        self.tracked()
            .filter(|(_, _, t)| t.host && t.state == State::Unhealthy)
            .map(|(target, _, _)| target)
            .collect()
    }

    /// Changes whenever a state, its `since` or the set of tracked results does, and not
    /// when only values or messages do: the controller writes status when this changes.
    pub fn digest(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for ((target, check), t) in &self.tracked {
            (target, check, t.state).hash(&mut h);
            if t.state != State::Healthy {
                t.since.hash(&mut h);
            }
        }
        h.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn policy(fail: u32, ok: u32) -> Policy {
        Policy {
            failure_threshold: fail,
            success_threshold: ok,
            baseline: None,
        }
    }

    fn at(round: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + round * 30)
    }

    fn subject(unit: Option<Unit>) -> Subject<'static> {
        Subject {
            target: "web-1",
            check: "disk",
            host: true,
            unit,
        }
    }

    fn feed(e: &mut Evaluator, round: u64, outcome: Outcome) -> Option<Transition> {
        let obs = match outcome {
            Outcome::Pass => Observation::pass("ok"),
            Outcome::Fail => Observation::fail("/ is 93% used (limit 85%)"),
            Outcome::Unknown => Observation::unknown("unreachable"),
        };
        e.observe(at(round), false, subject(None), obs)
    }

    fn state(e: &Evaluator) -> State {
        e.tracked().next().map(|t| t.2.state).expect("tracked")
    }

    #[test]
    fn a_target_flips_only_after_the_thresholds_and_records_since() {
        let mut e = Evaluator::new(policy(3, 2), Baselines::new());
        assert_eq!(
            feed(&mut e, 0, Outcome::Pass),
            None,
            "Pending→Healthy is silent"
        );
        assert_eq!(state(&e), State::Healthy);
        assert_eq!(feed(&mut e, 1, Outcome::Fail), None);
        assert_eq!(feed(&mut e, 2, Outcome::Fail), None);
        assert_eq!(
            state(&e),
            State::Healthy,
            "two failures are below the threshold"
        );
        let t = feed(&mut e, 3, Outcome::Fail).expect("third failure flips");
        assert_eq!((t.from, t.to), (State::Healthy, State::Unhealthy));
        assert_eq!(t.message, "/ is 93% used (limit 85%)");
        assert_eq!(e.tracked().next().map(|t| t.2.since), Some(at(3)));
        assert_eq!(
            feed(&mut e, 4, Outcome::Fail),
            None,
            "no repeated transition"
        );
        assert_eq!(
            feed(&mut e, 5, Outcome::Pass),
            None,
            "one pass is below successThreshold"
        );
        assert_eq!(
            feed(&mut e, 6, Outcome::Fail),
            None,
            "a failure resets the passes"
        );
        assert_eq!(feed(&mut e, 7, Outcome::Pass), None);
        let t = feed(&mut e, 8, Outcome::Pass).expect("two passes recover");
        assert_eq!((t.from, t.to), (State::Unhealthy, State::Healthy));
        assert_eq!(e.unhealthy_hosts().len(), 0);
    }

    #[test]
    fn a_flapping_target_below_the_threshold_never_changes_state() {
        let mut e = Evaluator::new(policy(3, 1), Baselines::new());
        for r in 0..100 {
            let o = if r % 3 == 2 {
                Outcome::Pass
            } else {
                Outcome::Fail
            };
            let t = feed(&mut e, r, o);
            assert!(t.is_none() || r < 2, "round {r}: {t:?}");
        }
    }

    #[test]
    fn unreachable_is_unknown_and_the_latest_outcome_names_the_state() {
        let mut e = Evaluator::new(policy(2, 1), Baselines::new());
        feed(&mut e, 0, Outcome::Unknown);
        let t = feed(&mut e, 1, Outcome::Unknown).expect("flips");
        assert_eq!((t.from, t.to), (State::Pending, State::Unknown));
        let t = feed(&mut e, 2, Outcome::Fail).expect("a failure among them");
        assert_eq!(t.to, State::Unhealthy);
        assert_eq!(e.summary().unhealthy, 1);
    }

    #[test]
    fn a_host_and_an_endpoint_with_the_same_name_are_two_targets() {
        let mut e = Evaluator::new(policy(1, 1), Baselines::new());
        let host = Subject {
            target: "web-1",
            check: "disk",
            host: true,
            unit: None,
        };
        let endpoint = Subject {
            target: "web-1",
            check: "http",
            host: false,
            unit: None,
        };
        e.observe(at(0), false, host, Observation::pass("ok"));
        e.observe(
            at(0),
            false,
            endpoint,
            Observation::fail("connection refused"),
        );
        let s = e.summary();
        assert_eq!((s.healthy, s.unhealthy), (1, 1), "{s:?}");
    }

    #[test]
    fn maintenance_keeps_the_state_and_the_counters() {
        let mut e = Evaluator::new(policy(2, 1), Baselines::new());
        feed(&mut e, 0, Outcome::Pass);
        for r in 1..10 {
            let t = e.observe(at(r), true, subject(None), Observation::fail("x"));
            assert_eq!(t, None);
        }
        assert_eq!(state(&e), State::Healthy);
        assert_eq!(
            feed(&mut e, 10, Outcome::Fail),
            None,
            "maintenance failures did not count"
        );
    }

    #[test]
    fn a_level_shift_is_anomalous_and_learning_stops_while_failing() {
        let mut p = policy(3, 1);
        p.baseline = Some(Baseline {
            enabled: true,
            sensitivity: 3.0,
            warmup: 20,
        });
        let mut e = Evaluator::new(p, Baselines::new());
        let obs = |e: &mut Evaluator, r: u64, v: f64, outcome: Outcome| {
            let o = Observation {
                outcome,
                value: Some(v),
                threshold: Some(85.0),
                latency: Duration::ZERO,
                message: format!("{v}%"),
            };
            e.observe(at(r), false, subject(Some(Unit::Percent)), o)
        };
        for r in 0..60 {
            let noise = if r % 2 == 0 { 0.5 } else { -0.5 };
            assert_eq!(
                obs(&mut e, r, 40.0 + noise, Outcome::Pass),
                None,
                "round {r}"
            );
        }
        let learned = e
            .baselines()
            .values()
            .next()
            .map(baseline::Series::mean)
            .expect("series");
        assert_eq!(obs(&mut e, 60, 70.0, Outcome::Pass), None);
        assert_eq!(obs(&mut e, 61, 70.0, Outcome::Pass), None);
        let t = obs(&mut e, 62, 70.0, Outcome::Pass).expect("third round outside");
        assert_eq!(t.to, State::Anomalous);
        assert!(t.message.starts_with("70%; "), "{}", t.message);
        assert!(
            t.message.contains("σ above the baseline 39.99"),
            "{}",
            t.message
        );
        assert_eq!(e.summary().anomalous, 1);
        // failing values are not learned
        for r in 63..70 {
            obs(&mut e, r, 99.0, Outcome::Fail);
        }
        let after = e
            .baselines()
            .values()
            .next()
            .map(baseline::Series::mean)
            .expect("series");
        assert!((after - learned).abs() < 15.0, "{learned} → {after}");
    }

    #[test]
    fn the_digest_ignores_values_but_not_states() {
        let mut e = Evaluator::new(policy(1, 1), Baselines::new());
        feed(&mut e, 0, Outcome::Pass);
        let d0 = e.digest();
        e.observe(
            at(1),
            false,
            subject(None),
            Observation::pass("other").value(3.0, None),
        );
        assert_eq!(e.digest(), d0);
        feed(&mut e, 2, Outcome::Fail);
        assert_ne!(e.digest(), d0);
    }

    #[test]
    fn seeded_states_survive_a_restart_without_a_new_transition() {
        let mut e = Evaluator::new(policy(3, 1), Baselines::new());
        e.seed("web-1", "disk", true, State::Unhealthy, at(0));
        assert_eq!(feed(&mut e, 1, Outcome::Fail), None);
        assert_eq!(
            e.unhealthy_hosts().into_iter().collect::<Vec<_>>(),
            vec!["web-1"]
        );
        e.retain(|t, _| t != "web-1");
        assert_eq!(e.summary(), Summary::default());
    }
}
