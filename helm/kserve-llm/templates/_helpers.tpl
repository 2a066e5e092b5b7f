{{/* The InferenceService name (and prefix of everything else). */}}
{{- define "kserve-llm.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 45 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "kserve-llm.labels" -}}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Labels KServe puts on the serving pods: an InferenceService's predictor pods (head and Ray workers), or an
LLMInferenceService's workload pods (KServe's GetWorkloadLabelSelector; the router's scheduler pods are not selected). */}}
{{- define "kserve-llm.selector" -}}
{{- if eq .Values.kind "LLMInferenceService" -}}
app.kubernetes.io/name: {{ include "kserve-llm.fullname" . }}
app.kubernetes.io/part-of: llminferenceservice
kserve.io/component: workload
{{- else -}}
serving.kserve.io/inferenceservice: {{ include "kserve-llm.fullname" . }}
{{- end -}}
{{- end -}}

{{/* Every pod of this service (Ray/LWS workers, prefill pods and the router's scheduler included): peers that may
reach each other on any port (Ray, NCCL, NIXL KV transfer). */}}
{{- define "kserve-llm.peerSelector" -}}
{{- if eq .Values.kind "LLMInferenceService" -}}
app.kubernetes.io/name: {{ include "kserve-llm.fullname" . }}
app.kubernetes.io/part-of: llminferenceservice
{{- else -}}
serving.kserve.io/inferenceservice: {{ include "kserve-llm.fullname" . }}
{{- end -}}
{{- end -}}

{{/* The port the OpenAI API and /metrics are served on: 8080 in an InferenceService, 8000 (what KServe's workload
Service, InferencePool and scheduler target) in an LLMInferenceService. */}}
{{- define "kserve-llm.port" -}}
{{- if eq .Values.kind "LLMInferenceService" -}}8000{{- else -}}8080{{- end -}}
{{- end -}}

{{/* "true" when an LLMInferenceService serves HTTPS with KServe's self-signed certificate: llmisvc.tls, which when
unset (null) follows the engine (vLLM serves HTTPS as KServe's presets do; this predictor plain HTTP). */}}
{{- define "kserve-llm.tls" -}}
{{- $tls := .Values.llmisvc.tls -}}
{{- if kindIs "invalid" $tls -}}{{- $tls = eq .Values.engine "vllm" -}}{{- end -}}
{{- if and (eq .Values.kind "LLMInferenceService") $tls -}}true{{- end -}}
{{- end -}}

{{/* http, or https (kserve-llm.tls). */}}
{{- define "kserve-llm.scheme" -}}
{{- if include "kserve-llm.tls" . -}}https{{- else -}}http{{- end -}}
{{- end -}}

{{- define "kserve-llm.runtimeName" -}}
{{- .Values.servingRuntime.clusterServingRuntime | default (include "kserve-llm.fullname" .) -}}
{{- end -}}

{{/* Fail at template time on combinations that cannot work. */}}
{{- define "kserve-llm.validate" -}}
{{- $a := .Values.autoscaling -}}
{{- if gt (int $a.minReplicas) (int $a.maxReplicas) -}}
{{- fail (printf "autoscaling.minReplicas (%v) must not exceed autoscaling.maxReplicas (%v)" $a.minReplicas $a.maxReplicas) -}}
{{- end -}}
{{- if and (eq $a.mode "hpa") (eq (int $a.minReplicas) 0) -}}
{{- fail "autoscaling.mode=hpa cannot scale to zero (minReplicas 0): use keda, or kpa in Knative mode" -}}
{{- end -}}
{{- if and (eq $a.mode "kpa") (ne .Values.deploymentMode "Knative") -}}
{{- fail "autoscaling.mode=kpa needs deploymentMode=Knative" -}}
{{- end -}}
{{- if and (has $a.mode (list "hpa" "keda")) (eq .Values.deploymentMode "Knative") -}}
{{- fail (printf "autoscaling.mode=%s needs deploymentMode=Standard (Knative mode scales with kpa)" $a.mode) -}}
{{- end -}}
{{- if and (ne $a.mode "none") (eq (int $a.minReplicas) 0) (not (has $a.mode (list "kpa" "keda"))) -}}
{{- fail "scale-to-zero (minReplicas 0) needs autoscaling.mode kpa or keda" -}}
{{- end -}}
{{- $llmisvc := eq .Values.kind "LLMInferenceService" -}}
{{- if and (not (kindIs "invalid" .Values.canaryTrafficPercent)) $llmisvc -}}
{{- fail "canaryTrafficPercent is a Knative InferenceService feature: kind=LLMInferenceService has no canary revisions (roll out a second release behind the router instead)" -}}
{{- end -}}
{{- if and (not (kindIs "invalid" .Values.canaryTrafficPercent)) (ne .Values.deploymentMode "Knative") -}}
{{- fail "canaryTrafficPercent needs deploymentMode=Knative" -}}
{{- end -}}
{{- $mn := .Values.multiNode -}}
{{- if $mn.enabled -}}
{{- if ne $a.mode "none" -}}
{{- fail (printf "multiNode.enabled with autoscaling.mode=%s: KServe does not autoscale multi-node InferenceServices (set autoscaling.mode=none)" $a.mode) -}}
{{- end -}}
{{- if ne .Values.engine "vllm" -}}
{{- fail "multiNode.enabled: this predictor runs a model on one GPU of one node (no tensor or pipeline parallelism); set engine=vllm for multi-node serving (and for tensor parallelism over the GPUs of a pod)" -}}
{{- end -}}
{{- if and (not $llmisvc) (ne .Values.deploymentMode "Standard") -}}
{{- fail (printf "multiNode.enabled needs deploymentMode=Standard: KServe runs multi-node InferenceServices (workerSpec) as Deployments only, not in %s mode" .Values.deploymentMode) -}}
{{- end -}}
{{- if not (hasPrefix "pvc://" .Values.model.storageUri) -}}
{{- fail (printf "multiNode.enabled needs model.storageUri=pvc://<claim>/<path> on a ReadWriteMany PVC: the head and every worker pod mount the same weights (got %s)" .Values.model.storageUri) -}}
{{- end -}}
{{- if eq (int .Values.gpu.count) 0 -}}
{{- fail "multiNode.enabled needs GPUs: set gpu.count (GPUs per pod) to at least multiNode.tensorParallelSize" -}}
{{- end -}}
{{- if gt (int $mn.tensorParallelSize) (int .Values.gpu.count) -}}
{{- fail (printf "multiNode.tensorParallelSize (%v) exceeds gpu.count (%v), the GPUs per pod: a tensor-parallel group must fit in one pod; span pods with multiNode.pipelineParallelSize" $mn.tensorParallelSize .Values.gpu.count) -}}
{{- end -}}
{{- if lt (int $mn.pipelineParallelSize) 2 -}}
{{- fail (printf "multiNode.pipelineParallelSize (%v) must be at least 2, the pods of one replica: a model that fits one pod needs no multiNode (tensor parallel over gpu.count)" $mn.pipelineParallelSize) -}}
{{- end -}}
{{- if gt (int $a.minReplicas) 1 -}}
{{- fail (printf "multiNode.enabled serves one replica (one Ray head and its workers): set autoscaling.minReplicas=1 (got %v)" $a.minReplicas) -}}
{{- end -}}
{{- end -}}
{{- if $llmisvc -}}
{{- if ne .Values.deploymentMode "Standard" -}}
{{- fail "kind=LLMInferenceService has no Knative mode: KServe runs it as Deployments (LeaderWorkerSets when multi-node); set deploymentMode=Standard" -}}
{{- end -}}
{{- if has $a.mode (list "hpa" "kpa") -}}
{{- fail (printf "kind=LLMInferenceService scales with autoscaling.mode=keda (rendered as its spec.scaling.keda) or none; autoscaling.mode=%s is not supported" $a.mode) -}}
{{- end -}}
{{- if and (include "kserve-llm.tls" .) (ne .Values.engine "vllm") -}}
{{- fail "llmisvc.tls=true needs engine=vllm: this predictor serves plain HTTP; set llmisvc.tls=false" -}}
{{- end -}}
{{- if .Values.llmisvc.prefill.enabled -}}
{{- if ne .Values.engine "vllm" -}}
{{- fail "llmisvc.prefill.enabled needs engine=vllm: prefill/decode disaggregation moves the KV cache between pods (vLLM's NIXL connector), which this predictor does not implement" -}}
{{- end -}}
{{- if $mn.enabled -}}
{{- fail "llmisvc.prefill.enabled with multiNode.enabled is not supported by this chart: disaggregate single-node prefill and decode pods, or serve one multi-node pool" -}}
{{- end -}}
{{- end -}}
{{- else -}}
{{- if and (not .Values.servingRuntime.create) (not .Values.servingRuntime.clusterServingRuntime) -}}
{{- fail "set servingRuntime.create=true or name a servingRuntime.clusterServingRuntime" -}}
{{- end -}}
{{- end -}}
{{- include "kserve-llm.validateLora" . -}}
{{- $grace := int (include "kserve-llm.terminationGracePeriodSeconds" .) -}}
{{- if ge (int .Values.preStopSleepSeconds) $grace -}}
{{- fail (printf "preStopSleepSeconds (%v) must be less than the pods' terminationGracePeriodSeconds (%v, shutdownGracePeriod + 15): the kubelet kills the containers when the grace period ends, preStop sleep included, so no time would be left to drain; lower preStopSleepSeconds or raise shutdownGracePeriod" .Values.preStopSleepSeconds $grace) -}}
{{- end -}}
{{- if and .Values.tracing.enabled (not .Values.tracing.otlpEndpoint) -}}
{{- fail "tracing.enabled needs tracing.otlpEndpoint, the collector's OTLP/HTTP traces URL (e.g. http://otel-collector.observability:4318/v1/traces)" -}}
{{- end -}}
{{- end -}}

{{/* LoRA adapters: unique names, none equal to the served model's, and the combinations the chart can render. */}}
{{- define "kserve-llm.validateLora" -}}
{{- if and .Values.lora.runtimeUpdates .Values.multiNode.enabled -}}
{{- fail "lora.runtimeUpdates with multiNode.enabled is not supported by this chart: an adapter loaded at run time would have to reach every worker pod; serve it on a single-node replica" -}}
{{- end -}}
{{- with .Values.lora.adapters -}}
{{- $names := list -}}
{{- range . -}}
{{- if has .name $names -}}
{{- fail (printf "lora.adapters: the name %s appears twice; adapter names must be unique" .name) -}}
{{- end -}}
{{- if eq .name $.Values.model.name -}}
{{- fail (printf "lora.adapters: the name %s is model.name, the base model's; a request's model field could not tell them apart" .name) -}}
{{- end -}}
{{- $names = append $names .name -}}
{{- end -}}
{{- if $.Values.multiNode.enabled -}}
{{- fail "lora.adapters with multiNode.enabled is not supported by this chart: the adapters would have to reach every worker pod; serve them on a single-node replica" -}}
{{- end -}}
{{- if and (eq $.Values.kind "LLMInferenceService") (ne $.Values.engine "vllm") -}}
{{- fail "lora.adapters with kind=LLMInferenceService needs engine=vllm: KServe fetches spec.model.lora adapters for vLLM only; use kind=InferenceService for this predictor's adapters" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Predictor arguments shared by the runtime: the engine settings. */}}
{{- define "kserve-llm.args" -}}
- --model_name={{ .Values.model.name }}
- --model_dir=/mnt/models
- --dtype={{ .Values.model.dtype }}
- --max_num_seqs={{ .Values.model.maxNumSeqs }}
- --max_queue={{ .Values.model.maxQueue }}
- --request_timeout={{ .Values.model.requestTimeout }}
- --shutdown_grace_period={{ .Values.shutdownGracePeriod }}
{{- if .Values.model.maxModelLen }}
- --max_model_len={{ .Values.model.maxModelLen }}
{{- end }}
{{- with .Values.model.kvCacheMemory }}
- --kv_cache_memory={{ . }}
{{- end }}
{{- $adapters := and .Values.lora.adapters (eq .Values.kind "InferenceService") }}
{{- if $adapters }}
- --lora_modules
{{- range .Values.lora.adapters }}
- {{ .name }}=/mnt/adapters/{{ .name }}
{{- end }}
{{- end }}
{{- if or $adapters .Values.lora.runtimeUpdates }}
- --max_loras={{ .Values.lora.maxLoras }}
- --max_lora_rank={{ .Values.lora.maxLoraRank }}
{{- end }}
{{- if .Values.lora.runtimeUpdates }}
- --enable_lora_runtime_updates
{{- end }}
{{- if .Values.tracing.enabled }}
- --otlp_traces_endpoint={{ .Values.tracing.otlpEndpoint }}
{{- end }}
{{- with .Values.model.extraArgs }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* A map as YAML, the keys of .order first and in that order, then the others sorted; null values left out (Helm
already drops a default a user sets to null). dict: map, order. */}}
{{- define "kserve-llm.orderedYaml" -}}
{{- $rest := dict -}}
{{- range $k, $v := .map }}{{ if not (kindIs "invalid" $v) }}{{ $_ := set $rest $k $v }}{{ end }}{{ end -}}
{{- $parts := list -}}
{{- range .order -}}
{{- if hasKey $rest . -}}
{{- $parts = append $parts (toYaml (dict . (get $rest .)) | trim) -}}
{{- $_ := unset $rest . -}}
{{- end -}}
{{- end -}}
{{- if $rest -}}{{- $parts = append $parts (toYaml $rest | trim) -}}{{- end -}}
{{- join "\n" $parts -}}
{{- end -}}

{{/* The container securityContext (containerSecurityContext without "enabled"; checked by tests inside the custom
resources): the whole "securityContext:" entry, or nothing when disabled or empty. */}}
{{- define "kserve-llm.containerSecurityContext" -}}
{{- $sc := .Values.containerSecurityContext -}}
{{- if $sc.enabled -}}
{{- with include "kserve-llm.orderedYaml" (dict "map" (omit $sc "enabled") "order" (list "allowPrivilegeEscalation" "readOnlyRootFilesystem" "runAsNonRoot" "runAsUser" "capabilities" "seccompProfile")) -}}
securityContext:
  {{- . | nindent 2 }}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The pod securityContext entry (podSecurityContext without "enabled"), or nothing. dict: root, fsGroup (false: leave
fsGroup out, as the helm test pod does without a Secret volume). */}}
{{- define "kserve-llm.podSecurityContext" -}}
{{- $sc := .root.Values.podSecurityContext -}}
{{- if $sc.enabled -}}
{{- $map := omit $sc "enabled" -}}
{{- if not .fsGroup }}{{ $map = omit $map "fsGroup" }}{{ end -}}
{{- with include "kserve-llm.orderedYaml" (dict "map" $map "order" (list "runAsNonRoot" "runAsUser" "fsGroup" "seccompProfile")) -}}
securityContext:
  {{- . | nindent 2 }}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The ServiceAccount of the serving pods: serviceAccount.name, or the full name when the chart renders it; empty
