"""What one relayed answer was worth (pure): tokens generated, time to the first, tokens per second.

Fed the response bytes as they pass through the proxy. A streamed answer (SSE) is counted
event by event: each OpenAI chunk with text (chat `delta.content`, completions `text`) or
Anthropic `content_block_delta` is one token as llama-server sends them. A whole JSON answer
is read once at the end for its `usage`. The speed is llama-server's own `timings` when the
answer carries them, else the span over which the tokens arrived.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_WHOLE_BODY = 1 << 20  # a non-streamed answer past this is not parsed for its usage


@dataclass(frozen=True)
class Measured:
    tokens: int  # generated
    ttft_s: float | None  # request in → first token out (streamed answers only)
    tokens_per_s: float | None  # decode speed


def _is_token_event(doc: Any) -> bool:
    if not isinstance(doc, dict):
        return False
    if doc.get("type") == "content_block_delta":
        return True
    choices = doc.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        first = choices[0]
        delta = first.get("delta")
        if isinstance(delta, dict) and (delta.get("content") or delta.get("reasoning_content")):
            return True
        return bool(first.get("text"))
    return False


def _usage_tokens(doc: Any) -> int:
    usage = doc.get("usage") if isinstance(doc, dict) else None
    if not isinstance(usage, dict):
        return 0
    value = usage.get("completion_tokens", usage.get("output_tokens", 0))
    return value if isinstance(value, int) and value >= 0 else 0


def _timed_speed(doc: Any) -> float | None:
    timings = doc.get("timings") if isinstance(doc, dict) else None
    speed = timings.get("predicted_per_second") if isinstance(timings, dict) else None
    return float(speed) if isinstance(speed, (int, float)) and speed > 0 else None


class ResponseMeter:
    def __init__(self, started: float, streamed: bool) -> None:
        self.started, self.streamed = started, streamed
        self.tokens = 0
        self.first: float | None = None
        self.last: float | None = None
        self._pending = b""
        self._whole = bytearray()
        self._timed: float | None = None

    def feed(self, chunk: bytes, now: float) -> None:
        if not self.streamed:
            if len(self._whole) + len(chunk) <= MAX_WHOLE_BODY:
                self._whole += chunk
            return
        lines = (self._pending + chunk).split(b"\n")
        self._pending = lines.pop()[-MAX_WHOLE_BODY:]  # an unfinished line waits for the next chunk
        for line in lines:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            try:
                doc = json.loads(line[6:])
            except ValueError:
                continue
            if _is_token_event(doc):
                self.tokens += 1
                self.first = now if self.first is None else self.first
                self.last = now
            self._timed = _timed_speed(doc) or self._timed  # llama-server times the decode in its last event

    def finish(self) -> Measured:
        if not self.streamed:
            try:
                doc = json.loads(bytes(self._whole)) if self._whole else None
            except ValueError:
                doc = None
            return Measured(_usage_tokens(doc), None, _timed_speed(doc))
        ttft = self.first - self.started if self.first is not None else None
        speed = self._timed  # the engine's own figure when it gave one; else the span the tokens arrived over
        if speed is None and self.first is not None and self.last is not None and self.tokens > 1 and self.last > self.first:
            speed = (self.tokens - 1) / (self.last - self.first)
        return Measured(self.tokens, ttft, speed)
