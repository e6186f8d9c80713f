"""Helpers shared by the bench scripts (run as `python bench/NAME.py`, so this folder is on sys.path)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import aiohttp


async def invite_token(log: Path, timeout: float = 60) -> str:
    """The invite token a node printed into its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text() if log.exists() else ""
        if "Invite token: " in text:
            return text.split("Invite token: ", 1)[1].split()[0]
        await asyncio.sleep(0.1)
    raise SystemExit(f"no invite token in {log}")


def served(status: dict) -> dict:
    """The node's own view of the (first) model it serves, from /api/status; {} when none."""
    return (status.get("serving") or [{}])[0]


def serving_ready(status: dict) -> bool:
    return served(status).get("state") == "ready"


async def wait_http(url: str, proc: subprocess.Popen, timeout: float = 600, ok=lambda doc: True) -> dict:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"{proc.args[0]} exited with {proc.returncode}")
            try:
                async with s.get(url, timeout=aiohttp.ClientTimeout(total=3)) as r:
                    if r.status == 200:
                        doc = await r.json()
                        if ok(doc):
                            return doc
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.3)
    raise SystemExit(f"{url} not ready in {timeout}s")


async def tunnel_rtt_ms(base: str, injected_ms: float) -> tuple[float, float]:
    """The fastest and the median blocking round trip the host's RPC tunnels timed (ms),
    checked against the injected delay. The fastest is the wire; the median also holds the
    worker's compute that a blocking answer waits for.

    Exits instead of returning when the delay did not take effect: figures measured
    without it would be quoted as if they had it."""
    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/api/status") as r:
            traffic = served(await r.json()).get("rpc_traffic") or {}
    rtts = [t.get("rtt_ms") for t in traffic.values()]
    if not rtts or None in rtts:
        raise SystemExit(f"{base}: the host's RPC tunnels timed no round trips; not printing figures")
    fastest = min(r["min"] for r in rtts)
    if fastest < injected_ms:
        raise SystemExit(f"{base}: {injected_ms:g} ms injected, but the fastest round trip through the tunnel took {fastest:.2f} ms: "
                         "the delay did not take effect; not printing figures")
    return fastest, max(r["median"] for r in rtts)
