"""The Helm chart, rendered with ``helm template``: the one source of every Kubernetes object we ship.

``helm install``, ``manifests/`` (tools/render_manifests.py), ``python -m pipelines render-isvc`` and the
pipeline's deploy step all render ``helm/kserve-llm``; none of them has a template of its own, so the
InferenceService the pipeline applies is the one the chart produces for the same values.

The chart is found at ``$KSERVE_LLM_CHART`` (the image sets it) or in this source tree; ``helm`` at
``$KSERVE_LLM_HELM``, beside the running Python (``make install`` puts it in ``.venv/bin``), or on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
HELM_ONLY_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by")


class ChartError(RuntimeError):
    """helm is missing, or the chart refused the values (the message is helm's)."""


def chart_dir() -> Path:
    return Path(os.environ.get("KSERVE_LLM_CHART", REPO / "helm" / "kserve-llm"))


def helm_binary() -> str:
    candidates = [os.environ.get("KSERVE_LLM_HELM"), str(Path(sys.executable).parent / "helm"), str(REPO / ".venv" / "bin" / "helm"), shutil.which("helm")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    raise ChartError("helm not found: run `make install` (it puts helm in .venv/bin) or set KSERVE_LLM_HELM")


def render(
    values: dict | None = None,
    values_files: tuple[str | Path, ...] = (),
    release: str = "llm",
    namespace: str | None = None,
    show_only: str | None = None,
    keep_helm_labels: bool = False,
) -> list[dict]:
    """The chart's objects for these values (files first, then ``values`` on top), as dicts.

    ``show_only`` is a template path such as ``templates/inferenceservice.yaml``. Labels only Helm sets
    (chart version, managed-by) are dropped unless ``keep_helm_labels``: an object applied by kubectl or by
    the pipeline is not managed by Helm.
    """
    chart = chart_dir()
    if not (chart / "Chart.yaml").is_file():
        raise ChartError(f"chart not found at {chart}: set KSERVE_LLM_CHART")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as overrides:
        yaml.safe_dump(values or {}, overrides)
        overrides.flush()
        args = [helm_binary(), "template", release, str(chart)]
        for path in values_files:
            args += ["-f", str(path)]
        args += ["-f", overrides.name]
        if namespace:
            args += ["--namespace", namespace]
        if show_only:
            args += ["--show-only", show_only]
        result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        message = result.stderr.replace("Use --debug flag to render out invalid YAML", "").strip().removeprefix("Error: ")
        raise ChartError(message or f"helm template failed ({result.returncode})")
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    if not keep_helm_labels:
        for doc in docs:
            labels = doc.get("metadata", {}).get("labels", {})
            for key in HELM_ONLY_LABELS:
                labels.pop(key, None)
    return docs
