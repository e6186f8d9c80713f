"""Continuing a streamed answer whose server died mid-stream (pure).

The proxy relays a streamed (SSE) answer event by event and keeps a transcript of the
text that reached the caller. When its server goes away, the same request is sent to
the next server with that text already in place (a completion's prompt gets it
appended; a chat or Anthropic conversation gets it as a partial assistant message,
which llama-server continues), and the new stream is spliced onto the old one: its
preamble (role chunk, message_start, the block already open) is dropped and its ids
are the first stream's, so the caller reads one answer.

What cannot be continued that way (tool calls under way, reasoning, several choices,
token-array prompts) is said in `Transcript.blocked`; the proxy then ends the stream
with an in-band error, as before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# The streamed routes, by how their events carry text.
DIALECTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/messages": "messages"}
MAX_TOKEN_KEYS = ("max_tokens", "max_completion_tokens", "n_predict")


@dataclass(frozen=True)
class SseEvent:
    raw: bytes  # the event as it arrived, blank line included
    name: str | None  # its `event:` field
    data: Any  # its `data:` as JSON; None when absent or not JSON (e.g. [DONE])
    done: bool = False  # `data: [DONE]`


class SseEvents:
    """Cuts a byte stream into whole SSE events (a partial one waits for the rest)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[SseEvent]:
        self._buffer += chunk.replace(b"\r\n", b"\n")
        events = []
        while (end := self._buffer.find(b"\n\n")) >= 0:
            raw, self._buffer = self._buffer[: end + 2], self._buffer[end + 2 :]
            events.append(parse_event(raw))
        return events


def parse_event(raw: bytes) -> SseEvent:
    name, data_lines = None, []
    for line in raw.decode("utf-8", "replace").split("\n"):
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data_lines.append(line[5:].lstrip())
    text = "\n".join(data_lines)
    if text.strip() == "[DONE]":
        return SseEvent(raw, name, None, done=True)
    try:
        data = json.loads(text) if text else None
    except ValueError:
        data = None
    return SseEvent(raw, name, data)


@dataclass
class Transcript:
    """What of a streamed answer reached the caller, and whether it could be continued."""

    dialect: str
    pieces: list[str] = field(default_factory=list)  # generated text, as streamed
    events: int = 0  # text-carrying events (about one per token)
    finished: bool = False  # the answer's own end arrived ([DONE], message_stop)
    blocked: str | None = None  # why it cannot be continued elsewhere
    stream_id: str | None = None  # the first stream's id (chatcmpl-…, msg_…): the caller's
    created: int | None = None
    open_blocks: set[int] = field(default_factory=set)  # Anthropic content blocks started

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def note(self, event: SseEvent) -> None:
        if event.done:
            self.finished = True
            return
        data = event.data
        if not isinstance(data, dict):
            return
        if self.dialect == "messages":
            self._note_anthropic(data)
            return
        if self.stream_id is None and isinstance(data.get("id"), str):
            self.stream_id = data["id"]
        if self.created is None and isinstance(data.get("created"), int):
            self.created = data["created"]
        choices = data.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            if choice.get("index", 0) != 0:
                self.blocked = "several choices were being streamed"
                continue
            if self.dialect == "completions":
                self._add(choice.get("text"))
                continue
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            if delta.get("tool_calls"):
                self.blocked = "a tool call was being streamed"
            if delta.get("reasoning_content"):
                self.blocked = "reasoning was being streamed"
            self._add(delta.get("content"))

    def _note_anthropic(self, data: dict[str, Any]) -> None:
        kind = data.get("type")
        if kind == "message_start" and isinstance(data.get("message"), dict):
            self.stream_id = self.stream_id or data["message"].get("id")
        elif kind == "content_block_start":
            block = _field(data, "content_block")
            if block.get("type") != "text" or data.get("index") != 0:
                self.blocked = f"a {block.get('type', 'non-text')} block was being streamed"
            if isinstance(data.get("index"), int):
                self.open_blocks.add(data["index"])
        elif kind == "content_block_delta":
            delta = _field(data, "delta")
            if delta.get("type") == "text_delta":
                self._add(delta.get("text"))
            else:
                self.blocked = f"a {delta.get('type', 'non-text')} was being streamed"
        elif kind == "message_stop":
            self.finished = True

    def _add(self, piece: object) -> None:
        if isinstance(piece, str) and piece:
            self.pieces.append(piece)
            self.events += 1


