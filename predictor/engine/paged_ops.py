"""Native CPU operators over the paged KV cache, built from C++ once per machine.

``decode_attention`` is decode attention read straight from the block pools (``paged_decode.cpp``,
``torch.ops.kserve_llm.paged_decode_attention``): no gather of each sequence's keys and values into a
scratch buffer, no (B, 1, 1, L) mask, only each sequence's own positions read.

The library is compiled by ``torch.utils.cpp_extension`` (g++ and ninja) the first time ``available()`` or
``load()`` is called on a machine, into ``cache_root()/ops/<name>-<digest>``, the digest covering the
source, torch's and Python's versions, the compiler flags and the CPU's feature flags (``-march=native``: a
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
SOURCE = Path(__file__).with_name("paged_decode.cpp")
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
name, source, build_dir = sys.argv[1:4]
load(name=name, sources=[source], extra_cflags=sys.argv[4].split(), extra_ldflags=sys.argv[5].split(),
     build_directory=build_dir, is_python_module=False, verbose=True)
"""


def build_dir() -> Path:
    """Where this source, torch, Python and CPU's build lives."""
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), str(torch.version.git_version).encode(), sys.version.encode()):
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
    source = tmp / SOURCE.name
    shutil.copyfile(SOURCE, source)  # the build directory keeps the exact source it was built from
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _BUILD_SCRIPT, NAME, str(source), str(tmp), " ".join(CFLAGS), " ".join(LDFLAGS)],
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


def available() -> bool:
    """Whether the native operators can be used in this process (the first call may build them: minutes)."""
    if _tried:
        return _loaded is not None
    return load() is not None


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
    if not available():
        raise RuntimeError("the native paged-attention operators are not available here (see the log for why)")
    scale = float(scale) if scale is not None else query.shape[-1] ** -0.5
    window, softcap = int(window or 0), float(softcap or 0.0)
    return torch.ops.kserve_llm.paged_decode_attention(query, key_pool, value_pool, block_tables, context_lens, scale, window, softcap)
