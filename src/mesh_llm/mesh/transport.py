"""The iroh QUIC endpoint: binding it with the user's relay and port choices."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field, replace

from mesh_llm.errors import UserError
from mesh_llm.mesh import iroh_fastpath
from mesh_llm.mesh.wire import ALPN

iroh = iroh_fastpath.iroh

RELAY_WAIT_SECS = 5.0  # how long start-up waits for a relay address to put in the token


@dataclass
class TransportConfig:
    relays: list[str] = field(default_factory=list)  # empty: iroh's default relays
    no_relay: bool = False  # air-gapped LANs and tests: direct addresses only
    bind_host: str = "0.0.0.0"
    bind_port: int = 0
    preferred_port: int = 0  # with bind_port 0: try this one first (the last run's, so earlier tokens still lead here)

    @staticmethod
    def loopback() -> TransportConfig:
        """One machine, no relays: tests and benches."""
        return TransportConfig(no_relay=True, bind_host="127.0.0.1")

    @property
    def bind_addr(self) -> str:
        host = f"[{self.bind_host}]" if ":" in self.bind_host else self.bind_host
        return f"{host}:{self.bind_port}"


def endpoint_options(cfg: TransportConfig, secret_key: bytes) -> iroh.EndpointOptions:
    if cfg.no_relay:
        preset, mode = iroh.preset_minimal(), None
    elif cfg.relays:
        preset, mode = iroh.preset_n0(), iroh.RelayMode.custom_from_urls(cfg.relays)
    else:
        preset, mode = iroh.preset_n0(), None
    # relay_mode=None is what leaving it out gives: the preset's relays
    return iroh.EndpointOptions(preset=preset, bind_addr=cfg.bind_addr, secret_key=secret_key, alpns=[ALPN], relay_mode=mode)


async def bind_endpoint(cfg: TransportConfig, secret_key: bytes) -> iroh.Endpoint:
    if cfg.bind_port == 0 and cfg.preferred_port:
        try:
            return await bind_endpoint(replace(cfg, bind_port=cfg.preferred_port, preferred_port=0), secret_key)
        except UserError:
            pass  # taken by now: any free port (tokens printed earlier then need a relay to find us)
    iroh_fastpath.install()
    try:
        endpoint = await iroh.Endpoint.bind(endpoint_options(cfg, secret_key))
    except iroh.IrohError as exc:
        hint = "pick another --bind-port" if cfg.bind_port else "check --bind-host"
        raise UserError(f"cannot open the mesh's QUIC socket on {cfg.bind_addr}: {describe(exc)}: {hint}") from None
    if not cfg.no_relay:
        try:
            await asyncio.wait_for(endpoint.online(), RELAY_WAIT_SECS)
        except (TimeoutError, iroh.IrohError):
            pass  # offline or relays blocked: the token carries direct addresses only
    return endpoint


def describe(exc: BaseException) -> str:
    """A readable line for an iroh error (their str() is empty)."""
    if isinstance(exc, iroh.IrohError):
        try:
            text = exc.message()
        except Exception:
            return exc.__class__.__name__
        # Multi-line Rust error chains: keep the headline and the root cause, drop source paths.
        lines = [re.sub(r"\s*\(/[^)]*\.rs:\d+:\d+\)", "", line).strip() for line in text.splitlines()]
        lines = [line for line in lines if line and line != "Caused by:"]
        if not lines:
            return exc.__class__.__name__
        return lines[0] if len(lines) == 1 else f"{lines[0]}: {lines[-1]}"
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return str(exc) or exc.__class__.__name__


def endpoint_addr(peer_id_hex: str, addrs: list[str] | tuple[str, ...], relay: str | None) -> iroh.EndpointAddr:
    return iroh.EndpointAddr(iroh.EndpointId.from_bytes(bytes.fromhex(peer_id_hex)), relay or None, list(addrs))
