//! A ruleset over a fleet: read every host, classify it against the compiled ruleset and the
//! digests recorded after earlier applies, then push to the hosts that need it — one canary
//! host first, then batches of `batchSize` — and stop when more than `maxUnavailable` hosts
//! failed or rolled back. Batch and budget arithmetic are the DeploymentPlan engine's.
//! The controller and `outrider policy apply` both run this.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::apply::{self, HostOutcome, Live, Step};
use super::{Compiled, parse_owner};
use crate::engine::plan::Amount;
use crate::engine::plan::batches::{batch_size, batches, max_unavailable};
use crate::ssh::{Endpoint, Fleet};

/// How a ruleset is rolled out.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `<namespace>/<name>` of the policy (the ownership tag on hosts).
    pub policy: String,
    pub batch_size: Amount,
    pub max_unavailable: Amount,
    pub confirm: Duration,
    /// Push to hosts whose ruleset drifted (`driftPolicy: Reconcile`).
    pub repair_drift: bool,
    /// Hosts not to push to this time (failed earlier with this ruleset for a reason a retry
    /// cannot fix), with that reason.
    pub hold: BTreeMap<String, (String, String)>,
}

/// Where a host stands against the compiled ruleset, from a read-back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Runs this ruleset, unchanged since it was applied.
    Current { digest: String },
    /// Runs something else than what was applied (`message` says what).
    Drifted { message: String },
    /// Runs an older ruleset of this policy, or none: needs an apply, nothing is wrong.
    Outdated,
    /// The table belongs to another policy: never touched.
    Foreign { owner: String },
}

/// Classifies a read-back. `recorded` is the digest recorded right after this host's last
/// apply, if any.
pub fn classify(
    live: &Live,
    compiled: &Compiled,
    policy: &str,
    recorded: Option<&str>,
) -> Standing {
    let Some(digest) = &live.digest else {
        return match recorded {
            Some(_) => Standing::Drifted {
                message: "Outrider's ruleset was removed from the host".into(),
            },
            None => Standing::Outdated,
        };
    };
    let owner = live.tag.as_deref().and_then(parse_owner);
    if let Some(o) = &owner
        && o.policy != super::owner_name(policy)
    {
        return Standing::Foreign {
            owner: live.tag.clone().unwrap_or_default(),
        };
    }
    let ours_now = owner
        .as_ref()
        .is_some_and(|o| o.hash32 == compiled.short_hash());
    match (recorded, ours_now) {
        (Some(r), _) if r == digest && ours_now => Standing::Current {
            digest: digest.clone(),
        },
        (Some(r), _) if r == digest => Standing::Outdated,
        (Some(_), _) => Standing::Drifted {
            message: if owner.is_some() {
                "Outrider's ruleset was changed on the host outside Outrider".into()
            } else {
                "Outrider's ruleset was replaced on the host by one Outrider did not write".into()
            },
        },
        // nothing recorded (first run, or applied by `outrider policy apply`): the tag decides
        (None, true) => Standing::Current {
            digest: digest.clone(),
        },
        (None, false) => Standing::Outdated,
    }
}

/// The end state of one host after a rollout pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostResult {
    /// Was already current; nothing pushed.
    Unchanged { digest: String },
    /// Pushed and confirmed now.
    Applied { digest: String },
    /// Drifted and left alone (`driftPolicy: Report`).
    Drifted { message: String },
    /// Not pushed, or pushed and undone: `RolledBack` when the host restored itself.
    Failed {
        reason: String,
        message: String,
        rolled_back: bool,
    },
    /// Not reached because the rollout stopped first.
    Skipped,
}

impl HostResult {
    fn counts_as_unavailable(&self) -> bool {
        matches!(self, HostResult::Failed { .. })
    }
}

/// Progress, for live output and Events.
#[derive(Clone, Debug)]
pub enum Progress {
    /// The hosts that need a push, after the read.
    Planned {
        pending: Vec<String>,
    },
    /// A batch starts (index 0 is the canary).
    Batch {
        index: usize,
        hosts: Vec<String>,
    },
    Step {
        host: String,
        step: Step,
    },
    Done {
        host: String,
        result: HostResult,
    },
    /// The rollout stopped: too many hosts failed.
    Halted {
        failed: usize,
        budget: usize,
    },
}

