{{/*
Names, labels, images and the values every service shares. Helpers are prefixed "iex." and
names truncated to 63 characters (the DNS label limit).
*/}}

{{- define "iex.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "iex.fullname" -}}
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

{{/* <fullname>-<component>, e.g. iex-planner. Call with (dict "root" $ "component" "planner"). */}}
{{- define "iex.componentName" -}}
{{- $full := include "iex.fullname" .root | trunc (int (sub 62 (len .component))) | trimSuffix "-" -}}
{{- printf "%s-%s" $full .component -}}
{{- end -}}

{{- define "iex.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of one component: stable across upgrades, never add to them. */}}
{{- define "iex.selectorLabels" -}}
app.kubernetes.io/name: {{ include "iex.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "iex.labels" -}}
helm.sh/chart: {{ include "iex.chart" .root }}
{{ include "iex.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: internet-explorer
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of objects that belong to no single component (secrets, rules, dashboards). */}}
{{- define "iex.commonLabels" -}}
{{ include "iex.labels" (dict "root" . "component" "shared") }}
{{- end -}}

{{/* registry/repository:tag@digest from one {registry, repository, tag, digest} value. */}}
{{- define "iex.image" -}}
{{- $image := .image -}}
{{- $ref := $image.repository -}}
{{- if $image.registry -}}
{{- $ref = printf "%s/%s" $image.registry $image.repository -}}
{{- end -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $ref $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $ref (default .root.Chart.AppVersion $image.tag | toString) -}}
{{- end -}}
{{- end -}}

{{- define "iex.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "iex.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "iex.s3SecretName" -}}
{{- default (printf "%s-s3" (include "iex.fullname" .)) .Values.s3.existingSecret -}}
{{- end -}}

{{- define "iex.authSecretName" -}}
{{- default (printf "%s-auth" (include "iex.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "iex.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "iex.fullname" .)) .Values.tls.existingSecret -}}
{{- end -}}

{{/* Where the TLS Secret is mounted in every service pod. */}}
{{- define "iex.tlsDir" -}}/var/run/iex/tls{{- end -}}

{{/* IEX_TLS_* of every service (services.common.security): files, so rotation needs no restart. */}}
{{- define "iex.tlsEnv" -}}
{{- if .Values.tls.enabled }}
- name: IEX_TLS_CERT
  value: {{ include "iex.tlsDir" . }}/tls.crt
- name: IEX_TLS_KEY
  value: {{ include "iex.tlsDir" . }}/tls.key
- name: IEX_TLS_CA
  value: {{ include "iex.tlsDir" . }}/ca.crt
- name: IEX_TLS_REQUIRE_CLIENT_CERT
  value: {{ .Values.tls.requireClientCert | quote }}
{{- end }}
{{- end -}}

{{/* Services with RPCs that need credentials under IEX_AUTH_REQUIRED (services.common.security). */}}
{{- define "iex.authServices" -}}
{{- toJson (list "planner" "crawler") -}}
{{- end -}}

{{- define "iex.kafkaBootstrap" -}}
{{- if .Values.kafka.enabled -}}
{{- printf "%s:9092" (include "iex.componentName" (dict "root" . "component" "kafka")) -}}
{{- else -}}
{{- .Values.kafka.bootstrap -}}
{{- end -}}
{{- end -}}

{{- define "iex.s3Endpoint" -}}
{{- if .Values.minio.enabled -}}
{{- printf "%s:9000" (include "iex.componentName" (dict "root" . "component" "minio")) -}}
{{- else -}}
{{- .Values.s3.endpoint -}}
{{- end -}}
{{- end -}}

{{- define "iex.tritonGrpcUrl" -}}
{{- if .Values.triton.enabled -}}
{{- printf "%s:%d" (include "iex.componentName" (dict "root" . "component" "triton")) (int .Values.triton.ports.grpc) -}}
{{- else -}}
{{- .Values.triton.externalGrpcUrl -}}
{{- end -}}
{{- end -}}

{{- define "iex.modelRepositoryClaim" -}}
{{- default (printf "%s-model-repository" (include "iex.fullname" .)) .Values.modelRepository.existingClaim -}}
{{- end -}}

{{/* The services of the chart, in start order. */}}
{{- define "iex.services" -}}
{{- $names := list "planner" "crawler" "dedup" "scorer" "trainer" -}}
{{- if .Values.search.enabled -}}
{{- $names = append $names "search" -}}
{{- end -}}
{{- toJson $names -}}
{{- end -}}

{{/* Ports of an "host:port,host:port" endpoint list (default when a host has none). */}}
{{- define "iex.endpointPorts" -}}
{{- $ports := list -}}
{{- range $endpoint := splitList "," .endpoints -}}
{{- $parts := splitList ":" (trim $endpoint) -}}
{{- if gt (len $parts) 1 -}}
{{- $ports = append $ports (int (last $parts)) -}}
{{- else -}}
{{- $ports = append $ports (int $.default) -}}
{{- end -}}
{{- end -}}
{{- toJson (uniq $ports) -}}
{{- end -}}

{{/*
Every problem with the values, reported at once (the schema checks shapes; this checks how
values relate to each other).
*/}}
{{- define "iex.validateValues" -}}
{{- $problems := list -}}
{{- $v := .Values -}}
{{- if and (not $v.kafka.enabled) (not $v.kafka.bootstrap) -}}
{{- $problems = append $problems "kafka.bootstrap: required when kafka.enabled is false" -}}
{{- end -}}
{{- if and (not $v.minio.enabled) (not $v.s3.endpoint) -}}
{{- $problems = append $problems "s3.endpoint: required when minio.enabled is false" -}}
{{- end -}}
{{- if and (not $v.minio.enabled) (not $v.s3.existingSecret) -}}
{{- $problems = append $problems "s3.existingSecret: required when minio.enabled is false (the credentials of your S3)" -}}
{{- end -}}
{{- if and (not $v.triton.enabled) (not $v.triton.externalGrpcUrl) -}}
{{- $problems = append $problems "triton.externalGrpcUrl: required when triton.enabled is false" -}}
{{- end -}}
{{- if and $v.kafka.enabled (eq (mod (int $v.kafka.replicas) 2) 0) -}}
{{- $problems = append $problems (printf "kafka.replicas: a KRaft quorum needs an odd number of nodes, got %d" (int $v.kafka.replicas)) -}}
{{- end -}}
{{- if and $v.kafka.enabled (gt (int $v.kafka.topics.replicationFactor) (int $v.kafka.replicas)) -}}
{{- $problems = append $problems (printf "kafka.topics.replicationFactor: %d exceeds kafka.replicas (%d)" (int $v.kafka.topics.replicationFactor) (int $v.kafka.replicas)) -}}
{{- end -}}
{{- range $component := list "crawler" "dedup" "scorer" -}}
{{- $c := index $v $component -}}
{{- if $c.autoscaling.enabled -}}
{{- if gt (int $c.autoscaling.minReplicas) (int $c.autoscaling.maxReplicas) -}}
{{- $problems = append $problems (printf "%s.autoscaling.minReplicas: greater than maxReplicas" $component) -}}
{{- end -}}
{{- if gt (int $c.autoscaling.maxReplicas) (int $v.kafka.topics.partitions) -}}
{{- $problems = append $problems (printf "%s.autoscaling.maxReplicas: %d replicas of one consumer group share %d partitions (kafka.topics.partitions); the extra ones would idle" $component (int $c.autoscaling.maxReplicas) (int $v.kafka.topics.partitions)) -}}
{{- end -}}
{{- else if gt (int $c.replicas) (int $v.kafka.topics.partitions) -}}
{{- $problems = append $problems (printf "%s.replicas: %d replicas of one consumer group share %d partitions (kafka.topics.partitions); the extra ones would idle" $component (int $c.replicas) (int $v.kafka.topics.partitions)) -}}
{{- end -}}
{{- end -}}
{{- if and $v.metrics.serviceMonitor.enabled $v.metrics.podMonitor.enabled -}}
{{- $problems = append $problems "metrics.podMonitor.enabled: choose ServiceMonitor or PodMonitor, not both (every target would be scraped twice)" -}}
{{- end -}}
{{- if and $v.search.enabled (eq $v.search.corpus.source "existingClaim") (not $v.search.corpus.existingClaim) -}}
{{- $problems = append $problems "search.corpus.existingClaim: required when search.corpus.source is existingClaim" -}}
{{- end -}}
{{- if and $v.triton.enabled (gt (int $v.triton.replicas) 1) (not (has "ReadWriteMany" $v.modelRepository.accessModes)) (not $v.modelRepository.existingClaim) -}}
{{- $problems = append $problems "modelRepository.accessModes: several Triton replicas read the repository from several nodes; use ReadWriteMany" -}}
{{- end -}}
{{- if and (gt (int $v.trainer.replicas) 1) (not (has "ReadWriteMany" $v.modelRepository.accessModes)) (not $v.modelRepository.existingClaim) -}}
{{- $problems = append $problems "modelRepository.accessModes: several trainer replicas write the repository from several nodes; use ReadWriteMany" -}}
{{- end -}}
{{- if and $v.triton.enabled (eq $v.triton.modelConfigName "production") (eq (int $v.triton.gpu) 0) -}}
{{- $problems = append $problems "triton.modelConfigName: \"production\" runs the models on a GPU; request one with triton.gpu or use production-cpu" -}}
{{- end -}}
{{- if $problems -}}
{{- fail (printf "\n\nInvalid values for %s:\n  - %s\n" .Chart.Name (join "\n  - " $problems)) -}}
{{- end -}}
{{- end -}}

{{/* Pod-level settings every pod of the chart shares. */}}
{{- define "iex.podSecurity" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "iex.containerSecurity" -}}
securityContext:
  {{- toYaml .Values.containerSecurityContext | nindent 2 }}
{{- end -}}

{{/* Scheduling of one component: (dict "values" <component values>). */}}
{{- define "iex.scheduling" -}}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* S3 variables of the shared settings, credentials from the Secret. */}}
{{- define "iex.s3Env" -}}
- name: IEX_S3_ENDPOINT
  value: {{ include "iex.s3Endpoint" . | quote }}
- name: IEX_S3_SECURE
  value: {{ .Values.s3.secure | quote }}
- name: IEX_S3_REGION
  value: {{ .Values.s3.region | quote }}
- name: IEX_S3_BUCKET
  value: {{ .Values.s3.bucket | quote }}
- name: IEX_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "iex.s3SecretName" . }}
      key: {{ .Values.s3.secretKeys.accessKey }}
- name: IEX_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "iex.s3SecretName" . }}
      key: {{ .Values.s3.secretKeys.secretKey }}
{{- end -}}
