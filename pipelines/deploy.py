"""Deploy a registered model as a KServe InferenceService: render it from the chart, server-side apply it,
wait for Ready, roll back when it does not get there.

    isvc = render_isvc("llm", "s3://models/llm/3", namespace="ml", canary_percent=10)
    deploy(isvc, timeout_s=900)          # or deploy(isvc, dry_run=True): validate only, no cluster

Apply is idempotent (one field manager, ``force``): the first run creates the service, later runs patch
it. The Kubernetes verbs used are exactly those in ``manifests/rbac/role.yaml``: get (read the previous
spec, poll status), patch and create (server-side apply; the API server checks create when the apply
creates the object) and delete (roll back a service that did not exist before).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import k8s_schema
from .chart import render

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
FIELD_MANAGER = "kserve-llm-pipeline"
API_VERSION = f"{GROUP}/{VERSION}"


class DeployError(RuntimeError):
    """The service could not be applied, or did not become Ready (and was rolled back)."""


def render_isvc(
    name: str,
    storage_uri: str,
    namespace: str = "default",
    canary_percent: int | None = None,
    model_name: str | None = None,
    values: dict | None = None,
    values_files: tuple[str | Path, ...] = (),
) -> dict:
    """The chart's InferenceService for these settings; ``values``/``values_files`` are the chart's values
    (e.g. the platform team's GPU values file), the arguments override them."""
    if storage_uri.startswith(("file://", "/", "mlflow-artifacts:", "runs:/", "models:/")):
        raise ValueError(
            f"storage URI {storage_uri} is not one KServe can fetch (a local path, or an MLflow-only scheme): give an s3://, gs://, pvc://, hf://, "
            "oci:// or https:// URI (an MLflow server whose artifact root is an object store, without --serve-artifacts, registers such URIs)"
        )
    if canary_percent is not None and not 0 <= canary_percent <= 100:
        raise ValueError(f"canary percent must be between 0 and 100; got {canary_percent}")
    overrides = copy.deepcopy(values or {})
    overrides["fullnameOverride"] = name
    overrides.setdefault("model", {})["storageUri"] = storage_uri
    if model_name:
        overrides["model"]["name"] = model_name
    if canary_percent is not None:
        overrides["canaryTrafficPercent"] = canary_percent
    (isvc,) = render(overrides, values_files, release=name, namespace=namespace, show_only="templates/inferenceservice.yaml")
    isvc["metadata"]["namespace"] = namespace
    return isvc


def ready_condition(obj: dict) -> dict:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c.get("type") == "Ready"), {})


def is_ready(obj: dict) -> bool:
    """Ready=True for the current spec (status.observedGeneration, where reported, has caught up)."""
    observed = obj.get("status", {}).get("observedGeneration")
    current = observed is None or observed >= obj.get("metadata", {}).get("generation", 0)
    return current and ready_condition(obj).get("status") == "True"


