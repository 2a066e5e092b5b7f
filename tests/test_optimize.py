"""The optimization toolkit on the tiny model: every method makes a directory that loads and is served, and the
evaluator's numbers are the ones computed directly."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import MODEL_NAME, REPO, start_server, stop_server
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from pipelines.evaluate import evaluate
from pipelines.optimize import OptimizationError, optimize
from pipelines.optimize.onnx_export import PARITY_FACTOR, PARITY_FLOOR, judge_parity, sanity_check
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


def test_int8_quantizes_every_projection_but_the_head_with_smoothquant(tiny_model_dir, variants):
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = [n for n in quantized.projection_names(original) if n != "lm_head"]
    report = json.loads((variants["int8"] / "optimization.json").read_text())
    manifest = json.loads((variants["int8"] / "quantization.json").read_text())
    assert manifest["modules"] == expected and report["quantized_modules"] == len(expected) == report["projection_modules"]
    assert any("c_attn" in n for n in expected) and report["kept_float"] == ["lm_head"]  # Conv1D and Linear alike
    assert manifest["smoothquant"]["alpha"] == quantized.SMOOTHQUANT_ALPHA and manifest["smoothquant"]["calibration_tokens"] > 100
    model = quantized.load(variants["int8"])
    left = [n for n, m in model.named_modules() if isinstance(m, (Conv1D, torch.nn.Linear))]
    assert left == ["lm_head"], f"still float: {left}"
    assert all(m.smooth is not None for m in model.modules() if isinstance(m, quantized.Int8Linear))
    assert report["weight_compression"] >= 3.5
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        ref, q = original(input_ids=ids).logits, model(input_ids=ids).logits
    assert (ref - q).abs().max() < 0.1 * ref.abs().max()  # close, not equal


def test_smoothquant_shrinks_the_int8_error_on_outlier_channels():
    """A projection whose input has a few channels 50x larger than the rest (as LLM activations do): per-token int8
    rounds the small channels to nothing, SmoothQuant's division moves the range into the weights."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(256, 64)
    x[:, :3] *= 50.0
    ranges = x.abs().amax(0)
    plain = quantized._quantize_linear(linear)
    smoothed = quantized._quantize_linear(linear, quantized.smoothing(ranges, [linear.weight]))
    with torch.no_grad():
        ref = linear(x)
        plain_error, smooth_error = (plain(x) - ref).abs().mean(), (smoothed(x) - ref).abs().mean()
    assert smooth_error < 0.5 * plain_error, (smooth_error, plain_error)


@pytest.mark.parametrize("backend", ["onednn", "fbgemm"])
def test_int8_backends_agree_are_batch_invariant_and_keep_the_input_dtype(backend):
    """oneDNN's quantized linear (the AMX-INT8 path) and fbgemm's (elsewhere) compute the same W8A8 product: each row
    quantized on its own range, so a row's output is bit-identical alone and in a batch (integer sums are exact)."""
    if backend == "onednn" and not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        pytest.skip("this torch has no oneDNN quantized linear")
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 80)
    x = torch.randn(7, 96)
    x[:, 5] *= 20.0  # an outlier channel, as LLM activations have
    with torch.no_grad():
        ref = linear(x)
        module = quantized.Int8Linear(*_int8_weight(linear), linear.bias, backend=backend)
        y = module(x)
        assert (y - ref).norm() < 0.05 * ref.norm()
        assert torch.equal(torch.cat([module(x[i : i + 1]) for i in range(len(x))]), y)
        assert module(x.bfloat16()).dtype == torch.bfloat16
        other = quantized.Int8Linear(*_int8_weight(linear), linear.bias, backend="fbgemm" if backend == "onednn" else "onednn")
        if hasattr(torch.ops.onednn, "qlinear_pointwise"):
            torch.testing.assert_close(other(x), y, rtol=0.02, atol=0.02 * float(ref.abs().max()))
        assert torch.equal(module.weight_int8, _int8_weight(linear)[0])
    with pytest.raises(ValueError, match="unknown int8 backend 'cuda'"):
        quantized.Int8Linear(*_int8_weight(linear), None, backend="cuda")


