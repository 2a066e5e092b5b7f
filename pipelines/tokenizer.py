"""The project's own tokenizer: a byte-level BPE (GPT-2's scheme) trained on a text, and text to token ids.

The data step (``pipelines.dataset``) trains one on a corpus' train split; the demo model and the benchmarks
(``pipelines.train.train_from_scratch``, ``benchmarks/model.py``) do the same. It lives apart from the training
loop so that the data step does not import the trainer (and the trainer can import the data step).
"""

from __future__ import annotations

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"


def train_tokenizer(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2's scheme) trained on ``text``, with ``<|endoftext|>`` as BOS/EOS."""
    bpe = ByteLevelBPETokenizer()
    chunks = [text[i : i + 10_000] for i in range(0, len(text), 10_000)]
    bpe.train_from_iterator(chunks, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN], show_progress=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=1 << 30,
    )


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """Token ids of ``text`` as one long int64 tensor (no special tokens)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
