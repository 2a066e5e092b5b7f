"""Open Inference Protocol (V2) infer, over REST and gRPC: BYTES ``text_input`` [n] → BYTES ``text_output`` [n].

KServe decodes both transports into one ``InferRequest``; request ``parameters`` carry the sampling
parameters. gRPC has no float parameter type in KServe's conversion, so numbers may also be sent as
strings (``"0.7"``). The REST body (JSON, or JSON then raw tensors with the binary extension's
``Inference-Header-Content-Length``) is decoded here, before KServe's handler sees it, so that a malformed
one is a 400 naming what is wrong instead of an exception inside KServe's decoder.
"""

from __future__ import annotations

import struct
import uuid
from typing import Any

from kserve.errors import InferenceError, InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from kserve.protocol.rest.v2_datamodels import InferenceRequest
from pydantic import ValidationError

from ..errors import InvalidRequest
from ..generation import Generation
from .schema import SamplingFields, parse_json, validation_error

BINARY_HEADER = "inference-header-content-length"
# What KServe's binary-extension decoder raises on bytes that are not a well-formed request.
MALFORMED = (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError)

INPUT_NAME = "text_input"
OUTPUT_NAME = "text_output"
# Parameters some clients add for the transport itself; they do not affect generation.
TRANSPORT_PARAMETERS = {"binary_data_output", "binary_data", "binary_data_size"}

INPUT_TYPES = [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}]
OUTPUT_TYPES = [{"name": OUTPUT_NAME, "datatype": "BYTES", "shape": [-1]}]


def _value(param: Any) -> Any:
    """A plain value from a REST parameter or a gRPC ``InferParameter``."""
    if hasattr(param, "WhichOneof"):
        field = param.WhichOneof("parameter_choice")
        return getattr(param, field) if field else None
    return param


def sampling_fields(parameters: Any) -> SamplingFields:
    values = {k: _value(v) for k, v in dict(parameters or {}).items() if k not in TRANSPORT_PARAMETERS}
    try:
        return SamplingFields.model_validate(values)
    except ValidationError as exc:
        raise validation_error(exc) from None


def decode_rest(body: bytes, headers: dict[str, str], model_name: str) -> InferRequest:
    """A V2 REST body as KServe's ``InferRequest``; ``InvalidRequest`` for anything malformed."""
    json_length = headers.get(BINARY_HEADER)
    if json_length is not None:
        if not json_length.isdigit() or int(json_length) > len(body):
            raise InvalidRequest(f"{BINARY_HEADER} must be the length of the request's JSON part (at most the body's {len(body)} bytes), got {json_length!r}")
        _check_binary_sizes(parse_json(body[: int(json_length)]), len(body) - int(json_length))
        try:
            return InferRequest.from_bytes(body, int(json_length), model_name)
        except (InvalidInput, InferenceError) as exc:  # InferenceError: BYTES that are not UTF-8
            raise InvalidRequest(f"malformed V2 binary request: {exc.reason}") from None
        except MALFORMED as exc:
            raise InvalidRequest(f"malformed V2 binary request (JSON header and raw tensors disagree): {type(exc).__name__}: {exc}") from None
    data = parse_json(body)
    try:
        request = InferenceRequest.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    return InferRequest.from_inference_request(request, model_name)


def _check_binary_sizes(header: Any, raw_bytes: int) -> None:
    """The binary extension's JSON header must account for every raw byte after it: the inputs' ``binary_data_size``
    add up to exactly what follows (KServe's decoder would read a shorter tensor, or ignore the rest)."""
    inputs = header.get("inputs") if isinstance(header, dict) else None
    if not isinstance(inputs, list):
        raise InvalidRequest("the binary request's JSON header needs an 'inputs' list", param="inputs")
    declared = 0
    for i, tensor in enumerate(inputs):
        size = ((tensor.get("parameters") or {}) if isinstance(tensor, dict) else {}).get("binary_data_size", 0)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidRequest(f"inputs[{i}].parameters.binary_data_size must be a byte count, got {size!r}", param=f"inputs.{i}.parameters.binary_data_size")
        declared += size
    if declared != raw_bytes:
        raise InvalidRequest(f"the inputs' binary_data_size add up to {declared} bytes, but {raw_bytes} bytes follow the JSON header", param="inputs")


def prompts_of(tensor: Any) -> list[str]:
    """The prompts of the ``text_input`` tensor: every element a string (REST) or UTF-8 bytes (binary data, gRPC)."""
    try:
        values = tensor.as_numpy().reshape(-1).tolist()
    except struct.error as exc:
        raise InvalidRequest(
            f"'{INPUT_NAME}' has malformed BYTES data (each element is a 4-byte little-endian length, then that many bytes): {exc}", param=INPUT_NAME
        ) from None
    except ValueError as exc:  # shape and data disagree
        raise InvalidRequest(f"'{INPUT_NAME}': {exc}", param=INPUT_NAME) from None
    prompts = []
    for i, value in enumerate(values):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidRequest(f"'{INPUT_NAME}' element {i} is not valid UTF-8: {exc}", param=INPUT_NAME) from None
        elif not isinstance(value, str):
            raise InvalidRequest(f"'{INPUT_NAME}' element {i} is {type(value).__name__}, not a string: BYTES elements are prompts", param=INPUT_NAME)
        prompts.append(value)
    return prompts


async def infer(gen: Generation, model_name: str, request: InferRequest) -> InferResponse:
    inputs = {i.name: i for i in request.inputs}
    if INPUT_NAME not in inputs or len(inputs) != 1:
        raise InvalidRequest(f"expected exactly one input tensor named '{INPUT_NAME}', got {sorted(inputs)}", param="inputs")
    tensor = inputs[INPUT_NAME]
    if tensor.datatype != "BYTES":
        raise InvalidRequest(f"'{INPUT_NAME}' must be BYTES, got {tensor.datatype}", param=INPUT_NAME)
    prompts = prompts_of(tensor)
    if not prompts:
        raise InvalidRequest(f"'{INPUT_NAME}' has no elements", param=INPUT_NAME)
    fields = sampling_fields(request.parameters)
    prepared = await gen.prepare(prompts, fields, max_tokens=fields.max_tokens, param=INPUT_NAME)
    results = await gen.complete_all(prepared.requests, param=INPUT_NAME)
    output = InferOutput(name=OUTPUT_NAME, shape=[len(results)], datatype="BYTES", data=[r.text for r in results])
    # Over gRPC, answer as Triton does: the tensor serialized into raw_output_contents (length-prefixed
    # strings), which Triton's own client decodes; typed contents.bytes_contents trips its as_numpy.
    return InferResponse(model_name=model_name, infer_outputs=[output], response_id=request.id or uuid.uuid4().hex, use_binary_outputs=request.from_grpc)
