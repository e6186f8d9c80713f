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
