{{/* The pod of a run: the same for the Job and for every Job of the CronJob. */}}
{{- define "finetune-job.podTemplate" -}}
{{- $secret := include "finetune-job.credentialsSecretName" . -}}
{{- $claim := include "finetune-job.modelCacheClaimName" . -}}
metadata:
  labels:
    {{- include "finetune-job.workloadLabels" . | nindent 4 }}
  annotations:
    # A change of settings changes the pod template: an upgrade of a running Job is refused (its template is
    # immutable) instead of a retry silently running with other settings.
    checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
    {{- if and .Values.credentials.create (not .Values.credentials.existingSecret) }}
    checksum/credentials: {{ include (print $.Template.BasePath "/secret.yaml") . | sha256sum }}
    {{- end }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  # Never: a failed pod is replaced by the Job (podFailurePolicy requires it), so each attempt has its own logs.
  restartPolicy: Never
  {{- if include "finetune-job.multiNode" . }}
  # With the Job controller's hostname `<job name>-<index>`, each pod is `<hostname>.<subdomain>` in DNS.
  subdomain: {{ include "finetune-job.subdomain" . }}
  {{- end }}
  serviceAccountName: {{ include "finetune-job.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ int .Values.terminationGracePeriodSeconds }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: finetune-job
      image: {{ include "finetune-job.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      envFrom:
        - configMapRef:
            name: {{ include "finetune-job.configMapName" . }}
      env:
        {{- if not (include "finetune-job.isSet" .Values.config.run_id) }}
        # The run id is the Job's (or JobSet's) name, the same on every node: a retry resumes the same run, each
        # scheduled run gets its own.
        - name: FT_RUN_ID
          valueFrom:
            fieldRef:
              fieldPath: metadata.labels['{{ include "finetune-job.runNameLabel" . }}']
        {{- end }}
        {{- if include "finetune-job.multiNode" . }}
        # Several nodes: torchrun's rendezvous meets on node 0; a node's rank is its JOB_COMPLETION_INDEX.
        - name: FT_NNODES
          value: {{ int .Values.distributed.nodes | quote }}
        {{- if not (include "finetune-job.jobset" .) }}
        - name: JOB_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.labels['batch.kubernetes.io/job-name']
        {{- end }}
        - name: MASTER_ADDR
          value: {{ printf "%s.%s" (include "finetune-job.masterHost" .) (include "finetune-job.subdomain" .) | quote }}
        - name: MASTER_PORT
          value: {{ int .Values.distributed.port | quote }}
        {{- end }}
        - name: HF_HOME
          value: {{ .Values.modelCache.mountPath | quote }}
        {{- if $claim }}
        # On the persistent cache too: the kernels torch.compile (FT_COMPILE) and Triton (Liger) build at run time,
        # so that the next run of the CronJob, or a retry, loads them instead of compiling again.
        - name: TORCHINDUCTOR_CACHE_DIR
          value: {{ printf "%s/torchinductor" .Values.modelCache.mountPath | quote }}
        - name: TRITON_CACHE_DIR
          value: {{ printf "%s/triton" .Values.modelCache.mountPath | quote }}
        {{- end }}
        {{- if $secret }}
        {{- range .Values.credentials.variables }}
        {{- if or $.Values.credentials.existingSecret (get $.Values.credentials.values .) }}
        - name: {{ . }}
          valueFrom:
            secretKeyRef:
              name: {{ $secret }}
              key: {{ . }}
              optional: true
        {{- end }}
        {{- end }}
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if include "finetune-job.multiNode" . }}
      ports:
        - name: rendezvous
          containerPort: {{ int .Values.distributed.port }}
          protocol: TCP
      {{- end }}
      resources:
        {{- include "finetune-job.resources" . | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      # The job writes its one-line failure reason here; without it, the end of the log stands in.
      terminationMessagePath: {{ .Values.config.termination_log | default "/dev/termination-log" }}
      terminationMessagePolicy: FallbackToLogsOnError
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        - name: cache
          mountPath: /cache
        - name: model-cache
          mountPath: {{ .Values.modelCache.mountPath }}
        - name: dshm
          mountPath: /dev/shm
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir:
        sizeLimit: {{ .Values.scratch.tmpSizeLimit }}
    - name: cache
      emptyDir:
        sizeLimit: {{ .Values.scratch.cacheSizeLimit }}
    - name: model-cache
      {{- if $claim }}
      persistentVolumeClaim:
        claimName: {{ $claim }}
      {{- else }}
      emptyDir:
        sizeLimit: {{ .Values.modelCache.emptyDirSizeLimit }}
      {{- end }}
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ .Values.scratch.shmSizeLimit }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
