"""The KServe internals ``predictor/kserve_seam.py`` relies on, pinned: this fails on a KServe that moved them.

Each check names what the seam uses; the served behaviour on top of them is tested over loopback elsewhere
(drain, probes, repository routes, gRPC status codes)."""

from __future__ import annotations

import inspect
from importlib import metadata

import kserve
from conftest import REPO
from fastapi import FastAPI
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.infer_type import InferRequest
from kserve.protocol.rest.server import RESTServer
from kserve.protocol.rest.v2_endpoints import V2Endpoints

from predictor import kserve_seam


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_the_pinned_kserve_is_installed():
    pinned = next(line for line in (REPO / "pyproject.toml").read_text().splitlines() if '"kserve==' in line)
    assert metadata.version("kserve") == pinned.split("==")[1].split('"')[0]


def test_model_server_internals():
    assert isinstance(kserve_seam.fastapi_app(), FastAPI)
    init = params(kserve.ModelServer.__init__)
    for name in ("http_port", "grpc_port", "enable_grpc", "max_threads", "max_asyncio_workers", "grace_period", "ssl_certfile", "ssl_keyfile", "timeout_keep_alive"):
        assert name in init, name
    for method in ("_register_and_check_atleast_one_model_is_ready", "setup_event_loop", "_serve", "register_signal_handler"):
        assert callable(getattr(kserve.ModelServer, method)), method
    server = kserve.ModelServer()
    assert {"dataplane", "model_repository_extension", "servers", "_rest_server", "_grpc_server"} <= set(vars(server))


def test_rest_server_internals():
    assert params(RESTServer.__init__)[1:5] == ["app", "data_plane", "model_repository_extension", "http_port"]
    for method in ("_add_middlewares", "_add_exception_handlers", "create_application", "start"):
        assert method in vars(RESTServer), method
    source = inspect.getsource(RESTServer.create_application)
    assert source.index("_add_middlewares") < source.index("_register_endpoints") < source.index("_add_exception_handlers")
    assert "self._server" in inspect.getsource(RESTServer.__init__)  # uvicorn.Server: should_exit stops it
    assert "create_application" in inspect.getsource(RESTServer.start)  # KServe's routes come after ours: install_routes runs first


def test_grpc_server_and_servicer_internals():
    assert params(GRPCServer.__init__)[1:] == ["port", "data_plane", "model_repository_extension", "kwargs", "grace_period"]
    assert {"_port", "_kwargs", "_server"} <= set(inspect.getsource(GRPCServer.__init__).replace("self.", " ").split())
    assert "stop" in vars(GRPCServer)
    for method in ("ModelInfer", "ServerLive", "RepositoryModelLoad", "RepositoryModelUnload", "validate_grpc_request"):
        assert method in vars(InferenceServicer), method
    assert "_data_plane" in inspect.getsource(InferenceServicer.__init__)


def test_v2_endpoints_and_infer_request():
    assert params(V2Endpoints.infer)[1:] == ["raw_request", "raw_response", "model_name", "request_body", "model_version"]
    assert params(InferRequest.from_bytes) == ["req_bytes", "json_length", "model_name"]  # a classmethod: cls is bound
    for factory in ("from_grpc", "from_inference_request"):
        assert callable(getattr(InferRequest, factory))
