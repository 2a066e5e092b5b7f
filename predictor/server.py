"""Command-line arguments and start-up: KServe's ModelServer arguments plus the predictor's own.

``python -m predictor`` parses the arguments, loads the model (SmolLM2-135M-Instruct, fetched once, when ``--model_dir`` does
not exist and nothing else is given), adds the OpenAI and generate routes to KServe's app, and starts
KServe's REST and gRPC servers.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

DEFAULT_MODEL_DIR = "/mnt/models"
DEFAULT_MAX_BODY_BYTES = 1 << 20
API_KEY_ENV = "KSERVE_LLM_API_KEY"

logger = logging.getLogger("kserve")  # KServe configures this logger's handlers


def build_parser() -> argparse.ArgumentParser:
    """KServe's ModelServer parser (``--model_name``, ``--http_port``, ``--grpc_port``, ``--workers``...) extended."""
    from kserve.model_server import parser as kserve_parser

    from .protocols.tool_calls import PARSERS

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
        "When it does not exist and was not given, the default model (SmolLM2-135M-Instruct, fetched and converted once) is served.",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="Weights, activations and KV-cache dtype; auto: on CPU bfloat16 where it has AMX-BF16 or AVX512-BF16, float32 elsewhere; "
        "on CUDA bfloat16 (float16 if the model was saved so).",
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available.")
    parser.add_argument("--max_model_len", type=int, default=None, help="Longest prompt + generation in tokens (default: the model's context length).")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow model code from the model directory (off by default).")
    parser.add_argument(
        "--allow_pickle_weights",
        action="store_true",
        help="Load pickle weights (*.bin) when a directory has no safetensors. Pickle can run code: only for directories you trust.",
    )
    parser.add_argument(
        "--generation_config",
        default="auto",
        choices=["auto", "none"],
        help="auto: sampling parameters a request leaves unset (temperature, top_p, top_k, min_p, repetition_penalty) "
        "come from the model's generation_config.json where it sets them; none: OpenAI's defaults always.",
    )
    parser.add_argument("--max_body_bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="Largest accepted HTTP request body; larger ones get 413.")
    parser.add_argument(
        "--body_read_timeout",
        type=float,
        default=30.0,
        help="Seconds a request's body may take to arrive; past it, 408 and the connection is closed (0: no limit).",
    )
    security = parser.add_argument_group("security and observability")
    security.add_argument(
        "--api_key",
        nargs="+",
        default=None,
        metavar="KEY",
        help=f"Require 'Authorization: Bearer <KEY>' (gRPC metadata 'authorization') on every route but health, readiness and "
        f"/metrics; several keys may be given. Default: ${API_KEY_ENV} (comma-separated), else no key.",
    )
    security.add_argument(
        "--enable_repository_routes",
        action="store_true",
        help="Serve the V2 model-repository routes (/v2/repository/models/NAME/load and /unload, gRPC RepositoryModelLoad/Unload); "
        "off by default: an unload stops the model.",
    )
    security.add_argument(
        "--otlp_traces_endpoint",
        "--otlp-traces-endpoint",  # vLLM's spelling, which KServe's LLMInferenceService spec.tracing adds to the container
        dest="otlp_traces_endpoint",
        default=None,
        metavar="URL",
        help="Send an OpenTelemetry span per request over OTLP/HTTP to URL (e.g. http://collector:4318/v1/traces); "
        "OTEL_SERVICE_NAME and OTEL_TRACES_SAMPLER apply.",
    )
    security.add_argument(
        "--collect-detailed-traces",
        dest="collect_detailed_traces",
        default=None,
        metavar="MODULES",
        help="Accepted for KServe's LLMInferenceService spec.tracing, which adds vLLM's flag; the spans always carry the latencies.",
    )
    parser.add_argument(
        "--tool_call_parser",
        default="auto",
        choices=["auto", *PARSERS],
        help="How chat answers with tool_choice auto become tool_calls: hermes (<tool_call>{...}</tool_call>), "
        'llama3_json ({"name": ..., "parameters": ...}); auto: from the chat template\'s text.',
    )
    engine = parser.add_argument_group("engine")
    engine.add_argument("--max_num_seqs", type=_positive, default=16, help="Running batch limit (sequences decoded together).")
    engine.add_argument(
        "--kv_cache_memory",
        type=_size,
        default=None,
        help="Bytes for the paged KV cache (4Gi, 256Mi, 512M, ...). Default: on CUDA 80%% of the device memory free after "
        "loading the weights; on CPU 4Gi. Never more than max_num_seqs × max_model_len positions need.",
    )
    engine.add_argument(
        "--enable_prefix_caching",
        dest="enable_prefix_caching",
        action="store_true",
        default=True,
        help="Reuse the KV cache of full 16-token blocks a new request shares with earlier ones (prompt prefixes); on by default.",
    )
    engine.add_argument("--no_enable_prefix_caching", dest="enable_prefix_caching", action="store_false", help="Turn prefix caching off.")
    engine.add_argument(
        "--max_queue", type=_non_negative, default=256, help="Waiting requests beyond the running batch; more get 429 (gRPC RESOURCE_EXHAUSTED)."
    )
    engine.add_argument(
        "--request_timeout", type=float, default=600.0, help="Seconds a request may take from arrival to its last token (0: no limit); past it, 504."
    )
    engine.add_argument(
        "--max_prefill_tokens",
        type=_positive,
        default=None,
        help="Prompt tokens prefilled in one engine step: a longer prompt is prefilled in chunks over several steps, "
        "interleaved with the running decodes (the row-by-row runner takes one prompt whole). Default: 256 on CPU, 2048 on CUDA.",
    )
    engine.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="Run the decode step as one torch.compile graph (CPU, paged runner; compiled at start-up, cached under "
        "$KSERVE_LLM_CACHE/inductor). The default, neither flag: on CPUs that multiply bfloat16 natively (AMX or AVX512-BF16), "
        "where bfloat16 SmolLM2 measured faster compiled (Intel Xeon with AMX, 2 cores: a step 1.18x at batch 1, 1.21x at "
        "batch 16; AMD EPYC, served: 1.09-1.24x the tokens/s at C=1, 1.13-1.23x at C=16); eager elsewhere. A model that "
        "does not compile is served eagerly, and the log says why.",
    )
    engine.add_argument("--no_compile", dest="compile", action="store_false", help="Serve eagerly, whatever the CPU.")
    engine.add_argument(
        "--shutdown_grace_period", type=float, default=30.0, help="Seconds after SIGTERM for accepted requests to finish before the server exits."
    )
    lora = parser.add_argument_group("LoRA adapters")
    lora.add_argument(
        "--lora_modules",
        nargs="+",
        type=_lora_module,
        default=[],
        metavar="NAME=DIR",
        help="LoRA adapters served beside the base model: a request's model field picks one by NAME. DIR is a local peft "
        "adapter directory (adapter_config.json, adapter_model.safetensors).",
    )
    lora.add_argument(
        "--max_loras", type=_positive, default=4, help="Adapters resident at once; more are loaded on demand, the least recently used idle one evicted."
    )
    lora.add_argument("--max_lora_rank", type=_positive, default=16, help="Highest adapter rank accepted; a higher one is refused at start-up.")
    lora.add_argument(
        "--enable_lora_runtime_updates",
        action="store_true",
        help="Serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's): adapters registered and removed while serving. "
        "Every projection is wrapped at start-up with --max_loras slots of rank --max_lora_rank.",
    )
    return parser


