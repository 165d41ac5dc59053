{{/* The name of the chart's objects: release name + chart name, cut to 63. */}}
{{- define "smarthost.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "smarthost.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: node, coordinator or redis. */}}
{{- define "smarthost.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "smarthost.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* A duration as in the config ("30s", "5m", "1h 30m") in whole seconds. */}}
{{- define "smarthost.seconds" -}}
{{- $total := 0 -}}
{{- range $part := regexFindAll "[0-9]+(ms|s|m|h|d)" (toString .) -1 -}}
{{- $n := int (regexFind "^[0-9]+" $part) -}}
{{- $unit := regexReplaceAll "^[0-9]+" $part "" -}}
{{- if eq $unit "s" }}{{ $total = add $total $n }}
{{- else if eq $unit "m" }}{{ $total = add $total (mul $n 60) }}
{{- else if eq $unit "h" }}{{ $total = add $total (mul $n 3600) }}
{{- else if eq $unit "d" }}{{ $total = add $total (mul $n 86400) }}
{{- end -}}
{{- end -}}
{{- $total -}}
{{- end -}}

{{/* One TOML value: string, boolean, integer, list or inline table. */}}
{{- define "smarthost.tomlValue" -}}
{{- $v := . -}}
{{- if kindIs "string" $v -}}{{ toJson $v }}
{{- else if kindIs "bool" $v -}}{{ $v }}
{{- else if or (kindIs "float64" $v) (kindIs "int" $v) (kindIs "int64" $v) -}}{{ int64 $v }}
{{- else if kindIs "slice" $v -}}[{{ range $i, $e := $v }}{{ if $i }}, {{ end }}{{ include "smarthost.tomlValue" $e }}{{ end }}]
{{- else if kindIs "map" $v -}}{ {{- range $i, $k := keys $v | sortAlpha }}{{ if $i }},{{ end }} {{ $k }} = {{ include "smarthost.tomlValue" (get $v $k) }}{{ end }} }
{{- end -}}
{{- end -}}

{{/* The key = value lines of a table, skipping unset (null) keys and the
     nested tables and arrays of tables named in .skip. */}}
{{- define "smarthost.tomlKeys" -}}
{{- $skip := .skip | default list -}}
{{- range $k := keys .table | sortAlpha -}}
{{- $v := get $.table $k -}}
{{- if and (not (kindIs "invalid" $v)) (not (has $k $skip)) }}
{{ $k }} = {{ include "smarthost.tomlValue" $v }}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The Redis URL the nodes use, unless it comes from a Secret. */}}
{{- define "smarthost.redisUrl" -}}
{{- if .Values.redis.bundled.enabled -}}
{{- printf "redis://%s-redis:6379" (include "smarthost.fullname" .) -}}
{{- else -}}
{{- .Values.redis.external.url -}}
{{- end -}}
{{- end -}}

{{/* The whole smarthost.toml, from .Values.config plus the keys the chart owns. */}}
{{- define "smarthost.config" -}}
{{- $c := deepCopy .Values.config -}}
{{- $node := $c.node | default dict -}}
{{- $smtp := $c.smtp | default dict -}}
{{- $_ := set $smtp "listen" (list (printf "0.0.0.0:%d" (int .Values.smtp.containerPort))) -}}
{{- $queue := $c.queue | default dict -}}
{{- $_ := set $queue "backend" "redis" -}}
{{- $_ := set $queue "path" "/var/lib/smarthost/spool" -}}
{{- $url := include "smarthost.redisUrl" . -}}
{{- if $url }}{{ $_ := set $queue "redis_url" $url }}{{ end -}}
{{- if .Values.redis.external.cluster }}{{ $_ := set $queue "redis_cluster" true }}{{ end -}}
{{- $delivery := $c.delivery | default dict -}}
{{- $_ := set $delivery "log_file" "/var/lib/smarthost/delivery.log" -}}
{{- $admin := $c.admin | default dict -}}
{{- $_ := set $admin "listen" (printf "0.0.0.0:%d" (int .Values.admin.containerPort)) -}}
{{- if gt (int .Values.admin.metricsPort) 0 }}{{ $_ := set $admin "metrics_listen" (printf "0.0.0.0:%d" (int .Values.admin.metricsPort)) }}{{ end -}}
# smarthost.toml rendered by the Helm chart from .Values.config;
# every key is described in docs/configuration.md.
{{- if .Values.credentials.existingSecret }}
# Laid over this file: the Secret {{ .Values.credentials.existingSecret }}.
include = ["/etc/smarthost/credentials/credentials.toml"]
{{- end }}
[node]
{{- include "smarthost.tomlKeys" (dict "table" $node) }}

[smtp]
{{- include "smarthost.tomlKeys" (dict "table" $smtp "skip" (list "users" "tls")) }}
{{- if .Values.tls.enabled }}

[smtp.tls]
cert = "/etc/smarthost/tls/tls.crt"
key = "/etc/smarthost/tls/tls.key"
{{- end }}
{{- range $user := $smtp.users }}

[[smtp.users]]
{{- include "smarthost.tomlKeys" (dict "table" $user) }}
{{- end }}

[queue]
{{- include "smarthost.tomlKeys" (dict "table" $queue) }}

[delivery]
{{- include "smarthost.tomlKeys" (dict "table" $delivery) }}
{{- range $domain := $c.domains }}

[[domains]]
{{- include "smarthost.tomlKeys" (dict "table" $domain) }}
{{- end }}

[bounce]
{{- include "smarthost.tomlKeys" (dict "table" ($c.bounce | default dict)) }}

[admin]
{{- include "smarthost.tomlKeys" (dict "table" $admin "skip" (list "operators")) }}
{{- range $op := $admin.operators }}

[[admin.operators]]
{{- include "smarthost.tomlKeys" (dict "table" $op) }}
{{- end }}

[log]
{{- include "smarthost.tomlKeys" (dict "table" ($c.log | default dict)) }}
{{ end -}}

{{/* The container port of the probes and /metrics: the metrics listener when there is one. */}}
{{- define "smarthost.metricsPortName" -}}
{{- if gt (int .Values.admin.metricsPort) 0 }}metrics{{ else }}admin{{ end -}}
{{- end -}}
