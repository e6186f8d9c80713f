"""Fast byte copies for the `iroh` Python bindings.

The uniffi-generated bindings move every `bytes` argument into a Rust buffer
one byte at a time in Python (about 2 MB/s). We replace the two copy routines
with single `memmove` / `string_at` calls. The patch is tied to the exact
bindings it was written against: if the pinned iroh changes, `install()` raises
instead of silently running slow or corrupting data.
"""

from __future__ import annotations

import ctypes
from importlib import metadata

import iroh
from iroh import iroh_ffi

PINNED_VERSION = "1.2.0"
_installed = False


class FastPathError(RuntimeError):
    pass


def _fast_write(self: iroh_ffi._UniffiRustBufferBuilder, value: bytes | bytearray | memoryview) -> None:
    data = value if isinstance(value, bytes) else bytes(value)  # ctypes passes bytes by pointer, no copy
    n = len(data)
    with self._reserve(n):
        if n:
            ctypes.memmove(ctypes.addressof(self.rbuf.data.contents) + self.rbuf.len, data, n)


def _fast_read(self: iroh_ffi._UniffiRustBufferStream, size: int) -> bytes:
    if size < 0 or self.offset + size > self.len:
        raise iroh_ffi.InternalError("read past end of rust buffer")
    data = ctypes.string_at(ctypes.addressof(self.data.contents) + self.offset, size) if size else b""
    self.offset += size
    return data


def install() -> None:
    """Patch the bindings once; raise FastPathError if they are not the ones we know."""
    global _installed
    if _installed:
        return
    version = metadata.version("iroh")
    if version != PINNED_VERSION:
        raise FastPathError(f"iroh {version} is installed but mesh-llm's byte-copy fast path is written for iroh {PINNED_VERSION}: reinstall mesh-llm's pinned dependencies")
    builder = getattr(iroh_ffi, "_UniffiRustBufferBuilder", None)
    stream = getattr(iroh_ffi, "_UniffiRustBufferStream", None)
    if builder is None or stream is None or not hasattr(builder, "_reserve") or not hasattr(stream, "read"):
        raise FastPathError("the iroh bindings no longer have the buffer routines the fast path replaces")
    builder.write = _fast_write
    stream.read = _fast_read
    _installed = True


def is_installed() -> bool:
    return _installed


__all__ = ["install", "is_installed", "FastPathError", "PINNED_VERSION", "iroh"]
