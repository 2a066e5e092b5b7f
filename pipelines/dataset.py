"""The pipeline's data step: a corpus becomes a tokenizer plus tokenized train and held-out splits in one directory.

    prepare(documents, out_dir, vocab_size=2048)            # train a byte-level BPE tokenizer on the train split
    prepare(documents, out_dir, base_model="/models/gpt2")  # or use the base model's tokenizer (fine-tuning)

The directory holds ``tokenizer/``, ``train.txt`` and ``held_out.txt`` (the evaluation and distillation read
text), ``ids.safetensors`` (``train`` and ``held_out`` int64 token ids) and ``dataset.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .corpus import split_documents
from .tokenizer import EOS_TOKEN, tokenize, train_tokenizer

MIN_HELD_OUT_TOKENS = 16


def prepare(documents: list[str], output_dir: Path, vocab_size: int = 2048, base_model: str | None = None, held_out_fraction: float = 0.05) -> dict:
    """Write the dataset directory; returns ``dataset.json``'s content."""
    if not 0.0 < held_out_fraction < 0.5:
        raise ValueError(f"held_out_fraction must be in (0, 0.5); got {held_out_fraction}")
    train_text, held_out_text = split_documents(documents, held_out_fraction)
    if not held_out_text.strip() or not train_text.strip():
        raise ValueError("the corpus is too small to split into train and held-out text")
    if base_model:
        tokenizer = AutoTokenizer.from_pretrained(base_model)
        source = base_model
    else:
        tokenizer = train_tokenizer(train_text, vocab_size)
        source = f"byte-level BPE trained on the train split ({vocab_size} tokens)"
    eos = torch.tensor([tokenizer.eos_token_id]) if tokenizer.eos_token_id is not None else torch.tensor([], dtype=torch.long)
    ids = {"train": torch.cat([tokenize(tokenizer, train_text), eos]), "held_out": tokenize(tokenizer, held_out_text)}
    if len(ids["held_out"]) < MIN_HELD_OUT_TOKENS:
        raise ValueError(
            f"the corpus is too small: {len(ids['held_out'])} held-out tokens (need ≥ {MIN_HELD_OUT_TOKENS}); give more text or a larger held_out_fraction"
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(output_dir / "tokenizer")
    (output_dir / "train.txt").write_text(train_text)
    (output_dir / "held_out.txt").write_text(held_out_text)
    save_file(ids, str(output_dir / "ids.safetensors"))
    info = {
        "documents": len(documents),
        "characters": len(train_text) + len(held_out_text),
        "train_tokens": len(ids["train"]),
        "held_out_tokens": len(ids["held_out"]),
        "tokenizer": source,
        "vocab_size": len(tokenizer),
    }
    (output_dir / "dataset.json").write_text(json.dumps(info, indent=2))
    return info


def load(dataset_dir: Path) -> tuple[PreTrainedTokenizerBase, torch.Tensor, torch.Tensor]:
    """(tokenizer, train ids, held-out ids) of a prepared dataset directory."""
    dataset_dir = Path(dataset_dir)
    if not (dataset_dir / "ids.safetensors").is_file():
        raise FileNotFoundError(f"not a prepared dataset (no ids.safetensors): {dataset_dir}")
    ids = load_file(str(dataset_dir / "ids.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(dataset_dir / "tokenizer")
    if tokenizer.eos_token is None:
        tokenizer.eos_token = EOS_TOKEN
    return tokenizer, ids["train"], ids["held_out"]
