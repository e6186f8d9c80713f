"""Which model a request names, and which of its servers answers it (pure)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mesh_llm.models.catalog import match, match_names, model_id

SESSION_HEADERS = ("x-session-id", "x-mesh-session")  # what agents that keep a conversation may send


def request_doc(body: bytes) -> dict[str, Any]:
    """The JSON object of a request body ({} when it is none)."""
    if not body:
        return {}
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def requested_model(doc: dict[str, Any]) -> str | None:
    """The `model` field of a request, if any."""
    model = doc.get("model")
    return model if isinstance(model, str) and model else None


def session_of(doc: dict[str, Any], headers: Mapping[str, str]) -> str | None:
    """What ties a request to a conversation: a session header, OpenAI's `user`, or
    Anthropic's `metadata.user_id`. None: a request of its own."""
    for name in SESSION_HEADERS:
        if headers.get(name):
            return f"h:{headers[name][:256]}"
    user = doc.get("user")
    if isinstance(user, str) and user:
        return f"u:{user[:256]}"
    meta = doc.get("metadata")
    if isinstance(meta, dict) and isinstance(meta.get("user_id"), str) and meta["user_id"]:
        return f"u:{meta['user_id'][:256]}"
    return None


@dataclass(frozen=True)
class Match:
    model: str | None  # the served model meant, or None
    candidates: tuple[str, ...] = ()  # when the name fits several


def match_model(requested: str | None, served: Mapping[str, Sequence[str]]) -> Match:
    """The served model a request's `model` names. `served`: id -> other names it answers to
    (the names it was started with). No name: the first model. A name matches its id exactly,
    then loosely as catalog names do (`gemma-3-270m` → `gemma-3-270m-q4_k_m`), then through the
    catalog (a catalog name whose file is served). Several loose matches: ambiguous."""
    if not served:
        return Match(None)
    if requested is None:
        return Match(next(iter(served)))
    if requested in served:
        return Match(requested)
    hits = match_names(requested, [(m, (m, *aliases)) for m, aliases in served.items()])
    if not hits:
        hits = [m for m in dict.fromkeys(model_id(e.file) for e in match(requested)) if m in served]
    if len(hits) == 1:
        return Match(hits[0])
    return Match(None, tuple(hits))


@dataclass(frozen=True)
class ServerView:
    """One server of a model, as the chooser sees it."""

    id: str  # "local" for this node's own llama-server, else the peer's id
    ready: bool
    in_flight: int = 0  # requests running there now as this node counts them (for its own server, peers' too)
    rtt_ms: float | None = None  # None: not measured yet; 0 for this node
    node: str = ""  # the node it runs on (this node's own id for "local"): what conversations hash to


def choose_server(servers: Sequence[ServerView], session: str | None = None) -> ServerView | None:
    """The server for a new request. A conversation goes where its session hashes among the
    ready servers (rendezvous hashing over node ids: every node it enters by picks the same one,
    so its prompt cache stays warm; when that server is full or gone, the next by hash takes it,
    and only its own conversations move). A request of its own: fewest requests in flight, then
    lowest RTT."""
    ready = [s for s in servers if s.ready]
    if not ready:
        return None
    if session is not None:
        return max(ready, key=lambda s: affinity(session, s.node or s.id))
    return min(ready, key=lambda s: (s.in_flight, s.rtt_ms is None, s.rtt_ms or 0.0, s.id))


def affinity(session: str, node: str) -> bytes:
    """Rendezvous hashing: the highest score among the ready nodes takes the conversation."""
    return hashlib.blake2b(f"{session}\0{node}".encode(), digest_size=8).digest()
