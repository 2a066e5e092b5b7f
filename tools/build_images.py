"""Build the predictor and pipelines images (``make image``) with the container engine this machine has.

    python tools/build_images.py                      # both targets of images/Dockerfile, tagged as the chart expects
    python tools/build_images.py --target predictor   # one of them
    python tools/build_images.py --no-cache --report build/images.json   # a cold build, timed, sizes recorded

What it does, in order, saying so as it goes:

1. The engine: docker where its daemon answers, else podman (``--install-engine``: apt-get installs podman, buildah and
   runc first, as root). podman builds and runs with ``--runtime runc`` and raised ulimits: crun and podman's default
   limits fail on some hosts (this project's machines among them).
2. The base: the Dockerfile's default (the official Python image, pinned by digest) when it can be pulled; else a
   Debian bookworm made here by debootstrap (``--variant=minbase`` with python3, python3-venv, Python's headers and
   ca-certificates) and imported as ``localhost/kserve-llm-base:bookworm-<digest of that list>`` once, then reused.
3. pip inside the build sees what pip sees here: with podman, the machine's pip configuration (certificate bundle,
   indexes, find-links) is written into a pip.conf that is mounted into the build with the directories it names, so
   a local torch wheel is used and TLS through a proxy's certificate works. A local CPU wheel of the pinned torch
   makes ``TORCH_INDEX_URL`` empty (pip's own configuration decides); elsewhere it is the Dockerfile's default.
4. Each target is built, timed, and its size read from the engine (uncompressed, as ``podman images`` shows it).
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "images" / "Dockerfile"
# The names the chart (values.yaml image.repository) and the compiled pipeline (pipelines/components.py) use.
REPOSITORIES = {"predictor": "ghcr.io/kserve-llm/predictor", "pipelines": "ghcr.io/kserve-llm/pipelines"}
TARGETS = tuple(REPOSITORIES)
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# The official Python image carries Python's headers; Debian's python3 does not, and torch.compile's C++ (inductor,
# which --compile and AMX CPUs use by default) includes Python.h: libpython3.11-dev brings them (26 MB).
BASE_PACKAGES = ("python3", "python3-venv", "libpython3.11-dev", "ca-certificates")
# Tagged by its package list, so that changing the list makes a new base instead of reusing the old one.
LOCAL_BASE = f"localhost/kserve-llm-base:bookworm-{hashlib.sha256(' '.join(BASE_PACKAGES).encode()).hexdigest()[:8]}"
# crun and podman's default process and file limits fail on this project's machines; runc with these works.
PODMAN_RUNTIME_FLAGS = ["--runtime", "runc", "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"]

Log = Callable[[str], None]


def say(message: str) -> None:
    print(f"[image] {message}", flush=True)


def chart_version() -> str:
    """The chart's appVersion: the tag the chart renders when image.tag is empty."""
    match = re.search(r'^appVersion:\s*"?([^"\s]+)"?', (REPO / "helm" / "kserve-llm" / "Chart.yaml").read_text(), re.MULTILINE)
    if not match:
        raise RuntimeError("helm/kserve-llm/Chart.yaml has no appVersion")
    return match.group(1)


def image_tag(target: str) -> str:
    return f"{REPOSITORIES[target]}:{chart_version()}"


