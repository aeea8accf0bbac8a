{{/* The chart's name */}}
{{- define "modelium.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's objects' name */}}
{{- define "modelium.fullname" -}}
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

{{- define "modelium.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "modelium.selectorLabels" -}}
app.kubernetes.io/name: {{ include "modelium.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "modelium.labels" -}}
helm.sh/chart: {{ include "modelium.chart" . }}
{{ include "modelium.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* cpu or cuda */}}
{{- define "modelium.variant" -}}
{{- if .Values.image.variant }}
{{- if not (has .Values.image.variant (list "cpu" "cuda")) }}
{{- fail (printf "image.variant must be cpu or cuda, not %q" .Values.image.variant) }}
{{- end }}
{{- .Values.image.variant }}
{{- else if gt (int .Values.gpu.count) 0 }}cuda
{{- else }}cpu
{{- end }}
{{- end }}

{{- define "modelium.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion (include "modelium.variant" .)) | toString }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* The Secret holding the API keys */}}
{{- define "modelium.keysSecret" -}}
{{- .Values.apiKeys.existingSecret | default (printf "%s-api-keys" (include "modelium.fullname" .)) }}
{{- end }}

{{- define "modelium.modelsClaim" -}}
{{- .Values.models.persistence.existingClaim | default (printf "%s-models" (include "modelium.fullname" .)) }}
{{- end }}

{{- define "modelium.dataClaim" -}}
{{- .Values.data.persistence.existingClaim | default (printf "%s-data" (include "modelium.fullname" .)) }}
{{- end }}

{{/* drain_s of the settings (Modelium's default: 30) */}}
{{- define "modelium.drainSeconds" -}}
{{- $s := .Values.settings | default dict }}
{{- if hasKey $s "drain_s" }}{{ $s.drain_s | int }}{{ else }}30{{ end }}
{{- end }}

{{/* Checks of the values that would otherwise make a pod that cannot start */}}
{{- define "modelium.validate" -}}
{{- range $k := list "host" "port" "db" "models_dirs" }}
{{- if hasKey ($.Values.settings | default dict) $k }}
{{- fail (printf "settings.%s is set by the chart (the container listens on 0.0.0.0:8000, the log is /data/modelium.db, models come from models.mountPath); remove it" $k) }}
{{- end }}
{{- end }}
{{- if and (not .Values.apiKeys.enabled) (not .Values.insecure) }}
{{- fail "Modelium refuses to serve on 0.0.0.0 without API keys: keep apiKeys.enabled (with keys) or set insecure=true" }}
{{- end }}
{{- if and .Values.apiKeys.enabled (not .Values.apiKeys.keys) }}
{{- fail "apiKeys.enabled needs at least one entry in apiKeys.keys (tenant, role, secretKey)" }}
{{- end }}
{{- range $i, $k := .Values.apiKeys.keys }}
{{- if not (and $k.tenant $k.secretKey) }}
{{- fail (printf "apiKeys.keys[%d] needs a tenant and a secretKey" $i) }}
{{- end }}
{{- if not (regexMatch "^[-._a-zA-Z0-9]{1,253}$" (toString $k.secretKey)) }}
{{- fail (printf "apiKeys.keys[%d].secretKey %q is not a valid Secret key (letters, digits, '-', '_', '.')" $i (toString $k.secretKey)) }}
{{- end }}
{{- if not (regexMatch "^[[:graph:]]{1,200}$" (toString $k.tenant)) }}
{{- fail (printf "apiKeys.keys[%d].tenant %q must be a name of printable characters without spaces (at most 200)" $i (toString $k.tenant)) }}
{{- end }}
{{- if not (has ($k.role | default "user") (list "user" "admin")) }}
{{- fail (printf "apiKeys.keys[%d].role must be user or admin, not %q" $i $k.role) }}
{{- end }}
{{- end }}
{{- $s := .Values.settings | default dict }}
{{- if and (hasKey $s "drain_s") (not (regexMatch "^[0-9]+([.][0-9]+)?$" (toString $s.drain_s))) }}
{{- fail (printf "settings.drain_s must be a number of seconds, not %q" (toString $s.drain_s)) }}
{{- end }}
{{- if lt (int .Values.gpu.count) 0 }}
{{- fail "gpu.count must be 0 or more" }}
{{- end }}
{{- end }}