def _field(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


class NotResumable(Exception):
    """This request cannot be continued on another server; the message says why."""


def resumed_request(doc: dict[str, Any], transcript: Transcript) -> tuple[dict[str, Any], str | None]:
    """The request to send to the next server so that it continues the answer where it stopped,
    and the partial answer it holds (which a chat server may repeat before continuing)."""
    if transcript.blocked:
        raise NotResumable(transcript.blocked)
    if doc.get("n", 1) != 1:
        raise NotResumable("several choices were asked for")
    text, out, echo = transcript.text, dict(doc), None
    if text:
        if transcript.dialect == "completions":
            out["prompt"] = _extended_prompt(doc.get("prompt"), text)
        else:
            out["messages"], echo = _with_partial_answer(doc.get("messages"), text)
    for key in MAX_TOKEN_KEYS:  # what is left of the caller's budget (about one token per event)
        if isinstance(doc.get(key), int) and doc[key] > 0:
            out[key] = max(1, doc[key] - transcript.events)
    return out, echo


def _extended_prompt(prompt: object, text: str) -> str:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise NotResumable("its prompt is not one string")
    return prompt + text


def _with_partial_answer(messages: object, text: str) -> tuple[list[Any], str]:
    """The conversation with `text` as the assistant's answer so far, and that answer in full.
    A caller's own prefill was echoed at the start of `text`, so it is replaced, not extended."""
    if not isinstance(messages, list):
        raise NotResumable("it has no messages")
    out = list(messages)
    last = out[-1] if out else None
    if isinstance(last, dict) and last.get("role") == "assistant":  # the caller prefilled the answer itself
        content = last.get("content")
        if isinstance(content, list) and len(content) == 1 and isinstance(content[0], dict) and content[0].get("type") == "text":
            content = content[0].get("text")
        if not isinstance(content, str):
            raise NotResumable("its last assistant message is not text")
        answer = text if text.startswith(content) else content + text
        out[-1] = {**last, "content": answer}
        return out, answer
    out.append({"role": "assistant", "content": text})
    return out, text


class Splice:
    """The next server's stream, made a continuation of the first: its preamble dropped, the
    partial answer it repeats first (llama-server echoes a prefilled assistant message) cut,
    its ids the first stream's, its token counts the whole answer's. It also notes its text in
    the transcript (for a second resume)."""

    def __init__(self, transcript: Transcript, echo: str | None) -> None:
        self.transcript = transcript
        self.echo = echo or None  # the partial answer we sent, which may come back first
        self.held = ""  # text received while it may still be that echo
        self.earlier = transcript.events  # tokens streamed before this continuation
        self._started = False  # a text-carrying event of this stream went out

    def accept(self, event: SseEvent) -> bytes | None:
        """The bytes to relay for `event`, or None to drop it."""
        if event.done or not isinstance(event.data, dict):
            self.transcript.note(event)
            return event.raw
        data = dict(event.data)
        if self.transcript.dialect == "messages":
            kind = data.get("type")
            if kind in ("message_start", "ping") or (kind == "content_block_start" and data.get("index") in self.transcript.open_blocks):
                return None
            if kind == "content_block_delta" and _field(data, "delta").get("type") == "text_delta":
                piece = self._unechoed(str(_field(data, "delta").get("text", "")))
                if piece is None:
                    return None
                data["delta"] = {**_field(data, "delta"), "text": piece}
            if kind == "message_delta" and isinstance(_field(data, "usage").get("output_tokens"), int):
                data["usage"] = {**_field(data, "usage"), "output_tokens": _field(data, "usage")["output_tokens"] + self.earlier}
            return self._out(event.name, data)
        if not self._started and not _carries_anything(data):
            return None  # the role chunk that opens every chat stream
        choices = data.get("choices")
        if self.transcript.dialect == "chat" and isinstance(choices, list) and choices and isinstance(choices[0], dict):
            delta = _field(choices[0], "delta")
            if isinstance(delta.get("content"), str) and delta["content"]:
                piece = self._unechoed(delta["content"])
                if piece is None:
                    return None
                data["choices"] = [{**choices[0], "delta": {**delta, "content": piece}}, *choices[1:]]
        usage = _field(data, "usage")
        if isinstance(usage.get("completion_tokens"), int):
            data["usage"] = {**usage, "completion_tokens": usage["completion_tokens"] + self.earlier}
        if self.transcript.stream_id is not None:
            data["id"] = self.transcript.stream_id
        if self.transcript.created is not None and "created" in data:
            data["created"] = self.transcript.created
        self._started = True
        return self._out(None, data)

    def _unechoed(self, piece: str) -> str | None:
        """`piece` without what repeats the partial answer; None while it may still be the echo."""
        if self.echo is None:
            return piece
        self.held += piece
        if self.echo.startswith(self.held):
            return None
        piece = self.held[len(self.echo):] if self.held.startswith(self.echo) else self.held  # no echo after all
        self.echo = None
        return piece or None

    def _out(self, name: str | None, data: dict[str, Any]) -> bytes:
        raw = (f"event: {name}\n" if name else "") + "data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n\n"
        event = SseEvent(raw.encode(), name, data)
        self.transcript.note(event)
        return event.raw


def _carries_anything(data: dict[str, Any]) -> bool:
    """An OpenAI chunk with text, a tool call, a finish reason or usage (not just a role)."""
    if data.get("usage"):
        return True
    for choice in data.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason") or choice.get("text"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and any(delta.get(k) for k in ("content", "tool_calls", "reasoning_content")):
            return True
    return False
