"""The engine's parts on their own: detokenizer, sampler, loading, and the project's training code."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from transformers import AutoTokenizer

from pipelines.corpus import demo_corpus, split_documents
from pipelines.train import TrainConfig, train_from_scratch
from predictor.engine.detokenizer import Detokenizer
from predictor.engine.sampler import filter_logits, sample
from predictor.loading import ModelLoadError, load_model
from predictor.sampling import SamplingParams


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def stream_text(tokenizer, ids: list[int], stop: list[str] | None = None) -> tuple[list[str], Detokenizer]:
    detok = Detokenizer(tokenizer, [], stop or [])
    deltas = []
    for token in ids:
        deltas.append(detok.add(token))
        if detok.stopped:
            break
    deltas.append(detok.flush())
    return deltas, detok


@pytest.mark.parametrize("text", ["héllo wörld ✓ 日本語 🙂🙂 done", "plain ascii text", "ß" * 7 + " € ∑ 🚀"])
def test_detokenizer_never_splits_multibyte_characters(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split()), "byte-level BPE should split these characters over several tokens"
    deltas, _ = stream_text(tokenizer, ids)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_detokenizer_holds_back_and_trims_stop_strings(tokenizer):
    text = "alpha beta gamma delta"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    deltas, detok = stream_text(tokenizer, ids, stop=["gamma"])
    assert "".join(deltas) == "alpha beta "
    assert detok.stopped
    deltas, detok = stream_text(tokenizer, ids, stop=["gamut"])  # a prefix that never completes is released at the end
    assert "".join(deltas) == text and not detok.stopped


def test_sampler_seeded_rows_do_not_depend_on_batch_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=0.0), SamplingParams(temperature=1.3, top_p=0.9)]

    def run(rows: list[int]) -> list[int]:
        gens = [torch.Generator().manual_seed(params[r].seed or 1) for r in rows]
        tokens, _ = sample(logits[rows], [params[r] for r in rows], gens, [[] for _ in rows], [[] for _ in rows], eos_token_id=None)
        return tokens

    alone = run([0])
    assert run([0, 1, 2])[0] == alone[0]
    assert run([1])[0] == int(logits[1].argmax())


def test_filter_logits_top_k_top_p_min_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isfinite(filter_logits(logits, SamplingParams(top_k=2))).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, SamplingParams(top_p=0.7))).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, SamplingParams(min_p=0.2))).tolist() == [True, True, True, False]


def test_pickle_only_directory_is_refused(tiny_model_dir, tmp_path):
    target = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, target)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target)
    (target / "model.safetensors").unlink()
    torch.save(model.state_dict(), target / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only pickle weights.*--allow_pickle_weights"):
        load_model(target)
    loaded = load_model(target, allow_pickle=True)
    assert loaded.max_model_len == 128


def test_cli_reports_a_missing_model_directory(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "predictor", "--model_dir", str(tmp_path / "nope"), "--http_port", "0"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_cli_refuses_several_workers(tiny_model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "predictor", "--model_dir", str(tiny_model_dir), "--workers", "2"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "--workers must be 1" in result.stderr


def test_training_is_deterministic(tmp_path: Path):
    train, held_out = split_documents(demo_corpus()[:8])
    config = TrainConfig(vocab_size=300, n_layer=1, n_embd=32, n_head=2, n_positions=64, seq_len=32, batch_size=4, steps=8)
    a = train_from_scratch(train, held_out, config, tmp_path / "a", progress=False)
    b = train_from_scratch(train, held_out, config, tmp_path / "b", progress=False)
    assert a["train_loss"] == b["train_loss"]
    assert a["train_loss"][-1] < a["train_loss"][0]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


class FakeSequence:
    """A stand-in for the engine's ``Sequence``: only what the scheduler reads and writes."""

    def __init__(self, prompt_len: int):
        self.tokens_to_prefill = [1] * prompt_len
        self.blocks: list[int] = []
        self.length = 0
        self.prefill_target = 0
        self.chunk = 0
        self.needs_prompt_logits = False
        self.cached = 0
        self.digests: list[bytes] = []

    @property
    def prefilling(self) -> bool:
        return self.length < self.prefill_target

    def ran(self) -> None:
        """What the engine does after the step's prefill forward."""
        self.length += self.chunk


