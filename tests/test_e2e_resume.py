"""Streams that outlive their server: the node serving them is killed mid-answer and another
one continues it, so the caller reads one whole answer (real processes, tiny model)."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from mesh_llm.models.tiny import TinyModelSpec, write_tiny_model
from tests.conftest import LOCAL, wait_for
from tests.test_metrics import scrape

pytestmark = pytest.mark.engine

LONG = ("--ctx-size", "16384")  # 4096 tokens a slot: streams long enough to kill a node under them
TOKENS = 300
ASKS: dict[str, tuple[str, dict[str, Any]]] = {  # dialect -> (path, body); one conversation, so one server
    "completions": ("/v1/completions", {"prompt": "Once upon a time"}),
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me a story"}]}),
    "messages": ("/v1/messages", {"messages": [{"role": "user", "content": "Tell me a story"}]}),
}


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """It writes one printable byte per token (its one merge, of two control bytes, is never
    generated): the text streamed so far tokenizes back into exactly the tokens generated, so a
    continued answer can equal an uninterrupted one. (With merges of letters, "t" + "he"
    generated comes back as "the": another prompt, another greedy answer.) Wide enough to take
    a few seconds for an answer, so that the test can cut it on a loaded machine too."""
    return write_tiny_model(tmp_path_factory.mktemp("bytes") / "tiny-bytes.gguf", TinyModelSpec(name="tiny-bytes", merges=("Ā ā",), n_layers=8, n_embd=512, n_ff=1536))


class Stream:
    """One streamed request read on a thread: its events as they arrive."""

    def __init__(self, port: int, dialect: str) -> None:
        path, body = ASKS[dialect]
        self.dialect = dialect
        doc = {"model": "tiny-bytes", "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True, "stream": True, "user": "one-session", **body}
        self.req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(doc).encode(), {"Content-Type": "application/json"})
        self.events: list[dict[str, Any]] = []
        self.done = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with urllib.request.urlopen(self.req, timeout=180) as r:
            for line in r:
                text = line.decode().strip()
                if text == "data: [DONE]":
                    self.done = True
                elif text.startswith("data: "):
                    self.events.append(json.loads(text[6:]))
                    self.done = self.done or self.events[-1].get("type") == "message_stop"

    def finish(self) -> Stream:
        self.thread.join(180)
        return self

    @property
    def pieces(self) -> list[str]:
        out = []
        for e in self.events:
            if self.dialect == "messages":
                if e.get("type") == "content_block_delta":
                    out.append(e["delta"]["text"])
            elif self.dialect == "completions":
                out += [c["text"] for c in e.get("choices", []) if c.get("text")]
            else:
                out += [c["delta"]["content"] for c in e.get("choices", []) if c.get("delta", {}).get("content")]
        return out

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def ids(self) -> set[str]:
        if self.dialect == "messages":
            return {e["message"]["id"] for e in self.events if e.get("type") == "message_start"}
        return {e["id"] for e in self.events if "id" in e}


def test_streams_continue_on_another_node_when_theirs_is_killed(start_node, byte_model, engine) -> None:  # type: ignore[no-untyped-def]
    a = start_node("--model", str(byte_model), *LONG, *LOCAL)
    a.wait_ready()
    b = start_node("--model", str(byte_model), *LONG, "--join", a.token(), *LOCAL)
    b.wait_ready()
    client = start_node("--join", a.wait_output("Client token: ").split("Client token: ", 1)[1].split()[0], *LOCAL)
    client.wait_ready()
    wait_for(lambda: len(client.status()["api"]["servers"].get("tiny-bytes", [])) == 2, what="the client can reach both servers")

    whole = {d: Stream(client.port, d).finish() for d in ASKS}  # uninterrupted, one after the other
    for d, s in whole.items():
        assert s.done and len(s.pieces) > 100, (d, s.events[-3:])

    served = {n: _requests(n) for n in (a, b)}
    Stream(client.port, "completions").finish()  # the conversation's server, remembered by the client
    victim = next(n for n in (a, b) if _requests(n) > served[n])
    generator = victim.llama_server()
    # The three requests reach a stopped llama-server (its node's gate counts them in), so none
    # can run ahead while another is still on its way through the mesh on a loaded machine...
    generator.send_signal(signal.SIGSTOP)
    streams = {d: Stream(client.port, d) for d in ASKS}  # at once, all there
    wait_for(lambda: next(m["in_flight"] for m in victim.status()["serving"] if m["model"] == "tiny-bytes") == len(ASKS),
             timeout=60, what="all three requests at the victim's stopped server")
    # ... then it generates in short bursts until every stream has its first words, so that none
    # can finish before the cut; then the node is gone, like a pulled cable.
    deadline = time.monotonic() + 60
    while True:
        generator.send_signal(signal.SIGSTOP)
        if all(s.pieces for s in streams.values()):
            break
        assert time.monotonic() < deadline, "the streams did not start"
        generator.send_signal(signal.SIGCONT)
        time.sleep(0.003)
    victim.proc.send_signal(signal.SIGSTOP)
    time.sleep(0.5)
    cut_at = {d: len(s.pieces) for d, s in streams.items()}
    victim.proc.send_signal(signal.SIGKILL)
    generator.send_signal(signal.SIGKILL)

    for d, s in streams.items():
        s.finish()
        assert s.done, (d, s.events[-3:])
        assert not [e for e in s.events if "error" in e], (d, [e for e in s.events if "error" in e])
        assert cut_at[d] < len(whole[d].pieces)  # it really was cut before its end
        assert s.text == whole[d].text, (d, cut_at[d], _first_difference(s.text, whole[d].text))  # one answer, as uninterrupted
        assert len(s.ids()) == 1, (d, s.ids())  # one stream id from first to last chunk
    assert scrape(client.port)[("mesh_llm_resumes_total", (("model", "tiny-bytes"),))] >= 3  # each at least once (a loaded machine may need two)


def _requests(node) -> int:  # type: ignore[no-untyped-def]
    """Requests the node's own llama-server of the model took (from here and through the mesh)."""
    return next(m["requests"] for m in node.status()["serving"] if m["model"] == "tiny-bytes")


def _first_difference(a: str, b: str) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))
