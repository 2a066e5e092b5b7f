"""The lock files (requirements/*.txt, ``make lock``) against pyproject.toml, the Makefile, the Dockerfile and this
environment: made from today's dependency lists, satisfying every requirement, layered without disagreement, hashed,
free of torch and CUDA, installed by ``make install``; and serving imports nothing the predictor lock lacks."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from conftest import REPO
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

sys.path.insert(0, str(REPO / "tools"))
import lock  # noqa: E402

# Packages of the pipelines that the predictor image must not carry (the issue names them; pyarrow comes with mlflow).
PIPELINE_ONLY = ("kfp", "kfp-kubernetes", "mlflow", "matplotlib", "pyarrow", "peft", "model-registry", "onnxscript", "onnx")
# Imports inside predictor/ functions that serving never calls, with who does.
NOT_SERVING = {"onnx": "OnnxModel.parameter_count, called by pipelines/evaluate.py only"}


def makefile_torch() -> str:
    match = re.search(r"^TORCH := (torch==\S+)", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert match, "the Makefile has no TORCH := torch==VERSION line"
    return match.group(1)


def entries(path: Path) -> dict[str, tuple[str, str, list[str]]]:
    """``{name: (version, marker, hashes)}`` of a pip-compile lock (a requirement line, then its ``--hash`` lines)."""
    found, current = {}, None
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if not line.startswith(" "):
            requirement = Requirement(line.split(" \\")[0].split("  #")[0].strip())
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"{path.name}: {line!r} is not pinned with =="
            current = canonicalize_name(requirement.name)
            found[current] = (spec.version, str(requirement.marker or ""), [])
        elif "--hash=" in line:
            assert current, f"{path.name}: a hash before any requirement"
            found[current][2].append(line.split("--hash=")[1].split()[0])
    return found


def test_locks_were_made_from_todays_pyproject():
    assert lock.stale(makefile_torch()) == [], "run make lock"


def test_a_changed_dependency_makes_its_lock_stale():
    lists = lock.project_lists()
    changed = {**lists, "pipelines": [*lists["pipelines"], "rich"]}
    stale = lock.stale(makefile_torch(), changed)
    assert {line.split()[0] for line in stale} == {"requirements/pipelines.txt", "requirements/dev.txt"}  # not predictor.txt
    assert lock.stale("torch==2.99.0") and all("other dependency lists" in line for line in lock.stale("torch==2.99.0"))


@pytest.mark.parametrize("name", [lk.name for lk in lock.LOCKS])
def test_every_requirement_is_satisfied_by_its_lock(name):
    (this,) = [lk for lk in lock.LOCKS if lk.name == name]
    pinned = entries(this.path)
    torch = Version(makefile_torch().split("==")[1])
    env = default_environment()
    for text in lock.lock_inputs(this, lock.project_lists()):
        requirement = Requirement(text)
        if requirement.marker and not requirement.marker.evaluate(env):
            continue
        key = canonicalize_name(requirement.name)
        if key == "torch":  # installed first, by the Makefile's and the Dockerfile's pin
            assert requirement.specifier.contains(torch, prereleases=True), f"{makefile_torch()} does not satisfy {text!r}"
            continue
        assert key in pinned, f"{this.path.name} has no {requirement.name} (pyproject: {text!r}): run make lock"
        version = pinned[key][0]
        assert requirement.specifier.contains(version, prereleases=True), f"{this.path.name} pins {key}=={version}, pyproject asks {text!r}"


def test_every_pin_is_hashed_and_torch_and_cuda_stay_out():
    for this in lock.LOCKS:
        pinned = entries(this.path)
        assert len(pinned) >= 1
        unhashed = [name for name, (_, _, hashes) in pinned.items() if not hashes]
        assert unhashed == [], f"{this.path.name}: no --hash for {unhashed}"
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for _, _, hashes in pinned.values() for h in hashes)
        cuda = [name for name in pinned if name in ("torch", "triton") or name.startswith("nvidia-")]
        assert cuda == [], f"{this.path.name} pins {cuda}"


def test_locks_are_layered_one_version_each():
    """predictor.txt within pipelines.txt within dev.txt, and k8s-tools.txt within dev.txt, at the same versions."""
    for this in lock.LOCKS:
        if this.constrained_by:
            narrow, wide = entries(this.path), entries(REPO / "requirements" / f"{this.constrained_by}.txt")
            assert set(narrow) <= set(wide), f"{this.path.name} has {sorted(set(narrow) - set(wide))}, which {this.constrained_by}.txt lacks"
            disagree = {n: (v, wide[n][0]) for n, (v, _, _) in narrow.items() if wide[n][0] != v}
            assert disagree == {}, f"{this.path.name} and {this.constrained_by}.txt disagree: {disagree}"


def test_the_predictor_lock_carries_no_pipeline_package():
    pinned = entries(REPO / "requirements" / "predictor.txt")
    assert [name for name in PIPELINE_ONLY if name in pinned] == []
    pipelines = entries(REPO / "requirements" / "pipelines.txt")
    assert all(name in pipelines for name in ("kfp", "mlflow", "matplotlib", "onnx", "peft"))


def test_the_torch_pin_is_one():
    torch = makefile_torch()
    dockerfile = (REPO / "images" / "Dockerfile").read_text()
    assert f"ARG TORCH_VERSION={torch.split('==')[1]}\n" in dockerfile
    for this in lock.LOCKS:
        assert lock.header_fields(this.path)["torch"] == torch, this.path.name


def test_make_install_and_the_images_install_from_the_locks():
    makefile = (REPO / "Makefile").read_text()
    assert "pip install -q --require-hashes -r requirements/dev.txt" in makefile
    dockerfile = (REPO / "images" / "Dockerfile").read_text()
    for name in ("predictor", "pipelines", "k8s-tools"):
        assert f"--require-hashes -r /tmp/requirements/{name}.txt" in dockerfile, name


def test_this_environment_has_the_dev_locks_versions():
    """``make install`` installed requirements/dev.txt: every pin applying here is the installed version."""
    env = default_environment()
    wrong = {}
    for name, (version, marker, _) in entries(REPO / "requirements" / "dev.txt").items():
        if marker and not Requirement(f"x; {marker}").marker.evaluate(env):
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed is None or Version(installed) != Version(version):
            wrong[name] = (version, installed)
    assert wrong == {}, f"installed versions differ from requirements/dev.txt (pinned, installed): {wrong}; run make install"


SERVING_IMPORTS = """
import importlib, importlib.util, json, pkgutil, sys
import predictor
names = [m.name for m in pkgutil.walk_packages(predictor.__path__, "predictor.") if m.name != "predictor.__main__"]
for name in names:
    importlib.import_module(name)
