"""Bounds on admission: what an unauthenticated stranger can make a node spend (pure).

Anyone who can reach the UDP port can open connections; until the handshake proves the
mesh secret they get a fixed number of slots, a deadline for the whole admission, a small
HELLO, and a rate-limited line in the log, so a flood costs the node little and the log
stays readable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_PENDING_HANDSHAKES = 32  # unauthenticated connections in admission at once; more are refused at once
ADMISSION_SECS = 10.0  # accept + handshake, the whole of it (not each step)
HELLO_SECS = 3.0  # from the first stream to its HELLO: an honest dialer sends it at once; a silent stranger frees its slot
HELLO_MAX_FRAME = 4096  # the first HELLO frame: {v, mesh, nonce} is ~150 bytes
HANDSHAKE_MAX_FRAME = 256 * 1024  # later handshake frames carry a record (bounded fields: well under this)
REFUSAL_LOG_SECS = 10.0  # at most one log line per kind of refusal this often
LOG_KINDS = 32  # kinds tracked apart (each reason its own); past this they share one allowance


@dataclass
class LogLimiter:
    """At most one line per kind every `every` seconds; the next line let through says how
    many like it were held back. Pure: the caller passes the time."""

    every: float = REFUSAL_LOG_SECS
    max_kinds: int = LOG_KINDS
    _last: dict[str, float] = field(default_factory=dict)
    _held: dict[str, int] = field(default_factory=dict)

    def line(self, kind: str, text: str, now: float) -> str | None:
        """The line to log now, or None to hold it back."""
        if kind not in self._last and len(self._last) >= self.max_kinds:
            kind = "(other)"  # a stranger varying its words must not grow this table or the log
        last = self._last.get(kind)
        if last is not None and now - last < self.every:
            self._held[kind] = self._held.get(kind, 0) + 1
            return None
        self._last[kind] = now
        held = self._held.pop(kind, 0)
        return f"{text} (and {held} more like it since {now - last:.0f} s ago)" if held and last is not None else text
