"""Start-up errors a pod meets, reported as one clear line and a non-zero exit instead of a traceback from deep inside
transformers or torch: model files this user cannot read (``save_pretrained`` writes 0600 files; the pod runs as UID
10001 or an OpenShift-assigned one), and no writable temporary directory (a read-only root filesystem without the
chart's /tmp emptyDir).

The tests run as root, for whom ``os.access`` always succeeds, so the unreadable files are unreadable by a patched
``os.access`` (the modes on disk are real); the missing temporary directory is Python's own error, from
``tempfile`` searching only directories that do not exist."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from conftest import REPO

from predictor import loading, server
from predictor.launch import free_ports
from predictor.loading import ModelLoadError, check_readable, check_weights, load_model

UNREADABLE_ENV = "KSERVE_LLM_TEST_UNREADABLE"  # the paths the patched os.access of the subprocess tests refuses


def deny_read(monkeypatch: pytest.MonkeyPatch, *paths: Path) -> None:
    """``os.access`` as for a user who may not read (nor search) ``paths``; every other answer is the real one."""
    denied = {str(p) for p in paths}
    real = os.access

    def access(path, mode, *args, **kwargs):
        if str(path) in denied and mode & (os.R_OK | os.X_OK):
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny model, copied with its weights and config at 0600, as ``save_pretrained`` under umask 077 leaves them."""
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    for name in ("model.safetensors", "config.json"):
        (copy / name).chmod(0o600)
    return copy


def expected_message(path: Path, fix: str) -> str:
    st = path.stat()
    return f"cannot read {path} (mode 0600, owner uid {st.st_uid} gid {st.st_gid}) as uid {os.getuid()}: {fix}"


FILES_FIX = "make the model files world-readable (chmod a+r) or run as their owner"


def test_unreadable_weights_name_the_file_its_mode_owner_and_this_uid(model_copy, monkeypatch):
    weights = model_copy / "model.safetensors"
    deny_read(monkeypatch, weights)
    with pytest.raises(ModelLoadError) as caught:
        check_weights(model_copy, allow_pickle=False)
    assert str(caught.value) == expected_message(weights, FILES_FIX)
    # load_model, the loader's entrypoint, refuses it the same way before transformers opens anything
    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", lambda *a, **k: pytest.fail("the loader must not get this far"))
    with pytest.raises(ModelLoadError, match="cannot read .*model.safetensors \\(mode 0600"):
        load_model(model_copy, dtype="float32", device="cpu")


def test_an_unreadable_config_is_not_reported_as_missing(model_copy, monkeypatch):
    config = model_copy / "config.json"
    deny_read(monkeypatch, config)
    with pytest.raises(ModelLoadError) as caught:
        check_weights(model_copy, allow_pickle=False)
    assert str(caught.value) == expected_message(config, FILES_FIX)
    assert "has no config.json" not in str(caught.value)


def test_several_unreadable_files_name_the_first_and_count_the_rest(model_copy, monkeypatch):
    deny_read(monkeypatch, model_copy / "config.json", model_copy / "model.safetensors", model_copy / "tokenizer.json")
    with pytest.raises(ModelLoadError) as caught:
        check_readable(model_copy)
    message = str(caught.value)
    assert message.startswith(f"cannot read {model_copy / 'config.json'} (mode 0600,")
    assert f"as uid {os.getuid()}, nor 2 more of the model's files: {FILES_FIX}" in message


def test_a_directory_this_user_cannot_search(model_copy, monkeypatch):
    model_copy.chmod(0o700)
    deny_read(monkeypatch, model_copy)
    with pytest.raises(ModelLoadError) as caught:
        check_weights(model_copy, allow_pickle=False)
    st = model_copy.stat()
    assert str(caught.value) == (
        f"cannot read {model_copy} (mode 0700, owner uid {st.st_uid} gid {st.st_gid}) as uid {os.getuid()}: "
        "make the model directory world-readable and searchable (chmod a+rx) or run as its owner"
    )


def test_only_the_files_the_loader_opens_are_checked(model_copy, monkeypatch):
    notes = model_copy / "README.md"
    notes.write_text("not opened by the loader")
    pickle = model_copy / "pytorch_model.bin"
    pickle.write_bytes(b"")
    deny_read(monkeypatch, notes, pickle)
    check_weights(model_copy, allow_pickle=False)  # readable 0600 files (root), an unreadable README and unused pickle
    with pytest.raises(ModelLoadError, match="pytorch_model.bin"):
        check_readable(model_copy, allow_pickle=True)  # pickle weights are opened when allowed


