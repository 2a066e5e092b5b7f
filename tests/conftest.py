"""Shared fixtures: a tiny model built by the project's own training code, and the real server on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pipelines.demo_model import TINY, ensure_demo_model

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A 2-layer GPT-2 with its own BPE tokenizer, trained for a few seconds (cached by config hash)."""
    return ensure_demo_model(TINY, progress=False)


@dataclass
class Server:
    process: subprocess.Popen
    http_port: int
    grpc_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def read_log(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(model_dir: Path, tmp: Path, *extra: str, name: str = MODEL_NAME, timeout: float = 120) -> Server:
    """Run ``python -m predictor`` as a real process and wait until /v2/health/ready says ready."""
    http_port, grpc_port = free_port(), free_port()
    log = tmp / f"server-{http_port}.log"
    cmd = [
        sys.executable,
        "-m",
        "predictor",
        "--model_dir",
        str(model_dir),
        "--model_name",
        name,
        "--http_port",
        str(http_port),
        "--grpc_port",
        str(grpc_port),
        *extra,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    server = Server(process, http_port, grpc_port, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.read_log()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/v2/health/ready", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"server not ready in {timeout}s:\n{server.read_log()[-3000:]}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="session")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("server"))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir: Path):
    """The same model loaded directly with transformers, for reference outputs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)
