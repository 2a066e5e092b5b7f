"""The pipeline's steps as KFP v2 components. Each one only moves artifacts in and out of a plain function
(``pipelines.dataset``, ``training``, ``optimize``, ``evaluate``, ``gate``, ``registry``, ``deploy``); the DAG is
in ``pipelines.lifecycle``.

Every component runs on the project's pipelines image (``images/Dockerfile``, target ``pipelines``;
``$KSERVE_LLM_IMAGE`` at compile time overrides the default) with ``install_kfp_package=False``: nothing is pip-installed when a step starts.
KFP ships each function's source to the container, so imports live inside the functions.
"""

import functools
import os
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

IMAGE = os.environ.get("KSERVE_LLM_IMAGE", "ghcr.io/kserve-llm/pipelines:0.1.0")
component = functools.partial(dsl.component, base_image=IMAGE, install_kfp_package=False)


@component
def prepare_data(corpus: str, base_model: str, vocab_size: int, held_out_fraction: float, dataset: Output[Dataset]):
    """Corpus (a path, a directory of .txt files, an http(s) URL, or "" for the demo corpus) → tokenizer + splits."""
    from pathlib import Path

    from pipelines.corpus import load_corpus
    from pipelines.dataset import prepare

    info = prepare(load_corpus(corpus), Path(dataset.path), vocab_size, base_model or None, held_out_fraction)
    dataset.metadata.update(info)
    print(f"prepared {info['train_tokens']} train and {info['held_out_tokens']} held-out tokens ({info['tokenizer']})")


@component
def train_model(
    dataset: Input[Dataset],
    base_model: str,
    train_config: dict,
    checkpoint_dir: str,
    run_id: str,
    train_backend: str,
    train_nodes: int,
    train_gpus_per_node: int,
    trainjob_runtime: str,
    train_image: str,
    workspace_pvc: str,
    workspace_path: str,
    hf_token_secret: str,
    train_timeout_s: int,
    model: Output[Model],
    metrics: Output[Metrics],
    loss_curve: Output[HTML],
):
    """Fine-tune ``base_model`` (a model directory; LoRA merged into the weights unless ``train_config`` says
    ``"finetune": "full"``) or train ``train_config``'s shape from scratch.

    ``train_backend`` "pod" trains in this step's pod; "trainjob" (or "auto" with ``train_nodes`` > 1) runs a
    Kubeflow Trainer TrainJob of ``train_nodes`` x ``train_gpus_per_node`` on ``trainjob_runtime`` and waits for it
    (``pipelines.trainjob``). With ``checkpoint_dir`` (a volume that outlives the pod), a retried task resumes
    from its last checkpoint. Either way it trains through ``pipelines.training.run_training``, as ``python -m
    pipelines train`` does.
    """
    import tempfile
    from pathlib import Path

    from pipelines.evaluate import png_html
    from pipelines.train import loss_chart
    from pipelines.training import run_training, summary, use_trainjob

    trainjob = None
    if use_trainjob(train_backend, train_nodes):
        from pipelines.trainjob import TrainJobSettings, job_name, namespace_of_this_pod

        trainjob = TrainJobSettings(
            name=job_name(run_id),
            namespace=namespace_of_this_pod(),
            image=train_image,
            num_nodes=train_nodes,
            gpus_per_node=train_gpus_per_node,
            runtime=trainjob_runtime,
            workspace_pvc=workspace_pvc,
            workspace_path=workspace_path,
            hf_token_secret=hf_token_secret,
        )
    checkpoint = Path(checkpoint_dir) / run_id / "train.pt" if checkpoint_dir and trainjob is None else None
    report = run_training(
        Path(dataset.path),
        Path(model.path),
        train_config,
        base_model,
        checkpoint,
        keep_checkpoint=False,
        trainjob=trainjob,
        run_id=run_id,
        timeout_s=train_timeout_s,
    )
    for key, value in summary(report).items():
        metrics.log_metric(key, value)
    for step, loss in report["held_out_curve"]:
        metrics.log_metric(f"held_out_loss_step_{step}", loss)
    model.metadata.update(
        {"name": "unoptimized", "method": "none", "training": report["method"], "base_model": base_model or "scratch", "parameters": report["parameters"]}
    )
    with tempfile.TemporaryDirectory() as tmp:
        loss_chart(report, Path(tmp) / "loss.png")
        Path(loss_curve.path).write_text(png_html(Path(tmp) / "loss.png", "Training loss"))


@component
def optimize_model(model: Input[Model], dataset: Input[Dataset], spec: dict, variant: Output[Model]):
    """One optimization method: ``spec`` is ``{"method": ..., "name": ..., **options}`` (``python -m pipelines optimize``'s options)."""
    import json
    from pathlib import Path

    from pipelines.optimize import optimize

    # KFP passes the spec's numbers as floats: whole numbers become ints again (steps, drop_layers).
    options = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in spec.items()}
    if "method" not in options:
        raise ValueError(f"optimization spec {spec} has no 'method'")
    method = options.pop("method")
    name = options.pop("name", method)
    if method in ("prune", "distill"):
        options.setdefault("text", str(Path(dataset.path) / "train.txt"))
    report = optimize(method, model.path, variant.path, **options)
    lineage = {k: model.metadata.get(k, "") for k in ("base_model", "training")}
    variant.metadata.update({"name": name, "method": method, "options": json.dumps(spec), **lineage})
    print(json.dumps({k: v for k, v in report.items() if k != "train_loss"}, indent=2))


