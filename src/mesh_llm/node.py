"""Composition root: builds and runs a node from its config.

A node joins (or starts) a mesh, serves its model with llama-server on a
private loopback port, supervised, and answers on :9337 for every model the
mesh serves: local ones directly, the others through QUIC tunnels.
"""

from __future__ import annotations

import asyncio
import atexit
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from mesh_llm import __version__
from mesh_llm.api.agents import agent_commands
from mesh_llm.api.console import WebConsole, console_port_in_use
from mesh_llm.api.proxy import ApiProxy, UpstreamTable, port_in_use
from mesh_llm.api.remote import RemoteModels
from mesh_llm.api.status import PeerView, Ports, status_document
from mesh_llm.api.status_feed import StatusFeed
from mesh_llm.engine.binaries import EngineBinaries
from mesh_llm.engine.llama_server import choose_ctx
from mesh_llm.engine.probes import free_loopback_port
from mesh_llm.engine.provision import device_listing, list_devices, provide_engine
from mesh_llm.engine.rpc_worker import rpc_hello, rpc_worker_argv, rpc_worker_env
from mesh_llm.engine.source import LLAMA_CPP
from mesh_llm.engine.supervisor import ManagedProcess, ProcessSpec, ProcState, StartFailed, Supervisor
from mesh_llm.errors import UserError
from mesh_llm.mesh.handshake import Refused
from mesh_llm.mesh.identity import MeshCredentials, load_last_port, load_mesh, load_or_create_key, new_secret_key, save_last_port, save_mesh
from mesh_llm.mesh.mesh import Mesh
from mesh_llm.mesh.peers import PeerRecord
from mesh_llm.mesh.token import InviteToken, TokenError, decode_token
from mesh_llm.mesh.transport import TransportConfig
from mesh_llm.mesh.tunnels import serve_http_tunnels, serve_rpc_tunnels
from mesh_llm.model_runner import Draft, ModelRunner, RunnerConfig, describe_split, memory_need
from mesh_llm.models.fingerprint import cached_fingerprint
from mesh_llm.models.gguf_file import GGUFInfo, inspect_model
from mesh_llm.models.draft import DraftModel, choose_draft
from mesh_llm.models.resolve import resolve_model
from mesh_llm.paths import cache_dir
from mesh_llm.plan.capacity import Offer, choose_offer, nvml_devices, parse_device_memory, system_memory_bytes
from mesh_llm.plan.split import Split


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
    max_vram_gb: float | None = None
    force_split: bool = False
    tensor_split: tuple[float, ...] | None = None
    console_port: int | None = None  # None: no web console
    draft: str | None = None  # --draft PATH|NAME; None: the catalog's pairing when it is on disk
    draft_max: int = 8
    no_draft: bool = False
    transport: TransportConfig = field(default_factory=TransportConfig)

    @property
    def host(self) -> str:
        return "0.0.0.0" if self.listen_all else "127.0.0.1"


@dataclass
class ServedModel:
    model_id: str
    path: Path
    info: GGUFInfo
    fingerprint: str = ""
    draft: DraftModel | None = None


def check_port_free(host: str, port: int, in_use: Callable[[str, int], UserError] = port_in_use) -> None:
    """Fail before slow work (engine build, model load) if a port we will listen on is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR as the real listener uses: a restart right after a crash must not trip
        # over TIME_WAIT leftovers; Linux still refuses a port another socket listens on.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise in_use(host, port) from None


def prepare_model(cfg: NodeConfig, ref: str, say: Callable[[str], None]) -> ServedModel:
    """Find (or download) the model and its draft, and check both before any slow engine work."""
    resolved = resolve_model(ref, say=say, single_file=True)
    info = inspect_model(resolved.path)
    fingerprint = cached_fingerprint(info, cache_dir() / "fingerprints.json")
    model = ServedModel(resolved.model_id, resolved.path, info, fingerprint)
    model.draft = None if cfg.no_draft else choose_draft(cfg.draft, resolved, info, say)
    return model


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
    if cfg.console_port is not None:
        if cfg.console_port == cfg.port:
            raise UserError(f"--console {cfg.console_port} is the API port too: give the console another port")
        check_port_free(cfg.host, cfg.console_port, console_port_in_use)
    model = prepare_model(cfg, cfg.models[0], lambda line: console.print(line, markup=False, highlight=False)) if cfg.models else None
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


def memory_offer(cfg: NodeConfig, engine: EngineBinaries | None) -> Offer:
    if cfg.client or engine is None:
        return Offer(0, "", "client")
    gpus, source = nvml_devices(), "NVML"
    if not gpus:
        gpus, source = parse_device_memory(device_listing(engine.llama_server)), "llama.cpp"
    try:
        return choose_offer(gpus, system_memory_bytes(), device=cfg.device, max_vram_gb=cfg.max_vram_gb, source=source)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def draft_config(cfg: NodeConfig, model: ServedModel, offer: Offer, ctx: int, engine: EngineBinaries) -> Draft | None:
    """The draft's settings; its device (for splits) is one the engine itself lists, or "none": the CPU."""
    if model.draft is None:
        return None
    d = model.draft
    device = "none"
    if offer.device not in ("", "CPU"):
        # the offer's names are the engine's unless NVML (or --max-vram) supplied them; then ask the engine
        engine_devices = offer.device.split("+") if offer.source == "llama.cpp" else list_devices(engine.llama_server)
        device = cfg.device if cfg.device in engine_devices else engine_devices[0] if engine_devices else "none"
    return Draft(d.model_id, d.path, memory_need(d.info, ctx), cfg.draft_max, device)


