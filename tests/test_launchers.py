"""`mesh-llm goose|claude|pi|opencode`: stand-in tools on PATH record what they were given and
make one real request to the API they were pointed at."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import psutil
import pytest

from mesh_llm.agents.launch import ModelFacts, choose_model, split_tool_args
from mesh_llm.errors import UserError
from tests.conftest import LOCAL, assert_one_line_error, free_port, run_cli

STANDIN = '''#!{python}
"""Stand-in for an agent tool: records argv, env and config, makes one request, exits $STANDIN_EXIT."""
import json, os, sys, urllib.request
from pathlib import Path

name = Path(sys.argv[0]).name
home = Path(os.environ["HOME"])
argv = sys.argv[1:]
rec = {{"tool": name, "argv": argv, "env": {{k: v for k, v in os.environ.items()
        if k.startswith(("ANTHROPIC_", "GOOSE_", "OPENCODE_", "CLAUDE_", "DISABLE_"))}}, "requests": []}}

def post(url, body, headers=None):
    req = urllib.request.Request(url, json.dumps(body).encode(), {{"Content-Type": "application/json", **(headers or {{}})}})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            rec["requests"].append({{"url": url, "status": r.status, "body": json.loads(r.read())}})
    except urllib.error.HTTPError as e:
        rec["requests"].append({{"url": url, "status": e.code, "body": e.read().decode()}})

chat = {{"messages": [{{"role": "user", "content": "hi"}}], "max_tokens": 4}}
if name == "claude":
    settings = json.loads(argv[argv.index("--settings") + 1])
    rec["settings"] = settings
    env = settings["env"]
    headers = {{"Authorization": "Bearer " + env["ANTHROPIC_AUTH_TOKEN"], "anthropic-version": "2023-06-01", "anthropic-beta": "x"}}
    msg = {{"model": env["ANTHROPIC_MODEL"], "max_tokens": 4, "messages": [{{"role": "user", "content": "hi"}}]}}
    post(env["ANTHROPIC_BASE_URL"] + "/v1/messages?beta=true", msg, headers)
    post(env["ANTHROPIC_BASE_URL"] + "/v1/messages/count_tokens?beta=true", {{k: msg[k] for k in ("model", "messages")}}, headers)
elif name == "goose":
    config = json.loads((home / ".config/goose/custom_providers/mesh.json").read_text())
    rec["config"] = config
    key = os.environ.get(config["api_key_env"], "") if config["requires_auth"] else ""
    post(config["base_url"] + "/v1/chat/completions", {{"model": os.environ["GOOSE_MODEL"], **chat}}, {{"Authorization": "Bearer " + key}} if key else {{}})
elif name == "pi":
    config = json.loads((home / ".pi/agent/models.json").read_text())
    rec["config"] = config
    model = argv[argv.index("--model") + 1].split("/", 1)[1]
    post(config["providers"]["mesh"]["baseUrl"] + "/chat/completions", {{"model": model, **chat}},
         {{"Authorization": "Bearer " + config["providers"]["mesh"]["apiKey"]}})
elif name == "opencode":
    config = json.loads(os.environ["OPENCODE_CONFIG_CONTENT"])
    rec["config"] = config
    model = argv[argv.index("-m") + 1].split("/", 1)[1]
    options = config["provider"]["mesh"]["options"]
    post(options["baseURL"] + "/chat/completions", {{"model": model, **chat}}, {{"Authorization": "Bearer " + options["apiKey"]}})
Path(os.environ["STANDIN_RECORD"]).write_text(json.dumps(rec))
sys.exit(int(os.environ.get("STANDIN_EXIT", "0")))
'''

TOOLS = ("goose", "claude", "pi", "opencode")


@pytest.fixture
def agent_env(tmp_path: Path) -> dict[str, str]:
    """HOME in tmp_path, the stand-ins first on PATH, where they record what they saw."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        exe = bin_dir / tool
        exe.write_text(STANDIN.format(python=sys.executable))
        exe.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    return {"HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "XDG_CONFIG_HOME": "",
            "STANDIN_RECORD": str(tmp_path / "record.json"), "MESH_LLM_STATE_DIR": str(tmp_path / "user-state")}


def _record(env: dict[str, str]) -> dict:
    return json.loads(Path(env["STANDIN_RECORD"]).read_text())


