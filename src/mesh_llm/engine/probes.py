"""Small I/O helpers for engine processes: free loopback ports and the HTTP health probe."""

from __future__ import annotations

import socket

import aiohttp


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HealthProbe:
    """GET /health on a local llama-server over one reused client session."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self) -> bool:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2), connector=aiohttp.TCPConnector(force_close=True))
        async with self._session.get(self.url) as r:
            return r.status == 200

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
