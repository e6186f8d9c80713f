"""Helpers shared by the bench scripts (run as `python bench/NAME.py`, so this folder is on sys.path)."""

from __future__ import annotations

import asyncio
import subprocess
import time

import aiohttp


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