/// What a pass did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Per host, in inventory order.
    pub hosts: BTreeMap<String, HostResult>,
    /// The order hosts were pushed to (canary first).
    pub pushed: Vec<String>,
    pub halted: bool,
    /// Hosts found drifted by the read, whether repaired or only reported.
    pub drift: BTreeMap<String, String>,
}

/// Reads every host and pushes where needed. `recorded` maps host names to the digest
/// recorded after their last apply.
pub async fn run(
    fleet: &Fleet,
    hosts: &[Endpoint],
    compiled: &Arc<Compiled>,
    recorded: &BTreeMap<String, String>,
    settings: &Settings,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Report {
    let mut report = Report::default();
    let reads = read_all(fleet, hosts, compiled.backend).await;
    let mut pending = Vec::new();
    for host in hosts {
        let result = match reads.get(&host.name) {
            None | Some(Err(_)) => {
                let message = match reads.get(&host.name) {
                    Some(Err(e)) => e.clone(),
                    _ => "not read".into(),
                };
                HostResult::Failed {
                    reason: "ReadFailed".into(),
                    message,
                    rolled_back: false,
                }
            }
            Some(Ok(live)) => match classify(
                live,
                compiled,
                &settings.policy,
                recorded.get(&host.name).map(String::as_str),
            ) {
                Standing::Drifted { message } if settings.repair_drift => {
                    report.drift.insert(host.name.clone(), message);
                    pending.push(host.clone());
                    HostResult::Skipped
                }
                Standing::Current { digest } => HostResult::Unchanged { digest },
                Standing::Foreign { owner } => HostResult::Failed {
                    reason: "OwnedByOtherPolicy".into(),
                    message: format!("Outrider's table on this host belongs to: {owner}"),
                    rolled_back: false,
                },
                Standing::Drifted { message } => {
                    report.drift.insert(host.name.clone(), message.clone());
                    HostResult::Drifted { message }
                }
                Standing::Outdated => {
                    if let Some((reason, message)) = settings.hold.get(&host.name) {
                        HostResult::Failed {
                            reason: reason.clone(),
                            message: message.clone(),
                            rolled_back: reason == "NotConfirmed" || reason == "ConfirmTooLate",
                        }
                    } else {
                        pending.push(host.clone());
                        HostResult::Skipped
                    }
                }
            },
        };
        report.hosts.insert(host.name.clone(), result);
    }
    progress(Progress::Planned {
        pending: pending.iter().map(|h| h.name.clone()).collect(),
    });
    let total = hosts.len();
    let budget = max_unavailable(settings.max_unavailable, total);
    let mut failed = report
        .hosts
        .values()
        .filter(|r| r.counts_as_unavailable())
        .count();
    if failed > budget && !pending.is_empty() {
        report.halted = true;
        progress(Progress::Halted { failed, budget });
        return report;
    }
    // one canary host, then batches
    let size = batch_size(settings.batch_size, total).max(1);
    let mut groups = Vec::new();
    if !pending.is_empty() {
        groups.push(0..1);
        groups.extend(
            batches(pending.len() - 1, size)
                .into_iter()
                .map(|r| r.start + 1..r.end + 1),
        );
    }
    for (index, range) in groups.into_iter().enumerate() {
        let batch: Vec<Endpoint> = pending[range].to_vec();
        progress(Progress::Batch {
            index,
            hosts: batch.iter().map(|h| h.name.clone()).collect(),
        });
        let results = futures::stream::iter(batch.iter().cloned())
            .map(|host| {
                let fleet = fleet.clone();
                let compiled = compiled.clone();
                async move {
                    let name = host.name.clone();
                    let outcome = push(&fleet, &host, &compiled, settings, progress).await;
                    (name, outcome)
                }
            })
            .buffer_unordered(batch.len().max(1))
            .collect::<Vec<_>>()
            .await;
        for (name, result) in results {
            report.pushed.push(name.clone());
            progress(Progress::Done {
                host: name.clone(),
                result: result.clone(),
            });
            if result.counts_as_unavailable() {
                failed += 1;
            }
            report.hosts.insert(name, result);
        }
        if failed > budget {
            report.halted = true;
            progress(Progress::Halted { failed, budget });
            break;
        }
    }
    report
}

async fn push(
    fleet: &Fleet,
    host: &Endpoint,
    compiled: &Compiled,
    settings: &Settings,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> HostResult {
    let session = match fleet.connect(host).await {
        Ok(s) => s,
        Err(e) => {
            return HostResult::Failed {
                reason: "ConnectFailed".into(),
                message: crate::text::clip(e.to_string(), 900),
                rolled_back: false,
            };
        }
    };
    let name = host.name.clone();
    let step = move |step: Step| {
        progress(Progress::Step {
            host: name.clone(),
            step,
        })
    };
    match apply::apply(
        fleet,
        host,
        session,
        compiled,
        &settings.policy,
        settings.confirm,
        &step,
    )
    .await
    {
        HostOutcome::Applied { digest } => HostResult::Applied { digest },
        HostOutcome::Failed { reason, message } => HostResult::Failed {
            reason,
            message,
            rolled_back: false,
        },
        HostOutcome::RolledBack { reason, message } => HostResult::Failed {
            reason,
            message,
            rolled_back: true,
        },
    }
}

/// Reads every host's live ruleset, at most `fleet.concurrency` at once.
pub async fn read_all(
    fleet: &Fleet,
    hosts: &[Endpoint],
    backend: crate::api::security_policy::Backend,
) -> BTreeMap<String, Result<Live, String>> {
    let results =
        fleet.run(
            hosts.to_vec(),
            Duration::from_secs(120),
            move |session| async move {
                Ok(apply::read(&session, backend, Duration::from_secs(60)).await)
            },
        );
    futures::pin_mut!(results);
    let mut out = BTreeMap::new();
    while let Some(r) = results.next().await {
        let value = match r.result {
            Ok(read) => read,
            Err(e) => Err(crate::text::clip(e.to_string(), 900)),
        };
        out.insert(r.endpoint.name, value);
    }
    out
}

/// Whether a failure reason may go away by trying again later with the same ruleset.
pub fn retryable(reason: &str) -> bool {
    matches!(
        reason,
        "ConnectFailed" | "ReadFailed" | "RollbackPending" | "ConnectionLost" | "StateDir"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::security_policy::Backend;
    use crate::engine::firewall::Output;

    fn compiled(hash: &str) -> Compiled {
        Compiled {
            backend: Backend::Nftables,
            output: Output::Nft(String::new()),
            hash: format!("sha256:{hash}"),
            findings: Vec::new(),
        }
    }

    fn live(tag: Option<&str>, digest: Option<&str>) -> Live {
        Live {
            digest: digest.map(str::to_string),
            tag: tag.map(str::to_string),
        }
    }

    const H1: &str = "11111111111111111111111111111111ffff";
    const H2: &str = "22222222222222222222222222222222ffff";
    const TAG1: &str = "outrider prod/fw g1 11111111111111111111111111111111";

    #[test]
    fn a_host_is_current_only_with_this_ruleset_and_the_recorded_digest() {
        let c = compiled(H1);
        assert_eq!(
            classify(&live(Some(TAG1), Some("d")), &c, "prod/fw", Some("d")),
            Standing::Current { digest: "d".into() }
        );
        // untouched older ruleset of ours: an ordinary update, not drift
        assert_eq!(
            classify(
                &live(Some(TAG1), Some("d")),
                &compiled(H2),
                "prod/fw",
                Some("d")
            ),
            Standing::Outdated
        );
        assert!(matches!(
            classify(&live(Some(TAG1), Some("x")), &c, "prod/fw", Some("d")),
            Standing::Drifted { .. }
        ));
        assert!(matches!(
            classify(&live(None, None), &c, "prod/fw", Some("d")),
            Standing::Drifted { message } if message.contains("removed")
        ));
        assert_eq!(
            classify(&live(None, None), &c, "prod/fw", None),
            Standing::Outdated
        );
        // nothing recorded: the tag decides
        assert_eq!(
            classify(&live(Some(TAG1), Some("d")), &c, "prod/fw", None),
            Standing::Current { digest: "d".into() }
        );
    }

    #[test]
    fn another_policys_table_is_never_taken_over() {
        let other = "outrider dev/other g4 11111111111111111111111111111111";
        assert!(matches!(
            classify(
                &live(Some(other), Some("d")),
                &compiled(H1),
                "prod/fw",
                None
            ),
            Standing::Foreign { .. }
        ));
    }

    #[test]
    fn only_transient_failures_are_retried_with_the_same_ruleset() {
        assert!(retryable("ConnectFailed"));
        assert!(!retryable("RulesetRejected"));
        assert!(!retryable("NotConfirmed"));
    }
}
