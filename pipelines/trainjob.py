"""Training on more than one machine: the pipeline's train step as a Kubeflow Trainer ``TrainJob``.

The step stages the prepared dataset on the workspace volume (a ReadWriteMany PVC every node mounts), creates a
TrainJob on a torch runtime (``torch-distributed`` by default) that runs ``torchrun -m pipelines train`` in the
project's pipelines image on ``num_nodes`` nodes, waits for it, and copies the model it wrote on the volume into the step's
output artifact for the next steps. ``pipelines.training.run_training`` calls this for a TrainJob, and in every
trainer pod the command calls ``run_training`` again, to train there.

    job = render_trainjob(TrainJobSettings(name="llm-train", namespace="ml", num_nodes=4), "/workspace/runs/r1")
    run_trainjob(job, Cluster(), timeout_s=86_400)        # create (or adopt on retry), wait, surface failure

Kubeflow Trainer's torch plugin sets ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``,
``PET_MASTER_ADDR`` and ``PET_MASTER_PORT`` in every node's container; torchrun reads them as its defaults, so
the command carries no rendezvous settings. Calls go through :mod:`pipelines.kube` (the ``kubernetes`` client):
create, get and delete on ``trainjobs``, as ``manifests/rbac/role.yaml`` grants.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from .distributed import rows_per_rank
from .kube import Cluster, KubeError, condition
from .train import resolve_config

API_VERSION, KIND = "trainer.kubeflow.org/v1alpha1", "TrainJob"
# The stock torch runtime's one replicated job and its container are both called "node".
TRAINER_JOB = TRAINER_CONTAINER = "node"
PATCH_MANAGER = "kserve-llm.io/pipeline"
WORKSPACE_VOLUME = "workspace"


class TrainJobError(RuntimeError):
    """The TrainJob failed (with Kubeflow Trainer's reason), timed out, or was cancelled (and was deleted)."""


@dataclass
class TrainJobSettings:
    """Where and how big: the TrainJob's name and namespace, the image, nodes x GPUs, the runtime and the workspace volume.

    ``gpus_per_node`` 0 trains on CPUs with one process per node (gloo); otherwise one process per GPU (NCCL).
    ``workspace_path`` is where the PVC is mounted, in the trainer pods as in the step's pod.
    """

    name: str
    namespace: str = "default"
    image: str = "ghcr.io/kserve-llm/pipelines:0.1.0"
    num_nodes: int = 2
    gpus_per_node: int = 1
    gpu_resource: str = "nvidia.com/gpu"
    runtime: str = "torch-distributed"
    runtime_kind: str = "ClusterTrainingRuntime"
    workspace_pvc: str = "kserve-llm-workspace"
    workspace_path: str = "/workspace"
    cpu_per_node: str = "8"
    memory_per_node: str = "64Gi"
    hf_token_secret: str = ""
    labels: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_nodes < 1:
            raise ValueError(f"num_nodes must be at least 1; got {self.num_nodes}")
        if self.gpus_per_node < 0:
            raise ValueError(f"gpus_per_node must be 0 (CPU) or more; got {self.gpus_per_node}")
        if self.runtime_kind not in ("ClusterTrainingRuntime", "TrainingRuntime"):
            raise ValueError(f"runtime_kind must be ClusterTrainingRuntime or TrainingRuntime; got {self.runtime_kind!r}")
        if not Path(self.workspace_path).is_absolute():
            raise ValueError(f"workspace_path must be an absolute mount path; got {self.workspace_path!r}")
        if not re.fullmatch(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?", self.name):
            # JobSet names pods NAME-node-I-J-xxxxx, which must stay within 63 characters
            raise ValueError(f"name must be a DNS-1035 label of at most 40 characters (lower case, digits, '-'); got {self.name!r}")

    @property
    def world_size(self) -> int:
        """Training processes: one per GPU, or one per node on CPUs."""
        return self.num_nodes * max(1, self.gpus_per_node)


def job_name(run_id: str, prefix: str = "kserve-llm-train") -> str:
    """A DNS-1035 name for the run's TrainJob, the same on every retry of the step (so a retry finds it)."""
    return f"{prefix}-{hashlib.sha1(run_id.encode()).hexdigest()[:10]}"


def command(stage: str, train_config: dict, base_model: str = "") -> tuple[list[str], list[str]]:
    """The trainer container's command and args: ``torchrun -m pipelines train`` on the staged dataset, writing
    ``STAGE/model``, checkpointing to ``STAGE/train.pt`` (rank 0 writes; a re-created job resumes from it)."""
    args = ["-m", "pipelines", "train", "--dataset", f"{stage}/dataset", "--output", f"{stage}/model", "--checkpoint", f"{stage}/train.pt", "--quiet"]
    args += ["--train-config", json.dumps(train_config, sort_keys=True)]
    if base_model:
        args += ["--base-model", base_model]
    return ["torchrun"], args


def render_trainjob(settings: TrainJobSettings, stage: str, train_config: dict | None = None, base_model: str = "") -> dict:
    """The TrainJob for ``settings`` training on the dataset staged under ``stage`` (a directory on the workspace volume)."""
    volume = settings.workspace_path.rstrip("/") + "/"
    if not stage.startswith(volume):
        raise ValueError(f"stage {stage} is not on the workspace volume ({settings.workspace_path}): the trainer pods could not read it")
    if base_model and not base_model.startswith(volume):
        raise ValueError(f"base_model {base_model} is not on the workspace volume ({settings.workspace_path}): the trainer pods could not read it")
    config = resolve_config(train_config or {}, checkpointed=True)  # what the pods' run_training resolves it to
    rows_per_rank(config.batch_size, settings.world_size)  # refused here, not after the nodes were scheduled
    cmd, args = command(stage, {**(train_config or {}), "checkpoint_every": config.checkpoint_every}, base_model)
    resources: dict = {"cpu": settings.cpu_per_node, "memory": settings.memory_per_node}
    if settings.gpus_per_node:
        resources[settings.gpu_resource] = str(settings.gpus_per_node)
    env = [{"name": "HOME", "value": "/tmp"}, {"name": "PYTHONUNBUFFERED", "value": "1"}]
    if settings.hf_token_secret:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": settings.hf_token_secret, "key": "token", "optional": True}}})
    pod = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
        "volumes": [
            {"name": WORKSPACE_VOLUME, "persistentVolumeClaim": {"claimName": settings.workspace_pvc}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},  # NCCL and DataLoader workers use /dev/shm
        ],
        "containers": [
            {
                "name": TRAINER_CONTAINER,
                "volumeMounts": [
                    {"name": WORKSPACE_VOLUME, "mountPath": settings.workspace_path},
                    {"name": "tmp", "mountPath": "/tmp"},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                ],
                "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}},
            }
        ],
    }
    if settings.gpus_per_node:
        pod["tolerations"] = [{"key": settings.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}]
    patch = {"spec": {"replicatedJobs": [{"name": TRAINER_JOB, "template": {"spec": {"template": {"spec": pod}}}}]}}
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": settings.name,
            "namespace": settings.namespace,
            "labels": {"app.kubernetes.io/name": "kserve-llm", "app.kubernetes.io/component": "train", **settings.labels},
        },
        "spec": {
            "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": settings.runtime_kind, "name": settings.runtime},
            "trainer": {
                "image": settings.image,
                "command": cmd,
                "args": args,
                "numNodes": settings.num_nodes,
                "numProcPerNode": max(1, settings.gpus_per_node),
                "resourcesPerNode": {"requests": resources, "limits": dict(resources)},
                "env": env,
            },
            "runtimePatches": [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": patch}}],
        },
    }


