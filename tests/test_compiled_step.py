"""The compiled decode step (``predictor/engine/compiled_step.py``): torch.compile over the paged runner's forward.

- served with ``--compile`` (by default on CPUs with AMX or AVX512-BF16; tests/conftest passes ``--no_compile`` unless a test asks), greedy output
  equals ``model.generate`` in float32, alone and batched, for a Llama-shaped and a GPT-2 model (slow: ``make test-slow``);
- one graph serves every batch size and block-table width: no recompiles as traffic changes shape;
- a model whose step fails to compile is served eagerly, and the runner says why.
"""

from __future__ import annotations

import pytest
import torch
from conftest import start_server, stop_server
from test_model_families import build_model, complete, reference, token_prompts
from transformers import AutoConfig, AutoModelForCausalLM

from predictor.engine import compiled_step, paged_ops
from predictor.engine.runner import Chunk, KVPlan, PagedRunner

pytestmark = pytest.mark.skipif(not paged_ops.available(), reason="the compiled step needs a C++ compiler (native paged operators)")


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    return tmp_path_factory.mktemp("compiled")


@pytest.mark.slow  # two servers compiling: ~40 s; `make test-slow` (CI) runs it
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_compiled_server_greedy_equals_generate_alone_and_batched(kind, models_root, tiny_model_dir, tmp_path):
    model_dir = build_model(kind, models_root / kind, tiny_model_dir)
    prompts = token_prompts(AutoConfig.from_pretrained(model_dir).vocab_size)
    expected = reference(model_dir, prompts)
    server = start_server(model_dir, tmp_path, "--compile", "--max_num_seqs", "8", name="m", timeout=300)
    try:
        log = server.read_log()
        assert "decode step: compiled (torch.compile, inductor)" in log, log[-2000:]
        assert "decode step compiled in" in log
        assert complete(server.url, prompts, together=False) == expected
        assert complete(server.url, prompts, together=True) == expected
    finally:
        stop_server(server)


def _runner(model_dir, compile: bool | None) -> PagedRunner:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return PagedRunner(model, KVPlan(None, 4096), 8, torch.device("cpu"), compile=compile)


