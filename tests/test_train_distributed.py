"""The train step under torchrun: two CPU processes (gloo) with DDP or FSDP train on the same global batch as one
process does, so their loss curve and weights match one process's; checkpoints resume across world sizes and
parallelisms; a batch that does not split over the ranks is refused by name.

Every torchrun launch starts two Python processes (about 6 s on 2 cores): the tests share a few launches.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO, kill_training_at_step
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pipelines.__main__ import main
from pipelines.distributed import rows_per_rank
from pipelines.train import TrainConfig, train_on_dataset
from predictor.launch import free_port

TINY = dict(n_layer=2, n_embd=64, n_head=2, n_positions=32, seq_len=32, batch_size=4, steps=6, lr=5e-3, warmup_steps=2, eval_every=3, checkpoint_every=3)
# Losses are rounded to 4 decimals. Measured (torch 2.13, CPU): the 2-process DDP and FSDP loss curves, resumed ones
# included, equal one process's exactly (max difference 0); the final held-out loss differs by at most 1.2e-7.
# The tolerance allows one rounding step (1e-4) to flip, as the gradients are summed in another order.
LOSS_TOL = 1.5e-4
# Measured: the saved weights differ from one process's by at most 1.4e-5 (DDP 1.4e-5, FSDP 1.2e-5, resumed 1.2e-5):
# Adam's normalised steps carry the summation-order differences over. The tolerance is ~7x that.
WEIGHT_TOL = 1e-4

# torchrun runs this instead of `-m pipelines` for a run killed at its 5th step, after the checkpoint of step 3:
# conftest.kill_training_at_step's approach (optimizer_step raises), in every rank's process.
KILLED = textwrap.dedent(
    """
    import sys

    from pipelines import train
    from pipelines.__main__ import main

    real_step, calls = train.optimizer_step, []

    def dies_at_step_5(*args):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("killed")
        return real_step(*args)

    train.optimizer_step = dies_at_step_5
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.fixture(scope="module")
def dataset(small_dataset):
    return small_dataset[0]


@pytest.fixture(scope="module")
def single(dataset, tmp_path_factory):
    """One process, the same global batch: the reference run (report, model directory)."""
    out = tmp_path_factory.mktemp("single") / "model"
    return train_on_dataset(dataset, out, TrainConfig(**TINY), progress=False), out


