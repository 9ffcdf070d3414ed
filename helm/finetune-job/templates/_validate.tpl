{{/*
Combinations of values that values.schema.json cannot express and that would make a run fail or lose its work.
Each message names the values involved and says what to do.
*/}}
{{- define "finetune-job.validate" -}}
{{- include "finetune-job.validateOutput" . }}
{{- include "finetune-job.validateWorkDir" . }}
{{- include "finetune-job.validateSchedule" . }}
{{- include "finetune-job.validateCredentials" . }}
{{- include "finetune-job.validateDevices" . }}
{{- include "finetune-job.validateEnv" . }}
{{- include "finetune-job.validateVolumes" . }}
{{- include "finetune-job.validateDistributed" . }}
{{- end }}

{{/* Mount paths the container can write to, as a list; with "persistent", only those that outlive the pod. */}}
{{- define "finetune-job.writableMounts" -}}
{{- $ctx := index . 0 }}
{{- $persistentOnly := index . 1 }}
{{- $paths := list }}
{{- if not $persistentOnly }}
{{- $paths = list "/tmp" "/cache" $ctx.Values.modelCache.mountPath }}
{{- else if include "finetune-job.modelCacheClaimName" $ctx }}
{{- $paths = list $ctx.Values.modelCache.mountPath }}
{{- end }}
{{- range $ctx.Values.extraVolumeMounts }}
{{- if not .readOnly }}
{{- $paths = append $paths .mountPath }}
{{- end }}
{{- end }}
{{- toJson $paths }}
{{- end }}

{{/* "true" when the path (index 0) lies on one of the mounts (index 1). */}}
{{- define "finetune-job.onMount" -}}
{{- $path := clean (index . 0) }}
{{- range index . 1 }}
{{- $mount := clean . }}
{{- if or (eq $path $mount) (hasPrefix (printf "%s/" (trimSuffix "/" $mount)) $path) }}true{{ end }}
{{- end }}
{{- end }}

