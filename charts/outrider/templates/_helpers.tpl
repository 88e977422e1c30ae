{{- define "outrider.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "outrider.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "outrider.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{- /* The LogPipeline controller finds the agents by app.kubernetes.io/name=outrider-agent. */ -}}
{{- define "outrider.agentSelectorLabels" -}}
app.kubernetes.io/name: outrider-agent
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end -}}

{{- define "outrider.agentName" -}}
{{- printf "%s-agent" (include "outrider.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "outrider.serviceAccountName" -}}
{{- default (include "outrider.fullname" .) .Values.controller.serviceAccount.name -}}
{{- end -}}

{{- define "outrider.agentServiceAccountName" -}}
{{- default (include "outrider.agentName" .) .Values.agent.serviceAccount.name -}}
{{- end -}}

{{- define "outrider.agentPriorityClassName" -}}
{{- if .Values.agent.priorityClass.create -}}
{{- include "outrider.agentName" . -}}
{{- else -}}
{{- .Values.agent.priorityClass.name -}}
{{- end -}}
{{- end -}}

{{- define "outrider.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{- /* The container securityContext every Outrider container runs with. */ -}}
{{- define "outrider.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities: {drop: [ALL]}
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{/*
What only a tenant grants the controller: its Jobs, Pods, ConfigMaps and Secrets. In the
cluster-wide role unless rbac.tenantNamespaces lists the namespaces that opted in; then in
the "<fullname>-tenant" ClusterRole, bound in each of them.
*/}}
{{- define "outrider.tenantRules" }}
# Job stages of DeploymentPlans: Jobs owned by the plan, in its namespace.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [create, get, list, watch, delete, deletecollection]
# A failed Job's pods (exit code for the plan's status). Cluster-wide this also covers the
# node agents' Pods in the release namespace (otherwise: the "-agents" Role).
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
# ConfigMaps the controller owns beside the resources (an Inventory's pinned SSH host keys,
# named after it; a HealthCheck's baselines: names not known in advance, so not
# name-limited). Cluster-wide this also covers the node agents' ConfigMap in the release
# namespace (otherwise: the "-agents" Role). Written by server-side apply (PATCH), so no
# update.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, patch]
# SSH credentials: watched by metadata, read one at a time when a resource refers to one.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch]
{{- end }}

{{/*
The agent's caps (agent.limits) as flags: `--max-*` for the agent, `--agent-max-*` for the
controller (prefix "agent-"), so both enforce the same values.
*/}}
{{- define "outrider.agentLimitArgs" -}}
- --{{ .prefix }}max-memory-buffer={{ .limits.memoryBuffer }}
- --{{ .prefix }}max-disk-buffer={{ .limits.diskBuffer }}
- --{{ .prefix }}max-batch-bytes={{ .limits.batchBytes }}
- --{{ .prefix }}max-batch-events={{ int64 .limits.batchEvents }}
{{- end }}
