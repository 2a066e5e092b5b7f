"""The demo model: a small GPT-2 trained by this project on the Python documentation, built once and cached.

``python -m pipelines demo-model`` (``make demo-model``) builds it; serve it with ``python -m predictor --model_dir DIR``.
It is not what the predictor falls back to: with ``--model_dir`` left at its default (``/mnt/models``) and no such
directory, the predictor serves the default model, SmolLM2-135M-Instruct (``predictor.default_model``, fetched and
converted once; ``make serve`` prepares it).
The demo model is the pipeline's from-scratch path (the shape ``python -m pipelines run --local`` trains) and one
of the optimization benchmark's models. Tests build the much smaller ``TINY`` variant the same way, in seconds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from predictor.build_once import build_once, cache_root

from .corpus import demo_corpus, split_documents
from .train import FINETUNE_FIELDS, TrainConfig, train_from_scratch

# ~2.5 minutes on 2 CPU cores; see the README for its held-out perplexity.
# seq_len equals n_positions: every position embedding the server uses is trained.
DEMO = TrainConfig(vocab_size=2048, n_layer=4, n_embd=192, n_head=6, n_positions=256, seq_len=256, batch_size=8, steps=420)
# GPT-2 small's shape (12 blocks, width 768, 12 heads) with an 8,192-token vocabulary and a 256-token
# context: 91 M parameters. About 45 minutes on 2 CPU cores, checkpointed every 20 steps (a killed build
# resumes). It is the second model the optimization benchmark measures: large enough that weights, not
# per-call overhead, dominate decode time.
GPT2_SMALL = TrainConfig(
    vocab_size=8192, n_layer=12, n_embd=768, n_head=12, n_positions=256, seq_len=128, batch_size=16, steps=320, lr=5e-4, warmup_steps=30,
    eval_every=20, checkpoint_every=20,
)  # fmt: skip
# A few seconds: for tests only. Its text is not meant to read well.
TINY = TrainConfig(vocab_size=512, n_layer=2, n_embd=96, n_head=4, n_positions=128, seq_len=128, batch_size=4, steps=300, lr=5e-3, warmup_steps=10)


def model_path(config: TrainConfig = DEMO, root: Path | None = None) -> Path:
    """Where the model for ``config`` is cached: the directory name carries a hash of the config (the fields a model
    trained from scratch depends on, so that adding fine-tuning and parallelism settings kept the existing caches valid:
    one process or several train the same model)."""
    shape = {k: v for k, v in asdict(config).items() if k not in (*FINETUNE_FIELDS, "parallelism")}
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:10]
    name = "demo-model" if config == DEMO else "model"
    return (root or cache_root()) / f"{name}-{digest}"


def is_built(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def ensure_demo_model(config: TrainConfig = DEMO, root: Path | None = None, progress: bool = True) -> Path:
    """Return the cached model directory for ``config``, building it first if missing.

    The build writes into a temporary directory that is renamed into place at the end, under a file lock,
    so a killed build leaves nothing half-written and two processes never build at once.
    """
    path = model_path(config, root)

    def build(tmp: Path) -> None:
        train_text, held_out_text = split_documents(demo_corpus())
        checkpoint = path.parent / f"{path.name}.checkpoint.pt" if config.checkpoint_every else None
        train_from_scratch(train_text, held_out_text, config, tmp, progress=progress, checkpoint=checkpoint)
        if checkpoint is not None:
            checkpoint.unlink(missing_ok=True)

    return build_once(path, build, is_built)
