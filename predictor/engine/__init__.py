"""The generation engine: scheduler loop, model runner, KV cache, sampler and detokenizer."""

from .engine import Engine, EngineConfig, EngineDead, EngineError, EngineStopped, GrammarFailed, QueueFull, RequestTimeout
from .request import Sequence

__all__ = ["Engine", "EngineConfig", "EngineDead", "EngineError", "EngineStopped", "GrammarFailed", "QueueFull", "RequestTimeout", "Sequence"]
