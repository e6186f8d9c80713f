"""A small local stand-in for the Hugging Face hub, for tests (HF_ENDPOINT=its url).

It answers what `huggingface_hub` asks when mesh-llm downloads: HEAD/GET on
/ORG/REPO/resolve/REV/PATH (commit and ETag headers, HTTP Range), the repo tree
listing and model search. It counts the bytes it sends and logs every request,
and can send slowly so a test can kill a download halfway.

With `redirect=True` it behaves like the real hub for LFS/Xet files: resolve
answers 302 to a second server on another host (`localhost` vs the hub's
`127.0.0.1`), like cas-bridge.xethub.hf.co. The file's identity travels in
X-Linked-Etag / X-Linked-Size; the 302's own ETag and Content-Length describe
the redirect, so a client reading the wrong headers names or sizes the blob
wrongly. The CDN serves bytes by content hash from a signed URL and, like a
signed S3 link, refuses a request that also carries an Authorization header.
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
from urllib.parse import parse_qs, quote, unquote, urlsplit

COMMIT = "c0ffee" + "0" * 34
RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
TREE = re.compile(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)/?(.*)$")
BLOB = re.compile(r"^/blobs/([0-9a-f]{64})$")


@dataclass
class Served:
    method: str
    path: str  # the file's path in its repo
    start: int  # first byte asked for (Range), 0 without one
    sent: int = 0
    server: str = "hub"  # "hub" or "cdn": who sent the bytes


@dataclass
class Seen:
    """Any request either server got, with its Authorization header (None: none sent)."""

    server: str
    method: str
    path: str
    authorization: str | None


def _sig(digest: str) -> str:
    return hashlib.sha256(b"stand-in signing key" + digest.encode()).hexdigest()[:16]


@dataclass
class HubStandIn:
    files: dict[str, dict[str, Path]] = field(default_factory=dict)  # repo -> path in repo -> local file
    bytes_per_s: float | None = None  # None: as fast as possible
    redirect: bool = False  # True: resolve answers 302 to the CDN, as the real hub does for large files
    log: list[Served] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    commits: dict[str, str] = field(default_factory=dict)  # repo -> commit, COMMIT until replace()
    url: str = ""
    cdn_url: str = ""
    _blobs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content, every version ever resolved

    def add(self, repo: str, path: str, source: Path) -> None:
        self.files.setdefault(repo, {})[path] = source

    def replace(self, repo: str, path: str, source: Path) -> str:
        """Push a new version of a file: new content (so new ETag) and a new commit for the repo."""
        self.add(repo, path, source)
        commit = hashlib.sha1(f"{self.commit(repo)}{path}{source}".encode()).hexdigest()
        self.commits[repo] = commit
        return commit

    def commit(self, repo: str) -> str:
        return self.commits.get(repo, COMMIT)

    def sent(self, path_suffix: str) -> int:
        return sum(s.sent for s in self.gets(path_suffix))

    def gets(self, path_suffix: str, server: str | None = None) -> list[Served]:
        return [s for s in self.log if s.method == "GET" and s.path.endswith(path_suffix) and server in (None, s.server)]

    def authorizations(self, server: str) -> list[str | None]:
        return [s.authorization for s in self.seen if s.server == server]

    def start(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_name = "hub"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self._seen()
                self._resolve(body=False)

            def do_GET(self) -> None:
                self._seen()
                path = urlsplit(self.path).path
                if path.startswith("/api/"):
                    self._api(path)
                else:
                    self._resolve(body=True)

            def _seen(self) -> None:
                hub.seen.append(Seen(self.server_name, self.command, self.path, self.headers.get("Authorization")))

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
                repo, path = m.group(1), m.group(3)
                source = hub.files[repo].get(path)
                if source is None:
                    return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                data = source.read_bytes()
                digest = hashlib.sha256(data).hexdigest()
                if hub.redirect:
                    return self._redirect(repo, path, data, digest, body)
                self._bytes(path, data, {"X-Repo-Commit": hub.commit(repo), "ETag": f'"{digest}"'}, body)

            def _redirect(self, repo: str, path: str, data: bytes, digest: str, body: bool) -> None:
                hub._blobs[digest] = data
                location = f"{hub.cdn_url}/blobs/{digest}?name={quote(path)}&sig={_sig(digest)}"
                # what the hub sends for an LFS file: a tiny body whose own ETag (the git oid of the LFS
                # pointer) and length are not the file's; the file's are in the X-Linked-* headers
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{digest}\nsize {len(data)}\n"
                redirect_body = f"Found. Redirecting to {location}".encode()
                hub.log.append(Served("GET" if body else "HEAD", path, 0, server="hub"))
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("X-Repo-Commit", hub.commit(repo))
                self.send_header("X-Linked-Etag", f'"{digest}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("ETag", f'"{hashlib.sha1(pointer.encode()).hexdigest()}"')
                self.send_header("Content-Length", str(len(redirect_body)))
                self.end_headers()
                if body:
                    self.wfile.write(redirect_body)

            def _bytes(self, path: str, data: bytes, headers: dict[str, str], body: bool) -> None:
                """The file's bytes from the Range start, at `bytes_per_s`, counted in the log."""
                start = 0
                rng = re.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))
                if rng:
                    start = int(rng.group(1))
                if start > len(data):
                    return self._json(416, {"error": "range"})
                served = Served("GET" if body else "HEAD", path, start, server=self.server_name)
                hub.log.append(served)
                self.send_response(206 if rng else 200)
                for k, v in headers.items():
                    self.send_header(k, v)
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

        class CdnHandler(Handler):
            server_name = "cdn"

            def do_GET(self) -> None:
                self._seen()
                self._blob(body=True)

            def do_HEAD(self) -> None:
                self._seen()
                self._blob(body=False)

            def _blob(self, body: bool) -> None:
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                m = BLOB.match(url.path)
                if not m or m.group(1) not in hub._blobs:
                    return self._json(404, {"error": "NoSuchKey"})
                if query.get("sig") != [_sig(m.group(1))]:
                    return self._json(403, {"error": "SignatureDoesNotMatch"})
                if self.headers.get("Authorization"):  # a signed link plus a token: S3 refuses that
                    return self._json(400, {"error": "InvalidArgument: Only one auth mechanism allowed"})
                name = query.get("name", [""])[0]
                self._bytes(name, hub._blobs[m.group(1)], {"ETag": f'"{m.group(1)}"'}, body)

        self._servers = [ThreadingHTTPServer(("127.0.0.1", 0), Handler)]
        if self.redirect:
            self._servers.append(ThreadingHTTPServer(("127.0.0.1", 0), CdnHandler))
        for server in self._servers:
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        if self.redirect:  # same machine, but another host name: a client comparing hosts sees a CDN
            self.cdn_url = f"http://localhost:{self._servers[1].server_address[1]}"
        return self.url

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
