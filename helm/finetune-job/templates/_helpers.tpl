{{/* Names, labels and the pieces the Job and the CronJob share. */}}

{{- define "finetune-job.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's resources. Truncated to 52 characters: a CronJob's name may not be longer, because its
Jobs append 11 characters (and a Job's name is its run id).
*/}}
{{- define "finetune-job.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "finetune-job.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "finetune-job.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-job.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "finetune-job.labels" -}}
helm.sh/chart: {{ include "finetune-job.chart" . }}
{{ include "finetune-job.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/component: fine-tuning
app.kubernetes.io/part-of: finetune-job
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels of the Job (or of the CronJob's Jobs) and their pods. */}}
{{- define "finetune-job.workloadLabels" -}}
{{ include "finetune-job.labels" . }}
{{- with .Values.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "finetune-job.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{- define "finetune-job.configMapName" -}}
{{- printf "%s-config" (include "finetune-job.fullname" .) }}
{{- end }}

{{- define "finetune-job.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- .Values.serviceAccount.name | default (include "finetune-job.fullname" .) }}
{{- else }}
{{- .Values.serviceAccount.name | default "default" }}
{{- end }}
{{- end }}

{{/* The Secret the credentials come from; empty when there is none. */}}
{{- define "finetune-job.credentialsSecretName" -}}
{{- if .Values.credentials.existingSecret }}
{{- .Values.credentials.existingSecret }}
{{- else if .Values.credentials.create }}
{{- printf "%s-credentials" (include "finetune-job.fullname" .) }}
{{- end }}
{{- end }}

{{- define "finetune-job.modelCacheClaimName" -}}
{{- if .Values.modelCache.existingClaim }}
{{- .Values.modelCache.existingClaim }}
{{- else if .Values.modelCache.create }}
{{- printf "%s-model-cache" (include "finetune-job.fullname" .) }}
{{- end }}
{{- end }}

{{/*
A setting's value as the job reads it from its FT_ variable: strings as they are, everything else as JSON, which
pydantic-settings parses (numbers without an exponent up to 1e21, `true`/`false`, lists and maps).
*/}}
{{- define "finetune-job.envValue" -}}
{{- if kindIs "string" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/* True (non-empty) when a setting is set: null and "" keep the job's default. */}}
{{- define "finetune-job.isSet" -}}
{{- if not (or (kindIs "invalid" .) (and (kindIs "string" .) (eq . ""))) }}true{{ end }}
{{- end }}

{{/* Resources with the GPU count as the device plugin's limit. */}}
{{- define "finetune-job.resources" -}}
{{- $resources := deepCopy (.Values.resources | default dict) }}
{{- if gt (int .Values.gpu.count) 0 }}
{{- $limits := get $resources "limits" | default dict }}
{{- $_ := set $limits .Values.gpu.resourceName (int .Values.gpu.count) }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/* The podFailurePolicy built from the job's exit codes. */}}
{{- define "finetune-job.podFailurePolicy" -}}
rules:
  {{- with .Values.podFailurePolicy.failJobOnExitCodes }}
  - action: FailJob
    onExitCodes:
      containerName: finetune-job
      operator: In
      values: {{ toJson . }}
    # Kubernetes 1.27's schema requires the field on every rule.
    onPodConditions: []
  {{- end }}
  {{- if .Values.podFailurePolicy.ignoreDisruptions }}
  - action: Ignore
    onPodConditions:
      - type: DisruptionTarget
        status: "True"
  {{- end }}
{{- end }}

{{/* The Job spec, used as it is by job.yaml and as the CronJob's jobTemplate. */}}
{{- define "finetune-job.jobSpec" -}}
{{- if .Values.kueue.queueName }}
# Kueue admits the Job from its queue and then un-suspends it.
suspend: true
{{- end }}
backoffLimit: {{ int .Values.job.backoffLimit }}
{{- if not (kindIs "invalid" .Values.job.activeDeadlineSeconds) }}
activeDeadlineSeconds: {{ int64 .Values.job.activeDeadlineSeconds }}
{{- end }}
{{- if not (kindIs "invalid" .Values.job.ttlSecondsAfterFinished) }}
ttlSecondsAfterFinished: {{ int64 .Values.job.ttlSecondsAfterFinished }}
{{- end }}
{{- $policy := include "finetune-job.podFailurePolicy" . | fromYaml }}
{{- if and .Values.podFailurePolicy.enabled $policy.rules }}
podFailurePolicy:
  {{- include "finetune-job.podFailurePolicy" . | nindent 2 }}
{{- end }}
template:
  {{- include "finetune-job.podTemplate" . | nindent 2 }}
{{- end }}
