"""helm test: the deployed service answers /v1/models, a completion and a streaming chat completion.

With an API key (API_KEY_FILE, the mounted auth.apiKey Secret: one key, or the predictor's comma-separated keys) the
requests send the first key as `Authorization: Bearer <key>`, and a request without it must be refused with 401.
"""

import json
import os
import sys

import httpx

base, model = os.environ["BASE_URL"], os.environ["MODEL_NAME"]
verify = os.environ.get("TLS_VERIFY", "true") != "false"  # false: a self-signed certificate (LLMInferenceService)
headers = {}
if key_file := os.environ.get("API_KEY_FILE"):
    with open(key_file, encoding="utf-8") as f:
        key = f.read().split(",")[0].strip()
    assert key, f"{key_file} holds no API key"
    headers["Authorization"] = f"Bearer {key}"
with httpx.Client(base_url=base, timeout=120, verify=verify, headers=headers) as client:
    if headers:
        refused = httpx.get(f"{base}/v1/models", timeout=120, verify=verify)
        assert refused.status_code == 401, f"/v1/models without the API key answered {refused.status_code}, not 401"
    models = client.get("/v1/models").raise_for_status().json()
    assert model in [m["id"] for m in models["data"]], models
    completion = client.post("/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 8}).raise_for_status().json()
    assert completion["usage"]["completion_tokens"] >= 1, completion
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as stream:
        stream.raise_for_status()
        events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    assert all("choices" in json.loads(e) for e in events[:-1])
print("ok: /v1/models, completion, streaming chat completion" + (", a request without the API key refused" if headers else ""))
sys.exit(0)
