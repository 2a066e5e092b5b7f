"""A FAKE Kubernetes API server for the pipeline steps' tests: no cluster runs on these machines.

It serves only the calls the steps make on their custom resources, under
``/apis/GROUP/VERSION/namespaces/NS/PLURAL[/NAME]``: GET, server-side-apply PATCH, POST (create) and DELETE.
Objects live in memory, keyed ``(plural, namespace, name)``; metadata.generation goes up when the spec changes.

- InferenceService / LLMInferenceService: Ready according to ``ready``: "always" (Ready as soon as applied)
  or "never" (Ready=False with a reason, as KServe reports a revision that cannot start).
- TrainJob: according to ``trainjob``: "run" (a FAKE controller runs the trainer's command on this machine,
  as one node with ``numNodes x numProcPerNode`` processes, through the PET_* variables Kubeflow Trainer's torch
  plugin sets for torchrun; Complete or Failed by its exit code), "fail" (Failed at once with a reason, as
  Trainer reports a JobSet whose pods failed) or "never" (stays running).

Every request is recorded with the RBAC verb it would need, so tests can compare them with the Role.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from predictor.launch import free_port

TRAINJOB_FAILURE = {"type": "Failed", "status": "True", "reason": "JobSetFailed", "message": "jobset failed: node-0-0 exited with code 137 (OOMKilled)"}


class FakeKubeAPI:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.requests: list[dict] = []
        self.ready = "always"
        self.trainjob = "run"
        self.processes: dict[tuple[str, str, str], subprocess.Popen] = {}
        self.logs: dict[tuple[str, str, str], str] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "fake", "user": {"token": "fake-token"}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                    "current-context": "fake",
                }
            )
        )
        return path

    def __enter__(self) -> FakeKubeAPI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for process in self.processes.values():
            process.kill()
        self.server.shutdown()
        self.server.server_close()

    def get(self, plural: str, namespace: str, name: str) -> dict | None:
        return self.objects.get((plural, namespace, name))

    # --- status, as the controllers would report it --------------------------------------------------

    def _service_status(self, obj: dict) -> dict:
        generation = obj["metadata"]["generation"]
        if self.ready == "always":
            condition = {"type": "Ready", "status": "True"}
        else:
            condition = {"type": "Ready", "status": "False", "reason": "RevisionMissing", "message": "Revision failed: container predictor exited (OOMKilled)"}
        return {"observedGeneration": generation, "conditions": [condition], "url": f"http://{obj['metadata']['name']}.example.com"}

    def _start_trainjob(self, key: tuple[str, str, str], obj: dict) -> None:
        created = {"type": "Created", "status": "True", "reason": "JobSetCreated", "message": "Succeeded to create JobSet"}
        obj["status"] = {"conditions": [created]}
        if self.trainjob == "fail":
            obj["status"]["conditions"].append(TRAINJOB_FAILURE)
        elif self.trainjob == "run":
            trainer = obj["spec"]["trainer"]
            env = {**os.environ, **{e["name"]: e["value"] for e in trainer.get("env", []) if "value" in e}}
            env.update(PET_NNODES="1", PET_NPROC_PER_NODE=str(trainer.get("numNodes", 1) * trainer.get("numProcPerNode", 1)), PET_NODE_RANK="0")
            env.update(PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
            env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # torchrun beside the test Python
            process = subprocess.Popen(trainer["command"] + trainer.get("args", []), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            self.processes[key] = process
            threading.Thread(target=self._finish_trainjob, args=(key, process), daemon=True).start()

    def _finish_trainjob(self, key: tuple[str, str, str], process: subprocess.Popen) -> None:
        self.logs[key] = process.communicate()[0]
        obj = self.objects.get(key)
        if obj is None or self.processes.get(key) is not process:  # deleted meanwhile
            return
        if process.returncode == 0:
            obj["status"]["conditions"].append({"type": "Complete", "status": "True", "reason": "JobSetCompleted", "message": "jobset completed"})
        else:
            message = f"node-0-0 exited with code {process.returncode}: {self.logs[key].strip().splitlines()[-1:]}"
            obj["status"]["conditions"].append({"type": "Failed", "status": "True", "reason": "JobSetFailed", "message": message})

    # --- HTTP ----------------------------------------------------------------------------------------

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _key(self) -> tuple[str, str, str]:
                """(plural, namespace, name); name is "" for a collection (POST)."""
                parts = urlparse(self.path).path.strip("/").split("/")
                if len(parts) not in (6, 7) or parts[0] != "apis" or parts[3] != "namespaces":
                    raise ValueError(self.path)
                return parts[5], parts[4], parts[6] if len(parts) == 7 else ""

            def _body(self) -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length)) if length else {}

            def _not_found(self, key) -> None:
                self._reply(404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404, "message": f'{key[0]} "{key[2]}" not found'})

            def _record(self, verb: str, **extra) -> None:
                key = self._key()
                fake.requests.append({"method": self.command, "verb": verb, "resource": key[0], "path": urlparse(self.path).path, **extra})

            def do_GET(self) -> None:
                key = self._key()
                self._record("get")
                if key not in fake.objects:
                    return self._not_found(key)
                self._reply(200, fake.objects[key])

            def do_DELETE(self) -> None:
                key = self._key()
                self._record("delete", body=self._body())
                if fake.objects.pop(key, None) is None:
                    return self._not_found(key)
                process = fake.processes.pop(key, None)
                if process is not None:
                    process.kill()
                self._reply(200, {"kind": "Status", "status": "Success"})

            def do_POST(self) -> None:
                plural, namespace, _ = self._key()
                body = self._body()
                key = (plural, namespace, body["metadata"]["name"])
                self._record("create", body=body)
                if key in fake.objects:
                    return self._reply(409, {"kind": "Status", "code": 409, "reason": "AlreadyExists", "message": f'{plural} "{key[2]}" already exists'})
                obj = copy.deepcopy(body)
                obj["metadata"].update(generation=1, uid="fake-uid", resourceVersion="1")
                fake.objects[key] = obj
                if obj["kind"] == "TrainJob":
                    fake._start_trainjob(key, obj)
                self._reply(201, obj)

            def do_PATCH(self) -> None:
                key = self._key()
                query = parse_qs(urlparse(self.path).query)
                body = self._body()
                content_type = self.headers["Content-Type"]
                if content_type != "application/apply-patch+yaml" or "fieldManager" not in query:
                    self._record("patch", content_type=content_type)
                    return self._reply(415, {"kind": "Status", "code": 415, "message": "the deploy step must use server-side apply with a field manager"})
                existing = fake.objects.get(key)
                dry_run = query.get("dryRun") == ["All"]
                verb = "patch" if existing else "create"
                self._record(verb, content_type=content_type, field_manager=query["fieldManager"][0], body=body, dry_run=dry_run)
                if dry_run:  # validated and admitted, not stored
                    return self._reply(200, body)
                if existing is None:
                    obj = copy.deepcopy(body)
                    obj["metadata"].update(generation=1, uid="fake-uid", resourceVersion="1")
                else:
                    obj = copy.deepcopy(existing)
                    obj["metadata"]["labels"] = body["metadata"].get("labels", {})
                    obj["metadata"]["annotations"] = body["metadata"].get("annotations", {})
                    if obj["spec"] != body["spec"]:
                        obj["spec"] = copy.deepcopy(body["spec"])
                        obj["metadata"]["generation"] += 1
                obj["status"] = fake._service_status(obj)
                fake.objects[key] = obj
                self._reply(201 if existing is None else 200, obj)

        return Handler
