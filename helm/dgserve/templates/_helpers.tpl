{{/* Names and labels. */}}
{{- define "dgserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dgserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{/* (40 characters: KubeRay derives pod and service names from the RayService name.) */}}

{{- define "dgserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dgserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "dgserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "dgserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "dgserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (toString .Values.image.tag) -}}
{{- end -}}

{{- define "dgserve.serveServiceName" -}}
{{- printf "%s-serve" (include "dgserve.fullname" .) -}}
{{- end -}}

{{- define "dgserve.apiKeysSecretName" -}}
{{- if .Values.apiKeys.existingSecret -}}
{{- .Values.apiKeys.existingSecret -}}
{{- else if .Values.apiKeys.create -}}
{{- printf "%s-api-keys" (include "dgserve.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Consistency checks that values.schema.json cannot express; called from the RayService template. */}}
{{- define "dgserve.validate" -}}
{{- $secret := include "dgserve.apiKeysSecretName" . -}}
{{- $keysFile := printf "%s/%s" (trimSuffix "/" .Values.apiKeys.mountPath) .Values.apiKeys.secretKey -}}
{{- $auth := .Values.dgserve.auth -}}
{{- if and $secret (ne (toString (index $auth "api_keys_file")) $keysFile) -}}
{{- fail (printf "apiKeys: the Secret is mounted as %s; set dgserve.auth.api_keys_file to that path" $keysFile) -}}
{{- end -}}
{{- if and (not $secret) (index $auth "api_keys_file") -}}
{{- fail "dgserve.auth.api_keys_file is set but no Secret provides it: set apiKeys.existingSecret (or apiKeys.create with apiKeys.keys)" -}}
{{- end -}}
{{- if and .Values.apiKeys.create (not .Values.apiKeys.keys) -}}
{{- fail "apiKeys.create is true but apiKeys.keys is empty" -}}
{{- end -}}
{{- if not (hasPrefix (trimSuffix "/" .Values.modelWeights.mountPath) (toString .Values.dgserve.model.path)) -}}
{{- fail (printf "dgserve.model.path (%s) must be under modelWeights.mountPath (%s)" .Values.dgserve.model.path .Values.modelWeights.mountPath) -}}
{{- end -}}
{{- if and (eq .Values.modelWeights.source "initContainer") (not .Values.modelWeights.initContainer.command) -}}
{{- fail "modelWeights.source is initContainer: give modelWeights.initContainer.command" -}}
{{- end -}}
{{- end -}}

{{/* Volumes shared by every Ray pod (head, workers, RayJob pods). */}}
{{- define "dgserve.volumes" -}}
- name: ray-tmp
  emptyDir:
    sizeLimit: {{ .Values.rayTmp.sizeLimit }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shm.sizeLimit }}
- name: models
{{- if eq .Values.modelWeights.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.modelWeights.pvc.claimName }}
    readOnly: true
{{- else if eq .Values.modelWeights.source "hostPath" }}
  hostPath:
    path: {{ .Values.modelWeights.hostPath.path }}
    type: {{ .Values.modelWeights.hostPath.type }}
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.modelWeights.initContainer.sizeLimit }}
{{- end }}
{{- with include "dgserve.apiKeysSecretName" . }}
- name: api-keys
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "dgserve.volumeMounts" -}}
- name: ray-tmp
  mountPath: /tmp
- name: shm
  mountPath: /dev/shm
- name: models
  mountPath: {{ .Values.modelWeights.mountPath }}
  readOnly: true
{{- if include "dgserve.apiKeysSecretName" . }}
- name: api-keys
  mountPath: {{ .Values.apiKeys.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Environment of every Ray container: HOME and caches on the writable /tmp (read-only root filesystem). */}}
{{- define "dgserve.env" -}}
- name: HOME
  value: /tmp/home
- name: XDG_CACHE_HOME
  value: /tmp/cache
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- end -}}