SITECUSTOMIZE = textwrap.dedent(
    f"""
    # Test hook (tests/test_startup_errors.py): os.access refuses reading the paths in ${UNREADABLE_ENV}, as for a
    # non-root user; the tests run as root, for whom it always succeeds.
    import os

    _denied = set(filter(None, os.environ.get("{UNREADABLE_ENV}", "").split(os.pathsep)))
    _real_access = os.access


    def _access(path, mode, *args, **kwargs):
        if os.fspath(path) in _denied and mode & (os.R_OK | os.X_OK):
            return False
        return _real_access(path, mode, *args, **kwargs)


    os.access = _access
    """
)


def run_predictor(model_dir: Path, env: dict[str, str], prelude: str = "") -> subprocess.CompletedProcess:
    """``python -m predictor`` as the image's entrypoint runs it (``prelude`` first, in the same interpreter)."""
    http_port, grpc_port = free_ports(2)
    args = ["--model_dir", str(model_dir), "--model_name", "tiny", "--http_port", str(http_port), "--grpc_port", str(grpc_port), "--dtype", "float32"]
    if prelude:
        cmd = [
            sys.executable,
            "-c",
            f"{prelude}\nimport runpy, sys\nsys.argv = ['predictor', *{args!r}]\nrunpy.run_module('predictor', run_name='__main__', alter_sys=True)",
        ]
    else:
        cmd = [sys.executable, "-m", "predictor", *args]
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=300)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("python -m predictor: error:")]


def test_the_server_exits_with_one_line_when_it_cannot_read_the_weights(model_copy, tmp_path):
    """The real entrypoint on a directory of 0600 files it may not read: exit 2 and the message, no traceback."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    weights = model_copy / "model.safetensors"
    pythonpath = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    result = run_predictor(model_copy, {"PYTHONPATH": pythonpath, UNREADABLE_ENV: str(weights)})
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert error_lines(result) == [f"python -m predictor: error: {expected_message(weights, FILES_FIX)}"]
    assert "Traceback" not in result.stdout + result.stderr


NO_TEMP_DIR = "mount a writable volume at /tmp (the Helm chart mounts an emptyDir there) or set TMPDIR"


def no_usable_temp_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """Make ``tempfile`` search only directories that do not exist, so that it raises Python's own error."""
    missing = [str(tmp_path / "no-tmpdir"), str(tmp_path / "no-tmp")]
    monkeypatch.setattr(tempfile, "_candidate_tempdir_list", lambda: list(missing))
    monkeypatch.setattr(tempfile, "tempdir", None)
    with pytest.raises(FileNotFoundError, match="No usable temporary directory"):
        tempfile.gettempdir()  # what torch's import met
    return missing


def test_no_temp_dir_is_one_clear_message(monkeypatch, tmp_path):
    missing = no_usable_temp_dir(monkeypatch, tmp_path)
    message = server.temp_dir_problem()
    assert message == f"no writable temporary directory (tried $TMPDIR, /tmp, /var/tmp, the working directory: {missing!r}): {NO_TEMP_DIR}"
    monkeypatch.undo()
    assert server.temp_dir_problem() is None


def test_main_refuses_to_start_without_a_temp_dir(monkeypatch, tmp_path, capsys):
    no_usable_temp_dir(monkeypatch, tmp_path)
    with pytest.raises(SystemExit) as caught:
        server.main(["--model_dir", str(tmp_path), "--configure_logging", "false"])
    assert caught.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("python -m predictor: error:")]
    assert line.startswith("python -m predictor: error: no writable temporary directory (tried $TMPDIR, /tmp, /var/tmp, the working directory")
    assert line.endswith(NO_TEMP_DIR)


def test_the_server_exits_with_one_line_without_a_temp_dir(tiny_model_dir, tmp_path):
    """The real entrypoint, its interpreter's tempfile finding no usable directory before anything is imported (as
    in a pod with a read-only root filesystem and no /tmp volume): torch is never imported, exit 2 and the message."""
    missing = [str(tmp_path / "absent")]
    prelude = f"import tempfile\ntempfile._candidate_tempdir_list = lambda: {missing!r}\ntempfile.tempdir = None"
    result = run_predictor(tiny_model_dir, {"TMPDIR": missing[0]}, prelude=prelude)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert error_lines(result) == [
        f"python -m predictor: error: no writable temporary directory (tried $TMPDIR, /tmp, /var/tmp, the working directory: {missing!r}): {NO_TEMP_DIR}"
    ]
    assert "Traceback" not in result.stdout + result.stderr
