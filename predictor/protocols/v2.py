"""Open Inference Protocol (V2) infer, over REST and gRPC: BYTES ``text_input`` [n] → BYTES ``text_output`` [n].

KServe decodes both transports into one ``InferRequest``; request ``parameters`` carry the sampling
parameters. gRPC has no float parameter type in KServe's conversion, so numbers may also be sent as
strings (``"0.7"``).
"""

from __future__ import annotations

import uuid
from typing import Any

from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from pydantic import ValidationError

from ..generation import Generation
from ..sampling import InvalidRequest
from .schema import SamplingFields, validation_error

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


async def infer(gen: Generation, model_name: str, request: InferRequest) -> InferResponse:
    inputs = {i.name: i for i in request.inputs}
    if INPUT_NAME not in inputs or len(inputs) != 1:
        raise InvalidRequest(f"expected exactly one input tensor named '{INPUT_NAME}', got {sorted(inputs)}", param="inputs")
    tensor = inputs[INPUT_NAME]
    if tensor.datatype != "BYTES":
        raise InvalidRequest(f"'{INPUT_NAME}' must be BYTES, got {tensor.datatype}", param=INPUT_NAME)
    try:
        prompts = [p.decode("utf-8") if isinstance(p, bytes) else str(p) for p in tensor.as_numpy().reshape(-1).tolist()]
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"'{INPUT_NAME}' is not valid UTF-8: {exc}", param=INPUT_NAME) from None
    except ValueError as exc:  # shape and data disagree
        raise InvalidRequest(f"'{INPUT_NAME}': {exc}", param=INPUT_NAME) from None
    if not prompts:
        raise InvalidRequest(f"'{INPUT_NAME}' has no elements", param=INPUT_NAME)
    fields = sampling_fields(request.parameters)
    requests = []
    for prompt in prompts:
        ids = gen.encode(prompt, param=INPUT_NAME)
        requests.append(gen.request(ids, fields.sampling_params(gen.max_tokens(ids, fields.max_tokens), gen.loaded.sampling_defaults)))
    results = await gen.complete_all(requests)
    output = InferOutput(name=OUTPUT_NAME, shape=[len(results)], datatype="BYTES", data=[r.text for r in results])
    # Over gRPC, answer as Triton does: the tensor serialized into raw_output_contents (length-prefixed
    # strings), which Triton's own client decodes; typed contents.bytes_contents trips its as_numpy.
    return InferResponse(model_name=model_name, infer_outputs=[output], response_id=request.id or uuid.uuid4().hex, use_binary_outputs=request.from_grpc)
