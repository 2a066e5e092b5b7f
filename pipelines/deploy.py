"""Deploy a registered model as a KServe InferenceService or LLMInferenceService: render it from the chart,
server-side apply it, wait for Ready, roll back when it does not get there.

    isvc = render_isvc("llm", "s3://models/llm/3", namespace="ml", canary_percent=10)
    deploy(isvc, timeout_s=900)          # or deploy(isvc, dry_run=True): validate only, no cluster

The chart's values choose the target: ``kind`` (InferenceService, LLMInferenceService) and ``engine``
(kserve-llm, vllm); this module applies whichever of the two the chart renders. Apply is idempotent (one field
manager, ``force``): the first run creates the service, later runs patch it. The Kubernetes verbs used are
exactly those in ``manifests/rbac/role.yaml``: get (read the previous spec, poll status), patch and create
(server-side apply; the API server checks create when the apply creates the object) and delete (roll back a
service that did not exist before).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

from . import k8s_schema
from .chart import render
from .kube import Cluster, KubeError, condition

SERVICE_KINDS = ("InferenceService", "LLMInferenceService")


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
    """The chart's InferenceService (or LLMInferenceService, when the values say ``kind: LLMInferenceService``) for
    these settings; ``values``/``values_files`` are the chart's values (e.g. the platform team's GPU values file),
    the arguments override them."""
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
    (isvc,) = [doc for doc in render(overrides, values_files, release=name, namespace=namespace) if doc["kind"] in SERVICE_KINDS]
    isvc["metadata"]["namespace"] = namespace
    return isvc


def is_ready(obj: dict) -> bool:
    """Ready=True for the current spec (status.observedGeneration, where reported, has caught up)."""
    observed = obj.get("status", {}).get("observedGeneration")
    current = observed is None or observed >= obj.get("metadata", {}).get("generation", 0)
    return current and condition(obj, "Ready").get("status") == "True"


def applicable(obj: dict) -> dict:
    """What to apply again to restore ``obj``: its identity, labels, annotations and spec; no status, no server fields."""
    meta = obj["metadata"]
    keep = {k: meta[k] for k in ("name", "namespace", "labels", "annotations") if meta.get(k)}
    keep.get("annotations", {}).pop("kubectl.kubernetes.io/last-applied-configuration", None)
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "metadata": keep, "spec": obj["spec"]}


def deploy(
    isvc: dict,
    dry_run: bool = False,
    timeout_s: float = 900.0,
    poll_s: float = 5.0,
    cluster: Cluster | None = None,
    crds: Path | None = None,
    log=print,
) -> dict:
    """Apply ``isvc`` (an InferenceService or LLMInferenceService) and wait until it is Ready; when it does not get
    there (a timeout, an API error while waiting) restore the previous spec and raise :class:`DeployError`.

    The object is first validated against the KServe CRD schema where the CRD files are (``crds``, default
    ``$KSERVE_LLM_CRDS``). ``dry_run`` stops there and touches no cluster; without CRD files it asks the API
    server instead (a server-side dry run, which changes nothing). Returns what happened:
    ``{"action": "dry-run" | "created" | "updated", "name", "namespace", "generation"}``.
    """
    kind, name, namespace = isvc["kind"], isvc["metadata"]["name"], isvc["metadata"]["namespace"]
    crds = crds or k8s_schema.crds_dir()
    if crds.is_dir():
        try:
            k8s_schema.validate(isvc, crds)
        except k8s_schema.SchemaError as exc:
            raise DeployError(f"the rendered {kind} does not validate: {exc}") from None
    try:
        if dry_run:
            if crds.is_dir():
                log(f"dry run: {kind} {namespace}/{name} validates against the KServe CRD ({crds})")
            else:  # no schema files here (e.g. in the image): let the API server validate, changing nothing
                (cluster or Cluster()).apply(isvc, dry_run=True)
                log(f"dry run: the API server accepted {kind} {namespace}/{name} (server-side dry run)")
            return {"action": "dry-run", "name": name, "namespace": namespace, "generation": 0}
        return _apply_and_wait(isvc, cluster or Cluster(), timeout_s, poll_s, log)
    except KubeError as exc:
        raise DeployError(str(exc)) from None


def _apply_and_wait(isvc: dict, cluster: Cluster, timeout_s: float, poll_s: float, log) -> dict:
    """Apply, then wait for Ready; any failure after the apply (not Ready in time, an API error while polling, an
    interrupt) restores the previous spec, or deletes a service that did not exist, before it raises."""
    kind, name, namespace = isvc["kind"], isvc["metadata"]["name"], isvc["metadata"]["namespace"]
    previous = cluster.get(isvc)
    applied = cluster.apply(isvc)
    generation = applied.get("metadata", {}).get("generation", 0)
    action = "updated" if previous else "created"
    log(f"{action} {kind} {namespace}/{name} (generation {generation}); waiting up to {timeout_s:.0f} s for Ready")
    try:
        current, ready = _wait_ready(isvc, cluster, applied, generation, timeout_s, poll_s)
    except KubeError as exc:
        failure = f"could not be watched until Ready ({exc})"
    except BaseException:
        log(f"{kind} {namespace}/{name}: interrupted while waiting for Ready; {_roll_back(isvc, previous, cluster)}")
        raise
    else:
        if ready:
            url = current.get("status", {}).get("url", "")
            log(f"{kind} {namespace}/{name} is Ready: {url}")
            return {"action": action, "name": name, "namespace": namespace, "generation": generation, "url": url}
        reason = condition(current, "Ready")
        reason = f"{reason.get('reason', 'no Ready condition')}: {reason.get('message', '')}".rstrip(": ")
        failure = f"was not Ready after {timeout_s:.0f} s ({reason})"
    raise DeployError(f"{kind} {namespace}/{name} {failure}; {_roll_back(isvc, previous, cluster)}")


def _wait_ready(isvc: dict, cluster: Cluster, current: dict, generation: int, timeout_s: float, poll_s: float) -> tuple[dict, bool]:
    """Poll until the object is Ready at ``generation`` or later, or ``timeout_s`` passed: (the last object read, Ready)."""
    deadline = time.monotonic() + timeout_s
    while not (is_ready(current) and current.get("metadata", {}).get("generation", 0) >= generation):
        if time.monotonic() >= deadline:
            return current, False
        time.sleep(poll_s)
        current = cluster.get(isvc)
    return current, True


def _roll_back(isvc: dict, previous: dict, cluster: Cluster) -> str:
    """Re-apply ``previous`` (or delete ``isvc`` when there was none); says what it did, or that it could not."""
    try:
        if previous:
            cluster.apply(applicable(previous))
            return f"rolled back to the previous spec (generation {previous['metadata'].get('generation')})"
        cluster.delete(isvc)
        return "deleted it (no previous version existed)"
    except KubeError as exc:
        return f"the rollback failed too, so the new spec stays applied: {exc}"