def engine_version(engine: EngineBinaries | None) -> str:
    """Peers compare this before splitting: our cached build says its patch level."""
    if engine is None:
        return ""
    return LLAMA_CPP.engine_version if engine.origin == "cache" else f"external {engine.version()}"


def self_record(cfg: NodeConfig, model: ServedModel | None, offer: Offer, engine: str) -> PeerRecord:
    role = "client" if cfg.client else "host" if model else "standby"
    return PeerRecord(
        id="",
        role=role,
        hostname=socket.gethostname(),
        version=__version__,
        engine_version=engine,
        devices=(offer.device,) if offer.device else (),
        vram_bytes=offer.bytes,
        models_on_disk=(model.model_id,) if model else (),
        fingerprints=(model.fingerprint,) if model else (),
        api_port=cfg.port,
        api_public=cfg.listen_all,
    )


async def start_rpc_worker(supervisor: Supervisor, engine: EngineBinaries, model: ServedModel, cfg: NodeConfig) -> tuple[ManagedProcess, int]:
    """This node's RPC worker, on loopback only; peers reach it through the mesh."""
    port = free_loopback_port()

    async def answers() -> bool:
        return await rpc_hello(port) is not None

    spec = ProcessSpec(
        name="rpc-worker",
        argv=rpc_worker_argv(engine.rpc_server, port, cfg.device),
        log_path=cfg.state_dir / "logs" / "rpc-worker.log",
        env=rpc_worker_env(model.path),
        health=answers,
        probe_when_running=False,  # it serves one host at a time: never probe while one is attached
        ready_timeout=60.0,
    )
    try:
        return await supervisor.start(spec), port
    except StartFailed as exc:
        raise UserError(f"the RPC worker failed to start: {exc.reason} (log: {exc.log_path})") from None


