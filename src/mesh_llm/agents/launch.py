"""`mesh-llm goose|claude|pi|opencode`: run an agent tool wired to the mesh.

The node on this machine is used (or a client node started for the session, see
local_node), a served model picked, the tool's configuration pointed at the node, and
the tool run in the foreground; its exit code is ours. What each writes:

- goose: ~/.config/goose/custom_providers/mesh.json (a provider "mesh"), then `goose session`
  with GOOSE_PROVIDER=mesh GOOSE_MODEL=M.
- claude: nothing on disk; `claude --model M --settings JSON` whose env points Claude Code at
  the node (ANTHROPIC_BASE_URL) and sets every model variable to M.
- pi: the provider "mesh" merged into ~/.pi/agent/models.json, then `pi --model mesh/M`.
- opencode: nothing on disk; OPENCODE_CONFIG_CONTENT (opencode merges it over its own config
  files, above them in priority) holds a provider "mesh" (@ai-sdk/openai-compatible at
  http://127.0.0.1:PORT/v1), then `opencode -m mesh/M`.

A file we change is merged (the user's other keys stay), its first version kept as FILE.bak,
written whole through a temp file; a file that is not valid JSON is left alone (one line).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import stat
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from mesh_llm.agents.local_node import API_KEY_ENV, TOKEN_ENV, get_json, local_api, served_models
from mesh_llm.errors import UserError
from mesh_llm.files import replacing

DEFAULT_CONTEXT = 4096  # when the mesh does not say a model's context size


@dataclass(frozen=True)
class Tool:
    exe: str
    install: str
    about: str


TOOLS: dict[str, Tool] = {
    "goose": Tool("goose", "see https://block.github.io/goose/docs/getting-started/installation (e.g. brew install block-goose-cli)",
                  "run goose (`goose session`) against the mesh"),
    "claude": Tool("claude", "npm install -g @anthropic-ai/claude-code", "run Claude Code against the mesh (Anthropic /v1/messages)"),
    "pi": Tool("pi", "npm install -g @mariozechner/pi-coding-agent", "run the pi coding agent against the mesh"),
    "opencode": Tool("opencode", "npm install -g opencode-ai", "run opencode against the mesh"),
}
OUR_OPTIONS = {"--model": True, "--port": True, "--join": True, "-h": False, "--help": False}  # option: takes a value


def split_tool_args(argv: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """For `mesh-llm TOOL [our options] [tool args…]`: (the part argparse parses, the tool's
    arguments); the tool's start at the first word that is not one of our options (or after `--`).
    (argv, None) for any other command."""
    argv = list(argv)
    if not argv or argv[0] not in TOOLS:
        return argv, None
    i = 1
    while i < len(argv):
        word = argv[i]
        if word == "--":
            return argv[:i], argv[i + 1:]
        name = word.split("=", 1)[0]
        if name not in OUR_OPTIONS:
            break
        i += 2 if OUR_OPTIONS[name] and "=" not in word else 1
    return argv[:i], argv[i:]


def add_parsers(sub: Any) -> None:
    """The four launcher commands (their arguments after our options reach the tool: cli splits them off first)."""
    for name, tool in TOOLS.items():
        p = sub.add_parser(name, usage=f"mesh-llm {name} [--model M] [--port N] [--join TOKEN] [ARGS…]", help=f"{tool.about}; arguments after these options go to {tool.exe}",
                           description=f"{tool.about}: uses the node on this machine, or starts a client node for the session "
                                       f"(--join TOKEN, else the mesh this machine last joined) and stops it after. "
                                       f"Arguments after these options (or after --) are passed to {tool.exe}.")
        p.add_argument("--model", dest="agent_model", default=None, metavar="M",
                       help="a served model (default: the largest whose chat template handles tools, else the largest)")
        p.add_argument("--port", type=int, default=argparse.SUPPRESS, metavar="N", help="the node's API port (default 9337)")
        p.add_argument("--join", dest="agent_join", action="append", default=[], metavar="TOKEN",
                       help="with no node running here: join this mesh with a client node for the session ($MESH_LLM_TOKEN works too)")
        p.set_defaults(tool_args=[])


def launch_command(args: argparse.Namespace, out: Console) -> int:
    name = args.command
    tool = TOOLS[name]
    exe = shutil.which(tool.exe)
    if exe is None:
        raise UserError(f"{tool.exe} is not installed (not on PATH): install it with {tool.install}, then run mesh-llm {name} again")

    def say(line: str) -> None:
        out.print(line, markup=False, highlight=False)

    home = Path(os.environ.get("HOME") or Path.home())
    join = args.agent_join or os.environ.get(TOKEN_ENV, "").split()  # $MESH_LLM_TOKEN keeps it out of `ps`
    with local_api(args.port, join, say=say, need_model=True) as base:
        port = int(base.rsplit(":", 1)[1])
        models = model_facts(base)
        model = choose_model(models, args.agent_model)
        say(f"Model: {model}")
        argv, env = PREPARE[name](exe, model, models, port, home, say)
        return run_tool([*argv, *args.tool_args], env)


@dataclass(frozen=True)
class ModelFacts:
    id: str
    size_bytes: int
    ctx: int
    tools: bool
    aliases: tuple[str, ...]


def model_facts(base: str) -> list[ModelFacts]:
    """The served models (/v1/models) with what /api/status says of them (largest file, context, tools)."""
    ids = served_models(base)
    try:
        entries = get_json(base + "/api/status").get("models") or []
    except (OSError, ValueError, AttributeError):
        entries = []
    facts = []
    for model_id in ids:
        mine = [e for e in entries if isinstance(e, dict) and e.get("name") == model_id]
        facts.append(ModelFacts(
            model_id,
            max((int(e.get("size_bytes") or 0) for e in mine), default=0),
            max((int(e.get("ctx") or 0) for e in mine), default=0),
            any(e.get("tools") is True for e in mine),
            tuple(str(a) for e in mine for a in e.get("aliases") or []),
        ))
    return facts


def choose_model(models: list[ModelFacts], wanted: str | None) -> str:
    """`wanted` if the mesh serves it (its id, an alias, or the id in other letter case); else the
    largest model whose chat template handles tools, else the largest. Whether a template handles
    tools is what its host gossips (`tools` in /api/status: the GGUF's chat template reads the
    `tools` variable); agents are driven by tool calls, so such a model is preferred."""
    if not models:
        raise UserError("the mesh serves no model: start a node with --model M in it")
    if wanted:
        for m in models:
            if wanted == m.id or wanted in m.aliases:
                return m.id
        folded = [m.id for m in models if m.id.lower() == wanted.lower()]
        if len(folded) == 1:
            return folded[0]
        raise UserError(f"--model {wanted} is not served by the mesh; served: {', '.join(m.id for m in models)}")
    pool = [m for m in models if m.tools] or models
    return max(pool, key=lambda m: (m.size_bytes, m.id)).id


def run_tool(argv: list[str], env: dict[str, str]) -> int:
    """Run the tool in the foreground: the terminal's Ctrl-C reaches it (same process group) and
    not us; a SIGTERM sent to us is passed on. Its exit code (128+N for a signal N) is returned."""
    try:
        proc = subprocess.Popen(argv, env=env)
    except OSError as exc:
        raise UserError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signal.SIGTERM))
    try:
        code = proc.wait()
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    return 128 - code if code < 0 else code


# --- configuration files ---------------------------------------------------------------------


def load_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path` (None: no file); one line if it is not a JSON object."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not text.strip():
        return {}
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}): fix or move it, then run again (it was left as it is)") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path} does not hold a JSON object: fix or move it, then run again (it was left as it is)")
    return doc


def write_merged(path: Path, update: Callable[[dict[str, Any]], dict[str, Any]], say: Callable[[str], None]) -> None:
    """Apply `update` to the JSON object in `path` and write it back whole, if it changed; the
    file as it was before our first change is kept as `path`.bak. A symlink is followed (dotfile
    managers link these files) and the file's mode is kept."""
    target = path.resolve() if path.is_symlink() else path
    before = load_json_object(target)
    after = update(json.loads(json.dumps(before or {})))
    if after == before:
        return
    mode = 0o600
    if before is not None:
        mode = stat.S_IMODE(target.stat().st_mode)
        backup = target.with_name(target.name + ".bak")
        if not backup.exists():
            shutil.copy2(target, backup)
            say(f"Kept a copy of {path} as {backup.name}")
    with replacing(target, mode) as f:
        f.write((json.dumps(after, indent=2) + "\n").encode())
    say(f"Updated {path}")