def _int8_weight(linear: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    scale = linear.weight.detach().abs().amax(dim=1) / 127.0
    return torch.round(linear.weight.detach() / scale[:, None]).to(torch.int8), scale


def test_siblings_of_one_input_share_smoothing_and_concatenate_exactly(tiny_model_dir):
    """q/k/v-style projections of one input get one smoothing vector, so one int8 product computes all three."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    quantized.quantize(model.eval(), [list(range(40))])
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert torch.equal(attn.q_proj.smooth, attn.k_proj.smooth) and torch.equal(attn.k_proj.smooth, attn.v_proj.smooth)
    assert torch.equal(mlp.gate_proj.smooth, mlp.up_proj.smooth) and not torch.equal(mlp.up_proj.smooth, mlp.down_proj.smooth[:32])
    fused = quantized.concatenate([attn.q_proj, attn.k_proj, attn.v_proj])
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1), rtol=1e-5, atol=1e-6)
    assert quantized.concatenate([attn.q_proj, mlp.down_proj]) is None  # different inputs: no shared product


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
    parity = report["parity"]
    assert parity["reference"] == "float64" and parity["factor"] == PARITY_FACTOR
    assert 0 < parity["pytorch_float32_error"] < 1e-4 and parity["onnx_error"] <= parity["bound"]
    assert parity["bound"] == pytest.approx(PARITY_FACTOR * max(parity["pytorch_float32_error"], PARITY_FLOOR * parity["logit_scale"]))
    assert max(report["max_abs_logit_difference"].values()) <= 1e-4  # a 2-layer model: far from any bound, on any CPU
    int8 = json.loads((variants["onnx-int8"] / "optimization.json").read_text())
    assert int8["quantized"] == "int8-weight-only-block32"
    assert int8["parity"] is None  # no logit tolerance for int8: see test_onnx_int8_stays_close_to_the_float_model
    assert 1e-4 < max(int8["max_abs_logit_difference"].values()) < 1.0  # reported: it is int8, and not garbage
    assert (variants["onnx-int8"] / "model.onnx").stat().st_size < (variants["onnx"] / "model.onnx").stat().st_size


def _synthetic_logits(pytorch_noise: float, onnx_noise: float, scale: float = 33.7):
    """A float64 reference like SmolLM2's (logits up to ``scale``), PyTorch float32 and ONNX as the reference plus
    noise of at most the given sizes: two CPUs' float32 summation orders, simulated."""
    rng = np.random.default_rng(0)
    reference = rng.normal(0, 6, (12, 2048))
    reference[3, 7] = scale
    pytorch = (reference + rng.uniform(-pytorch_noise, pytorch_noise, reference.shape)).astype(np.float32)
    onnx = (reference + rng.uniform(-onnx_noise, onnx_noise, reference.shape)).astype(np.float32)
    return reference, pytorch, onnx


def test_parity_judges_the_export_against_float64_not_the_cpus_summation_order():
    # the Xeon AMX case: ONNX is 4.57e-4 from PyTorch, over the old fixed tolerance 1e-4 × 33.7 / 10 = 3.4e-4,
    # yet only twice as far from float64 as PyTorch float32 itself
    reference, pytorch, onnx = _synthetic_logits(2.5e-4, 5e-4)
    old_tolerance = 1e-4 * max(1.0, 33.7 / 10)
    assert np.abs(onnx.astype(np.float64) - pytorch).max() > old_tolerance  # the old check refused it
    verdict = judge_parity(reference, pytorch, onnx)
    assert old_tolerance < verdict["onnx_error"] < 5.1e-4 and 2.4e-4 < verdict["pytorch_float32_error"] < 2.6e-4
    assert verdict["bound"] == pytest.approx(PARITY_FACTOR * verdict["pytorch_float32_error"])
    assert verdict["logit_scale"] == pytest.approx(33.7)
    # PyTorch exact to the last bit (a shallow model): the floor, a few float32 ulps of the largest logit, applies
    assert judge_parity(reference, reference, reference + 1e-5)["bound"] == pytest.approx(PARITY_FACTOR * PARITY_FLOOR * 33.7)
    with pytest.raises(OptimizationError, match="float64"):
        judge_parity(reference, reference, reference + 1e-3)


def test_parity_refuses_a_broken_export_naming_the_bound():
    reference, pytorch, onnx = _synthetic_logits(2.5e-4, 5e-4)
    wrong_slot = onnx.copy()
    wrong_slot[5] += np.float32(0.05)  # one position off by 0.05: a wrong cache slot or mask
    with pytest.raises(OptimizationError, match=r"float64 forward of the same weights by 5\.\d\de-02, more than the bound 2\.\d\de-03 = 8 × max\(PyTorch"):
        judge_parity(reference, pytorch, wrong_slot)
    with pytest.raises(OptimizationError, match=r"by 2\.\d\de-03, more than the bound 2\.\d\de-03"):  # noise ten times PyTorch's: over K = 8
        judge_parity(*_synthetic_logits(2.5e-4, 2.5e-3))
    nan = onnx.copy()
    nan[0, 0] = np.nan  # max |difference| would be NaN, and NaN > bound is False: refused explicitly
    with pytest.raises(OptimizationError, match="1 logits are not finite"):
        judge_parity(reference, pytorch, nan)
    with pytest.raises(OptimizationError, match="shape"):
        judge_parity(reference, pytorch, onnx[:, :-1])


def test_int8_logits_get_a_sanity_check_not_a_tolerance():
    reference, pytorch, _ = _synthetic_logits(2.5e-4, 0)
    sanity_check(pytorch, pytorch + np.float32(0.5))  # int8 may be far from float: the evaluator and the gate judge it
    bad = pytorch.copy()
    bad[2, 3] = np.inf
    with pytest.raises(OptimizationError, match="int8 export: 1 logits are not finite"):
        sanity_check(pytorch, bad)
    with pytest.raises(OptimizationError, match="int8 export: logits of shape"):
        sanity_check(pytorch, pytorch[:1])


def test_an_export_with_one_layer_changed_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    """The graph is traced from weights changed by 1% in one MLP, then checked against the unchanged model."""
    real_export = torch.onnx.export

    def export_changed(wrapper, *args, **kwargs):
        weight = wrapper.model.transformer.h[0].mlp.c_proj.weight
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.mul_(1.01)
        try:
            return real_export(wrapper, *args, **kwargs)
        finally:
            with torch.no_grad():
                weight.copy_(saved)

    monkeypatch.setattr(torch.onnx, "export", export_changed)
    with pytest.raises(OptimizationError, match=r"ONNX logits differ from a float64 forward of the same weights by \d\.\d\de-0[12], more than the bound"):
        optimize("onnx", tiny_model_dir, tmp_path / "broken")
    assert not (tmp_path / "broken").exists() and not list(tmp_path.iterdir())


def _runner(model_dir: Path):
    from predictor.engine.runner import KVPlan, make_runner
    from predictor.loading import load_model

    loaded = load_model(model_dir, dtype="float32", device="cpu")
    return make_runner(loaded.model, KVPlan(None, 1024), 4, loaded.device), loaded.tokenizer, loaded.max_model_len


def _runner_greedy(model_dir: Path, prompt: str, tokens: int) -> str:
    """Greedy text from the predictor's runner for the directory, as the server runs it (OnnxRunner for ONNX)."""
    from pipelines.evaluate import _sequences

    runner, tokenizer, _ = _runner(model_dir)
    ids = tokenizer(prompt)["input_ids"]
    (chunk,) = _sequences(runner, [ids], len(ids) + tokens + 1)
    logits, out = runner.prefill([chunk])[0][-1], []
    for _ in range(tokens):
        out.append(int(logits.argmax()))
        if out[-1] == tokenizer.eos_token_id:
            break
        chunk.start, chunk.tokens = chunk.start + len(chunk.tokens), [out[-1]]
        logits = runner.decode([chunk])[0]
    return tokenizer.decode(out, skip_special_tokens=True)


def test_onnx_int8_stays_close_to_the_float_model(tiny_model_dir, variants):
    """The evaluator's measures (perplexity, greedy agreement with the float model) on 512 tokens of the demo corpus.
    Measured on the tiny model: agreement 0.992 and 0.998 on the corpus' first and last 512 tokens (0.997 on all
    91k), perplexity within ±1.1e-4 relative. The bounds leave wide margin for other CPUs' int8 kernels and still
    fail a broken quantizer (a wrong model agrees on 0.04 of positions)."""
    from pipelines.corpus import demo_corpus
    from pipelines.evaluate import greedy_agreement, perplexity

    ids = AutoTokenizer.from_pretrained(tiny_model_dir)(" ".join(demo_corpus()[:5]), add_special_tokens=False)["input_ids"][:512]
    assert len(ids) == 512
    measured = []
    for model_dir in (tiny_model_dir, variants["onnx-int8"]):
        runner, _, context = _runner(model_dir)  # the tiny model's context is shorter than the text: windows, as the evaluator
        measured.append(perplexity(runner, ids, min(context, 1024)))
    (float_ppl, float_greedy), (int8_ppl, int8_greedy) = measured
    assert greedy_agreement(int8_greedy, float_greedy) >= 0.95
    assert abs(int8_ppl / float_ppl - 1) <= 0.01


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
    if name == "onnx-int8":  # int8 logits differ from float (its quality: test_onnx_int8_stays_close_to_the_float_model),
        expected = _runner_greedy(variants[name], "The for statement", 8)  # so the served text is the int8 graph's own greedy text
    server = start_server(variants[name], tmp_path)
    try:
        r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL_NAME, "prompt": "The for statement", "max_tokens": 8, "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
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


def test_an_option_the_method_does_not_take_is_refused_by_name_before_anything_runs(tiny_model_dir, tmp_path):
    with pytest.raises(OptimizationError, match=r"method 'int8' does not take option 'mlp_keep' \(its options: text\)"):
        optimize("int8", tiny_model_dir, tmp_path / "a", mlp_keep=0.5)
    with pytest.raises(OptimizationError, match=r"method 'prune' does not take options 'steps', 'quantize' \(its options: mlp_keep, drop_layers, "):
        optimize("prune", tiny_model_dir, tmp_path / "b", mlp_keep=0.5, steps=3, quantize=True)
    with pytest.raises(OptimizationError, match="method 'onnx-int8' does not take option 'quantize'"):  # the method's name fixes it
        optimize("onnx-int8", tiny_model_dir, tmp_path / "c", quantize=False)
    assert list(tmp_path.iterdir()) == []


def test_a_type_error_inside_a_method_is_not_taken_for_a_bad_option(tiny_model_dir, tmp_path, monkeypatch):
    """A library's TypeError (here one that even says "unexpected keyword argument") is a bug to see, not a user error."""
    from pipelines.optimize import quantize

    def broken(loaded, output_dir):
        raise TypeError("Linear.__init__() got an unexpected keyword argument 'dtype'")

    monkeypatch.setattr(quantize, "int8", broken)
    with pytest.raises(TypeError, match="Linear.__init__"):
        optimize("int8", tiny_model_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone all the same


def test_an_evaluation_child_killed_for_memory_fails_the_step_at_once_naming_the_signal(tiny_model_dir, tmp_path):
    """The kernel's OOM killer sends SIGKILL: the child cannot report anything. Killed here the same way while it
    loads the model, evaluate must raise promptly (the step used to wait on the queue forever)."""
    import multiprocessing
    import os
    import signal
    import threading
    import time

    (tmp_path / "held_out.txt").write_text("The for statement is used to iterate over the elements of a sequence, such as a string or a list.")
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = evaluate([str(tiny_model_dir)], tmp_path / "held_out.txt", tmp_path / "report", progress=False)
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    (child,) = multiprocessing.active_children()
    os.kill(child.pid, signal.SIGKILL)
    killed = time.monotonic()
    thread.join(timeout=30)
    assert not thread.is_alive(), "evaluate still waits for a child that was killed"
    assert time.monotonic() - killed < 10
    assert isinstance(outcome.get("error"), RuntimeError), outcome
    assert "evaluation child exited with signal 9 (killed, likely out of memory)" in str(outcome["error"])
    assert str(tiny_model_dir) in str(outcome["error"]) and not (tmp_path / "report").exists()


def test_exit_reasons_name_the_signal_or_the_code():
    from pipelines.evaluate import exit_reason

    assert exit_reason(-9) == "signal 9 (killed, likely out of memory)"
    assert exit_reason(-11) == "signal 11 (SIGSEGV)"
    assert exit_reason(137) == "exit code 137 (128 + signal 9: killed, likely out of memory)"
    assert exit_reason(1) == "exit code 1"


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


def test_evaluate_model_specs_name_a_dtype_or_default_to_float32():
    from pipelines.evaluate import split_spec

    assert split_spec("/m/smollm2") == ("/m/smollm2", "float32")
    assert split_spec("/m/smollm2@bfloat16") == ("/m/smollm2", "bfloat16")
    assert split_spec("/m/v@2") == ("/m/v@2", "float32")  # not a dtype: part of the directory name
    with pytest.raises(FileNotFoundError, match="not a model directory: /nonexistent@bfloat16"):
        evaluate(["/nonexistent@bfloat16"], __file__, "/tmp/unused-report")


def test_an_int8_model_runs_its_float_parts_in_bfloat16_and_keeps_int8_in_float32(variants):
    from predictor.loading import ModelLoadError, load_model

    loaded = load_model(variants["int8"], dtype="bfloat16", device="cpu")
    assert loaded.dtype == torch.bfloat16 and "int8 projections" in loaded.dtype_reason
    assert loaded.model.get_output_embeddings().weight.dtype == torch.bfloat16
    layer = next(m for m in loaded.model.modules() if isinstance(m, quantized.Int8Linear))
    assert layer.smooth.dtype == torch.float32
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    with pytest.raises(ModelLoadError, match="int8 model: it runs on CPU, its float parts in float32 or bfloat16"):
        load_model(variants["int8"], dtype="float16", device="cpu")
