"""The Helm chart and the container image, validated offline: helm lint and template over a matrix of values,
every rendered object against its real schema (KServe, KEDA CRDs from ../shared/schemas/crds; core kinds with
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
    """CI must have ../shared/schemas/crds; elsewhere a missing folder skips the CRD checks."""
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
    assert {"InferenceService"} <= {d["kind"] for d in docs}
    for doc in docs:
        validate(doc)


def test_unknown_fields_are_rejected_by_the_crd_check():
    isvc = by_kind(render(), "InferenceService")[0]
    isvc["spec"]["predictor"]["model"]["storageUrl"] = "typo"
    with pytest.raises(k8s_schema.SchemaError, match="storageUrl"):
        validate(isvc)


def predictor_containers(docs: list[dict]) -> list[dict]:
    isvc = by_kind(docs, "InferenceService")[0]
    containers = [isvc["spec"]["predictor"]["model"]]
    for runtime in by_kind(docs, "ServingRuntime"):
        containers += runtime["spec"]["containers"]
    return containers


@pytest.mark.parametrize("values", CI_VALUES, ids=[p.stem for p in CI_VALUES])
def test_security_defaults_inside_the_custom_resources(values):
    docs = render("-f", str(values))
    for container in predictor_containers(docs):
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
        assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
    predictor = by_kind(docs, "InferenceService")[0]["spec"]["predictor"]
    assert predictor["automountServiceAccountToken"] is False
    assert {m["mountPath"] for m in predictor["model"]["volumeMounts"]} >= {"/tmp"}


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
        (["--set", "multiNode.enabled=true"], "runs a model on one node"),
        (["--set", "model.storageUri=ftp://x"], "storageUri"),
        (["--set", "autoscaling.mode=fast"], "mode"),
        (["--set", "gpu.count=-1"], "count"),
        (["--set", "model.notAValue=1"], "notAValue"),
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