def _config_home(home: Path) -> Path:
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    return Path(xdg) if xdg.startswith("/") else home / ".config"


def _tool_env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **extra}


Prepared = tuple[list[str], dict[str, str]]


def prepare_goose(exe: str, model: str, models: list[ModelFacts], port: int, home: Path, say: Callable[[str], None]) -> Prepared:
    path = _config_home(home) / "goose" / "custom_providers" / "mesh.json"
    listed = sorted(models, key=lambda m: m.id != model)  # the chosen one first

    def update(doc: dict[str, Any]) -> dict[str, Any]:
        doc.update({
            "name": "mesh", "engine": "openai", "display_name": "mesh-llm",
            "description": doc.get("description", "Models of the mesh, through the mesh-llm node on this machine"),
            "base_url": f"http://localhost:{port}",
            "models": [{"name": m.id, "context_limit": m.ctx or DEFAULT_CONTEXT} for m in listed],
            "supports_streaming": True, "requires_auth": False,
        })
        if os.environ.get(API_KEY_ENV, "").strip():  # a node that needs a key: goose reads it from that variable
            doc.update({"requires_auth": True, "api_key_env": API_KEY_ENV})
        elif doc.get("api_key_env") == API_KEY_ENV:
            del doc["api_key_env"]
        return doc

    write_merged(path, update, say)
    env = {"GOOSE_PROVIDER": "mesh", "GOOSE_MODEL": model}
    return [exe, "session"], _tool_env(env)


