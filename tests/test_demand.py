"""The demand map's pure rules: counting, summing across nodes, who picks up an unserved or
hot model and when, and when a promoted model is unloaded again."""

from __future__ import annotations

from mesh_llm.mesh.peers import DemandEntry, HostedModel, OnDemand, PeerRecord
from mesh_llm.plan.demand import (
    HOT_HOLD_SECS,
    HOT_SETTLE_SECS,
    NEXT_STANDBY_SECS,
    PICKUP_DEBOUNCE_SECS,
    DemandCounter,
    DemandMemory,
    Demote,
    Promote,
    candidates,
    coming,
    decide,
    merge_demand,
    resolve,
)

GB = 10**9
T0 = 1_700_000_000.0


def pid(i: int) -> str:
    return f"{i:064x}"


def standby(i: int, *models: str, free: int = 4 * GB, need: int = GB, fp: str = "") -> PeerRecord:
    return PeerRecord(id=pid(i), role="standby", hostname=f"s{i}", free_bytes=free, vram_bytes=free,
                      on_demand=tuple(OnDemand(m, fp, need, (f"{m}-alias",)) for m in models))


def host(i: int, *models: str, state: str = "ready", pinned: bool = True) -> PeerRecord:
    return PeerRecord(id=pid(i), role="host", hostname=f"h{i}", free_bytes=GB, models_on_disk=models if pinned else (),
                      fingerprints=tuple("" for _ in models) if pinned else (),
                      hosting=tuple(HostedModel(m, state) for m in models))


def client(i: int, demand: dict[str, tuple[int, float]]) -> PeerRecord:
    return PeerRecord(id=pid(i), role="client", demand=tuple(DemandEntry(m, n, at) for m, (n, at) in demand.items()))


# -- counting and merging ------------------------------------------------------------


def test_the_counter_counts_a_sliding_minute_and_says_when_a_model_is_news() -> None:
    c = DemandCounter()
    assert c.count("m", T0) is True  # the first request: publish now
    assert c.count("m", T0 + 1) is False
    assert c.entries(T0 + 2) == (DemandEntry("m", 2, T0 + 1),)
    assert c.entries(T0 + 60.5) == (DemandEntry("m", 1, T0 + 1),)  # the first fell out of the window
    assert c.entries(T0 + 62) == (DemandEntry("m", 0, T0 + 1),)  # still known, idle
    assert c.count("m", T0 + 63) is True  # none in the window: news again
    assert c.count("bad\x1b[2J", T0) is False and [e.model for e in c.entries(T0 + 63)] == ["m"]  # no such name is kept


def test_the_counter_is_bounded_and_unknown_names_go_first() -> None:
    c = DemandCounter(max_models=3)
    c.count("real", T0, known=True)
    for i in range(10):
        c.count(f"made-up-{i}", T0 + 1 + i, known=False)
    names = [e.model for e in c.entries(T0 + 20)]
    assert len(names) == 3 and "real" in names and "made-up-9" in names


def test_the_counter_forgets_after_the_ttl() -> None:
    c = DemandCounter(ttl=100)
    c.count("m", T0)
    assert c.entries(T0 + 101) == ()


def test_demand_is_summed_across_nodes_with_the_latest_activity_and_a_ttl() -> None:
    a = client(1, {"m": (3, T0 - 5), "old": (1, T0 - 7200)})
    b = client(2, {"m": (4, T0 - 1)})
    liar = client(3, {"m": (1, T0 + 10_000)})  # a clock in the future counts as now
    merged = merge_demand([a, b, liar], T0)
    assert merged["m"].requests == 8 and merged["m"].last_active == T0  # a sum, not a max
    assert "old" not in merged
    assert merge_demand([a, b], T0)["m"].last_active == T0 - 1


def test_names_resolve_through_ids_and_aliases_the_mesh_knows() -> None:
    records = [host(1, "tiny-0"), standby(2, "tiny-1")]
    assert resolve("tiny-1", records) == "tiny-1" and resolve("tiny-1-alias", records) == "tiny-1"
    assert resolve("nothing-like-it", records) is None


