"""Data-parallel plumbing for the train step under ``torchrun``: the process group, the global batch split,
DDP/FSDP wrapping and full (unsharded) state dicts.

    torchrun --nproc_per_node 2 -m pipelines train --dataset data/ --output model/

``torchrun`` starts one process per device and sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; ``process_group``
joins them (``nccl`` on ``cuda:LOCAL_RANK``, ``gloo`` on CPU). Outside a process group (one process, no torchrun)
the world has one rank and every function here is the identity or a no-op, so single-process training is unchanged.

Two ways to spread the work, both over the same global batch:

* ``ddp`` (``DistributedDataParallel``): every rank holds the whole model and the gradients are averaged.
* ``fsdp`` (FSDP2 ``fully_shard`` per decoder layer, then the root): every rank holds a shard of the weights, the
  gradients and the optimizer state, and gathers a layer's weights only while it runs: for a model that does not
  fit one device.

Checkpoints are state dicts of the plain model and its optimizer, whatever the parallelism: FSDP's shards are
gathered on rank 0 (``full_state``), and a checkpoint from any world size resumes in any other (``load_full_state``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# FSDP and torch.distributed.checkpoint are imported where used: they take most of a second to import, and one process needs neither.

PARALLELISMS = ("ddp", "fsdp")
# Rank 0 alone merges, evaluates and saves the model while the other ranks wait at a barrier: longer than NCCL's 10 minutes.
TIMEOUT = timedelta(hours=1)


def launched() -> bool:
    """Whether torchrun started this process as one of several (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    """Ranks in the process group (1 outside one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one that writes checkpoints and the model, evaluates and shows progress."""
    return rank() == 0


def device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` under torchrun with GPUs, the GPU in one process, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if launched() else torch.device("cuda")


@contextmanager
def process_group() -> Iterator[None]:
    """Joins torchrun's process group for the duration and leaves it after; a no-op in one process or when already joined."""
    if not launched() or dist.is_initialized():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device())
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if dist.is_initialized():
        dist.barrier()


def mean(value: torch.Tensor) -> float:
    """``value``'s mean over the ranks: the loss of the global batch when every rank has the same number of rows."""
    if world_size() == 1:
        return value.item()
    total = value.detach().float().clone()
    dist.all_reduce(total)  # gloo has no AVG
    return total.item() / world_size()


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on some rank, so that every rank takes the same branch (stopping early, say)."""
    if world_size() == 1:
        return flag
    value = torch.tensor(int(flag), device=device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def rows_per_rank(batch_size: int, world: int | None = None) -> int:
    """Rows of the global batch each rank trains on: ``batch_size`` must divide evenly, or the ranks' mean loss
    (and the averaged gradient) would not be the global batch's."""
    world = world_size() if world is None else world
    if batch_size % world:
        raise ValueError(
            f"batch_size {batch_size} (the global batch) is not divisible by the world size {world}: "
            f"every rank trains on batch_size / world size rows; use a multiple of {world}"
        )
    return batch_size // world


def local_rows(batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of the global ``batch`` (all of it in one process)."""
    if world_size() == 1:
        return batch
    n = rows_per_rank(len(batch))
    return batch[rank() * n : (rank() + 1) * n]


def wrap(model: nn.Module, parallelism: str, layers: str = "") -> nn.Module:
    """The module to train: ``model`` itself in one process; with ``ddp``, ``model`` on this rank's device in
    ``DistributedDataParallel`` (its weights are trained in place); with ``fsdp``, a copy sharded with
    ``fully_shard`` on every module of the ``nn.ModuleList`` named ``layers`` (the decoder layers) and on the root.

    ``model`` stays whole (on the CPU) under FSDP, so that ``gather_weights`` can put the trained weights back in it:
    the copy's full weights are freed as they are sharded, but ``model`` must fit in host memory.
    """
    if world_size() == 1:
        return model
    if parallelism == "ddp":
        here = device()
        return DistributedDataParallel(model.to(here), device_ids=[here.index] if here.type == "cuda" else None)
    if parallelism != "fsdp":
        raise ValueError(f"parallelism must be one of {', '.join(PARALLELISMS)}; got {parallelism!r}")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    sharded = copy.deepcopy(model)
    mesh = init_device_mesh(device().type, (world_size(),))
    if layers:
        for layer in sharded.get_submodule(layers):
            fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    return sharded


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards a module in place: it is its own model)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is FSDP-sharded: its forward pass, state dicts and gathering are collective (every rank takes part)."""
    if world_size() == 1:
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _full_on_rank_0():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The (model, optimizer) state dicts of the unwrapped model, as one process has them: parameter names without
    DDP's ``module.`` prefix and the optimizer's state keyed by parameter index.

    Under FSDP this gathers the shards to rank 0's CPU (collective: call it on every rank); the other ranks get empty dicts.
    """
    if not is_sharded(model):
        return unwrap(model).state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    weights = get_model_state_dict(model, options=_full_on_rank_0())
    state = get_optimizer_state_dict(model, optimizer, options=_full_on_rank_0())
    return weights, (_by_index(state, _param_names(model, optimizer)) if state else {})


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optimizer_state: dict) -> None:
    """Load ``full_state``'s dicts (from any world size and parallelism); under FSDP every rank keeps its shard."""
    if not is_sharded(model):
        unwrap(model).load_state_dict(weights)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, _by_name(optimizer_state, _param_names(model, optimizer)), options=options)


def gather_weights(trained: nn.Module, model: nn.Module) -> None:
    """After training a sharded copy (FSDP), the full trained weights into ``model`` on rank 0 (collective).
    DDP and one process train ``model`` in place: nothing to do."""
    if is_sharded(trained):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        weights = get_model_state_dict(trained, options=_full_on_rank_0())
        if is_main():
            model.load_state_dict(weights)


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The names of the optimizer's parameters, group by group, in its order (the order of one process's indices)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def _by_index(state: dict, names: list[list[str]]) -> dict:
    """A name-keyed optimizer state dict (``torch.distributed.checkpoint``'s) keyed by index (``Optimizer.state_dict``'s)."""
    index = {name: i for i, name in enumerate(name for group in names for name in group)}
    return {
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [dict(group, params=[index[name] for name in group_names]) for group, group_names in zip(state["param_groups"], names)],
    }


def _by_name(state: dict, names: list[list[str]]) -> dict:
    """The reverse of ``_by_index``."""
    flat = [name for group in names for name in group]
    return {
        "state": {flat[i]: value for i, value in state["state"].items()},
        "param_groups": [dict(group, params=group_names) for group, group_names in zip(state["param_groups"], names)],
    }