{{- define "finetune-job.validateOutput" -}}
{{- $out := toString (.Values.config.output_uri | default "") }}
{{- if not $out }}
{{- fail "config.output_uri is required: the pod's own filesystem is deleted when it ends, so set where the adapter goes: a URI such as s3://bucket/prefix or hf://org/repo, or a path on a volume mounted with extraVolumes and extraVolumeMounts" }}
{{- end }}
{{- if not (contains "://" $out) }}
{{- if not (isAbs $out) }}
{{- fail (printf "config.output_uri=%s is a relative path: it would resolve on the container's read-only root filesystem; use an absolute path on a mounted volume or a URI such as s3://bucket/prefix" $out) }}
{{- end }}
{{- $mounts := include "finetune-job.writableMounts" (list . true) | fromJsonArray }}
{{- if not (include "finetune-job.onMount" (list $out $mounts)) }}
{{- fail (printf "config.output_uri=%s is a local path on no persistent volume (writable persistent mounts: %s): the adapter would be deleted with the pod; mount a volume there with extraVolumes and extraVolumeMounts, or use a URI such as s3://bucket/prefix" $out (default "none" (join ", " $mounts))) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "finetune-job.validateWorkDir" -}}
{{- $workDir := toString (.Values.config.work_dir | default "") }}
{{- if and $workDir .Values.securityContext.readOnlyRootFilesystem }}
{{- $mounts := include "finetune-job.writableMounts" (list . false) | fromJsonArray }}
{{- if not (include "finetune-job.onMount" (list $workDir $mounts)) }}
{{- fail (printf "config.work_dir=%s is not on a writable volume and the root filesystem is read-only; use a path under one of: %s" $workDir (join ", " $mounts)) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "finetune-job.validateSchedule" -}}
{{- if .Values.schedule }}
{{- if include "finetune-job.isSet" .Values.config.run_id }}
{{- fail (printf "config.run_id=%v is fixed but schedule is set: every scheduled run would write to the same run id; leave config.run_id unset and each run uses its Job's name" .Values.config.run_id) }}
{{- end }}
{{- if regexMatch "(^|\\s)(CRON_)?TZ=" .Values.schedule }}
{{- fail (printf "schedule=%q holds a time zone: Kubernetes rejects TZ= and CRON_TZ= in a CronJob schedule; set cronJob.timeZone instead" .Values.schedule) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "finetune-job.validateCredentials" -}}
{{- $c := .Values.credentials }}
{{- if and $c.existingSecret $c.create }}
{{- fail (printf "credentials.existingSecret=%s and credentials.create=true are both set: use the existing Secret or create one, not both" $c.existingSecret) }}
{{- end }}
{{- range $c.variables }}
{{- if hasPrefix "FT_" . }}
{{- fail (printf "credentials.variables lists %s: FT_ variables are job settings; set them under config (by field name) instead" .) }}
{{- end }}
{{- end }}
{{- if $c.create }}
{{- $given := list }}
{{- range $name, $value := $c.values }}
{{- if not (has $name $c.variables) }}
{{- fail (printf "credentials.values.%s is not in credentials.variables (%s): the pod would never read it" $name (join ", " $c.variables)) }}
{{- end }}
{{- if $value }}{{ $given = append $given $name }}{{ end }}
{{- end }}
{{- if not $given }}
{{- fail (printf "credentials.create=true but credentials.values sets none of %s: give at least one, or set credentials.create=false" (join ", " $c.variables)) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "finetune-job.validateDevices" -}}
{{- $gpus := int .Values.gpu.count }}
{{- $device := toString (.Values.config.device | default "auto") }}
{{- if and (eq $gpus 0) (eq $device "cuda") }}
{{- fail "config.device=cuda but gpu.count=0: the pod would get no GPU; set gpu.count to at least 1, or config.device to auto or cpu" }}
{{- end }}
{{- if and (gt $gpus 0) (eq $device "cpu") }}
{{- fail (printf "config.device=cpu but gpu.count=%d: the pod would hold GPUs it never uses; set gpu.count=0" $gpus) }}
{{- end }}
{{- range $kind := list "limits" "requests" }}
{{- if hasKey (get ($.Values.resources | default dict) $kind | default dict) $.Values.gpu.resourceName }}
{{- fail (printf "resources.%s sets %s: give the number of GPUs in gpu.count instead" $kind $.Values.gpu.resourceName) }}
{{- end }}
{{- end }}
{{- $grace := int .Values.terminationGracePeriodSeconds }}
{{- with .Values.config.termination_grace_seconds }}
{{- if ge (int .) $grace }}
{{- fail (printf "config.termination_grace_seconds=%d is not below terminationGracePeriodSeconds=%d: Kubernetes would kill the job before it has saved its checkpoint; raise terminationGracePeriodSeconds (by 15 s or more) or lower the job's budget" (int .) $grace) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "finetune-job.validateEnv" -}}
{{- range .Values.extraEnv }}
{{- if hasPrefix "FT_" .name }}
{{- fail (printf "extraEnv sets %s: job settings go under config, by field name (%s), so that they are validated and documented" .name (lower (trimPrefix "FT_" .name))) }}
{{- end }}
{{- if eq .name "HF_HOME" }}
{{- fail "extraEnv sets HF_HOME: it follows modelCache.mountPath, where the cache volume is mounted; set that instead" }}
{{- end }}
{{- if and (include "finetune-job.multiNode" $) (has .name (list "MASTER_ADDR" "MASTER_PORT" "JOB_NAME")) }}
{{- fail (printf "extraEnv sets %s, which the chart sets for multi-node training (distributed.nodes=%d): node 0 hosts the rendezvous; change distributed.port for the port, and remove it from extraEnv" .name (int $.Values.distributed.nodes)) }}
{{- end }}
{{- if and (include "finetune-job.credentialsSecretName" $) (has .name $.Values.credentials.variables) }}
{{- fail (printf "extraEnv sets %s, which credentials.variables already reads from the Secret: credentials are never inlined; remove it from extraEnv" .name) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "finetune-job.validateVolumes" -}}
{{- $m := .Values.modelCache }}
{{- if and $m.existingClaim $m.create }}
{{- fail (printf "modelCache.existingClaim=%s and modelCache.create=true are both set: use the existing claim or create one, not both" $m.existingClaim) }}
{{- end }}
{{- $reserved := list "/tmp" "/cache" "/dev/shm" }}
{{- if has (clean $m.mountPath) $reserved }}
{{- fail (printf "modelCache.mountPath=%s is taken by the chart's scratch volumes (%s); use a path below /cache, e.g. /cache/huggingface" $m.mountPath (join ", " $reserved)) }}
{{- end }}
{{- $names := list "tmp" "cache" "model-cache" "dshm" }}
{{- range .Values.extraVolumes }}
{{- if has .name $names }}
{{- fail (printf "extraVolumes has a volume named %s, a name the chart uses (%s); rename it" .name (join ", " $names)) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "finetune-job.validateDistributed" -}}
{{- $d := .Values.distributed }}
{{- $nodes := int $d.nodes }}
{{- if and (include "finetune-job.jobset" .) .Values.schedule }}
{{- fail (printf "distributed.engine=jobset and schedule=%q are both set: a CronJob creates Jobs, not JobSets; use distributed.engine=job (each scheduled run is then an Indexed Job of distributed.nodes pods), or leave schedule empty" .Values.schedule) }}
{{- end }}
{{- if and (include "finetune-job.isSet" .Values.config.nnodes) (ne (int .Values.config.nnodes) $nodes) }}
{{- fail (printf "config.nnodes=%v but distributed.nodes=%d: the number of nodes is distributed.nodes, which also sizes the Job and sets FT_NNODES; leave config.nnodes unset" .Values.config.nnodes $nodes) }}
{{- end }}
{{- if and (include "finetune-job.isSet" .Values.config.node_rank) (gt $nodes 1) }}
{{- fail (printf "config.node_rank=%v with distributed.nodes=%d: every pod would claim that rank; each pod's rank is its completion index (JOB_COMPLETION_INDEX); leave config.node_rank unset" .Values.config.node_rank $nodes) }}
{{- end }}
{{- $gpus := int .Values.gpu.count }}
{{- if and (include "finetune-job.isSet" .Values.config.nproc_per_node) (gt $gpus 0) }}
{{- if ne (int .Values.config.nproc_per_node) $gpus }}
{{- fail (printf "config.nproc_per_node=%v but gpu.count=%d: each training process takes one GPU of the pod; make them equal, or leave config.nproc_per_node unset (one process per GPU)" .Values.config.nproc_per_node $gpus) }}
{{- end }}
{{- end }}
{{- $procs := mul (max 1 $gpus) $nodes }}
{{- $batch := mul (int (default 4 .Values.config.batch_size)) (int (default 1 .Values.config.gradient_accumulation_steps)) }}
{{- if mod $batch $procs }}
{{- fail (printf "the global batch of %d samples (config.batch_size x config.gradient_accumulation_steps) cannot be split evenly over %d training processes (one per GPU: gpu.count=%d x distributed.nodes=%d); the recipe stays yours: raise config.gradient_accumulation_steps (or config.batch_size) to a multiple of %d, or use fewer GPUs" $batch $procs $gpus $nodes $procs) }}
{{- end }}
{{- $m := .Values.modelCache }}
{{- if and (gt $nodes 1) $m.create (not (has "ReadWriteMany" $m.accessModes)) }}
{{- fail (printf "modelCache.create=true with accessModes %s and distributed.nodes=%d: pods on different nodes cannot mount one such claim, so all but the first would stay Pending; set modelCache.accessModes to [ReadWriteMany] (with a StorageClass that provides it), or leave the cache to an emptyDir per pod (modelCache.create=false)" (join ", " $m.accessModes) $nodes) }}
{{- end }}
{{- if gt $nodes 1 }}
{{- include "finetune-job.validateHostnames" . }}
{{- end }}
{{- end }}

