"""PII scrubbing for blackboard posts (pure).

`scrub(text)` replaces what should not leave this machine with a marker and says what it
replaced: e-mail addresses, phone numbers, API keys and tokens (common provider prefixes,
bearer tokens, `key=value` secrets, this mesh's own invite tokens and API keys, JWTs),
private key blocks and home-directory paths (the user name goes, the rest of the path stays).

Every pattern starts with a look-behind that only lets a match begin where a run of its
characters begins, so a long text without a hit is scanned in linear time; there are no
nested quantifiers. Phone numbers are the hard case: only shapes that phones have are
taken (a leading +country code, US 3-3-4 groups, national numbers with a leading 0), and
dates, times, versions and IP addresses are left alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

MARKERS = {
    "private-key": "[private-key]",
    "token": "[token]",
    "secret": "[secret]",
    "api-key": "[api-key]",
    "email": "[email]",
    "home-path": "[home-path]",
    "phone": "[phone]",
}

_KEY_CHARS = r"A-Za-z0-9_\-"
_NOT_IN_KEY = rf"(?<![{_KEY_CHARS}])"
_END_KEY = rf"(?![{_KEY_CHARS}])"

_PRIVATE_KEY = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----.*?(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\Z)", re.DOTALL)
# a bearer credential has a digit or symbol in it, or is long: "bearer of bad news" stays
_BEARER = re.compile(r"(?<![A-Za-z])(Bearer)\s+((?=[A-Za-z]*[0-9\-._~+/])[A-Za-z0-9\-._~+/]{8,}=*|[A-Za-z]{20,})", re.IGNORECASE)
_ASSIGNED = re.compile(r"(?<![A-Za-z0-9_])((?:password|passwd|pwd|secret|client_secret|api[_-]?key|access[_-]?token|auth[_-]?token|token)"
                       r"\s*[=:]\s*[\"']?)([^\s\"'&,;]{6,})", re.IGNORECASE)
# Provider prefixes: OpenAI and Anthropic (sk-, sk-ant-), Stripe, GitHub, Slack, AWS, Google,
# Hugging Face, GitLab, npm, PyPI, this mesh's API keys (mlk_, api/keys.py), DigitalOcean, SendGrid.
_API_KEYS = re.compile(_NOT_IN_KEY + r"(?:"
                       r"sk-[A-Za-z0-9_\-]{16,}"
                       r"|(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{10,}"
                       r"|gh[pousr]_[A-Za-z0-9]{20,}"
                       r"|github_pat_[A-Za-z0-9_]{20,}"
                       r"|xox[abprse]-[A-Za-z0-9\-]{10,}"
                       r"|(?:AKIA|ASIA)[0-9A-Z]{16}"
                       r"|AIza[0-9A-Za-z_\-]{30,}"
                       r"|hf_[A-Za-z0-9]{20,}"
                       r"|glpat-[A-Za-z0-9_\-]{20,}"
                       r"|npm_[A-Za-z0-9]{30,}"
                       r"|pypi-[A-Za-z0-9_\-]{40,}"
                       r"|mlk_[A-Za-z0-9_\-]{20,}"
                       r"|dop_v1_[a-f0-9]{40,}"
                       r"|SG\.[A-Za-z0-9_\-]{16,}\.[A-Za-z0-9_\-]{16,}"
                       r")" + _END_KEY)
# Our invite tokens are base64url JSON ({"v":… → "eyJ"); so are the parts of a JWT.
_JSON_TOKEN = re.compile(_NOT_IN_KEY + r"eyJ[A-Za-z0-9_\-]{16,}(?:\.[A-Za-z0-9_\-]*){0,2}" + _END_KEY)
_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9\-]{0,62})(?:\.[A-Za-z0-9\-]{1,63}){0,8}\.[A-Za-z]{2,24}(?![A-Za-z0-9\-])")
_UNIX_HOME = re.compile(r"(?<![A-Za-z0-9_.\-/])/(?:home|Users)/(?!\[)[^/\s\"'<>|:;,]+")
_WINDOWS_HOME = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]:\\{1,2}Users\\{1,2}[^\\\s\"'<>|:;,]+", re.IGNORECASE)
_TILDE_USER = re.compile(r"(?<![A-Za-z0-9_~])~[A-Za-z_][A-Za-z0-9_.\-]{0,31}(?=/)")

_PHONE_BEFORE = r"(?<![\w.+/:@\-])"
_PHONE_AFTER = r"(?![\w@]|[.:/\-]\d)"
_PHONES = [
    # +CC then groups, each led by a separator or in parentheses: +1 (555) 123-4567, +44 20 7946 0958, +49 (0)30 1234567
    re.compile(_PHONE_BEFORE + r"\+\d{1,3}(?:[ .\-]\d{1,8}|[ .\-]?\(\d{1,5}\)|(?<=\))\d{1,5}){1,6}" + _PHONE_AFTER),
    re.compile(_PHONE_BEFORE + r"\+\d{8,15}" + _PHONE_AFTER),  # +4915112345678
    # US: (555) 123-4567, 555-123-4567, 555.123.4567, 555 123 4567, 1-800-555-1234
    re.compile(_PHONE_BEFORE + r"(?:1[ .\-])?(?:\(\d{3}\) ?\d{3}[ .\-]\d{4}|\d{3}([ .\-])\d{3}\1\d{4})" + _PHONE_AFTER),
    # national numbers with a leading 0: 030 1234567, 020 7946 0958, 0171/1234567, 06 12 34 56 78, 06.12.34.56.78, 07700900123
    re.compile(_PHONE_BEFORE + r"0\d{1,4}(?:[ /\-]\d{2,8}){1,4}" + _PHONE_AFTER),
    re.compile(_PHONE_BEFORE + r"0\d(?:\.\d{2}){4}" + _PHONE_AFTER),
    re.compile(_PHONE_BEFORE + r"0[1-9]\d{8,9}" + _PHONE_AFTER),
]
_DATE = re.compile(r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}")


def _phone_digits_ok(found: str) -> bool:
    digits = sum(ch.isdigit() for ch in found)
    if found.startswith("+"):
        return 8 <= digits <= 15
    return 9 <= digits <= 13 and not _DATE.fullmatch(found)


@dataclass
class _Counter:
    counts: dict[str, int]

    def replace(self, kind: str, keep_prefix: Callable[[re.Match[str]], str] | None = None,
                check: Callable[[str], bool] | None = None) -> Callable[[re.Match[str]], str]:
        def sub(m: re.Match[str]) -> str:
            if check is not None and not check(m.group(0)):
                return m.group(0)
            self.counts[kind] = self.counts.get(kind, 0) + 1
            return (keep_prefix(m) if keep_prefix else "") + MARKERS[kind]
        return sub


def scrub(text: str) -> tuple[str, list[tuple[str, int]]]:
    """`text` with PII replaced by markers, and what was replaced: [(kind, count), …] in a fixed order."""
    c = _Counter({})
    text = _PRIVATE_KEY.sub(c.replace("private-key"), text)
    text = _API_KEYS.sub(c.replace("api-key"), text)
    text = _BEARER.sub(c.replace("token", lambda m: m.group(1) + " "), text)
    text = _JSON_TOKEN.sub(c.replace("token"), text)
    text = _ASSIGNED.sub(c.replace("secret", lambda m: m.group(1), check=lambda s: not _is_marker_value(s)), text)
    text = _EMAIL.sub(c.replace("email"), text)
    text = _UNIX_HOME.sub(c.replace("home-path"), text)
    text = _WINDOWS_HOME.sub(c.replace("home-path"), text)
    text = _TILDE_USER.sub(c.replace("home-path"), text)
    for pattern in _PHONES:
        text = pattern.sub(c.replace("phone", check=_phone_digits_ok), text)
    return text, [(kind, c.counts[kind]) for kind in MARKERS if kind in c.counts]


def _is_marker_value(assignment: str) -> bool:
    """`token=[api-key]` after an earlier pattern: already replaced, not counted twice."""
    value = re.split(r"[=:]\s*[\"']?", assignment, maxsplit=1)[-1]
    return value.startswith("[") and value.rstrip("]") + "]" in MARKERS.values()


def describe(found: list[tuple[str, int]]) -> str:
    """'1 email, 2 api keys' for what `scrub` reported."""
    return ", ".join(f"{n} {kind.replace('-', ' ')}{'s' if n != 1 else ''}" for kind, n in found)
