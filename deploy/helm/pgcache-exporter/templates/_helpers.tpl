{{- define "pgcache-exporter.labels" -}}
app.kubernetes.io/name: pgcache-exporter
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
{{- define "pgcache-exporter.selector" -}}
app.kubernetes.io/name: pgcache-exporter
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}
{{- define "pgcache-exporter.secretName" -}}
{{ .Values.existingSecret | default (printf "%s-pgcache-exporter" .Release.Name) }}
{{- end }}
