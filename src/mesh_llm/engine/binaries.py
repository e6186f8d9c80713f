"""Finding the engine binaries: --bin-dir, $MESH_LLM_BIN_DIR, PATH, then our build cache.

Both binaries must come from the same directory: the RPC handshake rejects
a worker built from a different llama.cpp version than the host.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from mesh_llm.errors import UserError

SERVER_NAME = "llama-server"
RPC_NAMES = ("ggml-rpc-server", "rpc-server")  # newer trees renamed the worker
BIN_DIR_ENV = "MESH_LLM_BIN_DIR"


@dataclass(frozen=True)
class EngineBinaries:
    llama_server: Path
    rpc_server: Path
    origin: str  # where they were found: --bin-dir, env, PATH, cache

    def version(self) -> str:
        """First version line of `llama-server --version` (e.g. `version: 11434 (abc)`)."""
        try:
            out = subprocess.run([str(self.llama_server), "--version"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unknown ({exc})"
        for line in (out.stdout + out.stderr).splitlines():
            if line.startswith("version:"):
                return line.removeprefix("version:").strip()
        return "unknown"


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def binaries_in(directory: Path, origin: str) -> EngineBinaries | None:
    server = directory / SERVER_NAME
    if not _executable(server):
        return None
    for name in RPC_NAMES:
        rpc = directory / name
        if _executable(rpc):
            return EngineBinaries(server, rpc, origin)
    return None


def find_engine(bin_dir: Path | None, cache_bin_dir: Path | None) -> EngineBinaries | None:
    """The binaries to use, or None when nothing is installed (the caller builds)."""
    if bin_dir is not None:
        found = binaries_in(bin_dir.expanduser(), "--bin-dir")
        if found is None:
            raise UserError(f"--bin-dir {bin_dir} lacks {SERVER_NAME} and {RPC_NAMES[0]} (or {RPC_NAMES[1]}): point it at a llama.cpp build's bin folder built with -DGGML_RPC=ON")
        return found
    env_dir = os.environ.get(BIN_DIR_ENV)
    if env_dir:
        found = binaries_in(Path(env_dir).expanduser(), BIN_DIR_ENV)
        if found is None:
            raise UserError(f"{BIN_DIR_ENV}={env_dir} lacks {SERVER_NAME} and {RPC_NAMES[0]}: fix or unset it")
        return found
    on_path = shutil.which(SERVER_NAME)
    if on_path:
        found = binaries_in(Path(on_path).resolve().parent, "PATH")
        if found is not None:
            return found
    if cache_bin_dir is not None:
        return binaries_in(cache_bin_dir, "cache")
    return None
