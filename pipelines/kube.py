"""The few Kubernetes API calls the pipeline's steps make, for the custom resources they manage, through the
official ``kubernetes`` client (its ``ApiClient``: configuration, auth, TLS; no typed API exists for these kinds).

    cluster = Cluster()                                   # in a pod: its service account; else the kubeconfig
    cluster.apply(isvc)                                   # server-side apply (deploy step)
    cluster.create(trainjob); cluster.get(trainjob)       # TrainJob (train step on Kubeflow Trainer)

Each call names the object and the server in its error. The verbs used are those in ``manifests/rbac/role.yaml``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

FIELD_MANAGER = "kserve-llm-pipeline"
# kind → plural of every resource the steps touch (the API path needs the plural).
PLURALS = {"InferenceService": "inferenceservices", "LLMInferenceService": "llminferenceservices", "TrainJob": "trainjobs"}


class KubeError(RuntimeError):
    """No usable configuration, an unreachable API server, or an API error (with the server's message)."""


def path(api_version: str, kind: str, namespace: str, name: str = "") -> str:
    """``/apis/GROUP/VERSION/namespaces/NS/PLURAL[/NAME]``."""
    if kind not in PLURALS:
        raise KubeError(f"the pipeline does not manage {kind} objects (known: {', '.join(PLURALS)})")
    return f"/apis/{api_version}/namespaces/{namespace}/{PLURALS[kind]}" + (f"/{name}" if name else "")


def object_path(obj: dict) -> str:
    return path(obj["apiVersion"], obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])


@dataclass
class Cluster:
    """A connection: ``kubeconfig``/``context`` when given; else in-cluster config; else the default kubeconfig."""

    kubeconfig: str | None = None
    context: str | None = None
    api: object = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from kubernetes import client, config

        try:
            if self.kubeconfig or self.context:
                self.api = config.new_client_from_config(config_file=self.kubeconfig, context=self.context)
                return
            try:
                config.load_incluster_config()
                self.api = client.ApiClient()
            except config.ConfigException:
                self.api = config.new_client_from_config()
        except (config.ConfigException, OSError) as exc:
            raise KubeError(f"no Kubernetes configuration (not in a cluster, no usable kubeconfig): {exc}; dry_run validates without one") from None

    def _call(self, method: str, api_path: str, body: dict | None = None, query: list | None = None, content_type: str = "application/json") -> dict:
        from kubernetes.client.exceptions import ApiException

        try:
            data, _, _ = self.api.call_api(
                api_path,
                method,
                query_params=query or [],
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body,
                response_type="object",
                auth_settings=["BearerToken"],
                _return_http_data_only=False,
                _request_timeout=30,
            )
        except ApiException as exc:
            if exc.status == 404 and method in ("GET", "DELETE"):
                return {}
            raise KubeError(f"{method} {api_path}: HTTP {exc.status} {exc.reason}: {_message(exc.body)}") from None
        except Exception as exc:  # urllib3 connection errors: name the server
            raise KubeError(f"{method} {api_path}: cannot reach the Kubernetes API at {self.api.configuration.host}: {exc}") from None
        return data

    def get(self, obj: dict) -> dict:
        """The stored object named like ``obj`` (same kind, namespace, name), or ``{}`` when there is none."""
        return self._call("GET", object_path(obj))

    def apply(self, obj: dict, dry_run: bool = False) -> dict:
        """Server-side apply (create or patch) with the pipeline's field manager; ``dry_run`` changes nothing."""
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")] + ([("dryRun", "All")] if dry_run else [])
        return self._call("PATCH", object_path(obj), obj, query, content_type="application/apply-patch+yaml")

    def create(self, obj: dict) -> dict:
        meta = obj["metadata"]
        return self._call("POST", path(obj["apiVersion"], obj["kind"], meta["namespace"]), obj, [("fieldManager", FIELD_MANAGER)])

    def delete(self, obj: dict) -> None:
        """Delete ``obj`` and, in the background, what it owns (a TrainJob's JobSet and pods); gone already is fine."""
        self._call("DELETE", object_path(obj), {"propagationPolicy": "Background"})


def _message(body: str | None) -> str:
    try:
        return json.loads(body or "")["message"]
    except (ValueError, KeyError, TypeError):
        return (body or "").strip()[:300]


def condition(obj: dict, kind: str) -> dict:
    """The status condition of type ``kind`` (``Ready``, ``Complete``, ``Failed``), or ``{}``."""
    return next((c for c in obj.get("status", {}).get("conditions", []) if c.get("type") == kind), {})
