"""Which experts of an MoE model are used most: measured once with llama-imatrix, then cached.

The pinned llama.cpp's `llama-imatrix` counts, for every `MUL_MAT_ID` (expert) weight, how
many tokens its router sent to each expert, and writes them in its GGUF output as
`blk.<L>.<name>_exps.weight.counts` (F32, one value per expert), next to `imatrix.chunk_count`
and `imatrix.chunk_size` (tokens per chunk). We run it over a short built-in calibration text
(`calibration.txt`: prose, code, lists, numbers, a dialogue), take one expert tensor per layer
(gate, up and down carry identical counts: the same routing feeds all three), sum over layers
and order the experts by count. Per layer the counts add up to chunks × chunk size ×
`expert_used_count`.

Chunking: llama-imatrix refuses a prompt of fewer than two chunks (`-c` tokens each) and
evaluates `min(--chunks, tokens // c)` whole chunks, each from an empty context, dropping the
rest. So the text is repeated to a length no tokenizer makes shorter than two chunks, and
`--chunks` caps the work (6 × 128 tokens; a single copy of our text is about 770 Gemma 3
tokens, so the repeats are only read by tokenizers coarser than that).

The result is cached per model fingerprint in `cache_dir()/moe/<fingerprint[:16]>/ranking.json`;
only a measured ranking is cached, so a failed measurement is retried next time. Any failure
falls back to the sequential order 0..n-1.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from gguf import GGUFReader

from mesh_llm.files import SHARED_READ, write_private
from mesh_llm.models.gguf_file import MAX_EXPERTS, GGUFInfo
from mesh_llm.paths import cache_dir

IMATRIX_NAME = "llama-imatrix"
CHUNK_TOKENS = 128  # imatrix -c: tokens per chunk (a fresh context each); the prompt must hold two
MAX_CHUNKS = 6  # at most this many whole chunks are evaluated: 768 tokens
PROMPT_BYTES = 2 * CHUNK_TOKENS * 16  # two chunks even at 16 bytes a token, far more than tokenizers take
MEASURE_TIMEOUT = 900.0  # seconds for one llama-imatrix run (model load included)
CACHE_FILE_LIMIT = 64 * 1024  # a ranking of 512 experts is well under this
# one expert tensor per layer, in this order of preference; they all see the same routing
_EXPERT_KINDS = ("ffn_down_exps", "ffn_gate_exps", "ffn_up_exps", "ffn_gate_up_exps")
_COUNTS_NAME = re.compile(r"blk\.(\d{1,6})\.(\w+_exps)\.weight\.counts")
_HEX = re.compile(r"[0-9a-f]{16,64}")
_LOG_ERROR = re.compile(r"[\d.]+ E ")  # llama.cpp's log lines: `0.00.017.078 E compute_imatrix: …`
_LOG_PREFIX = re.compile(r"^[\d.]+ [A-Z] ")


@dataclass(frozen=True)
class Ranking:
    order: tuple[int, ...]  # expert ids, most used first (a permutation of 0..n-1)
    counts: tuple[int, ...]  # selections per expert id (index = expert id), summed over layers; all 0 for sequential
    source: str  # "measured" or "sequential"

    def __post_init__(self) -> None:
        n = len(self.order)
        if n > MAX_EXPERTS:
            raise ValueError(f"{n} experts, more than llama.cpp's {MAX_EXPERTS}")
        if sorted(self.order) != list(range(n)):
            raise ValueError("order is not a permutation of the expert ids")
        if len(self.counts) != n or any(c < 0 for c in self.counts):
            raise ValueError("counts must be one non-negative number per expert")
        if self.source not in ("measured", "sequential"):
            raise ValueError(f"unknown ranking source {self.source!r}")

    @property
    def digest(self) -> str:
        return digest_of(self.order)

    @property
    def n_experts(self) -> int:
        return len(self.order)


def digest_of(order: Sequence[int]) -> str:
    """16 hex chars naming an expert order: equal digests mean the same ranking."""
    return hashlib.sha256(("experts:" + ",".join(map(str, order))).encode()).hexdigest()[:16]


def sequential(n_experts: int) -> Ranking:
    """The fallback: experts in id order, no counts."""
    return Ranking(tuple(range(n_experts)), (0,) * n_experts, "sequential")


def rank_from_counts(counts: Sequence[int]) -> Ranking:
    """Most selected first; equal counts keep the lower id first."""
    values = tuple(int(c) for c in counts)
    order = tuple(sorted(range(len(values)), key=lambda e: (-values[e], e)))
    return Ranking(order, values, "measured")


def ranking_path(fingerprint: str) -> Path:
    """Where the ranking of the model with this fingerprint (hex, as `models/fingerprint.py` makes) is cached."""
    if not _HEX.fullmatch(fingerprint):
        raise ValueError(f"not a model fingerprint: {fingerprint[:40]!r}")
    return cache_dir() / "moe" / fingerprint[:16] / "ranking.json"


def cached_ranking(fingerprint: str) -> Ranking | None:
    """The measured ranking cached for this model, or None (absent, unreadable or not sane)."""
    try:
        with ranking_path(fingerprint).open("rb") as f:
            raw = f.read(CACHE_FILE_LIMIT + 1)
        if len(raw) > CACHE_FILE_LIMIT:
            return None
        doc = json.loads(raw)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("source") != "measured":
        return None
    order, counts = doc.get("order"), doc.get("counts")
    if not (isinstance(order, list) and isinstance(counts, list)) or not 0 < len(order) <= MAX_EXPERTS:
        return None
    if not all(type(v) is int for v in order + counts):  # bool and float are not ids or counts
        return None
    try:
        ranking = rank_from_counts(counts)
    except ValueError:
        return None
    # the order must be the one the counts give (so a file cannot pair counts with another order)
    return ranking if list(ranking.order) == order else None


def imatrix_beside(llama_server: Path) -> Path | None:
    """llama-imatrix from the same build as `llama-server`, if it is there (a --bin-dir may lack it)."""
    candidate = llama_server.parent / IMATRIX_NAME
    return candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None


def calibration_text() -> str:
    return resources.files("mesh_llm.models").joinpath("calibration.txt").read_text(encoding="utf-8")


def calibration_prompt() -> str:
    """The text, repeated to at least PROMPT_BYTES: llama-imatrix refuses a prompt of fewer than
    two chunks, and evaluates only the first MAX_CHUNKS whole chunks, so the repeats are read
    only when one copy is shorter than that (our text is, in about 770 tokens of Gemma 3)."""
    text = calibration_text().strip() + "\n\n"
    return text * max(1, -(-PROMPT_BYTES // max(1, len(text.encode()))))


class _Failed(Exception):
    """One line saying why a measurement gave nothing."""


def measure_ranking(
    imatrix: Path, model: Path, info: GGUFInfo, fingerprint: str, say: Callable[[str], None], *, timeout: float = MEASURE_TIMEOUT,
) -> Ranking:
    """Run llama-imatrix on the calibration text and rank the experts by selections; cache a
    success. On any failure: one line why, and the sequential order (not cached)."""
    n = info.n_experts
    if n <= 0:
        raise ValueError(f"{info.name} is not a mixture-of-experts model")
    say(f"Ranking the {n} experts of {info.name} with {IMATRIX_NAME} on the built-in calibration text…")
    started = time.monotonic()
    try:
        counts, tokens = _run_imatrix(imatrix, model, n, time.monotonic() + timeout)
    except _Failed as why:
        say(f"Could not rank the experts of {info.name} ({why}); using the sequential order 0..{n - 1}")
        return sequential(n)
    elapsed = time.monotonic() - started
    ranking = rank_from_counts(counts)
    try:
        write_private(ranking_path(fingerprint), json.dumps(_cache_doc(ranking, tokens)) + "\n", SHARED_READ)
    except (OSError, ValueError) as exc:
        say(f"Could not cache the expert ranking ({getattr(exc, 'strerror', None) or exc}); it will be measured again next time")
    hottest = ", ".join(map(str, ranking.order[:3])) + (", …" if n > 3 else "")
    say(f"Ranked the {n} experts of {info.name} on {tokens} calibration tokens in {elapsed:.1f} s: hottest {hottest}")
    return ranking


def expert_ranking(imatrix: Path | None, model: Path, info: GGUFInfo, fingerprint: str, say: Callable[[str], None]) -> Ranking:
    """The cached ranking, else a fresh measurement, else (no llama-imatrix) the sequential order."""
    n = info.n_experts
    if n <= 0:
        raise ValueError(f"{info.name} is not a mixture-of-experts model")
    cached = cached_ranking(fingerprint)
    if cached is not None and cached.n_experts == n:
        return cached
    if imatrix is None or not imatrix.is_file():
        where = "(`mesh-llm engine build` builds it)" if imatrix is None else f"in {imatrix.parent}"
        say(f"No {IMATRIX_NAME} {where} to rank the experts of {info.name}: using the sequential order 0..{n - 1}")
        return sequential(n)
    return measure_ranking(imatrix, model, info, fingerprint, say)


def _cache_doc(ranking: Ranking, tokens: int) -> dict[str, object]:
    return {"source": ranking.source, "order": list(ranking.order), "counts": list(ranking.counts), "tokens": tokens, "digest": ranking.digest}


def _run_imatrix(imatrix: Path, model: Path, n_experts: int, deadline: float) -> tuple[list[int], int]:
    """Per-expert selections summed over layers, and the tokens evaluated."""
    if not (imatrix.is_file() and os.access(imatrix, os.X_OK)):
        raise _Failed(f"{imatrix} is not an executable file")
    with tempfile.TemporaryDirectory(prefix="mesh-llm-rank-") as tmp:
        text, out = Path(tmp) / "calibration.txt", Path(tmp) / "imatrix.gguf"
        text.write_text(calibration_prompt(), encoding="utf-8")
        failed = _imatrix_once(imatrix, model, text, out, deadline)
        if failed is not None:
            raise _Failed(failed)
        return _read_counts(out, n_experts)


def _imatrix_once(imatrix: Path, model: Path, text: Path, out: Path, deadline: float) -> str | None:
    """None on success, else why not (llama.cpp logs from a thread and may lose its last lines at exit)."""
    argv = [
        str(imatrix), "-m", str(model), "-f", str(text), "-o", str(out), "--output-format", "gguf",
        # all chunks in one batch, each its own sequence of CHUNK_TOKENS; no perplexity; weights on the CPU
        "-c", str(CHUNK_TOKENS), "--chunks", str(MAX_CHUNKS), "-b", str(CHUNK_TOKENS * MAX_CHUNKS), "--no-ppl", "-ngl", "0",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}  # only our flags decide
    try:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
            timeout=max(1.0, deadline - time.monotonic()), env=env,
        )
    except subprocess.TimeoutExpired:
        raise _Failed(f"{IMATRIX_NAME} did not finish in time") from None
    except OSError as exc:
        raise _Failed(f"cannot run {imatrix}: {exc.strerror or exc}") from None
    if done.returncode != 0:
        return _exit_reason(done.returncode, done.stdout or "")
    return None


def _exit_reason(code: int, log: str) -> str:
    """The exit code and the first error line llama.cpp printed (`0.00.017.078 E …`), if it got out."""
    errors = [ln.strip() for ln in log.splitlines() if _LOG_ERROR.match(ln.strip())]
    return f"{IMATRIX_NAME} exited with {code}" + (f": {_LOG_PREFIX.sub('', errors[0])[:200]}" if errors else "")


def _read_counts(out: Path, n_experts: int) -> tuple[list[int], int]:
    try:
        reader = GGUFReader(str(out))
        chunk_count = _scalar(reader, "imatrix.chunk_count")
        chunk_size = _scalar(reader, "imatrix.chunk_size")
        by_layer: dict[int, dict[str, list[float]]] = {}
        for tensor in reader.tensors:
            m = _COUNTS_NAME.fullmatch(tensor.name)
            if m and "shexp" not in m.group(2):
                by_layer.setdefault(int(m.group(1)), {})[m.group(2)] = [float(v) for v in tensor.data.ravel()]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise _Failed(f"unreadable {IMATRIX_NAME} output: {exc}") from None
    totals = [0] * n_experts
    for kinds in by_layer.values():
        kind = next((k for k in _EXPERT_KINDS if k in kinds), min(kinds))
        values = kinds[kind]
        if len(values) != n_experts or not all(math.isfinite(v) and v >= 0 and v == int(v) for v in values):
            raise _Failed(f"{IMATRIX_NAME} counted {len(values)} experts in a layer, not {n_experts}")
        for e, v in enumerate(values):
            totals[e] += int(v)
    if not by_layer or sum(totals) == 0:
        raise _Failed(f"{IMATRIX_NAME} saw no expert selections")
    return totals, chunk_count * chunk_size


def _scalar(reader: GGUFReader, key: str) -> int:
    field = reader.fields[key]
    value = int(field.parts[field.data[0]][0])
    if value < 0:
        raise ValueError(f"{key} is {value}")
    return value
