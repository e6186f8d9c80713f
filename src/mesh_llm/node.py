"""Composition root: builds and runs a node from its config.

A node joins (or starts) a mesh, serves the models it is given (at start with
--model, later with `mesh-llm load`) through the fleet, and answers on :9337
for every model the mesh serves: local ones directly, the others through QUIC
tunnels. Everything it starts is closed in reverse order on the way out.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from mesh_llm import __version__
from mesh_llm.api.agents import agent_commands
from mesh_llm.api.console import WebConsole, console_port_in_use
from mesh_llm.api.http_guard import Policy
from mesh_llm.api.keys import KeyRing, store_path
from mesh_llm.api.metrics import NodeMetrics
from mesh_llm.api.proxy import UPSTREAM_START_SECS, ApiProxy, UpstreamTable, port_in_use
from mesh_llm.api.runtime import RuntimeApi
from mesh_llm.api.status import PeerView, Ports, status_document
from mesh_llm.api.status_feed import StatusFeed
from mesh_llm.blackboard.api import BlackboardApi
from mesh_llm.blackboard.keeper import BlackboardKeeper
from mesh_llm.discovery.lan import LanAnnouncer, lan_interfaces
from mesh_llm.engine.binaries import EngineBinaries
from mesh_llm.engine.provision import device_listing, list_devices, provide_engine
from mesh_llm.engine.source import LLAMA_CPP
from mesh_llm.engine.supervisor import ManagedProcess, Supervisor
from mesh_llm.errors import UserError
from mesh_llm.mesh.handshake import Refused
from mesh_llm.mesh.http_tunnel import serve_http_tunnels
from mesh_llm.mesh.identity import (
    MeshCredentials,
    load_last_port,
    load_mesh,
    load_or_create_key,
    new_secret_key,
    save_last_join,
    save_last_port,
    save_mesh,
)
from mesh_llm.mesh.mesh import Mesh
from mesh_llm.mesh.peers import MAX_ON_DEMAND, PeerRecord
from mesh_llm.mesh.token import InviteToken, TokenError, decode_token
from mesh_llm.mesh.transport import TransportConfig
from mesh_llm.mesh.tunnels import serve_rpc_tunnels
from mesh_llm.models.expert_rank import imatrix_beside
from mesh_llm.plan.capacity import Offer, choose_offer, nvml_devices, parse_device_memory, system_memory_bytes
from mesh_llm.plan.demand import DEFAULT_IDLE_UNLOAD_SECS
from mesh_llm.plan.split import Solo
from mesh_llm.serving.demand import DemandKeeper
from mesh_llm.serving.fleet import Fleet, Loaded, SplitOptions, describe
from mesh_llm.serving.lifecycle import Life, Phase
from mesh_llm.serving.prepare import ModelOptions, prepare, with_ranking
from mesh_llm.serving.proofs import serve_file_proofs
from mesh_llm.serving.runner import EngineSettings, ModelSpec
from mesh_llm.text import for_markup, terminal_safe

RPC_DELAY_ENV = "MESH_LLM_RPC_DELAY_MS"  # injected latency on RPC tunnels, for benchmarks

if TYPE_CHECKING:
    from mesh_llm.discovery.nostr import Publisher


@dataclass
class NodeConfig:
    models: list[str] = field(default_factory=list)
    port: int = 9337
    listen_all: bool = False
    allow_remote_runtime: bool = False  # the runtime API for callers on other machines too
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
    cors_origins: tuple[str, ...] = ()  # web apps (origins) a browser may call the API from, besides our own pages
    max_inflight: int | None = None  # requests at once per server of a model; None: its llama-server's slots
    upstream_timeout: float | None = None  # a peer's answer must start within this; None: UPSTREAM_START_SECS
    api_key_file: Path | None = None  # keys accepted besides the state dir's (`mesh-llm auth key create`)
    on_demand: list[str] = field(default_factory=list)  # --on-demand: files this node loads when the mesh wants them
    idle_unload: float = DEFAULT_IDLE_UNLOAD_SECS  # a model it picked up itself is unloaded after this long without requests
    # finding meshes (discovery/): list this one on Nostr, or join the best listed one
    publish: bool = False
    publish_member_token: bool = False  # the listing carries the member token, not the client token
    mesh_name: str | None = None
    region: str | None = None
    max_clients: int | None = None  # delisted while the mesh has this many clients
    auto: bool = False
    auto_model: str | None = None  # --auto --client --model M: a mesh serving M
    nostr_relays: list[str] = field(default_factory=list)  # empty: the default relays
    nostr: bool = True  # --no-nostr: publish and look on the LAN only, ask no relay
    lan: bool = True  # announce the mesh on the LAN (mDNS) and refresh members' addresses from it; --no-lan: off

    @property
    def announces_on_lan(self) -> bool:
        """Members only (a client is not dialable), and not a mesh kept on this machine (loopback QUIC)."""
        return self.lan and not self.client and not self.transport.bind_host.startswith(("127.", "::1"))

    @property
    def host(self) -> str:
        return "0.0.0.0" if self.listen_all else "127.0.0.1"

    def model_options(self) -> ModelOptions:
        return ModelOptions(ctx_size=self.ctx_size, draft=self.draft, no_draft=self.no_draft, draft_max=self.draft_max)


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


def run_node(cfg: NodeConfig, console: Console) -> int:
    if cfg.auto:
        from mesh_llm.discovery.commands import auto_join

        with console.status("Looking for meshes on Nostr…"):
            cfg = auto_join(cfg, lambda line: console.print(terminal_safe(line), markup=False, highlight=False))
    tokens = decode_tokens(cfg.join)
    if only_client_tokens(tokens):
        if cfg.models:
            raise UserError("that is a client token: it lets this machine use the mesh's models, not serve one; "
                            "drop --model, or ask a member for the member token (`mesh-llm token` on a member)")
        cfg = replace(cfg, client=True)
    if cfg.client and cfg.models:
        raise UserError("--client runs without a model: drop --model, or drop --client to serve it")
    if cfg.client and not tokens:
        raise UserError("--client needs a mesh to join: pass --join TOKEN")
    if not cfg.models and not cfg.on_demand and not tokens:
        raise UserError("nothing to serve: pass --model PATH|NAME (e.g. --model gemma-3-270m), or --join TOKEN to use a mesh")
    if len(cfg.models) > 1 and cfg.draft:
        raise UserError("--draft pairs with a single --model: with several, each uses its catalog pairing (or pass --no-draft)")
    if len(cfg.on_demand) > MAX_ON_DEMAND:
        raise UserError(f"--on-demand names {len(cfg.on_demand)} models; a node offers at most {MAX_ON_DEMAND}")
    if len(cfg.models) > 1 and cfg.tensor_split:
        raise UserError("--tensor-split sets the shares of one model: pass a single --model with it")
    api_keys(cfg)  # a missing --api-key-file fails before slow work
    if cfg.announces_on_lan:
        try:
            lan_interfaces()
        except ValueError as exc:
            raise UserError(str(exc)) from None
    check_port_free(cfg.host, cfg.port)
    if cfg.console_port is not None:
        if cfg.console_port == cfg.port:
            raise UserError(f"--console {cfg.console_port} is the API port too: give the console another port")
        check_port_free(cfg.host, cfg.console_port, console_port_in_use)

    def say(line: str) -> None:
        console.print(terminal_safe(line), markup=False, highlight=False)

    specs = [prepare(ref, cfg.model_options(), say) for ref in cfg.models]  # bad references fail before any engine work
    if len({s.model_id for s in specs}) < len(specs):
        raise UserError("two --model references name the same file: pass each model once")
    # files served on demand are never downloaded at start: they must be on disk already
    spares = [prepare(ref, replace(cfg.model_options(), draft=None), say, fetch=False) for ref in cfg.on_demand]
    if len({s.model_id for s in [*specs, *spares]}) < len(specs) + len(spares):
        raise UserError("an --on-demand reference names the same file as another --model or --on-demand: pass each model once")
    engine = None if cfg.client else provide_engine(cfg.bin_dir, cfg.flavor, console)  # clients need no engine
    return asyncio.run(_serve(cfg, tokens, specs, engine, console, spares))


def machine_names() -> frozenset[str]:
    """This machine's host names (a console opened as http://NAME:3131 is ours); getfqdn may ask DNS."""
    names = {socket.gethostname(), socket.getfqdn()}
    return frozenset(n.lower().rstrip(".") for n in names if n)


