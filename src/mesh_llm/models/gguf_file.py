"""Fast, validating read of a GGUF file's header and tensor index.

`gguf.GGUFReader` builds numpy views for every metadata array element and
takes about 10 s on Gemma 3 270M (262k-token vocabulary) on this class of
machine; a node start should not wait on that. This scanner walks the same
layout with `struct` over an mmap, keeps scalars and strings, skips array
bodies, and checks that every tensor's bytes are inside the file. Type sizes
come from the `gguf` package so new quantization types are known to it.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeGuard, TypeVar, overload

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from mesh_llm.errors import UserError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 16
MAX_DIMS = 8
MAX_STRING = 1 << 24  # no legitimate key or tensor name is this long
MAX_COUNT = 1_000_000  # tensors or metadata keys; the largest real models have a few thousand
# The smallest encoding of one metadata entry (key length, type, a 1-byte value) and of one
# tensor's index entry (name length, n_dims, type, offset): counts that need more bytes than
# the file has are refused before any loop runs.
_MIN_KV_BYTES, _MIN_TENSOR_BYTES = 8 + 4 + 1, 8 + 4 + 4 + 8
MAX_EXPERTS = 512  # LLAMA_MAX_EXPERTS in the pinned llama.cpp: it loads no model with more
# Architecture numbers that size lists and loops downstream (KV cache per layer, layer
# splits): an integer within these bounds, or absent (then per-layer arrays apply).
ARCH_INT_LIMITS = {
    "block_count": 10_000,
    "context_length": 1 << 32,
    "embedding_length": 1 << 20,
    "attention.head_count": 1 << 16,
    "attention.head_count_kv": 1 << 16,
    "attention.key_length": 1 << 20,
    "attention.value_length": 1 << 20,
    "expert_count": MAX_EXPERTS,
    "expert_used_count": MAX_EXPERTS,
    "expert_group_count": MAX_EXPERTS,
    "expert_group_used_count": MAX_EXPERTS,
}
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # architectures (llama, gemma3, qwen2moe, …) and tokenizer types (gpt2, …)
_NAME_KEYS = ("general.architecture", "tokenizer.ggml.model")

# GGUF metadata value types -> struct format of a scalar (None: variable size)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# arrays other code walks element by element (the draft check reads token texts): their element type is fixed
_ARRAY_ELEMENT_TYPES = {"tokenizer.ggml.tokens": _STRING, "tokenizer.ggml.merges": _STRING}

Scalar = bool | int | float  # what struct reads for a GGUF scalar type
MetaValue = Scalar | str  # a metadata value as kept (array bodies are skipped)
_T = TypeVar("_T")


class GGUFError(ValueError):
    """The file is not a whole, sane GGUF; the message is one line (file-supplied names are quoted)."""


def shown(text: str, limit: int = 60) -> str:
    """A name read from the file, safe to put in a one-line message: quoted, escaped, shortened."""
    quoted = repr(text[:limit] + ("…" if len(text) > limit else ""))
    return quoted.encode("ascii", "backslashreplace").decode()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order (ne0 first)
    ggml_type: int
    offset: int  # relative to the data section
    n_bytes: int


@dataclass
class GGUFInfo:
    path: Path
    version: int
    file_size: int
    data_offset: int
    metadata: dict[str, MetaValue] = field(default_factory=dict)
    array_lengths: dict[str, int] = field(default_factory=dict)
    array_offsets: dict[str, int] = field(default_factory=dict)  # where each array's elements start in the file
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    @overload
    def arch_value(self, key: str) -> MetaValue | None: ...
    @overload
    def arch_value(self, key: str, default: _T) -> MetaValue | _T: ...
    def arch_value(self, key: str, default: object = None) -> object:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def n_layers(self) -> int:
        return int(self.arch_value("block_count", 0))

    @property
    def context_length(self) -> int:
        return int(self.arch_value("context_length", 0))

    # Mixture of experts, as llama.cpp reads it: `<arch>.expert_count` experts per layer,
    # `expert_used_count` picked per token, optionally in `expert_group_count` groups.
    # Absent keys mean a dense model (0).
    @property
    def n_experts(self) -> int:
        return int(self.arch_value("expert_count", 0))

    @property
    def n_experts_used(self) -> int:
        return int(self.arch_value("expert_used_count", 0))

    @property
    def n_expert_groups(self) -> int:
        return int(self.arch_value("expert_group_count", 0))

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def name(self) -> str:
        return str(self.metadata.get("general.name") or self.path.stem)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)


def tensor_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise GGUFError(f"unknown tensor type {ggml_type}") from None
    n = 1
    for d in shape:
        n *= d
    if shape and shape[0] % block:
        raise GGUFError(f"row of {shape[0]} elements is not a multiple of block size {block}")
    return n // block * type_size


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> Scalar:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise GGUFError("file ends inside the header")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = int(self.unpack("<Q"))
        if n > MAX_STRING or self.pos + n > len(self.buf):
            raise GGUFError("string runs past the end of the file")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", "replace")

    def skip_strings(self, count: int) -> None:
        buf, pos, end = self.buf, self.pos, len(self.buf)
        if count > (end - pos) // 8:  # each string takes at least its 8-byte length
            raise GGUFError("file ends inside a string array")
        unpack = struct.unpack_from
        for _ in range(count):
            if pos + 8 > end:
                raise GGUFError("file ends inside a string array")
            (n,) = unpack("<Q", buf, pos)
            pos += 8 + n
        if pos > end:
            raise GGUFError("file ends inside a string array")
        self.pos = pos

    def value(self, vtype: int, key: str, info: GGUFInfo) -> MetaValue | None:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = int(self.unpack("<I"))
            count = int(self.unpack("<Q"))
            if _ARRAY_ELEMENT_TYPES.get(key, etype) != etype:
                raise GGUFError(f"{key} holds elements of type {etype}, not strings")
            info.array_lengths[key] = count
            info.array_offsets[key] = self.pos
            if etype == _STRING:
                self.skip_strings(count)
            elif etype in _SCALARS:
                size = struct.calcsize(_SCALARS[etype]) * count
                if self.pos + size > len(self.buf):
                    raise GGUFError("file ends inside an array")
                self.pos += size
            else:
                raise GGUFError(f"unsupported array element type {etype} for {shown(key)}")
            return None
        raise GGUFError(f"unknown metadata type {vtype} for {shown(key)}")


def read_gguf(path: Path) -> GGUFInfo:
    """Parse and validate; raises GGUFError on anything that is not a whole GGUF file."""
    with path.open("rb") as f:
        size = path.stat().st_size
        if size < 24:
            raise GGUFError("file is too small to be GGUF")
        if f.read(4) != MAGIC:
            raise GGUFError("not a GGUF file (bad magic)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse(path, mm, size)


def _parse(path: Path, mm: mmap.mmap, size: int) -> GGUFInfo:
    cur = _Cursor(mm)
    cur.pos = 4
    version = int(cur.unpack("<I"))
    if version not in (2, 3):
        raise GGUFError(f"unsupported GGUF version {version}")
    n_tensors = int(cur.unpack("<Q"))
    n_kv = int(cur.unpack("<Q"))
    if n_tensors > MAX_COUNT or n_kv > MAX_COUNT or n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_BYTES > size - cur.pos:
        raise GGUFError(f"implausible counts: {n_tensors} tensors and {n_kv} metadata keys in {size} bytes")
    info = GGUFInfo(path=path, version=version, file_size=size, data_offset=0)
    for _ in range(n_kv):
        key = cur.string()
        vtype = int(cur.unpack("<I"))
        value = cur.value(vtype, key, info)
        if value is not None:
            info.metadata[key] = value
    raw_tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = int(cur.unpack("<I"))
        if n_dims > MAX_DIMS:
            raise GGUFError(f"tensor {shown(name)} has {n_dims} dimensions")
        shape = tuple(int(cur.unpack("<Q")) for _ in range(n_dims))
        ggml_type = int(cur.unpack("<I"))
        offset = int(cur.unpack("<Q"))
        raw_tensors.append((name, shape, ggml_type, offset))
    _check_metadata(info)
    alignment = info.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not _is_int(alignment) or not 0 < alignment <= MAX_ALIGNMENT or alignment & (alignment - 1):
        raise GGUFError(f"bad alignment {_as_text(alignment)}: a power of two up to {MAX_ALIGNMENT} is needed")
    info.data_offset = (cur.pos + alignment - 1) // alignment * alignment
    names: set[str] = set()
    for name, shape, ggml_type, offset in raw_tensors:
        if name in names:
            raise GGUFError(f"tensor {shown(name)} is listed twice")
        names.add(name)
        if offset % alignment:
            raise GGUFError(f"tensor {shown(name)} starts at offset {offset}, not a multiple of the alignment {alignment}")
        t = TensorInfo(name, shape, ggml_type, offset, tensor_nbytes(ggml_type, shape))
        if info.data_offset + t.offset + t.n_bytes > size:
            raise GGUFError(f"file is truncated: tensor {shown(name)} ends past the end of the file")
        info.tensors.append(t)
    return info


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_text(value: MetaValue) -> str:
    return shown(value) if isinstance(value, str) else repr(value)


def _check_metadata(info: GGUFInfo) -> None:
    """The values the node computes with have the types and sizes it assumes."""
    for key in _NAME_KEYS:  # printed in start lines and draft-pairing messages: plain names only
        name = info.metadata.get(key, "unknown")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise GGUFError(f"bad {key} {_as_text(name)}")
    arch = info.architecture
    for key, limit in ARCH_INT_LIMITS.items():
        value = info.metadata.get(f"{arch}.{key}")
        if value is not None and not (_is_int(value) and 0 <= value <= limit):
            raise GGUFError(f"{arch}.{key} is {_as_text(value)}: a whole number up to {limit} is needed")
    # llama.cpp asserts this at load; refused here it is one line before anything starts
    experts, used = info.metadata.get(f"{arch}.expert_count", 0), info.metadata.get(f"{arch}.expert_used_count", 0)
    if _is_int(experts) and _is_int(used) and used > experts:
        raise GGUFError(f"{arch}.expert_used_count is {used}, more than its {experts} experts")


def inspect_model(path: Path) -> GGUFInfo:
    """read_gguf with one-line, actionable errors for the CLI."""
    if not path.exists():
        raise UserError(f"model file not found: {path}")
    if not path.is_file():
        raise UserError(f"model path is not a file: {path}")
    try:
        return read_gguf(path)
    except GGUFError as exc:
        raise UserError(f"{path} is not a usable GGUF model: {exc}; re-download it or pass another --model") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