def test_scheduler_admits_by_blocks_and_preempts_the_newest():
    from predictor.engine.kv_cache import BlockAllocator
    from predictor.engine.scheduler import Scheduler

    scheduler = Scheduler(BlockAllocator(6, block_size=16), max_num_seqs=8, max_prefill_tokens=1000)  # 5 usable blocks
    seqs = [FakeSequence(16) for _ in range(4)]
    scheduler.waiting.extend(seqs)
    admitted = scheduler.admit(1000)
    for s in admitted:
        s.ran()
    # each needs 1 block and leaves one spare per running sequence: 3 fit (5-1 ≥ 0, 4-1 ≥ 1, 3-1 ≥ 2), the 4th waits
    assert admitted == seqs[:3] and list(scheduler.waiting) == seqs[3:]
    assert sorted(b for s in admitted for b in s.blocks) == [1, 2, 3] and 0 not in scheduler.allocator._free
    preempted = scheduler.reserve_decode()  # position 16 starts a second block for all three; only 2 are free
    assert preempted == [seqs[2]] and scheduler.running == seqs[:2]
    assert [len(s.blocks) for s in seqs[:2]] == [2, 2] and seqs[2].blocks == [] and seqs[2].length == 0
    assert list(scheduler.waiting) == [seqs[2], seqs[3]] and scheduler.preemptions == 1
    assert scheduler.usage == 4 / 5
    scheduler.free(seqs[0])
    assert scheduler.allocator.free == 3 and scheduler.running == [seqs[1]]


def test_scheduler_chunks_prefill_within_the_budget_and_batch_limit():
    from predictor.engine.kv_cache import BlockAllocator
    from predictor.engine.scheduler import Scheduler

    scheduler = Scheduler(BlockAllocator(100, block_size=16), max_num_seqs=3, max_prefill_tokens=40)
    seqs = [FakeSequence(n) for n in (50, 10, 25, 10, 10)]
    scheduler.waiting.extend(seqs)

    def step() -> tuple[list, list[tuple[int, int]]]:
        admitted, chunks = scheduler.schedule_prefill()
        plan = [(seqs.index(s), s.chunk) for s in chunks]
        for s in chunks:
            s.ran()
        return [seqs.index(s) for s in admitted], plan

    assert step() == ([0], [(0, 40)])  # the long prompt takes the whole budget: its first chunk
    assert seqs[0].prefilling and len(seqs[0].blocks) == 4  # every block of its prompt from admission
    assert step() == ([1, 2], [(0, 10), (1, 10), (2, 20)])  # its rest first, then new prompts in what is left
    assert step() == ([], [(2, 5)])  # the batch limit (3) keeps the other two waiting
    assert not any(s.prefilling for s in seqs[:3]) and len(scheduler.waiting) == 2


def test_scheduler_without_chunking_takes_one_prompt_whole():
    """The row-by-row runner cannot continue a prefill: there one prompt always may, over the budget."""
    from predictor.engine.kv_cache import BlockAllocator
    from predictor.engine.scheduler import Scheduler

    scheduler = Scheduler(BlockAllocator(100, block_size=16), max_num_seqs=3, max_prefill_tokens=40, chunked_prefill=False)
    seqs = [FakeSequence(n) for n in (50, 10, 10, 10, 10)]
    scheduler.waiting.extend(seqs)
    admitted, chunks = scheduler.schedule_prefill()
    assert admitted == chunks == seqs[:1] and seqs[0].chunk == 50
    seqs[0].ran()
    admitted, chunks = scheduler.schedule_prefill()
    assert admitted == seqs[1:3]  # the batch limit (3) stops the rest
    assert len(scheduler.waiting) == 2


