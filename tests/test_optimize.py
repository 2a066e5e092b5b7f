"""The optimization toolkit on the tiny model: every method makes a directory that loads and is served, and the
evaluator's numbers are the ones computed directly."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from conftest import MODEL_NAME, REPO, start_server, stop_server
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from pipelines.evaluate import evaluate
from pipelines.optimize import OptimizationError, optimize
from predictor import quantized


@pytest.fixture(scope="module")
def variants(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    out = {}
    optimize("int8", tiny_model_dir, root / "int8")
    optimize("prune", tiny_model_dir, root / "prune", mlp_keep=0.5, drop_layers=1)
    optimize("distill", tiny_model_dir, root / "distill", student_layers=1, steps=5, batch_size=2, seq_len=32, progress=False)
    optimize("onnx", tiny_model_dir, root / "onnx")
    optimize("onnx-int8", tiny_model_dir, root / "onnx-int8")
    for name in ("int8", "prune", "distill", "onnx", "onnx-int8"):
        out[name] = root / name
    return out


def test_int8_quantizes_every_projection(tiny_model_dir, variants):
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = quantized.projection_names(original)
    report = json.loads((variants["int8"] / "optimization.json").read_text())
    manifest = json.loads((variants["int8"] / "quantization.json").read_text())
    assert manifest["modules"] == expected and report["quantized_modules"] == len(expected) == report["projection_modules"]
    assert any("c_attn" in n for n in expected) and "lm_head" in expected  # Conv1D and Linear alike
    model = quantized.load(variants["int8"])
    left = [n for n, m in model.named_modules() if isinstance(m, (Conv1D, torch.nn.Linear))]
    assert left == [], f"still float: {left}"
    assert report["weight_compression"] >= 3.5
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        ref, q = original(input_ids=ids).logits, model(input_ids=ids).logits
    assert (ref - q).abs().max() < 0.1 * ref.abs().max()  # close, not equal


def test_pruned_model_is_a_standard_smaller_gpt2(tiny_model_dir, variants):
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    pruned = AutoModelForCausalLM.from_pretrained(variants["prune"])  # plain transformers
    config = json.loads((variants["prune"] / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_layer"] == original.config.n_layer - 1
    assert config["n_inner"] == pruned.transformer.h[0].mlp.c_fc.nf == round(original.transformer.h[0].mlp.c_fc.nf * 0.5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in original.parameters())
    report = json.loads((variants["prune"] / "optimization.json").read_text())
    assert len(report["layer_importance"]) == original.config.n_layer
    assert report["dropped_layers"] == [min(range(original.config.n_layer), key=lambda i: report["layer_importance"][i])]


def test_distilled_student_has_half_the_layers_and_learned(tiny_model_dir, variants):
    student = AutoModelForCausalLM.from_pretrained(variants["distill"])
    assert student.config.n_layer == 1
    report = json.loads((variants["distill"] / "optimization.json").read_text())
    assert len(report["train_loss"]) == 5 and report["teacher_layers"] == 2


def test_onnx_export_matches_pytorch_logits(variants):
    report = json.loads((variants["onnx"] / "optimization.json").read_text())
    assert report["parity_tolerance"] >= 1e-4
    assert max(report["max_abs_logit_difference"].values()) <= 1e-4
    int8 = json.loads((variants["onnx-int8"] / "optimization.json").read_text())
    assert int8["quantized"] == "int8-weight-only-block32"
    assert (variants["onnx-int8"] / "model.onnx").stat().st_size < (variants["onnx"] / "model.onnx").stat().st_size


def test_distillation_loss_is_kl_times_t_squared_plus_ce():
    from pipelines.optimize.distill import distill_loss

    torch.manual_seed(0)
    s, t, y = torch.randn(6, 11), torch.randn(6, 11), torch.randint(0, 11, (6,))
    T = 3.0
    p_t = torch.softmax(t / T, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s / T, -1))).sum(-1).mean()
    expected = 0.3 * kl * T**2 + 0.7 * torch.nn.functional.cross_entropy(s, y)
    assert distill_loss(s, t, y, T, 0.3).item() == pytest.approx(expected.item(), rel=1e-5)


def test_evaluator_perplexity_equals_direct_cross_entropy(tiny_model_dir, variants, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "The for statement is used to iterate over the elements of a sequence, such as a string or a list."
    (tmp_path / "held_out.txt").write_text(text)
    results = evaluate([str(tiny_model_dir), str(variants["prune"])], tmp_path / "held_out.txt", tmp_path / "report", progress=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    direct = math.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())
    assert results[0]["perplexity"] == pytest.approx(direct, rel=1e-4)
    for key in ("model", "perplexity", "decode_tokens_per_s_batch1", "decode_tokens_per_s_batch16", "ttft_s", "bytes_on_disk", "parameters", "peak_rss_bytes"):
        assert all(r[key] for r in results), key
    assert results[1]["parameters"] < results[0]["parameters"]
    assert (tmp_path / "report" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| prune |" in (tmp_path / "report" / "report.md").read_text()
    # greedy agreement: the baseline agrees with itself; the pruned model's share is the direct argmax comparison
    pruned = AutoModelForCausalLM.from_pretrained(variants["prune"]).eval()
    with torch.no_grad():
        pruned_logits = pruned(input_ids=torch.tensor([ids])).logits[0]
    same = (pruned_logits[:-1].argmax(-1) == logits[:-1].argmax(-1)).sum().item()
    direct_agreement = same / (len(ids) - 1)
    assert results[0]["greedy_agreement"] == 1.0
    assert results[1]["greedy_agreement"] == pytest.approx(direct_agreement, abs=1e-9)
    assert results[1]["greedy_agreement"] < 1.0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [r["greedy_agreement"] for r in report] == [r["greedy_agreement"] for r in results]
    assert "greedy_predictions" not in report[0]
    assert "| greedy agreement |" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.parametrize("name", ["int8", "prune", "distill", "onnx", "onnx-int8"])
def test_predictor_serves_each_variant(tiny_model_dir, variants, tmp_path, name):
    if name.startswith("onnx"):  # the exported graph of the original model
        model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)
    elif name == "int8":
        model, tokenizer = quantized.load(variants[name]), AutoTokenizer.from_pretrained(variants[name])
    else:
        model, tokenizer = AutoModelForCausalLM.from_pretrained(variants[name]).eval(), AutoTokenizer.from_pretrained(variants[name])
    ids = torch.tensor([tokenizer("The for statement")["input_ids"]])
    with torch.no_grad():
        expected = tokenizer.decode(
            model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1] :], skip_special_tokens=True
        )
    server = start_server(variants[name], tmp_path)
    try:
        r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL_NAME, "prompt": "The for statement", "max_tokens": 8, "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        if name == "onnx-int8":  # int8 logits differ slightly: same length, not necessarily the same text
            assert r.json()["usage"]["completion_tokens"] == 8 or r.json()["choices"][0]["finish_reason"] == "stop"
        else:
            assert r.json()["choices"][0]["text"] == expected
    finally:
        stop_server(server)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_bad_input_is_refused_and_leaves_nothing_behind(tiny_model_dir, tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    (corrupt / "model.safetensors").write_bytes(b"garbage")
    cases = [
        (["--method", "int8", "--input", str(tmp_path / "missing")], "does not exist"),
        (["--method", "int8", "--input", str(corrupt)], "cannot load"),
        (["--method", "prune", "--input", str(tiny_model_dir), "--mlp-keep", "0"], "--mlp-keep"),
        (["--method", "prune", "--input", str(tiny_model_dir), "--drop-layers", "2"], "--drop-layers"),
        (["--method", "distill", "--input", str(tiny_model_dir), "--student-layers", "5"], "--student-layers"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        result = cli("optimize", *args, "--output", str(out))
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "a temporary directory was left"
    result = cli("optimize", "--method", "fp4", "--input", str(tiny_model_dir), "--output", str(tmp_path / "x"))
    assert result.returncode == 2 and "invalid choice" in result.stderr
    with pytest.raises(OptimizationError, match="unknown method"):
        optimize("fp4", tiny_model_dir, tmp_path / "y")
    result = cli("evaluate", "--model", str(tmp_path / "missing"), "--text", str(tmp_path / "nope.txt"), "--output", str(tmp_path / "r"))
    assert result.returncode == 2 and "not found" in result.stderr


def test_cast_to_bfloat16_halves_the_weights_and_is_served(tiny_model_dir, tmp_path):
    report = optimize("cast", tiny_model_dir, tmp_path / "bf16", dtype="bfloat16")
    assert report["all_parameters"] and report["weight_bytes_after"] * 2 == report["weight_bytes_before"]
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "bf16" / "model.safetensors").stat().st_size < 0.6 * (tiny_model_dir / "model.safetensors").stat().st_size
    with pytest.raises(OptimizationError, match="--dtype"):
        optimize("cast", tiny_model_dir, tmp_path / "fp8", dtype="float8")
    assert not (tmp_path / "fp8").exists()
    server = start_server(tmp_path / "bf16", tmp_path)  # on CPU, --dtype auto loads it back to float32
    try:
        r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL_NAME, "prompt": "The for statement", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        stop_server(server)
