{{/* The release's objects are named after it ("alpaca-operator" for a release of that name). */}}
{{- define "alpaca-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "alpaca-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "alpaca-operator.labels" -}}
{{ include "alpaca-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "alpaca-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "alpaca-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "alpaca-operator.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
The namespaced rules: exactly what the operator calls (docs/operator.md, "Permissions").
No Secrets; ConfigMaps only get (its own NAME-config, a run's deepspeed.configMapRef) and
create/delete of its own; pods get/list/watch/create/delete with eksWorkload pods (the default: the
operator makes a gang's pods), only list with eksWorkload job (a failed pod's exit code and
termination message, why pods do not start).
*/}}
{{- define "alpaca-operator.namespacedRules" -}}
# The runs: kopf lists and watches them; the operator reads one afresh before acting;
# patch: kopf's finalizer on sagemaker runs (a training job outside the cluster is not
# garbage-collected, so deleting such a run stops its job first).
- apiGroups: [alpaca.dev]
  resources: [alpacafinetunes]
  verbs: [get, list, watch, patch]
# Its status writes (merge patches). patch is also what the namespace's trainer Role grants
# the training pods: RBAC lets the operator grant only what it holds itself.
- apiGroups: [alpaca.dev]
  resources: [alpacafinetunes/status]
  verbs: [get, patch]
# Owner references with blockOwnerDeletion (OwnerReferencesPermissionEnforcement).
- apiGroups: [alpaca.dev]
  resources: [alpacafinetunes/finalizers]
  verbs: [update]
# The EKS workload: one Job per attempt, created if absent, deleted on restart/TTL; patch:
# runPolicy.suspend holds and releases it in place (spec.suspend).
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
# A gang's headless Service; the namespace's trainer identity (ServiceAccount alpaca-trainer,
# Role and RoleBinding alpaca-trainer-progress), made once; get and delete: the per-run
# account, Role and binding of earlier operator versions, removed with a run's children.
- apiGroups: [""]
  resources: [services, serviceaccounts]
  verbs: [get, create, delete]
# patch: an earlier version's trainer Role, which also allowed get, narrowed in place.
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles]
  verbs: [get, create, patch, delete]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [rolebindings]
  verbs: [get, create, delete]
# get: spec.deepspeed.configMapRef; delete: the per-run ConfigMap of earlier operator versions.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, delete]
# With eksWorkload pods (the default), the bare pods the operator makes, watches and deletes
# itself; list: a failed pod's exit code, why pods do not start.
- apiGroups: [""]
  resources: [pods]
  {{- if eq .Values.eksWorkload "pods" }}
  verbs: [get, list, watch, create, delete]
  {{- else }}
  verbs: [list]
  {{- end }}
# Events on the runs (kubectl describe aft); list: a Job's FailedCreate Events (why its
# pods could not be created).
- apiGroups: [""]
  resources: [events]
  verbs: [create, list]
# Kueue (spec.queueName): why a queued gang waits, or that it was preempted; patch: its
# spec.active, how runPolicy.suspend holds a queued run (Kueue would unsuspend its Job).
# Without Kueue installed the rule is inert.
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [list, patch]
{{- end -}}

{{- define "alpaca-operator.peeringHook" -}}
helm.sh/hook: post-install,post-upgrade
helm.sh/hook-delete-policy: before-hook-creation
{{- end -}}
