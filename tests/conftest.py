"""Shared fixtures: a tiny model built by the project's own training code, a small prepared dataset, and the real server on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.demo_model import TINY, ensure_demo_model
from predictor import launch
from predictor.launch import ServerProcess

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "tiny"


def kill_training_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """``pipelines.train.optimizer_step`` raises KeyboardInterrupt at its ``step``-th call: a run killed mid-training
    (``monkeypatch.undo()`` brings the real step back). The torchrun tests do the same in every rank's process."""
    from pipelines import train

    real_step, calls = train.optimizer_step, []

    def dies(*args):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt("killed")
        return real_step(*args)

    monkeypatch.setattr(train, "optimizer_step", dies)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A prepared dataset (``pipelines.dataset``) of 40 lines of the demo corpus, a 300-token BPE: (directory, info).
    Read-only for the tests that share it."""
    from pipelines.corpus import demo_corpus
    from pipelines.dataset import prepare

    out = tmp_path_factory.mktemp("small-dataset")
    return out, prepare(demo_corpus()[:40], out, vocab_size=300)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A 2-layer GPT-2 with its own BPE tokenizer, trained for a few seconds (cached by config hash)."""
    return ensure_demo_model(TINY, progress=False)


def start_server(
    model_dir: Path | None, tmp: Path, *extra: str, name: str = MODEL_NAME, timeout: float = 120, env: dict[str, str] | None = None
) -> ServerProcess:
    """The real predictor on loopback. In float32 unless ``extra`` names a ``--dtype``: ``--dtype auto`` is bfloat16 on
    CPUs with native bfloat16 products, and the exactness tests compare against ``model.generate`` in float32. Eager
unless ``extra`` names ``--compile``: compiling takes a minute per server, and tests/test_compiled_step.py checks it."""
    if "--dtype" not in extra:
        extra = ("--dtype", "float32", *extra)
    if "--compile" not in extra:
        extra = ("--no_compile", *extra)
    return launch.start_server(model_dir, tmp, *extra, name=name, timeout=timeout, cwd=REPO, env=env)


def stop_server(server: ServerProcess) -> None:
    server.stop()


@pytest.fixture(scope="session")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("server"))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir: Path):
    """The same model loaded directly with transformers, for reference outputs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)
