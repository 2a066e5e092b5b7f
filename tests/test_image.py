"""The images, built and run (``make test-image``; CI runs it after ``make test`` and ``make test-slow``).

Both targets of images/Dockerfile are built with the engine this machine has (tools/build_images.py; podman is
installed where neither it nor docker is, and the tests are skipped, saying why, where that cannot be). Then:

- The chart is rendered (default values, and the single-GPU and KEDA examples in helm/kserve-llm/ci/) and the
  predictor image is run with the rendered container's own image, command, args, env, user and groups, read-only root,
  capabilities, volume mounts and memory limit, merged from the ServingRuntime and the InferenceService as KServe
  merges them, with the tiny model mounted read-only at /mnt/models as KServe's storage initializer mounts it. A
  field this translation does not know fails the test instead of being dropped, so chart and image cannot drift apart
  silently; what cannot exist here (a GPU) is named in the output.
- Against it: the rendered readiness probe, an OpenAI SDK chat completion, V2 gRPC with Triton's client, /metrics,
  and SIGTERM after the rendered preStop hook: in-flight streams finish and the container exits 0 within the grace
  period. That serving imports no pipeline package is checked in the image itself.
- The pipelines image runs its entrypoint (``python -m pipelines --help``), ``render-isvc`` (helm and the chart inside
  it) and the compiled pipeline's deploy component exactly as KFP starts it: the IR's command and args, an executor
  input, a dry run against the KServe CRD schema.
- Build times and image sizes are printed at the end (and the predictor image must stay within its size budget).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import build_images  # noqa: E402

pytestmark = pytest.mark.image

CHART = REPO / "helm" / "kserve-llm"
HELM = str(REPO / ".venv" / "bin" / "helm")
# The target was 1.3 GB; torch's CPU build alone is 620 MB, g++ (which the native operator and torch.compile
# need) 270 MB, transformers 130 MB and kserve's pandas 80 MB, so 1.8 GB is what serving takes. This budget catches a
# regression such as a pipeline package coming back (pyarrow alone is 156 MB, MLflow and kfp with it more).
PREDICTOR_IMAGE_MAX_BYTES = 1.9e9
# Stand-ins for what a cluster would provide: the Secrets the chart's examples name, the downward API's fields.
SECRETS = {"hf-token": {"HF_TOKEN": "hf_stand_in_for_the_test"}}
FIELD_REFS = {"metadata.name": "demo-predictor-0", "metadata.namespace": "default", "spec.nodeName": "node-0", "status.podIP": "127.0.0.1"}
PIPELINE_PACKAGES = ("kfp", "mlflow", "matplotlib", "pyarrow", "peft", "onnxscript", "model_registry")


def say(message: str) -> None:
    print(f"[test-image] {message}", flush=True)


# --- building ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def engine(pytestconfig: pytest.Config) -> build_images.Engine:
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        found, why = build_images.find_engine(install=True, log=say)
        say(f"engine: {why}")
    if found is None:
        pytest.skip(f"no container engine here and none could be installed ({why}): the images are not built or run")
    return found


@pytest.fixture(scope="session")
def built(engine: build_images.Engine, pytestconfig: pytest.Config) -> dict[str, build_images.Built]:
    """Both images, built with progress on the terminal (the engine's layer cache makes a rebuild quick)."""
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        results = build_images.build_all(engine=engine, quiet=True, log=say)
    return {b.target: b for b in results}


# --- the chart's container, as KServe merges it ----------------------------------------------------------


def render(*values: str) -> list[dict]:
    args = [HELM, "template", "demo", str(CHART)]
    for v in values:
        args += ["-f", str(CHART / "ci" / v)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


MERGE_KEYS = {"env": "name", "volumeMounts": "mountPath", "ports": "containerPort"}  # Kubernetes' patch merge keys


def strategic_merge(base: dict, patch: dict) -> dict:
    """Kubernetes' strategic merge patch of a Container, as far as a Container needs it: maps merge recursively,
    lists with a patch merge key merge item by item, other lists and scalars are replaced."""
    merged = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = strategic_merge(merged[key], value)
        elif key in MERGE_KEYS and isinstance(merged.get(key), list):
            by_key = {item[MERGE_KEYS[key]]: item for item in merged[key]}
            for item in value:
                by_key[item[MERGE_KEYS[key]]] = strategic_merge(by_key.get(item[MERGE_KEYS[key]], {}), item)
            merged[key] = list(by_key.values())
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@dataclass
class Pod:
    """The predictor container KServe would run and the pod-level fields around it."""

    container: dict
    pod: dict
    values: tuple[str, ...]

    @property
    def security(self) -> dict:
        """The container's effective security context: the pod's fields that apply to containers, then its own."""
        pod_level = {k: v for k, v in self.pod.get("securityContext", {}).items() if k in ("runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile")}
        return {**pod_level, **self.container.get("securityContext", {})}

    def flag(self, name: str) -> str | None:
        """The value of ``--name=value`` (or ``--name value``) in the container's args."""
        args = self.container.get("args", [])
        for i, arg in enumerate(args):
            if arg.startswith(f"--{name}="):
                return arg.split("=", 1)[1]
            if arg == f"--{name}" and i + 1 < len(args):
                return args[i + 1]
        return None


# KServe's InferenceService predictor fields that are not Container fields (the model's identity and storage).
NOT_CONTAINER = ("modelFormat", "runtime", "storageUri", "protocolVersion", "storage")


def predictor_pod(*values: str) -> Pod:
    docs = render(*values)
    (runtime,) = [d for d in docs if d["kind"] == "ServingRuntime"]
    (isvc,) = [d for d in docs if d["kind"] == "InferenceService"]
    (runtime_container,) = [c for c in runtime["spec"]["containers"] if c["name"] == "kserve-container"]
    predictor = isvc["spec"]["predictor"]
    model = {k: v for k, v in predictor["model"].items() if k not in NOT_CONTAINER}
    container = strategic_merge(runtime_container, model)
    # KServe concatenates the runtime's args and the InferenceService's instead of replacing them.
    container["args"] = [*runtime_container.get("args", []), *model.get("args", [])]
    return Pod(container, {k: v for k, v in predictor.items() if k != "model"}, values)


def cpu_count(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def quantity_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(quantity))
    assert match and match.group(2) in ("", *units), f"unknown quantity {quantity!r}"
    return int(float(match.group(1)) * units.get(match.group(2), 1))


@dataclass
class RunSpec:
    """A ``podman run``/``docker run`` command line for a Pod, and what it could not carry over."""

    flags: list[str]
    image: str
    args: list[str]
    ports: list[int]
    not_here: list[str] = field(default_factory=list)


def run_spec(pod: Pod, model_dir: Path, scratch: Path, engine: str = "podman") -> RunSpec:
    """Translate the container into engine flags. Unknown fields fail: a chart change the test cannot express must be
    looked at, not silently dropped."""
    c, flags, not_here = pod.container, [], []
    known = {"name", "image", "imagePullPolicy", "command", "args", "env", "envFrom", "ports", "securityContext", "resources"}
    known |= {"volumeMounts", "startupProbe", "readinessProbe", "livenessProbe", "lifecycle", "workingDir"}
    unknown = sorted(set(c) - known)
    assert unknown == [], f"the rendered container has fields this test does not translate: {unknown}"
    security = pod.security
    unknown = sorted(
        set(security)
        - {"runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile", "readOnlyRootFilesystem", "allowPrivilegeEscalation", "capabilities", "privileged"}
    )
    assert unknown == [], f"securityContext fields this test does not translate: {unknown}"
    assert not security.get("privileged"), "a privileged predictor container"
    if "runAsUser" in security:
        flags += ["--user", f"{security['runAsUser']}" + (f":{security['runAsGroup']}" if "runAsGroup" in security else "")]
    if security.get("runAsNonRoot"):
        assert security.get("runAsUser", 10001) != 0, "runAsNonRoot with runAsUser 0"
    pod_security = pod.pod.get("securityContext", {})
    for group in [pod_security.get("fsGroup"), *pod_security.get("supplementalGroups", [])]:
        if group is not None:
            flags += ["--group-add", str(group)]
    if security.get("readOnlyRootFilesystem"):
        # podman would add tmpfs mounts at /tmp, /var/tmp and /run: only the chart's volumes may be writable
        flags += ["--read-only", *(["--read-only-tmpfs=false"] if engine == "podman" else [])]
    for cap in security.get("capabilities", {}).get("drop", []):
        flags += ["--cap-drop", cap]
    for cap in security.get("capabilities", {}).get("add", []):
        flags += ["--cap-add", cap]
    if security.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    seccomp = security.get("seccompProfile", {}).get("type", "RuntimeDefault")
    assert seccomp in ("RuntimeDefault", "Unconfined"), f"seccompProfile {seccomp} is not translated"
    if seccomp == "Unconfined":
        flags += ["--security-opt", "seccomp=unconfined"]
    # env and envFrom: values, the Secrets' stand-ins, the downward API's stand-ins
    for item in c.get("envFrom", []):
        assert set(item) <= {"secretRef", "prefix"}, f"envFrom {item} is not translated"
        secret = SECRETS[item["secretRef"]["name"]]
        flags += [a for k, v in secret.items() for a in ("-e", f"{item.get('prefix', '')}{k}={v}")]
    for item in c.get("env", []):
        if "value" in item or not item.get("valueFrom"):
            value = item.get("value", "")
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            value = SECRETS[ref["name"]][ref["key"]]
        elif "fieldRef" in item["valueFrom"]:
            value = FIELD_REFS[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            raise AssertionError(f"env {item['name']}: {item['valueFrom']} is not translated")
        flags += ["-e", f"{item['name']}={value}"]
    # volumes: emptyDir on disk is a fresh world-writable directory (as the kubelet makes it), in memory a tmpfs
    volumes = {v["name"]: v for v in pod.pod.get("volumes", [])}
    for mount in c.get("volumeMounts", []):
        assert set(mount) <= {"name", "mountPath", "readOnly"}, f"volumeMount {mount} is not translated"
        volume = volumes[mount["name"]]
        assert set(volume) == {"name", "emptyDir"}, f"volume {volume} is not translated (only emptyDir is)"
        if volume["emptyDir"].get("medium") == "Memory":
            size = volume["emptyDir"].get("sizeLimit")
            flags += ["--mount", f"type=tmpfs,destination={mount['mountPath']}" + (f",tmpfs-size={quantity_bytes(size)}" if size else "")]
        else:
            host = scratch / mount["name"]
            host.mkdir(parents=True)
            host.chmod(0o777)
            flags += ["-v", f"{host}:{mount['mountPath']}:{'ro' if mount.get('readOnly') else 'rw'}"]
    # KServe's storage initializer: the model, read-only at /mnt/models
    flags += ["-v", f"{model_dir}:/mnt/models:ro"]
    limits = c.get("resources", {}).get("limits", {})
    for resource, quantity in limits.items():
        if resource == "memory":
            flags += ["--memory", str(quantity_bytes(quantity))]
        elif resource == "cpu":
            flags += ["--cpus", str(cpu_count(quantity))]
        else:
            not_here.append(f"limits {resource}: {quantity}")
    if "runtimeClassName" in pod.pod:
        not_here.append(f"runtimeClassName {pod.pod['runtimeClassName']}")
    grace = pod.pod.get("terminationGracePeriodSeconds", 30)
    flags += ["--stop-timeout", str(grace)]
    if c.get("workingDir"):
        flags += ["-w", c["workingDir"]]
    if c.get("command"):
        flags += ["--entrypoint", json.dumps(c["command"])]
    ports = sorted({p["containerPort"] for p in c.get("ports", [])} | {int(pod.flag(f)) for f in ("http_port", "grpc_port") if pod.flag(f)})
    return RunSpec(flags, c["image"], list(c.get("args", [])), ports, not_here)


# --- running it ------------------------------------------------------------------------------------------


def free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class Running:
    engine: build_images.Engine
    name: str
    pod: Pod
    spec: RunSpec
    host_ports: dict[int, int]  # container port -> where this test reaches it
    ready_after: float = 0.0

    def url(self, port: int | None = None) -> str:
        return f"http://127.0.0.1:{self.host_ports[port or int(self.pod.flag('http_port') or 8080)]}"

    def logs(self) -> str:
        done = subprocess.run(self.engine.command("logs", self.name), capture_output=True, text=True, timeout=60)
        return done.stdout + done.stderr

    def exec(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.engine.command("exec", self.name, *command), capture_output=True, text=True, timeout=timeout)

    def state(self) -> dict:
        done = subprocess.run(self.engine.command("inspect", "--format", "{{json .State}}", self.name), capture_output=True, text=True, timeout=60)
        return json.loads(done.stdout) if done.returncode == 0 else {}

    def wait_probe(self, probe: dict) -> float:
        """Poll the rendered probe as the kubelet would (periodSeconds x failureThreshold); seconds until it passed."""
        get = probe["httpGet"]
        url = f"{self.url(int(get['port']))}{get['path']}"
        started = time.monotonic()
        deadline = started + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3) + probe.get("initialDelaySeconds", 0)
        while time.monotonic() < deadline:
            if not self.state().get("Running", False):
                pytest.fail(f"the container stopped before {get['path']} answered:\n{self.logs()[-4000:]}")
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(1)
        pytest.fail(f"{get['path']} did not answer 200 within the probe's {deadline - started:.0f} s:\n{self.logs()[-4000:]}")


@pytest.fixture(scope="session")
def network(engine: build_images.Engine, built) -> str:
    """``bridge`` where the engine can publish ports to loopback here, else ``host`` (the chart's fixed ports then
    have to be free)."""
    done = subprocess.run(
        engine.command("run", "--rm", *engine.extra_flags, "-p", "127.0.0.1::8080", "--entrypoint", "true", built["predictor"].tag),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode == 0:
        return "bridge"
    say(f"publishing ports fails here ({done.stderr.strip().splitlines()[-1][:200] if done.stderr.strip() else done.returncode}): host network")
    return "host"


def start(engine: build_images.Engine, network: str, pod: Pod, model_dir: Path, scratch: Path) -> Running:
    spec = run_spec(pod, model_dir, scratch, engine.name)
    name = f"kserve-llm-test-{os.getpid()}-{'-'.join(v.split('-')[0] for v in pod.values) or 'default'}"
    flags = [*engine.extra_flags, "--detach", "--name", name, *spec.flags]
    if network == "bridge":
        flags += [a for p in spec.ports for a in ("-p", f"127.0.0.1::{p}")]
    else:
        busy = [p for p in spec.ports if not free(p)]
        if busy:
            pytest.skip(f"the chart's ports {busy} are taken on this machine and the engine cannot publish ports elsewhere")
        flags += ["--network", "host"]
    subprocess.run(engine.command("rm", "--force", name), capture_output=True, timeout=120)  # left by a killed run
    command = engine.command("run", *flags, spec.image, *spec.args)
    say(f"{pod.values or 'default values'}: {' '.join(command)}")
    if spec.not_here:
        say(f"not on this machine, left out: {'; '.join(spec.not_here)}")
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{engine.name} run failed: {done.stderr}"
    ports = {p: p for p in spec.ports}
    if network == "bridge":
        for p in spec.ports:
            out = subprocess.run(engine.command("port", name, f"{p}/tcp"), capture_output=True, text=True, timeout=60).stdout
            ports[p] = int(out.strip().splitlines()[0].rsplit(":", 1)[1])
    return Running(engine, name, pod, spec, ports)


def remove(running: Running) -> None:
    subprocess.run(running.engine.command("rm", "--force", running.name), capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model in a world-readable copy (the container's user is not this one)."""
    copy_dir = tmp_path_factory.mktemp("image-model") / "model"
    shutil.copytree(tiny_model_dir, copy_dir)
    for path in [copy_dir, *copy_dir.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    copy_dir.parent.chmod(0o755)
    return copy_dir


@pytest.fixture(scope="module")
def served(engine, built, network, model_dir, tmp_path_factory) -> Iterator[Running]:
    """The predictor image, run with the chart's default values."""
    running = start(engine, network, predictor_pod(), model_dir, tmp_path_factory.mktemp("pod-default"))
    try:
        running.ready_after = running.wait_probe(running.pod.container["startupProbe"])
        yield running
    finally:
        remove(running)


def model_name(running: Running) -> str:
    return running.pod.flag("model_name") or "model"


def compiled_pipeline() -> dict:
    """The pipeline spec, the first document of the committed IR."""
    return next(yaml.safe_load_all((REPO / "pipelines" / "llm_lifecycle.yaml").read_text()))


# --- the predictor image ---------------------------------------------------------------------------------


def test_the_chart_renders_the_images_this_build_tags(built):
    assert predictor_pod().container["image"] == built["predictor"].tag
    ir = compiled_pipeline()
    images = {e["container"]["image"] for e in ir["deploymentSpec"]["executors"].values()}
    assert images == {built["pipelines"].tag}


def test_served_with_the_charts_container_spec(served):
    """Ready through the rendered probes; the container runs as the rendered user on a read-only root, the native
    operator compiled (g++ is in the image) into the /tmp volume."""
    say(f"ready after {served.ready_after:.1f} s")
    assert served.wait_probe(served.pod.container["readinessProbe"]) < 10
    assert httpx.get(served.url() + served.pod.container["livenessProbe"]["httpGet"]["path"], timeout=10).status_code == 200
    who = served.exec("id", "-u")
    assert who.stdout.strip() == str(served.pod.security["runAsUser"])
    write = served.exec("python", "-c", "open('/opt/venv/written-at-run-time', 'w')")
    assert write.returncode != 0 and "Read-only file system" in write.stderr
    logs = served.logs()
    assert "loaded /mnt/models" in logs
    assert "decode attention: native, from the block pools" in logs, "the native operator was not built at start:\n" + logs[-3000:]
    assert "compiling failed" not in logs, "torch.compile cannot build its C++ in the image:\n" + logs[-3000:]


def test_openai_sdk_chat_completion(served):
    from openai import OpenAI

    client = OpenAI(base_url=served.url() + "/v1", api_key="none", timeout=60)
    assert [m.id for m in client.models.list().data] == [model_name(served)]
    reply = client.chat.completions.create(model=model_name(served), messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0)
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason in ("stop", "length")
    assert 1 <= reply.usage.completion_tokens <= 8


TRITON_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as triton

client = triton.InferenceServerClient(sys.argv[1])
assert client.is_server_ready() and client.is_model_ready(sys.argv[2])
tensor = triton.InferInput("text_input", [1], "BYTES")
tensor.set_data_from_numpy(np.array([b"The image runs"], dtype=np.object_))
result = client.infer(sys.argv[2], [tensor], parameters={"max_tokens": 6, "temperature": "0"}, client_timeout=60)
print(json.dumps([t.decode() for t in result.as_numpy("text_output")]))
"""


def test_v2_grpc_with_triton_client_agrees_with_openai(served):
    """In a process of its own: tritonclient's protos and KServe's clash in one protobuf registry."""
    grpc_port = int(served.pod.flag("grpc_port"))
    done = subprocess.run(
        [sys.executable, "-c", TRITON_CLIENT, f"127.0.0.1:{served.host_ports[grpc_port]}", model_name(served)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (text,) = json.loads(done.stdout)
    body = {"model": model_name(served), "prompt": "The image runs", "max_tokens": 6, "temperature": 0}
    assert text == httpx.post(served.url() + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]


def test_metrics(served):
    httpx.post(served.url() + "/v1/completions", json={"model": model_name(served), "prompt": "x", "max_tokens": 3}, timeout=60).raise_for_status()
    text = httpx.get(served.url() + "/metrics", timeout=30).text
    generated = re.search(r"^vllm:generation_tokens_total\{[^}]*\} ([\d.e+]+)$", text, re.MULTILINE)
    assert generated and float(generated.group(1)) >= 3, text[:2000]
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:time_to_first_token_seconds_bucket"):
        assert name in text


IMPORTS_IN_IMAGE = """
import importlib.util, json, pkgutil, sys
import predictor
import predictor.server, predictor.model, predictor.loading, predictor.onnx_model, predictor.gguf_file
import onnxruntime
missing = [n for n in sys.argv[1:] if importlib.util.find_spec(n) is not None]
print(json.dumps({"installed": missing, "loaded": sorted(m for m in sys.argv[1:] if m in sys.modules)}))
"""


def test_the_predictor_image_has_no_pipeline_package(engine, built):
    done = subprocess.run(
        engine.command("run", "--rm", *engine.extra_flags, "--entrypoint", "python", built["predictor"].tag, "-c", IMPORTS_IN_IMAGE, *PIPELINE_PACKAGES),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"installed": [], "loaded": []}


def test_sigterm_after_prestop_finishes_streams_and_exits_zero(served):
    """As the kubelet stops a pod: the rendered preStop hook, then SIGTERM; the streams in flight run to their last
    token and [DONE], and the container exits 0 within terminationGracePeriodSeconds."""
    grace = served.pod.pod.get("terminationGracePeriodSeconds", 30)
    streams, first_chunk = 6, threading.Barrier(7, timeout=60)
    results: list[tuple[list[str], str | None]] = [([], None)] * streams

    def stream(i: int) -> None:
        body = {"model": model_name(served), "prompt": f"stream {i}", "max_tokens": 100, "ignore_eos": True, "stream": True}
        events, passed = [], False
        try:
            with httpx.stream("POST", served.url() + "/v1/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if not passed:
                            passed = True
                            first_chunk.wait()
            results[i] = (events, None)
        except Exception as exc:  # reported by the assertion below
            results[i] = (events, repr(exc))
            if not passed:
                first_chunk.abort()

    started = time.monotonic()
    pre_stop = served.pod.container["lifecycle"]["preStop"]["exec"]["command"]
    hook = served.exec(*pre_stop, timeout=grace)
    assert hook.returncode == 0, f"preStop {pre_stop} failed in the image: {hook.stderr}"
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    first_chunk.wait()
    subprocess.run(served.engine.command("kill", "--signal", "TERM", served.name), check=True, capture_output=True, timeout=60)
    for t in threads:
        t.join(timeout=grace)
    waited = subprocess.run(served.engine.command("wait", served.name), capture_output=True, text=True, timeout=grace + 30)
    seconds = time.monotonic() - started
    for events, error in results:
        assert error is None, error
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"  # all 100 tokens, not cut short
    assert waited.stdout.strip() == "0", f"exit code {waited.stdout.strip()}:\n{served.logs()[-3000:]}"
    assert seconds < grace, f"stopped after {seconds:.0f} s, the grace period is {grace} s"
    say(f"preStop + SIGTERM with {streams} streams in flight: exit 0 after {seconds:.1f} s (grace {grace} s)")


@pytest.mark.parametrize("values", ["single-gpu-values.yaml", "keda-values.yaml"])
def test_the_charts_examples_run_on_the_image(values, engine, built, network, model_dir, tmp_path):
    """The GPU and KEDA examples' container specs (bfloat16, a Secret's variables, their limits) on this image."""
    running = start(engine, network, predictor_pod(values), model_dir, tmp_path)
    try:
        running.wait_probe(running.pod.container["startupProbe"])
        body = {"model": model_name(running), "prompt": "x", "max_tokens": 4, "temperature": 0}
        answer = httpx.post(running.url() + "/v1/completions", json=body, timeout=60).json()
        assert answer["usage"]["completion_tokens"] == 4, answer
        dtype = running.pod.flag("dtype")
        if dtype and dtype != "auto":
            assert f"dtype {dtype}" in running.logs()
        for item in running.pod.container.get("envFrom", []):
            for key in SECRETS[item["secretRef"]["name"]]:
                assert running.exec("printenv", key).returncode == 0
    finally:
        remove(running)


# --- the pipelines image ---------------------------------------------------------------------------------


def pipelines_run(engine, built, *args: str, flags: tuple[str, ...] = (), timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        engine.command("run", "--rm", *engine.extra_flags, *flags, built["pipelines"].tag, *args), capture_output=True, text=True, timeout=timeout
    )


def test_the_pipelines_entrypoint(engine, built):
    default = pipelines_run(engine, built)
    assert default.returncode == 0, default.stderr
    for command in ("train", "optimize", "evaluate", "render-isvc", "compile", "run"):
        assert command in default.stdout
    explicit = pipelines_run(engine, built, "-m", "pipelines", "--help", flags=("--entrypoint", "python"))
    assert explicit.returncode == 0 and explicit.stdout == default.stdout


def test_render_isvc_in_the_pipelines_image(engine, built):
    """The deploy step's rendering: helm and the chart inside the image ($KSERVE_LLM_CHART)."""
    done = pipelines_run(engine, built, "render-isvc", "--name", "demo", "--storage-uri", "pvc://models/demo", "--namespace", "llm")
    assert done.returncode == 0, done.stderr
    isvc = yaml.safe_load(done.stdout)
    assert isvc["kind"] == "InferenceService"
    assert (isvc["metadata"]["name"], isvc["metadata"]["namespace"]) == ("demo", "llm")
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == "pvc://models/demo"


def test_the_compiled_deploy_component_runs_as_kfp_starts_it(engine, built, tmp_path):
    """The IR's own command and args for deploy-model, ``{{$}}`` replaced by an executor input (a dry run validated
    against the KServe CRD schema, mounted as $KSERVE_LLM_CRDS), as KFP's launcher runs it; its output parameter is
    read back from the executor output file."""
    ir = compiled_pipeline()
    container = ir["deploymentSpec"]["executors"]["exec-deploy-model"]["container"]
    assert container["image"] == built["pipelines"].tag
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    outputs.chmod(0o777)
    executor_input = {
        "inputs": {
            "parameterValues": {
                "isvc_name": "demo",
                "namespace": "llm",
                "storage_uri": "pvc://models/demo",
                "registered_source": "",
                "model_name": "demo",
                "canary_percent": -1,
                "chart_values": {},
                "dry_run": True,
                "ready_timeout_s": 60,
            }
        },
        "outputs": {"parameters": {"Output": {"outputFile": "/kfp/outputs/Output"}}, "outputFile": "/kfp/outputs/executor_output.json"},
    }
    args = [json.dumps(executor_input) if a == "{{$}}" else a for a in container["args"]]
    flags = (
        "--entrypoint",
        json.dumps(container["command"]),
        "-v",
        f"{REPO / 'schemas' / 'crds'}:/opt/crds:ro",
        "-e",
        "KSERVE_LLM_CRDS=/opt/crds",
        "-v",
        f"{outputs}:/kfp/outputs:rw",
    )
    done = pipelines_run(engine, built, *args, flags=flags)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "validates against the KServe CRD" in done.stdout + done.stderr
    written = json.loads((outputs / "executor_output.json").read_text())
    assert written["parameterValues"]["Output"] == "dry-run"


def test_zz_report_build_times_and_sizes(built, pytestconfig):
    """Last in this file: the figures the README quotes, and the predictor image's size target."""
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        for item in built.values():
            say(f"{item.tag}: {item.size_bytes / 1e9:.2f} GB, built in {item.seconds:.0f} s ({item.engine}, base {item.base})")
    size = built["predictor"].size_bytes
    assert size <= PREDICTOR_IMAGE_MAX_BYTES, f"the predictor image is {size / 1e9:.2f} GB, over its {PREDICTOR_IMAGE_MAX_BYTES / 1e9:.1f} GB budget"