(the namespace's default) otherwise. */}}
{{- define "kserve-llm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "kserve-llm.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The pods' terminationGracePeriodSeconds: the predictor's drain plus 15 s. */}}
{{- define "kserve-llm.terminationGracePeriodSeconds" -}}
{{- add (int .Values.shutdownGracePeriod) 15 -}}
{{- end -}}

{{/* The preStop sleep of a serving container (preStopSleepSeconds; none when 0): the pod leaves the Service's
endpoints, the Gateway's routes and llm-d's InferencePool before SIGTERM starts the drain. */}}
{{- define "kserve-llm.lifecycle" -}}
{{- with int .Values.preStopSleepSeconds -}}
lifecycle:
  preStop:
    exec:
      command: [sleep, {{ . | quote }}]
{{- end -}}
{{- end -}}

{{/* llm-d's role label of an LLMInferenceService's pods (llm-d.ai/role, as KServe and llm-d's scheduler spell it):
prefill pods "prefill", the main (decode) pods "decode" beside them and "both" when prefill is not disaggregated.
dict: root, role (main or prefill). */}}
{{- define "kserve-llm.llmdRole" -}}
{{- if eq .role "prefill" -}}prefill{{- else if .root.Values.llmisvc.prefill.enabled -}}decode{{- else -}}both{{- end -}}
{{- end -}}

{{/* Resources with the GPU count added. */}}
{{- define "kserve-llm.resources" -}}
{{- $r := deepCopy .Values.resources -}}
{{- if gt (int .Values.gpu.count) 0 -}}
{{- $req := default dict $r.requests -}}
{{- $_ := set $req .Values.gpu.resourceName (toString .Values.gpu.count) -}}
{{- $_ := set $r "requests" $req -}}
{{- $lim := default dict $r.limits -}}
{{- $_ := set $lim .Values.gpu.resourceName (toString .Values.gpu.count) -}}
{{- $_ := set $r "limits" $lim -}}
{{- end -}}
{{- toYaml $r -}}
{{- end -}}


{{/* vLLM engine arguments (after the model path and port): the same settings as the predictor's, plus the
parallelism. Multi-node: tensor parallel inside a pod, pipeline parallel across pods, Ray as the executor. */}}
{{- define "kserve-llm.vllmArgs" -}}
- --served-model-name={{ .Values.model.name }}
- --dtype={{ .Values.model.dtype }}
- --max-num-seqs={{ .Values.model.maxNumSeqs }}
- --gpu-memory-utilization={{ .Values.vllm.gpuMemoryUtilization }}
{{- if .Values.model.maxModelLen }}
- --max-model-len={{ .Values.model.maxModelLen }}
{{- end }}
{{- if .Values.multiNode.enabled }}
- --tensor-parallel-size={{ .Values.multiNode.tensorParallelSize }}
- --pipeline-parallel-size={{ .Values.multiNode.pipelineParallelSize }}
- --distributed-executor-backend=ray
{{- else if gt (int .Values.gpu.count) 1 }}
- --tensor-parallel-size={{ .Values.gpu.count }}
{{- end }}
{{- /* Loading adapters at run time needs --enable-lora even with none at start. */}}
{{- if or .Values.lora.adapters .Values.lora.runtimeUpdates }}
- --enable-lora
- --max-loras={{ .Values.lora.maxLoras }}
- --max-lora-rank={{ .Values.lora.maxLoraRank }}
{{- if and .Values.lora.adapters (eq .Values.kind "InferenceService") }}
- --lora-modules
{{- range .Values.lora.adapters }}
- {{ .name }}=/mnt/adapters/{{ .name }}
{{- end }}
{{- end }}
{{- end }}
{{- if .Values.tracing.enabled }}
- --otlp-traces-endpoint={{ .Values.tracing.otlpEndpoint }}
{{- end }}
{{- with .Values.vllm.extraArgs }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* vLLM's image. */}}
{{- define "kserve-llm.vllmImage" -}}
{{ .Values.vllm.image.repository }}:{{ .Values.vllm.image.tag }}
{{- end -}}

{{/* The serving container's image: this predictor's or vLLM's. */}}
{{- define "kserve-llm.image" -}}
{{- if eq .Values.engine "vllm" -}}
{{ include "kserve-llm.vllmImage" . }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{/* vLLM and Ray write caches and config under HOME: keep everything in the /tmp emptyDir, so the root filesystem
stays read-only. */}}
{{- define "kserve-llm.vllmEnv" -}}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: XDG_CONFIG_HOME
  value: /tmp/.config
- name: HF_HOME
  value: /tmp/hf
- name: VLLM_NO_USAGE_STATS
  value: "1"
- name: DO_NOT_TRACK
  value: "1"
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- end -}}

