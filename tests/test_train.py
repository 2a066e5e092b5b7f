"""The pipeline's data and train steps as plain functions: dataset directories, from-scratch training, fine-tuning
a model directory (LoRA merged into a plain model, or every weight), and a killed run that resumes from its
checkpoint to the same weights."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import kill_training_at_step
from safetensors.torch import load_file
from test_model_families import FAMILIES, build_model
from transformers import AutoConfig, AutoModelForCausalLM

from pipelines.corpus import demo_corpus, load_corpus
from pipelines.dataset import load, prepare
from pipelines.train import CHECKPOINT_EVERY, TrainConfig, held_out_loss, lora_targets, resolve_config, train_on_dataset, with_lora
from pipelines.training import TrainingInputError, run_training, summary, use_trainjob

SMALL = dict(n_layer=1, n_embd=32, n_head=2, n_positions=32, seq_len=32, batch_size=2, steps=10, lr=5e-3, warmup_steps=2, eval_every=5)


@pytest.fixture(scope="module")
def dataset(small_dataset):
    return small_dataset


def test_prepare_writes_tokenizer_splits_and_ids(dataset):
    out, info = dataset
    tokenizer, train_ids, held_ids = load(out)
    assert info["train_tokens"] == len(train_ids) and info["held_out_tokens"] == len(held_ids) > 100
    assert len(tokenizer) == info["vocab_size"] <= 300
    assert (out / "held_out.txt").read_text().strip() and (out / "train.txt").read_text().strip()
    assert tokenizer.decode(held_ids[:50].tolist()) in (out / "held_out.txt").read_text()


def test_the_demo_models_cache_key_ignores_settings_that_do_not_change_it():
    """Fine-tuning and parallelism settings do not change a model trained from scratch: adding them must not
    orphan the cached demo model (the README's evaluation tables name this directory)."""
    from pipelines.demo_model import DEMO, model_path

    assert model_path(DEMO).name == "demo-model-f0cdd85d09"
    assert model_path(TrainConfig(**{**DEMO.__dict__, "parallelism": "fsdp", "lora_rank": 4})).name == "model-f0cdd85d09"  # same digest


def test_train_config_from_a_pipeline_parameter_casts_numbers_and_refuses_unknown_keys():
    config = TrainConfig.from_dict({"steps": 12.0, "lr": 1, "n_layer": 2.0})
    assert (config.steps, config.n_layer, config.lr) == (12, 2, 1.0) and isinstance(config.steps, int)
    with pytest.raises(ValueError, match=r"unknown keys \['layers'\]"):
        TrainConfig.from_dict({"layers": 2})
    lora = TrainConfig.from_dict({"finetune": "lora", "lora_rank": 4.0, "lora_alpha": 8})
    assert (lora.lora_rank, lora.lora_alpha) == (4, 8.0) and isinstance(lora.lora_rank, int)
    with pytest.raises(ValueError, match="finetune must be one of lora, full"):
        TrainConfig.from_dict({"finetune": "qlora"})


def test_a_run_that_keeps_a_checkpoint_writes_it_every_50_steps_unless_told():
    assert resolve_config({"steps": 5}).checkpoint_every == 0
    assert resolve_config({"steps": 5}, checkpointed=True).checkpoint_every == CHECKPOINT_EVERY == 50
    assert resolve_config({"checkpoint_every": 7}, checkpointed=True).checkpoint_every == 7
    with pytest.raises(ValueError, match="unknown keys"):
        resolve_config({"step": 5}, checkpointed=True)


def test_run_training_writes_the_model_whole_and_keeps_or_removes_its_checkpoint(dataset, tmp_path):
    """What the CLI (``train``) and the pipeline's component both call: a stale ``.partial`` (a run killed while
    saving) is replaced, an empty output directory is taken, and the component's ``keep_checkpoint=False`` removes
    the checkpoint once the model is saved."""
    out, _ = dataset
    config = dict(SMALL, checkpoint_every=4)
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept.partial").mkdir()
    (tmp_path / "kept.partial" / "model.safetensors").write_text("half written")
    kept = run_training(out, tmp_path / "kept", config, checkpoint=tmp_path / "ckpt" / "kept.pt", progress=False)
    assert torch.load(tmp_path / "ckpt" / "kept.pt", weights_only=True)["step"] == 8
    removed = run_training(out, tmp_path / "removed", config, checkpoint=tmp_path / "ckpt" / "removed.pt", keep_checkpoint=False, progress=False)
    assert not (tmp_path / "ckpt" / "removed.pt").exists()
    assert removed["train_loss"] == kept["train_loss"] and summary(removed) == {
        **{key: kept[key] for key in ("steps", "held_out_loss", "held_out_perplexity", "parameters", "trainable_parameters")},
        "final_train_loss": kept["train_loss"][-1],
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "kept", "removed"]
    assert json.loads((tmp_path / "kept" / "training.json").read_text())["steps"] == 10
    for args, argument in (
        ((tmp_path / "nope", tmp_path / "x", config), "dataset"),
        ((out, tmp_path / "kept", config), "output"),
        ((out, tmp_path / "x", config, None, tmp_path / "ckpt"), "checkpoint"),
        ((out, tmp_path / "x", config, str(tmp_path / "no-model")), "base_model"),
    ):
        with pytest.raises(TrainingInputError) as error:
            run_training(*args, progress=False)
        assert error.value.argument == argument
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_the_train_backend_parameter():
    assert [use_trainjob(backend, nodes) for backend, nodes in (("auto", 1), ("auto", 2), ("pod", 4), ("trainjob", 1))] == [False, True, False, True]
    with pytest.raises(ValueError, match="train_backend must be auto, pod or trainjob; got 'k8s'"):
        use_trainjob("k8s", 1)


def test_killed_training_resumes_from_its_checkpoint_to_the_same_weights(dataset, tmp_path, monkeypatch):
    out, _ = dataset
    config = dict(SMALL, checkpoint_every=4)
    straight = train_on_dataset(out, tmp_path / "straight", TrainConfig(**config), progress=False)

    checkpoint = tmp_path / "ckpt" / "train.pt"
    checkpoint.parent.mkdir()
    kill_training_at_step(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        train_on_dataset(out, tmp_path / "killed", TrainConfig(**config), checkpoint=checkpoint, progress=False)
    assert torch.load(checkpoint, weights_only=True)["step"] == 4
    monkeypatch.undo()
    resumed = train_on_dataset(out, tmp_path / "resumed", TrainConfig(**config), checkpoint=checkpoint, progress=False)
    assert resumed["train_loss"] == straight["train_loss"]
    a = (tmp_path / "straight" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "resumed" / "model.safetensors").read_bytes()
    assert [s for s, _ in resumed["held_out_curve"]] == [5, 10]


def test_fine_tuning_a_model_directory_keeps_its_tokenizer_and_lowers_held_out_loss(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    prepare(demo_corpus()[:30], data, base_model=str(tiny_model_dir))
    tune = dict(SMALL, seq_len=64, batch_size=8, finetune="full")
    before = train_on_dataset(data, tmp_path / "zero", TrainConfig(**dict(tune, steps=1, lr=1e-9)), base_model=str(tiny_model_dir), progress=False)
    tuned = train_on_dataset(data, tmp_path / "tuned", TrainConfig(**dict(tune, steps=30, lr=3e-4)), base_model=str(tiny_model_dir), progress=False)
    assert tuned["base_model"] == str(tiny_model_dir) and tuned["method"] == "full"
    assert tuned["trainable_parameters"] == tuned["parameters"]
    assert tuned["held_out_loss"] < before["held_out_loss"]
    assert (tmp_path / "tuned" / "tokenizer.json").read_text() == (tiny_model_dir / "tokenizer.json").read_text()


@pytest.fixture(scope="module")
def tiny_llama_dir(tiny_model_dir, tmp_path_factory):
    """A 2-layer random-weight Llama with the tiny GPT-2's tokenizer saved next to it."""
    return build_model("llama", tmp_path_factory.mktemp("tiny-llama"), tiny_model_dir)


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_lora_targets_the_decoder_layers_projections_of_every_family(kind):
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, vocab_size=64, **FAMILIES[kind]))
    names = lora_targets(model)
    assert len({re.sub(r"\.\d+\..*", "", name) for name in names}) == 1, names  # all in the one list of decoder layers
    assert model.get_output_embeddings() not in [model.get_submodule(name) for name in names]
    wrapped = with_lora(model, TrainConfig(lora_rank=2))
    assert {n for n, p in wrapped.named_parameters() if p.requires_grad} == {f"base_model.model.{t}.lora_{ab}.default.weight" for t in names for ab in "AB"}


@pytest.mark.parametrize(
    "family, projections",
    [("gpt2", {"c_attn", "c_proj", "c_fc"}), ("llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})],
)
def test_lora_fine_tuning_trains_adapters_only_and_saves_a_plain_merged_model(family, projections, request, tmp_path):
    base_dir = request.getfixturevalue("tiny_model_dir" if family == "gpt2" else "tiny_llama_dir")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    assert {name.rsplit(".", 1)[1] for name in lora_targets(base)} == projections  # attention and MLP, no LM head or embeddings
    data = tmp_path / "data"
    prepare(demo_corpus()[:30], data, base_model=str(base_dir))
    config = TrainConfig(**dict(SMALL, seq_len=64, batch_size=8, steps=20, lr=1e-2, warmup_steps=2, lora_rank=2))
    report = train_on_dataset(data, tmp_path / "tuned", config, base_model=str(base_dir), progress=False)

    assert report["method"] == "lora" and report["config"]["lora_rank"] == 2
    assert 0 < report["trainable_parameters"] < 0.1 * report["parameters"]
    assert report["parameters"] == sum(p.numel() for p in base.parameters())
    _, _, held_out_ids = load(data)
    assert report["held_out_loss"] < held_out_loss(base, held_out_ids, config.seq_len)

    tuned_dir = tmp_path / "tuned"
    assert not [p.name for p in tuned_dir.iterdir() if "adapter" in p.name]
    assert (tuned_dir / "tokenizer.json").read_text() == (base_dir / "tokenizer.json").read_text()
    assert set(load_file(tuned_dir / "model.safetensors")) == set(load_file(base_dir / "model.safetensors"))  # no lora_A/B, no base_layer
    assert json.loads((tuned_dir / "config.json").read_text()) == json.loads((base_dir / "config.json").read_text())
    tuned = AutoModelForCausalLM.from_pretrained(tuned_dir)
    assert type(tuned) is type(base)
    base_weights = base.state_dict()
    changed = {name for name, weight in tuned.state_dict().items() if not torch.equal(weight, base_weights[name])}
    assert changed and {name.rsplit(".", 2)[1] for name in changed} == projections  # merged into exactly the adapted projections


def test_corpus_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus not found"):
        load_corpus(str(tmp_path / "nope"))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="corpus is empty"):
        load_corpus(str(tmp_path))
    with pytest.raises(ValueError, match="too small"):
        prepare(["tiny"], tmp_path / "out", vocab_size=300)
