"""The pipeline: prepare → train → optimize (in parallel) → evaluate → gate → register → deploy.

Only the wiring and the cluster settings live here; every step is a component of ``pipelines.components``.

    python -m pipelines compile            # → pipelines/llm_lifecycle.yaml, for a KFP cluster
    python -m pipelines run --local        # the whole run on this machine (kfp.local, no cluster)
"""

import re
from contextlib import contextmanager
from dataclasses import asdict

from kfp import dsl, kubernetes

from . import components as c
from .demo_model import DEMO

PIPELINE_NAME = "llm-lifecycle"
DEFAULT_METHODS = [
    {"name": "int8", "method": "int8"},
    {"name": "distilled-half", "method": "distill", "steps": 300},
    {"name": "pruned-recovered", "method": "prune", "mlp_keep": 0.5, "drop_layers": 1, "recover_steps": 300},
    {"name": "onnx", "method": "onnx"},
]
TRAIN_CONFIG = {k: v for k, v in asdict(DEMO).items() if k not in ("vocab_size", "max_seconds", "checkpoint_every")}
WORKSPACE = "/workspace"


@dsl.pipeline(name=PIPELINE_NAME, description="Train or fine-tune a causal LM, optimize it, gate on quality and latency, register it, deploy it on KServe.")
def llm_lifecycle(
    corpus: str = "",
    base_model: str = "",
    vocab_size: int = DEMO.vocab_size,
    held_out_fraction: float = 0.05,
    train_config: dict = TRAIN_CONFIG,
    checkpoint_dir: str = f"{WORKSPACE}/checkpoints",
    workspace_pvc: str = "kserve-llm-workspace",
    hf_token_secret: str = "hf-token",
    train_backend: str = "auto",
    train_nodes: int = 1,
    train_gpus_per_node: int = 1,
    train_pod_gpus: int = 1,
    trainjob_runtime: str = "torch-distributed",
    train_image: str = c.IMAGE,
    train_timeout_s: int = 86_400,
    methods: list = DEFAULT_METHODS,
    max_perplexity_increase: float = 0.05,
    min_speedup: float = 1.2,
    max_ttft_ms: float = 0.0,
    min_greedy_agreement: float = 0.0,
    registered_model_name: str = "kserve-llm",
    registry_backend: str = "mlflow",
    registry_uri: str = "http://mlflow.mlflow.svc.cluster.local:5000",
    alias: str = "candidate",
    isvc_name: str = "llm",
    namespace: str = "kserve-llm",
    storage_uri: str = "",
    canary_percent: int = -1,
    chart_values: dict = {},  # noqa: B006 (KFP pipeline parameters are declared by their defaults)
    dry_run: bool = False,
    ready_timeout_s: int = 900,
):
    prepare = c.prepare_data(corpus=corpus, base_model=base_model, vocab_size=vocab_size, held_out_fraction=held_out_fraction)
    prepare.set_display_name("prepare data")
    train = c.train_model(
        dataset=prepare.outputs["dataset"],
        base_model=base_model,
        train_config=train_config,
        checkpoint_dir=checkpoint_dir,
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        train_backend=train_backend,
        train_nodes=train_nodes,
        train_gpus_per_node=train_gpus_per_node,
        trainjob_runtime=trainjob_runtime,
        train_image=train_image,
        workspace_pvc=workspace_pvc,
        workspace_path=WORKSPACE,
        hf_token_secret=hf_token_secret,
        train_timeout_s=train_timeout_s,
    )
    train.set_display_name("train")
    train.set_retry(num_retries=2, backoff_duration="60s")
    # The step's own GPUs: 1 to train in its pod; 0 when it only launches and watches a TrainJob (train_nodes > 1).
    train.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(train_pod_gpus)
    kubernetes.mount_pvc(train, pvc_name=workspace_pvc, mount_path=WORKSPACE)
    kubernetes.use_secret_as_env(train, secret_name=hf_token_secret, secret_key_to_env={"token": "HF_TOKEN"}, optional=True)
    kubernetes.use_secret_as_env(prepare, secret_name=hf_token_secret, secret_key_to_env={"token": "HF_TOKEN"}, optional=True)

    with dsl.ParallelFor(items=methods, name="methods") as spec:
        opt = c.optimize_model(model=train.outputs["model"], dataset=prepare.outputs["dataset"], spec=spec)
        opt.set_display_name("optimize")

    evaluation = c.evaluate_models(
        baseline=train.outputs["model"],
        variants=dsl.Collected(opt.outputs["variant"]),
        dataset=prepare.outputs["dataset"],
        max_perplexity_increase=max_perplexity_increase,
        min_speedup=min_speedup,
        max_ttft_ms=max_ttft_ms,
        min_greedy_agreement=min_greedy_agreement,
    )
    evaluation.set_display_name("evaluate")

    with dsl.If(evaluation.outputs["passed"] == True, name="gate"):  # noqa: E712 (a KFP condition, not Python)
        register = c.register_model(
            model=evaluation.outputs["selected"],
            registered_name=registered_model_name,
            backend=registry_backend,
            registry_uri=registry_uri,
            alias=alias,
            corpus=corpus,
            dataset=prepare.outputs["dataset"],
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        )
        register.set_display_name("register")
        register.set_caching_options(False)
        deploy = c.deploy_model(
            isvc_name=isvc_name,
            namespace=namespace,
            storage_uri=storage_uri,
            registered_source=register.outputs["source"],
            model_name=registered_model_name,
            canary_percent=canary_percent,
            chart_values=chart_values,
            dry_run=dry_run,
            ready_timeout_s=ready_timeout_s,
        )
        deploy.set_display_name("deploy")
        deploy.set_caching_options(False)
    with dsl.Else(name="gate-failed"):
        c.gate_failed(reason=evaluation.outputs["reason"]).set_display_name("gate failed")


