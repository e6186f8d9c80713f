"""/metrics: the meter over relayed answers (pure) and a real node scraped with Prometheus' own parser."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh_llm.api.meter import ResponseMeter
from tests.conftest import LOCAL, open_stream


def _sse(*docs: object) -> bytes:
    return b"".join(b"data: " + json.dumps(d).encode() + b"\n\n" for d in docs) + b"data: [DONE]\n\n"


def test_a_streamed_answer_is_counted_token_by_token_across_any_chunking() -> None:
    chat = _sse({"choices": [{"delta": {"role": "assistant"}}]}, *({"choices": [{"delta": {"content": c}}]} for c in "abcd"),
                {"choices": [{"delta": {}, "finish_reason": "stop"}], "usage": {"completion_tokens": 4}})
    for size in (1, 7, len(chat)):
        meter = ResponseMeter(started=10.0, streamed=True)
        for i in range(0, len(chat), size):
            meter.feed(chat[i : i + size], 10.5 + i / len(chat))
        m = meter.finish()
        assert m.tokens == 4 and m.ttft_s is not None and m.ttft_s >= 0.5
        assert (m.tokens_per_s is not None and m.tokens_per_s > 0) if size < len(chat) else m.tokens_per_s is None  # one chunk: no span to time
    anthropic = (b"event: message_start\ndata: {\"type\": \"message_start\"}\n\n"
                 + b"".join(b"event: content_block_delta\ndata: {\"type\": \"content_block_delta\", \"delta\": {\"text\": \"x\"}}\n\n" for _ in range(3)))
    meter = ResponseMeter(0.0, True)
    meter.feed(anthropic, 1.0)
    assert meter.finish().tokens == 3


def test_a_whole_answer_is_read_for_its_usage_and_speed() -> None:
    meter = ResponseMeter(0.0, streamed=False)
    meter.feed(json.dumps({"choices": [{"message": {"content": "hi"}}], "usage": {"completion_tokens": 7}, "timings": {"predicted_per_second": 42.5}}).encode(), 1.0)
    assert (meter.finish().tokens, meter.finish().tokens_per_s) == (7, 42.5)
    broken = ResponseMeter(0.0, streamed=False)
    broken.feed(b"{not json", 1.0)
    assert broken.finish().tokens == 0


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.mark.engine
def test_a_real_node_counts_its_requests_tokens_and_peers(start_node, tiny_model: Path, engine) -> None:  # type: ignore[no-untyped-def]
    a = start_node("--model", str(tiny_model), *LOCAL)
    a.wait_ready()
    b = start_node("--client", "--join", a.token(), *LOCAL)
    b.wait_ready()
    body = json.dumps({"model": "tiny-llama", "prompt": "hi", "max_tokens": 9, "ignore_eos": True, "stream": True}).encode()
    for _ in range(2):
        req = urllib.request.Request(f"{a.base_url}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
    whole = json.dumps({"model": "tiny-llama", "prompt": "hi", "max_tokens": 5, "ignore_eos": True}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{a.base_url}/v1/completions", whole, {"Content-Type": "application/json"}), timeout=60) as r:
        r.read()
    with pytest.raises(urllib.error.HTTPError):  # a model nobody serves: counted, but not by its name
        urllib.request.urlopen(urllib.request.Request(f"{a.base_url}/v1/completions", json.dumps({"model": "nope", "prompt": "x"}).encode(),
                                                      {"Content-Type": "application/json"}), timeout=10)
    held = open_stream(a.port, "tiny-llama")  # one under way while we scrape (the default context: it cannot end at once)
    m = scrape(a.port)
    held.close()
    assert m[("mesh_llm_requests_in_flight", (("model", "tiny-llama"),))] == 1
    assert m[("mesh_llm_requests_total", (("model", "tiny-llama"), ("status", "200")))] == 3
    assert m[("mesh_llm_requests_total", (("model", "(none)"), ("status", "404")))] == 1
    assert m[("mesh_llm_generated_tokens_total", (("model", "tiny-llama"),))] == 2 * 9 + 5
    assert m[("mesh_llm_time_to_first_token_seconds_count", (("model", "tiny-llama"),))] == 2
    assert m[("mesh_llm_tokens_per_second_count", (("model", "tiny-llama"),))] == 3
    assert m[("mesh_llm_peers", (("role", "client"),))] == 1
    # The client's own proxy counts what its callers asked, answered by a through the mesh.
    with urllib.request.urlopen(urllib.request.Request(f"{b.base_url}/v1/completions", body, {"Content-Type": "application/json"}), timeout=60) as r:
        r.read()
    mb = scrape(b.port)
    assert mb[("mesh_llm_requests_total", (("model", "tiny-llama"), ("status", "200")))] == 1
    assert mb[("mesh_llm_generated_tokens_total", (("model", "tiny-llama"),))] == 9
