"""One request recipe for every protocol: ``Generation.prepare`` on a real engine (in process), and no protocol
adapter reaching past it into the loaded model."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

from predictor.engine import Engine, EngineConfig
from predictor.errors import InvalidRequest
from predictor.generation import DEFAULT_MAX_TOKENS, ChatPrompt, Generation
from predictor.loading import load_model
from predictor.protocols.schema import SamplingFields

PROTOCOLS = Path(__file__).resolve().parents[1] / "predictor" / "protocols"


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    loaded = load_model(tiny_model_dir, dtype="float32")
    loaded.sampling_defaults = {"temperature": 0.3, "top_p": 0.9}  # as a generation_config.json would give them
    engine = Engine(loaded, EngineConfig(max_num_seqs=4))
    engine.start()
    yield Generation(loaded, engine, "served")
    engine.stop()


def prepare(gen: Generation, *args, **kwargs):
    return asyncio.run(gen.prepare(*args, **kwargs))


def test_prompts_choices_seeds_and_defaults(gen):
    fields = SamplingFields(seed=5, top_p=0.5)
    prepared = prepare(gen, ["hello", [1, 2, 3]], fields, max_tokens=None, n=2, model="served")
    assert [i for i, _ in prepared.jobs] == [0, 1, 2, 3]
    assert prepared.prompt_ids[1] == [1, 2, 3] and prepared.prompt_tokens == len(prepared.prompt_ids[0]) + 3
    requests = prepared.requests
    assert [r.prompt_ids for r in requests] == [prepared.prompt_ids[0]] * 2 + [[1, 2, 3]] * 2
    assert [r.params.seed for r in requests] == [5, 6, 5, 6]  # choice j of a seeded request: seed + j
    assert {r.params.max_tokens for r in requests} == {DEFAULT_MAX_TOKENS}
    # the model's defaults fill what the request leaves unset; what it sets wins
    assert {(r.params.temperature, r.params.top_p) for r in requests} == {(0.3, 0.5)}
    assert all(r.lora is None for r in requests) and len({r.request_id for r in requests}) == 4


def test_chat_defaults_to_the_rest_of_the_context(gen):
    prepared = prepare(gen, [ChatPrompt([{"role": "user", "content": "hi"}])], SamplingFields(), max_tokens=None, default_max_tokens=None)
    (ids,) = prepared.prompt_ids
    room = min(gen.max_model_len, gen.engine.max_cached_tokens) - len(ids)
    assert prepared.requests[0].params.max_tokens == room > DEFAULT_MAX_TOKENS


def test_errors_name_the_model_and_the_parameter(gen):
    with pytest.raises(InvalidRequest) as err:
        prepare(gen, ["hello"], SamplingFields(), max_tokens=None, model="other")
    assert err.value.status == 404 and err.value.param == "model" and "'served'" in err.value.message
    with pytest.raises(InvalidRequest) as err:
        prepare(gen, [[10**6]], SamplingFields(), max_tokens=None, param="text_input")
    assert err.value.param == "text_input" and "outside the vocabulary" in err.value.message
    with pytest.raises(InvalidRequest) as err:
        prepare(gen, ["hello"], SamplingFields(), max_tokens=gen.max_model_len)
    assert err.value.param == "max_tokens"


def test_no_protocol_adapter_touches_the_loaded_model():
    """Adapters go through ``Generation`` (prepare, resolve_model, decode, ...), never ``gen.loaded``."""
    reached = [
        f"{path.name}:{node.lineno}"
        for path in sorted(PROTOCOLS.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "loaded"
    ]
    assert reached == []