{{/* The OpenTelemetry service name of the spans: tracing.serviceName, or the full name. */}}
{{- define "kserve-llm.tracingServiceName" -}}
{{- .Values.tracing.serviceName | default (include "kserve-llm.fullname" .) -}}
{{- end -}}

{{/* Environment of the serving container (not of Ray workers) from auth, tracing and lora: the API key from its
Secret (KSERVE_LLM_API_KEY for this predictor, VLLM_API_KEY for vLLM, so that it never shows in the arguments),
the OpenTelemetry settings (the same names KServe's LLMInferenceService controller sets, which then keeps these)
and vLLM's switch for runtime LoRA loading. dict: root, role (as in kserve-llm.llmisvcContainer; "main" for an
InferenceService). Empty when none of them is on. */}}
{{- define "kserve-llm.featureEnv" -}}
{{- $v := .root.Values -}}
{{- $vllm := eq $v.engine "vllm" -}}
{{- with $v.auth.apiKey.existingSecret }}
- name: {{ ternary "VLLM_API_KEY" "KSERVE_LLM_API_KEY" $vllm }}
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $v.auth.apiKey.secretKey | quote }}
{{- end }}
{{- if $v.tracing.enabled }}
- name: OTEL_SERVICE_NAME
  value: {{ printf "%s%s" (include "kserve-llm.tracingServiceName" .root) (ternary "-prefill" "" (eq .role "prefill")) | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $v.tracing.sampler | quote }}
{{- if ne (toString $v.tracing.samplerArg) "" }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ toString $v.tracing.samplerArg | quote }}
{{- end }}
{{- if $vllm }}
{{- /* vLLM exports over gRPC unless told otherwise; tracing.otlpEndpoint is an OTLP/HTTP URL for both engines. */}}
- name: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL
  value: http/protobuf
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES_NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: OTEL_RESOURCE_ATTRIBUTES_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "k8s.namespace.name=%s,k8s.node.name=$(OTEL_RESOURCE_ATTRIBUTES_NODE_NAME),k8s.pod.name=$(OTEL_RESOURCE_ATTRIBUTES_POD_NAME)" .root.Release.Namespace | quote }}
{{- end }}
{{- if and $v.lora.runtimeUpdates $vllm }}
- name: VLLM_ALLOW_RUNTIME_LORA_UPDATING
  value: "True"
{{- end }}
{{- end -}}

