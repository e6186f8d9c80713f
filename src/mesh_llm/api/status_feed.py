"""Server-sent status events: one message on every change, keep-alives in between.

One task per node rebuilds the status document when something pokes it (a mesh
event, a model changing state) and at least once a second as a safety net; it
publishes only when the document changed. RTTs and last-seen times drift every
heartbeat, so they alone cause a refresh at most every REFRESH_SECS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from mesh_llm.api.proxy import for_caller
from mesh_llm.api.status import stable_view

POLL_SECS = 1.0
REFRESH_SECS = 2.0  # a little over the 1.5 s heartbeat
KEEPALIVE_SECS = 15.0
RETRY_MS = 2000  # how soon a browser reconnects after the node went away


class StatusFeed:
    def __init__(self, build: Callable[[], dict[str, Any]], warn: Callable[[str], None] = lambda line: None) -> None:
        self.build = build
        self.warn = warn
        self.latest: dict[str, Any] = {}
        self._latest_stable: dict[str, Any] = {}
        self.version = 0
        self._changed = asyncio.Event()
        self._poked = asyncio.Event()
        self._closed = asyncio.Event()
        self._published_at = 0.0
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self.latest = self.build()
        self._latest_stable = stable_view(self.latest)
        self._published_at = time.monotonic()
        self._tasks.append(asyncio.ensure_future(self._run()))

    def poke(self) -> None:
        self._poked.set()

    def follow(self, events: asyncio.Queue[Any]) -> None:
        """Poke on every item that arrives on `events` (e.g. a mesh subscription)."""

        async def follow() -> None:
            while True:
                await events.get()
                self.poke()

        self._tasks.append(asyncio.ensure_future(follow()))

    async def close(self) -> None:
        self._closed.set()
        self._changed.set()  # wake every stream so it can end
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._poked.wait(), POLL_SECS)
            self._poked.clear()
            try:
                self.refresh()
            except Exception as exc:  # a bug in one rebuild must not freeze every page for good
                self.warn(f"console status update failed: {exc.__class__.__name__}: {exc}")

    def refresh(self) -> bool:
        """Rebuild the document; publish it if it changed. True when published."""
        doc = self.build()
        stable = stable_view(doc)
        changed = stable != self._latest_stable
        drifted = doc != self.latest and time.monotonic() - self._published_at >= REFRESH_SECS
        if not (changed or drifted):
            return False
        self.latest, self._latest_stable = doc, stable
        self.version += 1
        self._published_at = time.monotonic()
        self._changed.set()
        self._changed = asyncio.Event()
        return True

    async def _next_change(self, seen: int, timeout: float) -> bool:
        """Wait until a version after `seen` exists; False on timeout."""
        if self.version != seen:
            return True
        changed = self._changed
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout)
        return self.version != seen

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """GET /api/events: the current status at once, then every change."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await response.prepare(request)
        seen = -1
        try:
            await response.write(f"retry: {RETRY_MS}\n\n".encode())
            while not self._closed.is_set():
                if await self._next_change(seen, KEEPALIVE_SECS):
                    seen = self.version
                    doc = for_caller(self.latest, request)
                    await response.write(b"event: status\ndata: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n")
                elif not self._closed.is_set():
                    await response.write(b": keep-alive\n\n")
        except (ConnectionError, RuntimeError):  # the browser went away
            pass
        return response
