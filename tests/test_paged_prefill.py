"""The native prefill-attention operator (predictor/engine/paged_prefill.cpp, AVX512-BF16) against plain torch in
float64 and against attention.py's SDPA prefill path; skipped where this CPU has no AVX512-BF16 build of it."""

from __future__ import annotations

import pytest
import torch
from test_paged_ops import require_built

from predictor.engine import paged_ops

BS = 16


@pytest.fixture(scope="module", autouse=True)
def supported() -> None:
    require_built()
    if not paged_ops.prefill_supported(torch.bfloat16, 64):
        pytest.skip("this CPU's build has no AVX512-BF16 prefill kernel (prefill attention stays with SDPA)")


def make_case(H: int, KVH: int, D: int, seqs: list[tuple[int, int]], seed: int = 0):
    """``seqs``: (cached positions, new tokens) per sequence. Pools with every sequence's blocks scattered, tables padded
    with block 0 (huge values, so a read of it would show), a query laid out as attention.py has it (strided)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-(start + T) // BS) for start, T in seqs]
    num_blocks = sum(need) + 3
    k = torch.randn(num_blocks, BS, KVH, D, generator=g).to(torch.bfloat16)
    v = torch.randn(num_blocks, BS, KVH, D, generator=g).to(torch.bfloat16)
    k[0], v[0] = 1e4, -1e4
    ids = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    tables = torch.zeros(len(seqs), max(need), dtype=torch.long)
    for i, n in enumerate(need):
        tables[i, :n] = torch.tensor(ids[:n])
        ids = ids[n:]
    N = sum(T for _, T in seqs)
    q = torch.randn(1, N, H, D, generator=g).to(torch.bfloat16).transpose(1, 2)[0].transpose(0, 1)  # (N, H, D), strided
    starts = [0]
    for _, T in seqs:
        starts.append(starts[-1] + T)
    return q, k, v, torch.tensor(starts), torch.tensor([s for s, _ in seqs]), tables


def reference(q, k, v, qstarts, starts, tables, scale, window) -> torch.Tensor:
    """Gather + causal (windowed) softmax in float64."""
    H, KVH, D = q.shape[1], k.shape[2], k.shape[3]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i, start in enumerate(starts.tolist()):
        a, b = qstarts[i].item(), qstarts[i + 1].item()
        keys = k[tables[i]].reshape(-1, KVH, D).double()
        values = v[tables[i]].reshape(-1, KVH, D).double()
        kpos = torch.arange(keys.shape[0])
        for t in range(b - a):
            pos = start + t
            allowed = (kpos <= pos) & ((kpos > pos - window) if window else True)
            for h in range(H):
                kh = h // (H // KVH)
                s = (keys[:, kh] @ q[a + t, h].double() * scale).masked_fill(~allowed, float("-inf"))
                out[a + t, h] = torch.softmax(s, 0) @ values[:, kh]
    return out


@pytest.mark.parametrize("H,KVH,D", [(9, 3, 64), (8, 2, 128), (4, 4, 64)], ids=["gqa-64", "gqa-128", "mha-64"])
@pytest.mark.parametrize("window", [0, 5, 40])
def test_matches_float64_reference(H, KVH, D, window):
    # fresh prompts, chunks after cached positions (block-aligned or not), one token, a tile edge (64), several tiles
    seqs = [(0, 1), (0, 37), (16, 20), (23, 50), (0, 64), (100, 3), (61, 70)]
    q, k, v, qstarts, starts, tables = make_case(H, KVH, D, seqs)
    got = paged_ops.prefill_attention(q, k, v, qstarts, starts, tables, D**-0.5, window)
    assert got.shape == q.shape and got.dtype == torch.bfloat16 and got.is_contiguous()
    want = reference(q, k, v, qstarts, starts, tables, D**-0.5, window)
    err = (got.double() - want).abs().max().item() / max(want.abs().max().item(), 1.0)
    assert err < 2e-2, err


def test_matches_sdpa_on_a_long_chunked_prompt():
    """A 600-token prompt in chunks of 256 after its first 256 cached, as chunked prefill runs it: SDPA over the gathered
    keys with a causal mask (attention.py's path without the operator) gives the same, in bfloat16."""
    H, KVH, D = 9, 3, 64
    q, k, v, qstarts, starts, tables = make_case(H, KVH, D, [(256, 344)], seed=3)
    got = paged_ops.prefill_attention(q, k, v, qstarts, starts, tables, None, 0)
    keys = k[tables[0]].reshape(-1, KVH, D)[:600].transpose(0, 1)[None]  # (1, KVH, 600, D)
    values = v[tables[0]].reshape(-1, KVH, D)[:600].transpose(0, 1)[None]
    mask = torch.arange(600)[None, :] <= torch.arange(256, 600)[:, None]
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values, attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)
    assert (got.float() - sdpa.float()).abs().max().item() < 4e-2


def test_threads_do_not_change_the_result():
    q, k, v, qstarts, starts, tables = make_case(9, 3, 64, [(0, 200), (30, 90)])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = paged_ops.prefill_attention(q, k, v, qstarts, starts, tables)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, paged_ops.prefill_attention(q, k, v, qstarts, starts, tables))


