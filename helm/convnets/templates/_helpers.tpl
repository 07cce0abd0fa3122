{{- define "convnets.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "convnets.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "convnets.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The image of the project; a tag starting with sha256: is a digest. */}}
{{- define "convnets.image" -}}
{{- if hasPrefix "sha256:" .Values.image.tag -}}
{{ .Values.image.repository }}@{{ .Values.image.tag }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}
{{- end -}}

{{/* The claim of a volume: (list $ "data") -> the existing claim, else the one the chart creates. */}}
{{- define "convnets.claimName" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- $p := index $root.Values.persistence $name -}}
{{- if $p.existingClaim -}}{{ $p.existingClaim }}{{- else -}}{{ include "convnets.fullname" $root }}-{{ $name }}{{- end -}}
{{- end -}}

{{/* What every pod of the release shares: security context, scheduling, pull secrets. */}}
{{- define "convnets.podCommon" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}

{{/* Caches and scratch go to /tmp, since the root filesystem is read-only. */}}
{{- define "convnets.env" -}}
- name: HOME
  value: /tmp
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: TORCHINDUCTOR_CACHE_DIR
  value: /tmp/torchinductor
{{- end -}}

{{/* The training container, shared by the Job and the PyTorchJob; its name is what the operator expects. */}}
{{- define "convnets.trainContainer" -}}
- name: pytorch
  image: {{ include "convnets.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  workingDir: /workspace
  command: ["bash", "{{ .Values.recipe }}/train_multinode.sh"]
  args:
    - --data
    - /data
    - --output
    - /runs/{{ .Values.recipe }}
    - --resume
    - auto
    {{- range .Values.train.args }}
    - {{ . | quote }}
    {{- end }}
    {{- with .Values.tracking }}
    {{- if .mlflowUri }}
    - --mlflow
    {{- end }}
    {{- if .experiment }}
    - --experiment
    - {{ .experiment | quote }}
    {{- end }}
    {{- if .logModel }}
    - --mlflow-model
    {{- end }}
    {{- if .tensorboard }}
    - --tensorboard
    {{- end }}
    {{- end }}
  env:
    {{- include "convnets.env" . | nindent 4 }}
    {{- with .Values.tracking.mlflowUri }}
    - name: MLFLOW_TRACKING_URI
      value: {{ . | quote }}
    {{- end }}
    - name: NNODES
      value: {{ .Values.train.nnodes | quote }}
    - name: NPROC_PER_NODE
      value: {{ .Values.train.nprocPerNode | quote }}
    - name: MAX_RESTARTS
      value: {{ .Values.train.maxRestarts | quote }}
    - name: RDZV_ID
      value: {{ include "convnets.fullname" . }}-train
    {{- if and (gt (int .Values.train.nnodes) 1) (eq .Values.train.kind "job") }}
    {{- $name := printf "%s-train" (include "convnets.fullname" .) }}
    # Pod 0's stable name through the headless Service (the PyTorchJob operator sets these itself).
    - name: MASTER_ADDR
      value: {{ $name }}-0.{{ $name }}.{{ .Release.Namespace }}.svc
    - name: MASTER_PORT
      value: {{ .Values.train.rdzvPort | quote }}
    {{- end }}
  ports:
    # The training operator sets MASTER_PORT from the port named pytorchjob-port (adding 23456 where none is
    # named); the Indexed Job's Service targets "rendezvous".
    - name: {{ eq .Values.train.kind "pytorchjob" | ternary "pytorchjob-port" "rendezvous" }}
      containerPort: {{ .Values.train.rdzvPort }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  resources:
    requests:
      {{- toYaml .Values.train.resources.requests | nindent 6 }}
      nvidia.com/gpu: {{ .Values.train.nprocPerNode }}
    limits:
      {{- toYaml .Values.train.resources.limits | nindent 6 }}
      nvidia.com/gpu: {{ .Values.train.nprocPerNode }}
  volumeMounts:
    - name: data
      mountPath: /data
      readOnly: true
    - name: runs
      mountPath: /runs
    - name: dshm
      mountPath: /dev/shm
    - name: tmp
      mountPath: /tmp
    {{- if .Values.tracking.credentialsSecret }}
    # MLflow's client reads ~/.mlflow/credentials (HOME is /tmp): the secret as a file, not in the environment.
    - name: mlflow-credentials
      mountPath: /tmp/.mlflow
      readOnly: true
    {{- end }}
{{- end -}}

{{- define "convnets.trainVolumes" -}}
- name: data
  persistentVolumeClaim:
    claimName: {{ include "convnets.claimName" (list . "data") }}
    readOnly: true
- name: runs
  persistentVolumeClaim:
    claimName: {{ include "convnets.claimName" (list . "runs") }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.train.shmSize }}
- name: tmp
  emptyDir: {}
{{- with .Values.tracking.credentialsSecret }}
- name: mlflow-credentials
  secret:
    secretName: {{ . }}
    items:
      - key: credentials
        path: credentials
{{- end }}
{{- end -}}
