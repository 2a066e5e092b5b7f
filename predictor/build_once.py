"""Build a directory once, atomically: under a file lock, into a temporary sibling renamed into place.

Used for every cached artefact (the demo model, benchmark models, GGUF conversions): a killed build
leaves nothing half-written, and two processes starting together build once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock


def cache_root() -> Path:
    """Where built models are cached: ``$KSERVE_LLM_CACHE`` or ``~/.cache/kserve-llm``."""
    return Path(os.environ.get("KSERVE_LLM_CACHE", Path.home() / ".cache" / "kserve-llm"))


def inductor_cache_dir() -> str:
    """Where inductor keeps compiled code: ``$TORCHINDUCTOR_CACHE_DIR`` if set, else ``inductor/`` under ``cache_root()``."""
    return os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))


def build_once(path: Path, build: Callable[[Path], None], done: Callable[[Path], bool]) -> Path:
    """``path`` if ``done(path)``; else ``build(tmp)`` into a temporary directory that then becomes ``path``."""
    if done(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if done(path):
            return path
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
        try:
            build(tmp)
            # mkdtemp's 0700 (and some writers' 0600 files) would hide the result from a server running as another user
            for item in (tmp, *tmp.rglob("*")):
                item.chmod(0o755 if item.is_dir() else 0o644)
            shutil.rmtree(path, ignore_errors=True)  # a stale, incomplete directory of an older layout
            tmp.rename(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path
