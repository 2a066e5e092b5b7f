"""Projections that compiled graphs call as opaque operators: ``kserve_llm::packed_linear`` and ``kserve_llm::int8_linear``.

inductor cannot take oneDNN's packed weight tensors (``engine/packing.py``) or fbgemm's packed int8 parameters
(``quantized.py``) as graph inputs. So each such module registers itself here and gets a handle, an int that a
traced graph holds as a constant; the operator finds the module by it and runs its ``product`` as in eager mode.
Modules are held weakly: a dropped model frees its weights. See ``engine/compiled_step.py`` for the graph.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn

# The projections the compiled graphs call as opaque operators, by handle (weakly: a dropped model frees its
# weights): oneDNN-packed ones (packing.PackedLinear) and int8 ones (quantized.Int8Linear), each with a ``product``.
_OPAQUE: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()
_handles = itertools.count()


def register(module: nn.Module) -> int:
    """A new handle for ``module`` (which has ``product(x)`` and ``out_features``), by which the operators find it."""
    handle = next(_handles)
    _OPAQUE[handle] = module
    return handle


@torch.library.custom_op("kserve_llm::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, handle: int) -> torch.Tensor:
    """The product of ``x`` (..., in) with packed projection ``handle`` → (..., out)."""
    return _OPAQUE[handle].product(x)


@packed_linear.register_fake
def _(x: torch.Tensor, handle: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], _OPAQUE[handle].out_features)


@torch.library.custom_op("kserve_llm::int8_linear", mutates_args=())
def int8_linear(rows: torch.Tensor, handle: int) -> torch.Tensor:
    """int8 projection ``handle`` of its normalised rows (M, in) → (M, out) float32 (``quantized.Int8Linear.product``)."""
    return _OPAQUE[handle].product(rows)


@int8_linear.register_fake
def _(rows: torch.Tensor, handle: int) -> torch.Tensor:
    return rows.new_empty(rows.shape[0], _OPAQUE[handle].out_features, dtype=torch.float32)