def test_bad_input_names_the_problem():
    q, k, v, qstarts, starts, tables = make_case(4, 2, 64, [(0, 5), (3, 4)])
    with pytest.raises(RuntimeError, match="beyond its block table"):
        paged_ops.prefill_attention(q, k, v, qstarts, torch.tensor([0, 40]), tables)
    with pytest.raises(RuntimeError, match="out of range"):
        paged_ops.prefill_attention(q, k, v, qstarts, starts, torch.full_like(tables, k.shape[0]))
    with pytest.raises(RuntimeError, match="multiple of"):
        paged_ops.prefill_attention(q[:, :3], k, v, qstarts, starts, tables)
    with pytest.raises(RuntimeError, match="bfloat16 only"):
        paged_ops.prefill_attention(q.float(), k.float(), v.float(), qstarts, starts, tables)
    with pytest.raises(RuntimeError, match="head_dim 64 or 128"):
        paged_ops.prefill_attention(q[..., :32], k[..., :32].contiguous(), v[..., :32].contiguous(), qstarts, starts, tables)
    with pytest.raises(RuntimeError, match="must rise"):
        paged_ops.prefill_attention(q, k, v, torch.tensor([0, 9, 5]), starts, tables)


def test_fake_impl():
    q, k, v, qstarts, starts, tables = make_case(9, 3, 64, [(0, 20), (16, 9)])
    op = torch.ops.kserve_llm.paged_prefill_attention.default
    torch.library.opcheck(op, (q.contiguous(), k, v, qstarts, starts, tables, 0.125, 0), test_utils=("test_schema", "test_faketensor"))


# Shapes whose head size the operator takes (the families' tests use head_dim 16, which stays with SDPA).
WIDE = {
    "llama": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64),  # grouped-query
    "qwen3": dict(hidden_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128),  # q/k norms, head_dim 128
    "gemma3_text": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64),  # sliding-window layers
}


@pytest.mark.parametrize("kind", list(WIDE))
def test_the_runner_prefills_as_the_sdpa_path_does(kind, tmp_path, tiny_model_dir):
    """A bfloat16 model's prefill logits through the paged runner, with the operator and with attention.py's SDPA path:
    fresh prompts of several lengths in one step, then chunks after cached positions (chunked prefill, prefix caching)
    beside a new prompt, the row padded. The logits agree to bfloat16's precision and on nearly every argmax."""
    from test_model_families import WINDOW, build_model
    from transformers import AutoModelForCausalLM

    from predictor.engine.runner import Chunk, KVPlan, PagedRunner

    model_dir = build_model(kind, tmp_path / kind, tiny_model_dir, **WIDE[kind])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    runner = PagedRunner(model, KVPlan(None, 4096), 8, torch.device("cpu"), compile=False)
    assert runner.native_prefill, runner.path
    assert "prefill attention: native (AVX512-BF16), from the block pools" in runner.path
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    first = [Chunk(1, tokens(5), 0, [1], all_logits=True), Chunk(2, tokens(70), 0, [2, 3, 4, 5, 6], all_logits=True), Chunk(3, tokens(33), 0, [7, 8, 9])]
    later = [Chunk(2, tokens(9), 70, [2, 3, 4, 5, 6], all_logits=True), Chunk(3, tokens(14), 33, [7, 8, 9], all_logits=True), Chunk(4, tokens(40), 0, [10, 11, 12])]
    assert WINDOW < 33  # gemma3's sliding layers cut the longer sequences' contexts
    results = {}
    for native in (True, False):
        runner.native_prefill = native
        results[native] = runner.prefill(first) + runner.prefill(later)  # `later` reads what `first` cached
    agree = total = 0
    for a, b in zip(results[True], results[False]):
        assert a.shape == b.shape
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() < 0.05 * scale, ((a - b).abs().max().item(), scale)
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        total += a.shape[0]
    assert agree >= 0.95 * total, (agree, total)


@pytest.mark.slow  # a second build of the operators, ~1 min: `make test-slow` (CI) runs it
def test_a_build_without_avx512_has_decode_and_refuses_prefill(tmp_path):
    """Built for an AVX2-only CPU (-march=x86-64-v3), as on a node without AVX512-BF16: both sources compile, decode
    attention works, and the prefill operator says it has no kernel (so the runner keeps SDPA there)."""
    import subprocess
    import sys

    script = f"""
import torch
from torch.utils.cpp_extension import load
load(name="kserve_llm_avx2", sources={[str(s) for s in paged_ops.SOURCES]!r}, extra_cflags=["-O2", "-march=x86-64-v3", "-fopenmp"],
     extra_ldflags=["-fopenmp"], build_directory={str(tmp_path)!r}, is_python_module=False)
torch.ops.load_library({str(tmp_path / "kserve_llm_avx2.so")!r})
assert torch.ops.kserve_llm.paged_prefill_isa() == ""
q, k = torch.randn(2, 4, 64, dtype=torch.bfloat16), torch.randn(4, 16, 2, 64, dtype=torch.bfloat16)
out = torch.ops.kserve_llm.paged_decode_attention(q, k, k, torch.tensor([[1, 2], [3, 0]]), torch.tensor([20, 5]), 0.125, 0, 0.0)
assert out.shape == q.shape and torch.isfinite(out.float()).all()
try:
    torch.ops.kserve_llm.paged_prefill_attention(q, k, k, torch.tensor([0, 2]), torch.tensor([0]), torch.tensor([[1]]), 0.125, 0)
except RuntimeError as e:
    assert "no AVX512-BF16 kernel" in str(e)
else:
    raise AssertionError("the prefill operator ran without its kernel")
print("ok")
"""
    env, _ = paged_ops._toolchain()
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-3000:]