class Cancelled(BaseException):
    """SIGTERM reached the step (Kubeflow Pipelines cancels a run by deleting its pods)."""


def _raise_cancelled(signum, frame) -> None:
    raise Cancelled()


def state(job: dict) -> tuple[str, str]:
    """``("complete" | "failed" | "running", reason)`` from the TrainJob's conditions."""
    for kind, name in (("Failed", "failed"), ("Complete", "complete")):
        found = condition(job, kind)
        if found.get("status") == "True":
            return name, f"{found.get('reason', kind)}: {found.get('message', '')}".rstrip(": ")
    return "running", ""


def run_trainjob(job: dict, cluster: Cluster, timeout_s: float = 86_400, poll_s: float = 15.0, log=print) -> dict:
    """Create ``job`` and wait until it completes; returns the final object.

    A job of the same name that already exists (the step was retried) is waited on if it still runs, reused if it
    completed, and re-created if it failed (the new one resumes from the checkpoint on the volume). A failure
    raises :class:`TrainJobError` with Trainer's reason and keeps the job for its logs; a timeout or a cancel
    (SIGTERM, Ctrl-C) deletes it, so no nodes keep training for nobody.
    """
    previous = signal.signal(signal.SIGTERM, _raise_cancelled) if _main_thread() else None
    try:
        return _run(job, cluster, timeout_s, poll_s, log)
    except KubeError as exc:  # from any call, the deletes on timeout and cancel included
        raise TrainJobError(str(exc)) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(job: dict, cluster: Cluster, timeout_s: float, poll_s: float, log) -> dict:
    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    where = f"TrainJob {namespace}/{name}"
    try:
        current = cluster.get(job)
        if current and state(current)[0] == "failed":
            log(f"{where} exists from an earlier try and failed ({state(current)[1]}): deleting it and starting again from the checkpoint")
            _delete_and_wait(cluster, job, poll_s)
            current = {}
        if not current:
            current = cluster.create(job)
            trainer = job["spec"]["trainer"]
            log(f"created {where}: {trainer['numNodes']} node(s) x {trainer['numProcPerNode']} process(es), runtime {job['spec']['runtimeRef']['name']}")
        else:
            log(f"{where} exists from an earlier try of this step: waiting for it")
        deadline = time.monotonic() + timeout_s
        while True:
            status, reason = state(current)
            if status == "complete":
                log(f"{where} completed ({reason})")
                return current
            if status == "failed":
                raise TrainJobError(f"{where} failed: {reason} (kept for its logs: kubectl logs -n {namespace} -l jobset.sigs.k8s.io/jobset-name={name})")
            if time.monotonic() >= deadline:
                cluster.delete(job)
                raise TrainJobError(f"{where} did not complete within {timeout_s:.0f} s; deleted it")
            time.sleep(poll_s)
            current = cluster.get(job)
            if not current:
                raise TrainJobError(f"{where} was deleted while the step waited for it")
    except (Cancelled, KeyboardInterrupt):
        cluster.delete(job)
        log(f"cancelled: deleted {where}")
        raise TrainJobError(f"{where} cancelled; deleted it") from None


