"""The train step, the same for every caller: ``run_training`` checks its arguments, resolves the train config,
trains on a prepared dataset (in this process, data-parallel under torchrun, or on a Kubeflow Trainer TrainJob) and
writes the model directory whole.

    report = run_training(Path("data"), Path("model"), {"steps": 300}, checkpoint=Path("ckpt/train.pt"))

Its callers:

* ``python -m pipelines train`` (``pipelines.__main__``), which is also the command of every pod of a TrainJob;
* the pipeline's ``train_model`` component (``pipelines.components``): it picks the backend (``use_trainjob``) and
  passes ``trainjob`` settings to train on a TrainJob (``pipelines.trainjob``), whose pods run the CLI above, so this
  function trains there too;
* ``pipelines.trainjob`` renders the job's config with the same ``resolve_config`` (``pipelines.train``).

The model directory is written beside ``output_dir`` (``OUTPUT.partial``) and renamed into place by rank 0 when
complete: a run killed while saving leaves no half-written output, so a re-created TrainJob (resuming from its
checkpoint) or a retried step can write it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .train import resolve_config, train_on_dataset
from .trainjob import TrainJobSettings, train_with_trainjob

BACKENDS = ("auto", "pod", "trainjob")
# The report's headline numbers: what ``train`` prints and the component logs as metrics (with ``final_train_loss``).
SUMMARY = ("steps", "held_out_loss", "held_out_perplexity", "parameters", "trainable_parameters")


class TrainingInputError(ValueError):
    """An argument the train step cannot use; ``argument`` names it: ``dataset``, ``output``, ``checkpoint`` or ``base_model``."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(message)
        self.argument = argument


def use_trainjob(backend: str, nodes: int) -> bool:
    """Whether the ``train_backend`` pipeline parameter means a TrainJob: ``trainjob``, or ``auto`` on more than one node."""
    if backend not in BACKENDS:
        raise ValueError(f"train_backend must be auto, pod or trainjob; got {backend!r}")
    return backend == "trainjob" or (backend == "auto" and nodes > 1)


def check_arguments(dataset_dir: Path, output_dir: Path, checkpoint: Path | None) -> None:
    """A prepared dataset, an output that does not exist or is empty, a checkpoint file whose directory can be made."""
    if not (dataset_dir / "ids.safetensors").is_file():
        raise TrainingInputError("dataset", f"{dataset_dir} is not a prepared dataset directory (no ids.safetensors)")
    if output_dir.is_file() or (output_dir.is_dir() and any(output_dir.iterdir())):
        raise TrainingInputError("output", f"{output_dir} already exists and is not empty")
    if checkpoint is not None:
        if checkpoint.is_dir():
            raise TrainingInputError("checkpoint", f"{checkpoint} is a directory; give the checkpoint file's path")
        try:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrainingInputError("checkpoint", f"cannot create {checkpoint.parent}: {exc.strerror}") from None


def run_training(
    dataset_dir: Path,
    output_dir: Path,
    train_config: dict,
    base_model: str | None = None,
    checkpoint: Path | None = None,
    keep_checkpoint: bool = True,
    progress: bool = True,
    trainjob: TrainJobSettings | None = None,
    run_id: str = "",
    timeout_s: float = 86_400,
) -> dict:
    """Train on the prepared dataset ``dataset_dir`` into the model directory ``output_dir``; returns ``training.json``'s report.

    ``train_config`` holds ``TrainConfig`` fields (``resolve_config``); ``base_model``, a model directory, is fine-tuned
    (LoRA unless ``finetune`` says ``full``) instead of training from scratch. With ``checkpoint`` a file, a run resumes
    from it when it exists and writes it every ``checkpoint_every`` steps (50 by default); ``keep_checkpoint`` False
    removes it once the model is saved. Under torchrun every rank calls this; rank 0 writes the model and returns the
    full report.

    With ``trainjob`` settings the training runs on a Kubeflow Trainer TrainJob of that size instead (identified by
    ``run_id``, waited on for ``timeout_s``), which checkpoints on the workspace volume: ``checkpoint`` is not used.

    Raises :class:`TrainingInputError` naming a bad argument, ``ValueError`` for a bad config.
    """
    dataset_dir, output_dir = Path(dataset_dir), Path(output_dir).resolve()  # "." has no name to put ".partial" beside
    check_arguments(dataset_dir, output_dir, None if trainjob else checkpoint)
    config = resolve_config(train_config, checkpointed=trainjob is not None or checkpoint is not None)
    if trainjob is not None:
        return train_with_trainjob(dataset_dir, output_dir, trainjob, run_id, train_config, base_model or "", timeout_s=timeout_s)
    from predictor.loading import ModelLoadError

    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 saves
    partial = output_dir.with_name(output_dir.name + ".partial")
    if main_rank:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while saving
    try:
        report = train_on_dataset(dataset_dir, partial, config, base_model or None, checkpoint, progress)
    except ModelLoadError as exc:
        raise TrainingInputError("base_model", str(exc)) from None
    if main_rank:
        if output_dir.is_dir():
            output_dir.rmdir()  # empty (checked above)
        partial.replace(output_dir)
        if checkpoint is not None and not keep_checkpoint:
            checkpoint.unlink(missing_ok=True)  # the model is saved: the checkpoint only served retries
    return report


def summary(report: dict) -> dict:
    """The headline numbers of a train report: ``SUMMARY`` and the last step's loss, ``final_train_loss``."""
    return {**{key: report[key] for key in SUMMARY}, "final_train_loss": report["train_loss"][-1]}
