"""The native decode-attention operator (predictor/engine/paged_decode.cpp) against plain torch in float64, and against
today's gather + SDPA decode path; its fake implementation under torch.compile."""

from __future__ import annotations

import time

import pytest
import torch

from predictor.engine import paged_ops
from predictor.engine.attention import StepBatch, _attend
from predictor.engine.kv_cache import LayerSpec, PagedKVCache

BS = 16


def require_built() -> None:
    """Built once per machine (about half a minute); skipped only where there is no toolchain: with one, a failed build fails."""
    env, missing = paged_ops._toolchain()
    if env is None:
        pytest.skip(f"native operators cannot be built here: {missing}")
    assert paged_ops.available(), "the build failed: see the log"


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    require_built()


def make_case(H: int, KVH: int, D: int, dtype: torch.dtype, lens: list[int], seed: int = 0):
    """Pools with every sequence's blocks scattered, block tables padded with block 0, block 0 full of huge values
    (a read of it would show), and a query laid out as attention.py has it: query[0].transpose(0, 1) of (1, H, B, D)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // BS) for n in lens]
    num_blocks = sum(need) + 3
    k = torch.randn(num_blocks, BS, KVH, D, generator=g).to(dtype)
    v = torch.randn(num_blocks, BS, KVH, D, generator=g).to(dtype)
    k[0], v[0] = 1e4, -1e4
    ids = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    tables = torch.zeros(len(lens), max(need), dtype=torch.long)
    for b, n in enumerate(need):
        tables[b, :n] = torch.tensor(ids[:n])
        ids = ids[n:]
    q = torch.randn(1, len(lens), H, D, generator=g).to(dtype).transpose(1, 2)[0].transpose(0, 1)  # (B, H, D), strided
    return q, k, v, tables, torch.tensor(lens)


def reference(q, k, v, tables, lens, scale, window, softcap) -> torch.Tensor:
    """Gather + masked softmax in float64."""
    H, KVH = q.shape[1], k.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, n in enumerate(lens.tolist()):
        keys = k[tables[b]].reshape(-1, KVH, k.shape[3]).double()  # (nb * BS, KVH, D)
        values = v[tables[b]].reshape(-1, KVH, v.shape[3]).double()
        pos = torch.arange(keys.shape[0])
        allowed = (pos < n) & ((pos > n - 1 - window) if window else True)
        for h in range(H):
            kh = h // (H // KVH)
            s = keys[:, kh] @ q[b, h].double() * scale
            if softcap:
                s = torch.tanh(s / softcap) * softcap
            s = s.masked_fill(~allowed, float("-inf"))
            out[b, h] = torch.softmax(s, 0) @ values[:, kh]
    return out


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "H,KVH,D",
    [(9, 3, 64), (4, 4, 16), (8, 2, 128), (2, 1, 80)],
    ids=["gqa-64", "mha-16", "gqa-128", "gqa-80"],  # 64 and 128: the vector kernels; 16 and 80: the plain loops
)
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (5, 0.0), (40, 0.0), (0, 30.0), (20, 50.0)])
def test_matches_float64_reference(dtype, H, KVH, D, window, softcap):
    q, k, v, tables, lens = make_case(H, KVH, D, dtype, [1, 17, 100, 16, 33])
    scale = D**-0.5
    got = paged_ops.decode_attention(q, k, v, tables, lens, scale, window, softcap)
    assert got.shape == q.shape and got.dtype == dtype and got.is_contiguous()
    want = reference(q, k, v, tables, lens, scale, window, softcap)
    err = (got.double() - want).abs().max().item() / max(want.abs().max().item(), 1.0)
    assert err < TOLERANCE[dtype], err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("window,softcap", [(None, None), (24, None), (None, 30.0)])
def test_matches_todays_decode_path(dtype, window, softcap):
    """The same outputs as attention.py's decode branch today: PagedKVCache.gather + StepBatch.decode_mask + SDPA."""
    H, KVH, D, lens = 9, 3, 64, [1, 17, 100, 64]
    q, k, v, tables, ctx = make_case(H, KVH, D, dtype, lens, seed=1)
    cache = PagedKVCache([LayerSpec(KVH, D)], k.shape[0], dtype, torch.device("cpu"))
    cache.k[0].copy_(k)
    cache.v[0].copy_(v)
    last = ctx - 1
    batch = StepBatch(cache, True, torch.zeros(len(lens), dtype=torch.long), list(range(len(lens) + 1)), last.tolist(), tables, last)
    keys, values = cache.gather(0, tables)
    today = _attend(q.unsqueeze(2), keys, values, batch.decode_mask(window), D**-0.5, softcap)[:, :, 0]  # (B, H, D)
    got = paged_ops.decode_attention(q, cache.k[0], cache.v[0], tables, last + 1, D**-0.5, window, softcap)
    assert (got.float() - today.float()).abs().max().item() < TOLERANCE[dtype] * 2


def test_empty_context_and_bad_input():
    q, k, v, tables, lens = make_case(4, 2, 64, torch.float32, [0, 5])
    out = paged_ops.decode_attention(q, k, v, tables, lens, 0.125)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.allclose(out[1].double(), reference(q, k, v, tables, lens, 0.125, 0, 0.0)[1], atol=1e-5)
    with pytest.raises(RuntimeError, match="does not fit its block table"):
        paged_ops.decode_attention(q, k, v, tables, torch.tensor([0, 17]), 0.125)
    with pytest.raises(RuntimeError, match="out of range"):
        paged_ops.decode_attention(q, k, v, torch.full_like(tables, k.shape[0]), lens, 0.125)
    with pytest.raises(RuntimeError, match="multiple of"):
        paged_ops.decode_attention(q[:, :3], k, v, tables, lens, 0.125)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        paged_ops.decode_attention(q.double(), k.double(), v.double(), tables, lens, 0.125)


def test_uses_intra_op_threads():
    """Run with torch.set_num_threads(1) and with more: the same result (each task is independent of the split)."""
    q, k, v, tables, lens = make_case(9, 3, 64, torch.float32, [100] * 8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = paged_ops.decode_attention(q, k, v, tables, lens, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, paged_ops.decode_attention(q, k, v, tables, lens, 0.125))


def test_fake_impl_and_compile():
    """The registered fake lets torch.compile(fullgraph=True) trace through the op (aot_eager: tracing only, no codegen)."""
    q, k, v, tables, lens = make_case(9, 3, 64, torch.float32, [1, 17, 100])
    op = torch.ops.kserve_llm.paged_decode_attention.default
    torch.library.opcheck(op, (q.contiguous(), k, v, tables, lens, 0.125, 0, 0.0), test_utils=("test_schema", "test_faketensor"))

    def f(q, k, v, tables, lens):
        return paged_ops.decode_attention(q, k, v, tables, lens, 0.125, 0, 0.0) * 2

    started = time.monotonic()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, tables, lens)
    assert time.monotonic() - started < 60
    assert torch.allclose(got, f(q, k, v, tables, lens))
