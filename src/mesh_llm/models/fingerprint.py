"""Is a peer's GGUF the very same model as ours? A cheap, reliable fingerprint.

sha256 over the file size, the whole header (metadata and tensor index, up to
the data section) and 64 KiB samples at 16 evenly spaced places in the data.
The header pins architecture, tokenizer, names, shapes and types; the samples
tell apart files that share a header but not weights (two fine-tunes of one
base, a truncated or corrupted download). It reads well under 2 MB for any
model and is cached by (path, size, mtime).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mesh_llm.files import SHARED_READ, write_private
from mesh_llm.models.gguf_file import GGUFInfo

SAMPLES = 16
SAMPLE_BYTES = 64 * 1024


def fingerprint(info: GGUFInfo) -> str:
    digest = hashlib.sha256()
    digest.update(info.file_size.to_bytes(8, "little"))
    with info.path.open("rb") as f:
        digest.update(f.read(info.data_offset))
        span = max(0, info.file_size - info.data_offset - SAMPLE_BYTES)
        for i in range(SAMPLES):
            f.seek(info.data_offset + span * i // max(1, SAMPLES - 1))
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()[:32]


def cached_fingerprint(info: GGUFInfo, cache_file: Path) -> str:
    st = info.path.stat()
    key = f"{info.path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        cache = json.loads(cache_file.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache.get(key), str):
        return cache[key]
    value = fingerprint(info)
    cache[key] = value
    try:
        write_private(cache_file, json.dumps(cache), SHARED_READ)
    except OSError:
        pass  # a cache we cannot write only costs a re-read next time
    return value
