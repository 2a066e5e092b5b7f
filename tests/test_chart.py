"""The Helm chart and the container image, validated offline: helm lint and template over a matrix of values,
every rendered object against its real schema (KServe, KEDA CRDs from the repository's schemas/crds; core kinds with
kubernetes-validate) with unknown fields rejected, the template logic, and hadolint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import jsonschema
import pytest
import yaml
from conftest import REPO

from pipelines import k8s_schema

CHART = REPO / "helm" / "kserve-llm"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
CRDS = k8s_schema.crds_dir()
BIN = REPO / ".venv" / "bin"


def tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    assert path, f"{name} not found: `make install` puts it in .venv/bin"
    return str(path)


def helm_template(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("helm"), "template", "llm", str(CHART), *args], capture_output=True, text=True, timeout=60)


def render(*args: str) -> list[dict]:
    result = helm_template(*args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def require_crds() -> None:
    """The CRD schemas are in the repository (schemas/crds); only a KSERVE_LLM_CRDS pointing elsewhere can miss them."""
    if not CRDS.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{CRDS} is missing: CI must have the CRD schemas")
        pytest.skip(f"{CRDS} is missing (outside CI)")


def validate(doc: dict) -> None:
    if k8s_schema.is_custom(doc):
        require_crds()
    k8s_schema.validate(doc, CRDS)


@pytest.mark.parametrize("values", CI_VALUES, ids=[p.stem for p in CI_VALUES])
def test_lint_strict_and_every_object_validates(values):
    lint = subprocess.run([tool("helm"), "lint", "--strict", str(CHART), "-f", str(values)], capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = render("-f", str(values))
    assert len({"InferenceService", "LLMInferenceService"} & {d["kind"] for d in docs}) == 1
    for doc in docs:
        validate(doc)


def test_unknown_fields_are_rejected_by_the_crd_check():
    isvc = by_kind(render(), "InferenceService")[0]
    isvc["spec"]["predictor"]["model"]["storageUrl"] = "typo"
    with pytest.raises(k8s_schema.SchemaError, match="storageUrl"):
        validate(isvc)


def serving_pods(docs: list[dict]) -> list[dict]:
    """Every pod spec the custom resources carry: the predictor and its Ray workers (InferenceService), or the
    LLMInferenceService's template, prefill template and LeaderWorkerSet worker."""
    pods = []
    for isvc in by_kind(docs, "InferenceService"):
        pods += [isvc["spec"]["predictor"]] + ([isvc["spec"]["predictor"]["workerSpec"]] if "workerSpec" in isvc["spec"]["predictor"] else [])
    for llmisvc in by_kind(docs, "LLMInferenceService"):
        spec = llmisvc["spec"]
        pods += [spec["template"]] + [p for p in (spec.get("prefill", {}).get("template"), spec.get("worker")) if p]
    return pods


def predictor_containers(docs: list[dict]) -> list[dict]:
    """Every serving container: the InferenceService's model and worker containers and the ServingRuntime's (Ray
    workers included), or the LLMInferenceService's pod containers."""
    containers = []
    for isvc in by_kind(docs, "InferenceService"):
        containers += [isvc["spec"]["predictor"]["model"]] + isvc["spec"]["predictor"].get("workerSpec", {}).get("containers", [])
    for runtime in by_kind(docs, "ServingRuntime"):
        containers += runtime["spec"]["containers"] + runtime["spec"].get("workerSpec", {}).get("containers", [])
    for pod in [p for d in by_kind(docs, "LLMInferenceService") for p in serving_pods([d])]:
        containers += pod["containers"]
    return containers


