{{/* The pod spec shared by nodes and coordinators; .component and .args. */}}
{{- define "smarthost.podSpec" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $c := index $v .component -}}
{{- $grace := int (include "smarthost.seconds" (dig "node" "shutdown_grace" "30s" ($v.config | default dict))) -}}
serviceAccountName: {{ include "smarthost.fullname" $root }}
automountServiceAccountToken: false
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- /* preStop delay + the config's shutdown_grace + a margin to exit. */}}
terminationGracePeriodSeconds: {{ add $v.preStopSeconds $grace 5 }}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
  seccompProfile:
    type: RuntimeDefault
{{- if $v.topologySpread }}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "smarthost.selector" (dict "root" $root "component" .component) | nindent 8 }}
{{- end }}
affinity:
  {{- if $c.affinity }}
  {{- toYaml $c.affinity | nindent 2 }}
  {{- else }}
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "smarthost.selector" (dict "root" $root "component" .component) | nindent 14 }}
  {{- end }}
{{- with $c.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
containers:
  - name: smarthost
    image: {{ include "smarthost.image" $root }}
    imagePullPolicy: {{ $v.image.pullPolicy }}
    args: [{{ .args | quote }}, "--config", "/etc/smarthost/config/smarthost.toml"]
    {{- if or $v.redis.external.existingSecret $v.extraEnv }}
    env:
      {{- with $v.redis.external.existingSecret }}
      - name: SMARTHOST__QUEUE__REDIS_URL
        valueFrom:
          secretKeyRef:
            name: {{ .name }}
            key: {{ .key }}
      {{- end }}
      {{- with $v.extraEnv }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- end }}
    ports:
      {{- if eq .component "node" }}
      - name: smtp
        containerPort: {{ $v.smtp.containerPort }}
        protocol: TCP
      {{- end }}
      - name: admin
        containerPort: {{ $v.admin.containerPort }}
        protocol: TCP
      {{- if gt (int $v.admin.metricsPort) 0 }}
      - name: metrics
        containerPort: {{ $v.admin.metricsPort }}
        protocol: TCP
      {{- end }}
    readinessProbe:
      httpGet:
        path: /readyz
        port: {{ include "smarthost.metricsPortName" $root }}
      periodSeconds: 5
      failureThreshold: 1
    livenessProbe:
      httpGet:
        path: /healthz
        port: {{ include "smarthost.metricsPortName" $root }}
      initialDelaySeconds: 10
      periodSeconds: 10
      failureThreshold: 3
    {{- if and (eq .component "node") (gt (int $v.preStopSeconds) 0) }}
    lifecycle:
      {{- /* Lets Services and load balancers drop the pod before SIGTERM
             closes the listener; a sleep action needs no shell. */}}
      preStop:
        sleep:
          seconds: {{ $v.preStopSeconds }}
    {{- end }}
    resources:
      {{- toYaml $c.resources | nindent 6 }}
    securityContext:
      allowPrivilegeEscalation: false
      readOnlyRootFilesystem: true
      runAsNonRoot: true
      capabilities:
        drop: ["ALL"]
    volumeMounts:
      {{- /* The whole directory, not a subPath: a subPath mount never sees an
             updated ConfigMap (and podman kube play cannot mount one). */}}
      - name: config
        mountPath: /etc/smarthost/config
        readOnly: true
      - name: data
        mountPath: /var/lib/smarthost
      {{- if $v.tls.enabled }}
      - name: tls
        mountPath: /etc/smarthost/tls
        readOnly: true
      {{- end }}
      {{- if $v.credentials.existingSecret }}
      - name: credentials
        mountPath: /etc/smarthost/credentials
        readOnly: true
      {{- end }}
volumes:
  - name: config
    {{- if $v.configInSecret }}
    secret:
      secretName: {{ include "smarthost.fullname" $root }}-config
    {{- else }}
    configMap:
      name: {{ include "smarthost.fullname" $root }}-config
    {{- end }}
  - name: data
    emptyDir:
      sizeLimit: {{ $v.dataSizeLimit }}
  {{- if $v.tls.enabled }}
  - name: tls
    secret:
      secretName: {{ $v.tls.existingSecret | default (printf "%s-tls" (include "smarthost.fullname" $root)) }}
  {{- end }}
  {{- if $v.credentials.existingSecret }}
  - name: credentials
    secret:
      secretName: {{ $v.credentials.existingSecret }}
      items:
        - key: credentials.toml
          path: credentials.toml
  {{- end }}
{{- end -}}
