"""A small local stand-in for the Hugging Face hub, for tests (HF_ENDPOINT=its url).

It answers what `huggingface_hub` asks when mesh-llm downloads: HEAD/GET on
/ORG/REPO/resolve/REV/PATH (commit and ETag headers, HTTP Range), the repo tree
listing and model search. It counts the bytes it sends and logs every request,
and can send slowly so a test can kill a download halfway.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT = "c0ffee" + "0" * 34
RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
TREE = re.compile(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)/?(.*)$")


@dataclass
class Served:
    method: str
    path: str
    start: int  # first byte asked for (Range), 0 without one
    sent: int = 0


@dataclass
class HubStandIn:
    files: dict[str, dict[str, Path]] = field(default_factory=dict)  # repo -> path in repo -> local file
    bytes_per_s: float | None = None  # None: as fast as possible
    log: list[Served] = field(default_factory=list)
    url: str = ""

    def add(self, repo: str, path: str, source: Path) -> None:
        self.files.setdefault(repo, {})[path] = source

    def sent(self, path_suffix: str) -> int:
        return sum(s.sent for s in self.log if s.method == "GET" and s.path.endswith(path_suffix))

    def gets(self, path_suffix: str) -> list[Served]:
        return [s for s in self.log if s.method == "GET" and s.path.endswith(path_suffix)]

    def start(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self._resolve(body=False)

            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                if path.startswith("/api/"):
                    self._api(path)
                else:
                    self._resolve(body=True)

            def _json(self, status: int, doc: object, headers: dict[str, str] | None = None) -> None:
                raw = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

            def _api(self, path: str) -> None:
                m = TREE.match(unquote(path))
                if m:
                    repo = hub.files.get(m.group(1))
                    if repo is None:
                        return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    listing = [{"type": "file", "path": p, "size": f.stat().st_size, "oid": "0" * 40} for p, f in sorted(repo.items())]
                    return self._json(200, listing)
                if path == "/api/models":
                    query = parse_qs(urlsplit(self.path).query).get("search", [""])[0].lower()
                    hits = [{"id": r, "modelId": r, "downloads": 10, "likes": 1} for r in sorted(hub.files) if query in r.lower()]
                    return self._json(200, hits)
                self._json(404, {"error": "not found"})

            def _resolve(self, body: bool) -> None:
                m = RESOLVE.match(unquote(urlsplit(self.path).path))
                if not m or m.group(1) not in hub.files:
                    return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                source = hub.files[m.group(1)].get(m.group(3))
                if source is None:
                    return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                data = source.read_bytes()
                start = 0
                rng = re.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))
                if rng:
                    start = int(rng.group(1))
                if start > len(data):
                    return self._json(416, {"error": "range"})
                served = Served("GET" if body else "HEAD", m.group(3), start)
                hub.log.append(served)
                self.send_response(206 if rng else 200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                chunk = 64 * 1024
                try:
                    for pos in range(start, len(data), chunk):
                        piece = data[pos : pos + chunk]
                        self.wfile.write(piece)
                        served.sent += len(piece)
                        if hub.bytes_per_s:
                            time.sleep(len(piece) / hub.bytes_per_s)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away: what it got is counted

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self.url

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
