"""Structured outputs: decode throughput at C concurrent chat clients, with a JSON schema against without.

    python -m benchmarks.structured_outputs [--model DIR] [--clients 16] [--max-tokens 128] [--rounds 2]

Default model: the predictor's default (SmolLM2-135M-Instruct). One server; each mode sends ``rounds``
waves (alternating with the other mode's) of ``clients`` concurrent chat requests (the same prompts, temperature 0.7, seeded), after one
warm-up request (which also compiles the schema). Free requests ignore end-of-sequence, so they write
``max_tokens`` each; constrained ones end when the JSON is complete. Throughput is completion tokens
over the wave's wall time. Writes ``benchmarks/results/structured-outputs.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import jsonschema
import openai
from tqdm import tqdm

from predictor.default_model import ensure_default_model
from predictor.launch import start_server

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population_millions": {"type": "number"},
        "landmarks": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 60}, "kind": {"enum": ["museum", "park", "church", "monument", "other"]}},
                "required": ["name", "kind"],
                "additionalProperties": False,
            },
            "maxItems": 6,
        },
    },
    "required": ["city", "country", "population_millions", "landmarks"],
    "additionalProperties": False,
}
CITIES = ["Paris", "Tokyo", "Lima", "Cairo", "Oslo", "Delhi", "Quito", "Rome", "Seoul", "Accra", "Perth", "Lyon", "Porto", "Hanoi", "Dakar", "Bern"]


async def wave(url: str, clients: int, max_tokens: int, constrained: bool, seed: int, bar: tqdm) -> tuple[int, float, int]:
    """(completion tokens, seconds, outputs that validate against the schema)."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=1200)
    extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}} if constrained else {}

    async def one(i: int):
        city = CITIES[i % len(CITIES)]
        r = await client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": f"Describe {city} as JSON with its country, population and landmarks."}],
            max_tokens=max_tokens,
            temperature=0.7,
            seed=seed + i,
            **({} if constrained else {"extra_body": {"ignore_eos": True}}),
            **extra,
        )
        bar.update(1)
        return r

    start = time.perf_counter()
    try:
        results = await asyncio.gather(*(one(i) for i in range(clients)))
    finally:
        await client.close()
    seconds = time.perf_counter() - start
    valid = 0
    for r in results:
        if constrained and r.choices[0].finish_reason == "stop":
            jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
            valid += 1
    return sum(r.usage.completion_tokens for r in results), seconds, valid


def chart(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    labels = list(rows)
    ax.bar(labels, [rows[k]["tokens_per_s"] for k in labels], color=["#888", "#2a7"])
    ax.set_ylabel("completion tokens / s")
    ax.set_title("Structured outputs: JSON schema vs free")
    for i, k in enumerate(labels):
        ax.text(i, rows[k]["tokens_per_s"], f"{rows[k]['tokens_per_s']:.0f}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.structured_outputs", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model directory (default: the default model)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    model = args.model or ensure_default_model()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as logs:
        server = start_server(model, Path(logs), "--max_num_seqs", str(args.clients), name="m")
        try:
            modes = (("free", False), ("json_schema", True))
            totals = {label: [0, 0.0, 0] for label, _ in modes}
            with tqdm(total=len(modes) * (1 + args.rounds * args.clients), desc="requests") as bar:
                for _, constrained in modes:
                    asyncio.run(wave(server.url, 1, 8, constrained, 0, bar))  # warm-up (and the schema's compile)
                for r in range(args.rounds):  # modes alternate, so a busy machine slows both alike
                    for label, constrained in modes:
                        t, s, v = asyncio.run(wave(server.url, args.clients, args.max_tokens, constrained, 1000 * r, bar))
                        totals[label] = [totals[label][0] + t, totals[label][1] + s, totals[label][2] + v]
            for label, (tokens, seconds, valid) in totals.items():
                rows[label] = {"completion_tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1), "valid_json": valid}
        finally:
            server.stop()
    ratio = rows["json_schema"]["tokens_per_s"] / rows["free"]["tokens_per_s"]
    result = {"model": model.name, "clients": args.clients, "max_tokens": args.max_tokens, "rounds": args.rounds, "modes": rows, "ratio": round(ratio, 3)}
    report = (
        f"{args.clients} concurrent chat clients × {args.rounds} waves, max_tokens {args.max_tokens}, model `{model.name}`, one run:\n\n"
        "| mode | completion tokens | seconds | tokens/s | outputs valid under the schema |\n|---|---|---|---|---|\n"
        + "".join(
            f"| {k} | {v['completion_tokens']} | {v['seconds']} | {v['tokens_per_s']} | {'-' if k == 'free' else v['valid_json']} |\n" for k, v in rows.items()
        )
        + f"\nJSON schema / free throughput: {ratio:.2f}×\n"
    )
    print(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "structured-outputs.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "structured-outputs.md").write_text(report)
    chart(rows, RESULTS / "structured-outputs.png")


if __name__ == "__main__":
    main()
