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
MAX_EVENT = 1024 * 1024  # one SSE event held whole at most this big; a longer one is relayed as it comes
MAX_TRANSCRIPT = 4 * 1024 * 1024  # text kept for a continuation; a longer answer is not continued
# Constraints the sampler applies from the start of the answer: a continuation would restart them
# after the partial text (llama.cpp does not advance a grammar past a prefill), corrupting it.
CONSTRAINED = ("grammar", "json_schema", "response_format", "tool_choice")


@dataclass(frozen=True)
class SseEvent:
    raw: bytes  # the event as it arrived, blank line included
    name: str | None  # its `event:` field
    data: Any  # its `data:` as JSON; None when absent or not JSON (e.g. [DONE])
    done: bool = False  # `data: [DONE]`


class SseEvents:
    """Cuts a byte stream into whole SSE events (a partial one waits for the rest, up to
    MAX_EVENT: past that, `oversized` is set and the bytes come back as they are)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._scanned = 0  # the buffer before this holds no event end
        self.oversized = False

    def feed(self, chunk: bytes) -> list[SseEvent]:
        if self.oversized:
            return [SseEvent(bytes(chunk), None, None)]
        self._buffer += chunk
        events, start = [], 0
        while True:
            end, width = self._event_end(max(start, self._scanned))
            if end < 0:
                break
            events.append(parse_event(bytes(self._buffer[start:end + width])))
            start = end + width
        del self._buffer[:start]
        self._scanned = max(0, len(self._buffer) - 3)  # an end may straddle the next chunk
        if len(self._buffer) > MAX_EVENT:
            self.oversized = True
            events.append(SseEvent(bytes(self._buffer), None, None))
            self._buffer.clear()
        return events

    def _event_end(self, start: int) -> tuple[int, int]:
        """Where the next blank line (LF LF or CRLF CRLF) starts, and its width; -1 if none."""
        lf, crlf = self._buffer.find(b"\n\n", start), self._buffer.find(b"\r\n\r\n", start)
        if crlf >= 0 and (lf < 0 or crlf < lf):
            return crlf, 4
        return lf, 2

    def rest(self) -> SseEvent | None:
        """What is left when the stream ends: a last event without its blank line."""
        if not self._buffer:
            return None
        event = parse_event(bytes(self._buffer))
        self._buffer.clear()
        return event


def parse_event(raw: bytes) -> SseEvent:
    name, data_lines = None, []
    for line in raw.decode("utf-8", "replace").replace("\r\n", "\n").split("\n"):
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
    finished: bool = False  # the answer's own end arrived ([DONE], message_stop, or an error event)
    stopped: bool = False  # its last words arrived (a finish_reason, a stop_reason): only the end marker is missing
    preamble: bool = False  # the caller saw the stream's opening (the role chunk, message_start)
    blocked: str | None = None  # why it cannot be continued elsewhere
    stream_id: str | None = None  # the first stream's id (chatcmpl-…, msg_…): the caller's
    created: int | None = None
    open_blocks: set[int] = field(default_factory=set)  # Anthropic content blocks started
    _size: int = 0  # characters in `pieces`

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
        if "error" in data or event.name == "error":  # the server ended the answer itself, with a reason
            self.finished, self.blocked = True, "the server reported an error"
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
            if choice.get("finish_reason"):
                self.stopped = True
            if choice.get("index", 0) != 0:
                self.blocked = "several choices were being streamed"
                continue
            if self.dialect == "completions":
                self._add(choice.get("text"))
                continue
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            if delta.get("role"):
                self.preamble = True
            if delta.get("tool_calls"):
                self.blocked = "a tool call was being streamed"
            if delta.get("reasoning_content"):
                self.blocked = "reasoning was being streamed"
            self._add(delta.get("content"))

    def _note_anthropic(self, data: dict[str, Any]) -> None:
        kind = data.get("type")
        if kind == "message_start" and isinstance(data.get("message"), dict):
            self.preamble = True
            message_id = data["message"].get("id")
            self.stream_id = self.stream_id or (message_id if isinstance(message_id, str) else None)
        elif kind == "content_block_start":
            block = _field(data, "content_block")
            if block.get("type") != "text" or data.get("index") != 0:
                self.blocked = f"a {block.get('type', 'non-text')} block was being streamed"
            if isinstance(data.get("index"), int):
                self.open_blocks.add(data["index"])
        elif kind == "content_block_stop":
            self.blocked = "its text block was already closed"
        elif kind == "message_delta" and _field(data, "delta").get("stop_reason"):
            self.stopped = True
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
            self._size += len(piece)
            if self._size > MAX_TRANSCRIPT:
                self.blocked = "the answer so far is too long to send again"


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
    if doc.get("n", 1) not in (1, None):
        raise NotResumable("several choices were asked for")
    if constrained := [key for key in CONSTRAINED if _constrains(key, doc.get(key))]:
        raise NotResumable(f"its output is constrained ({constrained[0]})")
    text, out, echo = transcript.text, dict(doc), None
    if text:
        if transcript.dialect == "completions":
            out["prompt"] = _extended_prompt(doc.get("prompt"), text)
        else:
            out["messages"], echo = _with_partial_answer(doc.get("messages"), text)
    for key in MAX_TOKEN_KEYS:  # what is left of the caller's budget (about one token per event)
        if isinstance(doc.get(key), int) and not isinstance(doc[key], bool) and doc[key] > 0:
            out[key] = max(1, doc[key] - transcript.events)
    return out, echo


def _constrains(key: str, value: object) -> bool:
    if value in (None, "", {}, []):
        return False
    if key == "response_format":
        return not (isinstance(value, dict) and value.get("type") == "text")
    if key == "tool_choice":
        return value not in ("auto", "none") and not (isinstance(value, dict) and value.get("type") in ("auto", "none"))
    return True


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
            if kind == "ping" or (kind == "message_start" and self.transcript.preamble) or (
                    kind == "content_block_start" and isinstance(data.get("index"), int) and data["index"] in self.transcript.open_blocks):
                return None
            if kind == "content_block_delta" and _field(data, "delta").get("type") == "text_delta":
                piece = self._unechoed(str(_field(data, "delta").get("text", "")))
                if piece is None:
                    return None
                data["delta"] = {**_field(data, "delta"), "text": piece}
            if kind == "message_delta" and isinstance(_field(data, "usage").get("output_tokens"), int):
                data["usage"] = {**_field(data, "usage"), "output_tokens": _field(data, "usage")["output_tokens"] + self.earlier}
            return self._out(event.name, data)
        if not self._started and self.transcript.preamble and not _carries_anything(data):
            return None  # the role chunk that opens every chat stream (the caller has one)
        choices = data.get("choices")
        if self.transcript.dialect == "chat" and isinstance(choices, list) and choices and isinstance(choices[0], dict):
            delta = _field(choices[0], "delta")
            if isinstance(delta.get("content"), str) and delta["content"]:
                piece = self._unechoed(delta["content"])
                if piece is None:
                    return None
                data["choices"] = [{**choices[0], "delta": {**delta, "content": piece}}, *choices[1:]]
        usage = _field(data, "usage")
        if isinstance(usage.get("completion_tokens"), int) and isinstance(usage.get("prompt_tokens"), int):
            # the partial answer was part of this prompt: count it as generated, as the caller saw it
            prompt, completion = max(0, usage["prompt_tokens"] - self.earlier), usage["completion_tokens"] + self.earlier
            data["usage"] = {**usage, "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
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
    choices = data.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason") or choice.get("text"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and any(delta.get(k) for k in ("content", "tool_calls", "reasoning_content")):
            return True
    return False
