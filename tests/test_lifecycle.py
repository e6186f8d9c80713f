"""One model's lifecycle (pure): every transition, and what it asks to be done."""

from __future__ import annotations

from mesh_llm.plan.placement import Unplannable
from mesh_llm.plan.split import LayerRange, Solo, Split, Standby, Waiting
from mesh_llm.serving.lifecycle import (
    ADVERTISED,
    ROUTED,
    Drain,
    Drained,
    Launch,
    Life,
    Phase,
    Planned,
    RetryDue,
    RetryIn,
    ServerDown,
    ServerRestarting,
    ServerUp,
    Stop,
    Stopped,
    UnloadAsked,
    plan_key,
    retry_delay,
    step,
)

A, B, C = "a" * 64, "b" * 64, "c" * 64
SPLIT = Split(A, (B,), (1.0, 1.0), (LayerRange(B, 0, 3, False), LayerRange(A, 4, 7, True)))
SOLO_KEY = plan_key(Solo())


def run(life: Life, *events):  # type: ignore[no-untyped-def]
    actions = []
    for event in events:
        life, done = step(life, event)
        actions.append(done)
    return life, actions


def test_a_model_that_fits_launches_and_becomes_ready() -> None:
    life, (launched, up) = run(Life(), Planned(Solo()), ServerUp(SOLO_KEY))
    assert launched == [Launch(Solo())] and up == []
    assert life.phase is Phase.READY and life.running == SOLO_KEY and life.detail == "ready"


def test_the_same_plan_again_keeps_the_server_running() -> None:
    life, (_, _, again) = run(Life(), Planned(SPLIT), ServerUp(plan_key(SPLIT)), Planned(SPLIT))
    assert again == [] and life.phase is Phase.READY


def test_a_changed_plan_stops_the_old_server_before_launching_the_new() -> None:
    other = Split(A, (C,), (1.0, 1.0), SPLIT.layers)
    life, actions = run(Life(), Planned(SPLIT), ServerUp(plan_key(SPLIT)), Planned(other))
    assert actions[-1] == [Stop(), Launch(other)]
    assert life.phase is Phase.STARTING and life.running == plan_key(other)


def test_a_split_waits_for_its_workers_before_launching() -> None:
    life, (waiting, ready) = run(Life(), Planned(SPLIT, workers_ready=False), Planned(SPLIT, workers_ready=True))
    assert waiting == [] and ready == [Launch(SPLIT)]
    assert life.phase is Phase.STARTING and life.running == plan_key(SPLIT)
    first, _ = step(Life(), Planned(SPLIT, workers_ready=False))
    assert first.phase is Phase.STARTING and first.running is None and "worker" in first.detail


def test_standby_and_waiting_run_nothing_and_say_why() -> None:
    life, (_, _, to_standby) = run(Life(), Planned(Solo()), ServerUp(SOLO_KEY), Planned(Standby(B, "my copy differs")))
    assert to_standby == [Stop()] and life.phase is Phase.STANDBY and life.detail == f"hosted by {B[:8]} (my copy differs)"
    waiting = Waiting(10**9, 4 * 10**8)
    life, (act,) = run(Life(), Planned(waiting))
    assert act == [] and life.phase is Phase.WAITING and life.detail == waiting.message()


def test_a_dead_server_fails_and_retries_later_not_at_once() -> None:
    life, actions = run(Life(), Planned(Solo()), ServerUp(SOLO_KEY), ServerDown(SOLO_KEY, "llama-server exited with code -9"))
    assert actions[-1] == [Stop(), RetryIn(retry_delay(1))]
    assert life.phase is Phase.FAILED and life.failed == SOLO_KEY and life.detail == "llama-server exited with code -9"
    life, (same,) = run(life, Planned(Solo()))
    assert same == [] and life.phase is Phase.FAILED  # the same plan does not relaunch before the retry
    life, (_, relaunch) = run(life, RetryDue(), Planned(Solo()))
    assert relaunch == [Launch(Solo())] and life.phase is Phase.STARTING
    life, _ = run(life, ServerDown(SOLO_KEY, "again"))
    assert life.failures == 2 and retry_delay(2) == 2 * retry_delay(1) and retry_delay(50) == 30.0


def test_a_failed_plan_gives_way_to_a_different_one_at_once() -> None:
    life, _ = run(Life(), Planned(SPLIT), ServerDown(plan_key(SPLIT), "a worker died"))
    life, (act,) = run(life, Planned(Solo()))
    assert act == [Launch(Solo())]


def test_news_of_a_superseded_launch_is_ignored() -> None:
    other = Split(A, (C,), (1.0, 1.0), SPLIT.layers)
    life, (_, _, up_old, down_old) = run(Life(), Planned(SPLIT), Planned(other), ServerUp(plan_key(SPLIT)), ServerDown(plan_key(SPLIT), "x"))
    assert up_old == down_old == [] and life.phase is Phase.STARTING and life.running == plan_key(other)


