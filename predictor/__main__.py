"""Container entrypoint: ``python -m predictor [args]`` (``--help`` lists them)."""

import os

from .memory import bound_native_memory

# oneDNN caches compiled kernels per input shape (default: 1024 of them). The engine's shapes are few
# (decode batch sizes, bucketed prefill lengths); a small cache bounds memory. Set before torch loads.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
bound_native_memory()

from .server import main  # noqa: E402

if __name__ == "__main__":
    main()