def api_keys(cfg: NodeConfig, warn: Callable[[str], None] = lambda line: None) -> KeyRing:
    return KeyRing(store_path(cfg.state_dir), cfg.api_key_file, warn)


def decode_tokens(texts: list[str]) -> list[InviteToken]:
    tokens = []
    for text in texts:
        try:
            tokens.append(decode_token(text))
        except TokenError as exc:
            raise UserError(str(exc)) from None
    if len({t.mesh.mesh_id for t in tokens}) > 1:
        raise UserError("the --join tokens belong to different meshes: pass tokens of one mesh")
    return sorted(tokens, key=lambda t: t.mesh.kind != "member")  # a member token first: its secret admits us as one


def token_to_remember(texts: list[str]) -> str | None:
    """The --join text a launcher should rejoin with later: a member token if one was given
    (it is what the node joined as), else the first (a client token)."""
    kinds = [(decode_token(text).mesh.kind, text) for text in texts]  # decode_tokens checked them all
    return next((text for kind, text in kinds if kind == "member"), texts[0] if texts else None)


def only_client_tokens(tokens: list[InviteToken]) -> bool:
    return bool(tokens) and all(t.mesh.kind == "client" for t in tokens)


def mesh_credentials(cfg: NodeConfig, tokens: list[InviteToken]) -> MeshCredentials:
    """A joiner adopts the token's mesh; a first node keeps its mesh across restarts."""
    if tokens:
        if not cfg.client and tokens[0].mesh.kind == "member":
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


