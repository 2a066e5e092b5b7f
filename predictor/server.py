"""Command-line arguments and start-up: KServe's ModelServer arguments plus the predictor's own.

``python -m predictor`` parses the arguments, loads the model (the demo model when ``--model_dir`` does
not exist and nothing else is given), adds the OpenAI and generate routes to KServe's app, and starts
KServe's REST and gRPC servers.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

DEFAULT_MODEL_DIR = "/mnt/models"
DEFAULT_MAX_BODY_BYTES = 1 << 20

logger = logging.getLogger("kserve")  # KServe configures this logger's handlers


def build_parser() -> argparse.ArgumentParser:
    """KServe's ModelServer parser (``--model_name``, ``--http_port``, ``--grpc_port``, ``--workers``...) extended."""
    from kserve.model_server import parser as kserve_parser

    parser = argparse.ArgumentParser(
        prog="python -m predictor",
        parents=[kserve_parser],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Serve a Hugging Face causal LM through KServe (OpenAI, Open Inference Protocol V2, KServe V1).",
    )
    parser.add_argument(
        "--model_dir",
        default=DEFAULT_MODEL_DIR,
        help="Hugging Face model directory (KServe's storage initializer puts the model in /mnt/models). "
        "When it does not exist and was not given, the demo model is served.",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="Weights and activations dtype; auto: float32 on CPU, bfloat16 on CUDA.",
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available.")
    parser.add_argument("--max_model_len", type=int, default=None, help="Longest prompt + generation in tokens (default: the model's context length).")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow model code from the model directory (off by default).")
    parser.add_argument(
        "--allow_pickle_weights",
        action="store_true",
        help="Load pickle weights (*.bin) when a directory has no safetensors. Pickle can run code: only for directories you trust.",
    )
    parser.add_argument("--max_body_bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="Largest accepted HTTP request body; larger ones get 413.")
    return parser


def resolve_model_dir(args: argparse.Namespace, explicit: bool) -> Path:
    """``--model_dir`` if it exists; the demo model (built if missing) if it was left at its default."""
    path = Path(args.model_dir)
    if path.exists() or explicit:
        return path
    from pipelines.demo_model import ensure_demo_model

    logger.info("%s does not exist: serving the demo model", path)
    return ensure_demo_model()


def main(argv: list[str] | None = None) -> None:
    import kserve
    from kserve.model_server import app

    from .loading import ModelLoadError
    from .model import LLMModel
    from .protocols import generate, openai
    from .protocols.errors import install_error_handlers

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers != 1:
        parser.error("--workers must be 1: the engine owns the model in one process; scale with replicas instead")
    raw = argv if argv is not None else os.sys.argv[1:]
    explicit = any(a == "--model_dir" or a.startswith("--model_dir=") for a in raw)
    try:
        model_dir = resolve_model_dir(args, explicit)
    except (OSError, ValueError) as exc:
        parser.error(f"cannot prepare the model: {exc}")
    model = LLMModel(
        args.model_name,
        model_dir,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        trust_remote_code=args.trust_remote_code,
        allow_pickle_weights=args.allow_pickle_weights,
    )
    try:
        model.load()
    except ModelLoadError as exc:
        parser.error(str(exc))
    install_error_handlers(app, args.max_body_bytes)
    openai.register(app, openai.OpenAIRoutes(args.model_name, model.generation))
    generate.register(app, generate.GenerateRoutes(args.model_name, model.generation))
    # KServe logs "OpenAI endpoints not registered" about its own vLLM-based routes; these are ours.
    logger.info("OpenAI routes on /v1 and /openai/v1; V2 generate on /v2/models/%s/generate[_stream]", args.model_name)
    kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=args.workers, enable_grpc=args.enable_grpc).start([model])