@component
def evaluate_models(
    baseline: Input[Model],
    variants: Input[list[Model]],
    dataset: Input[Dataset],
    max_perplexity_increase: float,
    min_speedup: float,
    max_ttft_ms: float,
    min_greedy_agreement: float,
    metrics: Output[Metrics],
    report: Output[Markdown],
    chart: Output[HTML],
    selected: Output[Model],
) -> NamedTuple("Outputs", passed=bool, selected_name=str, reason=str):
    """Measure the unoptimized model and every variant on the held-out split; select the best one under the thresholds."""
    import json
    import shutil
    import tempfile
    from collections import namedtuple
    from pathlib import Path

    from pipelines.evaluate import evaluate, markdown, png_html
    from pipelines.gate import Thresholds, select

    thresholds = Thresholds(max_perplexity_increase, min_speedup, max_ttft_ms, min_greedy_agreement)
    models = [baseline, *variants]
    names = [m.metadata.get("name", f"variant-{i}") for i, m in enumerate(models)]
    with tempfile.TemporaryDirectory() as tmp:
        results = evaluate([m.path for m in models], Path(dataset.path) / "held_out.txt", tmp, names=names)
        Path(chart.path).write_text(png_html(Path(tmp) / "report.png", "Model variants: quality vs speed"))
    for r in results:
        if r["greedy_agreement"] is not None:
            metrics.log_metric(f"{r['name']}.greedy_agreement", r["greedy_agreement"])
        for key in ("perplexity", "decode_tokens_per_s_batch1", "decode_tokens_per_s_batch16", "ttft_s", "bytes_on_disk", "peak_rss_bytes"):
            metrics.log_metric(f"{r['name']}.{key}", r[key])
    index, reason = select(results, thresholds)
    gate = f"**Gate:** {reason}\n\nThresholds: {json.dumps(thresholds.__dict__)}\n"
    Path(report.path).write_text("## Evaluation\n\n" + markdown(results) + "\n" + gate)
    print(markdown(results) + "\n" + reason)
    Outputs = namedtuple("Outputs", ["passed", "selected_name", "reason"])
    if index is None:
        Path(selected.path).mkdir(parents=True, exist_ok=True)
        return Outputs(False, "", reason)
    chosen = models[index]
    shutil.copytree(chosen.path, selected.path)
    base = results[0]
    selected.metadata.update(
        {
            **chosen.metadata,
            "perplexity": results[index]["perplexity"],
            "perplexity_increase": results[index]["perplexity"] / base["perplexity"] - 1,
            "speedup_batch1": results[index]["decode_tokens_per_s_batch1"] / base["decode_tokens_per_s_batch1"],
            "decode_tokens_per_s_batch1": results[index]["decode_tokens_per_s_batch1"],
            "ttft_s": results[index]["ttft_s"],
            "greedy_agreement": results[index]["greedy_agreement"],
            "bytes_on_disk": results[index]["bytes_on_disk"],
        }
    )
    return Outputs(True, names[index], reason)


@component
def gate_failed(reason: str):
    """The else branch of the gate: fail the run, saying which threshold each variant missed."""
    raise SystemExit(f"quality gate: {reason}; nothing was registered or deployed")


@component
def register_model(
    model: Input[Model], registered_name: str, backend: str, registry_uri: str, alias: str, corpus: str, dataset: Input[Dataset], run_id: str
) -> NamedTuple("Outputs", version=str, source=str):
    """Register the selected variant (MLflow by default) with its metrics, lineage and an alias."""
    from collections import namedtuple

    from pipelines.registry import register

    meta = model.metadata
    keys = ("perplexity", "perplexity_increase", "speedup_batch1", "decode_tokens_per_s_batch1", "ttft_s", "bytes_on_disk")
    metrics = {k: float(meta[k]) for k in keys if k in meta}
    lineage = {
        "corpus": corpus or "demo corpus (pydoc_data.topics)",
        "dataset": dataset.uri,
        "base_model": str(meta.get("base_model", "")),
        "training": str(meta.get("training", "")),
        "method": str(meta.get("method", "")),
        "variant": str(meta.get("name", "")),
        "options": str(meta.get("options", "{}")),
        "pipeline_run": run_id,
    }
    result = register(model.path, registered_name, metrics, lineage, registry_uri, backend=backend, alias=alias, storage_uri=model.uri, version=None)
    print(f"registered {result['name']} version {result['version']} (alias {alias}) in {backend}: {result['source']}")
    return namedtuple("Outputs", ["version", "source"])(result["version"], result["source"])


@component
def deploy_model(
    isvc_name: str,
    namespace: str,
    storage_uri: str,
    registered_source: str,
    model_name: str,
    canary_percent: int,
    chart_values: dict,
    dry_run: bool,
    ready_timeout_s: int,
) -> str:
    """Server-side apply the chart's InferenceService for the registered model; wait for Ready or roll back.

    ``storage_uri`` "" deploys the registry's copy of the model; ``canary_percent`` -1 sends all traffic to it.
    """
    import json

    from pipelines.deploy import deploy, render_isvc

    isvc = render_isvc(
        isvc_name,
        storage_uri or registered_source,
        namespace=namespace,
        canary_percent=None if canary_percent < 0 else canary_percent,
        model_name=model_name,
        values=chart_values,
    )
    result = deploy(isvc, dry_run=dry_run, timeout_s=ready_timeout_s)
    print(json.dumps(result))
    return result["action"]