async def _serve(cfg: NodeConfig, tokens: list[InviteToken], model: ServedModel | None, engine: EngineBinaries | None, console: Console) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False)

    def warn(line: str) -> None:
        console.print(f"[yellow]{escape(line)}[/]", highlight=False)

    mesh: Mesh | None = None
    runner: ModelRunner | None = None
    feed: StatusFeed | None = None
    web_console: WebConsole | None = None

    def on_process_change(mp: ManagedProcess) -> None:
        if runner is not None:
            runner.on_process_change(mp)

    def build_status() -> dict[str, Any]:
        assert mesh is not None
        now = time.monotonic()
        peers = [PeerView(m.record, m.rtt_ms, now - m.last_seen) for m in mesh.members()]
        return status_document(
            mesh.me, peers, mesh_id=mesh.creds.mesh_id.hex(),
            token=token,
            ports=Ports(cfg.port, cfg.console_port, cfg.listen_all), routes=table.models(),
            local=runner.snapshot() if runner is not None else None,
        )

    supervisor = Supervisor(report=warn, on_change=on_process_change)
    atexit.register(supervisor.kill_all_now)  # belt and braces if we die on an exception
    table = UpstreamTable()
    proxy = ApiProxy(table)
    await proxy.start(cfg.host, cfg.port)  # listening early: clients get 503 "loading" rather than refused
    remote: RemoteModels | None = None
    try:
        offer = await asyncio.to_thread(memory_offer, cfg, engine)
        engine_id = await asyncio.to_thread(engine_version, engine)
        key = new_secret_key() if cfg.client else load_or_create_key(cfg.state_dir)
        # A member binds its last port again, so the tokens it printed before still lead to it.
        transport = cfg.transport if cfg.client else replace(cfg.transport, preferred_port=load_last_port(cfg.state_dir))
        mesh = Mesh(secret_key=key, creds=mesh_credentials(cfg, tokens), me=self_record(cfg, model, offer, engine_id), transport=transport, log=say)
        await mesh.start()
        if not cfg.client:
            save_last_port(cfg.state_dir, mesh.me.addrs)
        token = None if cfg.client else mesh.token()  # a client is not dialable: its token would lead nowhere
        proxy.status_source = build_status
        remote = RemoteModels(mesh, table)
        remote.start()
        if cfg.console_port is not None:
            feed = StatusFeed(build_status, warn)
            feed.start()  # before the first request: it serves the feed's latest document
            web_console = WebConsole(feed, proxy, cfg.listen_all)
            await web_console.start(cfg.host, cfg.console_port)
            feed.follow(mesh.subscribe())  # joins, leaves, record changes
        rpc_port: int | None = None
        worker: ManagedProcess | None = None
        if model is not None and engine is not None:
            worker, rpc_port = await start_rpc_worker(supervisor, engine, model, cfg)
        serve_rpc_tunnels(mesh, lambda: rpc_port if worker is not None and worker.state == ProcState.READY else None)
        serve_http_tunnels(mesh, lambda name: runner.server_port if runner and name == runner.cfg.model_id and runner.is_ready() else None)
        if tokens:
            with console.status("Joining the mesh…"):
                try:
                    await mesh.join(tokens)
                except Refused as exc:
                    raise UserError(f"cannot join the mesh: {exc}") from None
            say(f"Joined the mesh: {len(mesh.members())} peer(s) so far")
        if not cfg.client:
            say(f"Invite token: {token}")
        if model is None or engine is None:
            await remote.sync()
            print_passive_ready(console, cfg, table)
            await stop.wait()
            console.print("Leaving the mesh…")
            return 0
        ctx = choose_ctx(cfg.ctx_size, model.info.context_length)
        runner = ModelRunner(
            RunnerConfig(
                model_id=model.model_id, path=model.path, info=model.info, fingerprint=model.fingerprint, engine=engine,
                engine_version=engine_id, memory=offer.bytes, gpu=offer.device != "CPU", ctx_size=ctx,
                device=cfg.device, force_split=cfg.force_split, tensor_split=cfg.tensor_split, log_dir=cfg.state_dir / "logs",
                draft=await asyncio.to_thread(draft_config, cfg, model, offer, ctx, engine),
            ),
            mesh, supervisor, table, remote, lambda: rpc_port, say, warn,
        )
        if feed is not None:
            runner.on_change = feed.poke
        runner.start()
        size_mb = model.info.file_size / 1e6
        with console.status(f"Planning and loading {model.model_id} ({size_mb:,.0f} MB, this node offers {offer.bytes / 1e9:.2f} GB of {offer.device}, from {offer.source})…"):
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait((runner.first_outcome, stopper), return_when=asyncio.FIRST_COMPLETED)
            if runner.first_outcome not in done:
                console.print("Stopped before the model finished loading.")
                return 0
            stopper.cancel()
            try:
                outcome = runner.first_outcome.result()
            except StartFailed as exc:
                raise UserError(f"llama-server failed to start: {exc.reason} (log: {exc.log_path})") from None
        if outcome == "ready":
            print_ready(console, cfg, model, engine, ctx, runner)
        else:
            print_passive_ready(console, cfg, table, f"{model.model_id}: {runner.status()}")
        await stop.wait()
        console.print("Shutting down…")
        return 0
    finally:
        if runner is not None:
            await runner.close()
        if remote is not None:
            await remote.close()
        if web_console is not None:
            await web_console.close()
        if mesh is not None:
            await mesh.close()
        await proxy.close()
        await supervisor.stop_all()


def api_url(cfg: NodeConfig) -> str:
    return f"http://{'0.0.0.0' if cfg.listen_all else 'localhost'}:{cfg.port}/v1"


def console_hint(cfg: NodeConfig) -> str:
    return f"   Console: http://localhost:{cfg.console_port}" if cfg.console_port is not None else ""


def print_passive_ready(console: Console, cfg: NodeConfig, table: UpstreamTable, state: str = "") -> None:
    kind = "client" if cfg.client else "mesh member" if state else "standby node"
    models = ", ".join(table.models()) or "none yet"
    console.print(f"[bold green]mesh-llm {__version__} ready[/] as a {kind} — the mesh serves: {models}" + (f" ({escape(state)})" if state else ""))
    console.print(f"API: {api_url(cfg)}" + console_hint(cfg) + "   Stop: Ctrl-C")
    if table.models():
        first = table.models()[0]
        console.print("[bold]curl:[/] ", end="")
        console.print(agent_commands(first, cfg.port)["curl"], markup=False, highlight=False)


def print_ready(console: Console, cfg: NodeConfig, model: ServedModel, engine: EngineBinaries, ctx: int, runner: ModelRunner) -> None:
    how = describe_split(runner.plan, model.model_id) if isinstance(runner.plan, Split) else f"{model.model_id} solo"
    draft = f", draft {model.draft.model_id} (up to {cfg.draft_max} tokens)" if model.draft else ""
    console.print(f"[bold green]mesh-llm {__version__} ready[/] — serving [bold]{escape(how)}[/] ({model.info.architecture}, {model.info.n_layers} layers, context {ctx}{escape(draft)})")
    console.print(f"API: {api_url(cfg)}" + console_hint(cfg) + f"   engine: {engine.llama_server.parent} ({engine.origin})")
    commands = agent_commands(model.model_id, cfg.port, ctx)
    for name, text in commands.items():
        if "\n" in text:
            console.print(f"[bold]{name}:[/]")
            console.print(text, markup=False, highlight=False)
        else:
            console.print(f"[bold]{name}:[/] ", end="")
            console.print(text, markup=False, highlight=False)
    console.print(f"Logs: {cfg.state_dir / 'logs'}   Stop: Ctrl-C")
