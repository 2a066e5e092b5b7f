"""The benchmark model: GPT-2-small-shaped (12 layers, width 768, 12 heads, 50,257 tokens, ~124 M parameters),
randomly initialised with a fixed seed, so it needs no download. Its weights are random: the benchmark
measures speed, not text.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from filelock import FileLock
from tokenizers import AddedToken
from transformers import GPT2Config, GPT2LMHeadModel

from pipelines.corpus import demo_corpus, split_documents
from pipelines.demo_model import cache_root
from pipelines.train import train_tokenizer

VOCAB = 50257
SEED = 0


def build(path: Path) -> None:
    """Write the model and a byte-level BPE tokenizer covering all 50,257 ids into ``path``."""
    train_text, _ = split_documents(demo_corpus())
    tokenizer = train_tokenizer(train_text, VOCAB)
    # The corpus has fewer distinct merges than GPT-2's vocabulary: fill the rest of the id space with
    # placeholder tokens so every id the random model emits decodes.
    missing = VOCAB - len(tokenizer)
    if missing > 0:
        tokenizer.add_tokens([AddedToken(f"<|fill{i}|>", special=False) for i in range(missing)])
    torch.manual_seed(SEED)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=1024, n_embd=768, n_layer=12, n_head=12, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def ensure(root: Path | None = None) -> Path:
    """The cached benchmark model directory, built on first use (about a minute)."""
    path = (root or cache_root()) / "bench-gpt2-small"
    if (path / "model.safetensors").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if (path / "model.safetensors").is_file():
            return path
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
        try:
            build(tmp)
            tmp.rename(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path
