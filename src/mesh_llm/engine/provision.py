"""Getting a usable engine: found binaries first, else our cached build, else build it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from rich.console import Console

from mesh_llm.engine.binaries import EngineBinaries, find_engine
from mesh_llm.engine.build import build_engine, engine_dir
from mesh_llm.engine.flavor import detect_toolchains, pick_flavor
from mesh_llm.errors import UserError
from mesh_llm.plan.capacity import parse_device_memory


def provide_engine(bin_dir: Path | None, flavor: str | None, console: Console, *, allow_build: bool = True) -> EngineBinaries:
    chosen = pick_flavor(flavor, detect_toolchains())
    cached = engine_dir(chosen)
    found = find_engine(bin_dir, cached.bin_dir if cached.is_built() else None)
    if found is not None:
        return found
    if not allow_build:
        raise UserError("no llama.cpp engine found: run `mesh-llm engine build` or pass --bin-dir")
    edir = build_engine(chosen, console=console)
    found = find_engine(None, edir.bin_dir)
    if found is None:
        raise UserError(f"the engine build finished but {edir.bin_dir} lacks the binaries; see {edir.log}")
    return found


def device_listing(llama_server: Path) -> str:
    """`llama-server --list-devices` output: GPU names with total and free MiB."""
    try:
        out = subprocess.run([str(llama_server), "--list-devices"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"cannot run {llama_server}: {exc}; rebuild with `mesh-llm engine build --force` or fix --bin-dir") from None
    return out.stdout + out.stderr


def list_devices(llama_server: Path) -> list[str]:
    """Devices llama.cpp can offload to (empty for a CPU-only build)."""
    return [d.name for d in parse_device_memory(device_listing(llama_server))]
