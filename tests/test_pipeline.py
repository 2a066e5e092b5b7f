"""The Kubeflow pipeline: compiled IR, the deploy step against a FAKE Kubernetes API server (no cluster runs
here), the InferenceService rendered by the chart and validated against the KServe CRD, the gate, and
whole local runs with kfp.local that register into a real MLflow store (SQLite)."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys

import pytest
import yaml
from conftest import REPO
from fake_kube_api import FakeKubeAPI
from test_chart import CRDS, by_kind, render, require_crds
from test_model_families import build_model

from pipelines.deploy import Cluster, DeployError, deploy, render_isvc
from pipelines.gate import Thresholds, select
from pipelines.kube import KubeError

PIPELINE_YAML = REPO / "pipelines" / "llm_lifecycle.yaml"


def cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines", *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)


# --- compiled pipeline -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[str, dict, dict]:
    path = tmp_path_factory.mktemp("compiled") / "p.yaml"
    result = cli("compile", "--output", str(path), timeout=120)
    assert result.returncode == 0, result.stderr
    text = path.read_text()
    spec, platform = yaml.safe_load_all(text)
    return text, spec, platform


def test_committed_pipeline_yaml_is_current(compiled):
    # Compared as data: the compiler's header comment lists dict defaults in no fixed key order.
    committed = list(yaml.safe_load_all(PIPELINE_YAML.read_text()))
    assert committed == list(yaml.safe_load_all(compiled[0])), "pipelines/llm_lifecycle.yaml is stale: run python -m pipelines compile"


def test_compile_to_an_unwritable_place_is_a_cli_error(tmp_path):
    result = cli("compile", "--output", str(tmp_path / "missing" / "p.yaml"), timeout=120)
    assert result.returncode == 2 and "--output: cannot write" in result.stderr and "Traceback" not in result.stderr


def test_compiled_dag_condition_parallelism_and_cluster_settings(compiled):
    _, spec, platform = compiled
    root = spec["root"]["dag"]["tasks"]
    loop = next(name for name in root if name.startswith("for-loop-"))
    branching = next(name for name in root if name.startswith("condition-branches-"))
    assert {"prepare-data", "train-model", "evaluate-models"} <= set(root)
    assert root["train-model"]["dependentTasks"] == ["prepare-data"]
    assert "train-model" in root[loop]["dependentTasks"]
    assert root[loop]["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--methods"
    assert root["evaluate-models"]["inputs"]["artifacts"]["variants"]["taskOutputArtifact"]["producerTask"] == loop
    assert "optimize-model" in spec["components"][f"comp-{loop}"]["dag"]["tasks"]
    branches = spec["components"][f"comp-{branching}"]["dag"]["tasks"]
    conditions = {name: task["triggerPolicy"]["condition"] for name, task in branches.items()}
    assert sorted(conditions.values()) == [
        "!(inputs.parameter_values['pipelinechannel--evaluate-models-passed'] == true)",
        "inputs.parameter_values['pipelinechannel--evaluate-models-passed'] == true",
    ]
    passed, failed = (
        spec["components"][next(t["componentRef"]["name"] for t in branches.values() if t["triggerPolicy"]["condition"].startswith(prefix))]["dag"]["tasks"]
        for prefix in ("inputs", "!(")
    )
    assert set(passed) == {"register-model", "deploy-model"} and set(failed) == {"gate-failed"}
    gate = passed
    assert gate["deploy-model"]["dependentTasks"] == ["register-model"]
    for name in ("register-model", "deploy-model"):
        assert gate[name]["cachingOptions"] == {}, f"{name} must not be cached"  # enableCache absent = off
    assert root["train-model"]["cachingOptions"] == {"enableCache": True}
    assert root["train-model"]["retryPolicy"]["maxRetryCount"] == 2
    train = spec["deploymentSpec"]["executors"]["exec-train-model"]["container"]
    assert train["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert "train_pod_gpus" in train["resources"]["accelerator"]["resourceCount"]  # 0 when a TrainJob trains instead
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["train_pod_gpus"]["defaultValue"] == 1 and inputs["train_nodes"]["defaultValue"] == 1
    assert inputs["train_backend"]["defaultValue"] == "auto" and inputs["trainjob_runtime"]["defaultValue"] == "torch-distributed"
    for executor in spec["deploymentSpec"]["executors"].values():
        container = executor["container"]
        assert container["image"] == "ghcr.io/kserve-llm/pipelines:0.1.0"
        assert "pip install" not in " ".join(container["command"]), "components must not pip-install at run time"
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert k8s["exec-train-model"]["pvcMount"][0]["mountPath"] == "/workspace"
    assert k8s["exec-train-model"]["secretAsEnv"][0]["keyToEnv"] == [{"envVar": "HF_TOKEN", "secretKey": "token"}]
    assert k8s["exec-train-model"]["secretAsEnv"][0]["optional"] is True


# --- the InferenceService: one source, the chart --------------------------------------------------------


def test_render_isvc_is_the_charts_inferenceservice_and_validates_against_the_crd():
    require_crds()
    values = REPO / "helm" / "kserve-llm" / "ci" / "canary-values.yaml"
    result = cli("render-isvc", "--name", "llm", "--storage-uri", "s3://models/llm/3", "--canary", "20", "--values", str(values), "--validate", timeout=60)
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    chart = by_kind(
        render("-f", str(values), "--set", "fullnameOverride=llm", "--set", "model.storageUri=s3://models/llm/3", "--set", "canaryTrafficPercent=20"),
        "InferenceService",
    )[0]
    for labels in (rendered["metadata"]["labels"], chart["metadata"]["labels"]):
        for helm_only in ("helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/instance"):
            labels.pop(helm_only, None)
    rendered["metadata"].pop("namespace")
    assert rendered == chart
    assert rendered["spec"]["predictor"]["canaryTrafficPercent"] == 20


@pytest.mark.parametrize(
    "args, message",
    [
        (["--storage-uri", "/home/me/model"], "not one KServe can fetch"),
        (["--storage-uri", "mlflow-artifacts:/1/abc/artifacts/model"], "not one KServe can fetch"),
        (["--storage-uri", "s3://m", "--canary", "150"], "between 0 and 100"),
        (["--storage-uri", "s3://m", "--canary", "10"], "canaryTrafficPercent needs deploymentMode=Knative"),
        (["--storage-uri", "ftp://m"], "storageUri"),
    ],
)
def test_render_isvc_rejects_bad_input_clearly(args, message):
    result = cli("render-isvc", "--name", "llm", *args, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr


# --- deploy against a FAKE Kubernetes API server ---------------------------------------------------


@pytest.fixture()
def fake_kube(tmp_path):
    with FakeKubeAPI() as api:
        api.cluster = Cluster(kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")))
        yield api


def _isvc(storage: str, canary: int | None = None) -> dict:
    return render_isvc("llm", storage, namespace="ml", canary_percent=canary, values={"deploymentMode": "Knative"})


def test_deploy_with_fake_api_server_creates_then_patches_idempotently(fake_kube):
    require_crds()
    first = deploy(_isvc("s3://models/llm/1"), cluster=fake_kube.cluster, poll_s=0.05, timeout_s=5, crds=CRDS, log=lambda *_: None)
    assert first["action"] == "created" and first["generation"] == 1
    second = deploy(_isvc("s3://models/llm/2", canary=10), cluster=fake_kube.cluster, poll_s=0.05, timeout_s=5, crds=CRDS, log=lambda *_: None)
    assert second["action"] == "updated" and second["generation"] == 2
    again = deploy(_isvc("s3://models/llm/2", canary=10), cluster=fake_kube.cluster, poll_s=0.05, timeout_s=5, crds=CRDS, log=lambda *_: None)
    assert again["generation"] == 2, "re-applying the same spec must not change anything"
    stored = fake_kube.objects[("inferenceservices", "ml", "llm")]
    assert stored["spec"]["predictor"]["model"]["storageUri"] == "s3://models/llm/2"
    assert stored["spec"]["predictor"]["canaryTrafficPercent"] == 10
    applies = [r for r in fake_kube.requests if r["method"] == "PATCH"]
    assert [r["verb"] for r in applies] == ["create", "patch", "patch"]
    assert {r["content_type"] for r in applies} == {"application/apply-patch+yaml"}
    assert {r["field_manager"] for r in applies} == {"kserve-llm-pipeline"}


def test_deploy_with_fake_api_server_rolls_back_a_never_ready_update(fake_kube):
    require_crds()
    deploy(_isvc("s3://models/llm/1"), cluster=fake_kube.cluster, poll_s=0.05, timeout_s=5, crds=CRDS, log=lambda *_: None)
    good_spec = copy.deepcopy(fake_kube.objects[("inferenceservices", "ml", "llm")]["spec"])
    fake_kube.ready = "never"
    with pytest.raises(DeployError, match=r"not Ready after 1 s \(RevisionMissing: Revision failed.*OOMKilled\)\); rolled back to the previous spec"):
        deploy(_isvc("s3://models/llm/broken"), cluster=fake_kube.cluster, poll_s=0.05, timeout_s=1, crds=CRDS, log=lambda *_: None)
    assert fake_kube.objects[("inferenceservices", "ml", "llm")]["spec"] == good_spec
    assert fake_kube.requests[-1]["verb"] == "patch" and fake_kube.requests[-1]["body"]["spec"] == good_spec


def test_deploy_with_fake_api_server_deletes_a_new_service_that_never_gets_ready(fake_kube):
    require_crds()
    fake_kube.ready = "never"
    with pytest.raises(DeployError, match="deleted it"):
        deploy(_isvc("s3://models/llm/1"), cluster=fake_kube.cluster, poll_s=0.05, timeout_s=0.5, crds=CRDS, log=lambda *_: None)
    assert fake_kube.objects == {}


class FailingPolls(FakeKubeAPI):
    """The FAKE API server, answering 503 to every GET once ``good_gets`` GETs were answered: the API server going
    away while the deploy step polls for Ready."""

    def __init__(self) -> None:
        self.good_gets, self.gets = 10**9, 0
        super().__init__()

    def _handler(self):
        fake, base = self, super()._handler()

        class Handler(base):
            def do_GET(self) -> None:
                fake.gets += 1
                if fake.gets <= fake.good_gets:
                    return super().do_GET()
                self._record("get")
                self._reply(503, {"kind": "Status", "status": "Failure", "code": 503, "message": "etcdserver: leader changed"})

        return Handler


@pytest.mark.parametrize("existed", [True, False])
def test_an_api_error_while_polling_for_ready_still_rolls_back(tmp_path, existed):
    require_crds()
    with FailingPolls() as fake:
        cluster = Cluster(kubeconfig=str(fake.kubeconfig(tmp_path / "kubeconfig")))
        if existed:
            deploy(_isvc("s3://models/llm/1"), cluster=cluster, poll_s=0.05, timeout_s=5, crds=CRDS, log=lambda *_: None)
        good_spec = copy.deepcopy(fake.objects.get(("inferenceservices", "ml", "llm"), {}).get("spec"))
        fake.ready = "never"
        fake.good_gets = fake.gets + 1  # the step's read of the previous version is answered; every poll after the apply fails
        with pytest.raises(DeployError) as error:
            deploy(_isvc("s3://models/llm/broken"), cluster=cluster, poll_s=0.05, timeout_s=30, crds=CRDS, log=lambda *_: None)
        verbs = [r["verb"] for r in fake.requests]
        if existed:  # the previous spec is applied again
            assert verbs[-3:] == ["patch", "get", "patch"] and fake.requests[-1]["body"]["spec"] == good_spec
            assert fake.objects[("inferenceservices", "ml", "llm")]["spec"] == good_spec
        else:  # the service that did not exist is deleted
            assert verbs[-3:] == ["create", "get", "delete"] and fake.objects == {}
        rollback = r"rolled back to the previous spec \(generation 1\)" if existed else r"deleted it \(no previous version existed\)"
        assert re.search(r"ml/llm could not be watched until Ready \(GET .*HTTP 503.*leader changed\); " + rollback, str(error.value)), error.value


def test_deploy_uses_exactly_the_verbs_the_rbac_role_grants(fake_kube):
    require_crds()
    deploy(_isvc("s3://m/1"), cluster=fake_kube.cluster, poll_s=0.05, timeout_s=5, crds=CRDS, log=lambda *_: None)
    deploy(_isvc("s3://m/2"), cluster=fake_kube.cluster, poll_s=0.05, timeout_s=5, crds=CRDS, log=lambda *_: None)
    fake_kube.ready = "never"
    with pytest.raises(DeployError):  # rolled back with patch
        deploy(_isvc("s3://m/3"), cluster=fake_kube.cluster, poll_s=0.05, timeout_s=0.3, crds=CRDS, log=lambda *_: None)
    fake_kube.objects.clear()
    with pytest.raises(DeployError):
        deploy(_isvc("s3://m/4"), cluster=fake_kube.cluster, poll_s=0.05, timeout_s=0.3, crds=CRDS, log=lambda *_: None)
    used = {r["verb"] for r in fake_kube.requests}
    role = yaml.safe_load((REPO / "manifests" / "rbac" / "role.yaml").read_text())
    granted = {verb for rule in role["rules"] if "inferenceservices" in rule["resources"] for verb in rule["verbs"]}
    assert used == granted == {"get", "create", "patch", "delete"}
    assert {r["resource"] for r in fake_kube.requests} == {"inferenceservices"}


@pytest.mark.parametrize("engine", ["kserve-llm", "vllm"])
def test_deploy_step_targets_an_llminferenceservice_of_either_engine(fake_kube, engine):
    require_crds()
    values = {"kind": "LLMInferenceService", "engine": engine, "llmisvc": {"tls": engine == "vllm"}}
    llmisvc = render_isvc("llm", "pvc://models/llm/1", namespace="ml", values=values)
    assert llmisvc["kind"] == "LLMInferenceService" and llmisvc["spec"]["model"]["uri"] == "pvc://models/llm/1"
    first = deploy(llmisvc, cluster=fake_kube.cluster, poll_s=0.05, timeout_s=5, crds=CRDS, log=lambda *_: None)
    assert first["action"] == "created"
    assert {r["resource"] for r in fake_kube.requests} == {"llminferenceservices"}
    good_spec = copy.deepcopy(fake_kube.objects[("llminferenceservices", "ml", "llm")]["spec"])
    fake_kube.ready = "never"
    broken = render_isvc("llm", "pvc://models/llm/broken", namespace="ml", values=values)
    with pytest.raises(DeployError, match="LLMInferenceService ml/llm was not Ready.*rolled back"):
        deploy(broken, cluster=fake_kube.cluster, poll_s=0.05, timeout_s=0.3, crds=CRDS, log=lambda *_: None)
    assert fake_kube.objects[("llminferenceservices", "ml", "llm")]["spec"] == good_spec


def test_render_isvc_cli_renders_each_engine_and_kind():
    require_crds()
    result = cli("render-isvc", "--name", "big", "--storage-uri", "pvc://w/m", "--engine", "vllm", "--kind", "LLMInferenceService", "--validate", timeout=60)
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    assert rendered["kind"] == "LLMInferenceService" and "vllm" in rendered["spec"]["template"]["containers"][0]["image"]
    values = REPO / "helm" / "kserve-llm" / "ci" / "vllm-multinode-values.yaml"
    result = cli("render-isvc", "--name", "big", "--storage-uri", "s3://m", "--values", str(values), timeout=60)
    assert result.returncode == 2 and "ReadWriteMany PVC" in result.stderr


def test_deploy_dry_run_validates_without_a_cluster_and_rejects_an_invalid_spec():
    require_crds()
    isvc = _isvc("s3://models/llm/1")
    assert deploy(isvc, dry_run=True, crds=CRDS, log=lambda *_: None)["action"] == "dry-run"
    isvc["spec"]["predictor"]["model"]["storageUrl"] = "typo"
    with pytest.raises(DeployError, match="storageUrl"):
        deploy(isvc, dry_run=True, crds=CRDS, log=lambda *_: None)


def test_dry_run_without_crd_files_asks_the_fake_api_server_for_a_server_side_dry_run(fake_kube, tmp_path):
    result = deploy(_isvc("s3://models/llm/1"), dry_run=True, cluster=fake_kube.cluster, crds=tmp_path / "no-crds", log=lambda *_: None)
    assert result["action"] == "dry-run"
    assert [(r["verb"], r["dry_run"]) for r in fake_kube.requests] == [("create", True)]
    assert fake_kube.objects == {}


def test_deploy_names_an_unreachable_api_server(tmp_path):
    require_crds()
    kubeconfig = tmp_path / "kubeconfig"
    with FakeKubeAPI() as api:
        api.kubeconfig(kubeconfig)
    with pytest.raises(DeployError, match="cannot reach the Kubernetes API at http://127.0.0.1"):
        deploy(_isvc("s3://m/1"), cluster=Cluster(kubeconfig=str(kubeconfig)), crds=CRDS, log=lambda *_: None)
    with pytest.raises(KubeError, match="no Kubernetes configuration"):
        Cluster(kubeconfig=str(tmp_path / "missing-kubeconfig"))


# --- the gate ---------------------------------------------------------------------------------------


def _result(name: str, ppl: float, tps: float, ttft: float = 0.001) -> dict:
    return {"name": name, "perplexity": ppl, "decode_tokens_per_s_batch1": tps, "ttft_s": ttft}


def test_gate_selects_the_fastest_variant_within_the_thresholds():
    results = [_result("base", 100, 100), _result("int8", 101, 160), _result("tiny", 150, 400), _result("onnx", 100, 120, ttft=0.5)]
    index, reason = select(results, Thresholds(max_perplexity_increase=0.02, min_speedup=1.1))
    assert index == 1 and "selected int8" in reason
    index, reason = select(results, Thresholds(max_perplexity_increase=0.02, min_speedup=5))
    assert index is None
    assert "int8: speedup 1.60× < 5.00×" in reason and "tiny: perplexity +50.0% > +2.0%" in reason
    with pytest.raises(ValueError, match="thresholds"):
        Thresholds(min_speedup=0)


def test_gate_thresholds_greedy_agreement():
    results = [_result("base", 100, 100), _result("int8", 100.5, 160), _result("onnx", 100.2, 120)]
    for r, agreement in zip(results, (1.0, 0.88, 0.97)):
        r["greedy_agreement"] = agreement
    index, reason = select(results, Thresholds(max_perplexity_increase=0.02, min_speedup=1.1, min_greedy_agreement=0.9))
    assert index == 2 and "selected onnx" in reason  # int8 is faster but agrees on only 88% of greedy tokens
    results[2]["greedy_agreement"] = None  # another tokenizer: agreement cannot be measured, so the threshold fails it
    index, reason = select(results, Thresholds(min_speedup=1.1, min_greedy_agreement=0.9))
    assert index is None and "int8: greedy agreement 0.880 < 0.900" in reason and "onnx: greedy agreement not measurable" in reason
    assert select(results, Thresholds(min_speedup=1.1))[0] == 1  # off by default
    with pytest.raises(ValueError, match="min_greedy_agreement"):
        Thresholds(min_greedy_agreement=1.5)


# --- whole local runs (kfp.local) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_model_dir):
    """A passing run that fine-tunes a tiny random-weight Llama with LoRA (the other runs below train GPT-2s from scratch)."""
    out = tmp_path_factory.mktemp("pipeline-run")
    base_model = build_model("llama", out / "base-model", tiny_model_dir)
    result = cli("run", "--local", "--tiny", "--output", str(out), "--base-model", str(base_model), "--train-config", '{"lora_rank": 4}')
    return out, result, base_model


def test_local_run_fine_tunes_with_lora_optimizes_evaluates_registers_and_dry_run_deploys(local_run):
    from mlflow.tracking import MlflowClient

    from predictor.loading import load_model

    out, result, base_model = local_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())  # with kfp.local's own final state of every task it ran
    assert run["ok"] and run["error"] is None
    done = ["prepare-data", "train-model", "optimize-model", "optimize-model", "evaluate-models", "register-model", "deploy-model"]
    assert sorted(map(tuple, run["tasks"])) == sorted((task, "SUCCESS") for task in done)  # int8 and bf16; no gate-failed
    report = next(line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.strip().startswith("evaluation report:"))
    table = open(report).read()
    for name in ("unoptimized", "int8", "bf16"):  # a base model gets the methods that work on every family
        assert f"| {name} |" in table
    assert "**Gate:** selected" in table
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}", registry_uri=f"sqlite:///{out / 'mlflow.db'}")
    version = client.get_model_version_by_alias("kserve-llm-demo", "candidate")
    assert str(version.version) == "1"
    assert version.tags["base_model"] == str(base_model) and version.tags["method"] in ("none", "int8", "cast")
    assert version.tags["training"] == "lora"
    assert version.tags["corpus"].startswith("demo corpus")
    run = client.get_run(version.run_id)
    assert {"perplexity", "speedup_batch1", "decode_tokens_per_s_batch1", "bytes_on_disk"} <= set(run.data.metrics)
    serve = next(line for line in result.stdout.splitlines() if line.strip().startswith("serve it:"))
    model_dir = serve.split("--model_dir ")[1].split()[0]
    assert load_model(model_dir, dtype="float32", device="cpu").model is not None  # the registered copy is servable
    assert "dry run: InferenceService default/llm validates against the KServe CRD" in result.stdout + result.stderr


def _no_registration(out) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{out / 'mlflow.db'}"
    assert not (out / "mlflow.db").exists() or MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models() == []


@pytest.mark.slow  # a whole kfp.local run: make test-slow
def test_local_run_with_thresholds_nothing_passes_fails_at_the_gate_and_registers_nothing(tmp_path):
    result = cli("run", "--local", "--tiny", "--output", str(tmp_path), "--min-speedup", "1000")
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "quality gate: no variant passed the gate (unoptimized: speedup 1.00× < 1000.00×" in output
    run = json.loads((tmp_path / "run.json").read_text())
    assert not run["ok"] and "Inner task failed: 'gate-failed'" in run["error"]
    done = ["prepare-data", "train-model", "optimize-model", "optimize-model", "evaluate-models"]  # --tiny: int8 and distilled-half
    assert sorted(map(tuple, run["tasks"])) == sorted([*((task, "SUCCESS") for task in done), ("gate-failed", "FAILURE")])  # no register, deploy
    _no_registration(tmp_path)


@pytest.mark.slow  # a whole kfp.local run: make test-slow
@pytest.mark.parametrize("corpus, message", [("missing", "corpus not found"), ("empty", "corpus is empty")])
def test_local_run_with_a_bad_corpus_fails_in_prepare_data_with_the_reason(tmp_path, corpus, message):
    path = tmp_path / "corpus"
    if corpus == "empty":
        path.mkdir()
        (path / "a.txt").write_text("  \n")
    result = cli("run", "--local", "--tiny", "--output", str(tmp_path / "run"), "--corpus", str(path), timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and message in output
    assert json.loads((tmp_path / "run" / "run.json").read_text())["tasks"] == [["prepare-data", "FAILURE"]]  # and nothing after it
    _no_registration(tmp_path / "run")


@pytest.mark.slow  # a whole kfp.local run: make test-slow
def test_unreachable_registry_fails_the_register_step_and_leaves_nothing(tmp_path):
    from pipelines.lifecycle import run_local

    result = run_local(tmp_path, tiny=True, registry_uri="http://127.0.0.1:9", methods=[{"name": "int8", "method": "int8"}])
    assert not result["ok"] and "Inner task failed: 'register-model'" in result["error"]
    done = ["prepare-data", "train-model", "optimize-model", "evaluate-models"]
    assert result["tasks"] == [*([task, "SUCCESS"] for task in done), ["register-model", "FAILURE"]]  # deploy-model never ran
    assert result["registered"] is None and json.loads((tmp_path / "run.json").read_text()) == result


def test_registry_failure_midway_leaves_no_partial_registration(tmp_path, tiny_model_dir):
    from mlflow.tracking import MlflowClient

    from pipelines.registry import RegistryError, register

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = register(tiny_model_dir, "m", {"perplexity": 1.0}, {"method": "none"}, uri)
    assert first["version"] == "1"
    with pytest.raises(RegistryError, match="failed"):
        register(
            tiny_model_dir, "m", {"perplexity": float("nan")}, {"method": "int8"}, uri, alias="bad alias!"
        )  # an invalid alias, after the version was created
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert [str(v.version) for v in client.search_model_versions("name='m'")] == ["1"]
    assert str(client.get_model_version_by_alias("m", "candidate").version) == "1"
    assert len(client.search_runs([client.get_experiment_by_name("kserve-llm").experiment_id])) == 1
    with pytest.raises(RegistryError, match="unreachable at http://127.0.0.1:9"):
        register(tiny_model_dir, "m", {}, {}, "http://127.0.0.1:9")
    with pytest.raises(RegistryError, match="stores no files"):
        register(tiny_model_dir, "m", {}, {}, "http://127.0.0.1:9", backend="model-registry")
    with pytest.raises(RegistryError, match="unreachable at http://127.0.0.1:9"):
        register(tiny_model_dir, "m", {}, {}, "http://127.0.0.1:9", backend="model-registry", storage_uri="s3://models/m")
    with pytest.raises(RegistryError, match=r"must be http\(s\)://HOST"):
        register(tiny_model_dir, "m", {}, {}, "registry:8080", backend="model-registry", storage_uri="s3://models/m")
    # A registration that fails midway for a new model name deletes the empty registered model too.
    with pytest.raises(RegistryError):
        register(tiny_model_dir, "fresh", {}, {"method": "none"}, uri, alias="bad alias!")
    assert [m.name for m in client.search_registered_models()] == ["m"]
