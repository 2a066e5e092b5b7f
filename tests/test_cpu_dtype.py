"""The CPU dtype policy: ``--dtype auto`` is bfloat16 where the CPU multiplies bfloat16 natively (AMX-BF16 or
AVX512-BF16), float32 elsewhere, and the start-up log says which and why; bfloat16 projections are prepacked for
oneDNN (sibling projections as one product), as float32 ones are."""

from __future__ import annotations

import httpx
import pytest
import torch
from conftest import MODEL_NAME, start_server, stop_server

from predictor import cpu, loading
from predictor.cpu import CpuInfo, parse_cpuinfo

XEON = """processor	: 0
model name	: Intel(R) Xeon(R) Platinum 8480+
flags		: fpu vme avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
processor	: 1
model name	: Intel(R) Xeon(R) Platinum 8480+
"""
OLD_EPYC = "model name\t: AMD EPYC 7B12\nflags\t\t: fpu avx avx2 fma\n"


def test_cpuinfo_is_read_from_the_first_processor():
    info = parse_cpuinfo(XEON)
    assert info.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert info.matmul_flags == ["amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx512f", "avx2"]
    assert info.native_bf16 and info.native_int8
    old = parse_cpuinfo(OLD_EPYC)
    assert not old.native_bf16 and not old.native_int8
    assert old.describe() == "AMD EPYC 7B12 (avx2)"


@pytest.mark.parametrize(("cpuinfo", "expected"), [(XEON, torch.bfloat16), (OLD_EPYC, torch.float32)])
def test_auto_follows_the_cpu(monkeypatch, cpuinfo, expected):
    monkeypatch.setattr(loading, "cpu_info", lambda: parse_cpuinfo(cpuinfo))
    dtype, why = loading.resolve_dtype("auto", torch.device("cpu"))
    assert dtype == expected
    assert parse_cpuinfo(cpuinfo).model in why
    assert ("without native bfloat16" in why) == (expected == torch.float32)
    assert loading.resolve_dtype("float32", torch.device("cpu")) == (torch.float32, "--dtype float32")
    assert loading.resolve_dtype("auto", torch.device("cuda"), saved="float16")[0] == torch.float16


def test_no_cpuinfo_means_float32(monkeypatch):
    monkeypatch.setattr(loading, "cpu_info", lambda: CpuInfo("unknown", frozenset()))
    assert loading.resolve_dtype("auto", torch.device("cpu"))[0] == torch.float32


@pytest.mark.skipif(not cpu.cpu_info().native_bf16, reason="this CPU has no native bfloat16 products (no amx_bf16 / avx512_bf16)")
def test_bfloat16_projections_are_packed_and_shared():
    from transformers import LlamaConfig, LlamaForCausalLM

    from predictor.engine.packing import PackedLinear, SharedProjection, can_pack, pack_model

    assert can_pack(torch.device("cpu"), torch.bfloat16)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().to(torch.bfloat16)
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        before = model(ids).logits.float()
        packed, fused, shared = pack_model(model, 16, torch.bfloat16)
        after = model(ids).logits.float()
    # per layer q/k/v and gate/up as two shared products, o and down packed; the LM head
    assert (packed, fused, shared) == (2 * 2 + 1, 0, 2 * 2)
    assert isinstance(model.model.layers[0].self_attn.q_proj, SharedProjection)
    assert isinstance(model.lm_head, PackedLinear) and model.lm_head.weight.dtype == torch.bfloat16
    assert (after - before).abs().max() <= 0.05 * before.abs().max()


def test_dtype_auto_serves_in_the_cpus_dtype(tiny_model_dir, tmp_path):
    """The real server with ``--dtype auto``: the log names the dtype, the CPU and why; the KV cache is in that dtype
    (``vllm:cache_config_info``), the projections are packed, and it serves."""
    expected = "bfloat16" if cpu.cpu_info().native_bf16 else "float32"
    server = start_server(tiny_model_dir, tmp_path, "--dtype", "auto")
    try:
        log = server.read_log()
        assert f"dtype {expected}: --dtype auto on a CPU with" in log
        assert cpu.cpu_info().model in log
        assert "prefill budget: 256 prompt tokens a step (the cpu default)" in log
        assert "oneDNN-packed projections: 0," not in log
        info = next(line for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines() if line.startswith("vllm:cache_config_info{"))
        assert f'cache_dtype="{expected}"' in info
        r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL_NAME, "prompt": "Once upon", "max_tokens": 8, "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    finally:
        stop_server(server)
