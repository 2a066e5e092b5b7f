"""Model runners: run a step's new tokens through the model and return the logits to sample from.

Tensors and devices live here and nowhere else; the engine passes ``Chunk``s in (token ids, positions,
KV-cache blocks) and gets logits out.

``PagedRunner`` serves every decoder-only model that transformers implements with its attention
interface (``_supports_attention_backend``: GPT-2, Llama, Mistral, Qwen 2/3, Gemma 2/3, Phi-3,
GPT-NeoX, OPT, OLMo 2, Granite, …). The model's own modules do embeddings, norms, rotary embeddings,
MLP and LM head; ``attention.paged_attention`` does attention over the engine's paged KV cache. All of
a step's sequences go through one forward as one flat row of tokens, each with its own position, so
a decode step is one batched pass however different the sequences' lengths. On CPU the projections
are first prepacked for oneDNN (``packing.py``); the runner owns the model from then on.

``HFRunner`` is the fallback for any other causal LM (models whose attention transformers does not
route through the interface, or remote code): its own ``forward`` and a cache per sequence, correct
but decoded row by row. ``OnnxRunner`` runs an exported graph with ONNX Runtime, its running batch
decoded together.

Over 400 lines because it holds the three runners behind one interface (``ModelRunner``), so that the engine's one
call site (``make_runner``) and the reasons a model falls back are read in one place; the paged runner is most of it.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel

from ..cpu import cpu_info
from ..loading import ModelLoadError
from ..onnx_model import OnnxModel
from . import kv_cache, paged_ops
from .attention import ATTN_IMPLEMENTATION, StepBatch
from .compiled_step import CompiledDecode, compile_decode
from .kv_cache import BLOCK_SIZE, LayerSpec, PagedKVCache
from .lora import LoRAManager
from .packing import can_pack, pack_model

logger = logging.getLogger("kserve")

# A prefill's flat row is padded up to a multiple of this many tokens, so that oneDNN meets few distinct
# shapes: each new shape builds (and caches) new kernels, and unbounded shape variety grows memory with traffic.
PREFILL_BUCKET = 16


@dataclass
class Chunk:
    """One sequence's share of a step: ``tokens`` go at positions ``start, start+1, …``.

    ``blocks`` is the sequence's block table, already long enough for ``start + len(tokens)`` positions.
    ``all_logits``: return logits for every new token (prompt logprobs), not only the last.
    """

    seq_id: int
    tokens: list[int]
    start: int
    blocks: list[int]
    all_logits: bool = False
    lora_slot: int = 0  # its LoRA adapter's slot (lora.py); 0: the base model


@dataclass
class KVPlan:
    """How much KV cache to build: ``budget_bytes`` (None: the device default) for at most ``max_tokens`` positions."""

    budget_bytes: int | None
    max_tokens: int


class ModelRunner(ABC):
    num_blocks: int  # the pool's blocks, the null block included
    path: str  # which runner serves the model and why, for the start-up log

    @abstractmethod
    def prefill(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        """Run new tokens; per chunk, logits (len, V) if ``all_logits`` else (1, V)."""

    @abstractmethod
    def decode(self, chunks: list[Chunk]) -> torch.Tensor:
        """One token per chunk at position ``start``; logits (B, V)."""

    def step(self, prefill: list[Chunk], decode: list[Chunk]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """A step with prefill chunks and decoding sequences: ``prefill``'s logits and ``decode``'s (B, V). Runners that
        can run both in one forward (the paged runner) override this."""
        return (self.prefill(prefill) if prefill else []), (self.decode(decode) if decode else None)

    @abstractmethod
    def release(self, seq_id: int) -> None:
        """The sequence left (finished, cancelled or preempted); runners with per-sequence state drop it."""


def make_runner(
    model: PreTrainedModel | OnnxModel, plan: KVPlan, max_num_seqs: int, device: torch.device, lora: LoRAManager | None = None, compile: bool | None = False
) -> ModelRunner:
    if isinstance(model, OnnxModel):
        if lora is not None:
            raise ModelLoadError(lora_unsupported("an ONNX model, served by the ONNX runner"))
        return OnnxRunner(model, plan, max_num_seqs)
    reason = PagedRunner.unsupported(model)
    if reason is None:
        try:
            return PagedRunner(model, plan, max_num_seqs, device, lora, compile)
        except UnsupportedModel as exc:
            reason = str(exc)
    if lora is not None:
        raise ModelLoadError(lora_unsupported(f"served by the row-by-row fallback runner ({reason})"))
    runner = HFRunner(model, plan, device)
    runner.path = f"HFRunner (row-by-row fallback): {reason}"
    return runner


def lora_unsupported(why: str) -> str:
    return f"--lora_modules needs the paged runner, which applies each row's adapter inside the batched step; this model is {why}"


class UnsupportedModel(Exception):
    """The paged runner cannot serve this model; the message says why (logged at start-up)."""


def _cache_dtype(model: PreTrainedModel) -> torch.dtype:
    dtype = next(model.parameters()).dtype
    return dtype if dtype.is_floating_point else torch.float32  # quantized weights: activations stay float32


def _budget(plan: KVPlan, device: torch.device) -> int:
    if plan.budget_bytes is not None:
        return plan.budget_bytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * kv_cache.DEFAULT_CUDA_KV_CACHE_FRACTION)
    return kv_cache.DEFAULT_CPU_KV_CACHE_BYTES


class PagedRunner(ModelRunner):
    @staticmethod
    def unsupported(model: PreTrainedModel) -> str | None:
        """Why the paged runner cannot take ``model``, or None if it can."""
        if not getattr(model, "_supports_attention_backend", False):
            return f"{type(model).__name__} does not route attention through transformers' AttentionInterface"
        if getattr(model.config, "is_encoder_decoder", False):
            return "encoder-decoder models are not served by the paged runner"
        return None

    def __init__(
        self, model: PreTrainedModel, plan: KVPlan, max_num_seqs: int, device: torch.device, lora: LoRAManager | None = None, compile: bool | None = False
    ):
        self.model = model
        self.device = device
        self.lora = lora
        self.dtype = _cache_dtype(model)
        try:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
        except (ValueError, ImportError) as exc:
            raise UnsupportedModel(f"{type(model).__name__} refuses a custom attention implementation: {exc}") from None
        self.layers = self._probe_layers()
        per_token = kv_cache.bytes_per_token(self.layers, self.dtype)
        budget = _budget(plan, device)
        self.num_blocks = kv_cache.plan_blocks(budget, per_token, plan.max_tokens)
        if self.num_blocks < 2:
            raise ModelLoadError(
                f"--kv_cache_memory {kv_cache.format_bytes(budget)} holds no KV-cache block of this model "
                f"({BLOCK_SIZE} positions × {kv_cache.format_bytes(per_token)} per position); raise it"
            )
        self.cache = PagedKVCache(self.layers, self.num_blocks, self.dtype, device)
        if lora is not None:
            lora.attach(model)  # before packing: packing then replaces each wrapper's base projection
        packed = pack_model(model, max_num_seqs, self.dtype) if can_pack(device, self.dtype) else (0, 0, 0)
        # Decode attention from the block pools by the C++ operator (built here, at start-up, if this machine has none).
        self.native_decode = device.type == "cpu" and self.dtype in paged_ops.DTYPES and paged_ops.available()
        # Prefill attention from the block pools too, where the operator takes this dtype and every layer's head size.
        self.native_prefill = self.native_decode and all(paged_ops.prefill_supported(self.dtype, spec.head_dim) for spec in self.layers)
        self.compiled: CompiledDecode | None = None
        if compile is None and device.type != "cpu":
            step = "eager (the compiled step runs on CPU only so far)"
        elif compile is None:  # by the CPU (cpu.CpuInfo.compiles_by_default: where it measured faster)
            without = "eager (the default on a CPU without AMX or AVX512-BF16, where compiling was not measured faster)"
            step = self._compile() if cpu_info().compiles_by_default else without
        else:
            step = self._compile() if compile else "eager (--no_compile)"
        self.path = (
            f"PagedRunner ({type(model).__name__} through AttentionInterface; {len(self.layers)} attention layers, "
            f"KV cache {self.num_blocks - 1} blocks × {BLOCK_SIZE} positions = {kv_cache.format_bytes(self.cache.nbytes)}; "
            f"oneDNN-packed projections: {packed[0]}, fused activations: {packed[1]}, shared products (q/k/v, gate/up): {packed[2]}; "
            f"decode attention: {'native, from the block pools' if self.native_decode else 'gathered blocks + SDPA'}; "
            f"prefill attention: {'native (AVX512-BF16), from the block pools' if self.native_prefill else 'SDPA per sequence'}; decode step: {step}"
            + (f"; {lora.describe()})" if lora is not None else ")")
        )

    def _compile(self) -> str:
        """Compile the decode step (``compiled_step.py``) if this runner can; what the decode step is, for the log."""
        if self.device.type != "cpu":
            return "eager (the compiled step runs on CPU only so far)"
        if not self.native_decode:
            return "eager (the compiled step needs the native decode attention, which needs a C++ compiler)"
        if self.lora is not None:
            return "eager (LoRA adapters switch per row inside the step, which the compiled graph does not trace)"
        self.compiled = CompiledDecode(self.model)
        failure = compile_decode(self._warm_up)
        if failure is None:
            self.compiled.warmed = True
            return "compiled (torch.compile, inductor)"
        self.compiled = None
        logger.warning("the decode step stays eager: compiling it failed with %s", failure)
        return f"eager (compiling failed: {failure})"

    def _warm_up(self) -> None:
        """Two decode rows into the null block (block 0, scratch for padding): compiles the graph, writes nothing kept."""
        self.decode([Chunk(-1, [0], 0, [0]), Chunk(-2, [0], 1, [0])])
        self.decode([Chunk(-1, [0], 2, [0])])

    @torch.inference_mode()
    def _probe_layers(self) -> list[LayerSpec]:
        """Run one token through the model, recording each attention layer's KV heads and head size."""
        found: dict[int, LayerSpec] = {}
        batch = StepBatch(cache=None, decode=False, slots=torch.zeros(1, dtype=torch.long), query_starts=[0, 1], start_positions=[0], probe=found)
        ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.model(input_ids=ids, position_ids=torch.zeros_like(ids), use_cache=False, step_batch=batch)
        if not found or sorted(found) != list(range(len(found))):
            raise UnsupportedModel(f"{type(self.model).__name__}'s attention layers did not all reach the registered attention function")
        return [found[i] for i in range(len(found))]

    def _slots(self, chunk: Chunk) -> list[int]:
        bs = BLOCK_SIZE
        return [chunk.blocks[p // bs] * bs + p % bs for p in range(chunk.start, chunk.start + len(chunk.tokens))]

    def _tables(self, chunks: list[Chunk]) -> torch.Tensor:
        width = max(len(c.blocks) for c in chunks)
        return torch.tensor([c.blocks + [0] * (width - len(c.blocks)) for c in chunks], device=self.device)

    def _forward(self, prefill: list[Chunk], decode: list[Chunk], all_decode: bool = False) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """One forward over ``prefill``'s chunks and then ``decode``'s tokens, as one flat row (padded to a multiple of
        ``PREFILL_BUCKET`` tokens when it prefills); per prefill chunk its logits (all of them for ``all_logits``, else the last), and the
        decode rows' logits (B, V) or None. ``all_decode``: a decode step (the compiled graph's, when there is one)."""
        bs = BLOCK_SIZE
        ids = [t for c in prefill for t in c.tokens]
        positions = [p for c in prefill for p in range(c.start, c.start + len(c.tokens))]
        slots = [s for c in prefill for s in self._slots(c)]
        starts = [0]
        for c in prefill:
            starts.append(starts[-1] + len(c.tokens))
        # The row is padded to a multiple of PREFILL_BUCKET tokens (decode rows included): one more "sequence" whose
        # keys go to the null block, placed before the decode rows.
        pad = -(starts[-1] + len(decode)) % PREFILL_BUCKET if prefill else 0
        ids += [0] * pad
        positions += list(range(pad))
        slots += [0] * pad
        keep = [i for c, a, b in zip(prefill, starts, starts[1:]) for i in (range(a, b) if c.all_logits else [b - 1])]
        decode_from = len(ids)
        for c in decode:
            ids.append(c.tokens[0])
            positions.append(c.start)
            slots.append(c.blocks[c.start // bs] * bs + c.start % bs)
        keep += range(decode_from, decode_from + len(decode))
        last = torch.tensor([c.start for c in decode], device=self.device) if decode else None
        query_starts = starts + ([starts[-1] + pad] if pad else [])
        start_positions = [c.start for c in prefill] + ([0] if pad else [])
        native_prefill = self.native_prefill and bool(prefill)
        tables = None
        if native_prefill or any(c.start > 0 for c in prefill):
            tables = self._tables(prefill)
            if pad:  # the padding's row: the null block
                tables = torch.cat([tables, tables.new_zeros(1, tables.shape[1])])
        batch = StepBatch(
            self.cache,
            not prefill,
            torch.tensor(slots, device=self.device),
            query_starts,
            start_positions,
            block_tables=self._tables(decode) if decode else None,
            last_positions=last,
            prefill_tables=tables,
            decode_from=decode_from if prefill and decode else None,
            context_lens=None if last is None else last + 1,
            native_decode=self.native_decode,
            native_prefill=native_prefill,
            prefill_query_starts=torch.tensor(query_starts) if native_prefill else None,
            prefill_start_positions=torch.tensor(start_positions) if native_prefill else None,
        )
        if self.lora is not None:  # each token's row adapter, read by every LoRALinear of this forward
            rows = [c.lora_slot for c in prefill for _ in c.tokens] + [0] * pad + [c.lora_slot for c in decode]
            self.lora.set_step(rows, torch.tensor(keep, device=self.device), self.dtype, self.device)
        ids_t = torch.tensor([ids], device=self.device)  # (1, N)
        positions_t = torch.tensor([positions], device=self.device)
        keep_t = torch.tensor(keep, device=self.device)
        if all_decode and self.compiled is not None:
            logits = self.compiled(ids_t, positions_t, keep_t, batch)
        else:
            logits = self.model(input_ids=ids_t, position_ids=positions_t, use_cache=False, logits_to_keep=keep_t, step_batch=batch).logits[0].float()
        out, at = [], 0  # logits (K, V): the prefill chunks' kept rows, then one per decode row
        for c in prefill:
            n = len(c.tokens) if c.all_logits else 1
            out.append(logits[at : at + n])
            at += n
        return out, (logits[at:] if decode else None)

    @torch.inference_mode()
    def prefill(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        return self._forward(chunks, [])[0]

    @torch.inference_mode()
    def decode(self, chunks: list[Chunk]) -> torch.Tensor:
        return self._forward([], chunks, all_decode=True)[1]  # (B, V)

    @torch.inference_mode()
    def step(self, prefill: list[Chunk], decode: list[Chunk]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Prefill chunks and decoding sequences in one forward (vLLM V1's mixed batch): the model's per-layer work runs
        once for both, where a separate decode forward would repeat it."""
        return self._forward(prefill, decode)

    def release(self, seq_id: int) -> None:
        """Nothing to drop: a sequence's state is its blocks, which the scheduler returns to the pool."""


class HFRunner(ModelRunner):
    """Any causal LM through its own forward, one ``DynamicCache`` per sequence."""

    def __init__(self, model: PreTrainedModel, plan: KVPlan, device: torch.device):
        self.model = model
        self.device = device
        self.caches: dict[int, DynamicCache] = {}
        self.num_blocks = -(-plan.max_tokens // BLOCK_SIZE) + 1  # admission accounting only: caches grow per sequence
        self.path = "HFRunner"

    @torch.inference_mode()
    def prefill(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        out = []
        for c in chunks:
            cache = DynamicCache(config=self.model.config)
            ids = torch.tensor([c.tokens], device=self.device)
            logits = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=0 if c.all_logits else 1).logits[0]
            self.caches[c.seq_id] = cache
            out.append(logits.float())
        return out

    @torch.inference_mode()
    def decode(self, chunks: list[Chunk]) -> torch.Tensor:
        rows = []
        for c in chunks:
            ids = torch.tensor([c.tokens], device=self.device)
            rows.append(self.model(input_ids=ids, past_key_values=self.caches[c.seq_id], use_cache=True).logits[0, -1].float())
        return torch.stack(rows)

    def release(self, seq_id: int) -> None:
        self.caches.pop(seq_id, None)


class OnnxRunner(ModelRunner):
    """An exported graph (``predictor.onnx_model``) under ONNX Runtime; the running batch decodes together.

    Each running sequence owns a slot: row ``slot`` of per-layer key and value buffers
    (slots, kv_heads, capacity, head_dim) and of ``positions`` (slots, capacity; −1 = empty). Occupied
    slots are kept contiguous from 0, so a decode step passes ``buffer[:n]``, a view ONNX Runtime reads
    without a copy, and writes back only the new keys and values. Prefill runs one sequence at a time.
    """

    CAPACITY_STEP = 64  # positions added to every slot when a sequence outgrows the buffers

    def __init__(self, model: OnnxModel, plan: KVPlan, max_num_seqs: int):
        self.model = model
        self.max_num_seqs = max_num_seqs
        self.max_tokens = plan.max_tokens
        self.num_blocks = -(-plan.max_tokens // BLOCK_SIZE) + 1  # admission accounting: buffers grow with the longest sequence
        self.slot_of: dict[int, int] = {}
        self._allocate(self.CAPACITY_STEP)
        self.path = f"OnnxRunner (ONNX Runtime, {len(model.kv_shapes)} layers, running batch decoded together)"

    def _allocate(self, capacity: int) -> None:
        S = self.max_num_seqs
        buffers = [np.zeros((S, h, capacity, d), dtype=np.float32) for h, d in self.model.kv_shapes for _ in range(2)]
        positions = np.full((S, capacity), -1, dtype=np.int64)
        if hasattr(self, "buffers"):
            old = self.positions.shape[1]
            for new, current in zip(buffers, self.buffers):
                new[:, :, :old] = current
            positions[:, :old] = self.positions
        self.buffers, self.positions = buffers, positions

    def _reserve(self, end: int) -> None:
        if end > self.positions.shape[1]:
            step = self.CAPACITY_STEP
            self._allocate(min(-(-end // step) * step, max(end, self.max_tokens)))

    def _slot(self, seq_id: int) -> int:
        if seq_id not in self.slot_of:
            self.slot_of[seq_id] = len(self.slot_of)
        return self.slot_of[seq_id]

    def _store(self, rows: list[int], starts: list[int], outputs: list[np.ndarray], T: int, at: list[int] | None = None) -> None:
        """Write the new keys and values of output rows ``at`` (default 0, 1, …) into slots ``rows`` from ``starts``."""
        for j, (slot, start) in enumerate(zip(rows, starts)):
            src = j if at is None else at[j]
            for buffer, new in zip(self.buffers, outputs):
                buffer[slot, :, start : start + T] = new[src]
            self.positions[slot, start : start + T] = np.arange(start, start + T)

    def prefill(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        out = []
        for c in chunks:
            T = len(c.tokens)
            slot = self._slot(c.seq_id)
            self._reserve(c.start + T)
            if c.start == 0:
                past_positions, past = self.model.empty_past(1)
            else:
                past_positions, past = self.positions[slot : slot + 1], [b[slot : slot + 1] for b in self.buffers]
            logits, *new = self.model.run(np.array([c.tokens]), np.arange(c.start, c.start + T)[None], past_positions, past)
            self._store([slot], [c.start], new, T)
            out.append(torch.from_numpy(logits[0] if c.all_logits else logits[0, -1:]).float())
        return out

    def decode(self, chunks: list[Chunk]) -> torch.Tensor:
        self._reserve(max(c.start for c in chunks) + 1)
        n = len(self.slot_of)  # every occupied slot runs; rows not in this step get a dummy token, their output unused
        ids, positions = np.zeros((n, 1), dtype=np.int64), np.zeros((n, 1), dtype=np.int64)
        rows = [self.slot_of[c.seq_id] for c in chunks]
        for slot, c in zip(rows, chunks):
            ids[slot, 0], positions[slot, 0] = c.tokens[0], c.start
        logits, *new = self.model.run(ids, positions, self.positions[:n], [b[:n] for b in self.buffers])
        self._store(rows, [c.start for c in chunks], new, 1, at=rows)
        return torch.from_numpy(logits[rows, -1]).float()

    def release(self, seq_id: int) -> None:
        """Free the sequence's slot; the last occupied slot moves into it, keeping slots contiguous."""
        slot = self.slot_of.pop(seq_id, None)
        if slot is None:
            return
        last = len(self.slot_of)
        if slot != last:
            moved = next(s for s, i in self.slot_of.items() if i == last)
            for buffer in self.buffers:
                buffer[slot] = buffer[last]
            self.positions[slot] = self.positions[last]
            self.slot_of[moved] = slot
        self.positions[last] = -1
        if not self.slot_of and self.positions.shape[1] > self.CAPACITY_STEP:
            del self.buffers
            self._allocate(self.CAPACITY_STEP)  # idle: give the memory of long sequences back
