"""`mesh-llm discover`, `--auto` and the node's publisher: the glue between the CLI, the node
and the Nostr shell. Everything a listing says came from a stranger: printed without markup,
through terminal_safe."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from mesh_llm import __version__
from mesh_llm.discovery.listing import Found, Listing, Query, best_for_auto, check_name, found_json, freshness, listing_from_status, narrow, score
from mesh_llm.errors import UserError
from mesh_llm.text import terminal_safe

AUTO_RETRY_SECS = 15.0
AUTO_WAIT_SECS = 300.0
AUTO_WAIT_ENV = "MESH_LLM_AUTO_WAIT_SECS"

if TYPE_CHECKING:
    from mesh_llm.discovery.nostr import Publisher
    from mesh_llm.node import NodeConfig


def add_node_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("finding meshes (public listings on Nostr relays)")
    g.add_argument("--publish", action="store_true", help="list this mesh on Nostr so others can find it (with its CLIENT token: strangers may use it, not serve)")
    g.add_argument("--publish-member-token", action="store_true", help="publish the MEMBER token instead: anyone who finds the mesh may serve and host in it, and see its prompts")
    g.add_argument("--mesh-name", default=None, metavar="NAME", help="name the mesh (implies --publish); with --auto: join the mesh of that name, or start it")
    g.add_argument("--region", default=None, metavar="R", help="a region to show in the listing (e.g. eu-west); with --auto: only meshes there")
    g.add_argument("--max-clients", type=int, default=None, metavar="N", help="delist the mesh while it has N or more clients")
    g.add_argument("--auto", action="store_true", help="join the best listed mesh (with --client, --model M picks one serving M)")
    g.add_argument("--nostr-relay", action="append", default=[], metavar="URL", help="Nostr relay to use instead of the defaults (repeatable)")


def add_parser(sub: Any) -> None:
    d = sub.add_parser("discover", help="list the meshes published on Nostr: name, nodes, memory, models, region, clients, freshness, score")
    d.add_argument("--model", default=None, metavar="M", help="only meshes serving or wanting a model whose name contains M")
    d.add_argument("--region", default=None, metavar="R", help="only meshes in region R")
    d.add_argument("--min-vram", type=float, default=None, metavar="GB", help="only meshes with at least this much memory in all")
    d.add_argument("--json", action="store_true", help="machine-readable: {meshes: [...], skipped: {reason: count}, unreachable: [...]}")
    d.add_argument("--nostr-relay", action="append", default=[], metavar="URL", help="Nostr relay to ask instead of the defaults (repeatable)")


def check_node_options(args: argparse.Namespace) -> None:
    """One-line errors for contradictory or bad discovery flags, before any slow work."""
    if args.mesh_name is not None:
        _checked(args.mesh_name, "--mesh-name")
    if args.region is not None:
        _checked(args.region, "--region")
    if args.max_clients is not None and not 1 <= args.max_clients <= 100_000:
        raise UserError(f"--max-clients {args.max_clients} must be from 1 to 100000")
    if args.auto and (args.join or args.join_file):
        raise UserError("--auto finds a mesh to join; --join names one: pass one of them")
    if args.client and (args.publish or args.publish_member_token):
        raise UserError("a client cannot publish a mesh (it has no token to share): drop --publish, or drop --client")
    if args.client and args.mesh_name is not None and not args.auto:
        raise UserError("--client --mesh-name NAME needs --auto: a client joins the named mesh, it cannot start one")
    for url in args.nostr_relay:
        if not url.startswith(("ws://", "wss://")) or len(url) > 500:
            raise UserError(f"--nostr-relay {url[:100]!r} must be a ws:// or wss:// URL")
    if args.client and args.max_clients is not None:
        raise UserError("--max-clients is for a node that publishes its mesh, not a client")


def _checked(text: str, what: str) -> str:
    try:
        return check_name(text, what)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _fetch(relays: list[str]) -> tuple[list[Found], dict[str, int], list[str]]:
    from mesh_llm.discovery.nostr import fetch_listings

    return asyncio.run(fetch_listings(relays, __version__))


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def _skipped_text(skipped: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in skipped.items())


def discover_command(args: argparse.Namespace, out: Console) -> int:
    if args.min_vram is not None and not args.min_vram >= 0:
        raise UserError(f"--min-vram {args.min_vram:g} must be a number of GB (0 or more)")
    found, skipped, unreachable = _fetch(args.nostr_relay)
    now = time.time()
    shown = narrow(found, Query(model=args.model, region=args.region, min_vram_gb=args.min_vram))
    if args.json:
        doc = {"meshes": [found_json(f, now) for f in shown], "skipped": skipped, "unreachable": unreachable,
               "filtered_out": len(found) - len(shown)}
        out.print(json.dumps(doc, indent=2), markup=False, highlight=False, soft_wrap=True)
        return 0

    def line(text: str) -> None:
        out.print(terminal_safe(text), markup=False, highlight=False)

    if unreachable:
        line(f"{len(unreachable)} relay(s) unreachable: {'; '.join(unreachable)[:300]}")
    if not shown:
        line("No meshes listed" + (" that match" if len(found) else "") + (f" (skipped: {_skipped_text(skipped)})" if skipped else ""))
        return 0
    line(f"{'NAME':<20} {'NODES':>5} {'MEMORY':>18} {'CLIENTS':>8} {'REGION':<10} {'FRESH':<6} {'SCORE':>5}  MODELS")
    for f in shown:
        x = f.listing
        clients = f"{x.client_count}/{x.max_clients}" if x.max_clients is not None else str(x.client_count)
        memory = f"{_gb(x.free_bytes)} free/{_gb(x.total_bytes)}"
        models = ", ".join(x.serving) + (f" (wanted: {', '.join(x.wanted)})" if x.wanted else "")
        line(f"{(x.name or '(unnamed)')[:20]:<20} {x.node_count:>5} {memory:>18} {clients:>8} {(x.region or '-')[:10]:<10} "
             f"{freshness(f.published_at, now):<6} {score(x):>5}  {models or '-'}")
    line(f"{len(shown)} mesh(es)" + (f"; skipped: {_skipped_text(skipped)}" if skipped else "") +
         "   Join one: mesh-llm --auto [--mesh-name NAME] [--client]")
    return 0


def auto_join(cfg: NodeConfig, say: Callable[[str], None]) -> NodeConfig:
    """`--auto`: the config joined to the best listed mesh, or set to start (and publish) the
    named one when none is listed yet, or to start a new mesh (a node that serves)."""
    need_member = not cfg.client
    wait = auto_wait_secs() if cfg.client else 0.0
    deadline, interval = time.monotonic() + wait, max(1.0, min(AUTO_RETRY_SECS, wait / 10))
    while True:
        found, skipped, unreachable = _fetch(cfg.nostr_relays)
        note = (f"; skipped: {_skipped_text(skipped)}" if skipped else "")
        say(f"Discovery: {len(found)} mesh(es) listed{note}")
        joined = _auto_choice(cfg, found, need_member, say)
        if joined is not None or time.monotonic() + interval > deadline:
            break
        say(f"No mesh to join yet: looking again in {interval:g} s (Ctrl-C stops)")  # a client waits for it to be listed
        time.sleep(interval)
    if joined is not None:
        return joined
    what = f"named {cfg.mesh_name!r}" if cfg.mesh_name else "unnamed"
    if need_member and best_for_auto(found, Query(region=cfg.region), cfg.mesh_name, False) is not None:
        raise UserError(f"the {what} mesh is listed with its client token only: join it with --auto --client, or ask a member for the member token")
    if cfg.client:
        model = f" serving {cfg.auto_model!r}" if cfg.auto_model else ""
        raise UserError(f"no {what} mesh{model} is listed{note}: see `mesh-llm discover`, or join with --join TOKEN")
    if cfg.mesh_name:
        say(f"No mesh named {cfg.mesh_name!r} is listed yet: starting it (and listing it)")
    else:
        say("No listed mesh to join: starting a new one")
    return replace(cfg, publish=True) if cfg.mesh_name else cfg


def _auto_choice(cfg: NodeConfig, found: list[Found], need_member: bool, say: Callable[[str], None]) -> NodeConfig | None:
    if cfg.client:
        query = Query(model=cfg.auto_model, region=cfg.region, serving_only=True)
        best = best_for_auto(found, query, cfg.mesh_name, need_member)
    else:
        wanted = Query(model=Path(cfg.models[0]).stem, region=cfg.region) if cfg.models else Query(region=cfg.region)
        best = best_for_auto(found, wanted, cfg.mesh_name, need_member) or best_for_auto(found, Query(region=cfg.region), cfg.mesh_name, need_member)
    if best is None:
        return None
    x = best.listing
    say(f"Joining {_describe(x)} ({x.node_count} node(s), {_gb(x.total_bytes)}, serving {', '.join(x.serving) or 'nothing yet'})")
    return replace(cfg, join=[x.token])


def auto_wait_secs() -> float:
    """How long `--auto --client` keeps looking for a mesh to be listed (the original: 20 × 15 s)."""
    try:
        return max(0.0, min(3600.0, float(os.environ.get(AUTO_WAIT_ENV, "") or AUTO_WAIT_SECS)))
    except ValueError:
        return AUTO_WAIT_SECS


def _describe(x: Listing) -> str:
    return f"mesh {x.name!r}" if x.name else f"mesh {x.mesh_id[:8]}"


def start_publisher(cfg: NodeConfig, status: Callable[[], dict[str, Any]], member_token: str, client_token: str,
                    say: Callable[[str], None], warn: Callable[[str], None]) -> Publisher:
    """The node's publisher: its listing from the node's own status, delisted at --max-clients."""
    from mesh_llm.discovery.nostr import Publisher, load_or_create_nostr_keys

    publisher: Publisher

    def current() -> Listing | None:
        listing = listing_from_status(status(), token=member_token if cfg.publish_member_token else client_token, version=__version__,
                                      name=cfg.mesh_name, region=cfg.region, max_clients=cfg.max_clients)
        if listing.full:
            publisher.delisted_reason = f"{listing.client_count} client(s), --max-clients {cfg.max_clients}"
            return None
        return listing

    publisher = Publisher(load_or_create_nostr_keys(cfg.state_dir), cfg.nostr_relays, current, say, warn)
    publisher.start()
    return publisher
