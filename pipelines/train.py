"""Train a GPT-2-architecture causal LM from scratch (with its byte-level BPE tokenizer, ``pipelines.tokenizer``),
or fine-tune one.

The demo model and the pipeline's train step both come from here (the step's callers go through
``pipelines.training.run_training``). Training is deterministic for a given seed and thread count;
checkpoints are written atomically so a killed run resumes where it left off.
Fine-tuning a model directory uses LoRA (``peft``) on the decoder layers' projections by default, merged
into the weights before saving, so the result is a plain transformers model of the base's architecture.

Under ``torchrun`` the same code trains data-parallel (``pipelines.distributed``: DDP, or FSDP for a model that
does not fit one device). ``batch_size`` stays the global batch: every rank draws the same batch and trains on its
share of the rows, so the loss curve, the schedule and checkpoint replay are those of one process; rank 0 alone
writes checkpoints and the model, so any world size resumes any other's checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel, PreTrainedTokenizerFast
from transformers.pytorch_utils import Conv1D

from . import distributed
from .dataset import load
from .tokenizer import tokenize, train_tokenizer

FINETUNE_METHODS = ("lora", "full")
# Settings that only apply to fine-tuning a base model: they do not change a model trained from scratch.
FINETUNE_FIELDS = ("finetune", "lora_rank", "lora_alpha", "lora_dropout")
# Steps between checkpoints of a run that keeps one and whose config does not say (``resolve_config``).
CHECKPOINT_EVERY = 50


@dataclass
class TrainConfig:
    """Shape of the model and of the training run. ``max_seconds`` caps wall time (0: no cap).

    ``finetune`` and the ``lora_*`` fields apply when a base model is fine-tuned: ``"lora"`` trains rank-``lora_rank``
    adapters (scaled by ``lora_alpha / lora_rank``) and merges them; ``"full"`` trains every weight.

    ``batch_size`` is the global batch, whatever the number of processes. ``parallelism`` applies under torchrun
    with more than one process: ``"ddp"`` keeps a whole model on every rank, ``"fsdp"`` shards it (FSDP2) for a
    model that does not fit one device.
    """

    vocab_size: int = 4096
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_positions: int = 256
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 600
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    seed: int = 0
    max_seconds: float = 0.0
    eval_every: int = 100
    checkpoint_every: int = 0
    finetune: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    parallelism: str = "ddp"

    def __post_init__(self) -> None:
        if self.finetune not in FINETUNE_METHODS:
            raise ValueError(f"finetune must be one of {', '.join(FINETUNE_METHODS)}; got {self.finetune!r}")
        if self.parallelism not in distributed.PARALLELISMS:
            raise ValueError(f"parallelism must be one of {', '.join(distributed.PARALLELISMS)}; got {self.parallelism!r}")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be at least 1; got {self.lora_rank}")

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """From a pipeline parameter: unknown keys are an error, numbers take the field's type (KFP passes ints as floats)."""
        types = {f.name: type(f.default) for f in fields(cls)}
        unknown = sorted(set(values) - set(types))
        if unknown:
            raise ValueError(f"train_config: unknown keys {unknown}; known: {sorted(types)}")
        return cls(**{k: types[k](v) for k, v in values.items()})


def resolve_config(train_config: dict, checkpointed: bool = False) -> TrainConfig:
    """The train step's config from ``train_config`` (a pipeline parameter, ``--train-config``). A run that keeps a
    checkpoint (``checkpointed``) writes it every ``checkpoint_every`` steps, ``CHECKPOINT_EVERY`` when that is 0 (the default)."""
    config = TrainConfig.from_dict(train_config)
    if checkpointed and not config.checkpoint_every:
        config.checkpoint_every = CHECKPOINT_EVERY
    return config


