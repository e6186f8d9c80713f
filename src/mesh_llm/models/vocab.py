"""Can this draft model speculate for that target? Compares their vocabularies.

The rules are llama.cpp's own (common/speculative.cpp), checked before launch so
a bad pairing gets a clear message instead of a llama-server that fails to
start: same tokenizer type, same BOS/EOS use and ids, vocabulary sizes within
128 tokens, and identical token text from id 5 up to the smaller size.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

from mesh_llm.models.gguf_file import GGUFInfo

MAX_SIZE_DIFFERENCE = 128
FIRST_CHECKED_TOKEN = 5
TOKENS_KEY = "tokenizer.ggml.tokens"
# what llama.cpp assumes when a file does not say whether it adds BOS/EOS
DEFAULT_ADD = {"llama": (True, False), "gpt2": (False, False), "bert": (True, True), "t5": (False, True)}


@dataclass(frozen=True)
class Vocab:
    kind: str  # tokenizer.ggml.model: llama (SentencePiece), gpt2 (BPE), …
    n_tokens: int
    add_bos: bool
    add_eos: bool
    bos: int | None
    eos: int | None


def vocab_of(info: GGUFInfo) -> Vocab:
    m = info.metadata
    kind = str(m.get("tokenizer.ggml.model", ""))
    add_bos, add_eos = DEFAULT_ADD.get(kind, (False, False))
    bos, eos = m.get("tokenizer.ggml.bos_token_id"), m.get("tokenizer.ggml.eos_token_id")
    return Vocab(
        kind=kind,
        n_tokens=info.array_lengths.get(TOKENS_KEY, 0),
        add_bos=bool(m.get("tokenizer.ggml.add_bos_token", add_bos)),
        add_eos=bool(m.get("tokenizer.ggml.add_eos_token", add_eos)),
        bos=int(bos) if isinstance(bos, int) else None,
        eos=int(eos) if isinstance(eos, int) else None,
    )


def vocab_mismatch(target: GGUFInfo, draft: GGUFInfo) -> str | None:
    """Why the draft cannot speculate for the target, or None when it can."""
    t, d = vocab_of(target), vocab_of(draft)
    if not t.n_tokens or not d.n_tokens:
        return "one of the files has no tokenizer"
    if t.kind != d.kind:
        return f"tokenizer types differ ({d.kind or 'none'} vs {t.kind or 'none'})"
    if t.add_bos != d.add_bos or (t.add_bos and t.bos != d.bos):
        return f"BOS tokens differ (draft {_adds(d.add_bos, d.bos)}, target {_adds(t.add_bos, t.bos)})"
    if t.add_eos != d.add_eos or (t.add_eos and t.eos != d.eos):
        return f"EOS tokens differ (draft {_adds(d.add_eos, d.eos)}, target {_adds(t.add_eos, t.eos)})"
    if abs(t.n_tokens - d.n_tokens) > MAX_SIZE_DIFFERENCE:
        return f"vocabulary sizes differ by more than {MAX_SIZE_DIFFERENCE} ({d.n_tokens} vs {t.n_tokens} tokens)"
    upto = min(t.n_tokens, d.n_tokens)
    if _token_bytes(target, FIRST_CHECKED_TOKEN, upto) != _token_bytes(draft, FIRST_CHECKED_TOKEN, upto):
        return "token texts differ"
    return None


def _adds(added: bool, token: int | None) -> str:
    return f"adds token {token}" if added else "adds none"


def _token_bytes(info: GGUFInfo, start: int, stop: int) -> bytes:
    """The raw (length-prefixed) encoding of tokens start..stop-1: equal bytes mean equal token lists."""
    if stop <= start:
        return b""
    with info.path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        pos = info.array_offsets[TOKENS_KEY]
        begin = pos
        for i in range(stop):
            if i == start:
                begin = pos
            (n,) = struct.unpack_from("<Q", mm, pos)
            pos += 8 + n
        return bytes(mm[begin:pos])
