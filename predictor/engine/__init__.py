"""The generation engine: scheduler loop, model runner, sampler and detokenizer."""

from .engine import Engine, EngineStopped

__all__ = ["Engine", "EngineStopped"]
