"""``python -m pipelines``: the command line of the model lifecycle toolkit."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIPELINE_YAML = REPO / "pipelines" / "llm_lifecycle.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description="Build, optimize, evaluate and ship causal LMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo-model", help="Build the demo model (cached) and print its directory.")
    demo.add_argument("--quiet", action="store_true", help="No progress bar.")

    gguf = commands.add_parser("import-gguf", help="Convert a GGUF file to a float safetensors model directory (tokenizer and chat template included).")
    gguf.add_argument("file", type=Path, help="The .gguf file.")
    gguf.add_argument("--output", type=Path, required=True, help="The model directory to write (must not exist).")

    opt = commands.add_parser("optimize", help="Make an optimized variant of a model directory.")
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

    ev = commands.add_parser("evaluate", help="Measure models on held-out text: report.json, report.md, report.png.")
    ev.add_argument("--model", action="append", required=True, help="Model directory (repeat; the first is the baseline).")
    ev.add_argument("--text", required=True, help="Held-out text file.")
    ev.add_argument("--output", required=True, help="Report directory.")

    comp = commands.add_parser("compile", help="Compile the Kubeflow pipeline to IR YAML (upload it to Kubeflow Pipelines).")
    comp.add_argument("--output", default=str(PIPELINE_YAML), help=f"IR YAML file (default: {PIPELINE_YAML.relative_to(REPO)}).")
    comp.add_argument("--image", help="Image of every component (default: $KSERVE_LLM_IMAGE or ghcr.io/kserve-llm/predictor:0.1.0).")

    isvc = commands.add_parser("render-isvc", help="Print the InferenceService or LLMInferenceService the deploy step would apply (the Helm chart renders it).")
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

    tj = commands.add_parser("render-trainjob", help="Print the Kubeflow Trainer TrainJob the train step creates for these settings (train_nodes > 1).")
    tj.add_argument("--name", required=True, help="TrainJob name.")
    tj.add_argument("--namespace", default="default", help="Namespace (default: default).")
    tj.add_argument("--image", default=os.environ.get("KSERVE_LLM_IMAGE", "ghcr.io/kserve-llm/predictor:0.1.0"), help="Trainer image.")
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

    train = commands.add_parser("train", help="Train on a prepared dataset directory (the TrainJob's command); under torchrun, data-parallel (DDP or FSDP).")
    train.add_argument("--dataset", type=Path, required=True, help="Prepared dataset directory (tokenizer/, ids.safetensors: the pipeline's data step).")
    train.add_argument("--output", type=Path, required=True, help="Model directory to write (must not exist, or be empty).")
    train.add_argument("--base-model", help="A model directory to fine-tune (LoRA by default) instead of training from scratch.")
    _train_config_option(train, 'TrainConfig fields, e.g. \'{"steps": 30, "batch_size": 16, "parallelism": "fsdp"}\' (batch_size is the global batch).')
    train.add_argument("--checkpoint", type=Path, help="Checkpoint file: resumed from when it exists, written by rank 0 every checkpoint_every steps.")
    train.add_argument("--quiet", action="store_true", help="No progress bar.")

    run = commands.add_parser("run", help="Run the whole pipeline.")
    run.add_argument("--local", action="store_true", required=True, help="On this machine with kfp.local (the only mode; for a cluster, compile and upload).")
    run.add_argument("--output", default="pipeline-run", help="Working directory: pipeline root, MLflow store, checkpoints (default: ./pipeline-run).")
    run.add_argument("--tiny", action="store_true", help="Tiny model and settings (about 2 minutes; what the tests run).")
    run.add_argument("--corpus", help="Corpus: a .txt file, a directory of them, or an http(s) URL (default: the demo corpus).")
    run.add_argument("--base-model", help="A model directory to fine-tune (LoRA by default) instead of training from scratch.")
    _train_config_option(run, 'Train settings merged into the default train_config, e.g. \'{"steps": 30, "finetune": "full"}\' (TrainConfig fields).')
    run.add_argument("--min-speedup", type=float, help="Gate: minimum batch-1 decode speedup over the unoptimized model.")
    run.add_argument("--max-perplexity-increase", type=float, help="Gate: maximum relative perplexity increase (0.05 = 5%%).")
    run.add_argument("--min-greedy-agreement", type=float, help="Gate: minimum share of held-out greedy next tokens equal to the unoptimized model's (0 … 1).")
    args = parser.parse_args(argv)

    if args.command == "demo-model":
        from .demo_model import ensure_demo_model, is_built, model_path

        if not is_built(model_path()):
            print("Building the demo model (about 2.5 minutes on 2 cores, once; cached afterwards)...", file=sys.stderr)
        print(ensure_demo_model(progress=not args.quiet))
    elif args.command == "import-gguf":
        from predictor.gguf_file import GGUFError, convert

        if args.output.exists():
            parser.error(f"--output: {args.output} already exists")
        try:
            print(convert(args.file, args.output))
        except GGUFError as exc:
            parser.error(str(exc))
    elif args.command == "optimize":
        from .optimize import OptimizationError, optimize

        options = {
            "prune": dict(mlp_keep=args.mlp_keep, drop_layers=args.drop_layers, kv_heads_keep=args.kv_heads_keep, text=args.text),
            "distill": dict(
                student_layers=args.student_layers, student=args.student, steps=args.steps, temperature=args.temperature, alpha=args.alpha, text=args.text
            ),
            "cast": dict(dtype=args.dtype),
        }.get(args.method, {})
        try:
            report = optimize(args.method, args.input, args.output, overwrite=args.overwrite, **options)
        except OptimizationError as exc:
            parser.error(str(exc))
        print(json.dumps({k: v for k, v in report.items() if k != "train_loss"}, indent=2))
    elif args.command == "evaluate":
        from .evaluate import evaluate

        try:
            results = evaluate(args.model, args.text, args.output)
        except (FileNotFoundError, ValueError, RuntimeError) as exc:
            parser.error(str(exc))
        from .evaluate import markdown

        print(markdown(results))
        print(f"report: {args.output}/report.json, report.md, report.png")
    elif args.command == "compile":
        if args.image:
            os.environ["KSERVE_LLM_IMAGE"] = args.image
        from .lifecycle import compile_pipeline

        try:
            compile_pipeline(args.output)
        except OSError as exc:
            parser.error(f"--output: cannot write {args.output}: {exc.strerror}")
        print(f"wrote {args.output}")
    elif args.command == "render-isvc":
        import yaml

        from .chart import ChartError
        from .deploy import render_isvc
        from .k8s_schema import SchemaError, validate

        try:
            target = {k: v for k, v in (("engine", args.engine), ("kind", args.kind)) if v}
            isvc = render_isvc(args.name, args.storage_uri, args.namespace, args.canary, args.model_name, values=target, values_files=tuple(args.values))
            if args.validate:
                validate(isvc)
        except SchemaError as exc:
            parser.error(f"the rendered service does not validate: {exc}")
        except (ValueError, ChartError) as exc:
            parser.error(str(exc))
        print(yaml.safe_dump(isvc, sort_keys=False), end="")
    elif args.command == "render-trainjob":
        import yaml

        from .k8s_schema import SchemaError, validate
        from .trainjob import TrainJobSettings, render_trainjob

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
            job = render_trainjob(settings, args.stage, args.train_config, args.base_model)
            if args.validate:
                validate(job)
        except ValueError as exc:  # SchemaError is a ValueError
            parser.error(f"the TrainJob does not validate: {exc}" if isinstance(exc, SchemaError) else str(exc))
        print(yaml.safe_dump(job, sort_keys=False), end="")
    elif args.command == "train":
        from predictor.loading import ModelLoadError

        from .train import TrainConfig, train_on_dataset

        if not (args.dataset / "ids.safetensors").is_file():
            parser.error(f"--dataset: {args.dataset} is not a prepared dataset directory (no ids.safetensors)")
        if args.output.is_file() or (args.output.is_dir() and any(args.output.iterdir())):
            parser.error(f"--output: {args.output} already exists and is not empty")
        args.output = args.output.resolve()  # "." has no name to put ".partial" beside
        if args.checkpoint is not None:
            if args.checkpoint.is_dir():
                parser.error(f"--checkpoint: {args.checkpoint} is a directory; give the checkpoint file's path")
            try:
                args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                parser.error(f"--checkpoint: cannot create {args.checkpoint.parent}: {exc.strerror}")
        # The model is written beside --output and renamed into place when complete: a run killed while saving
        # leaves no half-written --output, so a re-created TrainJob (resuming from its checkpoint) can write it.
        main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 saves; the others print nothing
        partial = args.output.with_name(args.output.name + ".partial")
        if main_rank:
            shutil.rmtree(partial, ignore_errors=True)
        try:
            report = train_on_dataset(args.dataset, partial, TrainConfig.from_dict(args.train_config), args.base_model, args.checkpoint, not args.quiet)
        except ModelLoadError as exc:
            parser.error(f"--base-model: {exc}")
        except ValueError as exc:
            parser.error(str(exc))
        if main_rank:
            if args.output.is_dir():
                args.output.rmdir()  # empty (checked above)
            partial.replace(args.output)
            keys = ("method", "steps", "held_out_loss", "held_out_perplexity", "parameters", "trainable_parameters")
            summary = {"output": str(args.output), **{k: report[k] for k in keys}, "final_train_loss": report["train_loss"][-1]}
            print(json.dumps({**summary, "world_size": int(os.environ.get("WORLD_SIZE", "1"))}))
    elif args.command == "run":
        return _run_local(args, parser)
    return 0


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


def _run_local(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
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
    if not result["ok"]:
        print(f"pipeline failed after {result['seconds']} s: {result['error']}", file=sys.stderr)
        return 1
    print(f"pipeline succeeded in {result['seconds']} s (pipeline root: {result['pipeline_root']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