{{/*
The pods' hostnames are DNS labels of at most 63 characters; the Job controller does not shorten them, so a longer
one would leave every pod uncreated. A CronJob's Jobs add up to 11 characters to its name; the JobSet webhook also
counts the 6-character random suffix of the pod's name.
*/}}
{{- define "finetune-job.validateHostnames" -}}
{{- $full := include "finetune-job.fullname" . }}
{{- $last := sub (int .Values.distributed.nodes) 1 }}
{{- $host := printf "%s-%d" $full $last }}
{{- $length := len $host }}
{{- $counted := $length }}
{{- $note := "" }}
{{- $what := "Job" }}
{{- if include "finetune-job.jobset" . }}
{{- $host = printf "%s-%s-0-%d" $full (include "finetune-job.replicatedJobName" .) $last }}
{{- $length = len $host }}
{{- $counted = add $length 6 }}
{{- $note = printf " (%d with the pod name's 6-character suffix, which the JobSet webhook counts)" (int $counted) }}
{{- $what = "JobSet" }}
{{- else if .Values.schedule }}
{{- $host = printf "%s-<minutes since the epoch>-%d" $full $last }}
{{- $length = add $length 11 }}
{{- $counted = $length }}
{{- $what = "CronJob" }}
{{- end }}
{{- if gt (int $counted) 63 }}
{{- fail (printf "the %s's name %s is too long for %d nodes: the last pod's hostname, %s, would be %d characters%s, more than the 63 allowed; shorten the release name or set fullnameOverride to at most %d characters" $what $full (int .Values.distributed.nodes) $host (int $length) $note (sub 63 (sub (int $counted) (len $full)))) }}
{{- end }}
{{- end }}
