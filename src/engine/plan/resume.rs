//! What a run has done so far, small enough to live in a status for 5,000 hosts: host sets
//! are stored as index ranges (`"0-4999"`), and only hosts mid-way keep a stage count. The
//! controller folds every [`PlanEvent`] into it with [`ResumeState::record`], persists it,
//! and passes it back to [`super::run_plan`] after a restart, which then re-runs no
//! host/stage it lists as done.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{HostState, PlanEvent};

/// A set of host indices, written as sorted ranges: `"0-4,7,9-12"`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostSet(BTreeSet<u32>);

impl HostSet {
    pub fn contains(&self, index: usize) -> bool {
        u32::try_from(index).is_ok_and(|i| self.0.contains(&i))
    }
    pub fn insert(&mut self, index: usize) {
        if let Ok(i) = u32::try_from(index) {
            self.0.insert(i);
        }
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().map(|&i| i as usize)
    }
}

impl fmt::Display for HostSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut iter = self.0.iter().copied().peekable();
        let mut first = true;
        while let Some(start) = iter.next() {
            let mut end = start;
            while iter.peek() == Some(&(end + 1)) {
                end += 1;
                iter.next();
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        Ok(())
    }
}

/// A host set string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid host set {0:?}: expected ranges like \"0-4,7\"")]
pub struct BadHostSet(String);

/// Refuses ranges that would allocate absurd amounts: no fleet has this many hosts.
const MAX_HOSTS: u32 = 1_000_000;

impl FromStr for HostSet {
    type Err = BadHostSet;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadHostSet(s.to_string());
        let mut set = BTreeSet::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let a: u32 = a.trim().parse().map_err(|_| bad())?;
            let b: u32 = b.trim().parse().map_err(|_| bad())?;
            if a > b || b >= MAX_HOSTS {
                return Err(bad());
            }
            set.extend(a..=b);
        }
        Ok(HostSet(set))
    }
}

impl TryFrom<String> for HostSet {
    type Error = BadHostSet;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<HostSet> for String {
    fn from(s: HostSet) -> String {
        s.to_string()
    }
}

impl FromIterator<usize> for HostSet {
    fn from_iter<I: IntoIterator<Item = usize>>(iter: I) -> Self {
        let mut s = HostSet::default();
        for i in iter {
            s.insert(i);
        }
        s
    }
}

/// Progress of a run, by host index into the run's host list (the controller must start a
/// new run, not resume, when that list changes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResumeState {
    /// Hosts that completed every stage.
    #[serde(default, skip_serializing_if = "HostSet::is_empty")]
    pub done: HostSet,
    /// Hosts that failed (they count against the budget and are not run again).
    #[serde(default, skip_serializing_if = "HostSet::is_empty")]
    pub failed: HostSet,
    /// Of `failed`, those that never ran a stage (e.g. unreachable): nothing to roll back.
    #[serde(default, skip_serializing_if = "HostSet::is_empty")]
    pub failed_unstarted: HostSet,
    /// Hosts that started but did not finish: index -> stages completed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub partial: BTreeMap<u32, u32>,
    /// Indices of `runOnce` stages already run successfully.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub run_once_done: Vec<u32>,
    /// The budget was exceeded (or a runOnce stage failed): the run only rolls back now.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub budget_exceeded: bool,
    /// Hosts whose rollback finished (successfully or not).
    #[serde(default, skip_serializing_if = "HostSet::is_empty")]
    pub rolled_back: HostSet,
    /// Of `rolled_back`, those whose rollback failed.
    #[serde(default, skip_serializing_if = "HostSet::is_empty")]
    pub rollback_failed: HostSet,
}

impl ResumeState {
    /// Folds one event in. Events of a run, recorded in order, give the state to resume it.
    pub fn record(&mut self, event: &PlanEvent) {
        match event {
            PlanEvent::HostStageStarted {
                host,
                rollback: false,
                ..
            } if !self.done.contains(host.index) && !self.failed.contains(host.index) => {
                if let Ok(i) = u32::try_from(host.index) {
                    self.partial.entry(i).or_insert(0);
                }
            }
            PlanEvent::HostStageFinished {
                host,
                stage_index,
                result: Ok(_),
                rollback: false,
                run_once,
                ..
            } => {
                let (Ok(i), Ok(s)) = (u32::try_from(host.index), u32::try_from(*stage_index))
                else {
                    return;
                };
                let done = self.partial.entry(i).or_insert(0);
                *done = (*done).max(s + 1);
                if *run_once && !self.run_once_done.contains(&s) {
                    self.run_once_done.push(s);
                }
            }
            PlanEvent::HostFinished {
                host,
                result,
                started,
                ..
            } => match result {
                HostState::Succeeded => {
                    self.partial.remove(&(host.index as u32));
                    self.done.insert(host.index);
                }
                HostState::Failed => {
                    self.partial.remove(&(host.index as u32));
                    self.failed.insert(host.index);
                    if !started {
                        self.failed_unstarted.insert(host.index);
                    }
                }
                HostState::Aborted | HostState::Pending => {}
            },
            PlanEvent::BudgetExceeded { .. } | PlanEvent::RunOnceFailed { .. } => {
                self.budget_exceeded = true;
            }
            PlanEvent::RollbackHostFinished { host, ok, .. } => {
                self.rolled_back.insert(host.index);
                if !ok {
                    self.rollback_failed.insert(host.index);
                }
            }
            _ => {}
        }
    }

    /// Stages host `index` completed before.
    pub fn stages_done(&self, index: usize) -> Option<usize> {
        u32::try_from(index)
            .ok()
            .and_then(|i| self.partial.get(&i))
            .map(|&n| n as usize)
    }

    /// Whether host `index` ran any stage before (it is rolled back if the run rolls back).
    pub fn started(&self, index: usize) -> bool {
        self.done.contains(index)
            || (self.failed.contains(index) && !self.failed_unstarted.contains(index))
            || self.stages_done(index).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_sets_serialize_as_compact_ranges() {
        let s: HostSet = [0, 1, 2, 3, 7, 9, 10].into_iter().collect();
        assert_eq!(s.to_string(), "0-3,7,9-10");
        assert_eq!("0-3,7,9-10".parse::<HostSet>(), Ok(s.clone()));
        let all: HostSet = (0..5000).collect();
        let state = ResumeState {
            done: all,
            ..Default::default()
        };
        let json = serde_json::to_string(&state).expect("json");
        assert_eq!(json, r#"{"done":"0-4999"}"#);
        assert_eq!(
            serde_json::from_str::<ResumeState>(&json).expect("parse"),
            state
        );
        assert!("3-1".parse::<HostSet>().is_err());
        assert!("x".parse::<HostSet>().is_err());
        assert!("0-4000000000".parse::<HostSet>().is_err());
    }
}