def draft_device(cfg: NodeConfig, offer: Offer, engine: EngineBinaries) -> str:
    """Where a split's host runs its draft: a device the engine itself lists, or "none" (the CPU)."""
    if offer.device in ("", "CPU"):
        return "none"
    # the offer's names are the engine's unless NVML (or --max-vram) supplied them; then ask the engine
    engine_devices = offer.device.split("+") if offer.source == "llama.cpp" else list_devices(engine.llama_server)
    return cfg.device if cfg.device in engine_devices else engine_devices[0] if engine_devices else "none"


def engine_version(engine: EngineBinaries | None) -> str:
    """Peers compare this before splitting: our cached build says its patch level."""
    if engine is None:
        return ""
    return LLAMA_CPP.engine_version if engine.origin == "cache" else f"external {engine.version()}"


def self_record(cfg: NodeConfig, offer: Offer, engine: str) -> PeerRecord:
    return PeerRecord(
        id="",
        role="client" if cfg.client else "standby",  # the fleet says what it hosts and lends
        hostname=socket.gethostname(),
        version=__version__,
        engine_version=engine,
        devices=(offer.device,) if offer.device else (),
        vram_bytes=offer.bytes,
        free_bytes=offer.bytes,
        api_port=cfg.port,
        api_public=cfg.listen_all,
    )