@pytest.mark.parametrize(("text", "expected"), [("4Gi", 4 << 30), ("256Mi", 256 << 20), ("512M", 512 * 10**6), ("1048576", 1 << 20), ("1.5Ki", 1536)])
def test_kv_cache_memory_sizes(text, expected):
    from predictor.engine.kv_cache import parse_bytes

    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1Gi", "4 GiB of it", "0"])
def test_kv_cache_memory_bad_sizes(text):
    from predictor.engine.kv_cache import parse_bytes

    with pytest.raises(ValueError, match="size"):
        parse_bytes(text)


def test_int8_linear_rows_do_not_depend_on_their_batch_neighbours():
    """Per-token activation scales: a row's output is bit-identical alone and beside rows of 100× its range."""
    from predictor.quantized import _quantize_linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    int8 = _quantize_linear(linear)
    x = torch.randn(6, 64) * torch.tensor([0.01, 1.0, 100.0, 0.5, 3.0, 0.1])[:, None]
    batched = int8(x)
    alone = torch.cat([int8(x[i : i + 1]) for i in range(6)])
    assert torch.equal(batched, alone)
    relative = (batched - linear(x)).norm(dim=1) / linear(x).norm(dim=1)
    assert relative.max() < 0.05  # each row quantized on its own range, the small ones too


def test_packing_shares_sibling_products_and_fuses_activations_only_where_the_output_is_unchanged():
    """A gated MLP's gate and up projections become slices of one packed product, and so do an attention's q, k and v,
    whatever order or inputs they are called with; an MLP's activation is fused into its first projection (GPT-2's
    shape) only where that leaves the output unchanged. Every module still computes what it did."""
    from torch import nn

    from predictor.engine.packing import PackedLinear, SharedProjection, pack_model

    class Gated(nn.Module):
        def __init__(self, swapped: bool):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(32, 64), nn.Linear(32, 64), nn.Linear(64, 32)
            self.act_fn, self.swapped = nn.SiLU(), swapped

        def forward(self, x):
            if self.swapped:
                return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(32, 32), nn.Linear(32, 16), nn.Linear(32, 16)

        def forward(self, x, y):  # k reads another tensor, and v comes before q: each slice still its own product
            return torch.cat([self.k_proj(y), self.v_proj(x), self.q_proj(x), self.k_proj(x)], dim=-1)

    class Plain(nn.Module):
        def __init__(self, swapped: bool):
            super().__init__()
            self.c_fc, self.c_proj, self.act, self.swapped = nn.Linear(32, 64), nn.Linear(64, 64), nn.GELU(), swapped

        def forward(self, x):
            return self.act(self.c_proj(self.c_fc(x))) if self.swapped else self.c_proj(self.act(self.c_fc(x)))

    torch.manual_seed(0)
    x, y = torch.randn(5, 32) * 30, torch.randn(5, 32)  # large activations, as real weights give
    for swapped in (False, True):
        mlp = Gated(swapped).eval()
        expected = mlp(x)
        assert pack_model(mlp, 16) == (1, 0, 1)
        assert isinstance(mlp.gate_proj, SharedProjection) and isinstance(mlp.up_proj, SharedProjection)
        assert torch.allclose(mlp(x), expected, rtol=1e-4, atol=1e-3)
    attention = Attention().eval()
    expected = attention(x, y)
    assert pack_model(attention, 16) == (0, 0, 1)
    assert torch.allclose(attention(x, y), expected, rtol=1e-4, atol=1e-3)
    for swapped, fused in ((False, 1), (True, 0)):
        mlp = Plain(swapped).eval()
        expected = mlp(x)
        assert pack_model(mlp, 16) == (2, fused, 0)
        assert isinstance(mlp.c_fc, PackedLinear) and isinstance(mlp.act, nn.Identity) == bool(fused)
        assert torch.allclose(mlp(x), expected, rtol=1e-4, atol=1e-3)
