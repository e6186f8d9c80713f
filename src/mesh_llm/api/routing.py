"""Which upstream answers a request (pure)."""

from __future__ import annotations

import json


def requested_model(body: bytes) -> str | None:
    """The `model` field of a JSON request body, if any."""
    if not body:
        return None
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    model = doc.get("model") if isinstance(doc, dict) else None
    return model if isinstance(model, str) and model else None


def pick_model(requested: str | None, available: list[str]) -> str | None:
    """The served model a request goes to, or None when it names one nobody serves.

    No `model` field: the first served model (solo nodes serve one).
    Matching forgives case and a trailing `.gguf`.
    """
    if not available:
        return None
    if requested is None:
        return available[0]
    if requested in available:
        return requested
    want = requested.lower().removesuffix(".gguf")
    for name in available:
        if name.lower() == want:
            return name
    return None


def choose_servers(local_models: set[str], served_by: dict[str, list[tuple[str, float | None]]], current: dict[str, str] | None = None) -> dict[str, str]:
    """For each model served elsewhere in the mesh (and not here), the peer to send it to.

    `served_by` maps a model to (peer id, measured RTT in ms or None) pairs.
    A current route is kept while its peer still serves the model (RTT jitter
    must not move traffic). Otherwise the lowest known RTT wins; ties and
    unknown RTTs fall back to the peer id.
    """
    current = current or {}
    out: dict[str, str] = {}
    for model, servers in served_by.items():
        if model in local_models or not servers:
            continue
        if current.get(model) in {peer for peer, _ in servers}:
            out[model] = current[model]
            continue
        best = min(servers, key=lambda s: (s[1] is None, s[1] if s[1] is not None else 0.0, s[0]))
        out[model] = best[0]
    return out
