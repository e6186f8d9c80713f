"""Who may talk to the node's HTTP ports, and which paths reach llama-server (pure).

Browsers are the danger on loopback: any page the user opens can send requests to
127.0.0.1, and a page whose own name was re-pointed at 127.0.0.1 (DNS rebinding)
can even read the answers. So a request must name a loopback host, a browser request
(it carries `Origin`) must come from one of this node's own pages or from an origin
the user allowed with --cors-origin, and only the API routes the product serves are
relayed: llama-server's other endpoints (slots, props, metrics) stay out of reach.
"""

from __future__ import annotations

import enum
import ipaddress
import posixpath
from collections.abc import Iterable
from urllib.parse import urlsplit

LOOPBACK_ADDRS = frozenset({"127.0.0.1", "::1"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})

# What the proxy relays to a model's server (POST); everything else under /v1 is ours or a 404.
API_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages", "/v1/messages/count_tokens"})
CORS_HEADERS = "Authorization, Content-Type, x-api-key, anthropic-version, anthropic-beta"
CORS_METHODS = "GET, POST, OPTIONS"
CORS_MAX_AGE = "600"


def host_allowed(host_header: str, listen_all: bool) -> bool:
    """On loopback, only requests addressed to a loopback name: a page whose own name was
    re-pointed at 127.0.0.1 (DNS rebinding) gets no answers from us."""
    if listen_all:
        return True
    name = host_header if host_header.endswith("]") else host_header.rsplit(":", 1)[0]
    return name.lower() in LOOPBACK_NAMES


def api_path(path: str) -> str | None:
    """The relayed route a request path names once normalised (`/v1/../slots` is not one), else None."""
    if not path.startswith("/"):
        return None
    normal = posixpath.normpath(path)
    if normal.startswith("//"):  # POSIX keeps a leading double slash; no route has one
        normal = "/" + normal.lstrip("/")
    return normal if normal in API_PATHS else None


def parse_origin(text: str) -> str:
    """A web origin as browsers send it (scheme://host[:port], lower case, no path);
    ValueError names what is wrong."""
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{text!r} is not an origin: give scheme and host, e.g. https://app.example or http://localhost:5173")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{text!r} is not an origin: drop the path, e.g. {parts.scheme}://{parts.netloc}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{text!r} is not an origin: its port is not a number from 1 to 65535") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = 80 if parts.scheme == "http" else 443
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


def loopback_origins(ports: Iterable[int]) -> frozenset[str]:
    """The origins of pages this node itself serves on loopback (the console, and the API port)."""
    return frozenset(f"http://{name}:{port}" for port in ports for name in ("localhost", "127.0.0.1", "[::1]"))


class Origin(enum.Enum):
    ABSENT = "absent"  # not a browser (curl, SDKs, agents): nothing to decide here
    OWN = "own"  # one of this node's own pages
    ALLOWED = "allowed"  # a web app the user allowed with --cors-origin: gets CORS headers
    REFUSED = "refused"


def host_name(host_header: str) -> str:
    """The name in a Host header, without its port (an IPv6 literal keeps its brackets)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.rsplit(":", 1)[0]


def names_this_machine(name: str, own_names: frozenset[str]) -> bool:
    """An IP literal, or one of this machine's own names: no page elsewhere can be served under
    it. Any other DNS name may be an attacker's, re-pointed at us (DNS rebinding)."""
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return bool(name) and name.rstrip(".") in own_names
    return True


def judge_origin(origin: str | None, own: frozenset[str], allowed: frozenset[str], host_header: str = "", listen_all: bool = False,
                 own_names: frozenset[str] = frozenset()) -> Origin:
    """Where a browser request comes from. With --listen-all a page served under the name the
    request is addressed to (the console opened by the machine's LAN address or its own host
    name, `own_names`: lower case) is our own too; under another DNS name it is not, since a
    rebinding page is served under its own name and sends that as Host and Origin alike."""
    if origin is None:
        return Origin.ABSENT
    normal = origin.strip().lower()
    if normal in own:
        return Origin.OWN
    if listen_all and host_header and normal == f"http://{host_header.strip().lower()}" and names_this_machine(host_name(host_header), own_names):
        return Origin.OWN
    if normal in allowed:
        return Origin.ALLOWED
    return Origin.REFUSED


def local_caller(remote: str | None, host_header: str, origin: Origin) -> bool:
    """A caller on this machine addressing it by a loopback name, not a foreign page: one the
    console's page is served to anyway, so its chat needs no key."""
    return remote in LOOPBACK_ADDRS and host_allowed(host_header, False) and origin in (Origin.ABSENT, Origin.OWN)


