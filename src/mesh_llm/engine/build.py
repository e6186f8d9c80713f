"""Build llama-server, the RPC worker and llama-imatrix from the pinned source, once per flavor.

Layout under the cache dir: `engine/llama.cpp-<version>-<flavor>/` holds
`src/` (unpacked tree), `build/` (cmake tree; binaries in `build/bin`),
`build.log` and `engine.json` (written last, so it marks a finished build).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mesh_llm.engine.flavor import FLAVORS
from mesh_llm.engine.source import LLAMA_CPP, extract_tree, fetch_sdist
from mesh_llm.errors import UserError
from mesh_llm.files import SHARED_READ, write_private
from mesh_llm.paths import cache_dir

TARGETS = ["llama-server", "ggml-rpc-server", "llama-imatrix"]  # llama-imatrix: expert routing counts for the MoE ranking (models/expert_rank.py)

# Offline-safe, self-contained binaries: no UI download, static libs, RPC on.
BASE_CMAKE_ARGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_RPC=ON",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
]

_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]")
_MAKE_PERCENT = re.compile(r"^\[\s*(\d+)%\]")


@dataclass(frozen=True)
class EngineDir:
    root: Path

    @property
    def bin_dir(self) -> Path:
        return self.root / "build" / "bin"

    @property
    def log(self) -> Path:
        return self.root / "build.log"

    @property
    def stamp(self) -> Path:
        return self.root / "engine.json"

    def is_built(self) -> bool:
        """Finished, and built from the current tree (a new patch means a rebuild)."""
        if not (self.stamp.is_file() and all((self.bin_dir / t).is_file() for t in TARGETS)):
            return False
        try:
            return json.loads(self.stamp.read_text()).get("tree") == LLAMA_CPP.tree_id()
        except (OSError, ValueError):
            return False


def engine_dir(flavor: str) -> EngineDir:
    # Named by the llama.cpp build only: a new patch level rebuilds in place, incrementally.
    return EngineDir(cache_dir() / "engine" / f"llama.cpp-{LLAMA_CPP.build}-{flavor}")


def cmake_configure_args(src: Path, build: Path, flavor: str, generator: str | None) -> list[str]:
    args = ["cmake", "-S", str(src), "-B", str(build)]
    if generator:
        args += ["-G", generator]
    return args + BASE_CMAKE_ARGS + FLAVORS[flavor]


def cmake_build_args(build: Path, jobs: int) -> list[str]:
    return ["cmake", "--build", str(build), "--target", *TARGETS, "-j", str(jobs)]


def parse_progress(line: str) -> tuple[int, int] | None:
    """(done, total) from a ninja `[12/213]` or make `[ 45%]` line."""
    if m := _NINJA_STEP.match(line):
        return int(m.group(1)), int(m.group(2))
    if m := _MAKE_PERCENT.match(line):
        return int(m.group(1)), 100
    return None


def build_engine(flavor: str, *, force: bool = False, console: Console | None = None) -> EngineDir:
    """Build (or reuse) the engine for `flavor`; returns its directory."""
    console = console or Console(stderr=True, soft_wrap=True)
    edir = engine_dir(flavor)
    if edir.is_built() and not force:
        return edir
    if shutil.which("cmake") is None:
        raise UserError("cmake is not installed: install cmake and a C++ compiler (e.g. apt install cmake g++), or pass --bin-dir")
    edir.root.mkdir(parents=True, exist_ok=True)
    sdist = fetch_sdist(LLAMA_CPP, cache_dir() / "downloads")
    src = extract_tree(sdist, LLAMA_CPP, edir.root / "src")
    build = edir.root / "build"
    if force and build.exists():
        shutil.rmtree(build)
    generator = "Ninja" if shutil.which("ninja") else None
    console.print(f"Building llama.cpp {LLAMA_CPP.engine_version} ({flavor}) — this takes a while once; log: {edir.log}")
    with edir.log.open("w") as log:
        _run_logged(cmake_configure_args(src, build, flavor, generator), log, edir, "configure", console)
        _run_logged(cmake_build_args(build, os.cpu_count() or 2), log, edir, "compile", console)
    write_private(edir.stamp, json.dumps({"version": LLAMA_CPP.engine_version, "flavor": flavor, "tree": LLAMA_CPP.tree_id()}) + "\n", SHARED_READ)
    console.print(f"Engine ready: {edir.bin_dir}")
    return edir


def _run_logged(argv: list[str], log: TextIO, edir: EngineDir, step: str, console: Console) -> None:
    log.write("$ " + " ".join(argv) + "\n")
    log.flush()
    columns = [TextColumn(f"[bold]llama.cpp {step}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    last_line = ""
    reported = -1  # without a terminal (CI, logs) print a plain line every 10 %
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(step, total=None)
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace")
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if line.strip():
                last_line = line.strip()
            if (p := parse_progress(line)) is not None:
                bar.update(task, completed=p[0], total=p[1])
                tenth = p[0] * 10 // max(1, p[1])
                if not console.is_terminal and tenth > reported:
                    reported = tenth
                    console.print(f"llama.cpp {step}: {p[0]}/{p[1]}")
        code = proc.wait()
    log.flush()
    if code != 0:
        raise UserError(f"engine {step} failed (exit {code}): {last_line[:200]} — full log: {edir.log}")
