"""Real text from the real Gemma 3 270M (the packaged default model), through :9337."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from openai import OpenAI

pytestmark = [pytest.mark.engine, pytest.mark.gemma]
MODEL = "gemma-3-270m-q4_k_m"


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_default_model_by_name_serves_real_text(engine, start_node) -> None:
    node = start_node("--model", "gemma-3-270m")
    node.wait_ready(timeout=300)
    client = OpenAI(base_url=node.base_url + "/v1", api_key="mesh")
    assert [m.id for m in client.models.list().data] == [MODEL]

    # The packaged Gemma 3 270M is the base (pre-trained) model: it continues text, with facts
    # that are not in the prompt.
    out = client.completions.create(model=MODEL, prompt="The chemical symbol for gold is", max_tokens=8, temperature=0)
    assert "Au" in out.choices[0].text, out.choices[0].text

    stream = client.completions.create(model=MODEL, prompt="Water is made of hydrogen and", max_tokens=12, temperature=0, stream=True)
    pieces = [c.choices[0].text for c in stream if c.choices and c.choices[0].text]
    assert len(pieces) >= 3 and "oxygen" in "".join(pieces), pieces

    # Anthropic Messages format passes through to llama-server
    status, msg = post(node.base_url + "/v1/messages", {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Hello"}]})
    assert status == 200 and msg["type"] == "message" and msg["content"][0]["type"] == "text"

    # A generative model has no embeddings: llama-server's own error comes back as JSON
    status, err = post(node.base_url + "/v1/embeddings", {"model": MODEL, "input": "hi"})
    assert status == 501 and "embeddings" in err["error"]["message"]
    node.stop()
