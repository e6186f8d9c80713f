"""The pure HTTP guard: which hosts, origins and paths the node answers."""

from __future__ import annotations

import pytest

from mesh_llm.api.guard import Origin, RequestRefused, api_path, cors_headers, host_allowed, judge_origin, local_caller, loopback_origins, parse_origin, tunnelled_request

OWN = loopback_origins([9337, 3131])


@pytest.mark.parametrize(("path", "relayed"), [
    ("/v1/chat/completions", "/v1/chat/completions"),
    ("/v1/completions", "/v1/completions"),
    ("/v1/embeddings", "/v1/embeddings"),
    ("/v1/messages", "/v1/messages"),
    ("/v1/messages/count_tokens", "/v1/messages/count_tokens"),
    ("/v1//chat/./completions/", "/v1/chat/completions"),
    ("//v1/messages", "/v1/messages"),
    ("/v1/../slots/0", None),  # llama-server's slot API
    ("/v1/../v1/chat/completions", "/v1/chat/completions"),
    ("/v1/chat/../../props", None),
    ("/v1/slots", None),
    ("/v1/models", None),  # answered by the proxy itself, never relayed
    ("/slots", None),
    ("/metrics", None),
    ("v1/chat/completions", None),
    ("/v1/chat/completions/../../../../etc/passwd", None),
])
def test_only_the_product_api_is_relayed(path: str, relayed: str | None) -> None:
    assert api_path(path) == relayed


@pytest.mark.parametrize(("host", "listen_all", "ok"), [
    ("127.0.0.1:9337", False, True), ("localhost:9337", False, True), ("LOCALHOST", False, True), ("[::1]:9337", False, True),
    ("evil.example:9337", False, False), ("127.0.0.1.evil.example:9337", False, False), ("", False, False),
    ("evil.example:9337", True, True),
])
def test_hosts(host: str, listen_all: bool, ok: bool) -> None:
    assert host_allowed(host, listen_all) is ok


def test_origins_of_our_own_pages_and_allowed_apps() -> None:
    allowed = frozenset({"https://app.example"})
    assert judge_origin(None, OWN, allowed) is Origin.ABSENT
    for own in ("http://localhost:3131", "http://127.0.0.1:9337", "http://[::1]:3131", "HTTP://LOCALHOST:3131"):
        assert judge_origin(own, OWN, allowed) is Origin.OWN, own
    assert judge_origin("https://app.example", OWN, allowed) is Origin.ALLOWED
    for foreign in ("https://evil.example", "null", "http://localhost:8080", "https://localhost:3131", "http://app.example", "https://app.example.evil"):
        assert judge_origin(foreign, OWN, allowed) is Origin.REFUSED, foreign


def test_with_listen_all_the_page_served_under_the_requested_name_is_ours() -> None:
    assert judge_origin("http://192.0.2.7:3131", OWN, frozenset(), "192.0.2.7:3131", listen_all=True) is Origin.OWN
    assert judge_origin("http://192.0.2.7:3131", OWN, frozenset(), "192.0.2.7:3131", listen_all=False) is Origin.REFUSED
    assert judge_origin("http://evil.example", OWN, frozenset(), "192.0.2.7:3131", listen_all=True) is Origin.REFUSED
    assert judge_origin("http://[2001:db8::7]:3131", OWN, frozenset(), "[2001:db8::7]:3131", listen_all=True) is Origin.OWN
    names = frozenset({"box", "box.lan"})
    for host in ("box:3131", "BOX.lan:3131", "box.lan.:3131"):
        assert judge_origin(f"http://{host.lower()}", OWN, frozenset(), host, listen_all=True, own_names=names) is Origin.OWN, host


def test_with_listen_all_a_rebinding_page_under_a_foreign_name_is_refused() -> None:
    # evil.example re-pointed at this machine: its page is served under that name and sends it as Host and Origin alike
    names = frozenset({"box", "box.lan"})
    for host in ("evil.example:9337", "evil.example", "box.evil.example:3131", "localhost.evil:3131"):
        assert judge_origin(f"http://{host}", OWN, frozenset(), host, listen_all=True, own_names=names) is Origin.REFUSED, host


@pytest.mark.parametrize(("text", "origin"), [
    ("https://App.Example", "https://app.example"), ("https://app.example/", "https://app.example"),
    ("http://localhost:5173", "http://localhost:5173"), ("https://app.example:443", "https://app.example"),
    ("http://app.example:80", "http://app.example"), ("http://[::1]:8080", "http://[::1]:8080"),
])
def test_origins_are_normalised_as_browsers_send_them(text: str, origin: str) -> None:
    assert parse_origin(text) == origin


@pytest.mark.parametrize("text", ["evil", "app.example", "ftp://app.example", "https://app.example/path", "https://app.example?x=1",
                                  "https://", "https://u:p@app.example", "https://app.example:99999", "*"])
