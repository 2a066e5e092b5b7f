"""prune, distill and int8 on every decoder family the predictor batches: tiny random-weight models.

The pruned and distilled models are standard configs of their family that load with plain transformers,
and their logits equal the original model's with the same pieces removed: each dropped layer's output
projections zeroed (a residual layer whose outputs are zero is skipped), each removed MLP neuron's and
query head's output columns zeroed. A few results are served by the real predictor.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import start_server, stop_server
from test_model_families import build_model as build_family_model
from test_model_families import complete, reference, token_prompts
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from pipelines.__main__ import main as cli
from pipelines.corpus import demo_corpus
from pipelines.optimize import OptimizationError, optimize
from predictor import quantized

LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
FUSED_QKV = {"gpt2", "phi3", "gpt_neox"}  # no separate q/k/v/o: no KV-group pruning
OUTPUT_PROJECTIONS = {  # per layer: the attention's and the MLP's projection back into the residual stream
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"),
}
FAST = dict(calibration_windows=2)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("optimize-families")


@pytest.fixture(scope="module")
def distill_options(root) -> dict:
    """One short step on the first 20,000 characters of the demo corpus (its held-out tail is what distill evaluates)."""
    text = root / "corpus.txt"
    text.write_text("\n\n".join(demo_corpus())[:20_000])
    return dict(steps=1, batch_size=2, seq_len=32, progress=False, text=str(text))


@pytest.fixture(scope="module")
def build(root, tiny_model_dir):
    """``build(kind, **overrides)``: a 3-layer random-weight model of ``kind`` (cached per name)."""

    def make(kind: str, name: str | None = None, **overrides) -> Path:
        depth = {"n_layer": 3} if kind == "gpt2" else {"num_hidden_layers": 3}
        if kind == "gemma3_text":
            depth["layer_types"] = LAYER_TYPES
        return build_family_model(kind, root / (name or kind), tiny_model_dir, **{**depth, **overrides})

    return make


def layers(model) -> torch.nn.ModuleList:
    return getattr(model.base_model, "layers", None) or model.base_model.h


def out_by_in(module: torch.nn.Module) -> torch.Tensor:
    """A projection's weight as (out, in), whatever its storage."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def kept_inputs(original: torch.nn.Module, pruned: torch.nn.Module) -> torch.Tensor:
    """The original input channels whose weight columns the pruned projection kept."""
    same = (out_by_in(pruned).T[:, None, :] == out_by_in(original).T[None, :, :]).all(dim=-1)  # (pruned in, original in)
    assert (same.sum(dim=1) == 1).all(), "every pruned column is exactly one column of the original"
    return same.int().argmax(dim=1)


@torch.no_grad()
def with_pieces_removed(kind: str, original, pruned, kept_layers: list[int]):
    """``original`` with every output projection of a dropped layer zeroed, and every input column its pruned
    counterpart no longer has zeroed."""
    names = OUTPUT_PROJECTIONS.get(kind, ("self_attn.o_proj", "mlp.down_proj"))
    for i, layer in enumerate(layers(original)):
        for name in names:
            module = layer.get_submodule(name)
            if i not in kept_layers:
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
                continue
            removed = torch.ones(out_by_in(module).shape[1], dtype=torch.bool)
            removed[kept_inputs(module, layers(pruned)[kept_layers.index(i)].get_submodule(name))] = False
            out_by_in(module)[:, removed] = 0.0
    return original


