"""Continuing a cut stream (pure): transcripts, the continued request, the splice."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mesh_llm.api.resume import NotResumable, Splice, SseEvents, Transcript, resumed_request


def sse(data: Any, name: str | None = None) -> bytes:
    return ((f"event: {name}\n" if name else "") + "data: " + (data if isinstance(data, str) else json.dumps(data)) + "\n\n").encode()


def chat_chunk(content: str | None = None, role: str | None = None, finish: str | None = None, cid: str = "chatcmpl-A", **extra: Any) -> bytes:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return sse({"id": cid, "created": 100 if cid == "chatcmpl-A" else 200, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})


def transcript_of(dialect: str, *chunks: bytes) -> Transcript:
    t, events = Transcript(dialect), SseEvents()
    for chunk in chunks:
        for e in events.feed(chunk):
            t.note(e)
    return t


def spliced(t: Transcript, echo: str | None, *chunks: bytes) -> list[Any]:
    splice, events, out = Splice(t, echo), SseEvents(), []
    for chunk in chunks:
        for e in events.feed(chunk):
            raw = splice.accept(e)
            if raw is not None:
                out.append(SseEvents().feed(raw)[0])
    return [e.data if e.data is not None else "[DONE]" for e in out]


def test_events_are_whole_even_when_chunks_cut_them_anywhere() -> None:
    stream = chat_chunk(role="assistant") + chat_chunk("Hel") + chat_chunk("lo") + b"data: [DONE]\n\n"
    events = SseEvents()
    got = [e for i in range(0, len(stream), 7) for e in events.feed(stream[i:i + 7])]
    assert len(got) == 4 and got[-1].done and b"".join(e.raw for e in got) == stream
    crlf = SseEvents().feed(b"event: ping\r\ndata: {}\r\n\r\n")
    assert crlf[0].name == "ping" and crlf[0].data == {}


def test_a_transcript_holds_what_reached_the_caller_in_each_dialect() -> None:
    chat = transcript_of("chat", chat_chunk(role="assistant"), chat_chunk("Hel"), chat_chunk("lo"))
    assert (chat.text, chat.events, chat.stream_id, chat.created, chat.finished, chat.blocked) == ("Hello", 2, "chatcmpl-A", 100, False, None)
    done = transcript_of("completions", sse({"id": "c1", "choices": [{"index": 0, "text": "a"}]}), b"data: [DONE]\n\n")
    assert (done.text, done.finished) == ("a", True)
    msgs = transcript_of("messages", sse({"type": "message_start", "message": {"id": "msg_1"}}, "message_start"),
                         sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}, "content_block_start"),
                         sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}, "content_block_delta"))
    assert (msgs.text, msgs.stream_id, msgs.open_blocks, msgs.finished) == ("Hi", "msg_1", {0}, False)
    assert transcript_of("messages", sse({"type": "message_stop"}, "message_stop")).finished


@pytest.mark.parametrize(("dialect", "chunk", "why"), [
    ("chat", sse({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"name": "f"}}]}}]}), "tool call"),
    ("chat", sse({"choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]}), "reasoning"),
    ("chat", sse({"choices": [{"index": 1, "delta": {"content": "x"}}]}), "several choices"),
    ("messages", sse({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking"}}), "thinking"),
    ("messages", sse({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta"}}), "input_json_delta"),
])
def test_what_cannot_be_continued_says_why(dialect: str, chunk: bytes, why: str) -> None:
    with pytest.raises(NotResumable, match=why):
        resumed_request({"messages": [{"role": "user", "content": "q"}]}, transcript_of(dialect, chunk))


def test_the_continued_request_carries_the_answer_so_far_and_what_is_left_of_the_budget() -> None:
    t = transcript_of("completions", sse({"choices": [{"index": 0, "text": " upon"}]}), sse({"choices": [{"index": 0, "text": " a"}]}))
    doc = {"prompt": "Once", "max_tokens": 10, "stream": True, "temperature": 0}
    assert resumed_request(doc, t) == ({"prompt": "Once upon a", "max_tokens": 8, "stream": True, "temperature": 0}, None)
    assert resumed_request({**doc, "prompt": ["Once"]}, t)[0]["prompt"] == "Once upon a"
    with pytest.raises(NotResumable, match="one string"):
        resumed_request({**doc, "prompt": [1, 2, 3]}, t)
    with pytest.raises(NotResumable, match="several choices"):
        resumed_request({**doc, "n": 2}, t)
    assert resumed_request({"prompt": "x", "max_tokens": 1}, t)[0]["max_tokens"] == 1  # never below one

    chat = transcript_of("chat", chat_chunk("Sure, "), chat_chunk("here"))
    ask = [{"role": "user", "content": "q"}]
    out, echo = resumed_request({"messages": ask, "max_completion_tokens": 5}, chat)
    assert out == {"messages": [*ask, {"role": "assistant", "content": "Sure, here"}], "max_completion_tokens": 3} and echo == "Sure, here"
    # the caller prefilled "Sure" itself: the server echoed it, so the answer so far replaces it
    out, echo = resumed_request({"messages": [*ask, {"role": "assistant", "content": "Sure"}]}, chat)
    assert out["messages"][-1] == {"role": "assistant", "content": "Sure, here"} and echo == "Sure, here"
    out, _ = resumed_request({"messages": [*ask, {"role": "assistant", "content": [{"type": "text", "text": "Well: "}]}]}, chat)
    assert out["messages"][-1]["content"] == "Well: Sure, here"
    nothing = transcript_of("chat", chat_chunk(role="assistant"))
    assert resumed_request({"messages": ask, "max_tokens": 4}, nothing) == ({"messages": ask, "max_tokens": 4}, None)  # as first sent


def test_the_splice_drops_the_preamble_and_the_echo_and_keeps_the_first_ids_and_counts() -> None:
    t = transcript_of("chat", chat_chunk(role="assistant"), chat_chunk("Hel"), chat_chunk("lo"))
    got = spliced(t, "Hello", chat_chunk(role="assistant", cid="chatcmpl-B"), chat_chunk("Hel", cid="chatcmpl-B"),
                  chat_chunk("lo, w", cid="chatcmpl-B"), chat_chunk("orld", cid="chatcmpl-B"),
                  chat_chunk(finish="stop", cid="chatcmpl-B", usage={"completion_tokens": 2, "prompt_tokens": 9}), b"data: [DONE]\n\n")
    assert [c["choices"][0]["delta"].get("content") for c in got[:-1]] == [", w", "orld", None]
    assert {c["id"] for c in got[:-1]} == {"chatcmpl-A"} and {c["created"] for c in got[:-1]} == {100}
    assert got[-2]["usage"]["completion_tokens"] == 4 and got[-1] == "[DONE]"
    assert (t.text, t.finished) == ("Hello, world", True)  # ready for a second resume

    no_echo = transcript_of("chat", chat_chunk("Hel"))
    assert [c["choices"][0]["delta"]["content"] for c in spliced(no_echo, "Hel", chat_chunk("p!", cid="chatcmpl-B"))] == ["p!"]
    assert no_echo.text == "Help!"


def test_an_anthropic_continuation_is_one_message() -> None:
    start = sse({"type": "message_start", "message": {"id": "msg_1"}}, "message_start")
    block = sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}, "content_block_start")

    def delta(text: str) -> bytes:
        return sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}, "content_block_delta")

    t = transcript_of("messages", start, block, delta("Hi"))
    got = spliced(t, "Hi", sse({"type": "message_start", "message": {"id": "msg_2"}}, "message_start"), block, delta("Hi there"),
                  sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
                  sse({"type": "message_delta", "usage": {"output_tokens": 1}}, "message_delta"), sse({"type": "message_stop"}, "message_stop"))
    assert [e["type"] for e in got] == ["content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert got[0]["delta"]["text"] == " there" and got[2]["usage"]["output_tokens"] == 2
    assert (t.text, t.finished) == ("Hi there", True)


def test_the_splitter_is_bounded_and_keeps_what_is_left_at_the_end() -> None:
    from mesh_llm.api.resume import MAX_EVENT

    events = SseEvents()
    crlf = events.feed(b"data: {\"a\": 1}\r\n\r") + events.feed(b"\ndata: {\"b\": 2}\r\n\r\n")  # CRLF CRLF cut across chunks
    assert [e.data for e in crlf] == [{"a": 1}, {"b": 2}]
    assert events.feed(b"data: [DONE]") == [] and events.rest() is not None and SseEvents().rest() is None
    endless = SseEvents()
    got = endless.feed(b"data: " + b"x" * (MAX_EVENT + 10))  # never a blank line: relayed, not held
    assert endless.oversized and len(got) == 1 and len(got[0].raw) > MAX_EVENT and endless.feed(b"more")[0].raw == b"more"


def test_errors_ends_and_constraints_are_not_run_again() -> None:
    errored = transcript_of("chat", chat_chunk("Hel"), sse({"error": {"message": "parser failed"}}))
    assert errored.finished and errored.blocked == "the server reported an error"
    assert transcript_of("messages", sse({"type": "error", "error": {}}, "error")).finished
    stopped = transcript_of("chat", chat_chunk("Hel"), chat_chunk(finish="stop"))
    assert stopped.stopped and not stopped.finished  # only [DONE] is missing
    assert transcript_of("messages", sse({"type": "content_block_stop", "index": 0}, "content_block_stop")).blocked
    t = transcript_of("chat", chat_chunk("x"))
    for key, value in (("grammar", "root ::= x"), ("json_schema", {"type": "object"}), ("response_format", {"type": "json_object"}),
                       ("tool_choice", "required")):
        with pytest.raises(NotResumable, match=f"constrained \\({key}\\)"):
            resumed_request({"messages": [{"role": "user", "content": "q"}], key: value}, t)
    ok = {"messages": [{"role": "user", "content": "q"}], "response_format": {"type": "text"}, "tool_choice": "auto", "n": None, "max_tokens": True}
    out, _ = resumed_request(ok, t)
    assert out["max_tokens"] is True  # not a number: left alone


def test_malformed_events_do_not_break_the_splice() -> None:
    t = transcript_of("chat", chat_chunk(role="assistant"), chat_chunk("a"))
    assert spliced(t, "a", sse({"choices": 5}), sse({"id": "x", "choices": [{"index": 0, "delta": {"content": "ab"}}]}))[-1]["choices"][0]["delta"]["content"] == "b"
    m = transcript_of("messages", sse({"type": "content_block_start", "index": [0], "content_block": {"type": "text"}}, "content_block_start"))
    assert m.open_blocks == set()
