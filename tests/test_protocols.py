"""Every protocol, with the clients applications use: KServe's REST and gRPC clients (V2), raw HTTP (V1, generate).

Greedy output is the same through every protocol and equals ``model.generate`` run directly on the model.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch
from conftest import MODEL_NAME
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

PROMPTS = ["The for statement", "Exceptions are", "A class definition", "x"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def reference(hf_model) -> dict[str, str]:
    """Greedy continuations from transformers' own ``generate``, decoded the same way."""
    model, tokenizer = hf_model
    out = {}
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        out[prompt] = tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
    assert any(text.strip() for text in out.values()), "the tiny model should produce some visible text"
    return out


def v2_request(prompts: list[str], **params) -> InferRequest:
    tensor = InferInput(name="text_input", shape=[len(prompts)], datatype="BYTES")
    tensor.set_data_from_numpy(__import__("numpy").array([p.encode() for p in prompts], dtype=object))
    return InferRequest(model_name=MODEL_NAME, infer_inputs=[tensor], parameters=params)


def test_openai_greedy_equals_model_generate(server, reference):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    for prompt, expected in reference.items():
        assert client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0).choices[0].text == expected


def test_v2_rest_with_kserve_client(server, reference):
    async def run():
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
        response = await client.infer(server.url, v2_request(PROMPTS, max_tokens=MAX_TOKENS, temperature=0), model_name=MODEL_NAME)
        await client.close()
        return response

    response = asyncio.run(run())
    output = response.outputs[0]
    assert output.name == "text_output" and output.datatype == "BYTES" and output.shape == [len(PROMPTS)]
    assert [t.decode() if isinstance(t, bytes) else t for t in output.data] == [reference[p] for p in PROMPTS]


def test_v2_grpc_with_kserve_client(server, reference):
    async def run():
        client = InferenceGRPCClient(f"127.0.0.1:{server.grpc_port}", timeout=60)
        # KServe's gRPC parameter conversion has no float type: numbers travel as int64 or as strings.
        response = await client.infer(v2_request(PROMPTS, max_tokens=MAX_TOKENS, temperature="0"))
        await client.close()
        return response

    response = asyncio.run(run())
    texts = [t.decode() for t in response.outputs[0].as_numpy()]  # the answer travels as raw_output_contents, as Triton's
    assert texts == [reference[p] for p in PROMPTS]


TRITON_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as triton

port, model, prompts, max_tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
client = triton.InferenceServerClient(f"127.0.0.1:{port}")
tensor = triton.InferInput("text_input", [len(prompts)], "BYTES")
tensor.set_data_from_numpy(np.array([p.encode() for p in prompts], dtype=np.object_))
result = client.infer(model, [tensor], parameters={"max_tokens": max_tokens, "temperature": "0"}, client_timeout=60)
texts = result.as_numpy("text_output")
print(json.dumps({"shape": list(texts.shape), "texts": [t.decode() for t in texts],
                  "typed_contents": result.get_response().outputs[0].HasField("contents")}))
client.close()
"""


def test_v2_grpc_with_triton_client(server, reference):
    """Triton's own gRPC client: ``as_numpy`` reads the answer from ``raw_output_contents``, as from Triton.

    In its own process: tritonclient's and KServe's generated protos both define the ``inference`` package,
    and one process's protobuf registry refuses the second."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", TRITON_CLIENT, str(server.grpc_port), MODEL_NAME, json.dumps(PROMPTS), str(MAX_TOKENS)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["shape"] == [len(PROMPTS)]
    assert result["texts"] == [reference[p] for p in PROMPTS]
    assert result["typed_contents"] is False


def test_v2_grpc_invalid_parameter_is_invalid_argument(server):
    import grpc

    async def run():
        client = InferenceGRPCClient(f"127.0.0.1:{server.grpc_port}", timeout=30)
        try:
            await client.infer(v2_request(["x"], max_tokenz=3))
        finally:
            await client.close()

    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(run())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_tokenz" in err.value.details()


def test_v1_predict(server, reference):
    body = {"instances": [PROMPTS[0], {"prompt": PROMPTS[1], "max_tokens": MAX_TOKENS}], "parameters": {"temperature": 0, "max_tokens": MAX_TOKENS}}
    r = httpx.post(f"{server.url}/v1/models/{MODEL_NAME}:predict", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json() == {"predictions": [reference[PROMPTS[0]], reference[PROMPTS[1]]]}
    assert httpx.get(f"{server.url}/v1/models/{MODEL_NAME}").json()["ready"] is True


def test_generate_and_generate_stream(server, reference):
    body = {"text_input": PROMPTS[2], "parameters": {"max_tokens": MAX_TOKENS, "temperature": 0}}
    r = httpx.post(f"{server.url}/v2/models/{MODEL_NAME}/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["model_name"] == MODEL_NAME and r.json()["text_output"] == reference[PROMPTS[2]]
    # Triton style: parameters beside text_input.
    r2 = httpx.post(f"{server.url}/v2/models/{MODEL_NAME}/generate", json={"text_input": PROMPTS[2], "max_tokens": MAX_TOKENS, "temperature": 0}, timeout=60)
    assert r2.json()["text_output"] == reference[PROMPTS[2]]
    with httpx.stream("POST", f"{server.url}/v2/models/{MODEL_NAME}/generate_stream", json=body, timeout=60) as s:
        events = [json.loads(line[len("data: ") :]) for line in s.iter_lines() if line.startswith("data: ")]
    assert "".join(e["text_output"] for e in events) == reference[PROMPTS[2]]
    assert events[-1]["finish_reason"] in ("stop", "length")


def test_v2_metadata_and_health(server):
    meta = httpx.get(f"{server.url}/v2/models/{MODEL_NAME}").json()
    assert meta["inputs"] == [{"name": "text_input", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}]
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
    assert httpx.get(f"{server.url}/v2/health/ready").json()["ready"] is True
    assert httpx.get(f"{server.url}/v2/models/{MODEL_NAME}/ready").json()["ready"] is True
