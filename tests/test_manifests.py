"""manifests/ (kubectl apply -k) mean the same as the chart: the base is the chart's render, and every overlay
builds to exactly what the chart renders with the overlay's chart-values.yaml. Every object validates."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from test_chart import tool, validate

from pipelines.chart import render

BASE = REPO / "manifests" / "base"

OVERLAYS = sorted(p for p in (REPO / "manifests" / "overlays").iterdir() if (p / "kustomization.yaml").is_file())


def kustomize(path: Path) -> list[dict]:
    out = subprocess.run([tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def keyed(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_base_is_the_charts_current_render():
    committed = keyed(kustomize(BASE))
    fresh = keyed(render(values_files=(BASE / "chart-values.yaml",)))
    assert committed == fresh, "manifests/base is stale: run python tools/render_manifests.py"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[p.name for p in OVERLAYS])
def test_overlay_equals_the_chart_with_its_values(overlay):
    built = keyed(kustomize(overlay))
    chart = keyed(render(values_files=(overlay / "chart-values.yaml",)))
    assert sorted(built) == sorted(chart)
    for key in chart:
        assert built[key] == chart[key], f"{overlay.name}: {key} differs from the chart's render"
    for doc in built.values():
        validate(doc)


def test_pipeline_rbac_validates_and_grants_only_the_steps_verbs_on_their_resources():
    docs = keyed(kustomize(REPO / "manifests" / "rbac"))
    for doc in docs.values():
        validate(doc)
    role = docs[("Role", "kserve-llm-deployer")]
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"] for resource in rule["resources"] for verb in rule["verbs"]}
    services = {("serving.kserve.io", r, v) for r in ("inferenceservices", "llminferenceservices") for v in ("get", "create", "patch", "delete")}
    trainjobs = {("trainer.kubeflow.org", "trainjobs", v) for v in ("get", "create", "delete")}
    assert granted == services | trainjobs  # no list or watch across the namespace, nothing else
    binding = docs[("RoleBinding", "kserve-llm-deployer")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kserve-llm-deployer"}]
