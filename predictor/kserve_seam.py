"""Everything this predictor takes from KServe's internals, in one place (``tests/test_kserve_seam.py`` pins them).

KServe (``kserve==0.21.0``, pinned in pyproject.toml) gives the FastAPI app, the V1/V2 REST routes, the V2 gRPC
service and the data plane behind them. This module is where we step into them:

- ``PredictorModelServer`` (a ``kserve.ModelServer``) starts KServe's REST server with our error handlers installed
  over KServe's (``PredictorRESTServer``), and its gRPC server with our interceptor and servicer
  (``PredictorGRPCServer``, ``PredictorServicer``).
- ``install_routes`` adds the routes that must answer before KServe's (the app matches routes in order):
  liveness and readiness (false while draining or once the engine died), the V2 REST infer (its body decoded
  and checked here, ``protocols/v2.py``), and the model-repository load/unload routes, which answer 404 unless
  ``--enable_repository_routes``.
- the drain on SIGTERM (readiness false, new requests 503, accepted ones finish, exit 0) and the exit on a dead
  engine (probes fail, exit 1 so that Kubernetes restarts the pod).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from concurrent import futures
from typing import Any

import grpc
import kserve
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
from kserve.model_server import app as kserve_app
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.infer_type import InferRequest, InferResponse
from kserve.protocol.rest.server import RESTServer
from kserve.protocol.rest.v2_endpoints import V2Endpoints
from kserve.utils.utils import to_headers

from .errors import InvalidRequest, PredictorError, RouteDisabled
from .model import LLMModel
from .protocols import v2
from .protocols.errors import install_error_handlers
from .protocols.grpc_calls import PredictorInterceptor
from .protocols.middleware import ApiKeyMiddleware, ApiKeys, BodyLimitMiddleware, RequestIdMiddleware

logger = logging.getLogger("kserve")  # KServe configures this logger's handlers

# Seconds between a dead engine and the servers' stop: the failed requests' answers go out first.
DEAD_ENGINE_EXIT_DELAY = 1.0


def fastapi_app() -> FastAPI:
    """KServe's application object: its REST server serves this very app (``kserve.model_server:app``)."""
    return kserve_app


class RepositoryRoutes:
    """The V2 model-repository extension (load / unload) for the one served model, off unless enabled."""

    def __init__(self, model: LLMModel, enabled: bool):
        self.model = model
        self.enabled = enabled

    def _check(self, name: str) -> None:
        if not self.enabled:
            raise RouteDisabled("the model-repository routes (load, unload) are disabled; start the server with --enable_repository_routes to use them")
        if name != self.model.name:
            raise InvalidRequest(f"model {name} is not found; this server serves '{self.model.name}'", param="model", status=404, code="model_not_found")

    async def load(self, name: str) -> None:
        self._check(name)
        if not await asyncio.to_thread(self.model.reload):
            raise PredictorError(f"model {name} did not become ready", status=503, code="not_ready")

    async def unload(self, name: str) -> None:
        self._check(name)
        await asyncio.to_thread(self.model.unload)


class PredictorServicer(InferenceServicer):
    """KServe's V2 gRPC servicer, with ModelInfer decoding checked and the repository methods ours."""

    def __init__(self, data_plane, model_repository_extension, repository: RepositoryRoutes):
        super().__init__(data_plane, model_repository_extension)
        self.repository = repository

    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.repository.model.dead is None)

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        headers = to_headers(context)
        self.validate_grpc_request(request)
        try:
            infer_request = InferRequest.from_grpc(request)
        except v2.MALFORMED as exc:
            raise InvalidRequest(f"malformed ModelInferRequest: {type(exc).__name__}: {exc}") from None
        response, _ = await self._data_plane.infer(request=infer_request, headers=headers, model_name=request.model_name)
        if isinstance(response, InferResponse):
            return response.to_grpc()
        return response

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context) -> pb.RepositoryModelLoadResponse:
        await self.repository.load(request.model_name)
        return pb.RepositoryModelLoadResponse(model_name=request.model_name, isLoaded=True)

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context) -> pb.RepositoryModelUnloadResponse:
        await self.repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse(model_name=request.model_name, isUnloaded=True)


