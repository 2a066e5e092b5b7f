"""Structured outputs: how often a small model's constrained answer is valid JSON, and what the constraint costs.

    python -m benchmarks.structured_outputs [--model DIR] [--samples 32] [--parse-max-tokens 200]
                                            [--clients 16] [--max-tokens 128] [--rounds 2]

Default model: the predictor's default (SmolLM2-135M-Instruct). Three parts, one run:

- **Parse rate** (in process, the engine the server runs): ``samples`` sampled chat answers (temperature 0.7, the
  model's top_p, seeded) per response format, ``max_tokens`` 200: a city with ``lat``/``lon`` numbers, a profile of
  strings (json_schema) and ``json_object``. An answer counts when ``json.loads`` reads it and it validates with
  ``jsonschema``. *Before* compiles as the grammar alone (``GrammarCompiler(bound_outputs=False)``: numbers
  unbounded, no closing strategy), *after* with the number bound and closing before ``max_tokens``; the same
  prompts and seeds.
- **Mask cost** per constrained row and step (``Matcher.fill``): the grammar's mask alone, with the number bound at
  work, and inside the closing window (where the closing path is searched), on SmolLM2's tokenizer; and the compile
  time of the largest schema the server accepts.
- **Throughput** (the real server): ``rounds`` waves of ``clients`` concurrent chat requests with a JSON schema
  against free ones (``ignore_eos``, so they write ``max_tokens`` each), alternating; completion tokens over the
  wave's wall time.

Writes ``benchmarks/results/structured-outputs.{json,md,png}``.
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
import torch
from tqdm import tqdm

from predictor.default_model import ensure_default_model
from predictor.engine import Engine, EngineConfig
from predictor.engine.structured import MAX_GRAMMAR_CHARS, GrammarCompiler
from predictor.launch import start_server
from predictor.loading import load_model
from predictor.protocols.schema import closed, json_schema_spec
from predictor.sampling import GenerationRequest, SamplingParams

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
PEOPLE = ["Marie Curie", "Alan Turing", "Ada Lovelace", "Nelson Mandela", "Frida Kahlo", "Isaac Newton", "Rosalind Franklin", "Confucius"]

# The parse-rate formats: (name, response format, the schema an answer must validate under, prompt for item i).
GEO = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "country": {"type": "string"},
        "lat": {"type": "number"},
        "lon": {"type": "number"},
        "population": {"type": "integer"},
        "area_km2": {"type": "number"},
        "elevation_m": {"type": "number"},
    },
    "required": ["city", "country", "lat", "lon", "population", "area_km2", "elevation_m"],
}
PROFILE = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "occupation": {"type": "string"},
        "known_for": {"type": "string"},
        "born_in": {"type": "string"},
        "summary": {"type": "string"},
    },
    "required": ["name", "occupation", "known_for", "born_in", "summary"],
}
FORMATS = [
    ("json_schema: city facts (numbers)", GEO, lambda i: f"Describe {CITIES[i % len(CITIES)]} as JSON."),
    ("json_schema: profile (strings)", PROFILE, lambda i: f"Write a short profile of {PEOPLE[i % len(PEOPLE)]} as JSON."),
    ("json_object", None, lambda i: f"Describe {CITIES[i % len(CITIES)]} as a JSON object."),
]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def parse_rate(model: Path, samples: int, max_tokens: int) -> dict:
    """{format: {mode: {valid, answers, finish reasons, mean tokens}}} for the grammar alone ("before") and bounded ("after")."""
    loaded = load_model(model)
    tokenizer = loaded.tokenizer
    engine = Engine(loaded, EngineConfig(max_num_seqs=16))
    engine.start()
    compilers = {
        "before": GrammarCompiler(tokenizer, loaded.vocab_size, loaded.eos_token_id, bound_outputs=False),
        "after": GrammarCompiler(tokenizer, loaded.vocab_size, loaded.eos_token_id),
    }
    for compiler in compilers.values():
        compiler.prepare()

    async def answer(mode: str, schema: dict | None, prompt: str, seed: int) -> tuple[str, str | None, int]:
        spec = json_schema_spec(closed(schema) if schema else {"type": "object"}, "response_format")
        params = SamplingParams(max_tokens=max_tokens, temperature=0.7, top_p=loaded.sampling_defaults.get("top_p", 1.0), seed=seed, structured=spec)
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        grammar = await compilers[mode].compile_async(spec, "response_format")
        request = GenerationRequest(f"{mode}-{seed}", tokenizer.encode(text, add_special_tokens=False), params, grammar=grammar)
        out, finish, tokens = [], None, 0
        async for step in engine.generate(request):
            out.append(step.text)
            tokens += len(step.token_ids)
            finish = step.finish_reason or finish
        return "".join(out), finish, tokens

    rows: dict[str, dict] = {}
    try:
        with tqdm(total=2 * len(FORMATS) * samples, desc="parse-rate answers") as bar:
            for name, schema, prompt in FORMATS:
                rows[name] = {}
                for mode in compilers:

                    async def wave(mode=mode, schema=schema, prompt=prompt):
                        async def one(i: int):
                            result = await answer(mode, schema, prompt(i), 1000 + i)
                            bar.update(1)
                            return result

                        return await asyncio.gather(*(one(i) for i in range(samples)))

                    results = asyncio.run(wave())
                    check = closed(schema) if schema else {"type": "object"}
                    valid = sum(_valid(text, check) for text, _, _ in results)
                    finishes = {reason: sum(r[1] == reason for r in results) for reason in sorted({r[1] for r in results})}
                    rows[name][mode] = {
                        "valid": valid,
                        "answers": len(results),
                        "rate": round(valid / len(results), 3),
                        "finish_reasons": finishes,
                        "mean_tokens": round(sum(r[2] for r in results) / len(results), 1),
                        "example_invalid": next((r[0][-160:] for r in results if not _valid(r[0], check)), None),
                    }
    finally:
        engine.stop()
    return rows


def _valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def mask_cost(model: Path) -> dict:
    """Microseconds per ``Matcher.fill`` (one constrained row, one step) at four places of a city answer, grammar alone
    and bounded; the bounded one also 24 tokens from ``max_tokens`` (inside the closing window). And the compile time of
    the largest accepted schema (optional integer properties, llguidance's costliest shape per character)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    vocab = len(tokenizer)
    before, after = (GrammarCompiler(tokenizer, vocab, tokenizer.eos_token_id, bound_outputs=b) for b in (False, True))
    before.prepare()
    start = time.perf_counter()
    after.prepare()
    table_seconds = time.perf_counter() - start
    spec = json_schema_spec(closed(GEO), "response_format")
    bitmask = torch.empty(-(-vocab // 32), dtype=torch.int32)

    def cost(compiler: GrammarCompiler, text: str, max_tokens: int | None, n: int = 200) -> float:
        grammar = compiler.compile(spec, "p")
        ids = tokenizer.encode(text, add_special_tokens=False)
        matchers = []
        for _ in range(n):
            matcher = grammar.matcher(None if max_tokens is None else len(ids) + max_tokens)
            if not all(matcher.advance(token) for token in ids):
                raise ValueError(f"{text!r} is not in the schema's language")
            matchers.append(matcher)
        start = time.perf_counter()
        for matcher in matchers:
            matcher.fill(bitmask)
        return round((time.perf_counter() - start) / n * 1e6, 1)

    prefix = '{"city": "Paris", "country": "France", "lat": '
    places = {
        "in a string": '{"city": "Paris is',
        "in a number (5 digits)": prefix + "48.856",
        "in a number (17 digits: bound at work)": prefix + "48.856123456789012",
        "after a value": prefix + "48.85, ",
    }
    rows = {
        place: {"grammar alone": cost(before, text, None), "bounded": cost(after, text, 10_000), "bounded, closing window": cost(after, text, 24)}
        for place, text in places.items()
    }
    count = (MAX_GRAMMAR_CHARS - 32) // 33
    largest = json_schema_spec({"type": "object", "properties": {f"field_{i:05d}": {"type": "integer"} for i in range(count)}}, "response_format")
    start = time.perf_counter()
    after.compile(largest, "response_format")
    compile_seconds = time.perf_counter() - start
    return {
        "per_fill_us": rows,
        "token_table_s": round(table_seconds, 2),
        "largest_schema_chars": len(largest.source),
        "largest_schema_compile_s": round(compile_seconds, 2),
    }


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
    valid = sum(constrained and _valid(r.choices[0].message.content, SCHEMA) for r in results)
    return sum(r.usage.completion_tokens for r in results), seconds, valid


def throughput(model: Path, clients: int, max_tokens: int, rounds: int) -> dict:
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as logs:
        server = start_server(model, Path(logs), "--max_num_seqs", str(clients), name="m")
        try:
            modes = (("free", False), ("json_schema", True))
            totals = {label: [0, 0.0, 0] for label, _ in modes}
            with tqdm(total=len(modes) * (1 + rounds * clients), desc="throughput requests") as bar:
                for _, constrained in modes:
                    asyncio.run(wave(server.url, 1, 8, constrained, 0, bar))  # warm-up (and the schema's compile)
                for r in range(rounds):  # modes alternate, so a busy machine slows both alike
                    for label, constrained in modes:
                        t, s, v = asyncio.run(wave(server.url, clients, max_tokens, constrained, 1000 * r, bar))
                        totals[label] = [totals[label][0] + t, totals[label][1] + s, totals[label][2] + v]
            for label, (tokens, seconds, valid) in totals.items():
                rows[label] = {"completion_tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1), "valid_json": valid}
        finally:
            server.stop()
    return rows


def chart(parse: dict, rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    names = list(parse)
    for offset, mode, color in ((-0.2, "before", "#888"), (0.2, "after", "#2a7")):
        rates = [100 * parse[n][mode]["rate"] for n in names]
        left.bar([i + offset for i in range(len(names))], rates, width=0.4, color=color, label=mode)
        for i, rate in enumerate(rates):
            left.text(i + offset, rate, f"{rate:.0f}", ha="center", va="bottom", fontsize=8)
    left.set_xticks(range(len(names)), [n.replace(": ", ":\n") for n in names], fontsize=8)
    left.set_ylabel("answers valid (%)")
    left.set_ylim(0, 110)
    left.axhline(95, color="#c33", linewidth=0.8, linestyle="--")
    left.legend(loc="lower right", fontsize=8)
    left.set_title("Parse rate, max_tokens 200")
    labels = list(rows)
    right.bar(labels, [rows[k]["tokens_per_s"] for k in labels], color=["#888", "#2a7"])
    for i, k in enumerate(labels):
        right.text(i, rows[k]["tokens_per_s"], f"{rows[k]['tokens_per_s']:.0f}", ha="center", va="bottom")
    right.set_ylabel("completion tokens / s")
    right.set_title("Throughput: JSON schema vs free")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.structured_outputs", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model directory (default: the default model)")
    parser.add_argument("--samples", type=int, default=32, help="parse rate: answers per response format and mode")
    parser.add_argument("--parse-max-tokens", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128, help="throughput: max_tokens of each request")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    model = args.model or ensure_default_model()
    parse = parse_rate(model, args.samples, args.parse_max_tokens)
    cost = mask_cost(model)
    rows = throughput(model, args.clients, args.max_tokens, args.rounds)
    ratio = rows["json_schema"]["tokens_per_s"] / rows["free"]["tokens_per_s"]
    cpu = cpu_name()
    result = {
        "model": model.name,
        "cpu": cpu,
        "parse_rate": {"samples": args.samples, "max_tokens": args.parse_max_tokens, "temperature": 0.7, "formats": parse},
        "mask_cost": cost,
        "throughput": {"clients": args.clients, "max_tokens": args.max_tokens, "rounds": args.rounds, "modes": rows, "ratio": round(ratio, 3)},
    }
    places = list(cost["per_fill_us"])
    report = (
        f"Model `{model.name}`, {cpu}, one run.\n\n"
        f"**Parse rate**: {args.samples} sampled chat answers per format (temperature 0.7, seeded), max_tokens {args.parse_max_tokens}; "
        "valid = `json.loads` reads it and it validates with `jsonschema`. Before: the grammar alone; after: numbers bounded "
        "and closing before max_tokens.\n\n"
        "| response format | before | after | finish reasons before → after | mean tokens before → after |\n|---|---|---|---|---|\n"
        + "".join(
            f"| {name} | {m['before']['valid']}/{m['before']['answers']} ({100 * m['before']['rate']:.0f} %) "
            f"| {m['after']['valid']}/{m['after']['answers']} ({100 * m['after']['rate']:.0f} %) "
            f"| {_reasons(m['before'])} → {_reasons(m['after'])} | {m['before']['mean_tokens']} → {m['after']['mean_tokens']} |\n"
            for name, m in parse.items()
        )
        + "\n**Mask cost** per constrained row and step (`Matcher.fill`, µs, SmolLM2's 49,152-token vocabulary):\n\n"
        "| place in the answer | grammar alone | bounded | bounded, closing window |\n|---|---|---|---|\n"
        + "".join(f"| {place} | {' | '.join(str(us) for us in cost['per_fill_us'][place].values())} |\n" for place in places)
        + f"\nToken table (once per tokenizer, at start-up): {cost['token_table_s']} s. Largest accepted schema "
        f"({cost['largest_schema_chars']:,} characters of optional integer properties) compiles in {cost['largest_schema_compile_s']} s.\n\n"
        f"**Throughput**: {args.clients} concurrent chat clients × {args.rounds} waves, max_tokens {args.max_tokens}:\n\n"
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
    chart(parse, rows, RESULTS / "structured-outputs.png")


def _reasons(row: dict) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in row["finish_reasons"].items())


if __name__ == "__main__":
    main()
