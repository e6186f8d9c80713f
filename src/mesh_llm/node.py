"""Composition root: builds and runs a node from its config.

A node joins (or starts) a mesh, serves its model with llama-server on a
private loopback port, supervised, and answers on :9337 for every model the
mesh serves: local ones directly, the others through QUIC tunnels.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from rich.console import Console

from mesh_llm import __version__
from mesh_llm.api.agents import agent_commands
from mesh_llm.api.proxy import ApiProxy, Upstream, UpstreamTable, port_in_use
from mesh_llm.api.remote import RemoteModels
from mesh_llm.engine.binaries import EngineBinaries
from mesh_llm.engine.llama_server import ServerConfig, choose_ctx, fallback_chat_template, is_embedding_model, server_argv
from mesh_llm.engine.provision import list_devices, provide_engine
from mesh_llm.engine.supervisor import ManagedProcess, ProcessSpec, ProcState, StartFailed, Supervisor
from mesh_llm.engine.source import LLAMA_CPP
from mesh_llm.errors import UserError
from mesh_llm.mesh.handshake import Refused
from mesh_llm.mesh.identity import MeshCredentials, load_mesh, load_or_create_key, new_secret_key, save_mesh
from mesh_llm.mesh.mesh import Mesh
from mesh_llm.mesh.peers import PeerRecord
from mesh_llm.mesh.token import InviteToken, TokenError, decode_token
from mesh_llm.mesh.transport import TransportConfig
from mesh_llm.mesh.tunnels import serve_http_tunnels
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
    join: list[str] = field(default_factory=list)
    client: bool = False
    transport: TransportConfig = field(default_factory=TransportConfig)

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
        self.port = 0

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
        # SO_REUSEADDR as the real listener uses: a restart right after a crash must not trip
        # over TIME_WAIT leftovers; Linux still refuses a port another socket listens on.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise port_in_use(host, port) from None


def prepare_model(ref: str) -> ServedModel:
    path = resolve_model(ref)
    info = inspect_model(path)
    return ServedModel(model_id=path.stem, path=path, info=info)


def run_node(cfg: NodeConfig, console: Console) -> int:
    tokens = decode_tokens(cfg.join)
    if cfg.client and cfg.models:
        raise UserError("--client runs without a model: drop --model, or drop --client to serve it")
    if cfg.client and not tokens:
        raise UserError("--client needs a mesh to join: pass --join TOKEN")
    if not cfg.models and not tokens:
        raise UserError("nothing to serve: pass --model PATH|NAME (e.g. --model gemma-3-270m), or --join TOKEN to use a mesh")
    if len(cfg.models) > 1:
        raise UserError("serving several models at once is not supported yet: pass one --model")
    check_port_free(cfg.host, cfg.port)
    model = prepare_model(cfg.models[0]) if cfg.models else None
    engine = provide_engine(cfg.bin_dir, cfg.flavor, console) if model else None  # clients need no engine
    return asyncio.run(_serve(cfg, tokens, model, engine, console))


def decode_tokens(texts: list[str]) -> list[InviteToken]:
    tokens = []
    for text in texts:
        try:
            tokens.append(decode_token(text))
        except TokenError as exc:
            raise UserError(str(exc)) from None
    if len({t.mesh for t in tokens}) > 1:
        raise UserError("the --join tokens belong to different meshes: pass tokens of one mesh")
    return tokens


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


def mesh_credentials(cfg: NodeConfig, tokens: list[InviteToken]) -> MeshCredentials:
    """A joiner adopts the token's mesh; a first node keeps its mesh across restarts."""
    if tokens:
        if not cfg.client:
            save_mesh(cfg.state_dir, tokens[0].mesh)
        return tokens[0].mesh
    creds = load_mesh(cfg.state_dir)
    if creds is None:
        creds = MeshCredentials.generate()
        save_mesh(cfg.state_dir, creds)
    return creds


def system_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def self_record(cfg: NodeConfig, model: ServedModel | None, devices: list[str]) -> PeerRecord:
    role = "client" if cfg.client else "host" if model else "standby"
    memory = 0 if cfg.client else int(0.75 * system_memory_bytes())  # CPU offload capacity; GPU sizes come with the planner
    return PeerRecord(
        id="",
        role=role,
        hostname=socket.gethostname(),
        version=__version__,
        engine_version="" if cfg.client else LLAMA_CPP.engine_version,
        devices=tuple(devices) or (() if cfg.client else ("CPU",)),
        vram_bytes=memory,
        models_on_disk=(model.model_id,) if model else (),
        api_port=cfg.port,
        api_public=cfg.listen_all,
    )