def batches(ids: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A (batch_size, seq_len + 1) batch of random windows of ``ids``."""
    starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=generator)
    return torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def held_out_loss(model: nn.Module, ids: torch.Tensor, seq_len: int, max_windows: int = 64, windows_per_batch: int = 8) -> float:
    """Mean next-token cross-entropy over consecutive non-overlapping windows of ``ids``.

    Windows go through the model a few at a time: the logits of a large vocabulary would not fit at once.
    """
    model.eval()
    n = min(max_windows, (len(ids) - 1) // seq_len)
    if n == 0:
        return float("nan")
    x = ids[: n * seq_len + 1].to(next(model.parameters()).device)
    inputs = x[:-1].view(n, seq_len)
    targets = x[1:].view(n, seq_len)
    total = 0.0
    for i in range(0, n, windows_per_batch):
        logits = model(input_ids=inputs[i : i + windows_per_batch]).logits
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[i : i + windows_per_batch].flatten(), reduction="sum").item()
    model.train()
    return total / targets.numel()


def _lr_at(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def _save_checkpoint(model, optimizer, step: int, losses: list, curve: list, path: Path) -> None:
    """Rank 0 writes the plain model's state (atomically: a kill leaves the previous checkpoint); the others wait, so
    that no rank runs ahead of a checkpoint that is not on disk yet. Under FSDP every rank takes part in the gathering."""
    weights, optimizer_state = distributed.full_state(model, optimizer)
    if distributed.is_main():
        tmp = path.with_suffix(".tmp")
        state = {"model": weights, "optimizer": optimizer_state, "step": step, "losses": losses, "held_out_curve": curve}
        torch.save(state, tmp)
        tmp.replace(path)
    distributed.barrier()


def _held_out(model: nn.Module, ids: torch.Tensor, seq_len: int, **windows) -> float | None:
    """``held_out_loss`` on rank 0 (``None`` on the others): a replica evaluates on rank 0 alone, a sharded (FSDP)
    model on every rank together, as its forward pass gathers the weights."""
    if distributed.is_sharded(model):
        loss = held_out_loss(model, ids, seq_len, **windows)
    elif distributed.is_main():
        loss = held_out_loss(distributed.unwrap(model), ids, seq_len, **windows)
    else:
        return None
    return loss if distributed.is_main() else None


def train_lm(
    model: nn.Module,
    train_ids: torch.Tensor,
    held_out_ids: torch.Tensor,
    config: TrainConfig,
    checkpoint: Path | None = None,
    progress: bool = True,
) -> dict:
    """Train ``model`` in place with AdamW and a cosine schedule; returns the loss curve and held-out loss.

    With ``checkpoint`` set, state is saved every ``config.checkpoint_every`` steps and a run resumes from it.

    In a process group (``pipelines.distributed``) every rank draws the same global batch of ``config.batch_size``
    rows from the same seeded generator and trains on its contiguous ``batch_size / world size`` rows: the gradient
    and the logged loss (averaged over the ranks) are the global batch's, and the sampler stays in lockstep for
    resuming. Every rank reads the checkpoint; rank 0 writes it. Afterwards ``model`` holds the trained weights on
    rank 0 (on every rank with DDP), and only rank 0's result has the held-out curve and loss.
    """
    if len(train_ids) <= config.seq_len + 1:
        raise ValueError(f"training text has {len(train_ids)} tokens; need more than seq_len + 1 = {config.seq_len + 1}")
    distributed.rows_per_rank(config.batch_size)  # the batch must split evenly over the ranks
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    trained = distributed.wrap(model, config.parallelism, layers=largest_module_list(model)[0])  # model itself in one process
    trainable = [p for p in trained.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.95),
    )
    start_step, losses, curve = 0, [], []
    if checkpoint is not None and checkpoint.exists():
        try:
            state = torch.load(checkpoint, weights_only=True, map_location="cpu")
            distributed.load_full_state(trained, optimizer, state["model"], state["optimizer"])
            start_step, losses, curve = state["step"], state["losses"], state.get("held_out_curve", [])
        except Exception as exc:  # unreadable, truncated, or another run's (shape, optimizer groups): say which file
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ValueError(f"checkpoint {checkpoint} cannot resume this run ({reason}): delete it, or use the train config it was written with") from None
        for _ in range(start_step):  # replay the batch sampler so a resumed run sees the same batches
            batches(train_ids, config.seq_len, config.batch_size, generator)
    trained.train()
    device = next(trained.parameters()).device
    started = time.monotonic()
    bar = tqdm(range(start_step, config.steps), desc="train", disable=not (progress and distributed.is_main()), initial=start_step, total=config.steps)
    step = start_step
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        batch = distributed.local_rows(batches(train_ids, config.seq_len, config.batch_size, generator)).to(device)
        losses.append(optimizer_step(trained, optimizer, _loss(trained, batch)))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if config.eval_every and (step + 1) % config.eval_every == 0:
            loss = _held_out(trained, held_out_ids, config.seq_len, max_windows=16)
            if loss is not None:
                curve.append([step + 1, round(loss, 4)])
                bar.set_postfix(loss=f"{losses[-1]:.3f}", held_out=f"{curve[-1][1]:.3f}")
        if checkpoint is not None and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            _save_checkpoint(trained, optimizer, step + 1, losses, curve, checkpoint)
        if config.max_seconds and distributed.any_rank(time.monotonic() - started > config.max_seconds):
            break
    bar.close()
    model.eval()
    result = {"steps": len(losses), "train_loss": losses, "held_out_curve": curve}
    final = _held_out(trained, held_out_ids, config.seq_len)
    distributed.gather_weights(trained, model)  # FSDP trained a sharded copy: its weights into model on rank 0
    if final is not None:
        result.update(held_out_loss=final, held_out_perplexity=math.exp(final))
    return result


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    """Backward, clip the gradient norm to 1, step; returns the loss (the mean over the ranks) rounded for the loss curve.

    DDP has averaged the gradients over the ranks by the time of clipping, and FSDP's norm is over the sharded
    (DTensor) gradients: either way the norm clipped is the global batch's.
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return round(distributed.mean(loss), 4)


def _loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def new_model(config: TrainConfig, tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 of the configured shape (seeded)."""
    if config.seq_len > config.n_positions:
        raise ValueError(f"seq_len {config.seq_len} exceeds n_positions {config.n_positions}, the model's context: lower seq_len or raise n_positions")
    torch.manual_seed(config.seed)
    gpt2 = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(gpt2)


def save(model, tokenizer, config: TrainConfig, result: dict, output_dir: Path) -> dict:
    """The trained model as a Hugging Face directory (safetensors) with ``training.json``; returns the report.

    The report's ``method`` (``scratch``, ``lora``, ``full``) and ``trainable_parameters`` default to training from scratch.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    total = sum(p.numel() for p in model.parameters())
    report = {"config": asdict(config), "method": "scratch", "parameters": total, "trainable_parameters": total, **result}
    (output_dir / "training.json").write_text(json.dumps(report, indent=2))
    return report


def train_from_scratch(
    train_text: str, held_out_text: str, config: TrainConfig, output_dir: Path, progress: bool = True, checkpoint: Path | None = None
) -> dict:
    """Tokenizer + model trained from scratch, saved as a Hugging Face directory (safetensors) with ``training.json``.

    ``held_out_curve`` in the report is ``[step, held-out loss on 16 windows]`` every ``config.eval_every`` steps.
    """
    tokenizer = train_tokenizer(train_text, config.vocab_size)
    model = new_model(config, tokenizer)
    eos = torch.tensor([tokenizer.eos_token_id])
    train_ids = tokenize(tokenizer, train_text)
    held_out_ids = tokenize(tokenizer, held_out_text)
    result = train_lm(model, torch.cat([train_ids, eos]), held_out_ids, config, checkpoint=checkpoint, progress=progress)
    return save(model, tokenizer, config, result, output_dir)


def train_on_dataset(
    dataset_dir: Path, output_dir: Path, config: TrainConfig, base_model: str | None = None, checkpoint: Path | None = None, progress: bool = True
) -> dict:
    """The pipeline's train step: fine-tune ``base_model`` (a model directory; LoRA or full, per ``config.finetune``)
    or train ``config``'s shape from scratch on a prepared dataset (``pipelines.dataset``), on the GPU when there is one.

    The dataset's tokenizer is saved with the model: the base model's own when fine-tuning (``prepare`` took it from there).
    Under torchrun every rank calls this and joins the process group for the run; rank 0 alone merges, saves and
    returns the report, the other ranks return their partial result (no held-out loss) once it is saved.
    """
    from predictor.loading import load_model

    tokenizer, train_ids, held_out_ids = load(dataset_dir)
    with distributed.process_group():  # under torchrun: every rank runs this, rank 0 saves
        if base_model:
            loaded = load_model(base_model, dtype="float32", device="cpu")
            config.seq_len = min(config.seq_len, loaded.max_model_len)
            method = config.finetune
            model = with_lora(loaded.model, config) if method == "lora" else loaded.model
        else:
            model, method = new_model(config, tokenizer), "scratch"
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        # On the GPU when there is one (the pipeline's train step asks for one); FSDP shards a copy onto the devices
        # and leaves the whole model on the CPU.
        sharded = distributed.world_size() > 1 and config.parallelism == "fsdp"
        placed = model if sharded else model.to(distributed.device())
        result = train_lm(placed, train_ids, held_out_ids, config, checkpoint=checkpoint, progress=progress)
        if distributed.is_main():
            if method == "lora":
                model = model.merge_and_unload()  # the adapters become part of the weights: a plain model of the base's architecture
            result.update(base_model=base_model or "none (trained from scratch)", method=method, trainable_parameters=trainable)
            result = save(model.to("cpu"), tokenizer, config, result, output_dir)
        distributed.barrier()  # the other ranks wait for rank 0's model directory
    return result


def largest_module_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layers and their name, found for any family: the model's largest ``nn.ModuleList``, which holds
    neither the embeddings nor the LM head (``("", empty list)`` when there is none)."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()), default=("", nn.ModuleList()))


def lora_targets(model: PreTrainedModel) -> list[str]:
    """Names of the projections (``nn.Linear``, GPT-2's ``Conv1D``) in the decoder layers (``largest_module_list``)."""
    prefix, layers = largest_module_list(model)
    targets = [f"{prefix}.{name}" for name, m in layers.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no linear projections in a list of decoder layers to put LoRA adapters on")
    return targets


def with_lora(model: PreTrainedModel, config: TrainConfig) -> nn.Module:
    """``model`` wrapped by ``peft`` with LoRA adapters on ``lora_targets``: only the adapters are trainable."""
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model)
    conv1d = isinstance(model.get_submodule(targets[0]), Conv1D)  # GPT-2 stores its weights transposed (fan_in, fan_out)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        fan_in_fan_out=conv1d,
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(config.seed)  # the adapters' initialisation
    return get_peft_model(model, lora)


def loss_chart(report: dict, path: Path) -> None:
    """Training loss per step and the held-out loss curve, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(range(1, len(report["train_loss"]) + 1), report["train_loss"], lw=0.8, label="train (per step)")
    if report.get("held_out_curve"):
        steps, losses = zip(*report["held_out_curve"])
        ax.plot(steps, losses, "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
