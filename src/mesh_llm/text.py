"""Text from elsewhere (peers, file names, aliases) made safe to show on a terminal or page.

Peers are validated on the way in, but output must be safe on its own: local model names
come from file names and --model aliases, which may hold `[/x]` (Rich markup) or escapes.
"""

from __future__ import annotations

import unicodedata

from rich.markup import escape

SHOWN_MAX = 200  # characters of one foreign string on a line; the rest becomes "…"


def is_control(ch: str) -> bool:
    """C0/C1 controls (ESC, BEL, CR …), DEL, format characters (bidi overrides), line/para separators."""
    return unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs")


def printable(text: str, max_len: int = SHOWN_MAX) -> str:
    """`text` without control characters, at most `max_len` characters (cut ones end in "…")."""
    cleaned = "".join(ch if ch not in "\t\n\r" else " " for ch in text if ch in "\t\n\r" or not is_control(ch))
    return cleaned if len(cleaned) <= max_len else cleaned[: max(0, max_len - 1)] + "…"


def terminal_safe(text: str) -> str:
    """A whole line (or lines) for the terminal: every control character but newline removed."""
    return "".join(ch for ch in text if ch == "\n" or not is_control(ch))


def for_markup(text: str, max_len: int = SHOWN_MAX) -> str:
    """`printable(text)` escaped for a Rich string that has markup of its own."""
    return escape(printable(text, max_len))


def is_name(text: str, max_len: int) -> bool:
    """A name a peer may send: non-empty, at most `max_len` characters, nothing a terminal acts on."""
    return 0 < len(text) <= max_len and text.isprintable()
