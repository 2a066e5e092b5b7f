"""vLLM's /tokenize and /detokenize on the real server: counts equal what the completion routes report
in ``usage.prompt_tokens``, ids round-trip, and bad requests are 4xx naming the field."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import MODEL_NAME

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does the for statement do?"}]


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def test_tokenize_counts_what_completions_count(server, client):
    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    prompt = "The for statement iterates over the items of a sequence"
    answer = client.post("/tokenize", json={"model": MODEL_NAME, "prompt": prompt, "return_token_strs": True}).json()
    usage = sdk.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1).usage
    assert answer["count"] == usage.prompt_tokens == len(answer["tokens"]) == len(answer["token_strs"]) > 3
    assert answer["max_model_len"] == sdk.models.list().data[0].model_extra["max_model_len"]
    assert client.post("/detokenize", json={"model": MODEL_NAME, "tokens": answer["tokens"]}).json() == {"prompt": prompt}

    chat = client.post("/tokenize", json={"messages": MESSAGES}).json()
    usage = sdk.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=1).usage
    assert chat["count"] == usage.prompt_tokens
    bare = client.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert bare["count"] < chat["count"] and chat["tokens"][: bare["count"]] == bare["tokens"]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"prompt": "a", "messages": MESSAGES}, 400, "messages"),
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"prompt": "a", "model": "other"}, 404, "model"),
        ("/tokenize", {"prompt": "a", "n": 2}, 400, "n"),
        ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
        ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ],
)
def test_bad_tokenize_requests_name_the_field(client, path, body, status, param):
    response = client.post(path, json=body)
    assert response.status_code == status
    assert response.json()["error"]["param"] == param
    assert client.post("/tokenize", json={"prompt": "still serving"}).status_code == 200