def prepare_claude(exe: str, model: str, models: list[ModelFacts], port: int, home: Path, say: Callable[[str], None]) -> Prepared:
    # Claude Code sends ANTHROPIC_AUTH_TOKEN as `Authorization: Bearer` (no prompt to approve a key);
    # ANTHROPIC_API_KEY is emptied so a real Anthropic key in the user's env is not used or sent.
    # A node that needs a key gets the one in $MESH_LLM_API_KEY; otherwise any word does.
    env = {
        "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{port}",
        "ANTHROPIC_AUTH_TOKEN": os.environ.get(API_KEY_ENV, "").strip() or "mesh-llm",
        "ANTHROPIC_API_KEY": "",
        "ANTHROPIC_MODEL": model,
        "ANTHROPIC_DEFAULT_OPUS_MODEL": model,
        "ANTHROPIC_DEFAULT_SONNET_MODEL": model,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": model,
        "ANTHROPIC_SMALL_FAST_MODEL": model,
        "CLAUDE_CODE_SUBAGENT_MODEL": model,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
    }
    settings = json.dumps({"env": env}, separators=(",", ":"))
    return [exe, "--model", model, "--settings", settings], _tool_env(env)  # in its env too: settings apply after start-up


def prepare_pi(exe: str, model: str, models: list[ModelFacts], port: int, home: Path, say: Callable[[str], None]) -> Prepared:
    path = home / ".pi" / "agent" / "models.json"
    key = os.environ.get(API_KEY_ENV, "").strip() or "mesh"

    def update(doc: dict[str, Any]) -> dict[str, Any]:
        providers = doc.get("providers")
        if providers is not None and not isinstance(providers, dict):
            raise UserError(f"{path}: \"providers\" is not an object: fix it, then run again (it was left as it is)")
        providers = providers or {}
        providers["mesh"] = {
            "api": "openai-completions", "apiKey": key, "baseUrl": f"http://127.0.0.1:{port}/v1",
            "models": [{
                "id": m.id, "name": f"{m.id} (Mesh)", "contextWindow": m.ctx or DEFAULT_CONTEXT,
                "maxTokens": min(8192, m.ctx or DEFAULT_CONTEXT), "input": ["text"],
                "compat": {"maxTokensField": "max_tokens", "supportsDeveloperRole": False, "supportsUsageInStreaming": False},
            } for m in models],
        }
        doc["providers"] = providers
        return doc

    write_merged(path, update, say)
    return [exe, "--model", f"mesh/{model}"], _tool_env({})


def prepare_opencode(exe: str, model: str, models: list[ModelFacts], port: int, home: Path, say: Callable[[str], None]) -> Prepared:
    # OPENCODE_CONFIG_CONTENT is merged over opencode's config files (it ranks above them), so the
    # user's own config stays untouched on disk and still applies for everything else.
    key = os.environ.get(API_KEY_ENV, "").strip() or "mesh"
    config = {
        "$schema": "https://opencode.ai/config.json",
        "provider": {"mesh": {
            "npm": "@ai-sdk/openai-compatible", "name": "mesh-llm",
            "options": {"baseURL": f"http://127.0.0.1:{port}/v1", "apiKey": key},
            "models": {m.id: {"name": m.id, "limit": {"context": m.ctx or DEFAULT_CONTEXT, "output": min(8192, m.ctx or DEFAULT_CONTEXT)}}
                       for m in models},
        }},
        "model": f"mesh/{model}",
    }
    return [exe, "-m", f"mesh/{model}"], _tool_env({"OPENCODE_CONFIG_CONTENT": json.dumps(config)})


PREPARE: dict[str, Callable[[str, str, list[ModelFacts], int, Path, Callable[[str], None]], Prepared]] = {
    "goose": prepare_goose, "claude": prepare_claude, "pi": prepare_pi, "opencode": prepare_opencode,
}