def compile_pipeline(path: str) -> None:
    from kfp import compiler

    compiler.Compiler().compile(llm_lifecycle, package_path=path)


LOCAL_METHODS = [
    {"name": "int8", "method": "int8"},
    {"name": "distilled-half", "method": "distill", "steps": 150},
    {"name": "pruned-recovered", "method": "prune", "mlp_keep": 0.5, "drop_layers": 1, "recover_steps": 150},
    {"name": "onnx", "method": "onnx"},
]
# For a base model: the methods that need no training. Distillation and pruning recovery work on every family
# too, but train for hours on CPU at SmolLM2's size; pass ``methods`` to add them.
BASE_MODEL_METHODS = [{"name": "int8", "method": "int8"}, {"name": "bf16", "method": "cast", "dtype": "bfloat16"}]
TINY_SETTINGS = {
    "vocab_size": 512,
    "train_config": {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 64, "seq_len": 64, "batch_size": 4, "steps": 40, "lr": 5e-3, "warmup_steps": 5},
    "methods": [{"name": "int8", "method": "int8"}, {"name": "distilled-half", "method": "distill", "steps": 5}],
    "min_speedup": 0.0001,
    "max_perplexity_increase": 10.0,
}


def local_arguments(output_dir, tiny: bool = False, **overrides) -> dict:
    """The pipeline's arguments for ``run --local``: demo corpus, local MLflow store, checkpoints and a dry-run deploy.

    A ``base_model`` gets ``BASE_MODEL_METHODS`` unless ``methods`` is given; ``train_config`` is merged into the default one.
    """
    from pathlib import Path

    out = Path(output_dir).resolve()
    arguments = {
        "train_config": TRAIN_CONFIG,
        "methods": LOCAL_METHODS,
        "min_speedup": 1.0,
        "checkpoint_dir": str(out / "checkpoints"),
        "registry_uri": f"sqlite:///{out / 'mlflow.db'}",
        "registered_model_name": "kserve-llm-demo",
        "dry_run": True,
        "namespace": "default",
        # A local MLflow store's artifacts are file:// paths no cluster can fetch: the dry-run deploy renders
        # the service for the model copied to the workspace volume under its registered name.
        "storage_uri": "pvc://kserve-llm-workspace/models/kserve-llm-demo",
    }
    if tiny:
        arguments.update(TINY_SETTINGS)
    if overrides.get("base_model"):
        arguments["methods"] = BASE_MODEL_METHODS
    train_config = {**arguments["train_config"], **overrides.pop("train_config", {})}
    arguments.update(overrides, train_config=train_config)
    return arguments


