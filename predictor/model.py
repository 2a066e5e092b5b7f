"""The ``kserve.Model`` for a causal LM: loads it, warms it up, and answers KServe's V1 and V2 protocols.

The OpenAI and generate routes are added to KServe's FastAPI app by ``predictor.server``; all protocols
share this model's ``Generation`` (tokenizer, limits, engine).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import kserve
from grpc_interceptor import exceptions as grpc_errors
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferRequest, InferResponse

from .engine import Engine, EngineConfig, EngineStopped, QueueFull, RequestTimeout
from .engine.lora import LoRAManager
from .engine.runner import lora_unsupported
from .generation import Generation
from .loading import ModelLoadError, load_model
from .metrics import EngineMetrics
from .onnx_model import OnnxModel
from .protocols import v1, v2
from .sampling import GenerationRequest, InvalidRequest, SamplingParams

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
        self.generation: Generation | None = None
        self._engine: Engine | None = None  # not kserve's ``engine`` flag: ours is started by load()

    def load(self) -> bool:
        """Load weights, start the engine thread and run one warm-up generation; only then ready."""
        loaded = load_model(self.model_dir, **self.options)
        logger.info("loaded %s (%s, %s, max_model_len=%d)", self.model_dir, loaded.device, loaded.dtype, loaded.max_model_len)
        if loaded.sampling_defaults:
            logger.info("sampling defaults from generation_config.json (requests may override): %s", loaded.sampling_defaults)
        lora = None
        if self.lora_modules:  # checked against the base model before anything starts: a bad adapter is a start-up error
            if isinstance(loaded.model, OnnxModel):
                raise ModelLoadError(lora_unsupported("an ONNX model, served by the ONNX runner"))
            lora = LoRAManager.load(self.lora_modules, loaded.model, self.max_loras, self.max_lora_rank)
            logger.info("LoRA adapters: %s", ", ".join(f"{a.name} (rank {a.rank}, {len(a.weights)} projections, {a.path})" for a in lora.adapters.values()))
        engine = Engine(loaded, self.engine_config, EngineMetrics(self.name), lora)
        engine.start()
        logger.info("model runner: %s", engine.runner.path)
        logger.info("prefix caching: %s", "on" if engine.scheduler.prefix_caching else "off")
        self.generation = Generation(loaded, engine)
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

    def start(self) -> None:
        """KServe calls this after registering; readiness stays what ``load`` made it."""

    def stop(self) -> None:
        self.ready = False
        if self._engine is not None:
            self._engine.stop()

    def get_input_types(self) -> list[dict]:
        return v2.INPUT_TYPES

    def get_output_types(self) -> list[dict]:
        return v2.OUTPUT_TYPES

    async def predict(self, payload: Any, headers: dict[str, str] | None = None) -> dict | InferResponse:
        """V2 ``InferRequest`` (REST or gRPC) or a V1 ``{"instances": ...}`` body.

        Over REST, engine errors reach the app's handlers (429, 503, 504); over gRPC they become the
        matching status codes here, since KServe's gRPC interceptor maps only its own exceptions.
        """
        grpc = isinstance(payload, InferRequest) and payload.from_grpc
        try:
            if isinstance(payload, InferRequest):
                return await v2.infer(self.generation, self.name, payload)
            return await v1.predict(self.generation, payload)
        except InvalidRequest as exc:
            raise InvalidInput(exc.message) from None
        except QueueFull as exc:
            if grpc:
                raise grpc_errors.ResourceExhausted(str(exc)) from None
            raise
        except EngineStopped as exc:
            if grpc:
                raise grpc_errors.Unavailable(str(exc)) from None
            raise
        except RequestTimeout as exc:
            if grpc:
                raise grpc_errors.DeadlineExceeded(str(exc)) from None
            raise
