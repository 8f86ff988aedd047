{{/* Names, labels and the values every template derives from one place. */}}

{{- define "moe-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "moe-serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "moe-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "moe-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moe-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "moe-serve.labels" -}}
helm.sh/chart: {{ include "moe-serve.chart" . }}
{{ include "moe-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: moe-serve
{{- end }}

{{/* Pods that serve HTTP (Deployment pods, LWS leaders): what the Service and monitors select. */}}
{{- define "moe-serve.serverSelectorLabels" -}}
{{ include "moe-serve.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{- define "moe-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "moe-serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "moe-serve.image" -}}
{{- $variant := .Values.image.variant | default (ternary "cuda" "cpu" (gt (int .Values.gpu.count) 0)) }}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion $variant) .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* The model directory the server loads; "" for the bundled checkpoint (the server's default). */}}
{{- define "moe-serve.modelPath" -}}
{{- if ne .Values.model.source "bundled" }}
{{- $sub := trimAll "/" .Values.model.path }}
{{- if $sub }}{{ printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) $sub }}{{ else }}{{ .Values.model.mountPath }}{{ end }}
{{- end }}
{{- end }}

{{/* The name clients use and Prometheus' model_name label: always explicit, so the KEDA query
     and the server agree by construction. */}}
{{- define "moe-serve.servedModelName" -}}
{{- if .Values.server.servedModelName }}
{{- .Values.server.servedModelName }}
{{- else if and (ne .Values.model.source "bundled") (trimAll "/" .Values.model.path) }}
{{- base (trimAll "/" .Values.model.path) }}
{{- else if eq .Values.model.source "bundled" }}
{{- "tiny-mixtral" }}
{{- else }}
{{- include "moe-serve.fullname" . }}
{{- end }}
{{- end }}

{{- define "moe-serve.apiKeySecretName" -}}
{{- default (printf "%s-api-key" (include "moe-serve.fullname" .)) .Values.apiKey.existingSecret }}
{{- end }}

{{/* preStop sleep + drain + margin: Kubernetes counts the grace period from the start of preStop. */}}
{{- define "moe-serve.minTerminationGracePeriodSeconds" -}}
{{- $drain := ceil (float64 .Values.server.drainTimeout) | int }}
{{- add (int .Values.lifecycle.preStopSleepSeconds) $drain (int .Values.lifecycle.terminationGraceMarginSeconds) }}
{{- end }}

{{- define "moe-serve.terminationGracePeriodSeconds" -}}
{{- $min := include "moe-serve.minTerminationGracePeriodSeconds" . | int }}
{{- $set := .Values.lifecycle.terminationGracePeriodSeconds }}
{{- if kindIs "invalid" $set }}
{{- $min }}
{{- else if lt (int $set) $min }}
{{- fail (printf "lifecycle.terminationGracePeriodSeconds=%d is shorter than preStopSleepSeconds + server.drainTimeout + terminationGraceMarginSeconds = %d: in-flight requests would be killed" (int $set) $min) }}
{{- else }}
{{- int $set }}
{{- end }}
{{- end }}

{{/* Server flags as MOE_SERVE_* environment variables (the ConfigMap's data). */}}
{{- define "moe-serve.serverEnv" -}}
{{- $env := dict }}
{{- range $key, $value := .Values.server }}
{{- if not (or (kindIs "invalid" $value) (and (kindIs "string" $value) (eq $value ""))) }}
{{- $name := printf "MOE_SERVE_%s" ($key | snakecase | upper) }}
{{- if kindIs "bool" $value }}
{{- $_ := set $env $name (ternary "true" "false" $value) }}
{{- else if kindIs "float64" $value }}
{{- /* whole numbers without a trailing ".0" or exponent */}}
{{- if eq $value (floor $value) }}{{ $_ := set $env $name (printf "%d" (int64 $value)) }}{{ else }}{{ $_ := set $env $name (toString $value) }}{{ end }}
{{- else }}
{{- $_ := set $env $name (toString $value) }}
{{- end }}
{{- end }}
{{- end }}
{{- $_ := set $env "MOE_SERVE_SERVED_MODEL_NAME" (include "moe-serve.servedModelName" .) }}
{{- $_ := set $env "MOE_SERVE_CACHE_DIR" .Values.cache.mountPath }}
{{- with include "moe-serve.modelPath" . }}
{{- $_ := set $env "MOE_SERVE_MODEL" . }}
{{- end }}
{{- toYaml $env }}
{{- end }}

{{/* Fail early on combinations the schema cannot express. */}}
{{- define "moe-serve.validate" -}}
{{- $m := .Values.model }}
{{- if and (eq $m.source "pvc") (not $m.pvc.claimName) }}
{{- fail "model.source=pvc needs model.pvc.claimName" }}
{{- end }}
{{- if and (eq $m.source "hostPath") (not $m.hostPath.path) }}
{{- fail "model.source=hostPath needs model.hostPath.path" }}
{{- end }}
{{- if and (eq $m.source "download") (not (or $m.download.url (and $m.download.baseUrl $m.download.files))) }}
{{- fail "model.source=download needs model.download.url, or model.download.baseUrl and model.download.files" }}
{{- end }}
{{- if and (eq $m.source "huggingface") (not $m.huggingface.repo) }}
{{- fail "model.source=huggingface needs model.huggingface.repo (e.g. Qwen/Qwen3-30B-A3B)" }}
{{- end }}
{{- if and (eq $m.source "huggingface") (not (regexMatch "^[0-9a-f]{40}$" $m.huggingface.revision)) }}
{{- fail "model.source=huggingface needs model.huggingface.revision: a full 40-character commit hash (a branch or tag would move under the deployment)" }}
{{- end }}
{{- range $file, $_ := $m.download.checksums }}
{{- if not (has $file $m.download.files) }}
{{- fail (printf "model.download.checksums has an entry for %q, which is not in model.download.files" $file) }}
{{- end }}
{{- end }}
{{- range .Values.networkPolicy.groupPorts }}
{{- if and .endPort (lt (int .endPort) (int .port)) }}
{{- fail (printf "networkPolicy.groupPorts: endPort %d is below port %d" (int .endPort) (int .port)) }}
{{- end }}
{{- end }}
{{- if and .Values.apiKey.value .Values.apiKey.existingSecret }}
{{- fail "set apiKey.value or apiKey.existingSecret, not both" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must be <= autoscaling.maxReplicas" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled }}
{{- fail "enable metrics.serviceMonitor or metrics.podMonitor, not both (each would scrape every pod)" }}
{{- end }}
{{- if .Values.multiNode.enabled }}
{{- if ne .Values.server.engine "vllm" }}
{{- fail "multiNode.enabled needs server.engine=vllm (the native engine runs in one process)" }}
{{- end }}
{{- if lt (int .Values.gpu.count) 1 }}
{{- fail "multiNode.enabled needs gpu.count >= 1 (GPUs per pod)" }}
{{- end }}
{{- $tp := int (default 1 .Values.server.tensorParallelSize) }}
{{- $dp := int (default 1 .Values.server.dataParallelSize) }}
{{- $gpus := mul (int .Values.multiNode.size) (int .Values.gpu.count) }}
{{- if ne (mul $tp $dp) $gpus }}
{{- fail (printf "multiNode: server.tensorParallelSize (%d) x server.dataParallelSize (%d) must equal multiNode.size (%d) x gpu.count (%d) = %d GPUs per group" $tp $dp (int .Values.multiNode.size) (int .Values.gpu.count) $gpus) }}
{{- end }}
{{- $w := .Values.multiNode.rayWorkerPorts }}
{{- if gt (int $w.min) (int $w.max) }}
{{- fail (printf "multiNode.rayWorkerPorts: min (%d) must be <= max (%d)" (int $w.min) (int $w.max)) }}
{{- end }}
{{- $seen := dict (toString (int .Values.server.port)) "server.port" }}
{{- range include "moe-serve.rayPorts" . | fromYamlArray }}
{{- $name := first . }}
{{- $port := last . }}
{{- $key := toString (int $port) }}
{{- if hasKey $seen $key }}
{{- fail (printf "multiNode: Ray's %s port %s is also %s: give each its own port" $name $key (get $seen $key)) }}
{{- end }}
{{- if and (ge (int $port) (int $w.min)) (le (int $port) (int $w.max)) }}
{{- fail (printf "multiNode: Ray's %s port %s lies in multiNode.rayWorkerPorts (%d-%d)" $name $key (int $w.min) (int $w.max)) }}
{{- end }}
{{- $_ := set $seen $key (printf "Ray's %s port" $name) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Volumes shared by the Deployment's pods and the LWS leader. */}}
{{- define "moe-serve.volumes" -}}
- name: tmp
  emptyDir: {}
- name: cache
  emptyDir:
    {{- with .Values.cache.medium }}
    medium: {{ . }}
    {{- end }}
    sizeLimit: {{ .Values.cache.sizeLimit }}
{{- if or .Values.sharedMemory.enabled .Values.multiNode.enabled }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.sharedMemory.sizeLimit }}
{{- end }}
{{- $m := .Values.model }}
{{- if eq $m.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ $m.pvc.claimName }}
    readOnly: {{ $m.pvc.readOnly }}
{{- else if eq $m.source "hostPath" }}
- name: model
  hostPath:
    path: {{ $m.hostPath.path }}
    type: {{ $m.hostPath.type }}
{{- else if eq $m.source "download" }}
- name: model
  emptyDir:
    {{- with $m.download.medium }}
    medium: {{ . }}
    {{- end }}
    sizeLimit: {{ $m.download.sizeLimit }}
{{- else if eq $m.source "huggingface" }}
- name: model
  {{- if $m.huggingface.pvcClaimName }}
  persistentVolumeClaim:
    claimName: {{ $m.huggingface.pvcClaimName }}
  {{- else }}
  emptyDir:
    {{- with $m.huggingface.medium }}
    medium: {{ . }}
    {{- end }}
    sizeLimit: {{ $m.huggingface.sizeLimit }}
  {{- end }}
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "moe-serve.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: {{ .Values.cache.mountPath }}
{{- if or .Values.sharedMemory.enabled .Values.multiNode.enabled }}
- name: dshm
  mountPath: /dev/shm
{{- end }}
{{- if ne .Values.model.source "bundled" }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Ray's listening ports on each pod of a multi-node group, as a YAML list of [name, port]. Ray
     picks random ports for all but the GCS by default; the chart fixes them so the NetworkPolicy can
     name them. */}}
{{- define "moe-serve.rayPorts" -}}
{{- $p := .Values.multiNode.rayNodePorts }}
- [gcs, {{ int .Values.multiNode.rayPort }}]
- [node-manager, {{ int $p.nodeManager }}]
- [object-manager, {{ int $p.objectManager }}]
- [runtime-env-agent, {{ int $p.runtimeEnvAgent }}]
- [dashboard-agent-grpc, {{ int $p.dashboardAgentGrpc }}]
- [dashboard-agent-listen, {{ int $p.dashboardAgentHttp }}]
- [metrics-export, {{ int $p.metricsExport }}]
{{- end }}

{{/* `ray start` flags that pin every port a Ray node listens on (leader and workers alike). */}}
{{- define "moe-serve.rayStartPortFlags" -}}
{{- $p := .Values.multiNode.rayNodePorts }}
{{- $w := .Values.multiNode.rayWorkerPorts }}
{{- printf "--node-manager-port=%d --object-manager-port=%d --runtime-env-agent-port=%d --dashboard-agent-grpc-port=%d --dashboard-agent-listen-port=%d --metrics-export-port=%d --min-worker-port=%d --max-worker-port=%d" (int $p.nodeManager) (int $p.objectManager) (int $p.runtimeEnvAgent) (int $p.dashboardAgentGrpc) (int $p.dashboardAgentHttp) (int $p.metricsExport) (int $w.min) (int $w.max) }}
{{- end }}

{{/* NetworkPolicyPort list of what the pods of a multi-node group reach on each other: Ray's ports,
     its worker port range, and networkPolicy.groupPorts (collective communication). */}}
{{- define "moe-serve.groupPorts" -}}
{{- range include "moe-serve.rayPorts" . | fromYamlArray }}
- port: {{ int (last .) }}
  protocol: TCP
{{- end }}
- port: {{ int .Values.multiNode.rayWorkerPorts.min }}
  endPort: {{ int .Values.multiNode.rayWorkerPorts.max }}
  protocol: TCP
{{- range .Values.networkPolicy.groupPorts }}
- port: {{ int .port }}
  {{- with .endPort }}
  endPort: {{ int . }}
  {{- end }}
  protocol: {{ .protocol | default "TCP" }}
{{- end }}
{{- end }}

{{/* The init container that downloads the model into the emptyDir (model.source=download). */}}
{{- define "moe-serve.modelDownloadScript" -}}
set -eu
dest="$MODEL_DIR"
mkdir -p "$dest"
if [ -f "$dest/.moe-serve-complete" ]; then echo "model already in $dest"; exit 0; fi
fetch() {
  if [ -n "${MODEL_TOKEN:-}" ]; then
    curl -fsSL --retry 5 --retry-delay 2 -H "Authorization: Bearer $MODEL_TOKEN" -o "$1" "$2"
  else
    curl -fsSL --retry 5 --retry-delay 2 -o "$1" "$2"
  fi
}
if [ -n "${MODEL_URL:-}" ]; then
  archive="$dest/.moe-serve-archive"
  echo "downloading $MODEL_URL"
  fetch "$archive" "$MODEL_URL"
  if [ -n "${MODEL_SHA256:-}" ]; then
    echo "$MODEL_SHA256  $archive" | sha256sum -c -
  fi
  case "${MODEL_URL%%\?*}" in
    *.tar.gz|*.tgz) tar -xzf "$archive" -C "$dest" ;;
    *.tar) tar -xf "$archive" -C "$dest" ;;
    *.zip) unzip -q -o "$archive" -d "$dest" ;;
    *) echo "model.download.url must end in .tar, .tar.gz, .tgz or .zip" >&2; exit 2 ;;
  esac
  rm -f "$archive"
fi
# MODEL_CHECKSUMS: one "<sha256>  <file>" line per file of MODEL_FILES that has a checksum.
expected_sha256() {
  printf '%s\n' "${MODEL_CHECKSUMS:-}" | while read -r sum name; do
    if [ "$name" = "$1" ]; then echo "$sum"; break; fi
  done
}
for f in ${MODEL_FILES:-}; do
  echo "downloading $MODEL_BASE_URL/$f"
  mkdir -p "$dest/$(dirname "$f")"
  fetch "$dest/$f" "$MODEL_BASE_URL/$f"
  want="$(expected_sha256 "$f")"
  if [ -n "$want" ]; then
    got="$(sha256sum "$dest/$f" | cut -d ' ' -f 1)"
    if [ "$got" != "$want" ]; then
      rm -f "$dest/$f"
      echo "sha256 mismatch for $f: expected $want (model.download.checksums), downloaded $got" >&2
      exit 1
    fi
    echo "sha256 ok: $f"
  fi
done
touch "$dest/.moe-serve-complete"
echo "model ready in $dest"
{{- end }}

{{- define "moe-serve.initContainers" -}}
{{- if eq .Values.model.source "download" }}
{{- $d := .Values.model.download }}
- name: fetch-model
  image: "{{ $d.image.repository }}:{{ $d.image.tag }}"
  imagePullPolicy: {{ $d.image.pullPolicy }}
  command: ["/bin/sh", "-c"]
  args:
    - |
      {{- include "moe-serve.modelDownloadScript" . | nindent 6 }}
  env:
    - name: MODEL_DIR
      value: {{ include "moe-serve.modelPath" . | quote }}
    - name: MODEL_URL
      value: {{ $d.url | quote }}
    - name: MODEL_SHA256
      value: {{ $d.sha256 | quote }}
    - name: MODEL_BASE_URL
      value: {{ trimSuffix "/" $d.baseUrl | quote }}
    - name: MODEL_FILES
      value: {{ join " " $d.files | quote }}
    {{- $sums := list }}
    {{- range $f := $d.files }}
    {{- with get ($d.checksums | default dict) $f }}{{ $sums = append $sums (printf "%s  %s" (lower .) $f) }}{{ end }}
    {{- end }}
    - name: MODEL_CHECKSUMS
      value: {{ join "\n" $sums | quote }}
    {{- if $d.tokenSecret.name }}
    - name: MODEL_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ $d.tokenSecret.name }}
          key: {{ $d.tokenSecret.key }}
    {{- end }}
  {{- with $d.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: model
      mountPath: {{ .Values.model.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- if eq .Values.model.source "huggingface" }}
{{ include "moe-serve.hfInitContainer" . }}
{{- end }}
{{- end }}

{{/* Pod-level scheduling and security, shared by every pod the chart makes. */}}
{{- define "moe-serve.podScheduling" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
serviceAccountName: {{ include "moe-serve.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
# No Service env vars: a Service named "moe-serve" would inject MOE_SERVE_PORT=tcp://... and
# other MOE_SERVE_* variables, which the server reads as flags.
enableServiceLinks: false
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
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
{{- with .Values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Resources plus the GPU limit. Argument: dict "resources" (map) "gpu" (.Values.gpu). */}}
{{- define "moe-serve.resources" -}}
{{- $res := deepCopy (.resources | default dict) }}
{{- if gt (int .gpu.count) 0 }}
{{- $limits := get $res "limits" | default dict }}
{{- $_ := set $limits .gpu.resourceName (int .gpu.count) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{- define "moe-serve.podAnnotations" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- if .Values.apiKey.value }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end }}
{{- if .Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.server.port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The server container. Argument: dict "ctx" $ "command" (list or nil) "args" (list). */}}
{{- define "moe-serve.serverContainer" -}}
{{- $ := .ctx -}}
- name: moe-serve
  image: {{ include "moe-serve.image" $ | quote }}
  imagePullPolicy: {{ $.Values.image.pullPolicy }}
  {{- with .command }}
  command:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .args }}
  args:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  ports:
    - name: http
      containerPort: {{ $.Values.server.port }}
      protocol: TCP
  envFrom:
    - configMapRef:
        name: {{ include "moe-serve.fullname" $ }}
    {{- with $.Values.extraEnvFrom }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  env:
    - name: HOME
      value: /tmp
    {{- if or $.Values.apiKey.value $.Values.apiKey.existingSecret }}
    - name: MOE_SERVE_API_KEY
      valueFrom:
        secretKeyRef:
          name: {{ include "moe-serve.apiKeySecretName" $ }}
          key: {{ $.Values.apiKey.secretKey }}
    {{- end }}
    {{- with $.Values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $.Values.probes.startup }}
  {{- if .enabled }}
  startupProbe:
    httpGet:
      path: /health
      port: http
    initialDelaySeconds: {{ .initialDelaySeconds }}
    periodSeconds: {{ .periodSeconds }}
    timeoutSeconds: {{ .timeoutSeconds }}
    failureThreshold: {{ .failureThreshold }}
  {{- end }}
  {{- end }}
  {{- with $.Values.probes.liveness }}
  {{- if .enabled }}
  livenessProbe:
    httpGet:
      path: /health
      port: http
    initialDelaySeconds: {{ .initialDelaySeconds }}
    periodSeconds: {{ .periodSeconds }}
    timeoutSeconds: {{ .timeoutSeconds }}
    failureThreshold: {{ .failureThreshold }}
  {{- end }}
  {{- end }}
  {{- with $.Values.probes.readiness }}
  {{- if .enabled }}
  readinessProbe:
    httpGet:
      path: /ready
      port: http
    initialDelaySeconds: {{ .initialDelaySeconds }}
    periodSeconds: {{ .periodSeconds }}
    timeoutSeconds: {{ .timeoutSeconds }}
    failureThreshold: {{ .failureThreshold }}
    successThreshold: {{ .successThreshold }}
  {{- end }}
  {{- end }}
  {{- if gt (int $.Values.lifecycle.preStopSleepSeconds) 0 }}
  lifecycle:
    preStop:
      exec:
        command: ["sleep", {{ $.Values.lifecycle.preStopSleepSeconds | quote }}]
  {{- end }}
  resources:
    {{- include "moe-serve.resources" (dict "resources" $.Values.resources "gpu" $.Values.gpu) | nindent 4 }}
  securityContext:
    {{- toYaml $.Values.securityContext | nindent 4 }}
  volumeMounts:
    {{- include "moe-serve.volumeMounts" $ | nindent 4 }}
{{- end }}

{{/* What the HPA / ScaledObject scales: the Deployment, or the LeaderWorkerSet (it has a scale subresource). */}}
{{- define "moe-serve.scaleTargetRef" -}}
{{- if .Values.multiNode.enabled }}
apiVersion: leaderworkerset.x-k8s.io/v1
kind: LeaderWorkerSet
{{- else }}
apiVersion: apps/v1
kind: Deployment
{{- end }}
name: {{ include "moe-serve.fullname" . }}
{{- end }}

{{/* The `helm test` pod's script: /v1/models through the Service lists the served model. */}}
{{- define "moe-serve.helmTestScript" -}}
set -eu
if [ -n "${API_KEY:-}" ]; then
  body="$(curl -fsS --retry 10 --retry-delay 3 --retry-connrefused --max-time 10 -H "Authorization: Bearer $API_KEY" "$MODELS_URL")"
else
  body="$(curl -fsS --retry 10 --retry-delay 3 --retry-connrefused --max-time 10 "$MODELS_URL")"
fi
echo "$body"
case "$body" in
  *"\"id\":\"$SERVED_MODEL_NAME\""*) echo "ok: $SERVED_MODEL_NAME is served" ;;
  *) echo "GET $MODELS_URL does not list the model $SERVED_MODEL_NAME" >&2; exit 1 ;;
esac
{{- end }}

{{/* The init container's script for model.source=huggingface: `hf download` of one commit into
     the model volume; a marker file per commit makes a restart skip what is already there. */}}
{{- define "moe-serve.hfDownloadScript" -}}
set -eu
dest="$MODEL_DIR"
mkdir -p "$dest"
marker="$dest/.moe-serve-complete-$HF_REVISION"
if [ -f "$marker" ]; then echo "$HF_REPO@$HF_REVISION already in $dest"; exit 0; fi
set -- download "$HF_REPO" --revision "$HF_REVISION" --local-dir "$dest"
for p in ${HF_INCLUDE:-}; do set -- "$@" --include "$p"; done
for p in ${HF_EXCLUDE:-}; do set -- "$@" --exclude "$p"; done
echo "hf $*"
hf "$@"
touch "$marker"
echo "model $HF_REPO@$HF_REVISION ready in $dest"
{{- end }}

{{- define "moe-serve.hfInitContainer" -}}
{{- $h := .Values.model.huggingface }}
- name: hf-download
  image: {{ ternary (include "moe-serve.image" .) (printf "%s:%s" $h.image.repository $h.image.tag) (eq $h.image.repository "") | quote }}
  imagePullPolicy: {{ ternary .Values.image.pullPolicy $h.image.pullPolicy (eq $h.image.repository "") }}
  command: ["/bin/sh", "-c"]
  args:
    - |
      {{- include "moe-serve.hfDownloadScript" . | nindent 6 }}
  env:
    - name: HOME
      value: /tmp
    - name: HF_HOME
      value: /tmp/hf
    - name: HF_HUB_DISABLE_TELEMETRY
      value: "1"
    - name: MODEL_DIR
      value: {{ include "moe-serve.modelPath" . | quote }}
    - name: HF_REPO
      value: {{ $h.repo | quote }}
    - name: HF_REVISION
      value: {{ $h.revision | quote }}
    - name: HF_INCLUDE
      value: {{ join " " $h.include | quote }}
    - name: HF_EXCLUDE
      value: {{ join " " $h.exclude | quote }}
    {{- with $h.endpoint }}
    - name: HF_ENDPOINT
      value: {{ . | quote }}
    {{- end }}
    {{- if $h.tokenSecret.name }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ $h.tokenSecret.name }}
          key: {{ $h.tokenSecret.key }}
    {{- end }}
  {{- with $h.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: model
      mountPath: {{ .Values.model.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}