async def _serve(cfg: NodeConfig, tokens: list[InviteToken], model: ServedModel | None, engine: EngineBinaries | None, console: Console) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False)

    mesh: Mesh | None = None

    def advertise(mp: ManagedProcess) -> None:
        # The record's `models_served` follows llama-server's health: peers route to it only while ready.
        if mesh is not None and model is not None:
            mesh.update_self(models_served=(model.model_id,) if mp.state == ProcState.READY else ())

    supervisor = Supervisor(report=lambda msg: console.print(f"[yellow]{msg}[/]"), on_change=advertise)
    atexit.register(supervisor.kill_all_now)  # belt and braces if we die on an exception
    table = UpstreamTable()
    proxy = ApiProxy(table)
    await proxy.start(cfg.host, cfg.port)  # listening early: clients get 503 "loading" rather than refused
    probe: HealthProbe | None = None
    remote: RemoteModels | None = None
    try:
        devices = await asyncio.to_thread(list_devices, engine.llama_server) if engine else []
        key = new_secret_key() if cfg.client else load_or_create_key(cfg.state_dir)
        mesh = Mesh(secret_key=key, creds=mesh_credentials(cfg, tokens), me=self_record(cfg, model, devices), transport=cfg.transport, log=say)
        await mesh.start()
        proxy.mesh_status = mesh.status
        local = LocalServer()
        remote = RemoteModels(mesh, table, {model.model_id} if model else set())
        remote.start()
        serve_http_tunnels(mesh, lambda name: local.port if model and name == model.model_id and local.is_ready() else None)
        if tokens:
            with console.status("Joining the mesh…"):
                try:
                    await mesh.join(tokens)
                except Refused as exc:
                    raise UserError(f"cannot join the mesh: {exc}") from None
            say(f"Joined the mesh: {len(mesh.members())} peer(s) so far")
        if not cfg.client:
            say(f"Invite token: {mesh.token()}")
        if model is None or engine is None:
            await remote.sync()
            print_passive_ready(console, cfg, table)
            await stop.wait()
            console.print("Leaving the mesh…")
            return 0
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
        local.port = port
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
        if remote is not None:
            await remote.close()
        if mesh is not None:
            await mesh.close()
        await proxy.close()
        await supervisor.stop_all()
        if probe is not None:
            await probe.close()


def api_url(cfg: NodeConfig) -> str:
    return f"http://{'0.0.0.0' if cfg.listen_all else 'localhost'}:{cfg.port}/v1"


def print_passive_ready(console: Console, cfg: NodeConfig, table: UpstreamTable) -> None:
    kind = "client" if cfg.client else "standby node"
    models = ", ".join(table.models()) or "none yet"
    console.print(f"[bold green]mesh-llm {__version__} ready[/] as a {kind} — the mesh serves: {models}")
    console.print(f"API: {api_url(cfg)}   Stop: Ctrl-C")
    if table.models():
        first = table.models()[0]
        console.print("[bold]curl:[/] ", end="")
        console.print(agent_commands(first, cfg.port, 4096)["curl"], markup=False, highlight=False)


def print_ready(console: Console, cfg: NodeConfig, model: ServedModel, engine: EngineBinaries, ctx: int) -> None:
    console.print(f"[bold green]mesh-llm {__version__} ready[/] — serving [bold]{model.model_id}[/] solo ({model.info.architecture}, {model.info.n_layers} layers, context {ctx})")
    console.print(f"API: {api_url(cfg)}   engine: {engine.llama_server.parent} ({engine.origin})")
    commands = agent_commands(model.model_id, cfg.port, ctx)
    for name, text in commands.items():
        if "\n" in text:
            console.print(f"[bold]{name}:[/]")
            console.print(text, markup=False, highlight=False)
        else:
            console.print(f"[bold]{name}:[/] ", end="")
            console.print(text, markup=False, highlight=False)
    console.print(f"Logs: {cfg.state_dir / 'logs'}   Stop: Ctrl-C")
