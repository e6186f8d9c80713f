"""Speculative decoding: decode tok/s with and without a draft model, solo and split.

Pairing: the real Gemma 3 270M (Q4_K_M, from PyPI) drafts for itself. It is the
only real model this offline machine has, and a draft must share the target's
vocabulary. A self-draft predicts the target's greedy choice almost always, so
this measures the mechanism at high acceptance: every accepted token saves one
pass through the target, and in a split every pass costs a network round trip,
while the draft runs on the host alone. With a catalog pairing (e.g. a 32B
target and its 0.5B draft) the draft is far cheaper than the target, so the
saving per accepted token is larger; acceptance depends on the text.

Configurations, each with and without `--draft` (both up at once, measured in
alternating rounds): one solo node; a two-node split (`--split --tensor-split 1,1`)
on loopback with 0 ms and 20 ms injected in the host's RPC tunnel.
Decode tok/s and draft counts come from llama-server's own timings. For the splits, the
round trip the host's tunnel timed is read back and checked against the injected delay
(a run where the delay did not take effect stops without printing figures).
The last line is one JSON object.

    .venv/bin/python bench/speculative.py [--rounds 3] [--tokens 128] [--draft-max 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import aiohttp
from common import serving_ready, tunnel_rtt_ms, wait_http
from split import LOCAL, Procs, start_mesh

from mesh_llm.engine.probes import free_loopback_port

MODEL = "gemma-3-270m"
PROMPT = "Write a Python function `merge_intervals(intervals)` that merges overlapping intervals, with a docstring and two doctests."


async def generate(base: str, tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(base + "/v1/chat/completions", json=body, timeout=aiohttp.ClientTimeout(total=600)) as r:
            doc = await r.json()
    if "timings" not in doc:
        raise SystemExit(f"no timings in reply from {base}: {str(doc)[:300]}")
    return doc["timings"]


async def start_solo(procs: Procs, root: Path, tag: str, extra: tuple[str, ...]) -> str:
    port = free_loopback_port()
    argv = [sys.executable, "-m", "mesh_llm", "--model", MODEL, "--ctx-size", "1024", *extra, *LOCAL, "--port", str(port), "--state-dir", str(root / tag)]
    p = procs.start(tag, argv)
    base = f"http://127.0.0.1:{port}"
    await wait_http(base + "/api/status", p, ok=serving_ready)
    return base


async def measure(bases: dict[str, str], args: argparse.Namespace) -> dict[str, dict]:
    """Median decode tok/s per label over alternating rounds, plus summed draft counts."""
    for base in bases.values():
        await generate(base, 8)  # warm-up
    tps: dict[str, list[float]] = {k: [] for k in bases}
    drafted = dict.fromkeys(bases, 0)
    accepted = dict.fromkeys(bases, 0)
    for r in range(args.rounds):
        for label in (list(bases) if r % 2 == 0 else list(reversed(bases))):
            t = await generate(bases[label], args.tokens)
            tps[label].append(float(t["predicted_per_second"]))
            drafted[label] += int(t.get("draft_n", 0))
            accepted[label] += int(t.get("draft_n_accepted", 0))
    return {k: {"tps": statistics.median(v), "drafted": drafted[k], "accepted": accepted[k]} for k, v in tps.items()}


async def run(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-spec-"))
    procs = Procs(root)
    draft = ("--draft", MODEL, "--draft-max", str(args.draft_max))
    results: dict[str, dict] = {}
    try:
        configs: list[tuple[str, int | None]] = [("solo", None), ("split_0ms", 0), ("split_20ms", 20)]
        for name, delay in configs:
            if delay is None:
                bases = {"plain": await start_solo(procs, root, "solo-plain", ("--no-draft",)),
                         "draft": await start_solo(procs, root, "solo-draft", draft)}
            else:
                plain, _, _ = await start_mesh(procs, root, MODEL, delay, f"{name}-plain", ("--no-draft",))
                with_draft, _, _ = await start_mesh(procs, root, MODEL, delay, f"{name}-draft", draft)
                bases = {"plain": plain, "draft": with_draft}
            m = await measure(bases, args)
            rtt = {label: await tunnel_rtt_ms(base, delay) for label, base in bases.items()} if delay is not None else None
            acceptance = m["draft"]["accepted"] / m["draft"]["drafted"] if m["draft"]["drafted"] else 0.0
            results[name] = {
                "tps_plain": round(m["plain"]["tps"], 2),
                "tps_draft": round(m["draft"]["tps"], 2),
                "speedup": round(m["draft"]["tps"] / m["plain"]["tps"], 3),
                "acceptance": round(acceptance, 3),
                "drafted": m["draft"]["drafted"],
                **({"tunnel_rtt_ms": {k: {"fastest": round(v[0], 2), "median": round(v[1], 2)} for k, v in rtt.items()}} if rtt else {}),
            }
            print(f"{name:>10}: {results[name]}", flush=True)
            procs.stop_all()
            procs.procs.clear()
    finally:
        procs.stop_all()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({
        "pairing": f"{MODEL} target, {MODEL} self-draft (only real model offline)",
        "acceptance": results["split_20ms"]["acceptance"],
        "speedup_split_20ms": results["split_20ms"]["speedup"],
        "speedup_split_0ms": results["split_0ms"]["speedup"],
        "speedup_solo": results["solo"]["speedup"],
        "configs": results,
        "draft_max": args.draft_max, "tokens": args.tokens, "rounds": args.rounds, "cpus": os.cpu_count(),
    }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--draft-max", type=int, default=8)
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
