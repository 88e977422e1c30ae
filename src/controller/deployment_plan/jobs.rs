//! Job stages: a StageRunner that sends SSH stages to the SSH runner and runs `job:`
//! stages as owned `batch/v1` Jobs in the cluster. One watch of the plans' Jobs (label
//! `outrider.dev/plan`) feeds both the controller (`owns`) and the runs waiting on a Job.

use futures::StreamExt;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};

use super::*;
use crate::controller::runtime::Stores;
use k8s_openapi::api::core::v1::{EnvVarSource, SecretKeySelector};

/// The plans' Jobs as one shared watch sees them: a cache, and a counter bumped on every
/// change so a waiting stage wakes up instead of polling the API server.
#[derive(Clone)]
pub(super) struct JobWatch {
    store: Stores<Job>,
    changed: watch::Receiver<u64>,
}

impl JobWatch {
    /// The watches' caches and the stream of touched Jobs, for `Controller::owns_stream`:
    /// one watch per Api (per tenant namespace, or one over the watched scope).
    pub(super) fn start(
        apis: Vec<Api<Job>>,
    ) -> (
        Self,
        impl futures::Stream<Item = Result<Job, watcher::Error>> + Send + 'static,
    ) {
        let (tx, changed) = watch::channel(0u64);
        let tx = Arc::new(tx);
        let mut stores = Vec::new();
        let mut streams = Vec::new();
        for jobs in apis {
            let (store, writer) = reflector::store();
            let config = watcher::Config::default().labels(PLAN_LABEL).any_semantic();
            let tx = tx.clone();
            let stream = reflector::reflector(writer, watcher(jobs, config))
                .default_backoff()
                .touched_objects()
                .inspect(move |_| tx.send_modify(|n| *n = n.wrapping_add(1)));
            stores.push(store);
            streams.push(stream.boxed());
        }
        let store = Stores::new(stores);
        (
            Self { store, changed },
            futures::stream::select_all(streams),
        )
    }
}

/// Runs SSH stages through [`SshRunner`] and Job stages as `batch/v1` Jobs owned by the
/// plan, in the plan's namespace.
pub(super) struct ClusterRunner {
    pub(super) ssh: SshRunner,
    pub(super) jobs: Api<Job>,
    /// The shared Job watch; without it (never in the controller) a stage polls.
    pub(super) watch: Option<JobWatch>,
    pub(super) namespace: String,
    pub(super) owner: Option<OwnerReference>,
    pub(super) plan: String,
    pub(super) run_key: String,
}

/// How a finished Job ended: `None` while it runs.
fn job_result(job: &Job) -> Option<Result<(), (String, String)>> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    let is = |t: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == t && c.status == "True")
    };
    if is("Complete").is_some() {
        return Some(Ok(()));
    }
    is("Failed").map(|c| {
        Err((
            c.reason.clone().unwrap_or_default(),
            c.message.clone().unwrap_or_default(),
        ))
    })
}

