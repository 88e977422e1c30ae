//! Job stages: a StageRunner that sends SSH stages to the SSH runner and runs `job:`
//! stages as owned `batch/v1` Jobs in the cluster.

use super::*;

/// Runs SSH stages through [`SshRunner`] and Job stages as `batch/v1` Jobs owned by the
/// plan, in the plan's namespace.
pub(super) struct ClusterRunner {
    pub(super) ssh: SshRunner,
    pub(super) jobs: Api<Job>,
    pub(super) owner: Option<OwnerReference>,
    pub(super) plan: String,
    pub(super) run_key: String,
}

/// Keeps the first `max` bytes of a name, on a char boundary.
fn clip(s: &str, max: usize) -> &str {
    let mut cut = s.len().min(max);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s[..cut].trim_end_matches('-')
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
            }
            if pod.restart_policy.is_none() {
                pod.restart_policy = Some("Never".into());
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
        loop {
            tokio::time::sleep(JOB_POLL).await;
            let Some(job) = self.jobs.get_opt(&name).await.map_err(api_failure)? else {
                return Err(plan::StageFailure::new(
                    plan::FailureReason::Other,
                    format!("Job {name} was deleted before it finished"),
                ));
            };
            let conditions = job
                .status
                .as_ref()
                .and_then(|s| s.conditions.clone())
                .unwrap_or_default();
            let is = |t: &str| {
                conditions
                    .iter()
                    .find(|c| c.type_ == t && c.status == "True")
            };
            if is("Complete").is_some() {
                return Ok(plan::StageOutcome {
                    duration: started.elapsed(),
                    output_tail: format!("Job {name} completed"),
                });
            }
            if let Some(c) = is("Failed") {
                let reason = c.reason.clone().unwrap_or_default();
                return Err(plan::StageFailure {
                    reason: if reason == "DeadlineExceeded" {
                        plan::FailureReason::TimedOut
                    } else {
                        plan::FailureReason::NonZeroExit
                    },
                    exit_code: None,
                    signal: None,
                    message: format!(
                        "Job {name} failed: {reason}: {}",
                        c.message.clone().unwrap_or_default()
                    ),
                    output_tail: String::new(),
                });
            }
        }
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