MAX_REQUESTED_HEADERS = 2048  # characters of Access-Control-Request-Headers we echo
MAX_REQUESTED_NAMES = 64
_TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~")
EXPOSED_HEADERS = "Retry-After"  # a 429/503 says when to come back


def requested_headers(text: str | None) -> list[str] | None:
    """The header names of an Access-Control-Request-Headers value (a comma-separated list of
    HTTP tokens, bounded), or None when it is anything else."""
    if text is None or len(text) > MAX_REQUESTED_HEADERS:
        return None
    names = [n.strip(" \t") for n in text.split(",")]
    if len(names) > MAX_REQUESTED_NAMES or not all(names) or not all(set(n) <= _TOKEN_CHARS for n in names):
        return None
    return names


def cors_headers(origin: str, preflight: bool, requested: str | None = None) -> dict[str, str]:
    """What an allowed cross-origin caller gets: its origin echoed, and for a preflight
    the methods and headers the API takes (auth included: a user-approved app may send a key),
    plus the ones its preflight asks for when they are a well-formed list: the official SDKs
    send their own (X-Stainless-*, anthropic-dangerous-direct-browser-access)."""
    headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    if preflight:
        allow = CORS_HEADERS
        known = {n.strip().lower() for n in CORS_HEADERS.split(",")}
        extra = [n for n in requested_headers(requested) or [] if n.lower() not in known]
        if extra:
            allow += ", " + ", ".join(dict.fromkeys(extra))
        headers |= {"Access-Control-Allow-Methods": CORS_METHODS, "Access-Control-Allow-Headers": allow,
                    "Access-Control-Max-Age": CORS_MAX_AGE}
    else:
        headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
    return headers


def is_cors_header(name: str) -> bool:
    """Headers the upstream (llama-server reflects any Origin) must not decide for us."""
    return name.lower().startswith("access-control-")


# -- requests that arrive through the mesh's HTTP tunnel (from a peer's proxy) --------------

MAX_TUNNEL_HEAD = 64 * 1024  # request line and headers of one tunnelled request
_DROPPED_UPSTREAM = frozenset({"connection", "keep-alive", "proxy-connection", "te", "upgrade", "expect",
                               # credentials: the sending proxy drops them already; a peer's own code may not
                               "authorization", "x-api-key", "cookie", "proxy-authorization"})


class RequestRefused(Exception):
    """A tunnelled request llama-server must not see; `status` and the message go back to the peer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def tunnelled_request(head: bytes, max_body: int) -> tuple[bytes, int]:
    """Check the head of a request a peer sends through the tunnel (up to and including the
    blank line) and rewrite it for llama-server: one of the API routes (as the proxy relays
    them), a Content-Length body, and `Connection: close` so the stream carries exactly one
    request. Returns (head to send, body length); RequestRefused otherwise. A peer's proxy
    only ever sends such requests; anything else is someone reaching for llama-server's
    other endpoints (slots, props) or queueing more than it is counted for."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise RequestRefused(400, "request head is not ASCII") from None
    if not text.endswith("\r\n\r\n"):
        raise RequestRefused(400, "request head does not end with a blank line")
    request_line, *header_lines = text[:-4].split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise RequestRefused(400, "malformed request line")
    method, target, version = parts
    path, _, query = target.partition("?")
    route = api_path(path)
    if method != "POST" or route is None:
        raise RequestRefused(404, f"no route for {method[:16]} {path[:100]} through the mesh")
    kept, lengths = [], []
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or line[:1] in (" ", "\t"):
            raise RequestRefused(400, "malformed header line")
        lower = name.lower()
        if lower == "transfer-encoding":
            raise RequestRefused(400, "only Content-Length bodies are relayed")
        if lower == "content-length":
            lengths.append(value.strip())
        if lower not in _DROPPED_UPSTREAM:
            kept.append(line)
    if len(lengths) != 1 or not lengths[0].isdigit():
        raise RequestRefused(400, "one Content-Length is needed")
    body_length = int(lengths[0])
    if body_length > max_body:
        raise RequestRefused(413, f"request body exceeds {max_body} bytes")
    target = route + (f"?{query}" if query else "")
    rebuilt = "\r\n".join([f"POST {target} {version}", *kept, "Connection: close"]) + "\r\n\r\n"
    return rebuilt.encode("ascii"), body_length