{{/* Startup, readiness and liveness probes of the serving container. dict: root, port, scheme. vLLM answers /health;
this predictor /v2/health/ready and /v2/health/live. */}}
{{- define "kserve-llm.probes" -}}
{{- $v := .root.Values -}}
{{- $vllm := eq $v.engine "vllm" -}}
{{- $ready := ternary "/health" "/v2/health/ready" $vllm -}}
{{- $live := ternary "/health" "/v2/health/live" $vllm -}}
{{- $scheme := ternary ", scheme: HTTPS" "" (eq .scheme "https") -}}
startupProbe:
  httpGet: {path: {{ $ready }}, port: {{ .port }}{{ $scheme }}}
  periodSeconds: {{ $v.probes.periodSeconds }}
  failureThreshold: {{ $v.probes.startupFailureThreshold }}
readinessProbe:
  httpGet: {path: {{ $ready }}, port: {{ .port }}{{ $scheme }}}
  periodSeconds: {{ $v.probes.periodSeconds }}
  failureThreshold: 2
livenessProbe:
  httpGet: {path: {{ $live }}, port: {{ .port }}{{ $scheme }}}
  periodSeconds: 10
  failureThreshold: 6
{{- end -}}

{{/* Ray head, then vLLM: starts the head, waits until every node has joined, then runs `vllm serve` with the
arguments after the script ("$@"). dict: port (vLLM's), nodes (a shell expression for the node count). */}}
{{- define "kserve-llm.rayHeadScript" -}}
ray start --head --port=6379 --node-ip-address="${POD_IP}" --disable-usage-stats --include-dashboard=false || exit 1
nodes={{ .nodes }}
until [ "$(ray status --address="${POD_IP}:6379" 2>/dev/null | grep -c node_)" -ge "${nodes}" ]; do
  echo "waiting for ${nodes} Ray nodes"
  sleep 2