@pytest.mark.parametrize("values", CI_VALUES, ids=[p.stem for p in CI_VALUES])
def test_security_defaults_inside_the_custom_resources(values):
    docs = render("-f", str(values))
    containers = predictor_containers(docs)
    assert containers
    for container in containers:
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
        assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
        if "image" in container and "vllm" in container["image"]:  # vLLM and Ray write under HOME: it is the /tmp emptyDir
            assert {"name": "HOME", "value": "/tmp"} in container["env"]
    for pod in serving_pods(docs):
        disaggregated = any("prefill" in d["spec"] for d in by_kind(docs, "LLMInferenceService"))
        assert pod.get("automountServiceAccountToken") is (None if disaggregated else False)  # llm-d's routing sidecar uses its ServiceAccount
        assert pod["securityContext"]["runAsNonRoot"] and {v["name"] for v in pod["volumes"]} >= {"tmp"}
        for container in pod.get("containers", []):
            assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/tmp"}
    for isvc in by_kind(docs, "InferenceService"):
        assert {m["mountPath"] for m in isvc["spec"]["predictor"]["model"]["volumeMounts"]} >= {"/tmp"}


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "autoscaling.mode=hpa", "--set", "autoscaling.minReplicas=0"], "cannot scale to zero"),
        (["--set", "autoscaling.minReplicas=5", "--set", "autoscaling.maxReplicas=2"], "must not exceed"),
        (["--set", "autoscaling.mode=kpa"], "needs deploymentMode=Knative"),
        (["--set", "deploymentMode=Knative", "--set", "autoscaling.mode=keda"], "needs deploymentMode=Standard"),
        (["--set", "canaryTrafficPercent=10"], "canaryTrafficPercent needs deploymentMode=Knative"),
        (["--set", "servingRuntime.create=false"], "clusterServingRuntime"),
        (
            ["--set", "multiNode.enabled=true", "--set", "autoscaling.mode=hpa"],
            "multiNode.enabled with autoscaling.mode=hpa: KServe does not autoscale multi-node",
        ),
        (["--set", "multiNode.enabled=true", "-f", str(CHART / "ci" / "keda-values.yaml")], "multiNode.enabled with autoscaling.mode=keda"),
        (["--set", "multiNode.enabled=true"], "runs a model on one GPU of one node (no tensor or pipeline parallelism); set engine=vllm"),
        (["-f", str(CHART / "ci" / "vllm-multinode-values.yaml"), "--set", "deploymentMode=Knative"], "multiNode.enabled needs deploymentMode=Standard"),
        (
            ["-f", str(CHART / "ci" / "vllm-multinode-values.yaml"), "--set", "model.storageUri=s3://models/llama"],
            "needs model.storageUri=pvc://<claim>/<path> on a ReadWriteMany PVC",
        ),
        (["-f", str(CHART / "ci" / "vllm-multinode-values.yaml"), "--set", "gpu.count=4"], "multiNode.tensorParallelSize (8) exceeds gpu.count (4)"),
        (["-f", str(CHART / "ci" / "vllm-multinode-values.yaml"), "--set", "gpu.count=0"], "multiNode.enabled needs GPUs"),
        (["-f", str(CHART / "ci" / "vllm-multinode-values.yaml"), "--set", "autoscaling.minReplicas=2"], "multiNode.enabled serves one replica"),
        (["-f", str(CHART / "ci" / "llmisvc-values.yaml"), "--set", "autoscaling.mode=hpa"], "kind=LLMInferenceService scales with autoscaling.mode=keda"),
        (
            ["-f", str(CHART / "ci" / "llmisvc-values.yaml"), "--set", "deploymentMode=Knative", "--set", "autoscaling.mode=kpa"],
            "kind=LLMInferenceService has no Knative mode",
        ),
        (["--set", "kind=LLMInferenceService", "--set", "llmisvc.tls=true"], "llmisvc.tls=true needs engine=vllm"),
        (["--set", "kind=LLMInferenceService", "--set", "canaryTrafficPercent=10"], "LLMInferenceService has no canary"),
        (["-f", str(CHART / "ci" / "vllm-multinode-values.yaml"), "--set", "multiNode.pipelineParallelSize=1"], "must be at least 2"),
        (["-f", str(CHART / "ci" / "llmisvc-values.yaml"), "--set", "llmisvc.prefill.enabled=true"], "llmisvc.prefill.enabled needs engine=vllm"),
        (
            ["-f", str(CHART / "ci" / "vllm-multinode-values.yaml"), "--set", "kind=LLMInferenceService", "--set", "llmisvc.prefill.enabled=true"],
            "not supported by this chart",
        ),
        (["--set", "engine=sglang"], "engine"),
        (["-f", str(CHART / "ci" / "lora-adapters-values.yaml"), "--set", "lora.adapters[1].name=sql"], "the name sql appears twice"),
        (["-f", str(CHART / "ci" / "lora-adapters-values.yaml"), "--set", "lora.adapters[0].name=base"], "the name base is model.name"),
        (["-f", str(CHART / "ci" / "lora-adapters-values.yaml"), "--set", "kind=LLMInferenceService"], "needs engine=vllm"),
        (
            ["-f", str(CHART / "ci" / "vllm-multinode-values.yaml"), "--set", "lora.adapters[0].name=a", "--set", "lora.adapters[0].storageUri=s3://a"],
            "lora.adapters with multiNode",
        ),
        (["--set", "lora.adapters[0].name=Bad_Name", "--set", "lora.adapters[0].storageUri=s3://a"], "name"),
        (["--set", "tracing.enabled=true"], "tracing.enabled needs tracing.otlpEndpoint"),
        (["--set", "tracing.otlpEndpoint=otel-collector:4317"], "/tracing/otlpEndpoint"),
        (["--set", "tracing.sampler=xray"], "/tracing/sampler"),
        (["--set", "tracing.samplerArg=0.5"], "at '/tracing/sampler': value must be one of 'parentbased_traceidratio', 'traceidratio'"),
        (["--set", "tracing.sampler=traceidratio", "--set", "tracing.samplerArg=2"], "/tracing/samplerArg"),
        (["--set", "tracing.sampler=traceidratio", "--set-string", "tracing.samplerArg=half"], "/tracing/samplerArg"),
        (["--set", "auth.apiKey.existingSecret=Bad_Name"], "/auth/apiKey/existingSecret"),
        (["--set", "auth.apiKey.existingSecret=llm-api-key", "--set", "auth.apiKey.secretKey="], "/auth/apiKey/secretKey"),
        (["--set", "auth.apiKey.token=abc"], "token"),
        (["--set-string", "lora.runtimeUpdates=yes"], "/lora/runtimeUpdates"),
        (
            ["-f", str(CHART / "ci" / "vllm-multinode-values.yaml"), "--set", "lora.runtimeUpdates=true"],
            "lora.runtimeUpdates with multiNode.enabled is not supported",
        ),
        (["--set", "model.storageUri=ftp://x"], "storageUri"),
        (["--set", "autoscaling.mode=fast"], "mode"),
        (["--set", "gpu.count=-1"], "count"),
        (["--set", "model.notAValue=1"], "notAValue"),
        # security contexts, ServiceAccount, pod metadata and the preStop sleep: wrong types and unknown names
        (["--set-string", "podSecurityContext.runAsUser=nobody"], "/podSecurityContext/runAsUser"),
        (["--set", "podSecurityContext.fsGroup=-1"], "/podSecurityContext/fsGroup"),
        (["--set-string", "podSecurityContext.enabled=yes"], "/podSecurityContext/enabled"),
        (["--set", "podSecurityContext.runAsUsr=1"], "invalid propertyName 'runAsUsr'"),
        (["--set-string", "containerSecurityContext.readOnlyRootFilesystem=no"], "/containerSecurityContext/readOnlyRootFilesystem"),
        (["--set", "containerSecurityContext.capabilities=ALL"], "/containerSecurityContext/capabilities"),
        (["--set", "containerSecurityContext.privilegd=true"], "invalid propertyName 'privilegd'"),
        (["--set-string", "serviceAccount.create=true"], "/serviceAccount/create"),
        (["--set", "serviceAccount.name=Bad_Name"], "/serviceAccount/name"),
        (["--set", "serviceAccount.annotations.x=1"], "/serviceAccount/annotations/x"),
        (["--set-string", "serviceAccount.automountServiceAccountToken=false"], "/serviceAccount/automountServiceAccountToken"),
        (["--set", "serviceAccount.token=abc"], "token"),
        (["--set", "podLabels.team=1"], "/podLabels/team"),
        (["--set-string", "podLabels.team=ml platform"], "/podLabels/team"),
        (["--set", "podAnnotations=inject"], "/podAnnotations"),
        (["--set-string", "preStopSleepSeconds=5"], "/preStopSleepSeconds"),
        (["--set", "preStopSleepSeconds=-1"], "/preStopSleepSeconds"),
        (
            ["--set", "preStopSleepSeconds=45"],
            "preStopSleepSeconds (45) must be less than the pods' terminationGracePeriodSeconds (45, shutdownGracePeriod + 15)",
        ),
        (
            ["-f", str(CHART / "ci" / "llmisvc-vllm-values.yaml"), "--set", "shutdownGracePeriod=0", "--set", "preStopSleepSeconds=15"],
            "(15, shutdownGracePeriod + 15)",
        ),
    ],
)
def test_invalid_values_fail_at_template_time(args, message):
    result = helm_template(*args)
    assert result.returncode != 0
    assert message in result.stderr


def test_gpu_toleration_and_resources_only_with_gpus():
    cpu = by_kind(render(), "InferenceService")[0]["spec"]["predictor"]
    assert "tolerations" not in cpu and "nvidia.com/gpu" not in json.dumps(cpu["model"]["resources"])
    gpu = by_kind(render("--set", "gpu.count=2"), "InferenceService")[0]["spec"]["predictor"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]
    assert gpu["model"]["resources"]["limits"]["nvidia.com/gpu"] == "2" == gpu["model"]["resources"]["requests"]["nvidia.com/gpu"]
    mig = by_kind(render("--set", "gpu.count=1", "--set", "gpu.resourceName=nvidia.com/mig-1g.10gb"), "InferenceService")[0]
    assert json.loads(mig["metadata"]["annotations"]["serving.kserve.io/gpu-resource-types"]) == ["nvidia.com/mig-1g.10gb"]