def run_local(output_dir, tiny: bool = False, **overrides) -> dict:
    """Run the whole pipeline here with ``kfp.local`` (subprocesses in this Python environment).

    Returns ``{"ok", "error", "tasks", "pipeline_root", "report", "registered", "seconds", "summary"}`` and writes it
    to ``summary``, ``OUTPUT/run.json``. ``tasks`` is ``[task, state]`` for every task kfp.local ran, in the order they
    ended, with kfp's own final state of each (``SUCCESS`` or ``FAILURE``, retries and cache hits included): a task
    skipped (its condition false, or after an upstream failure) is not there. ``registered`` is the version the alias
    points at in the local MLflow store (``None`` when the gate stopped the run).
    """
    import builtins
    import json
    import time
    import warnings
    from pathlib import Path

    from kfp import local

    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    arguments = local_arguments(out, tiny, **overrides)
    root = out / "pipeline-root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    started = time.time()
    error = None
    tasks: list[list[str]] = []
    # kfp.local indents print() while a task runs by swapping builtins.print; tasks of a ParallelFor run in
    # threads and can restore each other's swap, leaving print indented after the run: put it back.
    real_print = builtins.print
    with warnings.catch_warnings(), task_states(tasks):
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")  # display names, GPU, retries
        try:
            llm_lifecycle(**arguments)
        except RuntimeError as exc:  # kfp.local with raise_on_error: "Pipeline ... finished with status FAILURE. Inner task failed: ..."
            error = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # without kfp's terminal colours
        finally:
            builtins.print = real_print
    reports = [p for p in root.rglob("report") if p.parent.name.startswith("evaluate-models") and p.stat().st_mtime >= started]
    reports.sort(key=lambda p: p.stat().st_mtime)
    result = {
        "ok": error is None,
        "error": error,
        "tasks": tasks,
        "pipeline_root": str(root),
        "report": str(reports[-1]) if reports else None,
        "registered": _registered(arguments),
        "seconds": round(time.time() - started, 1),
        "summary": str(out / "run.json"),
    }
    (out / "run.json").write_text(json.dumps(result, indent=2))
    return result


@contextmanager
def task_states(tasks: list):
    """Appends ``[task, state]`` to ``tasks`` as each task of a kfp.local run ends, with kfp's own state (the
    ``kfp.local.status.Status`` its task executor returns, after retries and cache), rather than from its coloured log.

    kfp.local's orchestrators run every container task through ``kfp.local.orchestrator.task_executor.
    execute_single_task``, which is wrapped for the duration (read in kfp 2.17.3; the project pins kfp >=2.17.3,<3).
    """
    from kfp.local.orchestrator import task_executor

    real = task_executor.execute_single_task

    def recorded(*args, **kwargs):
        name = kwargs.get("task_name", args[0] if args else "?")
        try:
            outputs, state = real(*args, **kwargs)
        except BaseException:
            tasks.append([name, "FAILURE"])
            raise
        tasks.append([name, state.name])
        return outputs, state

    task_executor.execute_single_task = recorded
    try:
        yield tasks
    finally:
        task_executor.execute_single_task = real


def _registered(arguments: dict) -> dict | None:
    """The version ``alias`` points at in the run's MLflow store, or None."""
    if arguments.get("registry_backend", "mlflow") != "mlflow" or not arguments["registry_uri"].startswith("sqlite:"):
        return None  # only a local store is read back here
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=arguments["registry_uri"], registry_uri=arguments["registry_uri"])
    alias = arguments.get("alias", "candidate")
    try:
        version = client.get_model_version_by_alias(arguments["registered_model_name"], alias)
    except MlflowException:
        return None
    run = client.get_run(version.run_id)
    return {
        "name": version.name,
        "version": version.version,
        "alias": alias,
        "source": version.source,
        "tags": dict(version.tags),
        "metrics": dict(run.data.metrics),
        "tracking_uri": arguments["registry_uri"],
    }
