{{- define "kubetoken.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kubetoken.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "kubetoken.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "kubetoken.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "kubetoken.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetoken.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end }}

{{- define "kubetoken.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kubetoken.labels" -}}
{{ include "kubetoken.commonLabels" . }}
{{ include "kubetoken.selectorLabels" . }}
{{- end }}

{{- define "kubetoken.sidecarLabels" -}}
{{ include "kubetoken.commonLabels" . }}
app.kubernetes.io/name: {{ include "kubetoken.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: sidecar
{{- end }}

{{- define "kubetoken.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetoken.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The webhook's Service (a Service name has at most 63 characters), also the stem of its Secrets. */}}
{{- define "kubetoken.webhookName" -}}
{{- printf "%s-webhook" (include "kubetoken.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{- define "kubetoken.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}
{{- end }}

{{/* The controller's rules; the same for the ClusterRole and for each watched namespace's Role. */}}
{{- define "kubetoken.controllerRules" -}}
- apiGroups: ["kubetoken.io"]
  resources: ["oauthapplications"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["kubetoken.io"]
  resources: ["oauthapplications/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["secrets", "configmaps"]
  verbs: ["get", "list", "watch", "create", "update"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- if .Values.webhook.enabled }}
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
{{- end }}
{{- if .Values.controller.manageSidecarRbac }}
{{- /*
The sidecar Roles it keeps (spec.sidecar.serviceAccountName) and their RoleBindings. Kubernetes lets it grant only
what it holds: the sidecar patches its token-state ConfigMaps, so the controller holds patch on ConfigMaps too
(it already replaces them).
*/}}
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["patch"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "create", "update"]
{{- end }}
{{- end }}
