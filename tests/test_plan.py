"""Election, split planning and capacity: pure rules, checked exhaustively."""

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_llm.plan.capacity import CPU_RAM_SHARE, GB, DeviceMemory, choose_offer, parse_device_memory
from mesh_llm.plan.split import (
    MAX_SPLIT_RTT_MS,
    Candidate,
    Solo,
    Split,
    Standby,
    Waiting,
    elect_host,
    format_tensor_split,
    kv_cache_bytes,
    plan_model,
    predict_layers,
    required_bytes,
)

FP, ENGINE = "f" * 32, "b11434-mesh1"


def node(name: str, gb: float, rtt: float | None = None, fp: str = FP, engine: str = ENGINE) -> Candidate:
    return Candidate(id=name * 8, memory=int(gb * GB), fingerprint=fp, engine=engine, rtt_ms=rtt)


def plan(me, peers, need_gb, **kw):
    return plan_model(me, peers, model="m", need=int(need_gb * GB), n_layers=kw.pop("n_layers", 32), **kw)


def test_solo_when_it_fits_and_split_forced_otherwise() -> None:
    assert plan(node("a", 10), [], 9) == Solo()
    assert plan(node("a", 9), [], 9) == Solo()  # exactly enough is enough
    assert isinstance(plan(node("a", 10), [node("b", 4, 1)], 9, force_split=True), Split)


def test_required_bytes_has_headroom_and_kv() -> None:
    assert required_bytes(1_000_000, 0) == 1_100_000
    assert required_bytes(1_000_000, 5) == 1_100_005


def test_kv_cache_bytes() -> None:
    # 2 layers, ctx 4, 4 heads of 16 over n_embd 64, 2 kv heads: 2*4*2*(16+16)*2 bytes
    assert kv_cache_bytes(2, 4, 4, 2, 64) == 2 * 4 * 2 * 32 * 2
    assert kv_cache_bytes(2, 4, 4, [1, 0], 64) == 4 * 1 * 32 * 2
    assert kv_cache_bytes(1, 10, 8, 8, 64, key_length=32, value_length=16) == 10 * 8 * 48 * 2


def test_host_is_most_memory_then_greatest_id() -> None:
    assert elect_host([node("a", 8), node("b", 12), node("c", 4)]).id == "b" * 8
    assert elect_host([node("a", 8), node("c", 8), node("b", 8)]).id == "c" * 8


def test_the_same_host_is_elected_from_every_seat() -> None:
    nodes = [node("a", 6, 5), node("b", 6, 3), node("c", 4, 1)]
    verdicts = set()
    for me in nodes:
        p = plan(me, [n for n in nodes if n is not me], 12)
        verdicts.add(p.host if isinstance(p, (Split, Standby)) else None)
    assert verdicts == {"b" * 8}


