{{/* Name of the chart's objects, the release name unless it already says kube-migros. */}}
{{- define "kube-migros.fullname" -}}
{{- if contains "kube-migros" .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-kube-migros" .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kube-migros.labels" -}}
app.kubernetes.io/name: kube-migros
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kube-migros.selector" -}}
app.kubernetes.io/name: kube-migros
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* image "operator" or "node-agent" */}}
{{- define "kube-migros.image" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- $repo := required "image.repository is required (where the kube-migros images were pushed)" $root.Values.image.repository -}}
{{- printf "%s/%s:%s" (trimSuffix "/" $repo) $name (default $root.Chart.AppVersion $root.Values.image.tag) -}}
{{- end -}}

{{/* Environment of in-cluster clients where the kubernetes Service cannot be reached. */}}
{{- define "kube-migros.apiServerEnv" -}}
{{- if .Values.apiServer.host -}}
- name: KUBERNETES_SERVICE_HOST
  value: {{ .Values.apiServer.host | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ required "apiServer.port is required with apiServer.host" .Values.apiServer.port | toString | quote }}
{{- end }}
{{- end -}}