def _steps(runner: PagedRunner, batch_sizes: list[int], vocab: int) -> list[torch.Tensor]:
    """Prefill B sequences of different lengths, then decode them a few steps; the decode logits of each step."""
    g = torch.Generator().manual_seed(0)
    out, next_block = [], 1
    for B in batch_sizes:
        lengths = [5 + 11 * i for i in range(B)]  # block tables of different widths (16 positions per block)
        blocks = []
        for n in lengths:
            blocks.append(list(range(next_block, next_block + n // 16 + 2)))
            next_block += n // 16 + 2
        chunks = [Chunk(100 + i, torch.randint(0, vocab, (n,), generator=g).tolist(), 0, b) for i, (n, b) in enumerate(zip(lengths, blocks))]
        runner.prefill(chunks)
        positions = list(lengths)
        for _ in range(3):
            logits = runner.decode([Chunk(100 + i, [int(torch.randint(0, vocab, (1,), generator=g))], p, b) for i, (p, b) in enumerate(zip(positions, blocks))])
            out.append(logits)
            positions = [p + 1 for p in positions]
    return out


def test_one_graph_serves_every_batch_size_with_eager_logits(models_root, tiny_model_dir):
    model_dir = build_model("llama", models_root / "llama", tiny_model_dir)
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    eager = _steps(_runner(model_dir, compile=False), [1, 3, 5, 2], vocab)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    runner = _runner(model_dir, compile=True)
    assert runner.compiled is not None, runner.path
    assert runner.compiled.warmed  # served steps skip the guards (compiled_step.py says why that is safe) ...
    runner.compiled.warmed = False  # ... so evaluate them here: every shape must pass the first graph's guards
    guarded = _steps(runner, [1, 3, 5, 2], vocab)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, dict(torch._dynamo.utils.counters["stats"])
    # Traced once: a restarted analysis (module floats made symbols, then specialised) traces the model twice at every start.
    assert torch._dynamo.utils.counters["aot_autograd"]["total"] == 1, dict(torch._dynamo.utils.counters["aot_autograd"])
    runner.compiled.warmed = True
    unguarded = _steps(runner, [1, 3, 5, 2], vocab)
    for e, g, u in zip(eager, guarded, unguarded):
        assert e.shape == g.shape == u.shape
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
        assert torch.equal(g.argmax(-1), e.argmax(-1))
        torch.testing.assert_close(u, e, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # one more compile, ~30 s: `make test-slow` (CI) runs it
def test_an_int8_model_compiles_with_its_products_as_opaque_operators(models_root, tiny_model_dir):
    """The int8 projections (oneDNN on AMX-INT8, fbgemm elsewhere) inside the compiled step: the per-row quantization
    traced around ``kserve_llm::int8_linear``, the logits as eager's."""
    from predictor import quantized

    model_dir = build_model("llama", models_root / "llama", tiny_model_dir)
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size

    def runner(compile: bool) -> PagedRunner:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        quantized.quantize(model)
        return PagedRunner(model, KVPlan(None, 4096), 8, torch.device("cpu"), compile=compile)

    eager = _steps(runner(False), [1, 3], vocab)
    torch._dynamo.reset()
    compiled_runner = runner(True)
    assert compiled_runner.compiled is not None, compiled_runner.path
    for e, c in zip(eager, _steps(compiled_runner, [1, 3], vocab)):
        torch.testing.assert_close(c, e, rtol=1e-3, atol=1e-3)
        assert torch.equal(c.argmax(-1), e.argmax(-1))


def test_a_step_that_fails_to_compile_is_served_eagerly_and_says_why(models_root, tiny_model_dir, monkeypatch):
    def broken(self, *args):
        raise RuntimeError("inductor could not lower this graph")

    monkeypatch.setattr(compiled_step.CompiledDecode, "_forward", broken)
    model_dir = build_model("llama", models_root / "llama", tiny_model_dir)
    runner = _runner(model_dir, compile=True)
    assert runner.compiled is None
    assert "decode step: eager (compiling failed: RuntimeError: inductor could not lower this graph)" in runner.path
    logits = _steps(runner, [2], AutoConfig.from_pretrained(model_dir).vocab_size)
    assert all(torch.isfinite(x).all() for x in logits)


@pytest.mark.parametrize("cpu", ["amx", "avx512_bf16", "avx2"])
def test_by_default_the_step_compiles_on_cpus_with_native_bfloat16_only(cpu, models_root, tiny_model_dir, monkeypatch):
    """Neither --compile nor --no_compile: compiled where the CPU multiplies bfloat16 natively (AMX or AVX512-BF16:
    measured faster there, at C=1 and C=16), eager elsewhere. The compile itself is made to fail here (fast): that the
    runner tried is what the compiling cases show."""
    from predictor.cpu import CpuInfo
    from predictor.engine import runner as runner_module

    flags = {
        "amx": {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"},
        "avx512_bf16": {"avx2", "avx512f", "avx512_bf16", "avx512_vnni"},
        "avx2": {"avx2", "avx512f", "avx512_vnni"},
    }[cpu]
    compiles = cpu != "avx2"
    monkeypatch.setattr(runner_module, "cpu_info", lambda: CpuInfo("test CPU", frozenset(flags)))
    monkeypatch.setattr(compiled_step.CompiledDecode, "_forward", lambda self, *args: (_ for _ in ()).throw(RuntimeError("not compiled in this test")))
    runner = _runner(build_model("llama", models_root / "llama", tiny_model_dir), compile=None)
    if compiles:
        assert "decode step: eager (compiling failed: RuntimeError: not compiled in this test)" in runner.path
    else:
        assert "decode step: eager (the default on a CPU without AMX or AVX512-BF16" in runner.path
    assert CpuInfo("x", frozenset(flags)).compiles_by_default is compiles


def test_inductor_cache_goes_under_the_project_cache_whatever_imports_dynamo_first(tmp_path):
    """torch._dynamo fixes inductor's cache directory when it is imported (its default is under /tmp, an emptyDir in a
    pod); the predictor package sets it first, so a restart reuses the compiled step from ``$KSERVE_LLM_CACHE``."""
    import os
    import subprocess
    import sys

    code = "import os, predictor.quantized, torch._dynamo; print(os.environ['TORCHINDUCTOR_CACHE_DIR'])"
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"} | {"KSERVE_LLM_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == str(tmp_path / "inductor")
