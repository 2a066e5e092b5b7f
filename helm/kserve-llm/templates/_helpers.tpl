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

{{/* The label KServe puts on the predictor pods of an InferenceService. */}}
{{- define "kserve-llm.selector" -}}
serving.kserve.io/inferenceservice: {{ include "kserve-llm.fullname" . }}
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
{{- if and (not (kindIs "invalid" .Values.canaryTrafficPercent)) (ne .Values.deploymentMode "Knative") -}}
{{- fail "canaryTrafficPercent needs deploymentMode=Knative" -}}
{{- end -}}
{{- if .Values.multiNode.enabled -}}
{{- if ne $a.mode "none" -}}
{{- fail (printf "multiNode.enabled with autoscaling.mode=%s: KServe does not autoscale multi-node InferenceServices (set autoscaling.mode=none)" $a.mode) -}}
{{- end -}}
{{- fail "multiNode.enabled: this predictor runs a model on one node (no tensor or pipeline parallelism across nodes); use several GPUs on one node (gpu.count) instead" -}}
{{- end -}}
{{- if and (not .Values.servingRuntime.create) (not .Values.servingRuntime.clusterServingRuntime) -}}
{{- fail "set servingRuntime.create=true or name a servingRuntime.clusterServingRuntime" -}}
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
{{- with .Values.model.extraArgs }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Hardened container security context (checked by tests inside the custom resources). */}}
{{- define "kserve-llm.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 10001
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
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