def _mesh_llm_on(port: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            argv = p.info["cmdline"] or []
            if p.info["status"] != psutil.STATUS_ZOMBIE and "mesh_llm" in argv and "--port" in argv and argv[argv.index("--port") + 1] == str(port):
                found.append(p)
        except (psutil.Error, IndexError):
            pass
    return found


@pytest.mark.engine
def test_each_tool_runs_against_the_running_node_with_its_files_merged(start_node, tiny_model: Path, engine, agent_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    node = start_node("--model", str(tiny_model), *LOCAL)
    node.wait_ready()
    home = Path(agent_env["HOME"])
    goose_file = home / ".config/goose/custom_providers/mesh.json"
    goose_file.parent.mkdir(parents=True)
    goose_file.write_text(json.dumps({"name": "mesh", "timeout_seconds": 600, "headers": {"X-Mine": "1"}, "base_url": "http://old"}))
    pi_file = home / ".pi/agent/models.json"
    pi_file.parent.mkdir(parents=True)
    pi_file.write_text(json.dumps({"providers": {"ollama": {"baseUrl": "http://localhost:11434/v1"}}, "mine": True}))
    pi_before = pi_file.read_text()

    port = str(node.port)
    result = run_cli("goose", "--port", port, "--resume", "--name", "x", env=agent_env)
    assert result.returncode == 0, result.stderr + result.stdout
    rec = _record(agent_env)
    assert rec["argv"] == ["session", "--resume", "--name", "x"]
    assert rec["env"]["GOOSE_PROVIDER"] == "mesh" and rec["env"]["GOOSE_MODEL"] == "tiny-llama"
    cfg = rec["config"]
    assert cfg["timeout_seconds"] == 600 and cfg["headers"] == {"X-Mine": "1"}  # the user's keys stay
    assert cfg["engine"] == "openai" and cfg["base_url"] == f"http://localhost:{port}" and cfg["supports_streaming"] is True
    assert cfg["requires_auth"] is False and [m["name"] for m in cfg["models"]] == ["tiny-llama"] and cfg["models"][0]["context_limit"] > 0
    assert json.loads((goose_file.parent / "mesh.json.bak").read_text())["base_url"] == "http://old"
    assert rec["requests"][0]["status"] == 200

    result = run_cli("claude", "--port", port, "-p", "hi", "--verbose", env=agent_env)
    assert result.returncode == 0, result.stderr + result.stdout
    rec = _record(agent_env)
    assert rec["argv"][:2] == ["--model", "tiny-llama"] and rec["argv"][4:] == ["-p", "hi", "--verbose"]
    env = rec["settings"]["env"]
    assert env["ANTHROPIC_BASE_URL"] == f"http://127.0.0.1:{port}" and env["ANTHROPIC_API_KEY"] == ""
    for var in ("ANTHROPIC_MODEL", "ANTHROPIC_DEFAULT_OPUS_MODEL", "ANTHROPIC_DEFAULT_SONNET_MODEL", "ANTHROPIC_DEFAULT_HAIKU_MODEL", "CLAUDE_CODE_SUBAGENT_MODEL"):
        assert env[var] == "tiny-llama"
    assert env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1" and env["DISABLE_TELEMETRY"] == "1"
    message, count = rec["requests"]
    assert message["status"] == 200 and message["body"]["type"] == "message", message
    assert count["status"] == 200 and count["body"]["input_tokens"] > 0, count

    result = run_cli("pi", "--port", port, "--model", "tiny-llama", "--thinking", "off", env=agent_env)
    assert result.returncode == 0, result.stderr + result.stdout
    rec = _record(agent_env)
    assert rec["argv"] == ["--model", "mesh/tiny-llama", "--thinking", "off"]
    assert rec["config"]["mine"] is True and rec["config"]["providers"]["ollama"] == {"baseUrl": "http://localhost:11434/v1"}
    assert rec["config"]["providers"]["mesh"]["baseUrl"] == f"http://127.0.0.1:{port}/v1"
    assert (pi_file.parent / "models.json.bak").read_text() == pi_before
    assert rec["requests"][0]["status"] == 200

    result = run_cli("opencode", "--port", port, "--", "run", "hello", env=agent_env)
    assert result.returncode == 0, result.stderr + result.stdout
    rec = _record(agent_env)
    assert rec["argv"] == ["-m", "mesh/tiny-llama", "run", "hello"]
    assert rec["config"]["provider"]["mesh"]["npm"] == "@ai-sdk/openai-compatible"
    assert rec["requests"][0]["status"] == 200
    assert not (home / ".config/opencode").exists()  # nothing written for opencode

    # the tool's exit code is ours; a second run changes nothing more and keeps the first backup
    result = run_cli("goose", "--port", port, env={**agent_env, "STANDIN_EXIT": "3"})
    assert result.returncode == 3, result.stderr
    assert json.loads((goose_file.parent / "mesh.json.bak").read_text())["base_url"] == "http://old"
    assert node.proc.poll() is None  # the user's node is left running

    # a model the mesh does not serve: one line naming the served ones
    assert_one_line_error(run_cli("claude", "--port", port, "--model", "nope", env=agent_env), "nope", "tiny-llama")


@pytest.mark.engine
def test_without_a_node_a_client_joins_for_the_session_and_is_gone_after(start_node, tiny_model: Path, engine, agent_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    member = start_node("--model", str(tiny_model), *LOCAL)
    token = member.token()
    port = free_port()
    for tool in ("claude", "goose"):
        result = run_cli(tool, "--port", str(port), "--join", token, env=agent_env, timeout=240)
        assert result.returncode == 0, result.stderr + result.stdout
        assert "starting a client node" in result.stdout
        rec = _record(agent_env)
        assert all(r["status"] == 200 for r in rec["requests"]), rec["requests"]
        assert not _mesh_llm_on(port)  # the client it started is stopped
    assert not Path(agent_env["MESH_LLM_STATE_DIR"]).exists()  # and the user's state dir untouched


def test_a_missing_tool_is_one_line_naming_how_to_install_it(agent_env: dict[str, str], tmp_path: Path) -> None:
    env = {**agent_env, "PATH": str(tmp_path / "empty")}
    port = free_port()
    for tool, hint in (("claude", "npm install -g @anthropic-ai/claude-code"), ("goose", "goose"), ("pi", "npm install"), ("opencode", "opencode-ai")):
        result = run_cli(tool, "--port", str(port), "--join", "x", env=env)
        assert_one_line_error(result, f"{tool} is not installed", hint)
    assert not _mesh_llm_on(port)


def test_a_malformed_config_file_is_left_alone(agent_env: dict[str, str], start_node, tiny_model: Path, engine) -> None:  # type: ignore[no-untyped-def]
    node = start_node("--model", str(tiny_model), *LOCAL)
    node.wait_ready()
    pi_file = Path(agent_env["HOME"]) / ".pi/agent/models.json"
    pi_file.parent.mkdir(parents=True)
    pi_file.write_text("{not json")
    assert_one_line_error(run_cli("pi", "--port", str(node.port), env=agent_env), str(pi_file), "not valid JSON")
    assert pi_file.read_text() == "{not json" and not (pi_file.parent / "models.json.bak").exists()


def test_our_options_come_first_and_the_rest_is_the_tools() -> None:
    assert split_tool_args(["claude", "-p", "hi"]) == (["claude"], ["-p", "hi"])
    assert split_tool_args(["claude", "--model", "M", "--port=1", "-p", "hi"]) == (["claude", "--model", "M", "--port=1"], ["-p", "hi"])
    assert split_tool_args(["goose", "--join", "T", "--", "--model", "x"]) == (["goose", "--join", "T"], ["--model", "x"])
    assert split_tool_args(["pi", "chat", "--model", "x"]) == (["pi"], ["chat", "--model", "x"])
    assert split_tool_args(["status", "--port", "1"]) == (["status", "--port", "1"], None)


def test_the_model_is_the_largest_with_tools_else_the_largest() -> None:
    small_tools = ModelFacts("small-tools", 1, 0, True, ())
    big = ModelFacts("big", 9, 0, False, ("big-alias",))
    assert choose_model([small_tools, big], None) == "small-tools"
    assert choose_model([big, ModelFacts("mid", 5, 0, False, ())], None) == "big"
    assert choose_model([small_tools, big], "big-alias") == "big"
    assert choose_model([small_tools, big], "BIG") == "big"
    with pytest.raises(UserError, match="served: small-tools, big"):
        choose_model([small_tools, big], "other")


def test_a_template_handles_tools_when_it_reads_the_tools_variable() -> None:
    from mesh_llm.mesh.peers import HostedModel
    from mesh_llm.models.tiny import CHATML_TEMPLATE
    from mesh_llm.serving.fleet import template_supports_tools

    assert template_supports_tools({"tokenizer.chat_template": "{% if tools %}{{ tools | tojson }}{% endif %}{{ messages }}"})
    assert not template_supports_tools({"tokenizer.chat_template": CHATML_TEMPLATE})
    assert not template_supports_tools({"general.architecture": "gemma3"})  # our packaged Gemma template has none
    assert not template_supports_tools({})
    hosted = HostedModel("m", "ready", tools=True)
    assert HostedModel.from_wire(hosted.to_wire()).tools is True
    old = hosted.to_wire()
    del old["tools"]
    assert HostedModel.from_wire(old).tools is False  # a peer that predates the field


@pytest.mark.engine
def test_a_node_that_needs_a_key_gets_the_one_in_mesh_llm_api_key(start_node, tiny_model: Path, engine, agent_env: dict[str, str], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    state = tmp_path / "keyed"
    made = run_cli("auth", "key", "create", "--label", "agents", "--state-dir", str(state))
    assert made.returncode == 0, made
    key = made.stdout.strip()
    node = start_node("--model", str(tiny_model), *LOCAL, state_dir=state)
    node.wait_ready()
    assert_one_line_error(run_cli("claude", "--port", str(node.port), env=agent_env), "needs an API key", "MESH_LLM_API_KEY")
    for tool in TOOLS:
        result = run_cli(tool, "--port", str(node.port), env={**agent_env, "MESH_LLM_API_KEY": key})
        assert result.returncode == 0, result.stderr + result.stdout
        assert all(r["status"] == 200 for r in _record(agent_env)["requests"]), (tool, _record(agent_env)["requests"])