async def _serve(cfg: NodeConfig, tokens: list[InviteToken], specs: list[ModelSpec], engine: EngineBinaries | None, console: Console,
                 spares: list[ModelSpec] | None = None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    # Lines name models and peers (file names, aliases, gossip): never markup, never escapes.
    def say(line: str) -> None:
        console.print(terminal_safe(line), markup=False, highlight=False)

    def warn(line: str) -> None:
        console.print(f"[yellow]{escape(terminal_safe(line))}[/]", highlight=False)

    fleet: Fleet | None = None
    mesh: Mesh | None = None
    demand: DemandKeeper | None = None
    token: str | None = None
    client_token: str | None = None
    lan: LanAnnouncer | None = None
    publisher: Publisher | None = None

    def discovery_state() -> dict[str, Any]:
        return {"mesh_name": cfg.mesh_name, "lan_announced": lan is not None and lan.azc is not None,
                "listing": publisher.state() if publisher is not None else None}

    def build_status() -> dict[str, Any]:
        assert mesh is not None and fleet is not None
        now = time.monotonic()
        peers = [PeerView(m.record, m.rtt_ms, now - m.last_seen) for m in mesh.members()]
        return status_document(mesh.me, peers, mesh_id=mesh.creds.mesh_id.hex(), token=token, client_token=client_token,
                               ports=Ports(cfg.port, cfg.console_port, cfg.listen_all), routes=table.models(), local=fleet.snapshot(), servers=table.ready_servers(),
                               demand=demand.snapshot() if demand is not None else None, discovery=discovery_state())

    def on_process_change(mp: ManagedProcess) -> None:
        if fleet is not None:
            fleet.on_process_change(mp)

    options = replace(cfg.model_options(), draft=None)  # a runtime load gets its catalog pairing, not --draft

    offer = Offer(0, "", "client")

    def ranked(spec: ModelSpec) -> ModelSpec:
        imatrix = imatrix_beside(engine.llama_server) if engine is not None else None
        return with_ranking(spec, imatrix, offer.bytes, say)

    async def prepare_at_runtime(ref: str) -> ModelSpec:
        return await asyncio.to_thread(lambda: ranked(prepare(ref, options, say)))

    async with contextlib.AsyncExitStack() as stack:
        supervisor = Supervisor(report=warn, on_change=on_process_change)
        atexit.register(supervisor.kill_all_now)  # belt and braces if we die on an exception
        stack.push_async_callback(supervisor.stop_all)
        table = UpstreamTable()
        proxy = ApiProxy(table, max_inflight=cfg.max_inflight, upstream_timeout=cfg.upstream_timeout or UPSTREAM_START_SECS)

        def peers_by_role() -> dict[str, int]:
            return dict(collections.Counter(m.record.role for m in mesh.members())) if mesh is not None else {}

        proxy.metrics = NodeMetrics(lambda: {m: sum(s.gate.in_flight for s in table.get(m).servers) for m in table.models()}, peers_by_role)
        keys = api_keys(cfg, warn)
        own_names = await asyncio.to_thread(machine_names) if cfg.listen_all else frozenset()
        proxy.policy = Policy(listen_all=cfg.listen_all, cors_origins=frozenset(cfg.cors_origins), keys=keys, own_names=own_names)
        if cfg.listen_all and not keys.required():
            warn("--listen-all with no API key: anyone who can reach this machine can use the API; make a key with `mesh-llm auth key create`")
        runtime = RuntimeApi(prepare_at_runtime, cfg.allow_remote_runtime, cfg.listen_all)
        proxy.extra_routes.append(runtime.install)
        blackboard_api = BlackboardApi(cfg.allow_remote_runtime, cfg.listen_all)
        proxy.extra_routes.append(blackboard_api.install)
        await proxy.start(cfg.host, cfg.port)  # listening early: clients get 503 "loading" rather than refused
        stack.push_async_callback(proxy.close)

        offer = await asyncio.to_thread(memory_offer, cfg, engine)
        engine_id = await asyncio.to_thread(engine_version, engine)
        if engine is not None:
            options = replace(options, draft_device=await asyncio.to_thread(draft_device, cfg, offer, engine))
            specs = [replace(s, draft=replace(s.draft, device=options.draft_device)) if s.draft else s for s in specs]
            specs = [await asyncio.to_thread(ranked, s) for s in specs]  # MoE models too big for this node: ranked to be sharded
            spares = [await asyncio.to_thread(ranked, s) for s in spares or []]
        key = new_secret_key() if cfg.client else load_or_create_key(cfg.state_dir)
        # A member binds its last port again, so the tokens it printed before still lead to it.
        transport = cfg.transport if cfg.client else replace(cfg.transport, preferred_port=load_last_port(cfg.state_dir))
        mesh = Mesh(secret_key=key, creds=mesh_credentials(cfg, tokens), me=self_record(cfg, offer, engine_id), transport=transport, log=say)
        await mesh.start()
        stack.push_async_callback(mesh.close)
        if not cfg.client:
            save_last_port(cfg.state_dir, mesh.me.addrs)
        if not cfg.client:  # a client is not dialable: its tokens would lead nowhere
            token, client_token = mesh.token("member"), mesh.token("client")
        if cfg.announces_on_lan:
            lan = LanAnnouncer(mesh, name=cfg.mesh_name, say=say)
            await lan.start()
            stack.push_async_callback(lan.close)

        settings = None
        if engine is not None:
            delay_s = float(os.environ.get(RPC_DELAY_ENV, "0") or 0) / 1000
            settings = EngineSettings(engine, gpu=offer.device != "CPU", device=cfg.device, log_dir=cfg.state_dir / "logs", rpc_delay_s=delay_s)
        fleet = Fleet(mesh, supervisor, table, offer=offer.bytes, engine_version=engine_id, settings=settings, say=say, warn=warn)
        if proxy.metrics is not None:
            fleet.on_restart = proxy.metrics.restarted
        fleet.start()
        stack.push_async_callback(fleet.close)
        runtime.fleet = fleet
        if engine is not None and spares:
            spares = [replace(s, draft=replace(s.draft, device=options.draft_device)) if s.draft else s for s in spares]
        demand = DemandKeeper(mesh, fleet if settings is not None else None, spares or [], idle_unload=cfg.idle_unload, say=say, warn=warn)
        demand.start()
        stack.push_async_callback(demand.close)  # closed before the fleet: no promotion while it shuts down
        proxy.on_request, proxy.coming = demand.on_request, demand.coming
        proxy.status_source = build_status
        proxy.node_id = mesh.me.id
        if cfg.console_port is not None:
            feed = StatusFeed(build_status, warn)
            feed.start()  # before the first request: it serves the feed's latest document
            web_console = WebConsole(feed, proxy, runtime)
            await web_console.start(cfg.host, cfg.console_port)
            stack.push_async_callback(web_console.close)
            fleet.on_change = demand.on_change = feed.poke
            events = mesh.subscribe()
            stack.callback(mesh.unsubscribe, events)
            feed.follow(events)  # joins, leaves, record changes
        serve_rpc_tunnels(mesh, fleet.lent_port, warn)
        serve_file_proofs(mesh, fleet.model_path, warn)
        serve_http_tunnels(mesh, fleet.local_server, proxy.gate_has_room)
        keeper = BlackboardKeeper(mesh, cfg.state_dir, warn)
        keeper.start()  # before joining: it syncs with each peer as it joins
        stack.push_async_callback(keeper.close)
        blackboard_api.keeper = keeper
        if tokens:
            with console.status("Joining the mesh…"):
                try:
                    await mesh.join(tokens)
                except Refused as exc:
                    raise UserError(f"cannot join the mesh: {exc}") from None
            say(f"Joined the mesh: {len(mesh.members())} peer(s) so far")
            remembered = token_to_remember(cfg.join)
            if remembered:
                try:  # `mesh-llm goose` and friends rejoin this mesh when no node runs here
                    save_last_join(cfg.state_dir, remembered)
                except (OSError, UserError) as exc:
                    warn(f"could not remember the mesh joined: {exc}")
        if not cfg.client:
            say(f"Invite token: {token}")
            say(f"Client token: {client_token}   (API use only: no serving, no workers; `mesh-llm token --client` prints it again)")
        split = SplitOptions(cfg.force_split, cfg.tensor_split)
        loaded = [fleet.add(spec, split) for spec in specs]
        if loaded:
            total = sum(s.info.file_size for s in specs)
            names = ", ".join(for_markup(s.model_id) for s in specs)  # a status line renders markup
            with console.status(f"Planning and loading {names} ({total / 1e6:,.0f} MB; this node offers {offer.bytes / 1e9:.2f} GB of {offer.device}, from {offer.source})…"):
                outcomes = await _first_outcomes(loaded, stop)
            if outcomes is None:
                console.print("Stopped before the models finished loading.")
                return 0
            failed = [(m, life) for m, life in zip(loaded, outcomes, strict=True) if life.phase is Phase.FAILED and isinstance(life.plan, Solo)]
            if len(failed) == len(loaded):  # nothing to serve: say why and stop (a split re-plans instead)
                model, life = failed[0]
                raise UserError(f"{model.name}: {life.detail}")
            print_ready(console, cfg, loaded, engine)
            if keys.required():  # the commands above carry placeholder keys
                say("API keys are on: put one of yours where the commands above say mesh or dummy (`mesh-llm auth key create` makes one)")
        else:
            await fleet.sync_routes()
            print_passive_ready(console, cfg, table)
        fleet.announced = True
        if (cfg.publish or cfg.mesh_name) and token and client_token:
            from mesh_llm.discovery.commands import start_publisher

            publisher = start_publisher(cfg, build_status, token, client_token, say, warn, on_listing=lan.announce_listing if lan else None)
            stack.push_async_callback(publisher.close)  # withdrawn on exit
        await stop.wait()
        console.print("Leaving the mesh…" if not loaded else "Shutting down…")
        return 0
    return 0  # not reached: the stack re-raises or the body returned


async def _first_outcomes(loaded: list[Loaded], stop: asyncio.Event) -> list[Life] | None:
    """Each model's first settled state (ready, waiting, standby, failed); None on Ctrl-C first."""
    stopper = asyncio.ensure_future(stop.wait())
    settled = asyncio.ensure_future(asyncio.gather(*(m.settled for m in loaded)))
    try:
        done, _ = await asyncio.wait((settled, stopper), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if settled not in done:
        settled.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):  # retrieved, so asyncio does not print it at exit
            await settled
        return None
    return list(settled.result())


def api_url(cfg: NodeConfig) -> str:
    return f"http://{'0.0.0.0' if cfg.listen_all else 'localhost'}:{cfg.port}/v1"


def console_hint(cfg: NodeConfig) -> str:
    return f"   Console: http://localhost:{cfg.console_port}" if cfg.console_port is not None else ""


def print_passive_ready(console: Console, cfg: NodeConfig, table: UpstreamTable) -> None:
    kind = "client" if cfg.client else "standby node"
    models = ", ".join(for_markup(m) for m in table.models()) or "none yet"  # names from peers
    console.print(f"[bold green]mesh-llm {__version__} ready[/] as a {kind} — the mesh serves: {models}")
    console.print(f"API: {api_url(cfg)}" + console_hint(cfg) + "   Stop: Ctrl-C")
    if not cfg.client:
        console.print(f"Give it a model: mesh-llm load NAME{'' if cfg.port == 9337 else f' --port {cfg.port}'}")
    if table.models():
        console.print("[bold]curl:[/] ", end="")
        console.print(terminal_safe(agent_commands(table.models()[0], cfg.port)["curl"]), markup=False, highlight=False)


def _model_line(model: Loaded) -> str:
    life, spec = model.life, model.spec
    draft = f", draft {spec.draft.name} (up to {spec.draft.max_tokens} tokens)" if spec.draft else ""
    experts = f", MoE: {spec.info.n_experts} experts, {spec.info.n_experts_used} active" if spec.info.is_moe else ""
    facts = f"({spec.info.architecture}, {spec.info.n_layers} layers{experts}, context {spec.ctx}{draft})"
    if life.phase is Phase.READY:
        return f"{describe(model)} {facts}"
    return f"{model.name} {facts}: {life.detail}"


def print_ready(console: Console, cfg: NodeConfig, loaded: list[Loaded], engine: EngineBinaries | None) -> None:
    serving = "; ".join(_model_line(m) for m in loaded)
    console.print(f"[bold green]mesh-llm {__version__} ready[/] — serving [bold]{escape(terminal_safe(serving))}[/]")
    where = f"   engine: {engine.llama_server.parent} ({engine.origin})" if engine else ""
    console.print(f"API: {api_url(cfg)}" + console_hint(cfg) + where, markup=False, highlight=False)
    first = loaded[0]
    for name, text in agent_commands(first.name, cfg.port, first.spec.ctx).items():
        if "\n" in text:
            console.print(f"[bold]{name}:[/]")
            console.print(terminal_safe(text), markup=False, highlight=False)
        else:
            console.print(f"[bold]{name}:[/] ", end="")
            console.print(terminal_safe(text), markup=False, highlight=False)
    console.print(f"Logs: {cfg.state_dir / 'logs'}   Stop: Ctrl-C", markup=False, highlight=False)
