//! What a DeploymentPlan's Job stage may ask of the cluster. The controller creates the Job
//! with its own rights, so a tenant who can write a plan must not get the node (host paths,
//! host namespaces, privileged containers, added capabilities) or another identity (a
//! ServiceAccount other than the namespace's default) through it, unless the operator allows
//! privileged Jobs for the whole installation.

use k8s_openapi::api::core::v1::{Container, PodTemplateSpec};

use super::ResolveError;
use crate::api::deployment_plan::DeploymentPlanSpec;

/// Every field of `template` that asks for more than an ordinary pod, as (path below the
/// template, what it asks).
pub fn privileged_fields(template: &PodTemplateSpec) -> Vec<(String, &'static str)> {
    let mut found = Vec::new();
    let Some(pod) = &template.spec else {
        return found;
    };
    for (set, field, what) in [
        (
            pod.host_network,
            "hostNetwork",
            "the node's network namespace",
        ),
        (pod.host_pid, "hostPID", "the node's process namespace"),
        (pod.host_ipc, "hostIPC", "the node's IPC namespace"),
    ] {
        if set == Some(true) {
            found.push((format!("spec.{field}"), what));
        }
    }
    if pod
        .service_account_name
        .as_deref()
        .or(pod.service_account.as_deref())
        .is_some_and(|sa| !sa.is_empty() && sa != "default")
    {
        found.push((
            "spec.serviceAccountName".into(),
            "a ServiceAccount other than the namespace's default",
        ));
    }
    for (i, v) in pod.volumes.iter().flatten().enumerate() {
        if v.host_path.is_some() {
            found.push((format!("spec.volumes[{i}].hostPath"), "a path on the node"));
        }
    }
    let lists: [(&str, &[Container]); 2] = [
        ("containers", &pod.containers),
        (
            "initContainers",
            pod.init_containers.as_deref().unwrap_or(&[]),
        ),
    ];
    for (list, containers) in lists {
        for (i, c) in containers.iter().enumerate() {
            let Some(sc) = &c.security_context else {
                continue;
            };
            let at = format!("spec.{list}[{i}].securityContext");
            if sc.privileged == Some(true) {
                found.push((format!("{at}.privileged"), "a privileged container"));
            }
            if sc.allow_privilege_escalation == Some(true) {
                found.push((
                    format!("{at}.allowPrivilegeEscalation"),
                    "privilege escalation",
                ));
            }
            if sc
                .capabilities
                .as_ref()
                .and_then(|c| c.add.as_ref())
                .is_some_and(|add| !add.is_empty())
            {
                found.push((format!("{at}.capabilities.add"), "added capabilities"));
            }
        }
    }
    found
}

/// Refuses a plan whose Job stages ask for privileges, naming the first such field, unless
/// `allow_privileged` (the operator's `--allow-privileged-jobs`).
pub fn check_jobs(spec: &DeploymentPlanSpec, allow_privileged: bool) -> Result<(), ResolveError> {
    if allow_privileged {
        return Ok(());
    }
    let all = [("stages", &spec.stages), ("rollback", &spec.rollback)]
        .into_iter()
        .flat_map(|(list, stages)| {
            stages
                .iter()
                .enumerate()
                .filter_map(move |(i, s)| s.job.as_ref().map(|j| (format!("spec.{list}[{i}]"), j)))
        });
    for (at, job) in all {
        let template = job
            .pod_template()
            .map_err(|e| ResolveError::PrivilegedJob {
                field: format!("{at}.job.template"),
                message: format!("not a pod template: {e}"),
            })?;
        if let Some((field, what)) = privileged_fields(&template).into_iter().next() {
            return Err(ResolveError::PrivilegedJob {
                field: format!("{at}.job.template.{field}"),
                message: format!(
                    "asks for {what}; Job stages run with the operator's rights, so this is \
                     refused unless the operator allows privileged Jobs \
                     (--allow-privileged-jobs, chart controller.allowPrivilegedJobs)"
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(spec: &str) -> PodTemplateSpec {
        serde_yaml::from_str(&format!("spec: {spec}")).unwrap()
    }

    #[test]
    fn an_ordinary_pod_asks_for_nothing() {
        let t = template(
            "{containers: [{name: m, image: i, securityContext: {runAsNonRoot: true, \
             allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}}], \
             serviceAccountName: default, volumes: [{name: v, emptyDir: {}}]}",
        );
        assert_eq!(privileged_fields(&t), vec![]);
    }

    #[test]
    fn every_way_to_the_node_or_another_identity_is_named() {
        let t = template(
            "{hostNetwork: true, hostPID: true, hostIPC: true, serviceAccountName: deployer, \
             volumes: [{name: a, emptyDir: {}}, {name: root, hostPath: {path: /}}], \
             initContainers: [{name: init, image: i, securityContext: {privileged: true}}], \
             containers: [{name: m, image: i, securityContext: {allowPrivilegeEscalation: true, \
             capabilities: {add: [NET_ADMIN]}}}]}",
        );
        let fields: Vec<String> = privileged_fields(&t).into_iter().map(|f| f.0).collect();
        assert_eq!(
            fields,
            [
                "spec.hostNetwork",
                "spec.hostPID",
                "spec.hostIPC",
                "spec.serviceAccountName",
                "spec.volumes[1].hostPath",
                "spec.containers[0].securityContext.allowPrivilegeEscalation",
                "spec.containers[0].securityContext.capabilities.add",
                "spec.initContainers[0].securityContext.privileged",
            ]
        );
    }

    #[test]
    fn a_plan_is_refused_naming_the_field_unless_privileged_jobs_are_allowed() {
        let spec: DeploymentPlanSpec = serde_yaml::from_str(
            "targets: {inventoryRef: {name: inv}}\n\
             stages:\n\
             - {name: ok, job: {template: {spec: {containers: [{name: m, image: i}]}}}}\n\
             rollback:\n\
             - {name: undo, job: {template: {spec: {hostNetwork: true, containers: [{name: m, image: i}]}}}}\n",
        )
        .unwrap();
        let err = check_jobs(&spec, false).unwrap_err().to_string();
        assert!(
            err.starts_with("spec.rollback[0].job.template.spec.hostNetwork: asks for the node's network namespace"),
            "{err}"
        );
        assert!(check_jobs(&spec, true).is_ok());
    }
}