print(json.dumps({
    "loaded": sorted({m.split(".")[0] for m in sys.modules if not m.startswith("_")}),
    "findable": [n for n in sys.argv[1:] if importlib.util.find_spec(n) is not None],
}))
"""


def predictor_lock_site(root: Path) -> Path:
    """A site directory holding only the installed distributions the predictor lock (and torch) names, as links:
    what a virtual environment made from requirements/predictor.txt would see, without installing one."""
    allowed = set(entries(REPO / "requirements" / "predictor.txt")) | {"torch"}
    site = root / "site-packages"
    site.mkdir()
    for dist in metadata.distributions():
        if canonicalize_name(dist.metadata["Name"]) not in allowed:
            continue
        for top in {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] not in ("..", "__pycache__") and not f.parts[0].endswith(".pth")}:
            source, link = Path(dist.locate_file(top)), site / top
            if source.exists() and not link.exists():
                link.symlink_to(source)
    return site


def test_serving_imports_with_only_the_predictor_lock(tmp_path):
    """Every module of predictor/ imported (what ``python -m predictor`` imports, and more) by a Python that sees only
    the predictor lock's packages, as in the predictor image: nothing fails (optional imports of absent packages
    degrade as they would there), and the pipeline packages cannot even be found. tests/test_image.py checks the image."""
    site = predictor_lock_site(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": f"{REPO}{os.pathsep}{site}", "PYTHONNOUSERSITE": "1"}
    command = [sys.executable, "-S", "-c", SERVING_IMPORTS, *(n.replace("-", "_") for n in PIPELINE_ONLY)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert done.returncode == 0, f"serving needs a package that requirements/predictor.txt lacks:\n{done.stderr[-3000:]}"
    result = json.loads(done.stdout)
    assert result["findable"] == []
    assert {"kserve", "transformers", "torch", "opentelemetry", "fastapi"} <= set(result["loaded"])


def distributions_of(modules: list[str]) -> dict[str, set[str]]:
    """Top-level module → the normalized names of the distributions that provide it (none for the stdlib)."""
    provided = metadata.packages_distributions()
    return {m: {canonicalize_name(d) for d in provided.get(m, [])} for m in modules if m not in sys.stdlib_module_names}


def test_every_import_in_predictor_is_in_the_predictor_lock():
    """Imports inside functions too (the load-time ones: onnxruntime, gguf's readers): each third-party module the
    predictor's source names is in the predictor lock, or named in NOT_SERVING with who calls it."""
    modules = set()
    for path in (REPO / "predictor").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    modules -= {"predictor", *NOT_SERVING}
    allowed = set(entries(REPO / "requirements" / "predictor.txt")) | {"torch"}
    missing = {m: sorted(d) for m, d in distributions_of(sorted(modules)).items() if not d & allowed}
    assert missing == {}, f"predictor/ imports modules that requirements/predictor.txt does not install: {missing}"
