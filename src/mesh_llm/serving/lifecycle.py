"""The life of one model on this node (pure): one state, events in, actions out.

`step(life, event)` is the whole behaviour, in the style of h11's state
machine: the owner feeds it plans (from placement), news from the model's
llama-server and the user's unload; it answers with the new state and what to
do (launch, stop, drain, retry later). Nothing here touches a process, a
socket or a clock, so every transition is tested directly.

    PLANNING ──plan──▶ WAITING | STANDBY | STARTING ──up──▶ READY
       ▲                              │ down                 │ down
       └────────── retry ◀── FAILED ◀─┴──────────────────────┘
    any ──unload──▶ UNLOADING ──drained──▶ (stopping) ──stopped──▶ GONE
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

from mesh_llm.plan.placement import Unplannable
from mesh_llm.plan.split import Plan, Shards, Solo, Split, Standby, Waiting

RETRY_BASE_SECS = 2.0
RETRY_CAP_SECS = 30.0


class Phase(str, Enum):
    PLANNING = "planning"  # no plan yet
    WAITING = "waiting"  # the mesh lacks the memory: requests get 503 with the reason
    STANDBY = "standby"  # another node hosts its split; this node may lend its worker
    STARTING = "loading"  # llama-server starting (for a split: once its workers are up)
    READY = "ready"
    FAILED = "error"  # cannot plan, or llama-server failed; retried later or on the next change
    UNLOADING = "unloading"  # no new requests; those in flight finish, then the server stops (memory held till then)
    GONE = "gone"


ROUTED = frozenset({Phase.PLANNING, Phase.WAITING, Phase.STARTING, Phase.READY, Phase.FAILED})  # this node answers for it
ADVERTISED = ROUTED | {Phase.UNLOADING}  # in gossip as hosted here (unloading still holds its memory)


def plan_key(plan: Plan | Unplannable | None) -> tuple[Any, ...]:
    """What must stay equal for a running llama-server to stay up."""
    if isinstance(plan, Split):
        return ("split", plan.workers, plan.weights)
    if isinstance(plan, Solo):
        return ("solo",)
    if isinstance(plan, Shards):  # the group and the ranking may change: its own experts are what it runs
        return ("shards", plan.mine)
    return ()


@dataclass(frozen=True)
class Life:
    phase: Phase = Phase.PLANNING
    plan: Plan | Unplannable | None = None
    running: tuple[Any, ...] | None = None  # key of the plan llama-server was launched for
    detail: str = ""  # the state in words, for 503s, gossip and the console
    failed: tuple[Any, ...] | None = None  # key of the plan that failed: not relaunched before a retry
    failures: int = 0
    drained: bool = False  # unloading: requests in flight are done, the server is being stopped


# -- events ------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    plan: Plan | Unplannable
    workers_ready: bool = True  # for a split: every worker says its RPC worker is up


@dataclass(frozen=True)
class ServerUp:
    key: tuple[Any, ...]  # the launch it is about: news of a superseded launch is ignored


@dataclass(frozen=True)
class ServerRestarting:
    key: tuple[Any, ...]
    reason: str


@dataclass(frozen=True)
class ServerDown:
    key: tuple[Any, ...]
    reason: str


@dataclass(frozen=True)
class RetryDue:
    pass


@dataclass(frozen=True)
class UnloadAsked:
    pass


@dataclass(frozen=True)
class Drained:
    pass


@dataclass(frozen=True)
class Stopped:
    """The server of an unloading model is gone: its memory is free."""


Event = Planned | ServerUp | ServerRestarting | ServerDown | RetryDue | UnloadAsked | Drained | Stopped


# -- actions -----------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    plan: Solo | Split | Shards


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Drain:
    pass


@dataclass(frozen=True)
class RetryIn:
    secs: float


Action = Launch | Stop | Drain | RetryIn


def retry_delay(failures: int) -> float:
    return min(RETRY_CAP_SECS, RETRY_BASE_SECS * 2 ** max(0, failures - 1))


def step(life: Life, event: Event) -> tuple[Life, list[Action]]:
    if life.phase is Phase.GONE:
        return life, []
    if isinstance(event, UnloadAsked):
        if life.phase is Phase.UNLOADING:
            return life, []
        return replace(life, phase=Phase.UNLOADING, detail="unloading: requests in flight finish"), [Drain()]
    if isinstance(event, Drained):
        if life.phase is not Phase.UNLOADING or life.drained:
            return life, []
        return replace(life, drained=True, detail="unloading: stopping llama-server"), [Stop()]
    if isinstance(event, Stopped):
        if life.phase is not Phase.UNLOADING or not life.drained:
            return life, []
        return Life(Phase.GONE, detail="unloaded"), []
    if life.phase is Phase.UNLOADING:
        return life, []  # neither plans nor server news matter any more
    if isinstance(event, Planned):
        return _planned(life, event)
    if isinstance(event, RetryDue):
        if life.phase is not Phase.FAILED:
            return life, []
        return replace(life, phase=Phase.PLANNING, failed=None, detail="retrying"), []
    if event.key != life.running:
        return life, []  # about a launch that was superseded
    if isinstance(event, ServerUp):
        return replace(life, phase=Phase.READY, detail="ready", failures=0), []
    if isinstance(event, ServerRestarting):
        return replace(life, phase=Phase.STARTING, detail=f"llama-server restarting: {event.reason}"), []
    failures = life.failures + 1
    failed = replace(life, phase=Phase.FAILED, running=None, failed=life.running, failures=failures, detail=event.reason)
    return failed, [Stop(), RetryIn(retry_delay(failures))]


def _planned(life: Life, event: Planned) -> tuple[Life, list[Action]]:
    plan = event.plan
    stop: list[Action] = [Stop()] if life.running is not None else []
    if isinstance(plan, Unplannable):
        return Life(Phase.FAILED, plan, None, f"cannot plan: {plan.reason}", plan_key(plan), life.failures), stop
    if isinstance(plan, Standby):
        note = f" ({plan.note})" if plan.note else ""
        return Life(Phase.STANDBY, plan, None, f"hosted by {plan.host[:8]}{note}", failures=life.failures), stop
    if isinstance(plan, Waiting):
        return Life(Phase.WAITING, plan, None, plan.message(), failures=life.failures), stop
    key = plan_key(plan)
    if life.running == key and life.phase in (Phase.STARTING, Phase.READY):
        return replace(life, plan=plan), []  # same shape: keep it running, with the fresher details
    if life.phase is Phase.FAILED and life.failed == key:
        return replace(life, plan=plan), []  # the same plan failed: wait for the retry
    if isinstance(plan, Split) and not event.workers_ready:
        return Life(Phase.STARTING, plan, None, f"starting the {len(plan.workers)} worker(s) of the split", None, life.failures), stop
    if isinstance(plan, Shards):
        words = f"building and loading its expert shard ({len(plan.mine)} of {plan.of} experts)"
    else:
        words = "loading" if isinstance(plan, Solo) else f"loading split over {len(plan.layers)} nodes"
    return Life(Phase.STARTING, plan, key, words, None, life.failures), [*stop, Launch(plan)]


def restart_cause(last: Plan, plan: Plan) -> str:
    """Why a model whose server ran before under `last` is launched again under `plan`
    (a few fixed words: a metrics label)."""
    if isinstance(last, Split) and isinstance(plan, Split):
        if last.workers != plan.workers:
            return "workers changed"
        return "shares changed" if last.weights != plan.weights else "retry"
    if type(last) is type(plan):
        return "experts changed" if isinstance(plan, Shards) and plan_key(last) != plan_key(plan) else "retry"
    return f"{_kind(last)} to {_kind(plan)}"


def _kind(plan: Plan) -> str:
    return "experts" if isinstance(plan, Shards) else "split" if isinstance(plan, Split) else "solo"
