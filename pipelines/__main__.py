"""``python -m pipelines``: the command line of the model lifecycle toolkit.

One function per subcommand (``set_defaults(func=...)`` on its subparser); a function raises :class:`UsageError`
for a bad argument, which ``main`` reports as the subcommand's usage error (exit code 2). Heavy imports are done in
the functions, so ``--help`` and a bad flag answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIPELINE_YAML = REPO / "pipelines" / "llm_lifecycle.yaml"
DEFAULT_IMAGE = "ghcr.io/kserve-llm/pipelines:0.1.0"


class UsageError(Exception):
    """A bad argument: reported by ``main`` as the subcommand's usage error."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        args.parser.error(str(exc))  # exits 2


# --- the subcommands ---------------------------------------------------------------------------------


def demo_model(args: argparse.Namespace) -> int:
    from .demo_model import ensure_demo_model, is_built, model_path

    if not is_built(model_path()):
        print("Building the demo model (about 2.5 minutes on 2 cores, once; cached afterwards)...", file=sys.stderr)
    print(ensure_demo_model(progress=not args.quiet))
    return 0


def import_gguf(args: argparse.Namespace) -> int:
    from predictor.gguf_file import GGUFError, convert

    if args.output.exists():
        raise UsageError(f"--output: {args.output} already exists")
    try:
        print(convert(args.file, args.output))
    except GGUFError as exc:
        raise UsageError(str(exc)) from None
    return 0


def optimize(args: argparse.Namespace) -> int:
    from .optimize import OptimizationError
    from .optimize import optimize as run

    options = {
        "prune": dict(mlp_keep=args.mlp_keep, drop_layers=args.drop_layers, kv_heads_keep=args.kv_heads_keep, text=args.text),
        "distill": dict(
            student_layers=args.student_layers, student=args.student, steps=args.steps, temperature=args.temperature, alpha=args.alpha, text=args.text
        ),
        "cast": dict(dtype=args.dtype),
        "int8": dict(text=args.text),
    }.get(args.method, {})
    try:
        report = run(args.method, args.input, args.output, overwrite=args.overwrite, **options)
    except OptimizationError as exc:
        raise UsageError(str(exc)) from None
    print(json.dumps({k: v for k, v in report.items() if k != "train_loss"}, indent=2))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate as run
    from .evaluate import markdown

    try:
        results = run(args.model, args.text, args.output)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise UsageError(str(exc)) from None
    print(markdown(results))
    print(f"report: {args.output}/report.json, report.md, report.png")
    return 0


def compile_(args: argparse.Namespace) -> int:
    if args.image:
        os.environ["KSERVE_LLM_IMAGE"] = args.image  # read when the components are defined
    from .lifecycle import compile_pipeline

    try:
        compile_pipeline(args.output)
    except OSError as exc:
        raise UsageError(f"--output: cannot write {args.output}: {exc.strerror}") from None
    print(f"wrote {args.output}")
    return 0


def render_isvc(args: argparse.Namespace) -> int:
    import yaml

    from .chart import ChartError
    from .deploy import render_isvc as render
    from .k8s_schema import SchemaError, validate

    try:
        target = {k: v for k, v in (("engine", args.engine), ("kind", args.kind)) if v}
        isvc = render(args.name, args.storage_uri, args.namespace, args.canary, args.model_name, values=target, values_files=tuple(args.values))
        if args.validate:
            validate(isvc)
    except SchemaError as exc:
        raise UsageError(f"the rendered service does not validate: {exc}") from None
    except (ValueError, ChartError) as exc:
        raise UsageError(str(exc)) from None
    print(yaml.safe_dump(isvc, sort_keys=False), end="")
    return 0


