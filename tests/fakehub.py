"""A tiny Hugging Face hub stand-in, serving just what huggingface_hub's download path calls.

huggingface_hub (2.x) asks for `GET /api/models/{repo}` (the model info, whose `siblings`
list the files), then `HEAD` and `GET /{repo}/resolve/{revision}/{file}`. The HEAD answer
must carry `X-Repo-Commit` and `ETag` (the cache's blob name) and `Content-Length`; errors
carry `X-Error-Code`, which huggingface_hub turns into typed exceptions. No `X-Xet-*`
headers are sent, so downloads take the plain HTTP path.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str
    authorization: str | None


@dataclass
class FakeHub:
    """Serves `repos` ({"owner/name": {"file.gguf": b"..."}}) on a free port of 127.0.0.1."""

    repos: dict[str, dict[str, bytes]]
    gated: frozenset[str] = frozenset()  # repos that refuse everyone, as a gated hub repo does
    requests: list[SeenRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket, so later connections are refused."""
        self._server.shutdown()
        self._server.server_close()

    def commit_of(self, repo_id: str) -> str:
        return hashlib.sha1(repo_id.encode()).hexdigest()

    def downloads(self) -> list[str]:
        return [r.path for r in self.requests if r.method == "GET" and "/resolve/" in r.path]


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._answer(with_body=True)

        def do_HEAD(self) -> None:
            self._answer(with_body=False)

        def _answer(self, with_body: bool) -> None:
            hub.requests.append(SeenRequest(self.command, self.path, self.headers["Authorization"]))
            parts = self.path.split("?")[0].strip("/").split("/")
            if parts[:2] == ["api", "models"]:
                self._model_info("/".join(parts[2:4]))
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._resolve("/".join(parts[:2]), "/".join(parts[4:]), with_body)
            else:
                self._send(404, b'{"error": "not found"}', {})

        def _model_info(self, repo_id: str) -> None:
            if self._is_refused(repo_id):
                return
            info = {
                "id": repo_id,
                "sha": hub.commit_of(repo_id),
                "siblings": [{"rfilename": name} for name in hub.repos[repo_id]],
            }
            self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})

        def _resolve(self, repo_id: str, filename: str, with_body: bool) -> None:
            if self._is_refused(repo_id):
                return
            commit = {"X-Repo-Commit": hub.commit_of(repo_id)}
            body = hub.repos[repo_id].get(filename)
            if body is None:
                return self._send(404, b"{}", {**commit, "X-Error-Code": "EntryNotFound"})
            etag = {"ETag": f'"{hashlib.sha256(body).hexdigest()}"'}
            self._send(200, body, {**commit, **etag}, with_body=with_body)

        def _is_refused(self, repo_id: str) -> bool:
            """Answer as the hub does for a missing or gated repo; True if it did."""
            if repo_id not in hub.repos:
                headers = {"X-Error-Code": "RepoNotFound", "Content-Type": "application/json"}
                self._send(404, b'{"error": "Repository not found"}', headers)
            elif repo_id in hub.gated:
                self._send(403, b'{"error": "gated"}', {"X-Error-Code": "GatedRepo"})
            else:
                return False
            return True

        def _send(self, status: int, body: bytes, headers: dict, with_body: bool = True) -> None:
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # the test asserts on hub.requests instead

    return Handler
