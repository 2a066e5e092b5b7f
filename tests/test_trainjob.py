"""The train step on Kubeflow Trainer: the TrainJob it renders validates strictly against the TrainJob CRD, and its
create / wait / fail / retry / timeout / cancel paths run against a FAKE Kubernetes API server (no cluster runs
here). In the complete path the fake's stand-in controller runs the TrainJob's own command (``torchrun -m pipelines
train``, two processes) on this machine, so the command the cluster would run is the one tested."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO
from fake_kube_api import FakeKubeAPI
from test_chart import require_crds, validate

from pipelines.__main__ import main
from pipelines.kube import Cluster
from pipelines.trainjob import TrainJobError, TrainJobSettings, job_name, render_trainjob, run_trainjob, train_with_trainjob

TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32, "seq_len": 32, "batch_size": 4, "steps": 4, "warmup_steps": 1, "eval_every": 0}


@pytest.fixture()
def fake_kube(tmp_path):
    with FakeKubeAPI() as api:
        api.cluster = Cluster(kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")))
        yield api


def _job(tmp_path, **settings) -> dict:
    config = dict(TINY, batch_size=64)  # splits over up to 64 processes
    return render_trainjob(TrainJobSettings(name="llm-train", namespace="ml", workspace_path=str(tmp_path), **settings), f"{tmp_path}/runs/r1", config)


@pytest.mark.parametrize("gpus", [0, 8])
def test_rendered_trainjob_validates_strictly_against_the_trainjob_crd(tmp_path, gpus):
    require_crds()
    job = _job(tmp_path, num_nodes=4, gpus_per_node=gpus)
    validate(job)
    trainer = job["spec"]["trainer"]
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": "torch-distributed"}
    assert trainer["numNodes"] == 4 and trainer["numProcPerNode"] == max(1, gpus)
    assert trainer["command"] == ["torchrun"] and trainer["args"][:3] == ["-m", "pipelines", "train"]
    assert ("nvidia.com/gpu" in trainer["resourcesPerNode"]["limits"]) == bool(gpus)
    pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "kserve-llm-workspace"
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == str(tmp_path)
    job["spec"]["trainer"]["numNode"] = 2  # a typo the API server's strict validation would refuse
    with pytest.raises(Exception, match="numNode"):
        validate(job)


def test_render_trainjob_cli_prints_a_valid_trainjob_and_names_bad_settings(capsys):
    """``python -m pipelines render-trainjob``'s ``main``, in this process (the CLI starts in 4 s, mostly torch)."""
    require_crds()
    args = ["render-trainjob", "--name", "t", "--nodes", "2", "--gpus-per-node", "4", "--stage", "/workspace/runs/x"]
    assert main([*args, "--train-config", '{"steps": 100}', "--validate"]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert job["kind"] == "TrainJob" and job["spec"]["trainer"]["numNodes"] == 2
    train_config = json.loads(job["spec"]["trainer"]["args"][job["spec"]["trainer"]["args"].index("--train-config") + 1])
    assert train_config == {"steps": 100, "checkpoint_every": 50}  # as the pods' run_training resolves it: a checkpoint every 50 steps
    for bad, message in (([*args[:-2], "--stage", "/elsewhere/x"], "not on the workspace volume"), ([*args, "--train-config", '{"stepz": 1}'], "stepz")):
        with pytest.raises(SystemExit) as exit_:
            main(bad)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_train_step_on_a_trainjob_runs_torchrun_and_brings_the_model_back(fake_kube, small_dataset, tmp_path):
    dataset = small_dataset[0]
    workspace = tmp_path / "workspace"
    settings = TrainJobSettings(name=job_name("run-1"), namespace="ml", num_nodes=2, gpus_per_node=0, workspace_path=str(workspace))
    report = train_with_trainjob(dataset, tmp_path / "model", settings, "run-1", TINY, cluster=fake_kube.cluster, poll_s=0.2, timeout_s=300, log=lambda *_: None)
    key = ("trainjobs", "ml", settings.name)
    assert report["steps"] == 4, fake_kube.logs.get(key)
    assert '"world_size": 2' in fake_kube.logs[key], "torchrun ran two processes (numNodes x numProcPerNode)"
    assert (tmp_path / "model" / "model.safetensors").is_file() and (tmp_path / "model" / "training.json").is_file()
    stage = next((workspace / "runs").iterdir())
    assert sorted(p.name for p in stage.iterdir()) == ["model"]  # staged dataset and checkpoint removed, the model kept
    assert [r["verb"] for r in fake_kube.requests if r["method"] != "GET"] == ["create"]
    # A retry of the step finds the completed job and does not train again.
    again = train_with_trainjob(dataset, tmp_path / "model2", settings, "run-1", TINY, cluster=fake_kube.cluster, poll_s=0.2, log=lambda *_: None)
    assert again == report and [r["verb"] for r in fake_kube.requests].count("create") == 1
    role = yaml.safe_load((REPO / "manifests" / "rbac" / "role.yaml").read_text())
    granted = {verb for rule in role["rules"] if "trainjobs" in rule["resources"] for verb in rule["verbs"]}
    assert {r["verb"] for r in fake_kube.requests} <= granted


def test_a_failed_trainjob_surfaces_its_reason_and_a_retry_recreates_it(fake_kube, tmp_path):
    fake_kube.trainjob = "fail"
    job = _job(tmp_path)
    with pytest.raises(TrainJobError, match=r"TrainJob ml/llm-train failed: JobSetFailed: .*OOMKilled"):
        run_trainjob(job, fake_kube.cluster, poll_s=0.05, log=lambda *_: None)
    assert ("trainjobs", "ml", "llm-train") in fake_kube.objects, "a failed job is kept for its logs"
    fake_kube.trainjob = "never"
    with pytest.raises(TrainJobError, match="did not complete within"):
        run_trainjob(job, fake_kube.cluster, poll_s=0.05, timeout_s=0.3, log=lambda *_: None)
    assert [r["verb"] for r in fake_kube.requests if r["method"] != "GET"] == ["create", "delete", "create", "delete"]
    assert fake_kube.objects == {}, "a timed-out job is deleted"


def test_cancelling_the_step_deletes_the_trainjob(fake_kube, tmp_path):
    fake_kube.trainjob = "never"
    kubeconfig = fake_kube.kubeconfig(tmp_path / "kubeconfig")
    (tmp_path / "job.json").write_text(json.dumps(_job(tmp_path)))
    script = (
        "import json, sys; from pipelines.kube import Cluster; from pipelines.trainjob import run_trainjob, TrainJobError\n"
        f"job = json.load(open({str(tmp_path / 'job.json')!r}))\n"
        f"try:\n    run_trainjob(job, Cluster(kubeconfig={str(kubeconfig)!r}), poll_s=0.05)\n"
        "except TrainJobError as exc:\n    sys.exit(str(exc))\n"
    )
    step = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while ("trainjobs", "ml", "llm-train") not in fake_kube.objects and time.monotonic() < deadline:
        time.sleep(0.05)
    step.send_signal(signal.SIGTERM)  # what Kubeflow Pipelines does to a step's pod when the run is cancelled
    _, stderr = step.communicate(timeout=30)
    assert step.returncode == 1 and "cancelled; deleted it" in stderr
    assert fake_kube.requests[-1]["verb"] == "delete" and fake_kube.objects == {}


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"num_nodes": 0}, "num_nodes must be at least 1"),
        ({"gpus_per_node": -1}, "gpus_per_node"),
        ({"runtime_kind": "Runtime"}, "runtime_kind"),
        ({"workspace_path": "workspace"}, "absolute"),
        ({"name": "Train_Job"}, "DNS-1035"),
        ({"name": "t" * 41}, "at most 40"),
    ],
)
def test_bad_trainjob_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainJobSettings(**{"name": "t", **settings})


def test_a_trainjob_that_could_not_start_is_refused_before_it_is_created(tmp_path):
    settings = TrainJobSettings(name="t", num_nodes=3, gpus_per_node=0, workspace_path=str(tmp_path))
    with pytest.raises(ValueError, match="batch_size 4 .* not divisible by the world size 3"):
        render_trainjob(settings, f"{tmp_path}/runs/r1", TINY)
    with pytest.raises(ValueError, match="base_model /elsewhere/m is not on the workspace volume"):
        render_trainjob(settings, f"{tmp_path}/runs/r1", dict(TINY, batch_size=3), base_model="/elsewhere/m")
