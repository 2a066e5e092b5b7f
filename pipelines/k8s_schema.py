"""Offline validation of Kubernetes objects: custom resources against their CRDs' OpenAPI schemas, core kinds
with ``kubernetes-validate``; unknown fields are rejected, as the API server's strict field validation does.

The CRDs (KServe, KEDA, Prometheus operator, Kubeflow Trainer) are read from ``$KSERVE_LLM_CRDS`` or the repository's
own copy, ``schemas/crds/`` (its README names each file's source project and commit). The deploy step's dry run and the chart tests both validate through here.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import jsonschema
import yaml

from .chart import REPO

KUBERNETES_VERSION = "1.33"
CUSTOM_GROUPS = (".kserve.io", "keda.sh", "coreos.com", "trainer.kubeflow.org")


class SchemaError(ValueError):
    """An object does not validate, or no schema is known for its kind."""


def crds_dir() -> Path:
    return Path(os.environ.get("KSERVE_LLM_CRDS", REPO / "schemas" / "crds"))


def strict(schema: dict | list) -> dict | list:
    """Reject unknown fields wherever the schema lists properties and does not preserve unknown ones."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


@cache
def crd_schemas(directory: Path | None = None) -> dict[tuple[str, str], dict]:
    """``{(apiVersion, kind): strict schema}`` for every CRD file in ``directory``.

    The schemas are OpenAPI v3 in Kubernetes' dialect, read as JSON Schema draft 4 (what ``jsonschema`` picks
    for a schema without ``$schema``); their validators are built once (:func:`validator`)."""
    directory = directory or crds_dir()
    if not directory.is_dir():
        raise SchemaError(f"CRD schemas not found at {directory}: set KSERVE_LLM_CRDS")
    schemas = {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the KServe CRDs are megabytes of YAML
    for path in directory.glob("*.yaml"):
        crd = yaml.load(path.read_text(), Loader=loader)  # noqa: S506 (a safe loader)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schemas[(f"{group}/{version['name']}", kind)] = strict(version["schema"]["openAPIV3Schema"])
    return schemas


@cache
def validator(directory: Path | None, api_version: str, kind: str) -> jsonschema.protocols.Validator | None:
    """A validator for one kind, built once: ``jsonschema.validate`` would check the megabyte CRD schema against
    its meta-schema on every call (seconds each)."""
    schema = crd_schemas(directory).get((api_version, kind))
    return None if schema is None else jsonschema.validators.validator_for(schema)(schema)


def is_custom(doc: dict) -> bool:
    return "/" in doc["apiVersion"] and doc["apiVersion"].split("/")[0].endswith(CUSTOM_GROUPS)


def validate(doc: dict, directory: Path | None = None) -> None:
    """Raise :class:`SchemaError` unless ``doc`` validates against its kind's schema."""
    if is_custom(doc):
        checker = validator(directory, doc["apiVersion"], doc["kind"])
        if checker is None:
            raise SchemaError(f"no CRD schema for {doc['apiVersion']} {doc['kind']}")
        error = jsonschema.exceptions.best_match(checker.iter_errors({k: v for k, v in doc.items() if k != "metadata"}))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            raise SchemaError(f"{doc['kind']} {doc.get('metadata', {}).get('name', '')}: {where}: {error.message}")
    else:
        import kubernetes_validate

        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise SchemaError(f"{doc['kind']} {doc.get('metadata', {}).get('name', '')}: {exc}") from None
