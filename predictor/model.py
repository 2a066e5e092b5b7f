"""The ``kserve.Model`` for a causal LM: loads it, warms it up, and answers KServe's V1 and V2 protocols.

The OpenAI and generate routes are added to KServe's FastAPI app by ``predictor.server``; all protocols
share this model's ``Generation`` (tokenizer, limits, engine).

The model is loaded once. KServe's data plane calls ``load()`` again for a model that is not ready (during the
SIGTERM drain, or after the engine died); that never loads anything: only ``reload()`` does, behind
``--enable_repository_routes``.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import kserve
from kserve.protocol.infer_type import InferRequest, InferResponse

from .engine import Engine, EngineConfig
from .engine.lora import LoRAManager
from .engine.runner import lora_unsupported
from .errors import PredictorError
from .generation import Generation
from .loading import ModelLoadError, load_model
from .metrics import EngineMetrics
from .onnx_model import OnnxModel
from .protocols import v1, v2
from .sampling import GenerationRequest, SamplingParams

logger = logging.getLogger("kserve")  # KServe configures this logger's handlers


class LLMModel(kserve.Model):
    """A Hugging Face causal LM behind the predictor's engine."""

    def __init__(
        self,
        name: str,
        model_dir: str | Path,
        dtype: str = "auto",
        device: str = "auto",
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
        allow_pickle_weights: bool = False,
        generation_config: bool = True,
        engine_config: EngineConfig | None = None,
        lora_modules: list[tuple[str, Path]] | None = None,
        max_loras: int = 4,
        max_lora_rank: int = 16,
        lora_runtime_updates: bool = False,
    ):
        super().__init__(name)
        self.model_dir = Path(model_dir)
        self.engine_config = engine_config or EngineConfig()
        self.options = dict(
            dtype=dtype,
            device=device,
            max_model_len=max_model_len,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle_weights,
            generation_config=generation_config,
        )
        self.lora_modules, self.max_loras, self.max_lora_rank = lora_modules or [], max_loras, max_lora_rank
        self.lora_runtime_updates = lora_runtime_updates
        self.generation: Generation | None = None
        self._engine: Engine | None = None  # not kserve's ``engine`` flag: ours is started by load()
        self.closing = False  # set by the drain: nothing loads again
        self.on_engine_dead = None  # called (from the engine thread) with the reason when the engine dies

    def load(self) -> bool:
        """Load weights, start the engine thread and run one warm-up generation; only then ready.

        Once loaded (or while shutting down) this does nothing and answers whether the model is ready: KServe's data
        plane calls it for every request to a model that is not ready, and a request must never load the weights again.
        """
        if self._engine is not None or self.closing:
            return self.ready
        loaded = load_model(self.model_dir, **self.options)
        logger.info("loaded %s (%s, %s, max_model_len=%d)", self.model_dir, loaded.device, loaded.dtype, loaded.max_model_len)
        logger.info("dtype %s: %s", str(loaded.dtype).removeprefix("torch."), loaded.dtype_reason)
        if loaded.sampling_defaults:
            logger.info("sampling defaults from generation_config.json (requests may override): %s", loaded.sampling_defaults)
        lora = None
        if self.lora_modules or self.lora_runtime_updates:  # checked against the base model before anything starts
            if isinstance(loaded.model, OnnxModel):
                raise ModelLoadError(lora_unsupported("an ONNX model, served by the ONNX runner"))
            lora = LoRAManager.load(self.lora_modules, loaded.model, self.max_loras, self.max_lora_rank, self.lora_runtime_updates)
            adapters = ", ".join(f"{a.name} (rank {a.rank}, {len(a.weights)} projections, {a.path})" for a in lora.adapters.values())
            runtime = "; runtime updates on (--enable_lora_runtime_updates)" if self.lora_runtime_updates else ""
            logger.info("LoRA adapters: %s%s", adapters or "none yet", runtime)
        engine = Engine(loaded, self.engine_config, EngineMetrics(self.name), lora)
        engine.on_dead = self._engine_died
        engine.start()
        logger.info("model runner: %s", engine.runner.path)
        logger.info("prefix caching: %s", "on" if engine.scheduler.prefix_caching else "off")
        given = self.engine_config.max_prefill_tokens is not None
        source = "--max_prefill_tokens" if given else f"the {loaded.device.type} default"
        logger.info("prefill budget: %d prompt tokens a step (%s)", engine.scheduler.max_prefill_tokens, source)
        if self.generation is None:
            self.generation = Generation(loaded, engine, self.name)
        else:  # loaded again after an unload: the routes hold this Generation
            self.generation.attach(loaded, engine)
        problem = self.generation.grammars.prepare()
        if problem:
            logger.warning("structured outputs and constrained tool calls are refused (400): %s", problem)
        self._warm_up(engine, loaded.eos_token_id or 0)
        self._engine = engine
        self.ready = True
        return self.ready

    @staticmethod
    def _warm_up(engine: Engine, token_id: int) -> None:
        async def run() -> None:
            request = GenerationRequest("warm-up", [token_id], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
            async for _ in engine.generate(request):
                pass

        loop = asyncio.new_event_loop()  # not asyncio.run: that would unset the main thread's loop KServe uses
        try:
            loop.run_until_complete(run())
        finally:
            loop.close()

    @property
    def engine_handle(self) -> Engine:
        """The running engine (KServe's own ``engine`` attribute is a flag it reserves)."""
        return self._engine

    @property
    def dead(self) -> str | None:
        """Why the engine died, or None: a dead engine fails liveness so that Kubernetes restarts the pod."""
        return self._engine.dead if self._engine is not None else None

    def _engine_died(self, reason: str) -> None:
        self.ready = False
        if self.on_engine_dead is not None:
            self.on_engine_dead(reason)

    def start(self) -> None:
        """KServe calls this after registering; readiness stays what ``load`` made it."""

    def stop(self) -> None:
        self.ready = False
        if self._engine is not None:
            self._engine.stop()

    def unload(self) -> None:
        """Stop the engine (``--enable_repository_routes``' unload): requests get 503 until ``reload()``."""
        self.stop()
        self._engine = None

    def reload(self) -> bool:
        """Load again after ``unload()`` (the repository's load route); a loaded model stays as it is."""
        return self.load()

    def get_input_types(self) -> list[dict]:
        return v2.INPUT_TYPES

    def get_output_types(self) -> list[dict]:
        return v2.OUTPUT_TYPES

    async def predict(self, payload: Any, headers: dict[str, str] | None = None) -> dict | InferResponse:
        """V2 ``InferRequest`` (REST or gRPC) or a V1 ``{"instances": ...}`` body.

        Errors are ``predictor.errors`` classes: the HTTP handlers and the gRPC interceptor give each its status.
        """
        if self._engine is None:
            raise PredictorError(f"model {self.name} is not loaded", status=503, code="not_ready")
        if isinstance(payload, InferRequest):
            return await v2.infer(self.generation, self.name, payload)
        return await v1.predict(self.generation, payload)
