{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "taskflow-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, plus the chart name unless it already has it. */}}
{{- define "taskflow-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of cluster-scoped objects: qualified by the release namespace, so that releases in two
namespaces never share a ClusterRole or a peering object. */}}
{{- define "taskflow-operator.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "taskflow-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "taskflow-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "taskflow-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "taskflow-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "taskflow-operator.labels" -}}
helm.sh/chart: {{ include "taskflow-operator.chart" . }}
{{ include "taskflow-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: taskflow
{{- end }}

{{- define "taskflow-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "taskflow-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The kopf peering name; non-empty only when the operator runs more than one replica. */}}
{{- define "taskflow-operator.peeringName" -}}
{{- if and (gt (int .Values.replicas) 1) (ne .Values.replicaMode "active") }}
{{- default (include "taskflow-operator.clusterName" .) .Values.peering.name }}
{{- end }}
{{- end }}

{{- define "taskflow-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The rules the operator needs on Taskflows and Events, shared by the ClusterRole and the
per-namespace Roles. Nothing else: no delete (owner references let the garbage collector remove
child flows), no update of a whole object, no access to any other resource.
*/}}
{{- define "taskflow-operator.taskflowRules" -}}
# get: the flow writer re-reads a flow before it decides again; list + watch: kopf's watch and
# the lookup of a flow's children; create: child flows (TASKFLOW tasks, nested flows);
# patch: spec.cancel on the children of a cancelled flow (the cancel cascade);
# delete: a finished flow after its TTL (spec.ttl or ttl.* below), its status kept in the history.
- apiGroups: ["taskflow.dev"]
  resources: ["taskflows"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The flow writer's status write: a PUT with the last seen resourceVersion (optimistic
# concurrency), never a blind patch.
- apiGroups: ["taskflow.dev"]
  resources: ["taskflows/status"]
  verbs: ["update"]
# A child flow's owner reference to its parent sets blockOwnerDeletion; clusters that enable
# the OwnerReferencesPermissionEnforcement admission plugin require this permission for it.
- apiGroups: ["taskflow.dev"]
  resources: ["taskflows/finalizers"]
  verbs: ["update"]
# Flow-level Kubernetes Events (kubectl describe taskflow).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# Templates: a flow with templateRef is made from one (read only).
- apiGroups: ["taskflow.dev"]
  resources: ["taskflowtemplates"]
  verbs: ["get"]
# Schedules: CronTaskflows read, their status written (last schedule time, active runs).
- apiGroups: ["taskflow.dev"]
  resources: ["crontaskflows"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["taskflow.dev"]
  resources: ["crontaskflows/status"]
  verbs: ["update"]
# Tenant policies: read (what a namespace may call, as whom), and the Connected condition.
- apiGroups: ["taskflow.dev"]
  resources: ["taskflowpolicies"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["taskflow.dev"]
  resources: ["taskflowpolicies/status"]
  verbs: ["update"]
{{- end }}