/// The first terminated container of a Job's pods: exit code, and "reason: message".
fn terminated(pods: &[Pod]) -> Option<(i32, String)> {
    pods.iter()
        .flat_map(|p| {
            p.status
                .iter()
                .flat_map(|s| s.container_statuses.iter().flatten())
        })
        .filter_map(|cs| cs.state.as_ref()?.terminated.as_ref())
        .find(|t| t.exit_code != 0)
        .map(|t| {
            let why = [t.reason.as_deref(), t.message.as_deref()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(": ");
            (t.exit_code, why)
        })
}

/// Keeps the first `max` bytes of a name, on a char boundary.
fn clip(s: &str, max: usize) -> &str {
    crate::text::head(s, max).trim_end_matches('-')
}

impl ClusterRunner {
    /// The Job of one attempt of `stage` (`host`: the host index of a per-host stage).
    fn job(
        &self,
        stage: &plan::StageSpec,
        template: &serde_json::Value,
        host: Option<&str>,
        attempt: u32,
    ) -> Result<Job, plan::StageFailure> {
        let mut template: PodTemplateSpec =
            serde_json::from_value(template.clone()).map_err(|e| {
                plan::StageFailure::new(
                    plan::FailureReason::Other,
                    format!("stage {:?}: job.template: {e}", stage.name),
                )
            })?;
        if let Some(pod) = template.spec.as_mut() {
            for c in &mut pod.containers {
                let env = c.env.get_or_insert_with(Vec::new);
                env.extend(stage.env.iter().map(|(k, v)| EnvVar {
                    name: k.clone(),
                    value: Some(v.clone()),
                    ..Default::default()
                }));
                // the kubelet reads the Secret: its value never enters the Job object
                env.extend(stage.secret_env.iter().map(|v| EnvVar {
                    name: v.name.clone(),
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: v.secret.clone(),
                            key: v.key.clone(),
                            optional: None,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }));
            }
            if pod.restart_policy.is_none() {
                pod.restart_policy = Some("Never".into());
            }
            // no API token in the stage's pod unless its template asks for one
            if pod.automount_service_account_token.is_none() {
                pod.automount_service_account_token = Some(false);
            }
        }
        let id = format!(
            "{}/{}/{}/{attempt}",
            self.run_key,
            stage.name,
            host.unwrap_or("")
        );
        let name = format!(
            "{}-{}-{}",
            clip(&self.plan, 30),
            clip(&stage.name, 20),
            &fnv(id.as_bytes())[..10]
        );
        let labels = std::collections::BTreeMap::from([
            (PLAN_LABEL.to_string(), self.plan.clone()),
            (STAGE_LABEL.to_string(), stage.name.clone()),
        ]);
        Ok(Job {
            metadata: ObjectMeta {
                name: Some(name),
                labels: Some(labels),
                owner_references: self.owner.clone().map(|o| vec![o]),
                ..Default::default()
            },
            spec: Some(JobSpec {
                template,
                backoff_limit: Some(0),
                active_deadline_seconds: Some(
                    i64::try_from(stage.timeout.as_secs().max(1)).unwrap_or(i64::MAX),
                ),
                ttl_seconds_after_finished: Some(JOB_TTL_SECONDS),
                ..Default::default()
            }),
            status: None,
        })
    }

    /// Creates the Job (or adopts it after a restart) and waits for Complete or Failed.
    async fn run_job(
        &self,
        stage: &plan::StageSpec,
        template: &serde_json::Value,
        host: Option<&str>,
        attempt: u32,
    ) -> Result<plan::StageOutcome, plan::StageFailure> {
        let started = Instant::now();
        let job = self.job(stage, template, host, attempt)?;
        let name = job.metadata.name.clone().unwrap_or_default();
        let api_failure = |e: kube::Error| {
            plan::StageFailure::new(
                plan::FailureReason::Other,
                format!("Job {name}: Kubernetes API: {e}"),
            )
        };
        match self.jobs.create(&PostParams::default(), &job).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(api_failure(e)),
        }
        let key = ObjectRef::<Job>::new(&name).within(&self.namespace);
        let mut changed = self.watch.as_ref().map(|w| w.changed.clone());
        let mut last_get = Instant::now();
        loop {
            let cached = self.watch.as_ref().and_then(|w| w.store.get(&key));
            // the cache is authoritative for progress; the API server is asked when the
            // cache has not seen the Job (yet, or any more) and now and then as a backstop
            let job = match cached {
                Some(job) if last_get.elapsed() < JOB_RECHECK => Some((*job).clone()),
                _ => {
                    last_get = Instant::now();
                    self.jobs.get_opt(&name).await.map_err(api_failure)?
                }
            };
            let Some(job) = job else {
                return Err(plan::StageFailure::new(
                    plan::FailureReason::Other,
                    format!("Job {name} was deleted before it finished"),
                ));
            };
            match job_result(&job) {
                Some(Ok(())) => {
                    return Ok(plan::StageOutcome {
                        duration: started.elapsed(),
                        output_tail: format!("Job {name} completed"),
                    });
                }
                Some(Err((reason, message))) => {
                    return Err(self.job_failure(&name, &reason, &message).await);
                }
                None => {}
            }
            match changed.as_mut() {
                Some(rx) => {
                    let _ = tokio::time::timeout(JOB_RECHECK, rx.changed()).await;
                }
                None => tokio::time::sleep(JOB_POLL).await,
            }
        }
    }

    /// A failed Job as a stage failure, with its pod's exit code when there is one.
    async fn job_failure(&self, name: &str, reason: &str, message: &str) -> plan::StageFailure {
        let pods: Api<Pod> = Api::namespaced(self.jobs.clone().into_client(), &self.namespace);
        let selector = format!("batch.kubernetes.io/job-name={name}");
        let exit = match pods.list(&ListParams::default().labels(&selector)).await {
            Ok(list) => terminated(&list.items),
            Err(e) => {
                tracing::debug!(job = name, error = %e, "cannot read the Job's pods");
                None
            }
        };
        job_failure(name, reason, message, exit)
    }
}

