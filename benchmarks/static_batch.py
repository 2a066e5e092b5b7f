"""The static-batch figure: ``model.generate`` on one batch of C prompts, in-process, no server.

Run as its own process (``python -m benchmarks.static_batch``) so that nothing else shares its threads;
prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM


def measure(model_dir: str, prompts: list[list[int]], max_tokens: int) -> dict:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor(prompts)
    kwargs = dict(
        attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=model.config.eos_token_id
    )
    with torch.no_grad():
        model.generate(ids[:, :4], **{**kwargs, "attention_mask": torch.ones_like(ids[:, :4]), "max_new_tokens": 2, "min_new_tokens": 2})
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        seconds = time.perf_counter() - start
    tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    dtype = str(model.dtype).removeprefix("torch.")
    return {"batch": len(prompts), "output_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "dtype": dtype}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    parser.add_argument("--max_tokens", type=int, required=True)
    args = parser.parse_args()
    print(json.dumps(measure(args.model_dir, json.loads(args.prompts), args.max_tokens)))
