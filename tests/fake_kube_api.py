"""A FAKE Kubernetes API server for the deploy step's tests: no cluster runs on these machines.

It serves only the InferenceService calls the deploy step makes (GET, server-side-apply PATCH, DELETE under
/apis/serving.kserve.io/v1beta1/namespaces/NS/inferenceservices/NAME), keeps objects in memory, bumps
metadata.generation when the spec changes, and reports Ready according to ``ready``: "always" (Ready as
soon as applied) or "never" (Ready=False with a reason, as KServe reports a revision that cannot start).
Every request is recorded, with the RBAC verb it would need, so tests can compare them with the Role.
"""

from __future__ import annotations

import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

PREFIX = "/apis/serving.kserve.io/v1beta1/namespaces/"


class FakeKubeAPI:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict] = {}
        self.requests: list[dict] = []
        self.ready = "always"
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

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
        self.server.shutdown()
        self.server.server_close()

    def _status(self, obj: dict) -> dict:
        generation = obj["metadata"]["generation"]
        if self.ready == "always":
            condition = {"type": "Ready", "status": "True"}
        else:
            condition = {"type": "Ready", "status": "False", "reason": "RevisionMissing", "message": "Revision failed: container predictor exited (OOMKilled)"}
        return {"observedGeneration": generation, "conditions": [condition], "url": f"http://{obj['metadata']['name']}.example.com"}

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

            def _key(self) -> tuple[str, str] | None:
                path = urlparse(self.path).path
                if not path.startswith(PREFIX):
                    return None
                parts = path[len(PREFIX) :].split("/")
                return (parts[0], parts[2]) if len(parts) == 3 and parts[1] == "inferenceservices" else None

            def _not_found(self, key) -> None:
                self._reply(
                    404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404, "message": f'inferenceservices "{key[1]}" not found'}
                )

            def _record(self, verb: str, **extra) -> None:
                fake.requests.append({"method": self.command, "verb": verb, "path": urlparse(self.path).path, **extra})

            def do_GET(self) -> None:
                key = self._key()
                self._record("get")
                if key not in fake.objects:
                    return self._not_found(key)
                self._reply(200, fake.objects[key])

            def do_DELETE(self) -> None:
                key = self._key()
                self._record("delete")
                if fake.objects.pop(key, None) is None:
                    return self._not_found(key)
                self._reply(200, {"kind": "Status", "status": "Success"})

            def do_PATCH(self) -> None:
                key = self._key()
                query = parse_qs(urlparse(self.path).query)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
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
                obj["status"] = fake._status(obj)
                fake.objects[key] = obj
                self._reply(201 if existing is None else 200, obj)

        return Handler