def test_what_is_not_an_origin(text: str) -> None:
    with pytest.raises(ValueError, match="not an origin"):
        parse_origin(text)


def test_local_callers_of_the_console() -> None:
    assert local_caller("127.0.0.1", "localhost:3131", Origin.OWN)
    assert local_caller("::1", "[::1]:3131", Origin.ABSENT)
    assert not local_caller("192.0.2.7", "localhost:3131", Origin.ABSENT)  # another machine
    assert not local_caller("127.0.0.1", "rebound.example:3131", Origin.OWN)  # DNS rebinding
    assert not local_caller("127.0.0.1", "localhost:3131", Origin.ALLOWED)  # someone else's web app
    assert not local_caller(None, "localhost:3131", Origin.ABSENT)


def test_cors_headers_echo_the_origin_and_list_what_a_preflight_may_send() -> None:
    simple = cors_headers("https://app.example", preflight=False)
    assert simple == {"Access-Control-Allow-Origin": "https://app.example", "Vary": "Origin", "Access-Control-Expose-Headers": "Retry-After"}
    preflight = cors_headers("https://app.example", preflight=True)
    for header in ("Authorization", "Content-Type", "x-api-key", "anthropic-version", "anthropic-beta"):
        assert header in preflight["Access-Control-Allow-Headers"]
    assert "POST" in preflight["Access-Control-Allow-Methods"]


def test_a_preflight_gets_the_headers_it_asks_for_when_they_are_a_list_of_names() -> None:
    sdk = "x-stainless-os, X-Stainless-Lang,authorization ,anthropic-dangerous-direct-browser-access,content-type"
    allow = cors_headers("https://app.example", preflight=True, requested=sdk)["Access-Control-Allow-Headers"]
    names = [n.strip() for n in allow.split(",")]
    for header in ("Authorization", "Content-Type", "x-api-key", "x-stainless-os", "X-Stainless-Lang", "anthropic-dangerous-direct-browser-access"):
        assert header in names, header
    assert len(names) == len({n.lower() for n in names})  # authorization once
    fixed = cors_headers("https://app.example", preflight=True)["Access-Control-Allow-Headers"]
    for bad in ("x-a\r\nSet-Cookie: a=b", "x-a, , x-b", "x a", "x-a;b", "(x)", "x-é", "x" * 2049, ",".join(["x"] * 65), ""):
        assert cors_headers("https://app.example", preflight=True, requested=bad)["Access-Control-Allow-Headers"] == fixed, bad
    assert cors_headers("https://app.example", preflight=True, requested=",".join(["x-a"] * 64))["Access-Control-Allow-Headers"] == fixed + ", x-a"


def _head(line: str, *headers: str) -> bytes:
    return ("\r\n".join([line, *headers]) + "\r\n\r\n").encode()


def test_a_tunnelled_request_is_one_api_call_with_a_counted_body() -> None:
    head, length = tunnelled_request(_head("POST /v1//messages?beta=true HTTP/1.1", "Host: x", "Connection: keep-alive", "Content-Length: 12"), 100)
    assert length == 12
    assert head == b"POST /v1/messages?beta=true HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\nConnection: close\r\n\r\n"
    head, _ = tunnelled_request(_head("POST /v1/messages HTTP/1.1", "Host: x", "Authorization: Bearer sk-real", "X-Api-Key: sk-real",
                                      "Cookie: a=b", "Proxy-Authorization: Basic eDp5", "Content-Length: 0"), 100)
    assert head == b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"  # no credentials reach llama-server


@pytest.mark.parametrize(("head", "status"), [
    (_head("POST /slots/0?action=erase HTTP/1.1", "Content-Length: 0"), 404),
    (_head("POST /v1/../slots/0 HTTP/1.1", "Content-Length: 0"), 404),
    (_head("GET /v1/chat/completions HTTP/1.1"), 404),
    (_head("POST /v1/completions HTTP/1.1", "Transfer-Encoding: chunked"), 400),
    (_head("POST /v1/completions HTTP/1.1"), 400),  # no length
    (_head("POST /v1/completions HTTP/1.1", "Content-Length: 1", "Content-Length: 2"), 400),
    (_head("POST /v1/completions HTTP/1.1", "Content-Length: -1"), 400),
    (_head("POST /v1/completions HTTP/1.1", "Content-Length: 101"), 413),
    (_head("POST /v1/completions HTTP/1.1", " Content-Length: 1"), 400),  # folded line
    (_head("POST /v1/completions HTTP/2", "Content-Length: 1"), 400),
    ("POST /v1/completions HTTP/1.1\r\nContent-Length: 1\r\nX: \u00e9\r\n\r\n".encode(), 400),
])
def test_anything_else_through_the_tunnel_is_refused(head: bytes, status: int) -> None:
    with pytest.raises(RequestRefused) as refused:
        tunnelled_request(head, 100)
    assert refused.value.status == status