def namespace_of_this_pod(default: str = "default") -> str:
    """The namespace the step runs in, where its TrainJob goes: ``$POD_NAMESPACE`` (the downward API), else its service
    account's; ``default`` outside a pod."""
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    return path.read_text().strip() if path.is_file() else default


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _delete_and_wait(cluster: Cluster, job: dict, poll_s: float, timeout_s: float = 300) -> None:
    cluster.delete(job)
    deadline = time.monotonic() + timeout_s
    while cluster.get(job):
        if time.monotonic() >= deadline:
            raise TrainJobError(f"TrainJob {job['metadata']['namespace']}/{job['metadata']['name']} was not deleted within {timeout_s:.0f} s")
        time.sleep(poll_s)


def train_with_trainjob(
    dataset_dir: Path,
    output_dir: Path,
    settings: TrainJobSettings,
    run_id: str,
    train_config: dict | None = None,
    base_model: str = "",
    cluster: Cluster | None = None,
    timeout_s: float = 86_400,
    poll_s: float = 15.0,
    log=print,
) -> dict:
    """The train step on Kubeflow Trainer: stage the dataset on the workspace volume, run the TrainJob, copy the
    model it wrote to ``output_dir``; returns its ``training.json`` report.

    ``base_model`` must be a path the trainer pods can read (on the workspace volume), as no hub is assumed.
    """
    stage = Path(settings.workspace_path) / "runs" / job_name(run_id, "train")
    staged = stage / "dataset"
    if not staged.is_dir():  # a retry finds it staged already
        tmp = stage / "dataset.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(dataset_dir, tmp)
        tmp.replace(staged)
    job = render_trainjob(settings, str(stage), train_config, base_model)
    run_trainjob(job, cluster or Cluster(), timeout_s=timeout_s, poll_s=poll_s, log=log)
    model = stage / "model"
    if not (model / "training.json").is_file():
        raise TrainJobError(f"TrainJob {settings.namespace}/{settings.name} completed but wrote no model at {model}")
    shutil.copytree(model, output_dir, dirs_exist_ok=True)
    # The model stays on the volume (a retry of this step reuses the completed job and copies it again); the staged
    # dataset and the checkpoint only served the job.
    shutil.rmtree(staged, ignore_errors=True)
    (stage / "train.pt").unlink(missing_ok=True)
    return json.loads((model / "training.json").read_text())
