"""Write manifests/base from the Helm chart, so that `kubectl apply -k` and `helm install` mean the same.

    python tools/render_manifests.py

Renders helm/kserve-llm with manifests/base/chart-values.yaml, drops the labels only Helm sets, and
writes one file per object plus kustomization.yaml. tests/test_manifests.py fails when the committed
files differ from a fresh render, and checks each overlay against the chart with its own values.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "kserve-llm"
BASE = REPO / "manifests" / "base"
HELM_ONLY_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by")


def helm() -> str:
    local = REPO / ".venv" / "bin" / "helm"
    return str(local) if local.exists() else "helm"


def render(values: Path, release: str = "llm") -> list[dict]:
    out = subprocess.run([helm(), "template", release, str(CHART), "-f", str(values)], check=True, capture_output=True, text=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    for doc in docs:
        labels = doc.get("metadata", {}).get("labels", {})
        for key in HELM_ONLY_LABELS:
            labels.pop(key, None)
    return docs


def write_base() -> list[Path]:
    docs = render(BASE / "chart-values.yaml")
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