class PredictorGRPCServer(GRPCServer):
    """KServe's gRPC server with ``PredictorInterceptor`` (instead of KServe's, which logs a traceback per 400) and
    ``PredictorServicer``."""

    def __init__(self, port: int, data_plane, model_repository_extension, options: dict, grace_period: int, servicer: PredictorServicer, keys: ApiKeys | None):
        super().__init__(port, data_plane, model_repository_extension, kwargs=options, grace_period=grace_period)
        self.servicer = servicer
        self.keys = keys

    async def start(self, max_workers: int) -> None:
        self._server = grpc.aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(PredictorInterceptor(self.keys),),
            options=[
                ("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                ("grpc.max_receive_message_length", self._kwargs.get("grpc_max_receive_message_length")),
            ],
        )
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, self._server)
        self._server.add_insecure_port(f"[::]:{self._port}")
        logger.info("Starting gRPC server on [::]:%d with %d workers", self._port, max_workers)
        await self._server.start()
        await self._server.wait_for_termination()


class PredictorRESTServer(RESTServer):
    """KServe's REST server with this predictor's error handlers over KServe's, and its middleware around KServe's
    (so that the request id is set for every line logged about a request, KServe's timing lines included)."""

    def __init__(self, *args, middleware: list[tuple[type, dict]], **kwargs):
        super().__init__(*args, **kwargs)
        self.middleware = middleware

    def _add_middlewares(self, app: FastAPI) -> None:
        super()._add_middlewares(app)
        for cls, options in self.middleware:  # the last added runs first
            app.add_middleware(cls, **options)

    def _add_exception_handlers(self, app: FastAPI) -> None:
        super()._add_exception_handlers(app)
        install_error_handlers(app)


