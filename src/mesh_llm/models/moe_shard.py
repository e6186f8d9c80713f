"""Expert shards of an MoE GGUF (issue 17 step 3): the trunk plus a subset of the experts.

A shard is a standalone GGUF that an ordinary llama-server loads: every tensor that is not a
routed expert (attention, norms, embeddings, output head, shared experts `*_shexp`) copied
byte for byte, and the expert tensors cut down to the kept experts along their expert axis —
the 3-D `ffn_{gate,up,down}_exps` (and the fused `ffn_gate_up_exps`), their biases, the
per-expert `exp_probs_b`, and the router `ffn_gate_inp`, whose rows are the experts, so the
router scores only the experts present and llama.cpp renormalises over them. Metadata is
copied too, with `<arch>.expert_count` set to the kept count (`split.*` keys dropped: a shard
is one file). The kept ids are renumbered 0..k-1 in increasing order of the original ids.

The expert axis is the last ggml dimension, i.e. the slowest-varying one, so each expert's
part of a tensor is one contiguous run of `n_bytes / n_experts` bytes in the file whatever the
quantization type. The builder reads exactly those runs with plain file reads (no mmap: the
peak resident memory is one output tensor, not the model) and writes one tensor at a time
through `gguf.GGUFWriter`, into a temporary file renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from mesh_llm.models.gguf_file import MAX_EXPERTS, GGUFError, GGUFInfo, read_gguf
from mesh_llm.paths import cache_dir

# Substrings of the tensors cut along the expert axis (llama.cpp's LLM_TENSOR_FFN_*_EXPS,
# FFN_EXP_PROBS_B(_VL) and FFN_GATE_INP names, each with any suffix: .weight, .bias, .scale).
EXPERT_MARKERS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_up_exps", "exp_probs_b", "ffn_gate_inp")
SHARED_MARKER = "_shexp"  # shared experts and their gate (ffn_gate_inp_shexp) run for every token: trunk
# Layouts a plain slice would break: grouped "chunk experts" (grovemoe's *_chexps, sized by
# expert groups) and hash routing (deepseek4's ffn_gate_tid2eid holds expert ids, not weights).
UNSHARDABLE_MARKERS = ("_chexps", "tid2eid")
HEADER_ALLOWANCE = 1 << 20  # shard_bytes: metadata (a big vocabulary is a few MB of it) is counted from the source
_READ_CHUNK = 16 << 20
PROGRESS_AFTER_SECS = 2.0
KEEP_SHARDS = 2  # per model file: the one in use and the one before (a node that comes back may want it again)


def is_expert_tensor(name: str) -> bool:
    """Is this tensor sliced along the expert axis in a shard? (Shared experts are trunk.)"""
    return SHARED_MARKER not in name and any(marker in name for marker in EXPERT_MARKERS)


def expert_bytes(info: GGUFInfo) -> tuple[int, int]:
    """(trunk bytes, bytes per expert) of an MoE file: what every shard carries, and what each kept expert adds."""
    n = info.n_experts
    if n <= 0:
        raise ValueError(f"{info.name} is not a mixture-of-experts model")
    trunk = per_expert = 0
    for t in info.tensors:
        if is_expert_tensor(t.name):
            per_expert += t.n_bytes // n
        else:
            trunk += t.n_bytes
    return trunk, per_expert


def shard_bytes(info: GGUFInfo, n_keep: int) -> int:
    """Size of a shard keeping `n_keep` experts: tensors, their alignment padding, and the header (about the source's)."""
    trunk, per_expert = expert_bytes(info)
    alignment = int(info.metadata.get("general.alignment", 32))
    return trunk + n_keep * per_expert + len(info.tensors) * alignment + info.data_offset + HEADER_ALLOWANCE


def shard_digest(keep: Sequence[int]) -> str:
    """16 hex digits naming a set of kept experts (the order of `keep` does not matter)."""
    text = "experts:" + ",".join(str(int(e)) for e in sorted(keep))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def shard_path(fingerprint: str, keep: Sequence[int]) -> Path:
    """Where the shard of this file (fingerprint) keeping these experts is cached. A shard's bytes
    follow from the file and the kept ids alone, so those are the key: whichever ranking chose
    the experts, the same set is the same file (and a new ranking that keeps a node's experts
    rebuilds nothing)."""
    folder = "".join(ch for ch in fingerprint[:16] if ch.isalnum()) or "unknown"
    return cache_dir() / "moe" / folder / f"{shard_digest(keep)}.gguf"


def unshardable(info: GGUFInfo) -> str | None:
    """Why this file's experts cannot be cut into shards (None: they can), from its tensor index."""
    n = info.n_experts
    if n <= 0:
        return "it is not a mixture-of-experts model"
    for t in info.tensors:
        if any(marker in t.name for marker in UNSHARDABLE_MARKERS):
            return f"its tensor {t.name!r} has a layout expert shards cannot cut"
        if is_expert_tensor(t.name) and (not t.shape or t.shape[-1] != n or t.n_bytes % n):
            return f"its tensor {t.name!r} does not have {n} experts on its last axis"
    return None


class ShardCancelled(Exception):
    """The build was called off (the node stopped, or its plan moved on)."""


class _Writer(GGUFWriter):
    """GGUFWriter that can also write an empty metadata array (it refuses them; llama.cpp's own writer does not)."""

    def _pack_val(self, val: Any, vtype: GGUFValueType, add_vtype: bool, sub_type: GGUFValueType | None = None) -> bytes:
        if vtype == GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            return (self._pack("I", vtype) if add_vtype else b"") + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _field_value(field: Any) -> tuple[Any, GGUFValueType, GGUFValueType | None]:
    """A reader field as (value, type, element type) for GGUFWriter.add_key_value; strings stay bytes, unchanged."""
    vtype = field.types[0]
    if vtype == GGUFValueType.STRING:
        return bytes(field.parts[-1]), vtype, None
    if vtype != GGUFValueType.ARRAY:
        return field.parts[-1].tolist()[0], vtype, None
    sub = GGUFValueType(int(field.parts[3][0]))  # parts: key length, key, type, element type, count, elements…
    if sub == GGUFValueType.ARRAY:
        raise ValueError(f"metadata {field.name!r} is an array of arrays, which the shard writer does not copy")
    if sub == GGUFValueType.STRING:
        return [bytes(field.parts[i]) for i in field.data], vtype, sub
    return [field.parts[i].tolist()[0] for i in field.data], vtype, sub


def _scalar(reader: GGUFReader, key: str) -> int | None:
    field = reader.get_field(key)
    if field is None:
        return None
    value, vtype, _ = _field_value(field)
    if vtype == GGUFValueType.ARRAY:  # per-layer counts (llama.cpp allows them for expert_used_count)
        return max(int(v) for v in value) if value else 0
    return int(value)


def _check_keep(keep: Sequence[int], n_experts: int, n_used: int, groups: int) -> list[int]:
    ids = list(keep)
    if any(isinstance(e, bool) or not isinstance(e, (int, np.integer)) for e in ids):
        raise ValueError("expert ids to keep must be whole numbers")
    ids = [int(e) for e in ids]
    repeated = sorted({e for e in ids if ids.count(e) > 1})
    if repeated:
        raise ValueError(f"expert ids to keep must be distinct: {', '.join(map(str, repeated))} given more than once")
    outside = sorted(e for e in ids if not 0 <= e < n_experts)
    if outside:
        raise ValueError(f"expert {outside[0]} is out of range: the model has {n_experts} experts (0-{n_experts - 1})")
    if len(ids) < max(1, n_used):
        raise ValueError(f"keeping {len(ids)} experts is fewer than the {n_used} the model uses per token")
    if groups and (len(ids) <= groups or (groups > 1 and len(ids) % groups)):
        raise ValueError(f"{len(ids)} experts do not divide into the model's {groups} expert groups (llama.cpp would refuse the shard)")
    return sorted(ids)


def write_shard(src: Path, dst: Path, keep: Sequence[int], progress: Callable[[int, int], None] | None = None,
                cancel: threading.Event | None = None) -> None:
    """Write the shard of `src` keeping experts `keep` to `dst` (atomically); progress(done_bytes, total_bytes) per tensor.

    Raises ValueError (one line) for a file that is not an MoE model or cannot be cut this way, and for bad `keep`.
    """
    src, dst = Path(src), Path(dst)
    reader = GGUFReader(src)
    arch_field = reader.get_field("general.architecture")
    if arch_field is None:
        raise ValueError(f"{src.name} has no general.architecture")
    arch = bytes(arch_field.parts[-1]).decode("utf-8", "replace")
    n_experts = _scalar(reader, f"{arch}.expert_count") or 0
    if not 0 < n_experts <= MAX_EXPERTS:
        raise ValueError(f"{src.name} is not a mixture-of-experts model ({arch}.expert_count is {n_experts})")
    n_used = _scalar(reader, f"{arch}.expert_used_count") or 0
    groups = _scalar(reader, f"{arch}.expert_group_count") or 0
    ids = _check_keep(keep, n_experts, n_used, groups)

    plan: list[tuple[Any, bool]] = []  # (reader tensor, sliced?)
    for t in reader.tensors:
        if any(marker in t.name for marker in UNSHARDABLE_MARKERS):
            raise ValueError(f"{src.name} has tensor {t.name!r}, a layout expert shards cannot cut")
        sliced = is_expert_tensor(t.name)
        if sliced and (int(t.shape[-1]) != n_experts or t.n_bytes % n_experts):
            raise ValueError(f"tensor {t.name!r} of {src.name} does not have {n_experts} experts on its last axis")
        plan.append((t, sliced))

    writer = _Writer(None, arch)
    alignment = reader.alignment
    writer.data_alignment = int(alignment)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key.startswith("split."):
            continue
        value, vtype, sub = _field_value(field)
        if key == f"{arch}.expert_count":
            value = len(ids)
        elif key == f"{arch}.expert_used_count":  # unchanged (a shard keeps at least that many), clamped to be sure
            value = [min(int(v), len(ids)) for v in value] if vtype == GGUFValueType.ARRAY else min(int(value), len(ids))
        writer.add_key_value(key, value, vtype, sub)
    total = 0
    for t, sliced in plan:
        shape = ((len(ids),) + tuple(t.data.shape[1:])) if sliced else tuple(t.data.shape)
        n_bytes = t.n_bytes // n_experts * len(ids) if sliced else t.n_bytes
        writer.add_tensor_info(t.name, shape, t.data.dtype, n_bytes, raw_dtype=t.tensor_type)
        total += n_bytes

    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        done = 0
        with src.open("rb") as f:
            for t, sliced in plan:
                if cancel is not None and cancel.is_set():
                    raise ShardCancelled(f"the shard of {src.name} was called off")
                if sliced:
                    per = t.n_bytes // n_experts
                    runs = [(t.data_offset + e * per, per) for e in ids]
                else:
                    runs = [(t.data_offset, t.n_bytes)]
                buf = np.empty(sum(n for _, n in runs), dtype=np.uint8)
                _read_runs(f, runs, buf.data, src)
                shape = ((len(ids),) + tuple(t.data.shape[1:])) if sliced else tuple(t.data.shape)
                writer.write_tensor_data(buf.view(t.data.dtype).reshape(shape))
                done += buf.nbytes
                del buf
                if progress is not None:
                    progress(done, total)
        writer.close()
        os.replace(tmp, dst)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def _read_runs(f: Any, runs: list[tuple[int, int]], out: memoryview, src: Path) -> None:
    pos = 0
    for offset, n in runs:
        f.seek(offset)
        end = pos + n
        while pos < end:
            got = f.readinto(out[pos : min(end, pos + _READ_CHUNK)])
            if not got:
                raise ValueError(f"{src.name} ends inside a tensor: the file is truncated")
            pos += got


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _is_complete_shard(path: Path, n_keep: int) -> bool:
    try:
        return read_gguf(path).n_experts == n_keep
    except (GGUFError, OSError):
        return False


def ensure_shard(src: Path, fingerprint: str, keep: Sequence[int], say: Callable[[str], None],
                 cancel: threading.Event | None = None) -> Path:
    """The cached shard for this file and experts; built first (with progress lines through `say`) if missing."""
    src = Path(src)
    path = shard_path(fingerprint, keep)
    if _is_complete_shard(path, len(keep)):
        os.utime(path)  # recently used: kept when older shards are cleared
        return path
    info = read_gguf(src)
    say(f"Building the expert shard of {info.name}: {len(keep)} of {info.n_experts} experts…")
    started = time.monotonic()
    shown = [0]  # tenths announced so far

    def report(done: int, total: int) -> None:
        tenth = done * 10 // max(1, total)
        if tenth > shown[0] and done < total and time.monotonic() - started >= PROGRESS_AFTER_SECS:  # a quick build needs no progress
            shown[0] = tenth
            say(f"  expert shard of {info.name}: {tenth * 10}% ({_size(done)} of {_size(total)})")

    write_shard(src, path, keep, report, cancel)
    say(f"Built the expert shard of {info.name} in {time.monotonic() - started:.1f} s: {_size(path.stat().st_size)} ({path})")
    clear_old_shards(path.parent, keep_newest=KEEP_SHARDS)
    return path


def clear_old_shards(folder: Path, keep_newest: int) -> None:
    """Shards of one file for other expert sets pile up as plans change: keep the newest few."""
    shards = sorted(folder.glob("*.gguf"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in shards[keep_newest:]:
        old.unlink(missing_ok=True)