{{- define "dgserve.initContainers" -}}
{{- if eq .Values.modelWeights.source "initContainer" }}
{{- $ic := .Values.modelWeights.initContainer }}
- name: fetch-model
  image: {{ default (include "dgserve.image" .) $ic.image }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command:
    {{- toYaml $ic.command | nindent 4 }}
  {{- with $ic.env }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $ic.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  resources:
    {{- toYaml $ic.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.containerSecurityContext | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: {{ .Values.modelWeights.mountPath }}
    - name: ray-tmp
      mountPath: /tmp
{{- end }}
{{- end -}}

{{/* Container ports of a Ray node; `head` adds the head-only ones. */}}
{{- define "dgserve.ports" -}}
{{- if .head }}
- name: gcs-server
  containerPort: 6379
- name: dashboard
  containerPort: 8265
- name: client
  containerPort: 10001
{{- end }}
- name: serve
  containerPort: {{ .root.Values.dgserve.http.port }}
- name: metrics
  containerPort: 8080
{{- end -}}

{{/* The head group: a CPU pod that runs the Serve controller and the ingress, never a model replica.
     Called with (dict "root" $ "extraMounts" list "extraVolumes" list). */}}
{{- define "dgserve.headGroupSpec" -}}
{{- $extraMounts := .extraMounts -}}
{{- $extraVolumes := .extraVolumes -}}
{{- with .root -}}
rayStartParams:
  num-cpus: {{ .Values.head.rayCpus | quote }}
  num-gpus: "0"
  dashboard-host: 0.0.0.0
  metrics-export-port: "8080"
  {{- range $k, $v := .Values.head.rayStartParams }}
  {{ $k }}: {{ $v | quote }}
  {{- end }}
template:
  metadata:
    labels:
      {{- include "dgserve.labels" . | nindent 6 }}
      dgserve.ai/role: head
      {{- with .Values.head.podLabels }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- with .Values.head.podAnnotations }}
    annotations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
  spec:
    securityContext:
      {{- toYaml .Values.podSecurityContext | nindent 6 }}
    {{- with .Values.imagePullSecrets }}
    imagePullSecrets:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with include "dgserve.initContainers" . }}
    initContainers:
      {{- . | nindent 6 }}
    {{- end }}
    containers:
      - name: ray-head
        image: {{ include "dgserve.image" . }}
        imagePullPolicy: {{ .Values.image.pullPolicy }}
        ports:
          {{- include "dgserve.ports" (dict "root" . "head" true) | trim | nindent 10 }}
        env:
          {{- include "dgserve.env" . | nindent 10 }}
          {{- with .Values.head.env }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        resources:
          {{- toYaml .Values.head.resources | nindent 10 }}
        securityContext:
          {{- toYaml .Values.containerSecurityContext | nindent 10 }}
        volumeMounts:
          {{- include "dgserve.volumeMounts" . | nindent 10 }}
          {{- with $extraMounts }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
    volumes:
      {{- include "dgserve.volumes" . | nindent 6 }}
      {{- with $extraVolumes }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- with .Values.head.nodeSelector }}
    nodeSelector:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with .Values.head.tolerations }}
    tolerations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with .Values.head.affinity }}
    affinity:
      {{- toYaml . | nindent 6 }}
    {{- end }}
{{- end -}}
{{- end -}}

{{/* The GPU worker group; `.workers` holds replicas/minReplicas/maxReplicas (service or batch job). */}}
{{- define "dgserve.workerGroupSpec" -}}
{{- $root := .root -}}
{{- $w := $root.Values.workers -}}
- groupName: {{ $w.groupName }}
  replicas: {{ .workers.replicas }}
  minReplicas: {{ .workers.minReplicas }}
  maxReplicas: {{ .workers.maxReplicas }}
  rayStartParams:
    metrics-export-port: "8080"
    {{- range $k, $v := $w.rayStartParams }}
    {{ $k }}: {{ $v | quote }}
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "dgserve.labels" $root | nindent 8 }}
        dgserve.ai/role: worker
        {{- with $w.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $w.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with include "dgserve.initContainers" $root }}
      initContainers:
        {{- . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ include "dgserve.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          ports:
            {{- include "dgserve.ports" (dict "root" $root "head" false) | trim | nindent 12 }}
          env:
            {{- include "dgserve.env" $root | nindent 12 }}
            {{- with $w.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          resources:
            requests:
              {{- range $k, $v := $w.resources.requests }}
              {{ $k }}: {{ $v | quote }}
              {{- end }}
              {{ $w.gpuResource }}: {{ $w.gpusPerPod | quote }}
            limits:
              {{- range $k, $v := $w.resources.limits }}
              {{ $k }}: {{ $v | quote }}
              {{- end }}
              {{ $w.gpuResource }}: {{ $w.gpusPerPod | quote }}
          securityContext:
            {{- toYaml $root.Values.containerSecurityContext | nindent 12 }}
          volumeMounts:
            {{- include "dgserve.volumeMounts" $root | nindent 12 }}
            {{- with .extraMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        {{- include "dgserve.volumes" $root | nindent 8 }}
        {{- with .extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $w.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}

{{- define "dgserve.autoscalerOptions" -}}
upscalingMode: {{ .Values.autoscaler.upscalingMode }}
idleTimeoutSeconds: {{ .Values.autoscaler.idleTimeoutSeconds }}
resources:
  {{- toYaml .Values.autoscaler.resources | nindent 2 }}
securityContext:
  {{- toYaml .Values.containerSecurityContext | nindent 2 }}
env:
  {{- include "dgserve.env" . | nindent 2 }}
volumeMounts:
  - name: ray-tmp
    mountPath: /tmp
{{- end -}}
