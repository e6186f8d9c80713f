"""MoE expert shards (issue 17): what serving a shard costs against the full model, and
what it saves against splitting the full model by layers.

For each generated Mixtral-style MoE (the tiny 8-expert test model, and a larger one that
matters on this machine: 8 layers, n_embd 1024, 32 experts of n_ff 384, 4 used per token,
f16, about 650 MB), node "a"'s shard under the planner's defaults — core
`core_size(n)` of `default_ranking(n)`, the rest dealt by `assign_experts` over nodes
a, b, c — is built and then, up at the same time and measured in alternating rounds:
  - full: llama-server alone on the full model;
  - shard: llama-server alone on the shard (same flags);
  - split: the full model split by layers over three mesh-llm nodes on loopback (memory
    caps of 0.40 / 0.35 / 0.35 of its need, so no two nodes hold it: the host and two
    workers, every token crossing two RPC tunnels).
Decode tok/s comes from llama-server's own timings (prompt excluded), median of rounds
(every round's figure is in `tps_rounds`). The machine may be shared: the CPU that other
processes used during the timed rounds is reported (`foreign_cpus_during_rounds`, in CPUs);
figures from a run where it is high are noisy.

Top-1 agreement: the text below, tokenized by the full model, teacher-forced: for every
prefix (up to --positions), the greedy next token of the shard and of the full model.
These models have RANDOM weights, so the figure says how often the tokens' routed experts
were all kept (or the loss did not change the argmax) — nothing about the quality on real
text of a trained model, where both routing and redundancy differ.

Build: the shard is written by `write_shard` in a child process; `build_s` is its wall
time and `build_peak_mb` its peak resident memory (VmHWM; `build_base_mb` is that
process after its imports, before the build).

The last line is one JSON object: the larger model's figures at the top level and the tiny
model's under "tiny".

    .venv/bin/python bench/moe.py [--rounds 5] [--tokens 128] [--positions 150]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil
from common import invite_token, served, serving_ready, wait_http
from split import LOCAL, Procs, decode_tps, start_llama

from mesh_llm.engine.probes import free_loopback_port
from mesh_llm.engine.provision import provide_engine
from mesh_llm.models.gguf_file import inspect_model
from mesh_llm.models.moe_shard import write_shard
from mesh_llm.models.tiny import TinyModelSpec, write_tiny_model
from mesh_llm.plan.experts import NotShardable, assign_experts, core_size, default_ranking
from mesh_llm.serving.prepare import memory_need

TINY = TinyModelSpec(n_experts=8, n_experts_used=2, seed=17, name="moe-tiny")
BIG = TinyModelSpec(n_layers=8, n_embd=1024, n_ff=384, n_heads=16, n_kv_heads=4, dtype="f16", n_experts=32, n_experts_used=4, seed=11, name="moe-650m")
NODES = ["a", "b", "c"]
CTX = 1024
TEXT = (
    "The history of the printing press begins in the middle of the fifteenth century, when a goldsmith "
    "in Mainz combined movable metal type, an oil based ink and a wooden screw press. Within fifty years "
    "there were presses in more than two hundred cities, and the price of a book fell so far that ordinary "
    "people could own one."
)

BUILD = r"""
import json, sys, time
from pathlib import Path
from mesh_llm.models.moe_shard import write_shard
def status_mb(key):  # VmHWM, not ru_maxrss: that one keeps the spawning bench process's peak across exec
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
base = status_mb("VmRSS")
t0 = time.perf_counter()
write_shard(Path(sys.argv[1]), Path(sys.argv[2]), [int(e) for e in sys.argv[3].split(",")])
took = time.perf_counter() - t0
print(json.dumps({"build_s": took, "peak_mb": status_mb("VmHWM"), "base_mb": base}))
"""


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds used on this machine so far, of which by this bench and its children): the
    machine is shared, so what others ran during the timed rounds is reported beside the figures."""
    total = psutil.cpu_times()
    busy = total.user + total.nice + total.system + getattr(total, "irq", 0.0) + getattr(total, "softirq", 0.0)
    mine = 0.0
    for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            t = p.cpu_times()
            mine += t.user + t.system
        except psutil.Error:
            pass
    return busy, mine


def build_shard(src: Path, dst: Path, keep: tuple[int, ...]) -> dict:
    out = subprocess.run([sys.executable, "-c", BUILD, str(src), str(dst), ",".join(map(str, keep))], capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"building the shard failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


async def start_split(procs: Procs, root: Path, model: Path, tag: str) -> str:
    """Three nodes, none able to hold the model alone: A (the largest cap, so the host) and workers B, C."""
    need_gb = memory_need(inspect_model(model), CTX) / 1e9
    caps = {"a": 0.40 * need_gb, "b": 0.35 * need_gb, "c": 0.35 * need_gb}
    ports = {n: free_loopback_port() for n in NODES}
    # --split: these nodes would shard the model by experts by themselves; the comparison wants layers
    common = [sys.executable, "-m", "mesh_llm", "--model", str(model), "--ctx-size", str(CTX), "--split", *LOCAL]

    def start(n: str, *extra: str):  # type: ignore[no-untyped-def]
        return procs.start(f"split-{n}-{tag}", [*common, "--max-vram", f"{caps[n]:.6f}", *extra, "--port", str(ports[n]), "--state-dir", str(root / f"{n}-{tag}")])

    a = start("a")
    token = await invite_token(root / f"split-a-{tag}.log")
    start("b", "--join", token)
    start("c", "--join", token)
    base = f"http://127.0.0.1:{ports['a']}"
    doc = await wait_http(base + "/api/status", a, ok=serving_ready)
    workers = served(doc).get("split", {}).get("workers", [])
    if len(workers) != 2:
        raise SystemExit(f"expected a 3-node split, got workers {workers}")
    return base


async def next_tokens(session: aiohttp.ClientSession, base: str, ids: list[int], positions: int) -> list[int]:
    """Greedy next token after every prefix ids[:1], ids[:2], … (teacher-forced)."""
    out = []
    for i in range(1, min(len(ids), positions + 1)):
        body = {"prompt": ids[:i], "n_predict": 1, "temperature": 0, "top_k": 1, "cache_prompt": True, "return_tokens": True, "ignore_eos": True}
        async with session.post(base + "/completion", json=body) as r:
            doc = await r.json()
        if not doc.get("tokens"):
            raise SystemExit(f"no token from {base}: {str(doc)[:300]}")
        out.append(int(doc["tokens"][0]))
    return out


async def top1_agreement(full: str, shard: str, positions: int) -> tuple[float, int]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        async with s.post(full + "/tokenize", json={"content": TEXT}) as r:
            ids = [int(t) for t in (await r.json())["tokens"]]
        a = await next_tokens(s, full, ids, positions)
        b = await next_tokens(s, shard, ids, positions)
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a), len(a)


