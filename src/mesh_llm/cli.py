"""Command line: parses arguments and hands over; no logic of its own."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import NoReturn

from rich.console import Console

from mesh_llm import __version__, service
from mesh_llm.agents.launch import TOOLS, add_parsers, split_tool_args
from mesh_llm.blackboard import commands as blackboard_commands
from mesh_llm.discovery import commands as discovery_commands
from mesh_llm.engine.flavor import FLAVORS
from mesh_llm.errors import UserError
from mesh_llm.files import ensure_state_dir, read_token_file
from mesh_llm.paths import default_state_dir
from mesh_llm.text import terminal_safe

TOKEN_ENV = "MESH_LLM_TOKEN"  # an invite token out of the process list (argv is world-readable)

DEFAULT_CONSOLE_PORT = 3131

DESCRIPTION = """\
Pool the GPUs (or CPUs) of several machines into one OpenAI-compatible API
on http://localhost:9337/v1, powered by llama.cpp.

examples:
  mesh-llm --model gemma-3-270m          serve the packaged Gemma 3 270M (offline)
  mesh-llm --model Qwen3-8B              serve a catalog model (downloaded on first use)
  mesh-llm --model ~/models/model.gguf   serve a local GGUF file
  mesh-llm --model ORG/REPO/FILE.gguf    serve a GGUF from Hugging Face (or a URL to it)
  mesh-llm --join TOKEN --model M        join a mesh (token from any member's output)
  mesh-llm --join-file FILE --model M    the same, the token read from FILE (or $MESH_LLM_TOKEN): not shown by ps
  mesh-llm --client --join TOKEN         use a mesh's models on :9337 without serving any
  mesh-llm --model A --model B           serve several models within one memory budget
  mesh-llm --model M --console           also serve the web console on http://localhost:3131
  mesh-llm load NAME / unload NAME       change what the running node serves, without a restart
  mesh-llm status                        the models this node runs, its memory, the other nodes
  mesh-llm token [--client]              the running node's member token, or its client token
  mesh-llm blackboard "TEXT"             post to the mesh's blackboard (--search Q, --feed read it)
  mesh-llm --join CLIENT_TOKEN           use a mesh with a client token (API only: serves nothing)
  mesh-llm --model M --publish           list the mesh on Nostr (with its client token) so others find it
  mesh-llm discover [--model M]          the meshes listed on Nostr; `--auto` joins the best one
  mesh-llm --auto --mesh-name NAME ...   join the mesh named NAME, or start (and list) it
  mesh-llm download                      list the catalog; `download NAME --draft` fetches a model and its draft
  mesh-llm models installed              models in the Hugging Face cache (also: recommended, search, show, experts)
  mesh-llm engine                        show which llama.cpp binaries are used
  mesh-llm engine build                  build llama.cpp into the cache now
  mesh-llm claude [--model M] [ARGS…]    run Claude Code against the mesh (also: goose, pi, opencode)
"""


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other error (not the whole usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"mesh-llm: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="mesh-llm", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"mesh-llm {__version__}")
    p.add_argument("--model", action="append", default=[], metavar="REF",
                   help="model to serve (repeatable): catalog name (fuzzy), ORG/REPO/FILE.gguf, ORG/REPO[:QUANT], Hugging Face URL, or path")
    p.add_argument("--port", type=int, default=9337, help="API port (default 9337)")
    p.add_argument("--listen-all", action="store_true", help="bind the API on 0.0.0.0 instead of 127.0.0.1")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. https://app.example) call the API from a browser (repeatable); others get 403")
    p.add_argument("--max-inflight", type=int, default=None, metavar="N",
                   help="requests at once per server of a model, beyond which callers get 429 (default: llama-server's slots, 4)")
    p.add_argument("--upstream-timeout", type=float, default=None, metavar="SECS",
                   help="a peer must start answering within this, else the caller gets 504 (default 300)")
    p.add_argument("--api-key-file", type=Path, default=None, metavar="PATH",
                   help="also accept the API keys in PATH (one a line, # comments); with any key, /v1 needs one")
    p.add_argument("--allow-remote-runtime", action="store_true", help="let other machines use /api/runtime (load, unload) too, not only this one")
    p.add_argument("--ctx-size", type=int, default=None, metavar="N", help="context size for llama-server (default: min(8192, model's))")
    p.add_argument("--console", type=int, nargs="?", const=DEFAULT_CONSOLE_PORT, default=None, metavar="PORT",
                   help=f"serve the web console (default port {DEFAULT_CONSOLE_PORT}; 127.0.0.1 unless --listen-all)")
    p.add_argument("--client", action="store_true", help="lite client: no model, no engine; proxies to a mesh (needs --join)")
    p.add_argument("--join", action="append", default=[], metavar="TOKEN",
                   help="join a mesh with an invite token (repeatable); --join-file or $MESH_LLM_TOKEN keep it out of `ps`")
    p.add_argument("--join-file", action="append", default=[], type=Path, metavar="PATH",
                   help=f"join with the invite token(s) in this file (repeatable); ${TOKEN_ENV} works too")
    spec = p.add_argument_group("speculative decoding (a small draft model proposes, the big one verifies)")
    spec.add_argument("--draft", default=None, metavar="REF", help="draft model (same forms as --model; default: the catalog's pairing when on disk)")
    spec.add_argument("--draft-max", type=int, default=8, metavar="N", help="tokens drafted per step (default 8)")
    spec.add_argument("--no-draft", action="store_true", help="no draft model, even if the catalog pairs one")
    dem = p.add_argument_group("demand (models picked up when the mesh wants them)")
    dem.add_argument("--on-demand", action="append", default=[], metavar="REF",
                     help="a model file on disk this node serves only when the mesh wants it and nobody serves it, or it is hot (repeatable)")
    dem.add_argument("--idle-unload", type=float, default=None, metavar="SECS",
                     help="unload a model this node picked up itself after this long without requests (default 600)")
    split = p.add_argument_group("splitting a model over several nodes")
    split.add_argument("--max-vram", type=float, default=None, metavar="GB", help="offer at most this much memory to models (default: GPU memory, or 75%% of RAM)")
    split.add_argument("--split", action="store_true", help="split the model over the mesh even if it fits here")
    split.add_argument("--tensor-split", default=None, metavar="R,R,…", help="manual layer shares: one per worker (nearest first), then this host")
    net = p.add_argument_group("mesh network")
    net.add_argument("--relay", action="append", default=[], metavar="URL", help="relay server to use instead of iroh's defaults (repeatable)")
    net.add_argument("--no-relay", action="store_true", help="no relays: direct addresses only (air-gapped LANs)")
    net.add_argument("--bind-port", type=int, default=0, metavar="PORT", help="UDP port for the mesh's QUIC socket (default: any free port)")
    net.add_argument("--no-lan", action="store_true", help="don't announce this mesh on the local network (mDNS: mesh id, node id, addresses; never the secret), nor look there with --auto")
    net.add_argument("--bind-host", default="0.0.0.0", metavar="IP", help="IP the QUIC socket binds to (default 0.0.0.0; 127.0.0.1 keeps a mesh on one machine)")
    discovery_commands.add_node_options(p)
    _engine_options(p)
    p.add_argument("--state-dir", type=Path, default=None, metavar="DIR", help=f"logs and node state (default {default_state_dir()})")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    rot = sub.add_parser("rotate-key", help="replace this node's key (its mesh id changes; meshes see a new node)")
    rot.add_argument("--state-dir", type=Path, default=argparse.SUPPRESS, metavar="DIR")
    auth = sub.add_parser("auth", help="API keys for /v1: `auth key create [--label L]`, `auth key list`, `auth key revoke ID|LABEL`")
    auth_what = auth.add_subparsers(dest="auth_what", metavar="key", required=True)
    key_actions = auth_what.add_parser("key", help="create, list or revoke API keys").add_subparsers(dest="key_action", metavar="ACTION", required=True)
    create = key_actions.add_parser("create", help="print a new key once; only its hash is stored (running nodes need a key from then on)")
    create.add_argument("--label", default="", metavar="L", help="a name to tell the key by (e.g. laptop, ci)")
    key_actions.add_parser("list", help="the keys: id, label, created (never the key)")
    revoke = key_actions.add_parser("revoke", help="stop accepting a key (running nodes too)")
    revoke.add_argument("ref", metavar="ID|LABEL")
    for parser in key_actions.choices.values():
        parser.add_argument("--state-dir", type=Path, default=argparse.SUPPRESS, metavar="DIR")
    dl = sub.add_parser("download", help="download a model into the Hugging Face cache; no NAME lists the catalog")
    dl.add_argument("name", nargs="?", metavar="NAME", help="catalog name (fuzzy: 3b, Qwen3-8B), ORG/REPO/FILE.gguf, ORG/REPO[:QUANT] or URL")
    dl.add_argument("--draft", action="store_true", help="also download the catalog's draft model for it")
    models = sub.add_parser("models", help="catalog and local models: recommended | installed | search QUERY | show REF | download REF | experts REF")
    models.add_argument("action", choices=["recommended", "installed", "search", "show", "download", "experts"])
    models.add_argument("ref", nargs="?", metavar="QUERY|REF")
    models.add_argument("--draft", action="store_true", help="with download: also fetch the paired draft")
    models.add_argument("--bin-dir", type=Path, default=argparse.SUPPRESS, metavar="DIR", help="with experts: the llama.cpp build whose llama-imatrix ranks them")
    load = sub.add_parser("load", help="serve one more model on the running node (downloads it first if needed)")
    load.add_argument("ref", metavar="REF", help="catalog name, ORG/REPO/FILE.gguf, ORG/REPO[:QUANT], URL or path")
    load.add_argument("--no-wait", action="store_true", help="return once loading started instead of when it is ready")
    _port_option(load)
    for verb in ("unload", "drop"):
        drop = sub.add_parser(verb, help="stop serving a model on the running node (requests in flight finish)")
        drop.add_argument("name", metavar="NAME", help="the model's id, or the name it was loaded by")
        _port_option(drop)
    _port_option(sub.add_parser("status", help="the running node's models, processes and memory, and the mesh's other nodes"))
    tok = sub.add_parser("token", help="print the running node's invite token (--client: the client token, API use only)")
    tok.add_argument("--client", action="store_true", help="the client token: its holder may use the mesh's API, not serve or lend")
    _port_option(tok)
    blackboard_commands.add_parser(sub)
    discovery_commands.add_parser(sub)
    eng = sub.add_parser("engine", help="show the llama.cpp engine in use; `engine build` builds it")
    eng.add_argument("action", nargs="?", choices=["show", "build"], default="show")
    eng.add_argument("--force", action="store_true", help="rebuild even when the cache has a build")
    _engine_options(eng)
    service.add_parser(sub)
    add_parsers(sub)  # goose, claude, pi, opencode
    return p


def _port_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=argparse.SUPPRESS, metavar="N", help="the node's API port (default 9337)")


def _engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bin-dir", type=Path, default=argparse.SUPPRESS, metavar="DIR", help="folder holding llama-server and ggml-rpc-server (else $MESH_LLM_BIN_DIR, PATH, cache)")
    p.add_argument("--llama-flavor", choices=["auto", *FLAVORS], default=argparse.SUPPRESS, help="engine build: cpu, cuda, metal, vulkan, rocm (default auto)")
    p.add_argument("--device", default=argparse.SUPPRESS, metavar="DEV", help="llama.cpp device to use, e.g. CUDA0, MTL0, Vulkan0")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 0
    argv, tool_args = split_tool_args(argv)  # `mesh-llm claude -p hi`: `-p hi` is claude's
    args = parser.parse_args(argv)
    if tool_args is not None:
        args.tool_args = tool_args
    out = Console(soft_wrap=True)
    err = Console(stderr=True, soft_wrap=True)
    try:
        return dispatch(args, out)
    except UserError as exc:
        err.print(f"mesh-llm: error: {terminal_safe(str(exc))}", markup=False, highlight=False)  # may quote a peer
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("mesh-llm: interrupted")
        return 130


def dispatch(args: argparse.Namespace, out: Console) -> int:
    if args.command in TOOLS:
        from mesh_llm.agents.launch import launch_command

        return launch_command(args, out)
    bin_dir = getattr(args, "bin_dir", None)
    flavor = getattr(args, "llama_flavor", None)
    if args.command == "blackboard":
        return blackboard_commands.blackboard_command(args, out)
    if args.command == "discover":
        return discovery_commands.discover_command(args, out)
    if args.command == "engine":
        from mesh_llm.engine.commands import engine_command

        return engine_command(args.action, bin_dir, flavor, args.force, out)
    if args.command in ("load", "unload", "drop", "status", "token"):
        from mesh_llm.control import load_command, status_command, token_command, unload_command

        if args.command == "token":
            return token_command(args.port, args.client, out)
        if args.command == "load":
            return load_command(args.ref, args.port, not args.no_wait, out)
        if args.command == "status":
            return status_command(args.port, out)
        return unload_command(args.name, args.port, out)
    if args.command == "service":
        return service.service_command(args, out)
    if args.command in ("download", "models"):
        from mesh_llm.models.commands import download_command, models_command

        if args.command == "download":
            return download_command(args.name, args.draft, out)
        return models_command(args.action, args.ref, args.draft, out, bin_dir=bin_dir)
    state_dir = (getattr(args, "state_dir", None) or default_state_dir()).expanduser()
    if args.command == "rotate-key":
        from mesh_llm.mesh.identity import rotate_key

        rotate_key(ensure_state_dir(state_dir))
        out.print(f"New node key written to {state_dir / 'key'}; restart the node for it to take effect.")
        return 0
    if args.command == "auth":
        from mesh_llm.api.keys import key_command

        return key_command(args.key_action, ensure_state_dir(state_dir), getattr(args, "label", ""), getattr(args, "ref", None),
                           lambda line: out.print(line, markup=False, highlight=False),
                           lambda line: Console(stderr=True, soft_wrap=True).print(line, markup=False, highlight=False))
    if args.allow_remote_runtime and not args.listen_all:
        raise UserError("--allow-remote-runtime needs --listen-all: without it the API answers this machine only")
    if args.relay and args.no_relay:
        raise UserError("--relay and --no-relay contradict each other: pass one")
    if not 0 <= args.bind_port <= 65535:
        raise UserError(f"--bind-port {args.bind_port} is not a port number (0-65535)")
    if args.console is not None and not 1 <= args.console <= 65535:
        raise UserError(f"--console {args.console} is not a port number (1-65535)")
    if args.max_vram is not None and not args.max_vram > 0:
        raise UserError(f"--max-vram {args.max_vram:g} must be a positive number of GB")
    if args.draft and args.no_draft:
        raise UserError("--draft and --no-draft contradict each other: pass one")
    if not 1 <= args.draft_max <= 64:
        raise UserError(f"--draft-max {args.draft_max} must be from 1 to 64 tokens")
    if args.client and args.draft:
        raise UserError("--client serves no model, so it runs no draft: drop --draft")
    tensor_split = parse_tensor_split(args.tensor_split) if args.tensor_split else None
    cors_origins = tuple(parse_cors_origin(text) for text in args.cors_origin)
    if args.max_inflight is not None and not 1 <= args.max_inflight <= 100_000:
        raise UserError(f"--max-inflight {args.max_inflight} must be a number of requests from 1 to 100000")
    if args.upstream_timeout is not None and not (math.isfinite(args.upstream_timeout) and args.upstream_timeout > 0):
        raise UserError(f"--upstream-timeout {args.upstream_timeout:g} must be a positive number of seconds")
    discovery_commands.check_node_options(args)
    auto_client = args.auto and args.client  # its --model picks a mesh serving it
    if args.client and args.on_demand:
        raise UserError("--client runs no model, so it serves none on demand: drop --on-demand, or drop --client")
    if args.idle_unload is not None and not (math.isfinite(args.idle_unload) and args.idle_unload > 0):
        raise UserError(f"--idle-unload {args.idle_unload:g} must be a positive number of seconds")
    from_files = [token for path in args.join_file for token in read_token_file(path.expanduser())]
    join = list(dict.fromkeys([*args.join, *from_files, *os.environ.get(TOKEN_ENV, "").split()]))
    ensure_state_dir(state_dir)
    from mesh_llm.mesh.transport import TransportConfig
    from mesh_llm.node import NodeConfig, run_node

    cfg = NodeConfig(
        models=[] if auto_client else args.model,
        port=args.port,
        listen_all=args.listen_all,
        allow_remote_runtime=args.allow_remote_runtime,
        bin_dir=bin_dir,
        device=getattr(args, "device", None),
        flavor=flavor,
        state_dir=state_dir,
        ctx_size=args.ctx_size,
        join=join,
        client=args.client,
        max_vram_gb=args.max_vram,
        force_split=args.split,
        tensor_split=tensor_split,
        console_port=args.console,
        draft=args.draft,
        draft_max=args.draft_max,
        no_draft=args.no_draft,
        transport=TransportConfig(relays=args.relay, no_relay=args.no_relay, bind_host=args.bind_host, bind_port=args.bind_port),
        cors_origins=cors_origins,
        max_inflight=args.max_inflight,
        upstream_timeout=args.upstream_timeout,
        api_key_file=args.api_key_file.expanduser() if args.api_key_file else None,
        on_demand=args.on_demand,
        publish=args.publish or args.publish_member_token, publish_member_token=args.publish_member_token, mesh_name=args.mesh_name,
        region=args.region, max_clients=args.max_clients, auto=args.auto, auto_model=args.model[0] if auto_client and args.model else None,
        nostr_relays=args.nostr_relay,
        nostr=not args.no_nostr,
        lan=not args.no_lan,
    )
    if args.idle_unload is not None:
        cfg.idle_unload = args.idle_unload
    return run_node(cfg, out)


def parse_tensor_split(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace("/", ",").split(","))
    except ValueError:
        raise UserError(f"--tensor-split {text!r} must be comma-separated numbers, e.g. 3,1") from None
    if not all(math.isfinite(v) and 0 <= v <= 1e6 for v in values) or not any(v > 0 for v in values):
        raise UserError(f"--tensor-split {text!r} needs shares from 0 to 1000000, at least one above 0")
    return values


def parse_cors_origin(text: str) -> str:
    from mesh_llm.api.guard import parse_origin

    try:
        return parse_origin(text)
    except ValueError as exc:
        raise UserError(f"--cors-origin {exc}") from None