def _lora_module(value: str) -> tuple[str, Path]:
    from .engine.lora import parse_lora_module

    try:
        return parse_lora_module(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return number


def _size(value: str) -> int:
    from .engine.kv_cache import parse_bytes

    try:
        return parse_bytes(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return number


def resolve_model_dir(args: argparse.Namespace, explicit: bool) -> Path:
    """``--model_dir`` if it exists; the default model (fetched if missing) if it was left at its default."""
    path = Path(args.model_dir)
    if path.exists() or explicit:
        return path
    from .default_model import ensure_default_model

    logger.info("%s does not exist: serving the default model (SmolLM2-135M-Instruct)", path)
    return ensure_default_model()


def api_keys_from(args: argparse.Namespace) -> list[str]:
    """``--api_key`` values, else ``$KSERVE_LLM_API_KEY`` (one key, or several separated by commas)."""
    keys = list(args.api_key or [])
    if not keys:
        keys = [key.strip() for key in os.environ.get(API_KEY_ENV, "").split(",")]
    return [key for key in keys if key]


def temp_dir_problem() -> str | None:
    """Why this process has no usable temporary directory, or None when it has one.

    torch (imported with transformers), tokenizers and the GGUF conversion need one, and without it the predictor
    died on import with Python's bare ``FileNotFoundError: No usable temporary directory found``. Called before
    anything heavy is imported.
    """
    try:
        tempfile.gettempdir()
    except FileNotFoundError as exc:
        tried = (exc.strerror or "").partition(" found in ")[2]
        return (
            f"no writable temporary directory (tried $TMPDIR, /tmp, /var/tmp, the working directory{': ' + tried if tried else ''}): "
            "mount a writable volume at /tmp (the Helm chart mounts an emptyDir there) or set TMPDIR"
        )
    return None


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    no_temp_dir = temp_dir_problem()  # before the imports below: torch needs a temporary directory to import
    if no_temp_dir:
        parser.error(no_temp_dir)

    from .engine import EngineConfig
    from .kserve_seam import PredictorModelServer, fastapi_app
    from .loading import ModelLoadError
    from .model import LLMModel
    from .protocols import generate, lora_admin, openai, tokenize
    from .protocols.middleware import ApiKeys
    from .request_context import install_log_filter

    if args.workers != 1:
        parser.error("--workers must be 1: the engine owns the model in one process; scale with replicas instead")
    lora_names = [name for name, _ in args.lora_modules]
    if args.model_name in lora_names:
        parser.error(f"--lora_modules: the adapter name '{args.model_name}' is the served model's name (--model_name); choose another")
    if len(set(lora_names)) != len(lora_names):
        parser.error(f"--lora_modules: adapter names must be unique, got {' '.join(lora_names)}")
    if args.configure_logging:  # before loading, so that start-up messages (which runner, the KV cache) are logged
        from kserve.logging import configure_logging

        configure_logging(args.log_config_file)
    install_log_filter()
    raw = argv if argv is not None else sys.argv[1:]
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
        generation_config=args.generation_config == "auto",
        lora_modules=args.lora_modules,
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        lora_runtime_updates=args.enable_lora_runtime_updates,
        engine_config=EngineConfig(
            max_num_seqs=args.max_num_seqs,
            max_queue=args.max_queue,
            request_timeout=args.request_timeout,
            max_prefill_tokens=args.max_prefill_tokens,
            kv_cache_memory=args.kv_cache_memory,
            enable_prefix_caching=args.enable_prefix_caching,
            compile=args.compile,
        ),
    )
    try:
        model.load()
    except ModelLoadError as exc:
        parser.error(str(exc))
    tracer = None
    if args.otlp_traces_endpoint:
        from .tracing import RequestTracer

        tracer = model.engine_handle.tracer = RequestTracer(args.otlp_traces_endpoint, args.model_name)
        logger.info("OpenTelemetry: a span per request to %s (--otlp_traces_endpoint)", args.otlp_traces_endpoint)
    keys = api_keys_from(args)
    api_keys = ApiKeys(keys) if keys else None
    logger.info("API keys: %s", f"{len(keys)} (--api_key / ${API_KEY_ENV})" if keys else "none: every route is open (--api_key)")
    app = fastapi_app()
    server = PredictorModelServer(model, args, api_keys, args.enable_repository_routes)
    server.install_routes(app)  # before KServe's own routes, which the REST server adds at start
    openai_routes = openai.OpenAIRoutes(model.generation, tool_call_parser=args.tool_call_parser)
    logger.info("tool call parser: %s (--tool_call_parser %s)", openai_routes.tool_call_parser, args.tool_call_parser)
    openai.register(app, openai_routes)
    generate.register(app, generate.GenerateRoutes(model.generation))
    tokenize.register(app, tokenize.TokenizeRoutes(model.generation))
    lora_admin.register(app, lora_admin.LoRARoutes(model.generation, args.enable_lora_runtime_updates, args.max_lora_rank))
    # KServe logs "OpenAI endpoints not registered" about its own vLLM-based routes; these are ours.
    logger.info("OpenAI routes on /v1 and /openai/v1; V2 generate on /v2/models/%s/generate[_stream]", args.model_name)
    server.start([model])
    if tracer is not None:
        tracer.shutdown()
    if server.exit_code:
        sys.exit(server.exit_code)