# -- who could serve it ---------------------------------------------------------------


def test_candidates_have_the_file_room_and_do_not_serve_it_ranked_the_same_everywhere() -> None:
    small = standby(5, "m", free=GB // 2)  # too little memory
    rich, poor, tie = standby(3, "m", free=8 * GB), standby(1, "m", free=2 * GB), standby(2, "m", free=2 * GB)
    serving = PeerRecord(id=pid(4), role="host", free_bytes=8 * GB, on_demand=(OnDemand("m", "", GB),), hosting=(HostedModel("m", "error"),))
    cheat = PeerRecord(id=pid(6), role="client", free_bytes=8 * GB, on_demand=(OnDemand("m", "", GB),))
    assert [r.id for r in candidates("m", [small, poor, tie, rich, serving, cheat])] == [pid(3), pid(1), pid(2)]


def test_a_file_with_another_fingerprint_than_the_mesh_knows_does_not_count() -> None:
    pinned = PeerRecord(id=pid(1), role="standby", models_on_disk=("m",), fingerprints=("aaaa",), hosting=(HostedModel("m", "waiting"),))
    other, same = standby(2, "m", fp="bbbb"), standby(3, "m", fp="aaaa")
    assert [r.id for r in candidates("m", [pinned, other, same])] == [pid(3)]


def test_coming_names_a_model_being_loaded_or_one_a_standby_could_pick_up() -> None:
    assert coming("tiny-1", [host(1, "tiny-0"), standby(2, "tiny-1")]) == "tiny-1"
    assert coming("tiny-1", [host(1, "tiny-1", state="loading")]) == "tiny-1"
    assert coming("tiny-1", [host(1, "tiny-1", state="error")]) is None  # nobody could serve it soon
    assert coming("tiny-9", [host(1, "tiny-0"), standby(2, "tiny-1")]) is None


# -- picking up an unserved model -----------------------------------------------------


def test_an_unserved_requested_model_is_picked_up_by_the_first_ranked_standby_after_the_debounce() -> None:
    first, second = standby(2, "m", free=8 * GB), standby(3, "m", free=4 * GB)
    records = [host(1, "other"), first, second, client(9, {"m": (2, T0)})]
    mem1, mem2 = DemandMemory(), DemandMemory()
    assert decide(first.id, records, T0, mem1, {}) == []  # unserved only for a moment: not yet
    assert decide(first.id, records, T0 + PICKUP_DEBOUNCE_SECS / 2, mem1, {}) == []
    (got,) = decide(first.id, records, T0 + PICKUP_DEBOUNCE_SECS, mem1, {})
    assert got == Promote("m", "requested 2× in the last minute, served by nobody")
    # the second-ranked one waits for the first, and acts only when the first has not served it by then
    decide(second.id, records, T0, mem2, {})
    assert decide(second.id, records, T0 + PICKUP_DEBOUNCE_SECS, mem2, {}) == []
    assert [d.model for d in decide(second.id, records, T0 + PICKUP_DEBOUNCE_SECS + NEXT_STANDBY_SECS, mem2, {})] == ["m"]


def test_a_model_served_again_within_the_debounce_is_not_picked_up() -> None:
    s = standby(2, "m")
    mem = DemandMemory()
    demand = client(9, {"m": (1, T0)})
    decide(s.id, [s, demand], T0, mem, {})
    assert decide(s.id, [s, demand, host(1, "m", state="loading")], T0 + 1, mem, {}) == []  # back (a re-plan)
    assert decide(s.id, [s, demand], T0 + PICKUP_DEBOUNCE_SECS + 0.5, mem, {}) == []  # unserved again: the clock restarted


def test_a_model_named_by_a_live_nodes_model_flag_is_wanted_without_requests() -> None:
    waiting = host(1, "m", state="waiting")  # it was given --model m but cannot serve it
    s = standby(2, "m")
    mem = DemandMemory()
    decide(s.id, [waiting, s], T0, mem, {})
    (got,) = decide(s.id, [waiting, s], T0 + PICKUP_DEBOUNCE_SECS, mem, {})
    assert got.model == "m" and "named by h1" in got.reason


def test_old_demand_past_the_idle_time_does_not_pick_a_model_up() -> None:
    s = standby(2, "m")
    records = [s, client(9, {"m": (0, T0 - 700)})]
    mem = DemandMemory()
    decide(s.id, records, T0, mem, {}, idle_unload=600)
    assert decide(s.id, records, T0 + 60, mem, {}, idle_unload=600) == []
    longer = DemandMemory()
    decide(s.id, records, T0, longer, {}, idle_unload=1000)
    (got,) = decide(s.id, records, T0 + 60, longer, {}, idle_unload=1000)
    assert got.model == "m" and "last requested 13 min ago" in got.reason


def test_no_promotion_of_a_model_this_node_promoted_already_or_whose_promotion_failed_lately() -> None:
    s = standby(2, "m")
    records = [s, client(9, {"m": (1, T0)})]
    mem = DemandMemory()
    decide(s.id, records, T0, mem, {})
    assert decide(s.id, records, T0 + 5, mem, {"m": T0 + 1}) == []
    mem.failed_at["m"] = T0 + 4
    assert decide(s.id, records, T0 + 5, mem, {}) == []
    assert [d.model for d in decide(s.id, records, T0 + 70, mem, {})] == ["m"]


def test_a_client_decides_nothing() -> None:
    me = client(1, {"m": (5, T0)})
    assert decide(me.id, [me, standby(2, "m")], T0 + 10_000, DemandMemory(), {"m": T0}, idle_unload=30) == []


# -- a hot model gets another server ---------------------------------------------------


def hot_mesh(hot: int, cold: int) -> list[PeerRecord]:
    return [host(1, "hot"), host(2, "cold"), standby(3, "hot"), client(9, {"hot": (hot, T0), "cold": (cold, T0)})]


def test_a_hot_model_gains_a_server_after_it_stayed_hot() -> None:
    records, mem = hot_mesh(30, 2), DemandMemory()
    assert decide(pid(3), records, T0, mem, {}) == []
    (got,) = decide(pid(3), records, T0 + HOT_HOLD_SECS, mem, {})
    assert got.model == "hot" and got.hot and "30 requests in the last minute on 1 server" in got.reason


def test_not_hot_below_the_rate_or_the_ratio() -> None:
    for hot, cold in ((9, 0), (30, 11)):  # too few; not 3× the other's per server
        mem = DemandMemory()
        decide(pid(3), hot_mesh(hot, cold), T0, mem, {})
        assert decide(pid(3), hot_mesh(hot, cold), T0 + HOT_HOLD_SECS + 1, mem, {}) == [], (hot, cold)


def test_after_a_models_servers_changed_no_server_is_added_before_it_settled() -> None:
    mem = DemandMemory()
    two = [host(1, "hot"), host(4, "hot", pinned=False), host(2, "cold"), standby(3, "hot"), client(9, {"hot": (60, T0), "cold": (1, T0)})]
    decide(pid(3), hot_mesh(60, 1), T0, mem, {})
    decide(pid(3), two, T0 + 1, mem, {})  # another node added a server
    assert decide(pid(3), two, T0 + HOT_HOLD_SECS + 2, mem, {}) == []
    assert [d.model for d in decide(pid(3), two, T0 + 1 + HOT_SETTLE_SECS, mem, {})] == ["hot"]


# -- an idle promoted model is unloaded -------------------------------------------------


def me_serving(model: str) -> PeerRecord:
    return PeerRecord(id=pid(2), role="host", models_on_disk=(model,), fingerprints=("",), hosting=(HostedModel(model, "ready"),),
                      on_demand=(OnDemand(model, "", GB),))


def test_an_idle_promoted_model_is_unloaded_after_the_idle_time_only() -> None:
    me = me_serving("m")
    records = [me, client(9, {"m": (0, T0 + 10)})]
    assert decide(me.id, records, T0 + 10 + 29, DemandMemory(), {"m": T0}, idle_unload=30) == []
    (got,) = decide(me.id, records, T0 + 10 + 30, DemandMemory(), {"m": T0}, idle_unload=30)
    assert got == Demote("m", "idle 30 s")
    assert decide(me.id, [me], T0 + 20, DemandMemory(), {"m": T0}, idle_unload=30) == []  # idle counts from its promotion at least


def test_a_model_this_node_did_not_promote_is_never_unloaded() -> None:
    me = me_serving("m")
    assert decide(me.id, [me], T0 + 10_000, DemandMemory(), {}, idle_unload=30) == []


def test_no_unload_that_would_leave_a_model_unserved_while_a_node_still_asks_for_it() -> None:
    me, pinned = me_serving("m"), host(1, "m", state="waiting")
    assert decide(me.id, [me, pinned], T0 + 100, DemandMemory(), {"m": T0}, idle_unload=30) == []
    other = host(3, "m")
    (got,) = decide(me.id, [me, pinned, other], T0 + 100, DemandMemory(), {"m": T0}, idle_unload=30)
    assert isinstance(got, Demote) and "1 other server(s) keep it" in got.reason


# -- the shell's publishing (a fake mesh: what goes into this node's record, and when) ----


class FakeMesh:
    def __init__(self, me: PeerRecord, peers: list[PeerRecord]) -> None:
        self.me, self.peers = me, peers

    def members(self) -> list:  # type: ignore[type-arg]
        from types import SimpleNamespace

        return [SimpleNamespace(record=p) for p in self.peers]

    def update_self(self, **changes: object) -> None:
        from dataclasses import replace

        self.me = replace(self.me, **changes)  # type: ignore[arg-type]


def test_requests_for_a_model_nobody_serves_are_told_at_once_others_periodically() -> None:
    import asyncio

    from mesh_llm.serving.demand import PUBLISH_SECS, URGENT_PUBLISH_SECS, DemandKeeper

    async def run() -> None:
        now = [T0]
        mesh = FakeMesh(client(1, {}), [host(2, "served"), standby(3, "spare")])
        keeper = DemandKeeper(mesh, None, [], say=print, warn=print, clock=lambda: now[0])  # type: ignore[arg-type]
        told = lambda: {e.model: e.requests for e in mesh.me.demand}  # noqa: E731
        keeper.on_request("spare")
        assert told() == {"spare": 1}  # its first request: at once
        now[0] += 0.1
        keeper.on_request("spare")  # nobody serves it: told within URGENT_PUBLISH_SECS, not PUBLISH_SECS
        keeper.round()
        assert told() == {"spare": 1}
        now[0] += URGENT_PUBLISH_SECS
        keeper.round()
        assert told() == {"spare": 2}
        keeper.on_request("served")  # first request: at once
        now[0] += 1
        keeper.on_request("served")
        keeper.round()
        assert told() == {"spare": 2, "served": 1}  # a served model's counts wait for the periodic publish
        now[0] += PUBLISH_SECS
        keeper.round()
        assert told() == {"spare": 2, "served": 2}
        keeper.on_request("spare-alias")  # counted under the model's own name
        assert keeper.counter.entries(now[0])[0] == DemandEntry("spare", 3, round(now[0], 1))

    asyncio.run(run())


def test_demand_for_names_no_node_knows_is_left_alone() -> None:
    s = standby(2, "m")
    flood = client(9, {f"made-up-{i}": (5, T0) for i in range(30)})
    mem = DemandMemory()
    assert decide(s.id, [s, flood], T0, mem, {}) == [] and mem.unserved_since == {}
