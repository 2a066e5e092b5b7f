"""Evaluate model variants the same way: quality, speed, size and memory, as JSON, Markdown and a PNG chart.

Every model is measured in its own fresh process (so peak resident memory is its own), loaded with the
predictor's loader and run with the predictor's runner, so the numbers are those of serving:
- perplexity: exp(token-weighted mean cross-entropy) on held-out text, with a sliding window (the
  model's context up to ``MAX_CONTEXT`` tokens, stride half of it) for text longer than that; each
  token is scored once, with as much context as the window gives it;
- greedy agreement: the share of held-out positions where the model's greedy next token (argmax, given
  the true text before it) equals the first (unoptimized) model's: how faithful a variant is, which
  perplexity alone does not show;
- decode tokens/s at batch 1 and 16 (greedy, up to 128 tokens after a 16-token prompt, median of 3
  runs), and time to first token (prefill of that prompt plus the first token, median of 5);
- bytes on disk, parameter count (int8 weights counted like float ones), peak resident memory.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import resource
import signal
import statistics
import time
from pathlib import Path
from queue import Empty

import torch

from predictor.quantized import Int8Linear

METRICS = (
    "model", "perplexity", "greedy_agreement", "decode_tokens_per_s_batch1", "decode_tokens_per_s_batch16", "ttft_s", "bytes_on_disk", "parameters",
    "peak_rss_bytes",
)  # fmt: skip
PROMPT_TOKENS = 16
DECODE_TOKENS = 128
# Perplexity windows are at most this long (stride half of it): a model's full context (8,192 for SmolLM2)
# would make one window hold GBs of logits and the KV cache, and the comparison between variants, which is
# what the evaluation is for, does not need it.
MAX_CONTEXT = 1024
REPEATS = 3  # speeds are the median of this many runs


def bytes_on_disk(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).rglob("*") if p.is_file())


def count_parameters(model) -> int:
    if hasattr(model, "parameter_count"):  # an ONNX model: its initializers
        return model.parameter_count()
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, Int8Linear):  # int8 weights are packed, not parameters
            total += module.in_features * module.out_features + (0 if module.bias is None else module.bias.numel())
    return total


def _sequences(runner, prompts: list[list[int]], positions: int, all_logits: bool = False) -> list:
    """Chunks for a fixed batch run straight through the runner (no engine): each with blocks for ``positions``."""
    from predictor.engine.kv_cache import BlockAllocator
    from predictor.engine.runner import Chunk

    allocator = BlockAllocator(runner.num_blocks)
    return [Chunk(i, p, 0, allocator.allocate(allocator.blocks_for(positions)), all_logits) for i, p in enumerate(prompts)]


@torch.inference_mode()
def perplexity(runner, ids: list[int], context: int) -> tuple[float, list[int]]:
    """Sliding-window perplexity with the runner's prefill (all logits), and the greedy prediction for each
    scored token (the argmax given the text before it). ids: the whole held-out text."""
    stride = max(1, context // 2)
    nll, counted, scored_until = 0.0, 0, 1  # token 0 has no context and is never scored
    predictions: list[int] = []
    for start in range(0, max(1, len(ids) - 1), stride):
        window = ids[start : start + context]
        if len(window) < 2:
            break
        (logits,) = runner.prefill(_sequences(runner, [window], len(window), all_logits=True))  # (len(window), V)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        first = max(scored_until - start, 1)  # score only tokens not scored by an earlier window
        targets = torch.tensor(window[first:])
        nll -= logprobs[first - 1 : len(window) - 1].gather(1, targets[:, None]).sum().item()
        predictions += logprobs[first - 1 : len(window) - 1].argmax(-1).tolist()
        counted += len(targets)
        scored_until = start + len(window)
        if scored_until >= len(ids):
            break
    return math.exp(nll / counted), predictions


def greedy_agreement(predictions: list[int], reference: list[int]) -> float | None:
    """Share of positions with the same greedy token; None when the two scored different texts (another tokenizer)."""
    if len(predictions) != len(reference) or not reference:
        return None
    return sum(a == b for a, b in zip(predictions, reference)) / len(reference)


@torch.inference_mode()
def decode_speed(runner, prompt: list[int], batch: int, tokens: int) -> float:
    chunks = _sequences(runner, [prompt] * batch, len(prompt) + tokens + 1)
    logits = torch.stack([x[-1] for x in runner.prefill(chunks)])
    start = time.perf_counter()
    for _ in range(tokens):
        for chunk, token in zip(chunks, logits.argmax(-1).tolist()):
            chunk.start += len(chunk.tokens)
            chunk.tokens = [token]
        logits = runner.decode(chunks)
    for chunk in chunks:
        runner.release(chunk.seq_id)
    return batch * tokens / (time.perf_counter() - start)


@torch.inference_mode()
def time_to_first_token(runner, prompt: list[int]) -> float:
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        (logits,) = runner.prefill(_sequences(runner, [prompt], len(prompt)))
        int(logits[-1].argmax())
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


DTYPE_SUFFIXES = ("float32", "bfloat16")


def split_spec(spec: str) -> tuple[str, str]:
    """``DIR`` or ``DIR@DTYPE`` (float32 or bfloat16: the dtype the model runs in, default float32) → (DIR, DTYPE);
    so one model can be compared with itself in another dtype (``--model M --model M@bfloat16``)."""
    base, sep, dtype = spec.rpartition("@")
    if sep and dtype in DTYPE_SUFFIXES:
        return base, dtype
    return spec, "float32"


def measure(model_spec: str, text: str) -> dict:
    """All metrics of one model, ``DIR`` or ``DIR@DTYPE`` (run this in a fresh process for an honest peak RSS)."""
    from predictor.engine.kv_cache import BLOCK_SIZE
    from predictor.engine.runner import KVPlan, make_runner
    from predictor.loading import load_model

    model_dir, dtype = split_spec(model_spec)
    loaded = load_model(model_dir, dtype=dtype, device="cpu")
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    parameters = count_parameters(loaded.model)  # before the runner repacks the weights
    context = min(loaded.max_model_len, MAX_CONTEXT)
    tokens = min(DECODE_TOKENS, loaded.max_model_len - PROMPT_TOKENS - 1)
    per_sequence = -(-(PROMPT_TOKENS + tokens + 1) // BLOCK_SIZE) * BLOCK_SIZE  # whole blocks per decoding sequence
    runner = make_runner(loaded.model, KVPlan(None, max(context, 16 * per_sequence)), 16, loaded.device)
    prompt = ids[:PROMPT_TOKENS]
    decode_speed(runner, prompt, 1, 4)  # warm-up
    ppl, predictions = perplexity(runner, ids, context)
    result = {
        "model": str(model_dir),
        "perplexity": ppl,
        "greedy_predictions": predictions,  # compared with the first model's in evaluate(), then dropped
        "decode_tokens_per_s_batch1": statistics.median(decode_speed(runner, prompt, 1, tokens) for _ in range(REPEATS)),
        "decode_tokens_per_s_batch16": statistics.median(decode_speed(runner, prompt, 16, tokens) for _ in range(REPEATS)),
        "ttft_s": time_to_first_token(runner, prompt),
        "bytes_on_disk": bytes_on_disk(Path(model_dir)),
        "parameters": parameters,
        "held_out_tokens": len(ids),
    }
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux's VmHWM belongs to the address space and starts afresh at
    exec; ``ru_maxrss`` would carry over the peak of the parent that forked this process."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(model_dir: str, text: str, queue: multiprocessing.Queue) -> None:
    try:
        queue.put(measure(model_dir, text))
    except Exception as exc:  # reported by the parent with the model's name
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def exit_reason(exitcode: int) -> str:
    """How a child process ended, in words: ``signal 9 (killed, likely out of memory)``, ``exit code 3``."""
    if exitcode < 0:
        number = -exitcode
        if number == signal.SIGKILL:
            return f"signal {number} (killed, likely out of memory)"
        try:
            return f"signal {number} ({signal.Signals(number).name})"
        except ValueError:
            return f"signal {number}"
    if exitcode == 128 + signal.SIGKILL:  # a shell's or a container runtime's way to report SIGKILL
        return f"exit code {exitcode} (128 + signal 9: killed, likely out of memory)"
    return f"exit code {exitcode}"


def measure_in_fresh_process(model_dir: str, text: str, poll_s: float = 1.0) -> dict:
    """``measure`` in a spawned process. The result is waited for ``poll_s`` at a time while the child lives: a child
    that dies without one (the kernel's OOM killer sends SIGKILL, which nothing in the child can catch) raises
    ``RuntimeError`` saying how it ended, instead of leaving the step waiting forever."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(model_dir, text, queue))
    process.start()
    try:
        while True:
            alive = process.is_alive()  # looked at first: what a child put before it exited is in the pipe for this get
            try:
                result = queue.get(timeout=poll_s)
                break
            except Empty:
                if not alive:
                    process.join()
                    raise RuntimeError(
                        f"evaluating {model_dir}: evaluation child exited with {exit_reason(process.exitcode)} before reporting a result"
                    ) from None
    except BaseException:  # it died, or this process was interrupted: nothing to wait for
        process.kill()
        raise
    finally:
        process.join(timeout=60)
        if process.is_alive():  # it reported and hangs on its way out
            process.kill()
            process.join()
        queue.close()
    if "error" in result:
        raise RuntimeError(f"evaluating {model_dir}: {result['error']}")
    return result


def markdown(results: list[dict]) -> str:
    base = results[0]
    lines = [
        "| model | perplexity | Δ perplexity | greedy agreement | decode tok/s b=1 | × | decode tok/s b=16 | × | TTFT ms | MB on disk | parameters "
        "| peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        agreement = r.get("greedy_agreement")
        lines.append(
            f"| {r['name']} | {r['perplexity']:.2f} | {100 * (r['perplexity'] / base['perplexity'] - 1):+.1f}% | "
            f"{'n/a' if agreement is None else f'{agreement:.3f}'} | "
            f"{r['decode_tokens_per_s_batch1']:.1f} | {r['decode_tokens_per_s_batch1'] / base['decode_tokens_per_s_batch1']:.2f} | "
            f"{r['decode_tokens_per_s_batch16']:.1f} | {r['decode_tokens_per_s_batch16'] / base['decode_tokens_per_s_batch16']:.2f} | "
            f"{1000 * r['ttft_s']:.1f} | {r['bytes_on_disk'] / 1e6:.1f} | {r['parameters'] / 1e6:.2f} M | {r['peak_rss_bytes'] / 2**20:.1f} |"
        )
    return "\n".join(lines) + (
        f"\n\nΔ, × and greedy agreement (the share of held-out positions whose greedy next token is the same) "
        f"are relative to the first model, `{base['name']}`.\n"
    )


def chart(results: list[dict], path: Path) -> None:
    """Quality against speed; marker area is size on disk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    biggest = max(r["bytes_on_disk"] for r in results)
    for i, r in enumerate(results):
        ax.scatter(r["decode_tokens_per_s_batch1"], r["perplexity"], s=80 + 1500 * r["bytes_on_disk"] / biggest, alpha=0.6)
        agreement = r.get("greedy_agreement")
        ax.annotate(
            f"{r['name']}\n{r['bytes_on_disk'] / 1e6:.1f} MB" + ("" if agreement is None else f", agreement {agreement:.2f}"),
            (r["decode_tokens_per_s_batch1"], r["perplexity"]),
            textcoords="offset points",
            xytext=(8, 8 if i % 2 == 0 else -22),  # alternate, so neighbours do not overlap
            fontsize=8,
        )
    ax.set_xlabel("decode tokens/s, batch 1 (higher is better)")
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_title("Model variants: quality vs speed (marker area: size on disk)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def evaluate(models: list[str], text_file: str | Path, output_dir: str | Path, progress: bool = True, names: list[str] | None = None) -> list[dict]:
    """Measure every model on the text in ``text_file``; write report.json, report.md and report.png.

    ``names`` label the models in the report (default: their directory names).
    """
    from tqdm.auto import tqdm

    text_path = Path(text_file)
    if not text_path.is_file():
        raise FileNotFoundError(f"text file not found: {text_path}")
    text = text_path.read_text(encoding="utf-8", errors="replace")
    if len(text.split()) < 8:
        raise ValueError(f"{text_path} is too short to evaluate on")
    for model in models:
        if not (Path(split_spec(model)[0]) / "config.json").is_file():
            raise FileNotFoundError(f"not a model directory: {model}")
    names = names or [Path(m).name for m in models]
    if len(names) != len(models):
        raise ValueError(f"{len(names)} names for {len(models)} models")
    results = [{"name": n, **measure_in_fresh_process(m, text)} for n, m in tqdm(list(zip(names, models)), desc="evaluate", disable=not progress)]
    reference = results[0]["greedy_predictions"]
    for r in results:
        r["greedy_agreement"] = greedy_agreement(r.pop("greedy_predictions"), reference)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "report.json").write_text(json.dumps(results, indent=2))
    (output / "report.md").write_text(markdown(results))
    chart(results, output / "report.png")
    return results


def png_html(png: Path, title: str) -> str:
    """A self-contained HTML page showing ``png`` (how KFP's UI displays a chart artifact)."""
    import base64

    data = base64.b64encode(Path(png).read_bytes()).decode()
    head = f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title></head>'
    return head + f'<body><h3>{title}</h3><img src="data:image/png;base64,{data}"></body></html>'
