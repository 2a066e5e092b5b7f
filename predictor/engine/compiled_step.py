"""The decode step as one compiled graph: ``torch.compile`` (inductor's CPU backend) over the model's forward.

A decode step runs one token per sequence through every layer: on SmolLM2 (30 layers) about 1,200 small tensor
operations, each dispatched from Python in eager mode. Compiled, the elementwise work between the matrix products
(norms, rotary embeddings, residual adds, the gated activation) becomes a few fused C++ loops, and Python runs once
per step. Measured (2 cores, bfloat16 SmolLM2): on an Intel Xeon with AMX, median step in process, 24.6 / 29.9 ms
compiled against 29.0 / 36.1 ms eager at batch 1 / 16 (1.18x / 1.21x); on an AMD EPYC without AMX (AVX512-BF16),
served under ``make bench``'s closed loop, 1.09-1.24x the eager server's tokens/s at C=1 and 1.13-1.23x at C=16
(measured before ``memory.py``'s malloc thresholds were raised; in process on another AMD EPYC batch 1 had read 0.88x:
dynamo's guard check, ~1.5 ms a step, against a fast eager step). So the server
compiles by default where the CPU multiplies bfloat16 natively (``cpu.CpuInfo.compiles_by_default``), and elsewhere
with ``--compile``.

What the graph holds:
- the model's own modules, traced by dynamo;
- decode attention as the native operator ``kserve_llm::paged_decode_attention`` (``paged_ops.py``, with a fake
  implementation for tracing), which reads the block pools in place, and the KV-cache writes (``index_copy_``
  into the pools, which inductor keeps in place);
- the oneDNN-packed projections (``packing.py``) as the opaque operator ``kserve_llm::packed_linear``, and the int8
  ones' fbgemm products (``quantized.py``) as ``kserve_llm::int8_linear``: inductor cannot take oneDNN's packed
  weight tensors or fbgemm's packed parameters as graph inputs, so each module is looked up by a handle (an int
  constant of the graph) and called as in eager mode; the int8 projections' per-row scaling around the product
  is traced, and fused.

The token dimension is marked *unbacked* (``mark_unbacked``): one graph serves every batch size, 1 included (a
plain dynamic dimension is specialised at sizes 0 and 1, which would compile twice), so traffic never
recompiles. The block-table width is unbacked as well. Prefill stays eager: its shapes vary with every prompt and
its time goes to large matrix products, where Python's share is small.

The module's float attributes (norm epsilons, rotary scaling, the embedding's ``norm_type``) are specialised
(``specialize_float``): under ``dynamic=True`` dynamo first makes them symbols, inductor then asks for them as
constants, and dynamo restarts its analysis, tracing the model twice at every start (measured on the AMD EPYC: a
warm start's compile 32.8 s with the restart, 10.2 s without).

Once compiled, the graph's guards are no longer evaluated (``set_stance(skip_guard_eval_unsafe=True)``): they check
every parameter and every field of the step's ``StepBatch``, ~1.3 ms a step on the AMD EPYC (torch.profiler's
"TorchDynamo Cache Lookup", SmolLM2, B=16), 0.5 ms without. That is safe here because every decode step calls the
graph with inputs of one structure (the runner builds them; the token and block-table dimensions are unbacked, so
no size ever asks for another graph) on the same model, in inference mode.

The graph is compiled at start-up, before the server is ready (``warm_up``: one step on the null block), with
inductor's caches under ``$KSERVE_LLM_CACHE/inductor`` so that a restart on the same machine reuses the compiled
code (inductor's FX graph cache and AOTAutograd's cache: a warm start re-runs only dynamo's tracing). Anything that
fails while compiling leaves the runner eager, and the log says why.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..build_once import inductor_cache_dir

if TYPE_CHECKING:
    from .attention import StepBatch

logger = logging.getLogger("kserve")


class CompiledDecode:
    """``model``'s forward for decode steps, compiled: ``(ids (1, B), positions (1, B), keep (B,), batch) → logits (B, V)``."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._step = torch.compile(self._forward, dynamic=True)
        self.warmed = False  # set once the warm-up step compiled the graph: from then on its guards are not evaluated

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        out = self.model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=keep, step_batch=batch)
        return out.logits[0].float()

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        mark_unbacked = torch._dynamo.decorators.mark_unbacked
        for tensor in (ids, positions):
            mark_unbacked(tensor, 1)
        for tensor in (keep, batch.slots, batch.context_lens, batch.last_positions):
            mark_unbacked(tensor, 0)
        mark_unbacked(batch.block_tables, 0)
        mark_unbacked(batch.block_tables, 1)
        if self.warmed:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self._step(ids, positions, keep, batch)
        with torch._dynamo.config.patch(specialize_float=True):  # read only while tracing (the first call, recompiles)
            return self._step(ids, positions, keep, batch)


def compile_decode(warm_up: Callable[[], object]) -> str | None:
    """Run ``warm_up`` (a decode step through the compiled graph); None when it compiled, else why it did not."""
    started = time.monotonic()
    logger.info("compiling the decode step (torch.compile, inductor; cache %s): about a minute on 2 cores the first time", inductor_cache_dir())
    try:
        warm_up()
    except Exception as exc:  # any compiler failure only costs the compiled path
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"{type(exc).__name__}: {first[:300]}"
    logger.info("decode step compiled in %.1f s", time.monotonic() - started)
    return None