async def bench_model(spec: TinyModelSpec, args: argparse.Namespace, engine) -> dict:  # type: ignore[no-untyped-def]
    root = Path(tempfile.mkdtemp(prefix="bench-moe-"))
    procs = Procs(root)
    try:
        model = write_tiny_model(root / f"{spec.name}.gguf", spec)
        info = inspect_model(model)
        n = info.n_experts
        core = core_size(n)
        plan = assign_experts(default_ranking(n), NODES, core, info.n_experts_used, info.n_expert_groups)
        if isinstance(plan, NotShardable):
            raise SystemExit(f"{spec.name}: {plan.reason}")
        keep = plan["a"]
        shard = root / f"{spec.name}-shard-a.gguf"
        build = build_shard(model, shard, keep)
        print(f"== {spec.name}: {model.stat().st_size / 1e6:.0f} MB, {n} experts ({info.n_experts_used} used); "
              f"shard of node a: {len(keep)} experts (core {core}), {shard.stat().st_size / 1e6:.0f} MB, "
              f"built in {build['build_s']:.2f} s, peak RSS {build['peak_mb']:.0f} MB", flush=True)

        full_url, _ = await start_llama(procs, engine, "full", model, [])
        shard_url, _ = await start_llama(procs, engine, "shard", shard, [])
        # control: a "shard" keeping every expert is the full model rewritten; its agreement must be 1
        control = root / f"{spec.name}-all.gguf"
        write_shard(model, control, range(n))
        control_url, control_proc = await start_llama(procs, engine, "control", control, [])
        agreement, positions = await top1_agreement(full_url, shard_url, args.positions)
        control_agreement, _ = await top1_agreement(full_url, control_url, args.positions)
        procs.stop(control_proc)
        print(f"  top-1 agreement over {positions} teacher-forced positions: {agreement:.3f} (control, every expert kept: {control_agreement:.3f})", flush=True)

        split_url = await start_split(procs, root, model, spec.name)
        urls = {"full": full_url, "shard": shard_url, "split": split_url}
        for url in urls.values():  # warm-up
            await decode_tps(url, 8)
        rates: dict[str, list[float]] = {k: [] for k in urls}
        order = list(urls.items())
        busy0, mine0, t0 = *cpu_seconds(), time.monotonic()
        for r in range(args.rounds):
            for label, url in order if r % 2 == 0 else reversed(order):
                rates[label].append(await decode_tps(url, args.tokens))
        busy1, mine1, wall = *cpu_seconds(), time.monotonic() - t0
        foreign = max(0.0, (busy1 - busy0) - (mine1 - mine0)) / wall  # CPUs' worth used by others meanwhile
        med = {k: statistics.median(v) for k, v in rates.items()}
        for k, v in rates.items():
            print(f"  decode tok/s {k:5s}: median {med[k]:.2f} of " + ", ".join(f"{x:.0f}" for x in v), flush=True)
        print(f"  other processes on this machine used {foreign:.2f} of {os.cpu_count()} CPUs during the timed rounds", flush=True)
        return {
            "model": spec.name,
            "shard_over_solo": round(med["shard"] / med["full"], 3),
            "shard_over_layer_split": round(med["shard"] / med["split"], 3),
            "top1_agreement": round(agreement, 3),
            "top1_control": round(control_agreement, 3),
            "build_s": round(build["build_s"], 2),
            "build_peak_mb": round(build["peak_mb"], 1),
            "build_base_mb": round(build["base_mb"], 1),
            "full_tps": round(med["full"], 2),
            "tps_rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
            "shard_tps": round(med["shard"], 2),
            "layer_split_tps": round(med["split"], 2),
            "positions": positions,
            "experts": n,
            "experts_used": info.n_experts_used,
            "kept_experts": len(keep),
            "core": core,
            "full_mb": round(model.stat().st_size / 1e6, 1),
            "shard_mb": round(shard.stat().st_size / 1e6, 1),
            "rounds": args.rounds,
            "tokens": args.tokens,
            "cpus": os.cpu_count(),
            "foreign_cpus_during_rounds": round(foreign, 2),
        }
    finally:
        procs.stop_all()
        shutil.rmtree(root, ignore_errors=True)


async def run(args: argparse.Namespace) -> None:
    from rich.console import Console

    engine = provide_engine(None, None, Console(stderr=True))
    tiny = await bench_model(TINY, args, engine)
    big = await bench_model(BIG, args, engine)
    note = "random-weight generated models: top1_agreement shows how often a token's routed experts were kept, not quality on real text"
    print(json.dumps({**big, "tiny": tiny, "note": note}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--positions", type=int, default=150)
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
