"""Write manifests/base from the Helm chart, so that `kubectl apply -k` and `helm install` mean the same.

    python tools/render_manifests.py

Renders helm/kserve-llm with manifests/base/chart-values.yaml (through ``pipelines.chart``, as the
pipeline's deploy step does), and writes one file per object plus kustomization.yaml.
tests/test_manifests.py fails when the committed files differ from a fresh render, and checks each
overlay against the chart with its own values.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipelines.chart import render  # noqa: E402

BASE = REPO / "manifests" / "base"


def write_base() -> list[Path]:
    docs = render(values_files=(BASE / "chart-values.yaml",))
    written = []
    for doc in docs:
        path = BASE / f"{doc['kind'].lower()}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        written.append(path)
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": sorted(p.name for p in written)}
    (BASE / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    return written


if __name__ == "__main__":
    for path in write_base():
        print(f"wrote {path.relative_to(REPO)}")
    sys.exit(0)
