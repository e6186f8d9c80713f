"""Where mesh-llm keeps its state (logs, keys) and caches (engine builds, models)."""

import os
from pathlib import Path

from platformdirs import user_cache_path, user_state_path

APP = "mesh-llm"


def cache_dir() -> Path:
    """Per-user cache: engine builds and assembled model files.

    `MESH_LLM_CACHE_DIR` overrides it (tests, shared build caches).
    """
    override = os.environ.get("MESH_LLM_CACHE_DIR")
    return Path(override) if override else user_cache_path(APP)


def default_state_dir() -> Path:
    """Per-user state: process logs, node identity."""
    override = os.environ.get("MESH_LLM_STATE_DIR")
    return Path(override) if override else user_state_path(APP)