@dataclass
class Cluster:
    """The few InferenceService calls the deploy step makes, through the official ``kubernetes`` client."""

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
            raise DeployError(f"no Kubernetes configuration (not in a cluster, no usable kubeconfig): {exc}; dry_run validates without one") from None

    def _path(self, namespace: str, name: str = "") -> str:
        return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}" + (f"/{name}" if name else "")

    def _call(self, method: str, path: str, body: dict | None = None, query: list | None = None, content_type: str = "application/json") -> dict:
        from kubernetes.client.exceptions import ApiException

        try:
            data, _, _ = self.api.call_api(
                path,
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
            if exc.status == 404 and method == "GET":
                return {}
            raise DeployError(f"{method} {path}: HTTP {exc.status} {exc.reason}: {_message(exc.body)}") from None
        except Exception as exc:  # urllib3 connection errors: name the server
            raise DeployError(f"{method} {path}: cannot reach the Kubernetes API at {self.api.configuration.host}: {exc}") from None
        return data

    def get(self, namespace: str, name: str) -> dict:
        return self._call("GET", self._path(namespace, name))

    def apply(self, obj: dict, dry_run: bool = False) -> dict:
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")] + ([("dryRun", "All")] if dry_run else [])
        path = self._path(obj["metadata"]["namespace"], obj["metadata"]["name"])
        return self._call("PATCH", path, obj, query, content_type="application/apply-patch+yaml")

    def delete(self, namespace: str, name: str) -> None:
        self._call("DELETE", self._path(namespace, name))


def _message(body: str | None) -> str:
    try:
        return json.loads(body or "")["message"]
    except (ValueError, KeyError, TypeError):
        return (body or "").strip()[:300]


def applicable(obj: dict) -> dict:
    """What to apply again to restore ``obj``: its identity, labels, annotations and spec; no status, no server fields."""
    meta = obj["metadata"]
    keep = {k: meta[k] for k in ("name", "namespace", "labels", "annotations") if meta.get(k)}
    keep.get("annotations", {}).pop("kubectl.kubernetes.io/last-applied-configuration", None)
    return {"apiVersion": obj.get("apiVersion", API_VERSION), "kind": "InferenceService", "metadata": keep, "spec": obj["spec"]}


def deploy(
    isvc: dict,
    dry_run: bool = False,
    timeout_s: float = 900.0,
    poll_s: float = 5.0,
    cluster: Cluster | None = None,
    crds: Path | None = None,
    log=print,
) -> dict:
    """Apply ``isvc`` and wait until it is Ready; on timeout restore the previous spec and raise :class:`DeployError`.

    The object is first validated against the KServe CRD schema where the CRD files are (``crds``, default
    ``$KSERVE_LLM_CRDS``). ``dry_run`` stops there and touches no cluster; without CRD files it asks the API
    server instead (a server-side dry run, which changes nothing). Returns what happened:
    ``{"action": "dry-run" | "created" | "updated", "name", "namespace", "generation"}``.
    """
    name, namespace = isvc["metadata"]["name"], isvc["metadata"]["namespace"]
    crds = crds or k8s_schema.crds_dir()
    if crds.is_dir():
        try:
            k8s_schema.validate(isvc, crds)
        except k8s_schema.SchemaError as exc:
            raise DeployError(f"the rendered InferenceService does not validate: {exc}") from None
    if dry_run:
        if crds.is_dir():
            log(f"dry run: InferenceService {namespace}/{name} validates against the KServe CRD ({crds})")
        else:  # no schema files here (e.g. in the image): let the API server validate, changing nothing
            (cluster or Cluster()).apply(isvc, dry_run=True)
            log(f"dry run: the API server accepted InferenceService {namespace}/{name} (server-side dry run)")
        return {"action": "dry-run", "name": name, "namespace": namespace, "generation": 0}
    cluster = cluster or Cluster()
    previous = cluster.get(namespace, name)
    applied = cluster.apply(isvc)
    generation = applied.get("metadata", {}).get("generation", 0)
    action = "updated" if previous else "created"
    log(f"{action} InferenceService {namespace}/{name} (generation {generation}); waiting up to {timeout_s:.0f} s for Ready")
    deadline = time.monotonic() + timeout_s
    current = applied
    while True:
        if is_ready(current) and current.get("metadata", {}).get("generation", 0) >= generation:
            log(f"InferenceService {namespace}/{name} is Ready: {current.get('status', {}).get('url', '')}")
            return {"action": action, "name": name, "namespace": namespace, "generation": generation, "url": current.get("status", {}).get("url", "")}
        if time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
        current = cluster.get(namespace, name)
    condition = ready_condition(current)
    reason = f"{condition.get('reason', 'no Ready condition')}: {condition.get('message', '')}".rstrip(": ")
    if previous:
        cluster.apply(applicable(previous))
        rollback = f"rolled back to the previous spec (generation {previous['metadata'].get('generation')})"
    else:
        cluster.delete(namespace, name)
        rollback = "deleted it (no previous version existed)"
    raise DeployError(f"InferenceService {namespace}/{name} was not Ready after {timeout_s:.0f} s ({reason}); {rollback}")
