"""Start ``python -m predictor`` as a child process on free loopback ports and wait until it is ready.

Used by the tests and the benchmarks, which talk to the real server over HTTP and gRPC.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held open together while chosen, so none repeats)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


@dataclass
class ServerProcess:
    process: subprocess.Popen
    http_port: int
    grpc_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def read_log(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_server(
    model_dir: Path | None, log_dir: Path, *args: str, name: str = "model", timeout: float = 180, cwd: Path | None = None, env: dict[str, str] | None = None
) -> ServerProcess:
    """Run the predictor on ``model_dir`` (None: its default model) with extra ``args``; raises with the log's tail if it does not become ready."""
    http_port, grpc_port = free_ports(2)
    log = Path(log_dir) / f"server-{http_port}.log"
    cmd = [
        sys.executable,
        "-m",
        "predictor",
        *(["--model_dir", str(model_dir)] if model_dir is not None else []),
        "--model_name",
        name,
        "--http_port",
        str(http_port),
        "--grpc_port",
        str(grpc_port),
        *args,
    ]
    process = subprocess.Popen(cmd, cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})
    server = ServerProcess(process, http_port, grpc_port, log)
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
