"""What every gRPC call passes before KServe's servicer sees it: request id, API key, decoding, and its status code.

The interceptor wraps each unary method of KServe's ``GRPCInferenceService``:

- the request id from metadata ``x-request-id`` (or a new one), set for the call's context and sent back as
  initial metadata ``x-request-id``;
- with ``--api_key``, metadata ``authorization: Bearer <key>`` on every method but the probes'
  (``OPEN_METHODS``), else ``UNAUTHENTICATED``;
- the request bytes are decoded here, so a message that is not a protobuf of the method's type is
  ``INVALID_ARGUMENT`` (gRPC itself would answer ``UNKNOWN``);
- every error becomes its status from ``predictor/errors.py``'s table (KServe's own errors included): client errors
  as one log line, anything unexpected as ``INTERNAL`` with the request id only, its traceback in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError
from grpc_interceptor.exceptions import GrpcException

from ..errors import InvalidRequest, PredictorError, Unauthorized, from_kserve, internal_error
from ..request_context import HEADER, accept_request_id, enter, leave
from .errors import log_client_error
from .middleware import ApiKeys

logger = logging.getLogger("kserve")  # KServe configures this logger's handlers

# Probes never need the key.
OPEN_METHODS = frozenset({"ServerLive", "ServerReady", "ModelReady"})


class PredictorInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: ApiKeys | None = None):
        self.keys = keys

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:  # every method of the V2 service is unary
            return handler
        method = details.method.rsplit("/", 1)[-1]
        metadata = {key: value for key, value in details.invocation_metadata or () if isinstance(value, str)}
        behavior, deserialize = handler.unary_unary, handler.request_deserializer

        async def call(raw: bytes, context: grpc.aio.ServicerContext):
            try:
                request_id = accept_request_id(metadata.get(HEADER))
            except InvalidRequest as exc:
                await context.abort(exc.grpc_code, exc.message)
            token = enter(request_id, metadata)
            try:
                await context.send_initial_metadata(((HEADER, request_id),))
                if self.keys is not None and method not in OPEN_METHODS and not self.keys.authorized((metadata.get("authorization") or "").encode()):
                    raise Unauthorized("a valid API key is required: send metadata 'authorization: Bearer <key>'")
                try:
                    request = deserialize(raw) if deserialize is not None else raw
                except DecodeError as exc:
                    raise InvalidRequest(f"the request is not a valid {method} message: {exc}") from None
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except GrpcException as exc:  # raised as a status by design (grpc_interceptor's exceptions)
                code, message = exc.status_code, exc.details
            except Exception as exc:
                problem = exc if isinstance(exc, PredictorError) else from_kserve(exc)
                if problem is None:
                    logger.error("gRPC %s failed", method, exc_info=exc)
                    problem = PredictorError(internal_error(request_id), status=500)
                elif problem.client_error:
                    log_client_error(f"gRPC {method}", problem)
                code, message = problem.grpc_code, problem.message
            finally:
                leave(token)
            await context.abort(code, message)

        return grpc.unary_unary_rpc_method_handler(call, request_deserializer=None, response_serializer=handler.response_serializer)