def render_trainjob(args: argparse.Namespace) -> int:
    import yaml

    from .k8s_schema import SchemaError, validate
    from .trainjob import TrainJobSettings
    from .trainjob import render_trainjob as render

    try:
        settings = TrainJobSettings(
            name=args.name,
            namespace=args.namespace,
            image=args.image,
            num_nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            runtime=args.runtime,
            runtime_kind=args.runtime_kind,
            workspace_pvc=args.workspace_pvc,
            workspace_path=args.workspace_path,
            cpu_per_node=args.cpu,
            memory_per_node=args.memory,
        )
        job = render(settings, args.stage, args.train_config, args.base_model)
        if args.validate:
            validate(job)
    except ValueError as exc:  # SchemaError is a ValueError
        raise UsageError(f"the TrainJob does not validate: {exc}" if isinstance(exc, SchemaError) else str(exc)) from None
    print(yaml.safe_dump(job, sort_keys=False), end="")
    return 0


def train(args: argparse.Namespace) -> int:
    from .training import TrainingInputError, run_training, summary

    try:
        report = run_training(args.dataset, args.output, args.train_config, args.base_model, args.checkpoint, progress=not args.quiet)
    except TrainingInputError as exc:
        raise UsageError(f"--{exc.argument.replace('_', '-')}: {exc}") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports; the others print nothing
        output = {"output": str(args.output.resolve()), "method": report["method"], **summary(report)}
        print(json.dumps({**output, "world_size": int(os.environ.get("WORLD_SIZE", "1"))}))
    return 0


def run(args: argparse.Namespace) -> int:
    from .lifecycle import run_local

    overrides = {
        "corpus": args.corpus,
        "min_speedup": args.min_speedup,
        "max_perplexity_increase": args.max_perplexity_increase,
        "min_greedy_agreement": args.min_greedy_agreement,
    }
    if args.base_model is not None:
        overrides["base_model"] = str(Path(args.base_model).resolve())
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.corpus is not None and not args.corpus.startswith(("http://", "https://")):
        overrides["corpus"] = str(Path(args.corpus).resolve())
    result = run_local(args.output, tiny=args.tiny, train_config=args.train_config, **overrides)
    print()
    if result["report"]:
        print(f"evaluation report: {result['report']}")
    registered = result["registered"]
    if registered:
        path = registered["source"].removeprefix("file://")
        print(f"registered: {registered['name']} version {registered['version']} (alias {registered['alias']}) in {registered['tracking_uri']}")
        print(f"serve it:   python -m predictor --model_dir {path} --model_name {registered['name']}")
    print(f"tasks:      {', '.join(f'{task} {status}' for task, status in result['tasks'])} (all of it in {result['summary']})")
    if not result["ok"]:
        print(f"pipeline failed after {result['seconds']} s: {result['error']}", file=sys.stderr)
        return 1
    print(f"pipeline succeeded in {result['seconds']} s (pipeline root: {result['pipeline_root']})")
    return 0