done
exec vllm serve /mnt/models --host=0.0.0.0 --port={{ .port }} "$@"
{{- end -}}

{{/* Ray worker: waits for the head's GCS, then joins it and blocks. dict: head (a shell expression host:port). */}}
{{- define "kserve-llm.rayWorkerScript" -}}
head={{ .head }}
until ray health-check --address="${head}" >/dev/null 2>&1; do
  echo "waiting for the Ray head at ${head}"
  sleep 5
done
exec ray start --address="${head}" --node-ip-address="${POD_IP}" --disable-usage-stats --block
{{- end -}}

{{/* Probes of a Ray worker container: its head's GCS answers (a worker whose head restarted must restart and
rejoin). dict: root, head. */}}
{{- define "kserve-llm.rayWorkerProbes" -}}
startupProbe:
  exec:
    command: [bash, -c, {{ printf "ray health-check --address=%s" .head | quote }}]
  periodSeconds: {{ .root.Values.probes.periodSeconds }}
  failureThreshold: {{ .root.Values.probes.startupFailureThreshold }}
livenessProbe:
  exec:
    command: [bash, -c, {{ printf "ray health-check --address=%s" .head | quote }}]
  periodSeconds: 10
  timeoutSeconds: 10
  failureThreshold: 6
{{- end -}}

