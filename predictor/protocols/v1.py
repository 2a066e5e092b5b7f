"""KServe V1 predict: ``{"instances": [prompt | {"prompt": ..., <sampling parameters>}], "parameters": {...}}``.

Returns ``{"predictions": [text, ...]}``, one generated text per instance. Top-level ``parameters`` apply
to every instance; an instance's own fields override them.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from ..errors import InvalidRequest
from ..generation import Generation
from .schema import SamplingFields, parse_json, validation_error


async def predict(gen: Generation, payload: Any) -> dict:
    if isinstance(payload, (bytes, str)):  # a body sent without a JSON content type
        payload = parse_json(payload)
    if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list):
        raise InvalidRequest("expected a JSON object with an 'instances' list", param="instances")
    unknown = sorted(set(payload) - {"instances", "parameters"})
    if unknown:
        raise InvalidRequest(f"unknown parameter '{unknown[0]}'", param=unknown[0])
    shared = payload.get("parameters") or {}
    if not isinstance(shared, dict):
        raise InvalidRequest("'parameters' must be an object", param="parameters")
    if not payload["instances"]:
        raise InvalidRequest("'instances' is empty", param="instances")
    requests = []  # every instance's engine request, queued together
    for i, instance in enumerate(payload["instances"]):
        if isinstance(instance, str):
            prompt, own = instance, {}
        elif isinstance(instance, dict) and isinstance(instance.get("prompt"), str):
            own = dict(instance)
            prompt = own.pop("prompt")
        else:
            raise InvalidRequest(f"instances[{i}] must be a prompt string or an object with a 'prompt' string", param=f"instances.{i}")
        try:
            fields = SamplingFields.model_validate({**shared, **own})
        except ValidationError as exc:
            raise validation_error(exc) from None
        prepared = await gen.prepare([prompt], fields, max_tokens=fields.max_tokens, first_index=i, param=f"instances.{i}")
        requests += prepared.requests
    results = await gen.complete_all(requests, param="instances")
    return {"predictions": [r.text for r in results]}