# --- the parser ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description="Build, optimize, evaluate and ship causal LMs.")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        sub.set_defaults(func=func, parser=sub)
        return sub

    demo = command("demo-model", demo_model, "Build the demo model (cached) and print its directory.")
    demo.add_argument("--quiet", action="store_true", help="No progress bar.")

    gguf = command("import-gguf", import_gguf, "Convert a GGUF file to a float safetensors model directory (tokenizer and chat template included).")
    gguf.add_argument("file", type=Path, help="The .gguf file.")
    gguf.add_argument("--output", type=Path, required=True, help="The model directory to write (must not exist).")

    opt = command("optimize", optimize, "Make an optimized variant of a model directory.")
    opt.add_argument("--method", required=True, choices=["int8", "prune", "distill", "onnx", "onnx-int8", "cast"])
    opt.add_argument("--input", required=True, help="Hugging Face model directory.")
    opt.add_argument("--output", required=True, help="New directory for the variant (with optimization.json).")
    opt.add_argument("--overwrite", action="store_true", help="Replace an existing output directory.")
    opt.add_argument("--text", help="Training/calibration text: a .txt file or a directory of them (default: the demo corpus).")
    opt.add_argument("--mlp-keep", type=float, default=0.5, help="prune: fraction of MLP neurons kept in every layer.")
    opt.add_argument("--drop-layers", type=int, default=0, help="prune: number of whole decoder layers removed (least important first).")
    opt.add_argument(
        "--kv-heads-keep",
        type=float,
        default=1.0,
        help="prune: fraction of KV head groups (a KV head with its query heads) kept in every layer (default 1: none pruned).",
    )
    opt.add_argument("--student-layers", type=int, help="distill: decoder layers in the student (default: half the teacher's).")
    opt.add_argument("--student", help="distill: an existing student model directory (e.g. a pruned model) instead.")
    opt.add_argument("--steps", type=int, default=300, help="distill: training steps.")
    opt.add_argument("--temperature", type=float, default=2.0, help="distill: softmax temperature T.")
    opt.add_argument("--alpha", type=float, default=0.5, help="distill: weight of the soft (KL) term.")
    opt.add_argument("--dtype", default="bfloat16", help="cast: bfloat16 or float16 weights (for GPUs).")

    ev = command("evaluate", evaluate, "Measure models on held-out text: report.json, report.md, report.png.")
    ev.add_argument(
        "--model",
        action="append",
        required=True,
        help="Model directory, or DIR@bfloat16 to run it in bfloat16 (default float32); repeat: the first is the baseline.",
    )
    ev.add_argument("--text", required=True, help="Held-out text file.")
    ev.add_argument("--output", required=True, help="Report directory.")

    comp = command("compile", compile_, "Compile the Kubeflow pipeline to IR YAML (upload it to Kubeflow Pipelines).")
    comp.add_argument("--output", default=str(PIPELINE_YAML), help=f"IR YAML file (default: {PIPELINE_YAML.relative_to(REPO)}).")
    comp.add_argument("--image", help=f"Image of every component (default: $KSERVE_LLM_IMAGE or {DEFAULT_IMAGE}).")

    isvc = command("render-isvc", render_isvc, "Print the InferenceService or LLMInferenceService the deploy step would apply (the Helm chart renders it).")
    isvc.add_argument("--name", required=True, help="InferenceService name.")
    isvc.add_argument("--storage-uri", required=True, help="Model location: s3://, gs://, pvc://, hf://, oci://, https://...")
    isvc.add_argument("--namespace", default="default", help="Namespace (default: default).")
    isvc.add_argument("--canary", type=int, metavar="PERCENT", help="Canary traffic percent for the new revision (needs deploymentMode=Knative).")
    isvc.add_argument("--model-name", help="Model name on the endpoints (default: the chart's model.name).")
    isvc.add_argument("--values", action="append", default=[], metavar="FILE", help="Chart values file (repeat), as for helm install -f.")
    isvc.add_argument("--engine", choices=["kserve-llm", "vllm"], help="Serving engine (the chart's engine value; default: the chart's, kserve-llm).")
    isvc.add_argument(
        "--kind", choices=["InferenceService", "LLMInferenceService"], help="Resource to render (the chart's kind value; default: InferenceService)."
    )
    isvc.add_argument("--validate", action="store_true", help="Also validate against the KServe CRD schema ($KSERVE_LLM_CRDS).")

    tj = command("render-trainjob", render_trainjob, "Print the Kubeflow Trainer TrainJob the train step creates for these settings (train_nodes > 1).")
    tj.add_argument("--name", required=True, help="TrainJob name.")
    tj.add_argument("--namespace", default="default", help="Namespace (default: default).")
    tj.add_argument("--image", default=os.environ.get("KSERVE_LLM_IMAGE", DEFAULT_IMAGE), help="Trainer image.")
    tj.add_argument("--nodes", type=int, default=2, help="Training nodes (numNodes; default 2).")
    tj.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per node, one process each (0: CPU, one process per node; default 1).")
    tj.add_argument("--runtime", default="torch-distributed", help="Training runtime name (default: the stock torch-distributed ClusterTrainingRuntime).")
    tj.add_argument("--runtime-kind", default="ClusterTrainingRuntime", choices=["ClusterTrainingRuntime", "TrainingRuntime"], help="Kind of the runtime.")
    tj.add_argument("--workspace-pvc", default="kserve-llm-workspace", help="ReadWriteMany PVC for dataset, checkpoints, model.")
    tj.add_argument("--workspace-path", default="/workspace", help="Where the PVC is mounted (default: /workspace).")
    tj.add_argument("--stage", default="/workspace/runs/example", help="Run directory on the volume: dataset/ in, model/ and train.pt out.")
    tj.add_argument("--base-model", default="", help="A model directory on the volume to fine-tune.")
    _train_config_option(tj, "TrainConfig fields (batch_size is the global batch).")
    tj.add_argument("--cpu", default="8", help="CPU per node (default 8).")
    tj.add_argument("--memory", default="64Gi", help="Memory per node (default 64Gi).")
    tj.add_argument("--validate", action="store_true", help="Also validate against the TrainJob CRD schema ($KSERVE_LLM_CRDS).")

    tr = command("train", train, "Train on a prepared dataset directory (the TrainJob's command); under torchrun, data-parallel (DDP or FSDP).")
    tr.add_argument("--dataset", type=Path, required=True, help="Prepared dataset directory (tokenizer/, ids.safetensors: the pipeline's data step).")
    tr.add_argument("--output", type=Path, required=True, help="Model directory to write (must not exist, or be empty).")
    tr.add_argument("--base-model", help="A model directory to fine-tune (LoRA by default) instead of training from scratch.")
    _train_config_option(tr, 'TrainConfig fields, e.g. \'{"steps": 30, "batch_size": 16, "parallelism": "fsdp"}\' (batch_size is the global batch).')
    tr.add_argument(
        "--checkpoint",
        type=Path,
        help="Checkpoint file: resumed from when it exists, written by rank 0 every checkpoint_every steps (50 when the train config says 0, its default).",
    )
    tr.add_argument("--quiet", action="store_true", help="No progress bar.")

    r = command("run", run, "Run the whole pipeline.")
    r.add_argument("--local", action="store_true", required=True, help="On this machine with kfp.local (the only mode; for a cluster, compile and upload).")
    r.add_argument("--output", default="pipeline-run", help="Working directory: pipeline root, MLflow store, checkpoints (default: ./pipeline-run).")
    r.add_argument("--tiny", action="store_true", help="Tiny model and settings (about 2 minutes; what the tests run).")
    r.add_argument("--corpus", help="Corpus: a .txt file, a directory of them, or an http(s) URL (default: the demo corpus).")
    r.add_argument("--base-model", help="A model directory to fine-tune (LoRA by default) instead of training from scratch.")
    _train_config_option(r, 'Train settings merged into the default train_config, e.g. \'{"steps": 30, "finetune": "full"}\' (TrainConfig fields).')
    r.add_argument("--min-speedup", type=float, help="Gate: minimum batch-1 decode speedup over the unoptimized model.")
    r.add_argument("--max-perplexity-increase", type=float, help="Gate: maximum relative perplexity increase (0.05 = 5%%).")
    r.add_argument("--min-greedy-agreement", type=float, help="Gate: minimum share of held-out greedy next tokens equal to the unoptimized model's (0 … 1).")
    return parser


def _train_config_option(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--train-config", type=_train_config, default={}, metavar="JSON", help=help)


def _train_config(text: str) -> dict:
    """``--train-config``: a JSON object of TrainConfig fields, checked here rather than after the data step."""
    from .train import TrainConfig

    try:
        values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError(f"expected a JSON object, got {text!r}")
        TrainConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return values


if __name__ == "__main__":
    sys.exit(main())
