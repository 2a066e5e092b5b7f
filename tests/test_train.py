"""The pipeline's data and train steps as plain functions: dataset directories, from-scratch training, fine-tuning
a model directory, and a killed run that resumes from its checkpoint to the same weights."""

from __future__ import annotations

import pytest
import torch

from pipelines import train as train_module
from pipelines.corpus import demo_corpus, load_corpus
from pipelines.dataset import load, prepare
from pipelines.train import TrainConfig, train_on_dataset

SMALL = dict(n_layer=1, n_embd=32, n_head=2, n_positions=32, seq_len=32, batch_size=2, steps=10, lr=5e-3, warmup_steps=2, eval_every=5)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("dataset")
    info = prepare(demo_corpus()[:40], out, vocab_size=300)
    return out, info


def test_prepare_writes_tokenizer_splits_and_ids(dataset):
    out, info = dataset
    tokenizer, train_ids, held_ids = load(out)
    assert info["train_tokens"] == len(train_ids) and info["held_out_tokens"] == len(held_ids) > 100
    assert len(tokenizer) == info["vocab_size"] <= 300
    assert (out / "held_out.txt").read_text().strip() and (out / "train.txt").read_text().strip()
    assert tokenizer.decode(held_ids[:50].tolist()) in (out / "held_out.txt").read_text()


def test_train_config_from_a_pipeline_parameter_casts_numbers_and_refuses_unknown_keys():
    config = TrainConfig.from_dict({"steps": 12.0, "lr": 1, "n_layer": 2.0})
    assert (config.steps, config.n_layer, config.lr) == (12, 2, 1.0) and isinstance(config.steps, int)
    with pytest.raises(ValueError, match=r"unknown keys \['layers'\]"):
        TrainConfig.from_dict({"layers": 2})


def test_killed_training_resumes_from_its_checkpoint_to_the_same_weights(dataset, tmp_path, monkeypatch):
    out, _ = dataset
    config = dict(SMALL, checkpoint_every=4)
    straight = train_on_dataset(out, tmp_path / "straight", TrainConfig(**config), progress=False)

    real_step, calls = train_module.optimizer_step, []

    def dies_at_step_7(*args):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt("killed")
        return real_step(*args)

    checkpoint = tmp_path / "ckpt" / "train.pt"
    checkpoint.parent.mkdir()
    monkeypatch.setattr(train_module, "optimizer_step", dies_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train_on_dataset(out, tmp_path / "killed", TrainConfig(**config), checkpoint=checkpoint, progress=False)
    assert torch.load(checkpoint, weights_only=True)["step"] == 4
    monkeypatch.setattr(train_module, "optimizer_step", real_step)
    resumed = train_on_dataset(out, tmp_path / "resumed", TrainConfig(**config), checkpoint=checkpoint, progress=False)
    assert resumed["train_loss"] == straight["train_loss"]
    a = (tmp_path / "straight" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "resumed" / "model.safetensors").read_bytes()
    assert [s for s, _ in resumed["held_out_curve"]] == [5, 10]


def test_fine_tuning_a_model_directory_keeps_its_tokenizer_and_lowers_held_out_loss(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    prepare(demo_corpus()[:30], data, base_model=str(tiny_model_dir))
    tune = dict(SMALL, seq_len=64, batch_size=8)
    before = train_on_dataset(data, tmp_path / "zero", TrainConfig(**dict(tune, steps=1, lr=1e-9)), base_model=str(tiny_model_dir), progress=False)
    tuned = train_on_dataset(data, tmp_path / "tuned", TrainConfig(**dict(tune, steps=30, lr=3e-4)), base_model=str(tiny_model_dir), progress=False)
    assert tuned["base_model"] == str(tiny_model_dir)
    assert tuned["held_out_loss"] < before["held_out_loss"]
    assert (tmp_path / "tuned" / "tokenizer.json").read_text() == (tiny_model_dir / "tokenizer.json").read_text()


def test_corpus_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus not found"):
        load_corpus(str(tmp_path / "nope"))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="corpus is empty"):
        load_corpus(str(tmp_path))
    with pytest.raises(ValueError, match="too small"):
        prepare(["tiny"], tmp_path / "out", vocab_size=300)