def torchrun(*args: str, script: str | None = None, check: bool = True, **config) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m pipelines train ...`` (or ``script``), on the CPU with one thread per process."""
    target = [script] if script else ["-m", "pipelines"]
    launcher = [sys.executable, "-m", "torch.distributed.run"]  # the torchrun command
    command = [*launcher, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *target, "train", "--quiet", *args]
    command += ["--train-config", json.dumps(dict(TINY, **config))]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_matches_one_process(report: dict, model_dir, single) -> None:
    reference, reference_dir = single
    assert len(report["train_loss"]) == len(reference["train_loss"]) == TINY["steps"]
    assert max(abs(a - b) for a, b in zip(report["train_loss"], reference["train_loss"])) <= LOSS_TOL
    assert [s for s, _ in report["held_out_curve"]] == [s for s, _ in reference["held_out_curve"]] == [3, 6]
    assert max(abs(a[1] - b[1]) for a, b in zip(report["held_out_curve"], reference["held_out_curve"])) <= LOSS_TOL
    assert report["held_out_loss"] == pytest.approx(reference["held_out_loss"], abs=LOSS_TOL)
    weights, expected = load_file(model_dir / "model.safetensors"), load_file(reference_dir / "model.safetensors")
    assert set(weights) == set(expected)  # the plain model: no DDP "module." prefix, no FSDP wrapper
    assert max((weights[name] - expected[name]).abs().max().item() for name in expected) <= WEIGHT_TOL


def test_ddp_on_two_processes_matches_one_process_and_rank_0_writes_a_plain_checkpoint(dataset, single, tmp_path):
    checkpoint = tmp_path / "ddp.pt"
    proc = torchrun("--dataset", str(dataset), "--output", str(tmp_path / "ddp"), "--checkpoint", str(checkpoint))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # one line, from rank 0 only
    assert proc.stdout.count('"world_size"') == 1 and summary["world_size"] == 2 and summary["steps"] == TINY["steps"]
    assert_matches_one_process(json.loads((tmp_path / "ddp" / "training.json").read_text()), tmp_path / "ddp", single)
    state = torch.load(checkpoint, weights_only=True)
    assert state["step"] == 6 and set(state["model"]) == set(AutoModelForCausalLM.from_pretrained(single[1]).state_dict())  # no "module." prefix


def test_killed_fsdp_run_resumes_under_fsdp_and_in_one_process(dataset, single, tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    checkpoint = tmp_path / "fsdp.pt"
    killed = torchrun(
        "--dataset", str(dataset), "--output", str(tmp_path / "killed"), "--checkpoint", str(checkpoint), script=str(script), check=False, parallelism="fsdp"
    )
    assert killed.returncode != 0 and "killed" in killed.stdout + killed.stderr
    assert torch.load(checkpoint, weights_only=True)["step"] == 3 and not (tmp_path / "killed").exists()
    shutil.copy(checkpoint, tmp_path / "copy.pt")

    torchrun("--dataset", str(dataset), "--output", str(tmp_path / "fsdp"), "--checkpoint", str(checkpoint), parallelism="fsdp")
    assert_matches_one_process(json.loads((tmp_path / "fsdp" / "training.json").read_text()), tmp_path / "fsdp", single)

    resumed = train_on_dataset(dataset, tmp_path / "one", TrainConfig(**TINY), checkpoint=tmp_path / "copy.pt", progress=False)
    assert_matches_one_process(resumed, tmp_path / "one", single)


def test_a_one_process_checkpoint_resumes_under_ddp(dataset, single, tmp_path, monkeypatch):
    checkpoint = tmp_path / "one.pt"
    kill_training_at_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        train_on_dataset(dataset, tmp_path / "killed", TrainConfig(**TINY), checkpoint=checkpoint, progress=False)
    monkeypatch.undo()
    assert torch.load(checkpoint, weights_only=True)["step"] == 3
    torchrun("--dataset", str(dataset), "--output", str(tmp_path / "ddp"), "--checkpoint", str(checkpoint))
    assert_matches_one_process(json.loads((tmp_path / "ddp" / "training.json").read_text()), tmp_path / "ddp", single)


def test_a_batch_that_does_not_split_over_the_ranks_is_refused_by_name(dataset, tmp_path):
    assert rows_per_rank(8, 2) == 4 and rows_per_rank(3, 1) == 3
    with pytest.raises(ValueError, match="batch_size 6 .* not divisible by the world size 4"):
        rows_per_rank(6, 4)
    proc = torchrun("--dataset", str(dataset), "--output", str(tmp_path / "out"), check=False, batch_size=3)
    assert proc.returncode != 0
    assert "batch_size 3 (the global batch) is not divisible by the world size 2" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_train_command_errors_name_the_argument(dataset, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--dataset", str(tmp_path / "nope"), "--output", str(tmp_path / "out")])
    assert "--dataset" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(SystemExit):
        main(["train", "--dataset", str(dataset), "--output", str(tmp_path / "taken")])
    assert "already exists and is not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--dataset", str(dataset), "--output", str(tmp_path / "out"), "--train-config", '{"parallelism": "tp"}'])
    assert "parallelism must be one of ddp, fsdp" in capsys.readouterr().err
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    for args, message in (
        (["--checkpoint", str(tmp_path)], "--checkpoint: .* is a directory"),
        (["--checkpoint", str(tmp_path / "bad.pt")], "checkpoint .*bad.pt cannot resume this run"),
        (["--base-model", str(tmp_path / "missing")], "--base-model: "),
        (["--train-config", '{"seq_len": 512, "n_positions": 64}'], "seq_len 512 exceeds n_positions 64"),
    ):
        with pytest.raises(SystemExit):
            main(["train", "--dataset", str(dataset), "--output", str(tmp_path / "out"), "--quiet", *args])
        assert re.search(message, capsys.readouterr().err), args
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_train_command_writes_its_output_whole_over_a_run_killed_while_saving(dataset, tmp_path, capsys):
    """A TrainJob re-created after a kill mid-save finds a half-written ``.partial`` beside an empty --output."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "model.safetensors").write_text("half written")
    assert main(["train", "--dataset", str(dataset), "--output", str(tmp_path / "out"), "--quiet", "--train-config", json.dumps(dict(TINY, steps=2))]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["steps"] == 2
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out") is not None and not (tmp_path / "out.partial").exists()
