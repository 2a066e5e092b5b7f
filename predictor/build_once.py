"""Build a directory once, atomically: under a file lock, into a temporary sibling renamed into place.

Used for every cached artefact (the demo model, benchmark models, GGUF conversions): a killed build
leaves nothing half-written, and two processes starting together build once.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock


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
            tmp.chmod(0o755)  # mkdtemp's 0700 would hide the result from a server running as another user
            shutil.rmtree(path, ignore_errors=True)  # a stale, incomplete directory of an older layout
            tmp.rename(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path