class PredictorModelServer(kserve.ModelServer):
    """KServe's ModelServer for one ``LLMModel``: our REST and gRPC servers, the drain on SIGTERM/SIGINT, the exit on a
    dead engine.

    Drain: readiness turns false and new requests get 503 (gRPC UNAVAILABLE) at once; accepted requests finish (up to
    the grace period); then the HTTP and gRPC servers stop and the process exits 0. A dead engine: liveness and
    readiness fail at once, the servers stop a second later, and ``exit_code`` is 1.
    """

    def __init__(self, model: LLMModel, options: argparse.Namespace, api_keys: ApiKeys | None, repository_routes: bool):
        super().__init__(
            grace_period=int(options.shutdown_grace_period),
            http_port=options.http_port,
            grpc_port=options.grpc_port,
            enable_grpc=options.enable_grpc,
            max_threads=options.max_threads,
            max_asyncio_workers=options.max_asyncio_workers,
            enable_latency_logging=options.enable_latency_logging,
            access_log_format=options.access_log_format,
            event_loop=options.event_loop,
            timeout_keep_alive=options.timeout_keep_alive,
            ssl_certfile=options.ssl_certfile,
            ssl_keyfile=options.ssl_keyfile,
        )
        self.model = model
        self.options = options
        self.api_keys = api_keys
        self.repository = RepositoryRoutes(model, repository_routes)
        self.drain_grace_period = options.shutdown_grace_period
        self.draining = False
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._v2 = V2Endpoints(self.dataplane, self.model_repository_extension)
        model.on_engine_dead = self._engine_died

    # ---- routes that answer before KServe's ----------------------------------------------------------

    def install_routes(self, app: FastAPI) -> None:
        app.add_api_route("/", self.live, methods=["GET"])
        app.add_api_route("/v2/health/live", self.live, methods=["GET"])
        app.add_api_route("/v2/health/ready", self.ready, methods=["GET"])
        for path in ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{model_version}/infer"):
            app.add_api_route(path, self.infer, methods=["POST"], response_model=None)
        app.add_api_route("/v2/repository/models/{model_name}/load", self.repository_load, methods=["POST"])
        app.add_api_route("/v2/repository/models/{model_name}/unload", self.repository_unload, methods=["POST"])
        app.router.lifespan_context = self.lifespan

    async def live(self) -> JSONResponse:
        dead = self.model.dead
        if dead is not None:
            return JSONResponse(status_code=503, content={"status": "dead", "reason": dead})
        return JSONResponse(status_code=200, content={"status": "alive"})

    async def ready(self) -> JSONResponse:
        ready = self.model.ready and not self.draining and self.model.dead is None
        return JSONResponse(status_code=200 if ready else 503, content={"ready": ready})

    async def infer(self, request: Request, response: Response, model_name: str, model_version: str | None = None) -> Any:
        body = await request.body()
        infer_request = v2.decode_rest(body, dict(request.headers), model_name)
        return await self._v2.infer(request, response, model_name, infer_request, model_version)

    async def repository_load(self, model_name: str) -> dict:
        await self.repository.load(model_name)
        return {"name": model_name, "load": True}

    async def repository_unload(self, model_name: str) -> dict:
        await self.repository.unload(model_name)
        return {"name": model_name, "unload": True}

    def middleware(self) -> list[tuple[type, dict]]:
        """Ours, innermost first: the body's limits, then the API key, then (outermost) the request id."""
        layers: list[tuple[type, dict]] = [(BodyLimitMiddleware, {"max_bytes": self.options.max_body_bytes, "read_timeout": self.options.body_read_timeout})]
        if self.api_keys is not None:
            layers.append((ApiKeyMiddleware, {"keys": self.api_keys}))
        layers.append((RequestIdMiddleware, {}))
        return layers

    # ---- start, drain, exit ------------------------------------------------------------------------

    def register_signal_handler(self) -> None:
        """Replaced by ``lifespan``, which installs the handlers once the event loop serves."""

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """Install the drain on SIGTERM/SIGINT once uvicorn serves (it installs its own handlers first)."""
        self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, lambda sig=sig: asyncio.ensure_future(self.drain(sig)))
        logger.info("SIGTERM drains for up to %gs (--shutdown_grace_period)", self.drain_grace_period)
        yield

    def start(self, models: list[LLMModel]) -> None:
        """KServe's ``ModelServer.start`` for one process, with our REST and gRPC servers."""
        self._register_and_check_atleast_one_model_is_ready(models)
        self._rest_server = PredictorRESTServer(
            FASTAPI_APP_IMPORT_STRING,
            self.dataplane,
            self.model_repository_extension,
            self.http_port,
            access_log_format=self.access_log_format,
            workers=1,
            grace_period=self.grace_period,
            event_loop=self.event_loop,
            timeout_keep_alive=self.timeout_keep_alive,
            ssl_certfile=self.ssl_certfile,
            ssl_keyfile=self.ssl_keyfile,
            middleware=self.middleware(),
        )
        self.servers.append(self._rest_server.start())
        if self.enable_grpc:
            servicer = PredictorServicer(self.dataplane, self.model_repository_extension, self.repository)
            self._grpc_server = PredictorGRPCServer(
                self.grpc_port, self.dataplane, self.model_repository_extension, vars(self.options), self.grace_period, servicer, self.api_keys
            )
            self.servers.append(self._grpc_server.start(self.max_threads))
        self.setup_event_loop()
        asyncio.run(self._serve())

    async def _stop_servers(self, sig: int | None = None) -> None:
        if self._grpc_server is not None:
            await self._grpc_server.stop(sig)
        if self._rest_server is not None:
            self._rest_server._server.should_exit = True

    async def drain(self, sig: int) -> None:
        if self.draining:
            return
        self.draining = True
        self.model.closing = True
        logger.info("signal %d: draining (readiness false, new requests 503, up to %gs for requests in flight)", sig, self.drain_grace_period)
        self.model.ready = False
        engine = self.model.engine_handle
        finished = True
        if engine is not None:
            engine.begin_drain()
            finished = await engine.wait_idle(self.drain_grace_period)
        logger.info("drain %s; stopping servers", "complete" if finished else "timed out")
        await self._stop_servers(sig)
        self.model.stop()

    def _engine_died(self, reason: str) -> None:
        """Called from the engine thread: stop serving, and exit 1 for Kubernetes to restart the pod."""
        self.exit_code = 1
        self.model.closing = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._exit_dead(reason)))

    async def _exit_dead(self, reason: str) -> None:
        logger.critical("the engine died (%s): liveness and readiness fail; stopping the servers, exit code 1", reason)
        await asyncio.sleep(DEAD_ENGINE_EXIT_DELAY)
        await self._stop_servers()