def assert_same_logits(a, b) -> None:
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 11, 300]])
    with torch.no_grad():
        x, y = a(input_ids=ids).logits, b(input_ids=ids).logits
    torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4 * y.abs().max().item())


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt_neox"])
def test_pruned_model_equals_the_original_with_the_pieces_removed(kind, build, root):
    source, out = build(kind), root / f"{kind}-pruned"
    kv_heads_keep = 1.0 if kind in FUSED_QKV else 0.5
    report = optimize("prune", source, out, mlp_keep=0.5, drop_layers=1, kv_heads_keep=kv_heads_keep, **FAST)
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers
    before, after = original.config, pruned.config
    kept = [i for i in range(3) if i not in report["dropped_layers"]]
    assert after.model_type == before.model_type and after.num_hidden_layers == len(kept) == 2
    assert report["n_inner_after"] == report["n_inner_before"] // 2 == (after.n_inner if kind == "gpt2" else after.intermediate_size)
    if getattr(before, "layer_types", None) is not None:
        assert after.layer_types == [before.layer_types[i] for i in kept]
    if kind not in FUSED_QKV:
        assert (after.num_attention_heads, after.num_key_value_heads, after.head_dim) == (2, 1, 16)
        assert report["kv_heads_before"] == 2 and report["kv_heads_after"] == 1
    assert sum(p.numel() for p in pruned.parameters()) == report["parameters_after"] < report["parameters_before"]
    assert_same_logits(pruned, with_pieces_removed(kind, original, pruned, kept))


@torch.no_grad()
def with_dead_pieces(kind: str, source: Path, path: Path) -> Path:
    """``source`` with half of every layer's MLP neurons and, where there are KV groups, group 0's query heads
    contributing nothing (zero output columns): what pruning must remove first."""
    model = AutoModelForCausalLM.from_pretrained(source)
    attention_out, mlp_out = OUTPUT_PROJECTIONS.get(kind, ("self_attn.o_proj", "mlp.down_proj"))
    for layer in layers(model):
        out_by_in(layer.get_submodule(mlp_out))[:, 1::2] = 0.0
        if kind not in FUSED_QKV:
            out_by_in(layer.get_submodule(attention_out))[:, :32] = 0.0  # query heads 0, 1 (head_dim 16): KV group 0
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(source).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_pruning_removes_the_neurons_and_heads_that_contribute_nothing(kind, build, root):
    source = with_dead_pieces(kind, build(kind), root / f"{kind}-dead")
    kv_heads_keep = 1.0 if kind in FUSED_QKV else 0.5
    optimize("prune", source, root / f"{kind}-dead-pruned", mlp_keep=0.5, kv_heads_keep=kv_heads_keep, **FAST)
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    pruned = AutoModelForCausalLM.from_pretrained(root / f"{kind}-dead-pruned").eval()
    assert_same_logits(pruned, original)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2", "gemma3_text"])
def test_distilled_student_starts_as_the_teacher_with_evenly_spaced_layers(kind, build, root, distill_options):
    """With a zero learning rate the student is saved as initialised: layers 0 and 2 of 3 (first and last)."""
    source, out = build(kind), root / f"{kind}-distilled"
    report = optimize("distill", source, out, student_layers=2, lr=0.0, **distill_options)
    teacher = AutoModelForCausalLM.from_pretrained(source).eval()
    student = AutoModelForCausalLM.from_pretrained(out).eval()
    assert student.config.model_type == teacher.config.model_type and student.config.num_hidden_layers == 2
    assert report["teacher_layers"] == 3 and report["student_layers"] == 2
    if getattr(teacher.config, "layer_types", None) is not None:
        assert student.config.layer_types == [teacher.config.layer_types[0], teacher.config.layer_types[2]]
    assert_same_logits(student, with_pieces_removed(kind, teacher, student, [0, 2]))


def test_distill_into_a_student_of_another_family_and_prune_with_recovery(build, root, distill_options):
    student = build("qwen2", "qwen2-1-layer", num_hidden_layers=1)
    report = optimize("distill", build("gemma3_text"), root / "gemma3-into-qwen2", student=str(student), **{**distill_options, "steps": 2})
    assert AutoModelForCausalLM.from_pretrained(root / "gemma3-into-qwen2").config.model_type == "qwen2"
    assert len(report["train_loss"]) == 2 and report["student_layers"] == 1
    out = root / "llama-recovered"
    report = optimize("prune", build("llama"), out, mlp_keep=0.5, drop_layers=1, kv_heads_keep=0.5, recover_steps=2, text=distill_options["text"], **FAST)
    recovered = AutoModelForCausalLM.from_pretrained(out).config
    assert report["recovery"]["steps"] == 2 and report["recovery"]["student_layers"] == 2
    assert (recovered.num_hidden_layers, recovered.intermediate_size, recovered.num_key_value_heads) == (2, 64, 1)


