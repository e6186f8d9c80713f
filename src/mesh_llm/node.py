"""Composition root: builds and runs a node from its config.

Today a node serves its model solo: llama-server on a private loopback port,
supervised, behind the API proxy on :9337.
"""

from __future__ import annotations

import asyncio
import atexit
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from rich.console import Console

from mesh_llm import __version__
from mesh_llm.api.agents import agent_commands
from mesh_llm.api.proxy import ApiProxy, Upstream, UpstreamTable, port_in_use
from mesh_llm.engine.binaries import EngineBinaries
from mesh_llm.engine.llama_server import ServerConfig, choose_ctx, fallback_chat_template, is_embedding_model, server_argv
from mesh_llm.engine.provision import list_devices, provide_engine
from mesh_llm.engine.supervisor import ManagedProcess, ProcessSpec, ProcState, StartFailed, Supervisor
from mesh_llm.errors import UserError
from mesh_llm.models.gguf_file import GGUFInfo, inspect_model
from mesh_llm.models.resolve import resolve_model


@dataclass
class NodeConfig:
    models: list[str] = field(default_factory=list)
    port: int = 9337
    listen_all: bool = False
    bin_dir: Path | None = None
    device: str | None = None
    flavor: str | None = None
    state_dir: Path = Path(".")
    ctx_size: int | None = None

    @property
    def host(self) -> str:
        return "0.0.0.0" if self.listen_all else "127.0.0.1"


@dataclass
class ServedModel:
    model_id: str
    path: Path
    info: GGUFInfo


class LocalServer:
    """This node's llama-server as the proxy sees it: starting until the supervisor hands it over."""

    def __init__(self) -> None:
        self.process: ManagedProcess | None = None

    def status(self) -> str:
        return self.process.state.value if self.process else ProcState.STARTING.value

    def is_ready(self) -> bool:
        return self.status() == ProcState.READY.value


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    """Fail before slow work (engine build, model load) if the API port is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            raise port_in_use(host, port) from None


def prepare_model(ref: str) -> ServedModel:
    path = resolve_model(ref)
    info = inspect_model(path)
    return ServedModel(model_id=path.stem, path=path, info=info)


def run_node(cfg: NodeConfig, console: Console) -> int:
    if not cfg.models:
        raise UserError("nothing to serve: pass --model PATH|NAME (e.g. --model gemma-3-270m)")
    if len(cfg.models) > 1:
        raise UserError("serving several models at once is not supported yet: pass one --model")
    check_port_free(cfg.host, cfg.port)
    model = prepare_model(cfg.models[0])
    engine = provide_engine(cfg.bin_dir, cfg.flavor, console)
    return asyncio.run(_serve(cfg, model, engine, console))


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


async def _serve(cfg: NodeConfig, model: ServedModel, engine: EngineBinaries, console: Console) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    supervisor = Supervisor(report=lambda msg: console.print(f"[yellow]{msg}[/]"))
    atexit.register(supervisor.kill_all_now)  # belt and braces if we die on an exception
    table = UpstreamTable()
    proxy = ApiProxy(table)
    await proxy.start(cfg.host, cfg.port)  # listening early: clients get 503 "loading" rather than refused
    probe: HealthProbe | None = None
    try:
        devices = await asyncio.to_thread(list_devices, engine.llama_server)
        port = free_loopback_port()
        server_cfg = ServerConfig(
            model=model.path,
            alias=model.model_id,
            port=port,
            ctx_size=choose_ctx(cfg.ctx_size, model.info.context_length),
            gpu=bool(devices),
            device=cfg.device,
            chat_template_file=fallback_chat_template(model.info.metadata),
            embeddings=is_embedding_model(model.info.metadata),
        )
        base_url = f"http://127.0.0.1:{port}"
        local = LocalServer()
        table.add(Upstream(model.model_id, base_url, is_ready=local.is_ready, status=local.status))
        probe = HealthProbe(base_url + "/health")
        spec = ProcessSpec(
            name="llama-server",
            argv=server_argv(engine.llama_server, server_cfg),
            log_path=cfg.state_dir / "logs" / "llama-server.log",
            health=probe,
        )
        size_mb = model.info.file_size / 1e6
        with console.status(f"Loading {model.model_id} ({size_mb:,.0f} MB) into llama-server…"):
            start = asyncio.create_task(supervisor.start(spec))
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({start, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if start not in done:
                start.cancel()
                await asyncio.gather(start, return_exceptions=True)
                console.print("Stopped before the model finished loading.")
                return 0
            stopper.cancel()
            try:
                local.process = start.result()
            except StartFailed as exc:
                raise UserError(f"llama-server failed to start: {exc.reason} (log: {exc.log_path})") from None
        print_ready(console, cfg, model, engine, server_cfg.ctx_size)
        await stop.wait()
        console.print("Shutting down…")
        return 0
    finally:
        await proxy.close()
        await supervisor.stop_all()
        if probe is not None:
            await probe.close()


def print_ready(console: Console, cfg: NodeConfig, model: ServedModel, engine: EngineBinaries, ctx: int) -> None:
    shown_host = "localhost" if not cfg.listen_all else "0.0.0.0"
    console.print(f"[bold green]mesh-llm {__version__} ready[/] — serving [bold]{model.model_id}[/] solo ({model.info.architecture}, {model.info.n_layers} layers, context {ctx})")
    console.print(f"API: http://{shown_host}:{cfg.port}/v1   engine: {engine.llama_server.parent} ({engine.origin})")
    commands = agent_commands(model.model_id, cfg.port, ctx)
    for name, text in commands.items():
        if "\n" in text:
            console.print(f"[bold]{name}:[/]")
            console.print(text, markup=False, highlight=False)
        else:
            console.print(f"[bold]{name}:[/] ", end="")
            console.print(text, markup=False, highlight=False)
    console.print(f"Logs: {cfg.state_dir / 'logs'}   Stop: Ctrl-C")