{{/* Tolerations: the configured ones plus the GPU taint's when GPUs are requested. */}}
{{- define "kserve-llm.tolerations" -}}
{{- $tolerations := .Values.tolerations -}}
{{- if and (gt (int .Values.gpu.count) 0) .Values.gpu.tolerateTaint -}}
{{- $tolerations = append $tolerations (dict "key" .Values.gpu.resourceName "operator" "Exists" "effect" "NoSchedule") -}}
{{- end -}}
{{- with $tolerations -}}
{{ toYaml . }}
{{- end -}}
{{- end -}}

{{/* Pod-level settings shared by every serving pod (predictor, Ray worker, LLMInferenceService template, prefill,
worker): the pod security context, scheduling and the /tmp and /dev/shm volumes. */}}
{{- define "kserve-llm.podSpec" -}}
terminationGracePeriodSeconds: {{ include "kserve-llm.terminationGracePeriodSeconds" . }}
{{- with include "kserve-llm.serviceAccountName" . }}
serviceAccountName: {{ . }}
{{- end }}
{{- if not (and (eq .Values.kind "LLMInferenceService") .Values.llmisvc.prefill.enabled) }}
{{- /* Disaggregated decode pods run llm-d's routing sidecar, which needs the token (kserve-llm.llmisvcPod). */}}
automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
{{- end }}
{{- with include "kserve-llm.podSecurityContext" (dict "root" . "fsGroup" true) }}
{{ . }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (include "kserve-llm.tolerations" .) }}
tolerations:
  {{- . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
topologySpreadConstraints:
  {{- if .Values.topologySpreadConstraints }}
  {{- toYaml .Values.topologySpreadConstraints | nindent 2 }}
  {{- else }}
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "kserve-llm.selector" . | nindent 8 }}
  {{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
volumes:
  - name: tmp
    emptyDir: {}
  {{- if .Values.shm.enabled }}
  - name: dshm
    emptyDir:
      medium: Memory
      sizeLimit: {{ .Values.shm.sizeLimit }}
  {{- end }}
{{- end -}}

{{/* Mounts of the /tmp and /dev/shm volumes. */}}
{{- define "kserve-llm.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.shm.enabled }}
- name: dshm
  mountPath: /dev/shm
{{- end }}
{{- end -}}

{{/* The KEDA Prometheus trigger: the engine's queue length for this model (both engines export
vllm:num_requests_waiting with a model_name label). */}}
{{- define "kserve-llm.kedaTriggerMetadata" -}}
{{- $k := .Values.autoscaling.keda -}}
serverAddress: {{ $k.serverAddress | quote }}
query: {{ $k.query | default (printf "sum(vllm:num_requests_waiting{model_name=%q})" .Values.model.name) | quote }}
threshold: {{ $k.threshold | quote }}
{{- end -}}

{{/* A container of an LLMInferenceService pod. dict: root, role (main, prefill, leader or worker), port. KServe
merges it over its LLMInferenceServiceConfig presets by name (main), so command and args are always set here. */}}
{{- define "kserve-llm.llmisvcContainer" -}}
{{- $v := .root.Values -}}
{{- $vllm := eq $v.engine "vllm" -}}
{{- $tls := and $vllm (include "kserve-llm.tls" .root) -}}
- name: main
  image: {{ include "kserve-llm.image" .root | quote }}
  imagePullPolicy: {{ ternary $v.vllm.image.pullPolicy $v.image.pullPolicy $vllm }}
  {{- if eq .role "worker" }}
  command: [bash, -c]
  args:
    - {{ include "kserve-llm.rayWorkerScript" (dict "head" "\"${LWS_LEADER_ADDRESS}:6379\"") | quote }}
  {{- else if not $vllm }}
  command: [python, -m, predictor]
  args:
    - --http_port={{ .port }}
    - --grpc_port=8081
    {{- include "kserve-llm.args" .root | nindent 4 }}
  {{- else }}
  {{- if eq .role "leader" }}
  command: [bash, -c]
  args:
    - {{ include "kserve-llm.rayHeadScript" (dict "port" .port "nodes" "\"${LWS_GROUP_SIZE:-1}\"") | quote }}
    - vllm-ray-head
  {{- else }}
  command: [vllm, serve]
  args:
    - /mnt/models
    - --host=0.0.0.0
    - --port={{ .port }}
  {{- end }}
    {{- if $tls }}
    - --ssl-certfile=/etc/ssl/certs/tls.crt
    - --ssl-keyfile=/etc/ssl/certs/tls.key
    - --enable-ssl-refresh
    {{- end }}
    {{- if $v.llmisvc.prefill.enabled }}
    - '--kv-transfer-config={"kv_connector":"NixlConnector","kv_role":"kv_both"}'
    {{- end }}
    {{- include "kserve-llm.vllmArgs" .root | nindent 4 }}
  {{- end }}
  {{- $featureEnv := ternary "" (include "kserve-llm.featureEnv" . | trim) (eq .role "worker") }}
  {{- if or $vllm $v.model.env $featureEnv }}
  env:
    {{- if $vllm }}
    {{- include "kserve-llm.vllmEnv" .root | nindent 4 }}
    {{- if $v.llmisvc.prefill.enabled }}
    - name: VLLM_NIXL_SIDE_CHANNEL_HOST
      value: $(POD_IP)
    {{- end }}
    {{- end }}
    {{- with $featureEnv }}
    {{- . | nindent 4 }}
    {{- end }}
    {{- with $v.model.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  {{- with $v.model.secretName }}
  envFrom:
    - secretRef:
        name: {{ . }}
  {{- end }}
  {{- if ne .role "worker" }}
  ports:
    - name: http-engine
      containerPort: {{ .port }}
      protocol: TCP
  {{- end }}
  resources:
    {{- include "kserve-llm.resources" .root | nindent 4 }}
  {{- with include "kserve-llm.containerSecurityContext" .root }}
  {{- . | nindent 2 }}
  {{- end }}
  {{- if ne .role "worker" }}
  {{- with include "kserve-llm.lifecycle" .root }}
  {{- . | nindent 2 }}
  {{- end }}
  {{- end }}
  {{- if eq .role "worker" }}
  {{- include "kserve-llm.rayWorkerProbes" (dict "root" .root "head" "\"${LWS_LEADER_ADDRESS}:6379\"") | nindent 2 }}
  {{- else }}
  {{- include "kserve-llm.probes" (dict "root" .root "port" .port "scheme" (include "kserve-llm.scheme" .root)) | nindent 2 }}
  {{- end }}
  volumeMounts:
    {{- include "kserve-llm.volumeMounts" .root | nindent 4 }}
{{- end -}}

{{/* A pod of an LLMInferenceService (template, prefill.template or worker). dict: root, role, port. */}}
{{- define "kserve-llm.llmisvcPod" -}}
{{- include "kserve-llm.podSpec" .root }}
{{- if and (eq .role "main") .root.Values.llmisvc.prefill.enabled (include "kserve-llm.serviceAccountName" .root) }}
{{- /* llm-d's routing sidecar on the decode pods reads the API with this token; KServe binds its Role to the
ServiceAccount named here, whose own automountServiceAccountToken may be false. */}}
automountServiceAccountToken: true
{{- end }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
containers:
  {{- include "kserve-llm.llmisvcContainer" . | nindent 2 }}
{{- end -}}