def test_workers_added_by_ascending_rtt_until_the_group_fits() -> None:
    me = node("h", 8)
    peers = [node("x", 4, 30), node("y", 4, 5), node("z", 4, 10)]
    p = plan(me, peers, 15)
    assert isinstance(p, Split)
    assert p.workers == ("y" * 8, "z" * 8)  # nearest two: 8 + 4 + 4 = 16 ≥ 15
    assert p.weights == (4 * GB // (1 << 20), 4 * GB // (1 << 20), 8 * GB // (1 << 20))
    assert p.spares == ("x" * 8,)  # eligible, not needed: it replaces a worker that goes


def test_running_workers_are_kept_while_eligible() -> None:
    me = node("h", 8)
    far, near = node("f", 4, 30), node("n", 4, 1)
    p = plan(me, [far, near], 11, keep=["f" * 8])
    assert isinstance(p, Split) and p.workers == ("f" * 8,)
    # two kept workers stay in their order though their RTTs swapped (a new order would restart the split)
    kept = plan(me, [node("f", 3, 30), node("n", 3, 1)], 13, keep=["f" * 8, "n" * 8])
    assert isinstance(kept, Split) and kept.workers == ("f" * 8, "n" * 8)
    # a kept worker that became ineligible is replaced
    p = plan(me, [node("f", 4, 30, fp="0" * 32), near], 11, keep=["f" * 8])
    assert isinstance(p, Split) and p.workers == ("n" * 8,)


def test_unknown_rtt_sorts_last_and_far_peers_are_skipped() -> None:
    me = node("h", 8)
    p = plan(me, [node("u", 4, None), node("n", 4, 2.0), node("f", 4, MAX_SPLIT_RTT_MS + 1)], 11)
    assert isinstance(p, Split) and p.workers == ("n" * 8,)
    assert any("ms away" in e for e in p.excluded)
    p = plan(me, [node("u", 4, None), node("n", 4, 2.0)], 15)
    assert isinstance(p, Split) and p.workers == ("n" * 8, "u" * 8)


def test_too_little_memory_waits_with_a_clear_message() -> None:
    p = plan(node("h", 4), [node("w", 3, 1)], 10)
    assert isinstance(p, Waiting)
    assert p.message() == "Waiting for more peers — need 10.00 GB, have 7.00 GB"
    # a split forced with nobody to split with waits for a peer too
    assert isinstance(plan(node("h", 40), [], 10, force_split=True), Waiting)


def test_differing_gguf_or_engine_is_excluded_with_the_reason() -> None:
    me = node("h", 6)
    other_copy = node("d", 6, 1, fp="0" * 32)
    old_engine = node("e", 6, 1, engine="b10000")
    good = node("g", 6, 2)
    p = plan(me, [other_copy, old_engine, good], 11)
    assert isinstance(p, Split) and p.workers == ("g" * 8,)
    assert any("copy of m differs" in e for e in p.excluded)
    assert p.spares == ()  # the excluded are no spares
    assert any("engine b10000 differs" in e for e in p.excluded)
    # and the excluded node itself knows why it stands by
    s = plan(other_copy, [me, old_engine, good], 11)
    assert isinstance(s, Standby) and "differs" in s.note


def test_nodes_that_fit_alone_run_solo_and_are_not_workers() -> None:
    me = node("z", 4)  # equal memory: the greater id hosts
    p = plan(me, [node("big", 20, 1), node("w", 4, 2)], 7)
    assert isinstance(p, Split) and p.workers == ("w" * 8,)


def test_manual_tensor_split_is_used_and_validated() -> None:
    p = plan(node("z", 4), [node("w", 4, 1)], 6, manual_split=[1, 3])
    assert isinstance(p, Split) and p.weights == (1.0, 3.0)
    with pytest.raises(ValueError, match="needs 2 non-negative values"):
        plan(node("z", 4), [node("w", 4, 1)], 6, manual_split=[1, 2, 3])
    with pytest.raises(ValueError):
        plan(node("z", 4), [node("w", 4, 1)], 6, manual_split=[0, 0])


def test_host_keeps_the_last_layers_and_the_output() -> None:
    p = plan(node("z", 8), [node("w", 8, 1)], 12, n_layers=32)
    assert isinstance(p, Split)
    worker, host = p.layers
    # 33 slots (32 layers + output) at 1:1: i/33 < 0.5 for i ≤ 16
    assert (worker.first, worker.last, worker.output) == (0, 16, False)
    assert (host.first, host.last, host.output) == (17, 31, True)


def test_predict_layers_matches_the_worked_example() -> None:
    # research: L=32, -ts 1,1,2 → 0–8, 9–16, 17–31 + output
    r = predict_layers(["a", "b", "c"], [1, 1, 2], 32)
    assert [(x.first, x.last, x.output) for x in r] == [(0, 8, False), (9, 16, False), (17, 31, True)]


@given(st.lists(st.integers(1, 1 << 20), min_size=1, max_size=6), st.integers(1, 128))
def test_predicted_ranges_cover_every_layer_once_in_order(weights, n_layers) -> None:
    r = predict_layers([str(i) for i in range(len(weights))], [float(w) for w in weights], n_layers)
    covered = list(itertools.chain.from_iterable(range(x.first, x.last + 1) for x in r))
    assert covered == list(range(n_layers))
    assert sum(x.output for x in r) == 1


def test_format_tensor_split_round_trips() -> None:
    assert format_tensor_split([4096.0, 8192.0, 0.5]) == "4096,8192,0.5"


def test_offer_cpu_gpu_device_and_cap() -> None:
    ram = 32 * GB
    assert choose_offer([], ram).bytes == int(CPU_RAM_SHARE * ram)
    gpus = [DeviceMemory("CUDA0", 24 * GB, 20 * GB), DeviceMemory("CUDA1", 12 * GB, 12 * GB)]
    assert choose_offer(gpus, ram).bytes == 36 * GB
    assert choose_offer(gpus, ram, device="CUDA1").device == "CUDA1"
    assert choose_offer(gpus, ram, device="CPU").device == "CPU"
    capped = choose_offer(gpus, ram, max_vram_gb=2.5)
    assert capped.bytes == int(2.5 * GB) and capped.source == "--max-vram"
    assert choose_offer([], ram, max_vram_gb=1000).bytes == int(CPU_RAM_SHARE * ram)  # a cap, not a raise
    with pytest.raises(ValueError, match="not a device"):
        choose_offer(gpus, ram, device="Vulkan0")


def test_parse_device_memory() -> None:
    text = "Available devices:\n  CUDA0: NVIDIA GeForce RTX 4090 (24080 MiB, 23000 MiB free)\n  MTL0: Apple M2 Max (98304 MiB, 98303 MiB free)\n"
    assert parse_device_memory(text) == [
        DeviceMemory("CUDA0", 24080 << 20, 23000 << 20),
        DeviceMemory("MTL0", 98304 << 20, 98303 << 20),
    ]
    assert parse_device_memory("Available devices:\n") == []
