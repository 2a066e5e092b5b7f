"""Write manifests/base (and the overlays that are whole renders) from the Helm chart, so that
`kubectl apply -k` and `helm install` mean the same.

    python tools/render_manifests.py

Renders helm/kserve-llm with manifests/base/chart-values.yaml (through ``pipelines.chart``, as the
pipeline's deploy step does), and writes one file per object plus kustomization.yaml. Overlays in
``RENDERED_OVERLAYS`` (where the engine replaces the base's runtime, so no patch of the base would be
shorter) are written the same way from their own chart-values.yaml, keeping their kustomization's comments.
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
RENDERED_OVERLAYS = (REPO / "manifests" / "overlays" / "gpu-multinode",)


def write_rendered(directory: Path) -> list[Path]:
    """The chart rendered with ``directory/chart-values.yaml``: one file per object and the kustomization listing them
    (the comment lines at the top of an existing kustomization.yaml are kept)."""
    docs = render(values_files=(directory / "chart-values.yaml",))
    written = []
    for doc in docs:
        path = directory / f"{doc['kind'].lower()}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        written.append(path)
    kustomization = directory / "kustomization.yaml"
    header = "".join(line for line in kustomization.read_text().splitlines(keepends=True) if line.startswith("#")) if kustomization.exists() else ""
    spec = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": sorted(p.name for p in written)}
    kustomization.write_text(header + yaml.safe_dump(spec, sort_keys=False))
    return written


if __name__ == "__main__":
    for directory in (BASE, *RENDERED_OVERLAYS):
        for path in write_rendered(directory):
            print(f"wrote {path.relative_to(REPO)}")
    sys.exit(0)
