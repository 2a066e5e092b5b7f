"""Knowledge distillation: train a smaller student on the teacher's softened next-token distribution.

loss = alpha · KL(softmax(teacher / T) ‖ softmax(student / T)) · T² + (1 − alpha) · cross-entropy(labels)

The T² keeps the soft term's gradients on the scale of the hard one (Hinton et al., 2015). The student
is either the teacher with fewer decoder layers, initialised from evenly spaced teacher layers (as
DistilBERT and DistilGPT2 were; any family ``decoder`` knows), or any given model of the same tokenizer
(any family), e.g. a pruned one whose quality to recover.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from predictor.loading import LoadedModel, ModelLoadError, load_model

from ..corpus import demo_corpus, read_corpus, split_documents
from ..tokenizer import tokenize
from ..train import batches, held_out_loss, optimizer_step
from . import OptimizationError, copy_tokenizer
from .decoder import keep_layers


def student_from_teacher(teacher: PreTrainedModel, n_layers: int) -> PreTrainedModel:
    """A copy of ``teacher`` keeping ``n_layers`` evenly spaced decoder layers (first and last included)."""
    n = teacher.config.num_hidden_layers
    keep = sorted({round(i * (n - 1) / max(1, n_layers - 1)) for i in range(n_layers)}) if n_layers > 1 else [0]
    return keep_layers(teacher, keep)


def load_student(student: str, loaded: LoadedModel) -> PreTrainedModel:
    """The ``--student`` model, refused unless it shares the teacher's tokenizer and is not deeper than it."""
    try:
        student_loaded = load_model(student, dtype="float32", device="cpu")
    except ModelLoadError as exc:
        raise OptimizationError(f"--student: {exc}") from None
    model, teacher = student_loaded.model, loaded.model
    if student_loaded.tokenizer.get_vocab() != loaded.tokenizer.get_vocab():
        raise OptimizationError(f"--student {student}: its tokenizer differs from the teacher's; distillation compares next-token distributions token by token")
    if model.config.vocab_size != teacher.config.vocab_size:
        raise OptimizationError(f"--student {student}: its vocabulary size {model.config.vocab_size} differs from the teacher's {teacher.config.vocab_size}")
    if model.config.num_hidden_layers > teacher.config.num_hidden_layers:
        raise OptimizationError(
            f"--student {student}: it has {model.config.num_hidden_layers} layers, more than the teacher's {teacher.config.num_hidden_layers}"
        )
    return model


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float, alpha: float) -> torch.Tensor:
    """logits: (N, V); labels: (N,)."""
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    hard = F.cross_entropy(student_logits, labels)
    return alpha * soft * temperature**2 + (1.0 - alpha) * hard


def distill(
    loaded: LoadedModel,
    output_dir: Path,
    student_layers: int | None = None,
    student: str | None = None,
    steps: int = 300,
    batch_size: int = 16,
    seq_len: int = 128,
    lr: float = 1e-3,
    temperature: float = 2.0,
    alpha: float = 0.5,
    text: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    teacher = loaded.model
    n_teacher = teacher.config.num_hidden_layers
    if student is not None:
        student_model = load_student(student, loaded)
    else:
        if student_layers is None:
            student_layers = max(1, n_teacher // 2)
        if not 1 <= student_layers < n_teacher:
            raise OptimizationError(f"--student-layers must be between 1 and {n_teacher - 1} (the teacher has {n_teacher}); got {student_layers}")
        student_model = student_from_teacher(teacher, student_layers)
    if steps < 1 or not 0.0 <= alpha <= 1.0 or temperature <= 0:
        raise OptimizationError("need --steps ≥ 1, 0 ≤ --alpha ≤ 1 and --temperature > 0")
    seq_len = min(seq_len, loaded.max_model_len)
    documents = read_corpus(text) if text else demo_corpus()
    train_text, held_out_text = split_documents(documents)
    train_ids, held_ids = tokenize(loaded.tokenizer, train_text), tokenize(loaded.tokenizer, held_out_text)
    if len(train_ids) <= seq_len + 1:
        raise OptimizationError(f"training text has {len(train_ids)} tokens; need more than {seq_len + 1}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    teacher.eval()
    student_model.train()
    optimizer = torch.optim.AdamW(student_model.parameters(), lr=lr, weight_decay=0.01)
    teacher_loss = held_out_loss(teacher, held_ids, seq_len)
    loss_before = held_out_loss(student_model, held_ids, seq_len)
    student_model.train()
    losses = []
    bar = tqdm(range(steps), desc="distill", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        batch = batches(train_ids, seq_len, batch_size, generator)
        inputs, labels = batch[:, :-1], batch[:, 1:]
        with torch.no_grad():
            teacher_logits = teacher(input_ids=inputs).logits.flatten(0, 1)
        student_logits = student_model(input_ids=inputs).logits.flatten(0, 1)
        loss = distill_loss(student_logits, teacher_logits, labels.flatten(), temperature, alpha)
        losses.append(optimizer_step(student_model, optimizer, loss))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    student_model.eval()
    loss_after = held_out_loss(student_model, held_ids, seq_len)
    student_model.save_pretrained(output_dir, safe_serialization=True)
    copy_tokenizer(loaded, output_dir)
    return {
        "teacher_layers": n_teacher,
        "student_layers": student_model.config.num_hidden_layers,
        "steps": steps,
        "temperature": temperature,
        "alpha": alpha,
        "teacher_held_out_perplexity": round(math.exp(teacher_loss), 3),
        "student_held_out_perplexity_before": round(math.exp(loss_before), 3),
        "student_held_out_perplexity_after": round(math.exp(loss_after), 3),
        "train_loss": losses,
    }