def test_keda_scales_the_predictor_deployment_on_its_queue_and_omits_replicas():
    docs = render("-f", str(CHART / "ci" / "keda-values.yaml"))
    isvc = by_kind(docs, "InferenceService")[0]
    assert "minReplicas" not in isvc["spec"]["predictor"] and "maxReplicas" not in isvc["spec"]["predictor"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "external"
    (scaled,) = by_kind(docs, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == f"{isvc['metadata']['name']}-predictor"
    assert scaled["spec"]["minReplicaCount"] == 0
    assert "vllm:num_requests_waiting" in scaled["spec"]["triggers"][0]["metadata"]["query"]


def test_knative_scale_to_zero_and_canary():
    docs = render("-f", str(CHART / "ci" / "knative-scale-to-zero-values.yaml"))
    isvc = by_kind(docs, "InferenceService")[0]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"
    assert isvc["spec"]["predictor"]["minReplicas"] == 0
    assert isvc["spec"]["predictor"]["annotations"]["autoscaling.knative.dev/metric"] == "concurrency"
    canary = by_kind(render("-f", str(CHART / "ci" / "canary-values.yaml")), "InferenceService")[0]
    assert canary["spec"]["predictor"]["canaryTrafficPercent"] == 10


def test_pdb_selects_the_inferenceservice_pods_and_grace_period_covers_the_drain():
    docs = render("-f", str(CHART / "ci" / "pvc-hpa-values.yaml"))
    (pdb,) = by_kind(docs, "PodDisruptionBudget")
    isvc = by_kind(docs, "InferenceService")[0]
    assert pdb["spec"]["selector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"]}
    args = isvc["spec"]["predictor"]["model"]["args"]
    drain = int(next(a for a in args if a.startswith("--shutdown_grace_period=")).split("=")[1])
    assert isvc["spec"]["predictor"]["terminationGracePeriodSeconds"] > drain


def _keys(values: dict, schema: dict, path: str = "") -> list[str]:
    problems = []
    props = schema.get("properties", {})
    for key, value in values.items():
        if key not in props:
            problems.append(f"{path}{key} is in values.yaml but not in values.schema.json")
        elif isinstance(value, dict) and props[key].get("properties"):
            problems += _keys(value, props[key], f"{path}{key}.")
    for key in props:
        if key not in values:
            problems.append(f"{path}{key} is in values.schema.json but not in values.yaml")
    return problems


def test_values_schema_matches_values_yaml():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert _keys(values, schema) == []
    jsonschema.validate(values, schema)


def test_every_value_is_documented():
    """Every key has a "# --" comment above it, or sits inside a documented map (e.g. resources.requests.cpu)."""
    undocumented, documented_at = [], {}  # indentation -> whether the enclosing key there was documented
    lines = (CHART / "values.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        documented_at = {k: v for k, v in documented_at.items() if k < indent}
        own = lines[i - 1].strip().startswith("# --")
        inherited = any(documented_at.values())
        documented_at[indent] = own or inherited
        is_leaf = not stripped.endswith(":")
        if is_leaf and not (own or inherited):
            undocumented.append(stripped)
    assert undocumented == []


def test_dockerfile_passes_hadolint():
    result = subprocess.run([tool("hadolint"), str(REPO / "images" / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (REPO / "images" / "Dockerfile").read_text()
    assert "USER 10001" in text and 'ENTRYPOINT ["python", "-m", "predictor"]' in text


def test_readme_values_table_is_current():
    import sys

    sys.path.insert(0, str(REPO / "tools"))
    from values_table import table

    assert table(CHART / "values.yaml") in (REPO / "README.md").read_text()


def test_monitoring_dashboard_and_helm_test_pod():
    docs = render("-f", str(CHART / "ci" / "keda-values.yaml"))
    (monitor,) = by_kind(docs, "PodMonitor")
    isvc = by_kind(docs, "InferenceService")[0]
    assert monitor["spec"]["selector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"]}
    (dashboard,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    panels = json.loads(dashboard["data"]["kserve-llm.json"])["panels"]
    queries = " ".join(t["expr"] for p in panels for t in p["targets"])
    for metric in (
        "vllm:request_success_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:num_preemptions_total",
        "vllm:generation_tokens_total",
    ):
        assert metric in queries, metric
    (test_pod,) = [d for d in by_kind(docs, "Pod") if d["metadata"]["annotations"].get("helm.sh/hook") == "test"]
    script = test_pod["spec"]["containers"][0]["args"][0]
    assert "/v1/models" in script and "/v1/completions" in script and '"stream": True' in script
    compile(script, "smoke_test.py", "exec")


def test_helm_test_script_passes_against_the_real_server(server):
    import sys

    from conftest import MODEL_NAME

    env = {**os.environ, "BASE_URL": server.url, "MODEL_NAME": MODEL_NAME}
    result = subprocess.run([sys.executable, str(CHART / "files" / "smoke_test.py")], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok:" in result.stdout


@pytest.mark.parametrize("framework,directory", [("helm", "helm/kserve-llm"), ("kustomize", "manifests")])
def test_checkov_finds_no_failed_check(framework, directory):
    """checkov (offline: --skip-download) with helm and kubectl on PATH; skips in the chart carry a reason each.
    checkov does not look inside KServe's custom resources: the security tests above cover those."""
    checkov = REPO / ".venv-checkov" / "bin" / "checkov"
    assert checkov.exists(), "`make install` creates .venv-checkov"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        [str(checkov), "--skip-download", "--quiet", "--compact", "--framework", framework, "-d", str(REPO / directory)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Failed checks: 0" in result.stdout or not result.stdout.strip()


def test_hpa_scales_on_utilisation_with_a_scale_down_window():
    isvc = by_kind(render("-f", str(CHART / "ci" / "pvc-hpa-values.yaml")), "InferenceService")[0]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "hpa"
    scaling = isvc["spec"]["predictor"]["autoScaling"]
    assert scaling["metrics"][0]["resource"] == {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}
    assert scaling["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert (isvc["spec"]["predictor"]["minReplicas"], isvc["spec"]["predictor"]["maxReplicas"]) == (2, 6)


def test_vllm_engine_runtime_serves_the_model_on_8080_with_health_probes():
    docs = render("-f", str(CHART / "ci" / "vllm-values.yaml"))
    isvc = by_kind(docs, "InferenceService")[0]
    (runtime,) = by_kind(docs, "ServingRuntime")
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "vllm" == runtime["spec"]["supportedModelFormats"][0]["name"]
    assert model["runtime"] == runtime["metadata"]["name"] and "workerSpec" not in isvc["spec"]["predictor"]
    (container,) = runtime["spec"]["containers"]
    assert container["image"] == "vllm/vllm-openai:v0.11.0" and container["command"] == ["vllm", "serve"]
    assert container["args"] == ["/mnt/models", "--host=0.0.0.0", "--port=8080"]
    assert {"--served-model-name=qwen", "--max-model-len=4096", "--gpu-memory-utilization=0.85", "--enable-prefix-caching"} <= set(model["args"])
    assert not any(a.startswith("--tensor-parallel-size") for a in model["args"])  # one GPU
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health" and container[probe]["httpGet"]["port"] == 8080
    (policy,) = by_kind(docs, "NetworkPolicy")
    assert {"port": 8080, "protocol": "TCP"} in policy["spec"]["ingress"][0]["ports"]


def test_vllm_multinode_head_and_ray_workers():
    docs = render("-f", str(CHART / "ci" / "vllm-multinode-values.yaml"))
    isvc = by_kind(docs, "InferenceService")[0]
    predictor = isvc["spec"]["predictor"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "none"
    assert (predictor["workerSpec"]["tensorParallelSize"], predictor["workerSpec"]["pipelineParallelSize"]) == (8, 2)
    assert (
        predictor["workerSpec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8" == predictor["model"]["resources"]["limits"]["nvidia.com/gpu"]
    )
    assert predictor["model"]["storageUri"].startswith("pvc://")
    args = predictor["model"]["args"]
    assert {"--served-model-name=llama-70b", "--tensor-parallel-size=8", "--pipeline-parallel-size=2", "--distributed-executor-backend=ray"} <= set(args)
    assert not {e["name"] for e in predictor["model"].get("env", [])} & {"TENSOR_PARALLEL_SIZE", "PIPELINE_PARALLEL_SIZE"}  # KServe rejects them
    (runtime,) = by_kind(docs, "ServingRuntime")
    head = runtime["spec"]["containers"][0]
    assert head["command"] == ["bash", "-c"] and "ray start --head" in head["args"][0] and "exec vllm serve /mnt/models" in head["args"][0]
    assert '"$@"' in head["args"][0] and head["livenessProbe"]["httpGet"]["path"] == "/health"
    worker_spec = runtime["spec"]["workerSpec"]
    assert (worker_spec["tensorParallelSize"], worker_spec["pipelineParallelSize"]) == (8, 2)
    (worker,) = worker_spec["containers"]
    assert worker["name"] == "worker-container" == predictor["workerSpec"]["containers"][0]["name"]
    assert "ray start --address" in worker["args"][0] and "--block" in worker["args"][0]
    assert "ray health-check" in worker["livenessProbe"]["exec"]["command"][-1] and "startupProbe" in worker
    # head and workers reach each other on every port (Ray, NCCL); Prometheus scrapes the head only
    (policy,) = by_kind(docs, "NetworkPolicy")
    assert {"from": [{"podSelector": {"matchLabels": {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"]}}}]} in policy["spec"]["ingress"]
    (monitor,) = by_kind(docs, "PodMonitor")
    assert monitor["spec"]["selector"]["matchExpressions"] == [{"key": "app.kubernetes.io/component", "operator": "NotIn", "values": ["ray-worker"]}]
    assert worker_spec["labels"] == {"app.kubernetes.io/component": "ray-worker"}


LLMISVC_POD_LABELS = {"app.kubernetes.io/part-of": "llminferenceservice", "kserve.io/component": "workload"}


def test_llminferenceservice_for_the_predictor_has_no_runtime_and_selects_its_workload_pods():
    docs = render("-f", str(CHART / "ci" / "llmisvc-values.yaml"))
    assert {"InferenceService", "ServingRuntime", "ScaledObject"}.isdisjoint(d["kind"] for d in docs)
    (llmisvc,) = by_kind(docs, "LLMInferenceService")
    assert llmisvc["apiVersion"] == "serving.kserve.io/v1alpha1"
    name, spec = llmisvc["metadata"]["name"], llmisvc["spec"]
    assert spec["model"] == {"uri": "pvc://models/demo", "name": "demo"} and spec["replicas"] == 2
    assert "router" not in spec and "prefill" not in spec and "worker" not in spec
    (main,) = spec["template"]["containers"]
    assert main["name"] == "main" and main["command"] == ["python", "-m", "predictor"] and "--http_port=8000" in main["args"]
    assert main["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8000}
    selector = {"app.kubernetes.io/name": name, **LLMISVC_POD_LABELS}
    for kind in ("PodDisruptionBudget", "NetworkPolicy", "PodMonitor"):
        (doc,) = by_kind(docs, kind)
        matched = doc["spec"]["selector"]["matchLabels"] if kind != "NetworkPolicy" else doc["spec"]["podSelector"]["matchLabels"]
        assert matched == selector, kind
    (monitor,) = by_kind(docs, "PodMonitor")
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "http-engine" == main["ports"][0]["name"]
    (test_pod,) = by_kind(docs, "Pod")
    assert {"name": "BASE_URL", "value": f"http://{name}-kserve-workload-svc.default.svc.cluster.local:8000"} in test_pod["spec"]["containers"][0]["env"]


def test_llminferenceservice_with_vllm_router_prefill_keda_and_multinode():
    docs = render("-f", str(CHART / "ci" / "llmisvc-vllm-values.yaml"))
    (llmisvc,) = by_kind(docs, "LLMInferenceService")
    spec = llmisvc["spec"]
    assert spec["router"] == {"gateway": {}, "route": {}, "scheduler": {}} and spec["prefill"]["replicas"] == 2
    assert "replicas" not in spec and not by_kind(docs, "ScaledObject")  # KServe scales its own workload from spec.scaling
    assert (spec["scaling"]["minReplicas"], spec["scaling"]["maxReplicas"]) == (1, 4)
    assert "vllm:num_requests_waiting" in spec["scaling"]["keda"]["triggers"][0]["metadata"]["query"]
    decode, prefill = spec["template"]["containers"][0], spec["prefill"]["template"]["containers"][0]
    assert "--port=8001" in decode["args"] and "--port=8000" in prefill["args"]  # decode sits behind llm-d's routing sidecar
    for container in (decode, prefill):
        assert "--served-model-name=qwen-7b" in container["args"] and "--ssl-certfile=/etc/ssl/certs/tls.crt" in container["args"]
        assert any(a.startswith("--kv-transfer-config=") and "NixlConnector" in a for a in container["args"])
        assert container["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    (monitor,) = by_kind(docs, "PodMonitor")
    assert monitor["spec"]["podMetricsEndpoints"][0]["scheme"] == "https"
    (test_pod,) = by_kind(docs, "Pod")
    assert {"name": "TLS_VERIFY", "value": "false"} in test_pod["spec"]["containers"][0]["env"]
    # multi-node vLLM as an LLMInferenceService: a LeaderWorkerSet of a Ray head and workers
    docs = render("-f", str(CHART / "ci" / "vllm-multinode-values.yaml"), "--set", "kind=LLMInferenceService")
    spec = by_kind(docs, "LLMInferenceService")[0]["spec"]
    assert spec["parallelism"] == {"tensor": 8, "pipeline": 2} and spec["replicas"] == 1
    leader, worker = spec["template"]["containers"][0], spec["worker"]["containers"][0]
    assert "ray start --head" in leader["args"][0] and "LWS_GROUP_SIZE" in leader["args"][0]
    assert {"--tensor-parallel-size=8", "--pipeline-parallel-size=2", "--distributed-executor-backend=ray"} <= set(leader["args"])
    assert "LWS_LEADER_ADDRESS" in worker["args"][0] and worker["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_lora_adapters_are_fetched_by_kserve_and_passed_to_either_engine():
    values = str(CHART / "ci" / "lora-adapters-values.yaml")
    predictor = by_kind(render("-f", values), "InferenceService")[0]["spec"]["predictor"]
    assert "storageUri" not in predictor["model"]  # storageUris replaces it: base and adapters fetched side by side
    assert [(u["uri"], u["mountPath"]) for u in predictor["storageUris"]] == [
        ("s3://models/qwen2.5-7b-instruct", "/mnt/models"),
        ("s3://adapters/qwen-sql-lora", "/mnt/adapters/sql"),
        ("pvc://adapters/support-lora", "/mnt/adapters/support"),
    ]
    args = predictor["model"]["args"]
    start = args.index("--lora_modules")
    assert args[start + 1 : start + 3] == ["sql=/mnt/adapters/sql", "support=/mnt/adapters/support"]
    assert {"--max_loras=2", "--max_lora_rank=32", "--model_dir=/mnt/models"} <= set(args)
    vllm = by_kind(render("-f", values, "--set", "engine=vllm"), "InferenceService")[0]["spec"]["predictor"]["model"]["args"]
    assert {"--enable-lora", "--max-loras=2", "--max-lora-rank=32"} <= set(vllm)
    assert vllm[vllm.index("--lora-modules") + 1] == "sql=/mnt/adapters/sql"
    llmisvc = by_kind(render("-f", values, "--set", "engine=vllm", "--set", "kind=LLMInferenceService"), "LLMInferenceService")[0]
    assert llmisvc["spec"]["model"]["lora"] == {
        "adapters": [{"name": "sql", "uri": "s3://adapters/qwen-sql-lora"}, {"name": "support", "uri": "pvc://adapters/support-lora"}],
        "maxAdapters": 2,
        "maxRank": 32,
    }
    validate(llmisvc)


HARDENED = str(CHART / "ci" / "hardened-values.yaml")
HARDENED_LLMISVC = str(CHART / "ci" / "llmisvc-vllm-hardened-values.yaml")
TRACES_URL = "http://otel-collector.observability:4318/v1/traces"


def env_of(container: dict) -> dict[str, dict]:
    """A container's env entries by name (each a {value} or {valueFrom})."""
    return {e["name"]: {k: v for k, v in e.items() if k != "name"} for e in container.get("env", [])}


def helm_test_pod(docs: list[dict]) -> dict:
    (pod,) = [d for d in by_kind(docs, "Pod") if d["metadata"]["annotations"].get("helm.sh/hook") == "test"]
    return pod


def secret_ref(name: str, key: str) -> dict:
    return {"valueFrom": {"secretKeyRef": {"name": name, "key": key}}}


def test_api_key_comes_from_the_secret_as_env_for_either_engine_and_kind():
    docs = render("-f", HARDENED)
    for doc in docs:
        validate(doc)
    model = by_kind(docs, "InferenceService")[0]["spec"]["predictor"]["model"]
    env = env_of(model)
    assert env["KSERVE_LLM_API_KEY"] == secret_ref("llm-api-key", "api-key") and "VLLM_API_KEY" not in env
    assert not any("api_key" in a or "llm-api-key" in a for a in model["args"])  # the key never shows in the pod's arguments
    (runtime,) = by_kind(docs, "ServingRuntime")
    (container,) = runtime["spec"]["containers"]
    assert "env" not in container  # the runtime (shared, or a ClusterServingRuntime) carries no per-release secret
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # probes stay on the open health routes
        assert container[probe]["httpGet"]["path"] in ("/v2/health/ready", "/v2/health/live")
    # the helm test pod reads the same Secret as a file and sends the key
    pod = helm_test_pod(docs)["spec"]
    (test_container,) = pod["containers"]
    assert {"name": "API_KEY_FILE", "value": "/etc/kserve-llm/api-key/key"} in test_container["env"]
    assert {"name": "api-key", "mountPath": "/etc/kserve-llm/api-key", "readOnly": True} in test_container["volumeMounts"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "api-key"]
    assert volume["secret"] == {"secretName": "llm-api-key", "items": [{"key": "api-key", "path": "key"}], "defaultMode": 0o440}
    assert pod["securityContext"]["fsGroup"] == 10001
    # the NetworkPolicy does not change with a key
    assert by_kind(docs, "NetworkPolicy") == by_kind(render("-f", HARDENED, "--set", "auth.apiKey.existingSecret="), "NetworkPolicy")
    # vLLM reads VLLM_API_KEY
    vllm = by_kind(render("-f", HARDENED, "--set", "engine=vllm"), "InferenceService")[0]["spec"]["predictor"]["model"]
    assert env_of(vllm)["VLLM_API_KEY"] == secret_ref("llm-api-key", "api-key") and "KSERVE_LLM_API_KEY" not in env_of(vllm)
    # LLMInferenceService with vLLM: decode and prefill pods, and the helm test pod, get the key
    docs = render("-f", HARDENED_LLMISVC)
    spec = by_kind(docs, "LLMInferenceService")[0]["spec"]
    for container in (spec["template"]["containers"][0], spec["prefill"]["template"]["containers"][0]):
        assert env_of(container)["VLLM_API_KEY"] == secret_ref("qwen-api-key", "key") and env_of(container)["HOME"] == {"value": "/tmp"}
    assert helm_test_pod(docs)["spec"]["volumes"][-1]["secret"]["secretName"] == "qwen-api-key"
    # LLMInferenceService with this predictor
    main = by_kind(render("-f", str(CHART / "ci" / "llmisvc-values.yaml"), "--set", "auth.apiKey.existingSecret=demo-key"), "LLMInferenceService")[0]
    assert env_of(main["spec"]["template"]["containers"][0])["KSERVE_LLM_API_KEY"] == secret_ref("demo-key", "api-key")
    validate(main)
    # multi-node: the head serves the API; Ray workers get no key
    multinode = ["-f", str(CHART / "ci" / "vllm-multinode-values.yaml"), "--set", "auth.apiKey.existingSecret=llama-key"]
    predictor = by_kind(render(*multinode), "InferenceService")[0]["spec"]["predictor"]
    assert "VLLM_API_KEY" in env_of(predictor["model"]) and "VLLM_API_KEY" not in env_of(predictor["workerSpec"]["containers"][0])
    spec = by_kind(render(*multinode, "--set", "kind=LLMInferenceService"), "LLMInferenceService")[0]["spec"]
    assert "VLLM_API_KEY" in env_of(spec["template"]["containers"][0]) and "VLLM_API_KEY" not in env_of(spec["worker"]["containers"][0])


def test_defaults_render_no_key_tracing_or_runtime_lora():
    docs = render()
    model = by_kind(docs, "InferenceService")[0]["spec"]["predictor"]["model"]
    assert "env" not in model
    assert not any(a.startswith(("--otlp", "--enable_lora", "--max_lora")) for a in model["args"])
    pod = helm_test_pod(docs)["spec"]
    assert [v["name"] for v in pod["volumes"]] == ["tmp"] and "fsGroup" not in pod["securityContext"]
    assert "API_KEY_FILE" not in env_of(pod["containers"][0])
    llmisvc = by_kind(render("-f", str(CHART / "ci" / "llmisvc-vllm-values.yaml")), "LLMInferenceService")[0]
    assert "tracing" not in llmisvc["spec"]
    assert not set(env_of(llmisvc["spec"]["template"]["containers"][0])) & {"VLLM_API_KEY", "OTEL_SERVICE_NAME", "VLLM_ALLOW_RUNTIME_LORA_UPDATING"}


def test_tracing_args_env_and_the_llminferenceservice_spec_tracing():
    model = by_kind(render("-f", HARDENED), "InferenceService")[0]["spec"]["predictor"]["model"]
    assert f"--otlp_traces_endpoint={TRACES_URL}" in model["args"]
    env = env_of(model)
    assert env["OTEL_SERVICE_NAME"] == {"value": "demo-predictor"}
    assert env["OTEL_TRACES_SAMPLER"] == {"value": "parentbased_traceidratio"} and env["OTEL_TRACES_SAMPLER_ARG"] == {"value": "0.25"}
    assert env["OTEL_RESOURCE_ATTRIBUTES_POD_NAME"] == {"valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    assert env["OTEL_RESOURCE_ATTRIBUTES"]["value"].startswith("k8s.namespace.name=default,")
    names = [e["name"] for e in model["env"]]  # $(VAR) references resolve only to variables defined before them
    assert names.index("OTEL_RESOURCE_ATTRIBUTES_POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")
    assert "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL" not in env  # the predictor speaks OTLP/HTTP only
    # vLLM: its flag, and OTLP/HTTP instead of its default gRPC; the service name defaults to the full name
    vllm = by_kind(render("-f", HARDENED, "--set", "engine=vllm", "--set", "tracing.serviceName="), "InferenceService")[0]
    model = vllm["spec"]["predictor"]["model"]
    assert f"--otlp-traces-endpoint={TRACES_URL}" in model["args"] and not any(a.startswith("--otlp_traces") for a in model["args"])
    assert env_of(model)["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == {"value": "http/protobuf"}
    assert env_of(model)["OTEL_SERVICE_NAME"] == {"value": vllm["metadata"]["name"]}
    # LLMInferenceService with vLLM: KServe's spec.tracing too, and prefill spans named apart
    docs = render("-f", HARDENED_LLMISVC)
    (llmisvc,) = by_kind(docs, "LLMInferenceService")
    spec, name = llmisvc["spec"], llmisvc["metadata"]["name"]
    assert spec["tracing"] == {"exporterEndpoint": TRACES_URL, "sampler": "traceidratio", "samplerArg": "0.1"}
    decode, prefill = spec["template"]["containers"][0], spec["prefill"]["template"]["containers"][0]
    for container in (decode, prefill):
        # set by the chart, so KServe's injection (which skips present flags and variables) keeps them
        assert f"--otlp-traces-endpoint={TRACES_URL}" in container["args"]
        assert env_of(container)["OTEL_TRACES_SAMPLER_ARG"] == {"value": "0.1"}
    assert env_of(decode)["OTEL_SERVICE_NAME"] == {"value": name} and env_of(prefill)["OTEL_SERVICE_NAME"] == {"value": f"{name}-prefill"}
    # LLMInferenceService with this predictor: spec.tracing too; KServe then adds vLLM's flags, which the predictor accepts
    values = ["-f", str(CHART / "ci" / "llmisvc-values.yaml"), "--set", "tracing.enabled=true", "--set", f"tracing.otlpEndpoint={TRACES_URL}"]
    llmisvc = by_kind(render(*values), "LLMInferenceService")[0]
    validate(llmisvc)
    assert llmisvc["spec"]["tracing"] == {"exporterEndpoint": TRACES_URL, "sampler": "parentbased_always_on"}
    from predictor.server import build_parser

    injected = build_parser().parse_args(["--otlp_traces_endpoint=x", "--otlp-traces-endpoint", TRACES_URL, "--collect-detailed-traces", "all"])
    assert injected.otlp_traces_endpoint == TRACES_URL
    main = llmisvc["spec"]["template"]["containers"][0]
    assert f"--otlp_traces_endpoint={TRACES_URL}" in main["args"] and env_of(main)["OTEL_TRACES_SAMPLER"] == {"value": "parentbased_always_on"}
    assert "OTEL_TRACES_SAMPLER_ARG" not in env_of(main)


def test_runtime_lora_updates_for_either_engine():
    model = by_kind(render("-f", HARDENED), "InferenceService")[0]["spec"]["predictor"]["model"]
    assert {"--enable_lora_runtime_updates", "--max_loras=2", "--max_lora_rank=32"} <= set(model["args"]) and "--lora_modules" not in model["args"]
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env_of(model)
    # with adapters fetched at start as well
    args = by_kind(render("-f", str(CHART / "ci" / "lora-adapters-values.yaml"), "--set", "lora.runtimeUpdates=true"), "InferenceService")[0]
    args = args["spec"]["predictor"]["model"]["args"]
    assert args[args.index("--lora_modules") + 1 : args.index("--lora_modules") + 3] == ["sql=/mnt/adapters/sql", "support=/mnt/adapters/support"]
    assert args.count("--max_loras=2") == 1 and "--enable_lora_runtime_updates" in args
    # vLLM needs --enable-lora for runtime loading even with no adapter at start, and its environment switch
    vllm = by_kind(render("-f", HARDENED, "--set", "engine=vllm"), "InferenceService")[0]["spec"]["predictor"]["model"]
    assert {"--enable-lora", "--max-loras=2", "--max-lora-rank=32"} <= set(vllm["args"]) and "--lora-modules" not in vllm["args"]
    assert env_of(vllm)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == {"value": "True"}
    spec = by_kind(render("-f", HARDENED_LLMISVC), "LLMInferenceService")[0]["spec"]
    assert "lora" not in spec["model"]
    for container in (spec["template"]["containers"][0], spec["prefill"]["template"]["containers"][0]):
        assert "--enable-lora" in container["args"] and env_of(container)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == {"value": "True"}
    # this predictor as an LLMInferenceService loads adapters at run time too (lora.adapters there needs vLLM)
    main = by_kind(render("-f", str(CHART / "ci" / "llmisvc-values.yaml"), "--set", "lora.runtimeUpdates=true"), "LLMInferenceService")[0]
    assert {"--enable_lora_runtime_updates", "--max_loras=4"} <= set(main["spec"]["template"]["containers"][0]["args"])


def test_helm_test_script_sends_the_mounted_api_key(tiny_model_dir, tmp_path):
    """The helm test script against the real predictor started as the chart starts it with auth.apiKey: the key(s) in
    KSERVE_LLM_API_KEY, the Secret's value mounted as the script's API_KEY_FILE."""
    import sys

    import httpx
    from conftest import MODEL_NAME, start_server, stop_server

    server = start_server(tiny_model_dir, tmp_path, env={"KSERVE_LLM_API_KEY": "first-key,second-key"})
    try:
        for content, passes in (("first-key,second-key\n", True), ("second-key", True), ("wrong-key", False)):
            key_file = tmp_path / "key"
            key_file.write_text(content)
            env = {**os.environ, "BASE_URL": server.url, "MODEL_NAME": MODEL_NAME, "API_KEY_FILE": str(key_file)}
            result = subprocess.run([sys.executable, str(CHART / "files" / "smoke_test.py")], env=env, capture_output=True, text=True, timeout=120)
            assert (result.returncode == 0) is passes, content + result.stdout + result.stderr
            if passes:
                assert "a request without the API key refused" in result.stdout
        for path in ("/v2/health/ready", "/v2/health/live", "/metrics"):  # the probes' and Prometheus' routes stay open
            assert httpx.get(f"{server.url}{path}", timeout=30).status_code == 200, path
    finally:
        stop_server(server)


HARDENED_POD = {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}}
HARDENED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
OPENSHIFT = str(CHART / "ci" / "openshift-values.yaml")
LLMISVC = str(CHART / "ci" / "llmisvc-values.yaml")
LLMISVC_VLLM = str(CHART / "ci" / "llmisvc-vllm-values.yaml")
MULTINODE = str(CHART / "ci" / "vllm-multinode-values.yaml")
# One render of each pod layout: the predictor (InferenceService, ServingRuntime), vLLM over Ray (head and workers),
# and LLMInferenceServices with this predictor, with vLLM disaggregated, and multi-node.
LAYOUTS = {
    "isvc": [],
    "isvc-multinode": ["-f", MULTINODE],
    "llmisvc": ["-f", LLMISVC],
    "llmisvc-disaggregated": ["-f", LLMISVC_VLLM],
    "llmisvc-multinode": ["-f", MULTINODE, "--set", "kind=LLMInferenceService"],
}


def all_containers(docs: list[dict]) -> list[dict]:
    """Every serving container and the helm test pod's."""
    return predictor_containers(docs) + [c for pod in by_kind(docs, "Pod") for c in pod["spec"]["containers"]]


def all_pods(docs: list[dict]) -> list[dict]:
    """Every serving pod spec and the helm test pod's."""
    return serving_pods(docs) + [pod["spec"] for pod in by_kind(docs, "Pod")]


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_security_contexts_come_from_values_and_default_to_the_hardened_ones(layout):
    args = LAYOUTS[layout]
    docs = render(*args)
    for container in all_containers(docs):
        assert container["securityContext"] == HARDENED_CONTAINER, container["name"]
    for pod in serving_pods(docs):
        assert pod["securityContext"] == HARDENED_POD
    assert helm_test_pod(docs)["spec"]["securityContext"] == {k: v for k, v in HARDENED_POD.items() if k != "fsGroup"}  # no Secret volume
    # OpenShift: the SCC assigns the UID and fsGroup, so the chart sets neither (null drops a default); the rest stays
    docs = render(*args, "-f", OPENSHIFT)
    for container in all_containers(docs):
        assert container["securityContext"] == {k: v for k, v in HARDENED_CONTAINER.items() if k != "runAsUser"}
    for pod in all_pods(docs):
        assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    for doc in docs:
        validate(doc)
    # other Kubernetes fields pass through; a changed one reaches every container
    docs = render(*args, "--set", "podSecurityContext.runAsGroup=10002", "--set", "containerSecurityContext.runAsUser=2000")
    assert all(pod["securityContext"]["runAsGroup"] == 10002 for pod in all_pods(docs))
    assert all(c["securityContext"]["runAsUser"] == 2000 for c in all_containers(docs))
    # disabled: no securityContext at all (the platform's admission sets one)
    docs = render(*args, "--set", "podSecurityContext.enabled=false", "--set", "containerSecurityContext.enabled=false")
    assert not any("securityContext" in x for x in all_pods(docs) + all_containers(docs))
    for doc in docs:
        validate(doc)


def test_the_default_render_keeps_the_hardened_security_context_in_key_order():
    """The values reproduce what the templates hard-coded, key order included, so manifests/ did not change."""
    text = helm_template("--show-only", "templates/inferenceservice.yaml").stdout
    pod = text[text.index("    securityContext:") :].split("\n")[1:6]
    assert [line.strip() for line in pod] == ["runAsNonRoot: true", "runAsUser: 10001", "fsGroup: 10001", "seccompProfile:", "type: RuntimeDefault"]
    container = text[text.index("      securityContext:") :].split("\n")[1:9]
    keys = [line.strip().split(":")[0] for line in container if not line.strip().startswith(("-", "type"))]
    assert keys == ["allowPrivilegeEscalation", "readOnlyRootFilesystem", "runAsNonRoot", "runAsUser", "capabilities", "drop", "seccompProfile"]


def test_service_account_create_name_annotations_and_token():
    # default: the namespace's default ServiceAccount, no token
    docs = render()
    assert not by_kind(docs, "ServiceAccount")
    assert all("serviceAccountName" not in pod and pod["automountServiceAccountToken"] is False for pod in serving_pods(docs))
    # rendered, with a cloud-identity annotation: every serving pod runs as it
    irsa = {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/llm-models-read"}
    for args in LAYOUTS.values():
        docs = render(*args, "-f", OPENSHIFT)
        (account,) = by_kind(docs, "ServiceAccount")
        validate(account)
        name = account["metadata"]["name"]
        assert name == "llm-kserve-llm" and account["metadata"]["annotations"] == irsa and account["automountServiceAccountToken"] is False
        assert {pod["serviceAccountName"] for pod in serving_pods(docs)} == {name}
    named = by_kind(render("--set", "serviceAccount.create=true", "--set", "serviceAccount.name=models-reader"), "ServiceAccount")[0]
    assert named["metadata"]["name"] == "models-reader"
    # an existing one, and a token when asked for
    docs = render(*LAYOUTS["isvc-multinode"], "--set", "serviceAccount.name=existing", "--set", "serviceAccount.automountServiceAccountToken=true")
    assert not by_kind(docs, "ServiceAccount")
    for pod in serving_pods(docs):  # the predictor's head and its Ray workers
        assert pod["serviceAccountName"] == "existing" and pod["automountServiceAccountToken"] is True
    # disaggregated decode pods mount the token for llm-d's routing sidecar (KServe binds its Role to the account)
    spec = by_kind(render("-f", LLMISVC_VLLM, "-f", OPENSHIFT), "LLMInferenceService")[0]["spec"]
    decode, prefill = spec["template"], spec["prefill"]["template"]
    assert decode["serviceAccountName"] == prefill["serviceAccountName"] == "llm-kserve-llm"
    assert decode["automountServiceAccountToken"] is True and "automountServiceAccountToken" not in prefill
    spec = by_kind(render("-f", LLMISVC_VLLM), "LLMInferenceService")[0]["spec"]  # no account named: KServe's own
    assert "serviceAccountName" not in spec["template"] and "automountServiceAccountToken" not in spec["template"]


def test_service_account_of_the_pods_is_not_the_pipelines_deployer():
    """One story: the pods' ServiceAccount (serviceAccount.*) needs no API access; the pipeline's deployer
    (manifests/rbac) deploys them and is the only account with a Role."""
    from test_manifests import kustomize

    rbac = kustomize(REPO / "manifests" / "rbac")
    (deployer,) = by_kind(rbac, "ServiceAccount")
    for args in LAYOUTS.values():
        docs = render(*args, "-f", OPENSHIFT)
        assert deployer["metadata"]["name"] not in {pod.get("serviceAccountName") for pod in serving_pods(docs)}
        assert not {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"} & {d["kind"] for d in docs}


def test_pod_labels_and_annotations_reach_every_serving_pod():
    extra = ["--set", "podLabels.cost-center=ml", "--set-string", "podAnnotations.sidecar\\.istio\\.io/inject=false"]
    # InferenceService: spec.predictor (KServe puts it on the head and the Ray worker pods)
    for args in (LAYOUTS["isvc"], LAYOUTS["isvc-multinode"], ["-f", str(CHART / "ci" / "canary-values.yaml")]):
        docs = render(*args, *extra)
        predictor = by_kind(docs, "InferenceService")[0]["spec"]["predictor"]
        assert predictor["labels"] == {"cost-center": "ml"}
        annotations = predictor["annotations"]
        assert annotations["sidecar.istio.io/inject"] == "false" and annotations["prometheus.io/port"] == "8080"
        for doc in docs:
            validate(doc)
    kpa = by_kind(render("-f", str(CHART / "ci" / "canary-values.yaml"), *extra), "InferenceService")[0]["spec"]["predictor"]["annotations"]
    assert kpa["autoscaling.knative.dev/metric"] == "concurrency" and kpa["autoscaling.knative.dev/target"] == "8"
    # a key given in podAnnotations wins over the chart's
    override = by_kind(render("--set-string", "podAnnotations.prometheus\\.io/port=9090"), "InferenceService")[0]["spec"]["predictor"]["annotations"]
    assert override["prometheus.io/port"] == "9090" and override["prometheus.io/path"] == "/metrics"
    # LLMInferenceService: spec (main pods, leader and workers) and spec.prefill
    for layout in ("llmisvc", "llmisvc-disaggregated", "llmisvc-multinode"):
        docs = render(*LAYOUTS[layout], *extra)
        (llmisvc,) = by_kind(docs, "LLMInferenceService")
        validate(llmisvc)
        workloads = [llmisvc["spec"]] + ([llmisvc["spec"]["prefill"]] if "prefill" in llmisvc["spec"] else [])
        for workload in workloads:
            assert workload["labels"]["cost-center"] == "ml" and workload["annotations"] == {"sidecar.istio.io/inject": "false"}
    # none by default
    predictor = by_kind(render(), "InferenceService")[0]["spec"]["predictor"]
    assert "labels" not in predictor and set(predictor["annotations"]) == {"prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path"}
    assert "annotations" not in by_kind(render("-f", LLMISVC), "LLMInferenceService")[0]["spec"]


def test_llm_d_role_labels_on_the_llminferenceservice_pods():
    spec = by_kind(render("-f", LLMISVC), "LLMInferenceService")[0]["spec"]
    assert spec["labels"] == {"llm-d.ai/role": "both"}  # not disaggregated: one pod does prefill and decode
    spec = by_kind(render("-f", LLMISVC_VLLM), "LLMInferenceService")[0]["spec"]
    assert spec["labels"] == {"llm-d.ai/role": "decode"} and spec["prefill"]["labels"] == {"llm-d.ai/role": "prefill"}
    spec = by_kind(render(*LAYOUTS["llmisvc-multinode"]), "LLMInferenceService")[0]["spec"]
    assert spec["labels"] == {"llm-d.ai/role": "both"}
    # podLabels cannot relabel the role llm-d's scheduler filters on
    spec = by_kind(render("-f", LLMISVC_VLLM, "--set", "podLabels.llm-d\\.ai/role=both"), "LLMInferenceService")[0]["spec"]
    assert spec["labels"]["llm-d.ai/role"] == "decode" and spec["prefill"]["labels"]["llm-d.ai/role"] == "prefill"
    assert "llm-d.ai/role" not in json.dumps(by_kind(render(), "InferenceService"))


def test_networkpolicy_admits_prometheus_on_the_disaggregated_decode_pods_metrics_port():
    def scrape_ports(*args: str) -> list[int]:
        (policy,) = by_kind(render(*args), "NetworkPolicy")
        (rule,) = [r for r in policy["spec"]["ingress"] if r["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]]
        return [p["port"] for p in rule["ports"]]

    docs = render("-f", LLMISVC_VLLM)
    decode = by_kind(docs, "LLMInferenceService")[0]["spec"]["template"]["containers"][0]
    assert decode["ports"][0]["containerPort"] == 8001  # vLLM and its /metrics behind llm-d's routing sidecar (8000)
    (monitor,) = by_kind(docs, "PodMonitor")
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == decode["ports"][0]["name"]  # Prometheus scrapes 8001 there
    assert scrape_ports("-f", LLMISVC_VLLM) == [8000, 8001]  # prefill pods on 8000, decode pods on 8001
    assert scrape_ports("-f", HARDENED_LLMISVC) == [8000, 8001]
    assert scrape_ports("-f", LLMISVC) == [8000]
    assert scrape_ports("-f", LLMISVC_VLLM, "--set", "llmisvc.prefill.enabled=false") == [8000]
    assert scrape_ports() == [8080]


def _grace(pod: dict) -> int:
    return pod["terminationGracePeriodSeconds"]


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_serving_containers_sleep_in_prestop_shorter_than_the_grace_period(layout):
    docs = render(*LAYOUTS[layout])
    checked = 0
    for isvc in by_kind(docs, "InferenceService"):
        predictor = isvc["spec"]["predictor"]
        assert predictor["model"]["lifecycle"] == {"preStop": {"exec": {"command": ["sleep", "5"]}}}
        assert 5 < _grace(predictor)
        checked += 1
        for worker in predictor.get("workerSpec", {}).get("containers", []):  # Ray workers serve nothing
            assert "lifecycle" not in worker
    for runtime in by_kind(docs, "ServingRuntime"):  # the InferenceService's model container carries it (KServe merges them)
        assert all("lifecycle" not in c for c in runtime["spec"]["containers"] + runtime["spec"].get("workerSpec", {}).get("containers", []))
    for llmisvc in by_kind(docs, "LLMInferenceService"):
        spec = llmisvc["spec"]
        for pod in [spec["template"]] + ([spec["prefill"]["template"]] if "prefill" in spec else []):
            (container,) = pod["containers"]
            command = container["lifecycle"]["preStop"]["exec"]["command"]
            assert command[0] == "sleep" and int(command[1]) == 5 < _grace(pod)
            checked += 1
        if "worker" in spec:
            assert "lifecycle" not in spec["worker"]["containers"][0]
    assert checked
    for doc in docs:
        validate(doc)


def test_prestop_sleep_is_a_value_off_at_zero_and_absent_in_knative_mode():
    model = by_kind(render("--set", "preStopSleepSeconds=12", "--set", "shutdownGracePeriod=60"), "InferenceService")[0]["spec"]["predictor"]
    assert model["model"]["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "12"] and _grace(model) == 75
    assert "lifecycle" not in json.dumps(render("--set", "preStopSleepSeconds=0"))
    for values in ("canary-values.yaml", "knative-scale-to-zero-values.yaml"):  # Knative refuses lifecycle hooks
        assert "lifecycle" not in by_kind(render("-f", str(CHART / "ci" / values)), "InferenceService")[0]["spec"]["predictor"]["model"]


def test_notes_warn_when_the_prestop_sleep_cuts_the_drain_short():
    def notes(*args: str) -> str:
        result = subprocess.run([tool("helm"), "install", "llm", str(CHART), "--dry-run=client", *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "WARNING: preStopSleepSeconds" not in notes()
    assert "WARNING: preStopSleepSeconds (20) + shutdownGracePeriod (30) exceed the pods' terminationGracePeriodSeconds (45)" in notes(
        "--set", "preStopSleepSeconds=20"
    )
