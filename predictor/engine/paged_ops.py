"""Native CPU operators over the paged KV cache, built from C++ once per machine.

``decode_attention`` is decode attention read straight from the block pools (``paged_decode.cpp``,
``torch.ops.kserve_llm.paged_decode_attention``): no gather of each sequence's keys and values into a
scratch buffer, no (B, 1, 1, L) mask, only each sequence's own positions read. ``prefill_attention`` is the same
for prefilling sequences, their new tokens attending causally to their earlier positions and to each other
(``paged_prefill.cpp``, a flash-attention kernel on AVX512-BF16, bfloat16 only: ``prefill_supported``).

The library is compiled by ``torch.utils.cpp_extension`` (g++ and ninja) the first time ``available()`` or
``load()`` is called on a machine, into ``cache_root()/ops/<name>-<digest>``, the digest covering the
sources, torch's and Python's versions, the compiler flags and the CPU's feature flags (``-march=native``: a
different CPU builds its own). The compilation runs in a child process, into a temporary directory renamed
into place under a file lock (``build_once``): two processes starting together build once, a killed build
leaves nothing behind. Without a compiler or ninja, or when the build fails, ``load()`` logs why and returns
None, and callers keep their plain-torch path. ``KSERVE_LLM_NATIVE_OPS=0`` turns the operators off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from ..build_once import build_once, cache_root
from ..cpu import cpu_info

logger = logging.getLogger(__name__)

NAME = "kserve_llm_paged_ops"
SOURCES = tuple(Path(__file__).with_name(name) for name in ("paged_decode.cpp", "paged_prefill.cpp"))
CFLAGS = ["-O3", "-march=native", "-fopenmp"]  # -fopenmp: at::parallel_for is OpenMP inlined from torch's headers
LDFLAGS = ["-fopenmp"]  # libgomp.so.1: the dynamic loader reuses the copy torch already loaded
DTYPES = (torch.float32, torch.bfloat16)
BUILD_TIMEOUT_S = 900

_lock = threading.Lock()
_loaded: Path | None = None
_tried = False

_BUILD_SCRIPT = """
import sys
from torch.utils.cpp_extension import load
name, build_dir, cflags, ldflags, *sources = sys.argv[1:]
load(name=name, sources=sources, extra_cflags=cflags.split(), extra_ldflags=ldflags.split(),
     build_directory=build_dir, is_python_module=False, verbose=True)
"""


def build_dir() -> Path:
    """Where this source, torch, Python and CPU's build lives."""
    digest = hashlib.sha256()
    for part in (*(source.read_bytes() for source in SOURCES), torch.__version__.encode(), str(torch.version.git_version).encode(), sys.version.encode()):
        digest.update(part + b"\0")
    for part in (platform.machine(), " ".join(CFLAGS), " ".join(LDFLAGS), " ".join(sorted(cpu_info().flags))):
        digest.update(part.encode() + b"\0")
    return cache_root() / "ops" / f"{NAME}-{digest.hexdigest()[:16]}"


def _library(path: Path) -> Path:
    return path / f"{NAME}.so"


def _toolchain() -> tuple[dict[str, str] | None, str]:
    """The build's environment (ninja on PATH) or None, and what is missing."""
    env = dict(os.environ)
    compiler = env.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return None, f"no C++ compiler ({compiler!r} is not on PATH)"
    if shutil.which("ninja") is None:
        try:
            import ninja  # the PyPI package: its binary, wherever the environment's bin is
        except ImportError:
            return None, "no ninja (pip install ninja)"
        env["PATH"] = ninja.BIN_DIR + os.pathsep + env.get("PATH", "")
    return env, ""


def _build(tmp: Path, env: dict[str, str]) -> None:
    sources = [tmp / source.name for source in SOURCES]
    for source, copy in zip(SOURCES, sources):
        shutil.copyfile(source, copy)  # the build directory keeps the exact sources it was built from
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _BUILD_SCRIPT, NAME, str(tmp), " ".join(CFLAGS), " ".join(LDFLAGS), *map(str, sources)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    if done.returncode != 0 or not _library(tmp).exists():
        raise RuntimeError(f"the build exited with {done.returncode}:\n{done.stdout[-4000:]}")
    logger.info("built %s in %.1f s", NAME, time.monotonic() - started)


