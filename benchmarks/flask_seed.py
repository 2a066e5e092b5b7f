"""The seed baseline: the classic "GPT-2 behind Flask" server, one ``model.generate`` per request.

It answers the same non-streaming OpenAI completions request as the predictor (token-id prompt,
``max_tokens``, ``ignore_eos``), so the load generator drives both. Flask's development server runs one
thread per request, as in the examples this stands for.
"""

from __future__ import annotations

import argparse

import torch
from flask import Flask, jsonify, request
from transformers import AutoModelForCausalLM


def create_app(model_dir: str) -> Flask:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    app = Flask(__name__)

    @app.post("/v1/completions")
    def completions():
        body = request.get_json()
        ids = torch.tensor([body["prompt"]])
        n = int(body.get("max_tokens", 16))
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n if body.get("ignore_eos") else 0,
                do_sample=False,
                pad_token_id=model.config.eos_token_id,
            )
        generated = out[0, ids.shape[1] :].tolist()
        return jsonify({"choices": [{"index": 0, "token_ids": generated}], "usage": {"completion_tokens": len(generated)}})

    @app.get("/health")
    def health():
        return "ok"

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args()
    create_app(args.model_dir).run(host="127.0.0.1", port=args.port, threaded=True)
