{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "nanofleet-coordinator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's resources. */}}
{{- define "nanofleet-coordinator.fullname" -}}
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

{{- define "nanofleet-coordinator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "nanofleet-coordinator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nanofleet-coordinator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "nanofleet-coordinator.labels" -}}
helm.sh/chart: {{ include "nanofleet-coordinator.chart" . }}
{{ include "nanofleet-coordinator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: coordinator
app.kubernetes.io/part-of: nanofleet
{{- end }}

{{- define "nanofleet-coordinator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "nanofleet-coordinator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "nanofleet-coordinator.caSecret" -}}
{{- default (printf "%s-ca" (include "nanofleet-coordinator.fullname" .)) .Values.tls.caSecret }}
{{- end }}

{{- define "nanofleet-coordinator.serverSecret" -}}
{{- default (printf "%s-server" (include "nanofleet-coordinator.fullname" .)) .Values.tls.serverSecret }}
{{- end }}

{{- define "nanofleet-coordinator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Where coordinator.toml is mounted. */}}
{{- define "nanofleet-coordinator.configPath" -}}
/etc/nanofleet/coordinator.toml
{{- end }}

{{/* Handler of the startup, liveness and readiness probes (probes.type). */}}
{{- define "nanofleet-coordinator.probeHandler" -}}
{{- if eq .Values.probes.type "grpc" -}}
exec:
  command:
    - nanofleet-coordinator
    - --config
    - {{ include "nanofleet-coordinator.configPath" . }}
    - health
    - --timeout
    - {{ printf "%ds" (int .Values.probes.timeoutSeconds) }}
    {{- with .Values.probes.tlsServerName }}
    - --tls-server-name
    - {{ . }}
    {{- end }}
{{- else -}}
httpGet:
  path: /healthz
  port: http
{{- end }}
timeoutSeconds: {{ add (int .Values.probes.timeoutSeconds) 1 }}
{{- end }}
