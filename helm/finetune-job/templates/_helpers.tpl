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

{{/* "true" when several pods train together (distributed.nodes above 1). */}}
{{- define "finetune-job.multiNode" -}}
{{- if gt (int .Values.distributed.nodes) 1 }}true{{ end }}
{{- end }}

{{/* "true" when the run is a JobSet instead of a Job. */}}
{{- define "finetune-job.jobset" -}}
{{- if eq .Values.distributed.engine "jobset" }}true{{ end }}
{{- end }}

{{/*
The DNS subdomain of the training pods: the name of the headless Service the chart creates (engine job), or the
JobSet's network.subdomain, whose headless Service the JobSet controller creates.
*/}}
{{- define "finetune-job.subdomain" -}}
{{- include "finetune-job.fullname" . }}
{{- end }}

{{/* The JobSet's one replicatedJob: its Job is `<jobset>-node-0`, its pods `<jobset>-node-0-<index>`. */}}
{{- define "finetune-job.replicatedJobName" -}}
node
{{- end }}

{{/*
Hostname of node 0, which hosts the rendezvous. The Job controller names pod i of an Indexed Job `<job name>-<i>`;
a CronJob's Jobs are named when they run, so the Job's name comes from the downward API (JOB_NAME) and the
kubelet expands $(JOB_NAME) in MASTER_ADDR.
*/}}
{{- define "finetune-job.masterHost" -}}
{{- if include "finetune-job.jobset" . }}
{{- printf "%s-%s-0-0" (include "finetune-job.fullname" .) (include "finetune-job.replicatedJobName" .) }}
{{- else -}}
$(JOB_NAME)-0
{{- end }}
{{- end }}

{{/* The pod label that names the run, the same on every pod of it: the Job's name, or the JobSet's. */}}
{{- define "finetune-job.runNameLabel" -}}
{{- if include "finetune-job.jobset" . }}jobset.sigs.k8s.io/jobset-name{{ else }}batch.kubernetes.io/job-name{{ end }}
{{- end }}

{{/* Labels that select this release's training pods and no other pod (the headless Service's selector). */}}
{{- define "finetune-job.podSelectorLabels" -}}
{{ include "finetune-job.selectorLabels" . }}
app.kubernetes.io/component: fine-tuning
{{- end }}

{{/*
The Job spec, used as it is by job.yaml, as the CronJob's jobTemplate and as the JobSet's one replicatedJob.
Several nodes make it an Indexed Job of `nodes` pods. A failure ends every pod of the group (the survivors exit 8),
so the Job allows job.backoffLimit failures per node; under a JobSet the Job fails on its first failed pod and the
JobSet restarts the group (failurePolicy.maxRestarts), keeps the TTL and is the one Kueue suspends.
*/}}
{{- define "finetune-job.jobSpec" -}}
{{- $nodes := int .Values.distributed.nodes }}
{{- $jobset := include "finetune-job.jobset" . }}
{{- if and .Values.kueue.queueName (not $jobset) }}
# Kueue admits the Job from its queue and then un-suspends it.
suspend: true
{{- end }}
{{- if or (gt $nodes 1) $jobset }}
# One pod per node, each with its completion index (JOB_COMPLETION_INDEX) as its node rank.
completionMode: Indexed
completions: {{ $nodes }}
parallelism: {{ $nodes }}
{{- end }}
{{- if $jobset }}
# Any failed pod fails the Job, and the JobSet restarts the whole group.
backoffLimit: 0
{{- else }}
backoffLimit: {{ mul (int .Values.job.backoffLimit) $nodes }}
{{- end }}
{{- if not (kindIs "invalid" .Values.job.activeDeadlineSeconds) }}
activeDeadlineSeconds: {{ int64 .Values.job.activeDeadlineSeconds }}
{{- end }}
{{- if and (not (kindIs "invalid" .Values.job.ttlSecondsAfterFinished)) (not $jobset) }}
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