def test_a_restarting_solo_server_is_loading_again() -> None:
    life, _ = run(Life(), Planned(Solo()), ServerUp(SOLO_KEY), ServerRestarting(SOLO_KEY, "exited with code -9"))
    assert life.phase is Phase.STARTING and "restarting" in life.detail
    life, _ = run(life, ServerUp(SOLO_KEY))
    assert life.phase is Phase.READY


def test_unload_drains_then_stops_and_nothing_else_matters_meanwhile() -> None:
    life, actions = run(Life(), Planned(Solo()), ServerUp(SOLO_KEY), UnloadAsked(), Planned(Standby(B)), ServerDown(SOLO_KEY, "x"), UnloadAsked())
    assert actions[2] == [Drain()] and actions[3:] == [[], [], []]
    assert life.phase is Phase.UNLOADING and life.running == SOLO_KEY  # still holds its memory
    life, (stop, again) = run(life, Drained(), Drained())
    assert stop == [Stop()] and again == [] and life.phase is Phase.UNLOADING  # holds it until the server is gone
    life, (gone,) = run(life, Stopped())
    assert gone == [] and life.phase is Phase.GONE
    assert run(life, Planned(Solo()))[1] == [[]]  # gone for good
    early, _ = run(Life(), Planned(Solo()), UnloadAsked(), Stopped())
    assert early.phase is Phase.UNLOADING  # not gone before its requests drained


def test_a_plan_that_cannot_be_made_is_an_error_with_the_reason() -> None:
    life, (act,) = run(Life(), Planned(Unplannable("--tensor-split needs 2 values")))
    assert act == [] and life.phase is Phase.FAILED and life.detail == "cannot plan: --tensor-split needs 2 values"
    life, (act,) = run(life, Planned(Solo()))
    assert act == [Launch(Solo())]


def test_what_is_routed_and_advertised() -> None:
    assert Phase.STANDBY not in ROUTED and Phase.UNLOADING not in ROUTED and Phase.GONE not in ROUTED
    assert Phase.UNLOADING in ADVERTISED and Phase.STANDBY not in ADVERTISED
    assert {Phase.READY, Phase.WAITING, Phase.STARTING, Phase.FAILED, Phase.PLANNING} <= ROUTED


def test_a_restart_is_named_by_what_changed() -> None:
    from mesh_llm.plan.split import LayerRange, Solo, Split
    from mesh_llm.serving.lifecycle import restart_cause

    def split(workers: tuple[str, ...], weights: tuple[float, ...]) -> Split:
        return Split("h", workers, weights, tuple(LayerRange(n, 0, 0, False) for n in (*workers, "h")))

    assert restart_cause(split(("a", "b"), (1, 1, 1)), split(("a", "c"), (1, 1, 1))) == "workers changed"
    assert restart_cause(split(("a", "b"), (1, 1, 1)), split(("a", "b"), (2, 1, 1))) == "shares changed"
    assert restart_cause(split(("a",), (1, 1)), split(("a",), (1, 1))) == "retry"
    assert restart_cause(Solo(), Solo()) == "retry"
    assert restart_cause(Solo(), split(("a",), (1, 1))) == "solo to split"
    assert restart_cause(split(("a",), (1, 1)), Solo()) == "split to solo"


def test_an_expert_shard_keeps_running_while_its_own_experts_stay_the_same() -> None:
    from mesh_llm.plan.split import Shards
    from mesh_llm.serving.lifecycle import Launch, Phase, Planned, ServerUp, plan_key, restart_cause, step

    three = Shards("a", ("a", "b", "c"), ((0, 1, 2), (0, 1, 3), (0, 2, 3)), 4, "r1", 100)
    life, actions = step(Life(), Planned(three))
    assert actions == [Launch(three)] and life.phase is Phase.STARTING and "expert shard (3 of 4 experts)" in life.detail
    life, _ = step(life, ServerUp(plan_key(three)))
    # c leaves and a's experts are what they were: nothing to do
    two = Shards("a", ("a", "b"), ((0, 1, 2), (0, 1, 3)), 4, "r1", 100)
    life, actions = step(life, Planned(two))
    assert actions == [] and life.phase is Phase.READY and life.plan == two
    # its experts change: it restarts on the new shard
    other = Shards("a", ("a", "b"), ((0, 1, 2, 3), (0, 1, 3)), 4, "r1", 120)
    life, actions = step(life, Planned(other))
    assert actions[-1] == Launch(other) and restart_cause(two, other) == "experts changed" and restart_cause(two, two) == "retry"
    # another ranking that leaves its experts as they are: nothing to do
    life, _ = step(life, ServerUp(plan_key(other)))
    assert step(life, Planned(Shards("a", ("a", "b"), ((0, 1, 2, 3), (0, 1, 3)), 4, "r2", 120)))[1] == []
