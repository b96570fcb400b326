{{/* Names and labels. */}}
{{- define "datastorage.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "datastorage.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "datastorage.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "datastorage.selectorLabels" -}}
app.kubernetes.io/name: {{ include "datastorage.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "datastorage.labels" -}}
helm.sh/chart: {{ include "datastorage.chart" . }}
{{ include "datastorage.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: datastorage
{{- end -}}

{{/* The server pods (Deployment, Service, PDB select these). */}}
{{- define "datastorage.serverSelectorLabels" -}}
{{ include "datastorage.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end -}}

{{- define "datastorage.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "datastorage.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "datastorage.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* Fixed container ports: the image's EXPOSEd ones, written into config.toml. */}}
{{- define "datastorage.grpcPort" -}}8080{{- end -}}
{{- define "datastorage.httpPort" -}}9090{{- end -}}

{{/* True ("true") when the deployment runs, or may scale to, several replicas. */}}
{{- define "datastorage.multiReplica" -}}
{{- if or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1) -}}true{{- end -}}
{{- end -}}

{{/*
Refuse values the server would refuse at start-up, or that cannot work on
Kubernetes, with a message naming the value to change. Rendered by the
Deployment, so `helm template`, `helm lint` and `helm install` all stop here.
*/}}
{{- define "datastorage.validate" -}}
{{- $v := .Values -}}
{{- $cfg := $v.config | default dict -}}
{{- $auth := get $cfg "auth" | default dict -}}
{{- $redis := $v.secrets.redisUrl.existingSecret -}}
{{- if and (include "datastorage.multiReplica" .) (not $redis) -}}
{{- fail "more than one replica (replicaCount > 1 or autoscaling.enabled) needs Redis: set secrets.redisUrl.existingSecret (without it, job records live in one process and the others cannot see them)" -}}
{{- end -}}
{{- if and (include "datastorage.multiReplica" .) (not $v.secrets.pageTokenKey.existingSecret) -}}
{{- fail "more than one replica (replicaCount > 1 or autoscaling.enabled) needs a shared page-token key: set secrets.pageTokenKey.existingSecret (without it, a listing's next page fails on another replica)" -}}
{{- end -}}
{{- if and (dig "outage_queue" "enabled" false $cfg) (not $redis) -}}
{{- fail "config.outage_queue.enabled needs Redis: set secrets.redisUrl.existingSecret" -}}
{{- end -}}
{{- if and (dig "rate_limit" "shared" false $cfg) (not $redis) -}}
{{- fail "config.rate_limit.shared needs Redis: set secrets.redisUrl.existingSecret" -}}
{{- end -}}
{{- if not (or (get $auth "jwks_url") $v.secrets.hs256Secret.existingSecret $v.authPublicKeys) -}}
{{- fail "authentication needs a key source: config.auth.jwks_url, secrets.hs256Secret.existingSecret or authPublicKeys (the chart never serves without authentication)" -}}
{{- end -}}
{{- range $setting := list "jwks_ca_file" "jwks_bearer_token_file" -}}
{{- if and (hasPrefix "/var/run/secrets/kubernetes.io/serviceaccount/" (get $auth $setting | default "")) (not $v.serviceAccount.automountServiceAccountToken) -}}
{{- fail (printf "config.auth.%s reads the pod's service-account token files, which serviceAccount.automountServiceAccountToken: false leaves out" $setting) -}}
{{- end -}}
{{- end -}}
{{- if not (get $auth "issuer") -}}
{{- fail "config.auth.issuer must be set (the iss claim every token must carry)" -}}
{{- end -}}
{{- if $v.tls.enabled -}}
{{- if ne $v.probes.type "http" -}}
{{- fail "tls.enabled needs probes.type: http (the kubelet's gRPC probes cannot speak TLS)" -}}
{{- end -}}
{{- if ne $v.probes.liveness.type "http" -}}
{{- fail "tls.enabled needs probes.liveness.type: http (the kubelet's gRPC probes cannot speak TLS)" -}}
{{- end -}}
{{- end -}}
{{- $drain := dig "shutdown" "drain_delay_ms" 5000 $cfg | int64 -}}
{{- $grace := dig "shutdown" "grace_period_ms" 20000 $cfg | int64 -}}
{{- if le (mul (int64 $v.terminationGracePeriodSeconds) 1000) (add $drain $grace) -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed (config.shutdown.drain_delay_ms + config.shutdown.grace_period_ms) / 1000 = %d s, or Kubernetes kills calls the server is still draining" (int64 $v.terminationGracePeriodSeconds) (div (add $drain $grace) 1000)) -}}
{{- end -}}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) -}}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" -}}
{{- end -}}
{{- if eq (dig "embedding" "provider" "local" $cfg) "openai" -}}
{{- $openai := dig "embedding" "openai" dict $cfg -}}
{{- if not (and (get $openai "base_url") (get $openai "model") (get $openai "dimensions")) -}}
{{- fail "config.embedding.provider openai needs config.embedding.openai.base_url, .model and .dimensions" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
TOML writer. Helm's toToml is not used: Helm reads every YAML number as a
float64 and toToml writes 5000 as 5000.0, which the server's integer settings
refuse. Every numeric setting is an integer, so whole numbers are written as
integers. Keys are sorted; null values are left out (the server's default).
*/}}
{{- define "datastorage.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . -}}{{ . }}{{- else -}}{{ toJson . }}{{- end -}}
{{- end -}}

{{- define "datastorage.toml.isTableArray" -}}
{{- if and (kindIs "slice" .) (gt (len .) 0) -}}{{- if kindIs "map" (first .) -}}true{{- end -}}{{- end -}}
{{- end -}}

{{- define "datastorage.toml.value" -}}
{{- $v := . -}}
{{- if kindIs "string" $v -}}
{{- toJson $v -}}
{{- else if kindIs "bool" $v -}}
{{- $v -}}
{{- else if kindIs "float64" $v -}}
{{- if eq $v (float64 (int64 $v)) -}}{{- int64 $v -}}{{- else -}}{{- $v -}}{{- end -}}
{{- else if or (kindIs "int" $v) (kindIs "int64" $v) -}}
{{- $v -}}
{{- else if kindIs "slice" $v -}}
[{{- range $i, $item := $v -}}{{- if $i -}}, {{ end -}}{{- include "datastorage.toml.value" $item -}}{{- end -}}]
{{- else if kindIs "map" $v -}}
{{- if not $v -}}{}{{- else -}}
{ {{- range $i, $k := keys $v | sortAlpha -}}{{- if $i -}},{{- end }} {{ include "datastorage.toml.key" $k }} = {{ include "datastorage.toml.value" (get $v $k) -}}{{- end }} }
{{- end -}}
{{- else -}}
{{- fail (printf "config: cannot write %v (%s) as TOML" $v (kindOf $v)) -}}
{{- end -}}
{{- end -}}

{{- define "datastorage.toml.table" -}}
{{- $path := .path -}}
{{- $m := .map -}}
{{- range $k := keys $m | sortAlpha -}}
{{- $v := get $m $k -}}
{{- if not (or (kindIs "invalid" $v) (kindIs "map" $v) (include "datastorage.toml.isTableArray" $v)) }}
{{ include "datastorage.toml.key" $k }} = {{ include "datastorage.toml.value" $v }}
{{- end -}}
{{- end -}}
{{- range $k := keys $m | sortAlpha -}}
{{- $v := get $m $k -}}
{{- $sub := append $path (include "datastorage.toml.key" $k) -}}
{{- if kindIs "map" $v }}

[{{ join "." $sub }}]
{{- include "datastorage.toml.table" (dict "path" $sub "map" $v) -}}
{{- else if include "datastorage.toml.isTableArray" $v -}}
{{- range $item := $v }}

[[{{ join "." $sub }}]]
{{- include "datastorage.toml.table" (dict "path" $sub "map" $item) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Mount points of files the configuration names. */}}
{{- define "datastorage.configPath" -}}/etc/datastorage/config.toml{{- end -}}
{{- define "datastorage.tlsDir" -}}/etc/datastorage/tls{{- end -}}
{{- define "datastorage.exportKeyDir" -}}/etc/datastorage/export-signing-key{{- end -}}
{{- define "datastorage.authKeysDir" -}}/etc/datastorage/auth-keys{{- end -}}

{{/*
config.toml: .Values.config plus the settings the chart owns (ports, TLS
files, the model directory, who migrates, the public-key files).
*/}}
{{- define "datastorage.configToml" -}}
{{- $c := deepCopy (.Values.config | default dict) -}}
{{- $grpc := merge (dict "port" (include "datastorage.grpcPort" . | int)) (get $c "grpc" | default dict) -}}
{{- if .Values.tls.enabled -}}
{{- $_ := set $grpc "tls" (dict "cert_file" (printf "%s/tls.crt" (include "datastorage.tlsDir" .)) "key_file" (printf "%s/tls.key" (include "datastorage.tlsDir" .))) -}}
{{- end -}}
{{- $_ := set $c "grpc" $grpc -}}
{{- $_ := set $c "http" (merge (dict "port" (include "datastorage.httpPort" . | int)) (get $c "http" | default dict)) -}}
{{- $_ := set $c "database" (merge (dict "migrate_on_start" (not .Values.migration.enabled)) (get $c "database" | default dict)) -}}
{{- $_ := set $c "embedding" (merge (dict "model_dir" .Values.model.dir) (get $c "embedding" | default dict)) -}}
{{- if .Values.authPublicKeys -}}
{{- $keys := list -}}
{{- range $i, $key := .Values.authPublicKeys -}}
{{- $entry := dict "algorithm" $key.algorithm "pem_file" (printf "%s/%d/%s" (include "datastorage.authKeysDir" $) $i $key.key) -}}
{{- if $key.kid -}}{{- $_ := set $entry "kid" $key.kid -}}{{- end -}}
{{- $keys = append $keys $entry -}}
{{- end -}}
{{- $_ := set $c "auth" (merge (dict "public_keys" $keys) (get $c "auth" | default dict)) -}}
{{- end -}}
# datastorage settings (src/config.rs), rendered by the Helm chart.
# Credentials are not here: they come from Secrets as DATASTORAGE_* variables.
{{- include "datastorage.toml.table" (dict "path" (list) "map" $c) }}
{{ end -}}

{{/* Environment of the server and the migration Job. */}}
{{- define "datastorage.env" -}}
- name: DATASTORAGE_CONFIG
  value: {{ include "datastorage.configPath" . }}
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
{{- $s := .Values.secrets }}
{{- $refs := list
  (list "DATASTORAGE_DATABASE__URL" $s.databaseUrl)
  (list "DATASTORAGE_DATABASE__READ_REPLICA_URL" $s.readReplicaUrl)
  (list "DATASTORAGE_REDIS__URL" $s.redisUrl)
  (list "DATASTORAGE_QUERY__PAGE_TOKEN_KEY" $s.pageTokenKey)
  (list "DATASTORAGE_INTEGRITY__CHAIN_KEY" $s.chainKey)
  (list "DATASTORAGE_AUTH__HS256_SECRET" $s.hs256Secret)
  (list "DATASTORAGE_EMBEDDING__OPENAI__API_KEY" $s.openaiApiKey) }}
{{- range $refs }}
{{- $ref := index . 1 }}
{{- if $ref.existingSecret }}
- name: {{ index . 0 }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.existingSecret | quote }}
      key: {{ $ref.key | quote }}
{{- end }}
{{- end }}
{{- if $s.exportSigningKey.existingSecret }}
- name: DATASTORAGE_INTEGRITY__EXPORT_SIGNING_KEY
  value: {{ printf "%s/%s" (include "datastorage.exportKeyDir" .) $s.exportSigningKey.key | quote }}
{{- end }}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: OTEL_SERVICE_NAME
  value: {{ .Values.otel.serviceName | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE)"
{{- if .Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .Values.otel.endpoint | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volumes of the server and the migration Job; .configMap names the ConfigMap. */}}
{{- define "datastorage.volumes" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
- name: config
  configMap:
    name: {{ .configMap }}
- name: tmp
  emptyDir:
    sizeLimit: {{ $v.tmpSizeLimit }}
{{- if $v.tls.enabled }}
- name: tls
  secret:
    secretName: {{ $v.tls.existingSecret | quote }}
    defaultMode: 0440
{{- end }}
{{- if $v.secrets.exportSigningKey.existingSecret }}
- name: export-signing-key
  secret:
    secretName: {{ $v.secrets.exportSigningKey.existingSecret | quote }}
    defaultMode: 0440
    items:
      - key: {{ $v.secrets.exportSigningKey.key | quote }}
        path: {{ $v.secrets.exportSigningKey.key | quote }}
{{- end }}
{{- range $i, $key := $v.authPublicKeys }}
- name: auth-key-{{ $i }}
  secret:
    secretName: {{ $key.existingSecret | quote }}
    defaultMode: 0444
    items:
      - key: {{ $key.key | quote }}
        path: {{ $key.key | quote }}
{{- end }}
{{- if $v.model.volume }}
- name: model
  {{- toYaml $v.model.volume | nindent 2 }}
{{- end }}
{{- with $v.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "datastorage.volumeMounts" -}}
- name: config
  mountPath: {{ include "datastorage.configPath" . }}
  subPath: config.toml
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: {{ include "datastorage.tlsDir" . }}
  readOnly: true
{{- end }}
{{- if .Values.secrets.exportSigningKey.existingSecret }}
- name: export-signing-key
  mountPath: {{ include "datastorage.exportKeyDir" . }}
  readOnly: true
{{- end }}
{{- range $i, $key := .Values.authPublicKeys }}
- name: auth-key-{{ $i }}
  mountPath: {{ printf "%s/%d" (include "datastorage.authKeysDir" $) $i }}
  readOnly: true
{{- end }}
{{- if .Values.model.volume }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* A gRPC or HTTP probe handler (dict "root" $ "type" "grpc|http" "path" "/readyz"). */}}
{{- define "datastorage.probeHandler" -}}
{{- if eq .type "grpc" -}}
grpc:
  port: {{ include "datastorage.grpcPort" .root }}
  service: {{ .root.Values.probes.grpcService | quote }}
{{- else -}}
httpGet:
  path: {{ .path }}
  port: metrics
{{- end -}}
{{- end -}}