@pytest.mark.parametrize("kind, overrides", [("llama", {"tie_word_embeddings": True}), ("qwen2", {}), ("gemma3_text", {})])
def test_int8_covers_every_projection_but_the_head(kind, overrides, build, root):
    source, out = build(kind, f"{kind}-int8-source", **overrides), root / f"{kind}-int8"
    report = optimize("int8", source, out)
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    assert json.loads((out / "quantization.json").read_text())["modules"] == [n for n in quantized.projection_names(original) if n != "lm_head"]
    assert report["quantized_modules"] == report["projection_modules"] == 7 * 3  # 7 per layer; the LM head stays float
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is original.config.tie_word_embeddings
    model = quantized.load(out)
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        ref, q = original(input_ids=ids).logits, model(input_ids=ids).logits
    assert (ref - q).abs().max() < 0.15 * ref.abs().max()  # close, not equal


@pytest.mark.parametrize("variant", ["qwen2-pruned", "gemma3_text-pruned", "gemma3_text-int8"])
def test_predictor_serves_the_result(variant, build, tmp_path):
    """Greedy completions through the OpenAI SDK equal ``generate`` on the same weights. A few cases only, as
    each server start costs seconds; distilled models are saved as pruned ones are."""
    kind, method = variant.rsplit("-", 1)
    out = tmp_path / variant
    if method == "pruned":
        optimize("prune", build(kind), out, mlp_keep=0.5, drop_layers=1, kv_heads_keep=0.5, **FAST)
    else:
        optimize("int8", build(kind), out)
    prompts = token_prompts(AutoTokenizer.from_pretrained(out).vocab_size)[:4]
    server = start_server(out, tmp_path, "--max_num_seqs", "4", name="m")
    try:
        assert "model runner: PagedRunner" in server.read_log()
        served = complete(server.url, prompts, max_tokens=8, together=True)
        if method == "int8":  # int8 logits differ slightly from the float model's: served, not compared
            assert all(served)
        else:
            assert served == reference(out, prompts, max_tokens=8)
    finally:
        stop_server(server)


def refused(method: str, source: Path, out: Path, match: str, **options) -> None:
    with pytest.raises(OptimizationError, match=match):
        optimize(method, source, out, **options)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "a temporary directory was left"


def test_bad_input_is_an_error_naming_the_parameter(build, tmp_path, tiny_model_dir, distill_options, capsys):
    llama, out = build("llama"), tmp_path / "out"
    refused("prune", llama, out, "--drop-layers", drop_layers=3)
    refused("prune", llama, out, "--mlp-keep", mlp_keep=0.0)
    refused("prune", llama, out, "--mlp-keep", mlp_keep=1.5)
    refused("prune", llama, out, "--kv-heads-keep", kv_heads_keep=0.0)
    refused("prune", llama, out, "--kv-heads-keep .* leaves none", kv_heads_keep=0.2)  # round(2 × 0.2) = 0 groups
    refused("prune", build("gpt2"), out, "--kv-heads-keep: gpt2 .*fused.*c_attn", kv_heads_keep=0.5)
    refused("prune", build("phi3"), out, "--kv-heads-keep: phi3 .*fused.*qkv_proj", kv_heads_keep=0.5)
    refused("prune", build("opt"), out, "model_type 'opt'")
    refused("distill", llama, out, "--student-layers", student_layers=3, **distill_options)
    refused("distill", llama, out, "--student-layers", student_layers=0, **distill_options)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens(["<other>"])
    tokenizer.save_pretrained(tmp_path / "other-tokenizer")
    other = build_family_model("llama", tmp_path / "other", tmp_path / "other-tokenizer", num_hidden_layers=1)
    refused("distill", llama, out, "--student .*tokenizer differs", student=str(other), **distill_options)
    with pytest.raises(SystemExit) as exit_info:  # the CLI flag reaches prune, and its error is a usage error
        cli(["optimize", "--method", "prune", "--input", str(llama), "--output", str(out), "--kv-heads-keep", "0"])
    assert exit_info.value.code == 2 and "--kv-heads-keep must be in (0, 1]" in capsys.readouterr().err
    assert not out.exists()
