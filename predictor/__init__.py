"""kserve-llm's predictor: a KServe custom predictor for causal LMs."""

from .build_once import inductor_cache_dir

# Before anything imports torch._dynamo, which fixes inductor's cache directory at import (its default is under /tmp,
# lost with a pod's emptyDir): the compiled decode step's code is kept under $KSERVE_LLM_CACHE/inductor.
inductor_cache_dir()
