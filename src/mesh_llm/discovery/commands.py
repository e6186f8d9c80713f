"""`mesh-llm discover`, `--auto` and the node's publisher: the glue between the CLI, the node
and the Nostr shell. Everything a listing says came from a stranger: printed without markup,
through terminal_safe."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from mesh_llm import __version__
from mesh_llm.discovery.listing import (
    Found,
    Listing,
    PrivateMesh,
    Query,
    Skipped,
    best_for_auto,
    check_name,
    found_json,
    freshness,
    listing_from_status,
    merge_found,
    narrow,
    read_lan,
    score,
)
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
    g.add_argument("--no-nostr", action="store_true", help="ask no Nostr relay: publish and look on this LAN only (mDNS)")


def add_parser(sub: Any) -> None:
    d = sub.add_parser("discover", help="list the meshes published on Nostr: name, nodes, memory, models, region, clients, freshness, score")
    d.add_argument("--model", default=None, metavar="M", help="only meshes serving or wanting a model whose name contains M")
    d.add_argument("--region", default=None, metavar="R", help="only meshes in region R")
    d.add_argument("--min-vram", type=float, default=None, metavar="GB", help="only meshes with at least this much memory in all")
    d.add_argument("--json", action="store_true", help="machine-readable: {meshes: [...], skipped: {reason: count}, unreachable: [...], private_on_lan: [...]}")
    d.add_argument("--nostr-relay", action="append", default=[], metavar="URL", help="Nostr relay to ask instead of the defaults (repeatable)")
    d.add_argument("--no-nostr", action="store_true", help="ask no relay: only the meshes announced on this LAN")
    d.add_argument("--no-lan", action="store_true", help="don't look on this LAN (mDNS), only on the relays")


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
    if args.no_nostr and args.nostr_relay:
        raise UserError("--no-nostr asks no relay: drop it, or drop --nostr-relay")
    if (args.publish or args.publish_member_token or args.mesh_name is not None) and args.no_nostr and args.no_lan and not args.auto:
        raise UserError("--no-nostr and --no-lan leave nowhere to publish the mesh: drop one of them")
    if args.auto and args.no_nostr and args.no_lan:
        raise UserError("--auto with --no-nostr and --no-lan has nowhere to look: drop one of them")
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


@dataclass
class Seen:
    """What one look around found: listed meshes (relays and LAN merged), private meshes on
    the LAN, skipped listings by reason, and the relays that could not be reached."""

    found: list[Found]
    private: list[PrivateMesh]
    skipped: dict[str, int]
    unreachable: list[str]


LAN_BROWSE_SECS = 3.0


def look(relays: list[str], *, nostr: bool = True, lan: bool = True) -> Seen:
    """Ask the relays and browse the LAN at the same time (one shell call for discover and --auto)."""
    return asyncio.run(_look(relays, nostr, lan))


async def _look(relays: list[str], nostr: bool, lan: bool) -> Seen:
    from mesh_llm.discovery.lan import browse_lan

    async def relays_part() -> tuple[list[Found], dict[str, int], list[str]]:
        if not nostr:
            return [], {}, []
        from mesh_llm.discovery.nostr import fetch_listings

        return await fetch_listings(relays, __version__)

    async def lan_part(bad: list[str]) -> list[Any]:
        if not lan:
            return []
        try:
            return await browse_lan(LAN_BROWSE_SECS, skipped=bad)
        except Exception as exc:  # noqa: BLE001 - a LAN without multicast: the relays still answer
            bad.append(f"LAN: {type(exc).__name__}: {exc}")
            return []

    bad: list[str] = []
    (from_relays, skipped, unreachable), heard = await asyncio.gather(relays_part(), lan_part(bad))
    counts = Skipped()
    for reason, n in skipped.items():
        counts.add(reason, n)
    if bad:
        counts.add("unreadable LAN announcements", len(bad))
    from_lan, private = read_lan(((m.mesh_id, m.node_id, m.version, m.name, m.listing) for m in heard), time.time(), __version__, counts)
    found = merge_found(from_relays, from_lan)
    listed = {f.listing.mesh_id for f in found}
    return Seen(found, [p for p in private if p.mesh_id not in listed], counts.as_dict(), unreachable)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def _skipped_text(skipped: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in skipped.items())


def discover_command(args: argparse.Namespace, out: Console) -> int:
    if args.min_vram is not None and not args.min_vram >= 0:
        raise UserError(f"--min-vram {args.min_vram:g} must be a number of GB (0 or more)")
    if args.no_nostr and (args.nostr_relay or args.no_lan):
        raise UserError("--no-nostr looks on the LAN only: drop --nostr-relay and --no-lan, or drop --no-nostr")
    seen = look(args.nostr_relay, nostr=not args.no_nostr, lan=not args.no_lan)
    found, skipped, unreachable = seen.found, seen.skipped, seen.unreachable
    now = time.time()
    shown = narrow(found, Query(model=args.model, region=args.region, min_vram_gb=args.min_vram))
    private = [p for p in seen.private if not (args.model or args.min_vram is not None or args.region)]
    if args.json:
        doc = {"meshes": [found_json(f, now) for f in shown], "skipped": skipped, "unreachable": unreachable,
               "filtered_out": len(found) - len(shown),
               "private_on_lan": [{"mesh_id": p.mesh_id, "name": p.name, "nodes": p.nodes, "version": p.version} for p in private]}
        out.print(json.dumps(doc, indent=2), markup=False, highlight=False, soft_wrap=True)
        return 0

    def line(text: str) -> None:
        out.print(terminal_safe(text), markup=False, highlight=False)

    if unreachable:
        line(f"{len(unreachable)} relay(s) unreachable: {'; '.join(unreachable)[:300]}")
    for p in private:
        line(f"Private mesh on this LAN: {p.name or p.mesh_id[:8]!s} ({p.nodes} node(s) announcing; join with a token from one of its members)")
    if not shown:
        line("No meshes listed" + (" that match" if len(found) else "") + (f" (skipped: {_skipped_text(skipped)})" if skipped else ""))
        return 0
    line(f"{'NAME':<20} {'NODES':>5} {'MEMORY':>18} {'CLIENTS':>8} {'REGION':<10} {'FRESH':<6} {'SCORE':>5} {'WHERE':<9}  MODELS")
    for f in shown:
        x = f.listing
        clients = f"{x.client_count}/{x.max_clients}" if x.max_clients is not None else str(x.client_count)
        memory = f"{_gb(x.free_bytes)} free/{_gb(x.total_bytes)}"
        models = ", ".join(x.serving) + (f" (wanted: {', '.join(x.wanted)})" if x.wanted else "")
        line(f"{(x.name or '(unnamed)')[:20]:<20} {x.node_count:>5} {memory:>18} {clients:>8} {(x.region or '-')[:10]:<10} "
             f"{freshness(f.published_at, now):<6} {score(x):>5} {f.source:<9}  {models or '-'}")
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
        seen = look(cfg.nostr_relays, nostr=cfg.nostr, lan=cfg.lan)
        found, skipped = seen.found, seen.skipped
        note = (f"; skipped: {_skipped_text(skipped)}" if skipped else "")
        where = " and ".join(w for w, on in (("on Nostr", cfg.nostr), ("on this LAN", cfg.lan)) if on)
        say(f"Discovery: {len(found)} mesh(es) listed {where}{note}")
        joined = _auto_choice(cfg, found, need_member, say)
        if joined is not None or time.monotonic() + interval > deadline:
            break
        say(f"No mesh to join yet: looking again in {interval:g} s (Ctrl-C stops)")  # a client waits for it to be listed
        time.sleep(interval)
    if joined is not None:
        return joined
    what = f"named {cfg.mesh_name!r}" if cfg.mesh_name else "unnamed"
    if need_member and best_for_auto(found, Query(region=cfg.region), cfg.mesh_name, False, time.time()) is not None:
        raise UserError(f"the {what} mesh is listed with its client token only: join it with --auto --client, ask a member for the member "
                        "token, or have the mesh listed with --publish-member-token")
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
        best = best_for_auto(found, query, cfg.mesh_name, need_member, time.time())
    else:
        wanted = Query(model=Path(cfg.models[0]).stem, region=cfg.region) if cfg.models else Query(region=cfg.region)
        now = time.time()
        best = best_for_auto(found, wanted, cfg.mesh_name, need_member, now) or best_for_auto(found, Query(region=cfg.region), cfg.mesh_name,
                                                                                             need_member, now)
    if best is None:
        return None
    x = best.listing
    via = {"lan": "on this LAN", "nostr": "on Nostr", "nostr+lan": "on this LAN and Nostr"}.get(best.source, best.source)
    say(f"Joining {_describe(x)}, listed {via} ({x.node_count} node(s), {_gb(x.total_bytes)}, serving {', '.join(x.serving) or 'nothing yet'})")
    # A member that joined through a listing with the member token lists it the same way (the
    # mesh's publishers chose to share it): else its client-token listing would hide that one.
    return replace(cfg, join=[x.token], publish_member_token=cfg.publish_member_token or (x.token_kind == "member" and not cfg.client))


def auto_wait_secs() -> float:
    """How long `--auto --client` keeps looking for a mesh to be listed (the original: 20 × 15 s)."""
    try:
        return max(0.0, min(3600.0, float(os.environ.get(AUTO_WAIT_ENV, "") or AUTO_WAIT_SECS)))
    except ValueError:
        return AUTO_WAIT_SECS


def _describe(x: Listing) -> str:
    return f"mesh {x.name!r}" if x.name else f"mesh {x.mesh_id[:8]}"


def start_publisher(cfg: NodeConfig, status: Callable[[], dict[str, Any]], member_token: str, client_token: str,
                    say: Callable[[str], None], warn: Callable[[str], None],
                    on_listing: Callable[[Listing | None], Awaitable[None]] | None = None) -> Publisher:
    """The node's publisher: its listing from the node's own status, delisted at --max-clients;
    each round's listing also goes to `on_listing` (the LAN announcer)."""
    from mesh_llm.discovery.nostr import Publisher, load_or_create_nostr_keys

    publisher: Publisher

    def current() -> Listing | None:
        listing = listing_from_status(status(), token=member_token if cfg.publish_member_token else client_token, version=__version__,
                                      name=cfg.mesh_name, region=cfg.region, max_clients=cfg.max_clients)
        if listing.full:
            publisher.delisted_reason = f"{listing.client_count} client(s), --max-clients {cfg.max_clients}"
            return None
        return listing

    publisher = Publisher(load_or_create_nostr_keys(cfg.state_dir), cfg.nostr_relays if cfg.nostr else None, current, say, warn,
                          on_listing=on_listing)
    publisher.start()
    if not cfg.nostr:
        say(f"Listing the mesh on this LAN only (--no-nostr; {'member' if cfg.publish_member_token else 'client'} token)")
    return publisher
