"""Claude Code's API surface through a node, with the official `anthropic` SDK: /v1/messages with
`?beta=true` (as Claude Code sends it), /v1/messages/count_tokens, streaming, tool_use / tool_result
turns; through the node serving the model and through a client node that serves nothing."""

from __future__ import annotations

from pathlib import Path

import anthropic
import pytest

from mesh_llm.models.tiny import TinyModelSpec, write_tiny_model
from tests.conftest import LOCAL

GEMMA = "gemma-3-270m-q4_k_m"
BETA = {"beta": "true"}  # what Claude Code appends; this SDK's beta namespace does not add it itself
TOOLS = [{"name": "get_weather", "description": "The weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
ASKED = {"role": "user", "content": "What is the weather in Paris?"}
TOOL_TURNS = [  # the assistant called the tool, the user side answers with its result
    ASKED,
    {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "Sunny, 21 C"}]},
]

# A ChatML template of our own that renders tool definitions, tool calls and tool results
# (llama.cpp reports supports_tools and supports_tool_calls for it): the tiny model with it is
# a model "whose template supports tools".
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools you may call:\n"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n"
    "Call one as <tool_call>{\"name\": NAME, \"arguments\": ARGS}</tool_call><|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{%- for call in message.tool_calls %}<tool_call>{\"name\": \"{{ call.function.name }}\", \"arguments\": "
    "{{ call.function.arguments | tojson if call.function.arguments is mapping else call.function.arguments }}}</tool_call>"
    "{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>{{ message.content }}</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _client(base_url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base_url, api_key="mesh", max_retries=0, timeout=120)


def _check_surface(client: anthropic.Anthropic, model: str) -> None:
    # a plain message, with the query string Claude Code sends
    raw = client.beta.messages.with_raw_response.create(model=model, max_tokens=8, messages=[{"role": "user", "content": "Hello"}], extra_query=BETA)
    assert raw.http_request.url.query == b"beta=true"
    msg = raw.parse()
    assert msg.type == "message" and msg.role == "assistant" and msg.content[0].type == "text" and msg.usage.output_tokens > 0

    # count_tokens, with and without ?beta=true: the same count, and more tokens for more text
    short = client.messages.count_tokens(model=model, messages=[{"role": "user", "content": "hello there"}])
    raw_count = client.beta.messages.with_raw_response.count_tokens(model=model, messages=[{"role": "user", "content": "hello there"}], extra_query=BETA)
    assert raw_count.http_request.url.query == b"beta=true"
    assert raw_count.parse().input_tokens == short.input_tokens > 0
    longer = client.messages.count_tokens(model=model, messages=[{"role": "user", "content": "hello there, how are you doing today?"}])
    assert longer.input_tokens > short.input_tokens

    # streaming: Anthropic's event sequence, text deltas, and the final message assembled by the SDK
    with client.beta.messages.stream(model=model, max_tokens=12, messages=[{"role": "user", "content": "Tell me a story"}], extra_query=BETA) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "content_block_delta" in kinds
    assert final.content[0].type == "text" and final.content[0].text and final.usage.output_tokens > 0
    with client.messages.stream(model=model, max_tokens=6, messages=[{"role": "user", "content": "Hi"}]) as plain:
        assert "".join(plain.text_stream)

    # a tool_use / tool_result history with the tool declared is accepted and answered
    answer = client.beta.messages.create(model=model, max_tokens=8, tools=TOOLS, messages=TOOL_TURNS, extra_query=BETA)  # type: ignore[arg-type]
    assert answer.type == "message" and answer.stop_reason in ("end_turn", "max_tokens", "tool_use")
    counted = client.beta.messages.count_tokens(model=model, tools=TOOLS, messages=TOOL_TURNS, extra_query=BETA)  # type: ignore[arg-type]
    assert counted.input_tokens > client.messages.count_tokens(model=model, messages=[ASKED]).input_tokens  # the result is in the prompt


@pytest.mark.engine
@pytest.mark.gemma
def test_claude_codes_calls_work_with_gemma_through_its_node_and_a_client(start_node) -> None:  # type: ignore[no-untyped-def]
    node = start_node("--model", "gemma-3-270m", *LOCAL)
    node.wait_ready(timeout=300)
    client_node = start_node("--client", "--join", node.token(), *LOCAL)
    client_node.wait_ready()
    for base in (node.base_url, client_node.base_url):
        _check_surface(_client(base), GEMMA)
    # Gemma's template has no tools: the mesh says so (the launchers then prefer a model that has)
    assert [m["tools"] for m in client_node.status()["models"]] == [False]


@pytest.mark.engine
def test_a_template_with_tools_renders_them_and_the_mesh_says_so(start_node, engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = write_tiny_model(tmp_path / "tool-tiny.gguf", TinyModelSpec(name="tool-tiny", chat_template=TOOL_TEMPLATE))
    node = start_node("--model", str(model), *LOCAL)
    node.wait_ready()
    client_node = start_node("--client", "--join", node.token(), *LOCAL)
    client_node.wait_ready()
    assert [(m["name"], m["tools"]) for m in client_node.status()["models"]] == [("tool-tiny", True)]  # gossiped by its host
    client = _client(client_node.base_url)
    _check_surface(client, "tool-tiny")
    bare = client.messages.count_tokens(model="tool-tiny", messages=[ASKED]).input_tokens
    with_tools = client.beta.messages.count_tokens(model="tool-tiny", tools=TOOLS, messages=[ASKED], extra_query=BETA).input_tokens  # type: ignore[arg-type]
    assert with_tools > bare + 20  # the tool's definition is in the prompt
