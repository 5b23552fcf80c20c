"""A loopback Hugging Face Hub for tests: model repositories served from local folders on 127.0.0.1, speaking the
part of the Hub's HTTP API that huggingface_hub uses to list a repository and download its files (`HEAD`/`GET
/<repo>/resolve/<revision>/<file>`, with byte ranges; `GET /api/models/<repo>/revision/<revision>` and
`.../tree/<revision>`).

As with the loopback S3 server, the port is chosen when this module is imported and `HF_ENDPOINT` names it from
then on (conftest imports it before anything imports huggingface_hub, which reads the endpoint once, and before Ray
starts, whose workers copy the environment); the server starts only when a test asks for `hub`. The tests stay
offline (`HF_HUB_OFFLINE=1`): a test that uses the hub turns that off for itself (`hub.online(monkeypatch)`) and
for the processes it starts (`hub.env()`). Nothing can reach the real Hub. Every request is logged (`hub.requests`:
method, file, byte range), so a test sees what was downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from ray_head import free_port

COMMIT = "0123456789abcdef0123456789abcdef01234567"


HUB_PORT = free_port()
HUB_ENDPOINT = f"http://127.0.0.1:{HUB_PORT}"


def configure_hub_environment() -> None:
    os.environ["HF_ENDPOINT"] = HUB_ENDPOINT


@dataclass
class Request:
    method: str
    repo: str
    file: str
    range: str | None


@dataclass
class LoopbackHub:
    endpoint: str
    repos: dict[str, Path] = field(default_factory=dict)  # repo id -> folder with its files
    requests: list[Request] = field(default_factory=list)

    def add(self, repo: str, folder: Path) -> str:
        self.repos[repo] = Path(folder)
        return repo

    def online(self, monkeypatch) -> None:
        """This process may use the (loopback) hub for the rest of the test."""
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def env(self) -> dict[str, str]:
        """The environment of a process (and its Ray workers) that may use the loopback hub."""
        return {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": self.endpoint}

    def downloads(self, file: str) -> list[Request]:
        """Whole-file GETs of `file` (no byte range)."""
        return [r for r in self.requests if r.method == "GET" and r.file == file and r.range is None]


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _handler(hub: LoopbackHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head=False) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if "Content-Length" not in (headers or {}):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, value) -> None:
            self._send(status, json.dumps(value).encode(), {"Content-Type": "application/json"})

        def do_GET(self) -> None:
            self._serve(head=False)

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def _serve(self, head: bool) -> None:
            path = unquote(urlparse(self.path).path)
            api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree)/[^/]+(?:/.*)?)?", path)
            if api:  # the repository's info (with its files) or its file tree
                folder = hub.repos.get(api.group(1))
                if folder is None:
                    return self._json(404, {"error": "Repository not found"})
                hub.requests.append(Request(self.command, api.group(1), "", None))
                files = [(p.relative_to(folder).as_posix(), p.stat().st_size, p) for p in _files(folder)]
                if api.group(2) == "tree":
                    return self._json(200, [{"type": "file", "path": name, "size": size,
                                             "oid": hashlib.sha1(p.read_bytes()).hexdigest()}
                                            for name, size, p in files])
                return self._json(200, {"id": api.group(1), "modelId": api.group(1), "sha": COMMIT, "private": False,
                                        "siblings": [{"rfilename": name, "size": size} for name, size, _ in files]})
            resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            folder = hub.repos.get(resolve.group(1)) if resolve else None
            if folder is None or not (folder / resolve.group(3)).is_file():
                return self._send(404, b"not found", {"X-Error-Code": "EntryNotFound"}, head=head)
            data = (folder / resolve.group(3)).read_bytes()
            wanted = self.headers.get("Range")
            hub.requests.append(Request(self.command, resolve.group(1), resolve.group(3), wanted))
            headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": COMMIT,
                       "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            if wanted and (m := re.fullmatch(r"bytes=(\d*)-(\d*)", wanted)):
                start = int(m.group(1)) if m.group(1) else len(data) - int(m.group(2))
                end = int(m.group(2)) if m.group(1) and m.group(2) else len(data) - 1
                part = data[start : end + 1]
                headers["Content-Range"] = f"bytes {start}-{start + len(part) - 1}/{len(data)}"
                return self._send(206, part, headers, head=head)
            return self._send(200, data, headers, head=head)

    return Handler


@pytest.fixture(scope="session")
def hub_server():
    server = ThreadingHTTPServer(("127.0.0.1", HUB_PORT), None)
    hub = LoopbackHub(endpoint=HUB_ENDPOINT)
    server.RequestHandlerClass = _handler(hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield hub
    server.shutdown()


@pytest.fixture
def hub(hub_server) -> LoopbackHub:
    """The loopback hub, with no repositories and an empty request log."""
    hub_server.repos.clear()
    hub_server.requests.clear()
    return hub_server
