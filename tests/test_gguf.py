"""GGUF in: a tiny Llama written as GGUF by the test (llama.cpp's tensor names, permuted q/k, a byte-level BPE
tokenizer and a chat template in the metadata), served from the file and converted offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from conftest import REPO, start_server, stop_server
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from predictor.engine.detokenizer import Detokenizer

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary layout for q/k rows (transformers undoes it when reading)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, tokenizer_dir: Path, architecture: str = "llama") -> torch.nn.Module:
    """Write a random-weight 2-layer Llama as GGUF; returns the model it holds."""
    import gguf

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_block_count(2)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = [""] * len(tokenizer)
    for token, index in spec["model"]["vocab"].items():
        tokens[index] = token
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_token_types([1] * len(tokens))
    writer.add_bos_token_id(tokenizer.eos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_chat_template(CHAT_TEMPLATE)
    sd = {k: v.numpy().astype(np.float32) for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(2):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], 4))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], 2))
        writer.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def import_gguf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines", "import-gguf", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_serve_a_gguf_file_directly(tiny_model_dir, tmp_path):
    """--model_dir FILE.gguf: converted once beside the file, served with the file's chat template, greedy = the model it holds."""
    gguf_path = tmp_path / "models" / "tiny-llama.gguf"
    gguf_path.parent.mkdir()
    model = write_gguf(gguf_path, tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer("The for statement", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(ids) :].tolist()
    server = start_server(gguf_path, tmp_path, name="m")
    try:
        assert (gguf_path.parent / "tiny-llama.gguf.hf" / "config.json").is_file()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        r = client.completions.create(model="m", prompt=ids, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
        detok = Detokenizer(tokenizer, ids, [])
        assert r.choices[0].text == "".join(detok.add(t) for t in expected) + detok.flush()
        chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0)
        assert chat.usage.prompt_tokens == len(tokenizer("<user>hi\n<assistant>", add_special_tokens=False)["input_ids"])  # the GGUF's template
    finally:
        stop_server(server)


def test_import_gguf_writes_a_plain_transformers_directory(tiny_model_dir, tmp_path):
    gguf_path = tmp_path / "tiny.gguf"
    model = write_gguf(gguf_path, tiny_model_dir)
    out = tmp_path / "converted"
    done = import_gguf(str(gguf_path), "--output", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE
    again = import_gguf(str(gguf_path), "--output", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr


@pytest.mark.parametrize("damage", ["missing", "truncated", "architecture"])
def test_bad_gguf_is_a_clear_error_and_leaves_nothing(tiny_model_dir, tmp_path, damage):
    gguf_path = tmp_path / "bad.gguf"
    if damage == "truncated":
        write_gguf(gguf_path, tiny_model_dir)
        gguf_path.write_bytes(gguf_path.read_bytes()[:1000])
    elif damage == "architecture":
        write_gguf(gguf_path, tiny_model_dir, architecture="rwkv9")
    out = tmp_path / "out"
    done = import_gguf(str(gguf_path), "--output", str(out))
    assert done.returncode == 2
    expected = {"missing": "GGUF file not found", "truncated": "not a readable GGUF file", "architecture": "architecture 'rwkv9' cannot be dequantized"}[damage]
    assert expected in done.stderr, done.stderr[-1000:]
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ([] if damage == "missing" else ["bad.gguf"])