def load() -> Path | None:
    """The built library, loaded into this process (built first if this machine has none); None if it cannot be."""
    global _loaded, _tried
    with _lock:  # a second thread asking meanwhile waits for the answer
        if not _tried:
            try:
                _loaded = _load()
            finally:
                _tried = True
        return _loaded


def _load() -> Path | None:
    if os.environ.get("KSERVE_LLM_NATIVE_OPS", "1") == "0":
        logger.info("native paged-attention operators off (KSERVE_LLM_NATIVE_OPS=0)")
        return None
    env, missing = _toolchain()
    if env is None:
        logger.warning("native paged-attention operators unavailable, decode attention gathers instead: %s", missing)
        return None
    try:
        path = build_once(build_dir(), lambda tmp: _build(tmp, env), lambda p: _library(p).exists())
        torch.ops.load_library(str(_library(path)))
        _register_fake()
    except Exception as e:  # a build or load failure only costs the faster path
        logger.warning("native paged-attention operators unavailable, decode attention gathers instead: %s", e)
        return None
    return path


def _register_fake() -> None:
    @torch.library.register_fake("kserve_llm::paged_decode_attention")
    def _(query, key_pool, value_pool, block_tables, context_lens, scale, window, softcap):
        return query.new_empty(query.shape)

    @torch.library.register_fake("kserve_llm::paged_prefill_attention")
    def _(query, key_pool, value_pool, query_starts, start_positions, block_tables, scale, window):
        return query.new_empty(query.shape)


def available() -> bool:
    """Whether the native operators can be used in this process (the first call may build them: minutes)."""
    if _tried:
        return _loaded is not None
    return load() is not None


def _require() -> None:
    if not available():
        raise RuntimeError("the native paged-attention operators are not available here (see the log for why)")


def decode_attention(
    query: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    window: int | None = 0,
    softcap: float | None = 0.0,
) -> torch.Tensor:
    """query (B, H, D); pools (num_blocks, block_size, KVH, D); block_tables (B, nb) int64; context_lens (B,) int64
    (last position + 1) → (B, H, D) in the query's dtype. ``scale``: None for head_dim ** -0.5; ``window``: attend
    only to the last ``window`` positions (0 or None: all); ``softcap``: Gemma 2's logit soft-capping (0 or None: none)."""
    _require()
    scale = float(scale) if scale is not None else query.shape[-1] ** -0.5
    window, softcap = int(window or 0), float(softcap or 0.0)
    return torch.ops.kserve_llm.paged_decode_attention(query, key_pool, value_pool, block_tables, context_lens, scale, window, softcap)


def prefill_supported(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether ``prefill_attention`` takes this dtype and head size here: bfloat16, head_dim 64 or 128, a build for a
    CPU with AVX512-BF16 (elsewhere prefill attention stays with SDPA)."""
    return dtype == torch.bfloat16 and head_dim in (64, 128) and available() and bool(torch.ops.kserve_llm.paged_prefill_isa())


def prefill_attention(
    query: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    query_starts: torch.Tensor,
    start_positions: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float | None = None,
    window: int | None = 0,
) -> torch.Tensor:
    """query (N, H, D), sequence i's rows ``query_starts[i]:query_starts[i + 1]`` at positions ``start_positions[i]``, …;
    pools (num_blocks, block_size, KVH, D) already holding those positions' keys and values; block_tables (P, nb)
    → (N, H, D): each query attends to its sequence's positions up to its own (the last ``window`` of them if set)."""
    _require()
    scale = float(scale) if scale is not None else query.shape[-1] ** -0.5
    return torch.ops.kserve_llm.paged_prefill_attention(query, key_pool, value_pool, query_starts, start_positions, block_tables, scale, int(window or 0))