def dockerfile_arg(name: str) -> str:
    """The default of an ``ARG name=value`` in images/Dockerfile."""
    match = re.search(rf"^ARG {name}=(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    if not match:
        raise RuntimeError(f"images/Dockerfile has no ARG {name}=...")
    return match.group(1)


def quiet_run(command: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(command, 124, "", str(exc))


# --- the engine ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Engine:
    """docker or podman, and the flags every build and run needs with it here."""

    name: str
    binary: str

    @property
    def extra_flags(self) -> list[str]:
        return PODMAN_RUNTIME_FLAGS if self.name == "podman" else []

    def command(self, *args: str) -> list[str]:
        return [self.binary, *args]

    def image_exists(self, image: str) -> bool:
        return quiet_run(self.command("image", "inspect", image), timeout=60).returncode == 0

    def image_id(self, image: str) -> str | None:
        done = quiet_run(self.command("image", "inspect", "--format", "{{.Id}}", image), timeout=60)
        return done.stdout.strip() if done.returncode == 0 else None

    def image_size(self, image: str) -> int:
        done = quiet_run(self.command("image", "inspect", "--format", "{{.Size}}", image), timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{self.name} image inspect {image}: {done.stderr.strip()}")
        return int(done.stdout.strip())


def apt_install(packages: Iterable[str], log: Log) -> bool:
    """apt-get install as root (apt-get update first when the package lists lack them); False where that cannot be."""
    packages = list(packages)
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        log(f"cannot install {' '.join(packages)}: not root, or no apt-get")
        return False
    log(f"apt-get install -y {' '.join(packages)} ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if subprocess.run(install, env=env, capture_output=True, text=True).returncode == 0:
        return True
    subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
    done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        log(f"apt-get install failed: {done.stderr.strip()[-1000:]}")
    return done.returncode == 0


def find_engine(install: bool = False, log: Log = say) -> tuple[Engine | None, str]:
    """The engine to build and run with, or None and why there is none."""
    if shutil.which("docker") and quiet_run(["docker", "info"], timeout=30).returncode == 0:
        return Engine("docker", shutil.which("docker")), "docker (its daemon answers)"
    reasons = ["docker: no daemon answers" if shutil.which("docker") else "docker: not installed"]
    if shutil.which("podman") is None and install:
        apt_install(["podman", "buildah", "runc"], log)
    if shutil.which("podman") is None:
        reasons.append("podman: not installed" + ("" if install else " (--install-engine installs it)"))
        return None, "; ".join(reasons)
    if shutil.which("runc") is None and install:
        apt_install(["runc"], log)
    done = quiet_run(["podman", "--runtime", "runc", "info"], timeout=60)
    if done.returncode != 0:
        reasons.append(f"podman: podman --runtime runc info failed: {done.stderr.strip()[-500:]}")
        return None, "; ".join(reasons)
    return Engine("podman", shutil.which("podman")), "podman with runc (" + "; ".join(reasons) + ")"


# --- the base image ------------------------------------------------------------------------------------


def pullable(engine: Engine, image: str, log: Log) -> bool:
    if engine.image_exists(image):
        return True
    log(f"pulling {image} ...")
    done = quiet_run(engine.command("pull", "--quiet", image) if engine.name == "podman" else engine.command("pull", image), timeout=300)
    if done.returncode != 0:
        log(f"cannot pull it: {(done.stderr.strip().splitlines() or ['(no message)'])[-1][:300]}")
    return done.returncode == 0


def debootstrap_base(engine: Engine, log: Log) -> str:
    """A Debian bookworm base made here (``LOCAL_BASE``), made once and then reused."""
    if engine.image_exists(LOCAL_BASE):
        log(f"base: {LOCAL_BASE} (made earlier by debootstrap; {engine.name} rmi it to make it again)")
        return LOCAL_BASE
    if shutil.which("debootstrap") is None and not apt_install(["debootstrap"], log):
        raise RuntimeError("no base image: the Dockerfile's cannot be pulled and debootstrap cannot be installed")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kserve-llm-base.", dir="/var/tmp") as tmp:
        root = Path(tmp) / "root"
        log(f"base: debootstrap --variant=minbase bookworm from {DEBIAN_MIRROR} (a few minutes) ...")
        command = ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", "bookworm", str(root), DEBIAN_MIRROR]
        phases = ("I: Retrieving Release", "I: Unpacking the base", "I: Configuring", "I: Base system installed", "E:", "W:")
        stream(command, "base", log, keep=lambda line: line.startswith(phases) and not line.startswith("I: Configuring "))
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (root / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        log(f"base: importing it as {LOCAL_BASE} ...")
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        done = subprocess.run(engine.command("import", "-", LOCAL_BASE), stdin=tar.stdout, capture_output=True, text=True)
        tar.wait()
        if done.returncode != 0 or tar.returncode != 0:
            raise RuntimeError(f"{engine.name} import failed: {done.stderr.strip()[-1000:]}")
    log(f"base: {LOCAL_BASE} made in {time.monotonic() - started:.0f} s ({engine.image_size(LOCAL_BASE) / 1e6:.0f} MB)")
    return LOCAL_BASE


def choose_base(engine: Engine, requested: str | None, log: Log) -> str:
    if requested:
        log(f"base: {requested} (--base)")
        return requested
    default = dockerfile_arg("BASE")
    if pullable(engine, default, log):
        log(f"base: {default} (the Dockerfile's default)")
        return default
    log("base: the Dockerfile's default cannot be pulled here (no registry reachable?): making one with debootstrap")
    return debootstrap_base(engine, log)


# --- pip's configuration inside the build --------------------------------------------------------------


@dataclass
class PipSetup:
    """The host's pip configuration as a pip.conf for the build, and the host paths it needs mounted."""

    settings: dict[str, str] = field(default_factory=dict)
    mounts: list[Path] = field(default_factory=list)
    local_torch: Path | None = None


def host_pip_config() -> dict[str, str]:
    """pip's effective settings here (files and PIP_* variables): ``{"cert": ..., "find-links": ..., ...}``."""
    done = quiet_run([sys.executable, "-m", "pip", "config", "list"], timeout=60)
    settings: dict[str, str] = {}
    for line in done.stdout.splitlines():
        match = re.match(r"^[^.]*\.([a-z-]+)='(.*)'$", line)
        if match:
            key = {"timeout": "default-timeout"}.get(match.group(1), match.group(1))
            settings[key] = match.group(2)  # later lines (environment variables) win, as in pip
    return settings


def pip_setup(torch_version: str, settings: dict[str, str] | None = None) -> PipSetup:
    settings = host_pip_config() if settings is None else settings
    setup = PipSetup()
    for key in ("cert", "index-url", "extra-index-url", "find-links", "trusted-host", "default-timeout"):
        if settings.get(key):
            setup.settings[key] = settings[key]
    if "cert" in setup.settings and Path(setup.settings["cert"]).is_file():
        setup.mounts.append(Path(setup.settings["cert"]))
    for key in ("index-url", "extra-index-url", "find-links"):
        for location in setup.settings.get(key, "").split():
            path = Path(urlparse(location).path) if location.startswith("file:") else Path(location) if location.startswith("/") else None
            if path is None or not path.exists():
                continue
            # a file:// simple index links to its files relative to itself (../../files/...): mount its parent
            setup.mounts.append(path.parent if key != "find-links" and path.name == "simple" else path)
            if key == "find-links" and setup.local_torch is None:
                setup.local_torch = next(iter(sorted(path.glob(f"torch-{torch_version}+cpu-*.whl"))), None)
    setup.mounts = sorted(set(setup.mounts))
    return setup


def write_pip_conf(setup: PipSetup, directory: Path) -> Path:
    config = configparser.ConfigParser()
    config["global"] = setup.settings
    path = directory / "pip.conf"
    with path.open("w") as f:
        config.write(f)
    return path


# --- building --------------------------------------------------------------------------------------------


@dataclass
class Built:
    target: str
    tag: str
    seconds: float
    size_bytes: int
    engine: str
    base: str
    no_cache: bool


def stream(command: list[str], label: str, log: Log, keep: Callable[[str], bool] | None = None, cwd: Path | None = None) -> None:
    """Run ``command``, printing its lines (those ``keep`` accepts, if given) with the elapsed time; on failure the
    last 60 lines are printed and RuntimeError raised."""
    started = time.monotonic()
    tail: deque[str] = deque(maxlen=60)
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert process.stdout is not None
    for raw in process.stdout:
        line = raw.rstrip()
        tail.append(line)
        if keep is None or keep(line):
            elapsed = time.monotonic() - started
            shown = line if keep is None or len(line) <= 160 else line[:157] + "..."
            log(f"{label} {int(elapsed // 60)}:{int(elapsed % 60):02d} {shown}")
    if process.wait() != 0:
        shown = "\n".join(tail)
        raise RuntimeError(f"{label}: {' '.join(command[:3])} ... exited with {process.returncode}; its last lines:\n{shown}")


def build_step_line(line: str) -> bool:
    """The lines of a build worth showing when quiet: its steps, pip's summary lines, errors."""
    return bool(re.match(r"^((\[\d+/\d+\] )?STEP \d+/\d+|#\d+ \[|Step \d+/\d+|Successfully installed|COMMIT|ERROR|Error|error:)", line))


def build(
    engine: Engine,
    target: str,
    base: str,
    torch_index_url: str,
    setup: PipSetup | None,
    no_cache: bool = False,
    quiet: bool = False,
    log: Log = say,
) -> Built:
    tag = image_tag(target)
    command = engine.command("build", *engine.extra_flags, "-f", str(DOCKERFILE), "--target", target, "-t", tag)
    command += ["--build-arg", f"BASE={base}", "--build-arg", f"TORCH_INDEX_URL={torch_index_url}"]
    if no_cache:
        command.append("--no-cache")
    with tempfile.TemporaryDirectory(prefix="kserve-llm-build.") as tmp:
        if setup is not None and engine.name == "podman":
            command += ["--network", "host", "-v", f"{write_pip_conf(setup, Path(tmp))}:/etc/pip.conf:ro"]
            command += [arg for path in setup.mounts for arg in ("-v", f"{path}:{path}:ro")]
        command.append(str(REPO))
        log(f"{target}: building {tag} ({engine.name}{', no cache' if no_cache else ''}) ...")
        previous = engine.image_id(tag)
        started = time.monotonic()
        stream(command, target, log, keep=build_step_line if quiet else None, cwd=REPO)
        seconds = time.monotonic() - started
    if previous and previous != engine.image_id(tag):
        # the image this tag named before: only it, not the layers it shares with the build cache (a failure to
        # remove it, e.g. a container still using it, leaves it for `podman image prune`)
        quiet_run(engine.command("rmi", previous), timeout=120)
    size = engine.image_size(tag)
    log(f"{target}: built {tag} in {seconds:.0f} s, {size / 1e9:.2f} GB")
    return Built(target, tag, round(seconds, 1), size, engine.name, base, no_cache)


def build_all(
    targets: Iterable[str] = TARGETS,
    engine: Engine | None = None,
    base: str | None = None,
    torch_index_url: str | None = None,
    no_cache: bool = False,
    quiet: bool = False,
    install_engine: bool = False,
    host_pip: bool = True,
    log: Log = say,
) -> list[Built]:
    """Build ``targets``; the engine, base and torch index are found as the module's docstring says unless given."""
    if engine is None:
        engine, why = find_engine(install=install_engine, log=log)
        if engine is None:
            raise RuntimeError(f"no container engine: {why}")
        log(f"engine: {why}")
    torch_version = dockerfile_arg("TORCH_VERSION")
    setup = pip_setup(torch_version) if host_pip else None
    if setup is not None and engine.name == "podman":
        log(f"pip in the build: this machine's configuration ({', '.join(sorted(setup.settings)) or 'nothing set'}), mounting {len(setup.mounts)} paths")
    elif setup is not None and setup.settings:
        log("pip in the build: docker build cannot mount this machine's pip configuration; the image's defaults apply")
    if torch_index_url is None:
        if setup is not None and setup.local_torch is not None and engine.name == "podman":
            torch_index_url = ""
            log(f"torch: {setup.local_torch.name}, this machine's wheel (TORCH_INDEX_URL empty: pip's configuration)")
        else:
            torch_index_url = dockerfile_arg("TORCH_INDEX_URL")
            log(f"torch: {torch_version} from {torch_index_url}")
    base = choose_base(engine, base, log)
    return [build(engine, target, base, torch_index_url, setup, no_cache=no_cache, quiet=quiet, log=log) for target in targets]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", action="append", choices=TARGETS, help="Build only this target (repeat); default: both.")
    parser.add_argument("--base", help="Base image (default: the Dockerfile's, else one made here by debootstrap).")
    parser.add_argument("--torch-index-url", help="PyTorch's wheel index, e.g. https://download.pytorch.org/whl/cu128 (default: see above).")
    parser.add_argument("--no-cache", action="store_true", help="Build every layer anew (for timing a cold build).")
    parser.add_argument("--quiet", action="store_true", help="Only the build's steps, not every line pip prints.")
    parser.add_argument("--install-engine", action="store_true", help="apt-get install podman, buildah and runc when no engine is here.")
    parser.add_argument("--no-host-pip", action="store_true", help="Do not mount this machine's pip configuration into the build.")
    parser.add_argument("--report", type=Path, help="Write the build times and sizes here as JSON.")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        built = build_all(
            args.target or TARGETS,
            base=args.base,
            torch_index_url=args.torch_index_url,
            no_cache=args.no_cache,
            quiet=args.quiet,
            install_engine=args.install_engine,
            host_pip=not args.no_host_pip,
        )
    except RuntimeError as exc:
        print(f"make image: {exc}", file=sys.stderr)
        return 1
    for item in built:
        say(f"{item.tag}: {item.size_bytes / 1e9:.2f} GB, built in {item.seconds:.0f} s")
    say(f"done in {time.monotonic() - started:.0f} s")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps([asdict(item) for item in built], indent=2) + "\n")
        say(f"report: {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
