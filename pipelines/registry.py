"""Register a model version, with its metrics, lineage and an alias, in MLflow's model registry or in a
Kubeflow Model Registry.

    register(model_dir, "llm", metrics={"perplexity": 110.1}, lineage={"method": "int8", ...},
             tracking_uri="sqlite:////work/mlflow.db")     # or backend="model-registry", tracking_uri="http://host:8080"

MLflow (default): the directory's files become the artifacts of a run in experiment ``kserve-llm``; the
version's source is that artifact folder (what KServe's ``storageUri`` points at); metrics are logged on
the run; lineage becomes run parameters and version tags; the alias (``candidate``) moves to the new
version. A local SQLite file works offline; in a cluster, pass the tracking server's URI.

All or nothing: the registry is checked for reachability first, and a failure after the run or version
was created deletes what was created, so no half-registered version is left behind.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

EXPERIMENT = "kserve-llm"


class RegistryError(RuntimeError):
    """The registry is unreachable or refused the registration (nothing was left registered)."""


def _check_reachable(uri: str) -> None:
    if not uri.startswith(("http://", "https://")):
        return
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=10) as response:
            response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise RegistryError(f"model registry unreachable at {uri} ({health}: {getattr(exc, 'reason', exc)})") from None


def _sqlite_artifact_root(uri: str) -> str | None:
    """For ``sqlite:///path/mlflow.db``: ``file:///path/mlflow-artifacts`` (MLflow's default is ./mlruns in the cwd)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    return (db.parent / "mlflow-artifacts").resolve().as_uri()


def register_mlflow(model_dir: Path, name: str, metrics: dict[str, float], lineage: dict[str, str], tracking_uri: str, alias: str, description: str) -> dict:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    _check_reachable(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    created_run = created_version = None
    created_model = False
    try:
        experiment = client.get_experiment_by_name(EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT, artifact_location=_sqlite_artifact_root(tracking_uri))
        run = client.create_run(experiment_id, tags={"mlflow.runName": f"register-{name}"})
        created_run = run.info.run_id
        now = int(time.time() * 1000)
        client.log_batch(
            created_run,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
            params=[Param(k, str(v)[:6000]) for k, v in lineage.items()],
            tags=[RunTag("kserve-llm.model", name)],
        )
        client.log_artifacts(created_run, str(model_dir), artifact_path="model")
        client.set_terminated(created_run)
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name, description="Causal LM registered by the kserve-llm pipeline")
            created_model = True
        source = f"{run.info.artifact_uri}/model"
        version = client.create_model_version(name, source, run_id=created_run, tags={k: str(v) for k, v in lineage.items()}, description=description)
        created_version = version.version
        client.set_registered_model_alias(name, alias, version.version)
    except Exception as exc:
        _undo(client, name, created_run, created_version, created_model)
        raise RegistryError(f"MLflow registration at {tracking_uri} failed: {exc}") from None
    return {
        "backend": "mlflow",
        "name": name,
        "version": str(created_version),
        "alias": alias,
        "source": source,
        "run_id": created_run,
        "tracking_uri": tracking_uri,
    }


def _undo(client, name: str, run_id: str | None, version: str | None, model: bool) -> None:
    """Delete what a failed registration created, newest first; best effort, the original error is the one to report."""
    steps = []
    if version:
        steps.append(lambda: client.delete_model_version(name, version))
    if model:
        steps.append(lambda: client.delete_registered_model(name))
    if run_id:
        steps.append(lambda: client.delete_run(run_id))
    for step in steps:
        try:
            step()
        except Exception:
            pass


def register_model_registry(
    uri: str, name: str, storage_uri: str, metrics: dict[str, float], lineage: dict[str, str], alias: str, description: str, version: str | None
) -> dict:
    """Kubeflow Model Registry: metadata only; the artifacts stay at ``storage_uri`` (an s3://, pvc://, ... URI)."""
    try:
        from model_registry import ModelRegistry
    except ImportError:
        raise RegistryError("backend model-registry needs the model-registry package: pip install model-registry") from None
    if not storage_uri:
        raise RegistryError("backend model-registry stores no files: give the storage URI of the model (s3://, pvc://, ...)")
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RegistryError(f"the model registry address must be http(s)://HOST[:PORT]; got {uri!r}")
    _check_reachable(uri)
    storage_uri = storage_uri.replace("minio://", "s3://", 1)  # KFP's default artifact store is MinIO, which KServe reads as S3
    version = version or time.strftime("%Y%m%d-%H%M%S")
    secure = parts.scheme == "https"
    try:
        registry = ModelRegistry(f"{parts.scheme}://{parts.hostname}", parts.port or (443 if secure else 80), author="kserve-llm-pipeline", is_secure=secure)
        model = registry.register_model(
            name,
            storage_uri,
            model_format_name="kserve-llm",
            model_format_version="1",
            version=version,
            version_description=description,
            metadata={"alias": alias, **{f"metric.{k}": float(v) for k, v in metrics.items()}, **{f"lineage.{k}": str(v) for k, v in lineage.items()}},
        )
    except Exception as exc:
        raise RegistryError(f"Kubeflow Model Registry at {uri} refused the registration: {exc}") from None
    return {"backend": "model-registry", "name": name, "version": version, "alias": alias, "source": storage_uri, "id": str(model.id), "tracking_uri": uri}


def register(
    model_dir: str | Path,
    name: str,
    metrics: dict[str, float],
    lineage: dict[str, str],
    tracking_uri: str,
    backend: str = "mlflow",
    alias: str = "candidate",
    description: str = "",
    storage_uri: str = "",
    version: str | None = None,
) -> dict:
    """Register ``model_dir`` as a new version of ``name``; returns ``{backend, name, version, alias, source, ...}``."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise RegistryError(f"not a model directory (no config.json): {model_dir}")
    if not name:
        raise RegistryError("the registered model needs a name")
    if not tracking_uri:
        raise RegistryError("no registry URI: give an MLflow tracking URI (sqlite:///path/mlflow.db locally) or the model registry's address")
    if backend == "mlflow":
        return register_mlflow(model_dir, name, metrics, lineage, tracking_uri, alias, description)
    if backend == "model-registry":
        return register_model_registry(tracking_uri, name, storage_uri, metrics, lineage, alias, description, version)
    raise RegistryError(f"unknown registry backend {backend!r}: mlflow or model-registry")