/// How a failed Job reads as a stage failure: a Job that ran out of time is `TimedOut`
/// (its pod's exit code is the kill, not the script's), any other failure `NonZeroExit`
/// with the first failed container's exit code and termination reason.
fn job_failure(
    name: &str,
    reason: &str,
    message: &str,
    exit: Option<(i32, String)>,
) -> plan::StageFailure {
    let deadline = reason == "DeadlineExceeded";
    plan::StageFailure {
        reason: if deadline {
            plan::FailureReason::TimedOut
        } else {
            plan::FailureReason::NonZeroExit
        },
        exit_code: exit.as_ref().map(|(code, _)| *code).filter(|_| !deadline),
        signal: None,
        message: format!("Job {name} failed: {reason}: {message}"),
        output_tail: exit.map(|(_, why)| why).unwrap_or_default(),
    }
}

impl plan::StageRunner for ClusterRunner {
    type Host = plan::ssh_runner::SshHost;

    async fn open(&self, host: &Endpoint) -> Result<Self::Host, plan::StageFailure> {
        self.ssh.open(host).await
    }

    async fn run(
        &self,
        host: &Self::Host,
        stage: &plan::StageSpec,
        attempt: u32,
    ) -> Result<plan::StageOutcome, plan::StageFailure> {
        match &stage.action {
            StageAction::Job(template) => {
                self.run_job(stage, template, Some(&host.endpoint().name), attempt)
                    .await
            }
            _ => self.ssh.run(host, stage, attempt).await,
        }
    }

    fn accepted_host_key(&self, host: &Self::Host) -> Option<(String, String)> {
        self.ssh.accepted_host_key(host)
    }

    async fn run_once(
        &self,
        host: &Self::Host,
        stage: &plan::StageSpec,
        attempt: u32,
    ) -> Result<plan::StageOutcome, plan::StageFailure> {
        match &stage.action {
            StageAction::Job(template) => self.run_job(stage, template, None, attempt).await,
            _ => self.ssh.run_once(host, stage, attempt).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(conditions: serde_json::Value) -> Job {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "j"},
            "status": {"conditions": conditions}
        }))
        .expect("job")
    }

    fn pod(exit: i32, reason: &str, message: Option<&str>) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "status": {"containerStatuses": [
                {"name": "ok", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                 "state": {"terminated": {"exitCode": 0}}},
                {"name": "m", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                 "state": {"terminated": {"exitCode": exit, "reason": reason, "message": message}}}
            ]}
        }))
        .expect("pod")
    }

    #[test]
    fn job_conditions_map_to_running_succeeded_or_failed() {
        assert_eq!(job_result(&job(serde_json::json!([]))), None);
        let running = job(serde_json::json!([{"type": "Complete", "status": "False"}]));
        assert_eq!(job_result(&running), None);
        let done = job(serde_json::json!([{"type": "Complete", "status": "True"}]));
        assert_eq!(job_result(&done), Some(Ok(())));
        let failed = job(serde_json::json!([{"type": "Failed", "status": "True",
            "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]));
        assert_eq!(
            job_result(&failed),
            Some(Err((
                "BackoffLimitExceeded".into(),
                "Job has reached the specified backoff limit".into()
            )))
        );
    }

    #[test]
    fn a_failed_job_reports_its_pods_exit_code_and_a_deadline_reports_timed_out() {
        let exit = terminated(&[pod(3, "Error", Some("migration failed"))]);
        assert_eq!(exit, Some((3, "Error: migration failed".into())));
        let f = job_failure("j", "BackoffLimitExceeded", "limit", exit.clone());
        assert_eq!(f.reason, plan::FailureReason::NonZeroExit);
        assert_eq!(f.exit_code, Some(3));
        assert_eq!(f.output_tail, "Error: migration failed");
        assert!(
            f.message.contains("Job j failed: BackoffLimitExceeded"),
            "{}",
            f.message
        );
        let t = job_failure("j", "DeadlineExceeded", "too slow", exit);
        assert_eq!(t.reason, plan::FailureReason::TimedOut);
        assert_eq!(
            t.exit_code, None,
            "a killed pod's exit code is not the script's"
        );
        let unknown = job_failure("j", "BackoffLimitExceeded", "limit", None);
        assert_eq!(
            (unknown.exit_code, unknown.output_tail.as_str()),
            (None, "")
        );
    }
}
