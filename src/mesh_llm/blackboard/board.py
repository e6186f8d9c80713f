"""The blackboard's state (pure apart from `load` and `save`): items, limits, search, feed, sync.

An item is `{id, text, from, node, time}`: `from` is its author (user@host by default),
`node` the hex id of the node it was posted on, `time` unix seconds there. Its id is the
first 32 hex digits of a SHA-256 over (node, from, time, text), so it is fixed once made
and a receiver can check it: a peer cannot take an id for other content.

Every item, local or from a peer or from the board's own file, passes the same checks:
text non-empty, at most 4096 UTF-8 bytes, no control characters but newline and tab;
author 1-128 printable characters; node 64 hex digits; time no more than SKEW_SECS in the
future and younger than TTL_SECS. The board holds at most MAX_ITEMS (the oldest go) and
at most RATE_PER_WINDOW items of one node within any RATE_WINDOW_SECS before an item's
time. A local post over that gets a retry-after; a peer's item over it is dropped. The
rule looks only at items before the new one, so an honest node's items pass it on every
board, in whatever order they arrive.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh_llm.text import is_control

TTL_SECS = 48 * 3600.0
MAX_ITEMS = 500
MAX_TEXT_BYTES = 4096
MAX_AUTHOR_CHARS = 128
RATE_PER_WINDOW = 10
RATE_WINDOW_SECS = 60.0
SKEW_SECS = 120.0  # a peer's clock may run this far ahead
DEFAULT_LIMIT = 20
FILE_VERSION = 1
MAX_FILE_BYTES = 16 << 20  # 500 items of 4 KB, escaped: well below

_HEX_ID = re.compile(r"[0-9a-f]{32}")
_HEX_NODE = re.compile(r"[0-9a-f]{64}")
FIELDS = frozenset({"id", "text", "from", "node", "time"})


class ItemError(ValueError):
    """An item this board does not take; `status` is the HTTP status a local poster gets."""

    def __init__(self, message: str, status: int = 400, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True)
class Item:
    id: str
    text: str
    author: str
    node: str
    time: float
    sig: str = ""  # the posting node's Ed25519 signature of the id (hex), by the key its node id is

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"id": self.id, "text": self.text, "from": self.author, "node": self.node, "time": self.time}
        return {**doc, "sig": self.sig} if self.sig else doc


def item_id(text: str, author: str, node: str, at: float) -> str:
    material = json.dumps([node, author, at, text], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def text_problem(text: str) -> ItemError | None:
    if not text.strip():
        return ItemError("the text is empty")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_TEXT_BYTES:
        return ItemError(f"the text is {size} bytes; a post holds at most {MAX_TEXT_BYTES} (UTF-8)", 413)
    if any(is_control(ch) for ch in text if ch not in "\n\t"):
        return ItemError("the text holds control characters (only newlines and tabs are allowed)")
    return None


def author_problem(author: str) -> ItemError | None:
    if not 0 < len(author) <= MAX_AUTHOR_CHARS or not author.isprintable() or not author.strip():
        return ItemError(f"'from' must be 1-{MAX_AUTHOR_CHARS} printable characters")
    return None


def parse_item(doc: Any) -> Item:
    """An item document from a peer or a file, checked field by field (not yet for age or rate)."""
    if not isinstance(doc, dict) or set(doc) - {"sig"} != FIELDS:
        raise ItemError("an item is an object with exactly id, text, from, node, time (and sig)")
    sig = doc.get("sig", "")
    if not isinstance(sig, str) or not _HEX_SIG.fullmatch(sig or "0" * 128):
        raise ItemError("'sig' must be 128 lowercase hex digits")
    ident, text, author, node, at = doc["id"], doc["text"], doc["from"], doc["node"], doc["time"]
    if not isinstance(text, str) or (bad := text_problem(text)) is not None:
        raise bad if isinstance(text, str) and bad is not None else ItemError("'text' must be a string")
    if not isinstance(author, str) or (bad := author_problem(author)) is not None:
        raise bad if isinstance(author, str) and bad is not None else ItemError("'from' must be a string")
    if not isinstance(node, str) or not _HEX_NODE.fullmatch(node):
        raise ItemError("'node' must be 64 lowercase hex digits")
    if not isinstance(at, (int, float)) or isinstance(at, bool) or not math.isfinite(at) or at <= 0:
        raise ItemError("'time' must be a positive number of unix seconds")
    at = float(at)
    if not isinstance(ident, str) or not _HEX_ID.fullmatch(ident) or ident != item_id(text, author, node, at):
        raise ItemError("'id' does not match the item's content")
    return Item(ident, text, author, node, at, sig)


_HEX_SIG = re.compile(r"[0-9a-f]{128}")


class Board:
    """`sign(item_id) -> sig` signs this node's posts; `verify(item) -> bool` checks a peer's
    (both None: a board that neither signs nor checks, for tests of its other rules)."""

    def __init__(self, clock: Callable[[], float] = time.time, max_items: int = MAX_ITEMS,
                 sign: Callable[[str], str] | None = None, verify: Callable[[Item], bool] | None = None) -> None:
        self.clock = clock
        self.max_items = max_items
        self.sign, self.verify = sign, verify
        self.items: dict[str, Item] = {}

    # -- adding -------------------------------------------------------------------

    def post(self, text: str, author: str, node: str) -> Item:
        """A new item from this node (text already scrubbed). Raises ItemError: 400, 413, 429."""
        text = text.replace("\r\n", "\n")
        for bad in (text_problem(text), author_problem(author)):
            if bad is not None:
                raise bad
        self.prune()
        now = self.clock()
        latest = max((i.time for i in self.items.values() if i.node == node), default=0.0)
        now = max(now, math.nextafter(latest, math.inf))  # a node's items stay in order even if its clock steps back
        recent = sorted(i.time for i in self._window(node, now))
        if len(recent) >= RATE_PER_WINDOW:
            wait = recent[-RATE_PER_WINDOW] + RATE_WINDOW_SECS - now
            raise ItemError(f"at most {RATE_PER_WINDOW} posts a minute from one node: retry in {math.ceil(wait)} s", 429, max(wait, 0.0))
        ident = item_id(text, author, node, now)
        item = Item(ident, text, author, node, now, self.sign(ident) if self.sign else "")
        self._insert(item)
        return item

    def receive(self, doc: Any) -> Item | None:
        """A peer's item: the new Item if the board took it, None if it already had it or
        drops it (too old, too far ahead, over its node's rate, older than a full board).
        A malformed item raises ItemError."""
        item = parse_item(doc)
        if item.id in self.items:
            return None
        if self.verify is not None and not self.verify(item):
            raise ItemError(f"item {item.id[:12]} is not signed by the node it names ({item.node[:8]})")
        self.prune()
        now = self.clock()
        if item.time > now + SKEW_SECS or item.time <= now - TTL_SECS:
            return None
        if len(self._window(item.node, item.time)) >= RATE_PER_WINDOW:
            return None
        if len(self.items) >= self.max_items and item.time <= min(i.time for i in self.items.values()):
            return None
        self._insert(item)
        return item

    def _window(self, node: str, at: float) -> list[Item]:
        return [i for i in self.items.values() if i.node == node and at - RATE_WINDOW_SECS < i.time < at]

    def _insert(self, item: Item) -> None:
        self.items[item.id] = item
        while len(self.items) > self.max_items:
            oldest = min(self.items.values(), key=lambda i: (i.time, i.id))
            del self.items[oldest.id]

    def prune(self) -> None:
        cutoff = self.clock() - TTL_SECS
        for ident in [i.id for i in self.items.values() if i.time <= cutoff]:
            del self.items[ident]

    # -- reading -------------------------------------------------------------------

    def _selected(self, since_hours: float | None, author: str | None) -> list[Item]:
        self.prune()
        items = list(self.items.values())
        if since_hours is not None:
            cutoff = self.clock() - since_hours * 3600
            items = [i for i in items if i.time > cutoff]
        if author:
            wanted = author.lower()
            items = [i for i in items if wanted in i.author.lower()]
        return items

    def feed(self, since_hours: float | None = None, author: str | None = None, limit: int = DEFAULT_LIMIT) -> list[Item]:
        """Newest first."""
        items = sorted(self._selected(since_hours, author), key=lambda i: (i.time, i.id), reverse=True)
        return items[: clamp_limit(limit)]

    def search(self, query: str, since_hours: float | None = None, author: str | None = None, limit: int = DEFAULT_LIMIT) -> list[Item]:
        """Items with at least one query word (lowercase, whitespace-split) in their text or
        author, as a substring: most words found first, then newest."""
        words = list(dict.fromkeys(query.lower().split()))
        scored = []
        for item in self._selected(since_hours, author):
            haystack = (item.text.lower(), item.author.lower())
            score = sum(1 for w in words if w in haystack[0] or w in haystack[1])
            if score:
                scored.append((score, item))
        scored.sort(key=lambda s: (s[0], s[1].time, s[1].id), reverse=True)
        return [item for _, item in scored[: clamp_limit(limit)]]

    # -- sync -------------------------------------------------------------------

    def ids(self) -> list[str]:
        """Every id held, newest first (at most MAX_ITEMS)."""
        return [i.id for i in self.feed(limit=self.max_items)]

    def missing(self, their_ids: Iterable[str]) -> list[Item]:
        """The items this board holds and a peer with `their_ids` lacks, newest first."""
        theirs = set(their_ids)
        return [i for i in self.feed(limit=self.max_items) if i.id not in theirs]

    # -- the file -------------------------------------------------------------------

    def to_doc(self) -> dict[str, Any]:
        return {"version": FILE_VERSION, "items": [i.to_doc() for i in self.feed(limit=self.max_items)]}

    def save(self, path: Path) -> None:
        write_board(path, self.to_doc())

    def load(self, path: Path, warn: Callable[[str], None]) -> None:
        """Take the items of the board's file, each checked as if a peer had sent it. A file
        that is missing is no board yet; one that is unreadable, too big or not ours starts
        the board empty with one warning; bad items are left out with one warning."""
        try:
            raw = _read_file(path)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            warn(f"blackboard file {path} is not usable ({exc}): starting with an empty board")
            return
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            warn(f"blackboard file {path} is not valid JSON: starting with an empty board")
            return
        items = doc.get("items") if isinstance(doc, dict) and doc.get("version") == FILE_VERSION else None
        if not isinstance(items, list):
            warn(f"blackboard file {path} is not a blackboard (version {FILE_VERSION}): starting with an empty board")
            return
        # oldest first, so the rate rule sees each node's items in the order they were posted
        ordered = sorted(items, key=_time_of)
        bad = 0
        for entry in ordered[: self.max_items * 2]:
            try:
                self.receive(entry)
            except ItemError:
                bad += 1
        bad += max(0, len(ordered) - self.max_items * 2)
        if bad:
            warn(f"blackboard file {path}: left out {bad} malformed item(s)")


def write_board(path: Path, doc: dict[str, Any]) -> None:
    """Write a board's document (Board.to_doc) atomically, readable by this user only."""
    from mesh_llm.files import write_private

    write_private(path, json.dumps(doc, separators=(",", ":"), ensure_ascii=False))


def _time_of(doc: Any) -> float:
    at = doc.get("time") if isinstance(doc, dict) else None
    return float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) and math.isfinite(at) else 0.0


def clamp_limit(limit: int) -> int:
    return max(1, min(int(limit), MAX_ITEMS))


def _read_file(path: Path) -> bytes:
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE_BYTES:
            raise ValueError(f"not a regular file of at most {MAX_FILE_BYTES >> 20} MiB")
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"larger than {MAX_FILE_BYTES >> 20} MiB")
    return data
