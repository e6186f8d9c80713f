"""A kill storm on a split: how many requests complete, how fast it serves again, needless restarts.

A tiny split model over three capped nodes (host + 2 workers), a spare, and a `--client`
node in front. K streams run in a loop through the client while a worker node is killed
with `kill -9` N times (each time started again, so a spare is there for the next kill).
Reported:
  - completed_fraction: requests that ended without an error ÷ all requests started,
  - recover_p50_s / recover_max_s: from the kill to the host's split being ready again,
  - needless_restarts: llama-server restarts whose cause (the host's /metrics) is not
    "workers changed", plus "workers changed" restarts beyond one per kill (joins and leaves
    that do not touch a split, the victim coming back as a spare included, must not restart it),
  - unserved_pickup_s / unserved_pickup_max_s: the demand scenario, after the kills: a standby
    joins with a second tiny model `--on-demand` (and a short --idle-unload); a request for that
    model, which nobody serves, goes through the client; measured from sending it to its answer
    (the standby picks the model up, loads it, and the request waits for it). Repeated
    --pickups times, each after the standby unloaded the model again as idle; the median and
    the slowest,
  - host_loss_pickup_s: then a node hosts that model with --model and is killed with `kill -9`;
    from the kill to the first answer for it through the client (requests retried at once on
    failure), which the standby serves after picking it up.
The last line is one JSON object.

    .venv/bin/python bench/churn.py [--kills 4] [--streams 3] [--tokens 64] [--pickups 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from common import invite_token, served, serving_ready, wait_http
from split import LOCAL, Procs

from mesh_llm.engine.probes import free_loopback_port
from mesh_llm.models.tiny import TinyModelSpec, write_tiny_model
from mesh_llm.serving.prepare import ModelOptions, prepare

SPEC = TinyModelSpec(n_layers=8, n_embd=256, n_ff=512, seed=3, name="churn-tiny")
SPARE = TinyModelSpec(seed=7, name="spare-tiny")  # served by nobody until demand picks it up
IDLE_UNLOAD_SECS = 4
CTX = ["--ctx-size", "1024"]


class Node:
    def __init__(self, procs: Procs, root: Path, name: str, args: list[str]) -> None:
        self.procs, self.root, self.name, self.args = procs, root, name, args
        self.port = free_loopback_port()
        self.proc = procs.start(name, self.argv())

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "mesh_llm", *self.args, "--port", str(self.port), "--state-dir", str(self.root / self.name), *LOCAL]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restart(self) -> None:
        self.proc = self.procs.start(self.name + "-again", self.argv())


async def status(base: str) -> dict:
    async with aiohttp.ClientSession() as s, s.get(base + "/api/status", timeout=aiohttp.ClientTimeout(total=5)) as r:
        return await r.json()


async def restarts(base: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(base + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("mesh_llm_plan_restarts_total{"):
            cause = line.split('cause="', 1)[1].split('"', 1)[0]
            out[cause] = out.get(cause, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


async def stream_loop(base: str, model: str, tokens: int, stop: asyncio.Event, tally: dict[str, int]) -> None:
    body = {"model": model, "prompt": "hello", "max_tokens": tokens, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        while not stop.is_set():
            tally["started"] += 1
            ok = False
            try:
                async with s.post(base + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=120)) as r:
                    text = (await r.read()).decode(errors="replace") if r.status == 200 else ""
                    ok = r.status == 200 and "data: [DONE]" in text and '"error"' not in text
            except (TimeoutError, aiohttp.ClientError):
                ok = False
            tally["completed" if ok else "failed"] += 1
            if not ok:
                await asyncio.sleep(0.2)  # as a client would before retrying


async def runtime_models(base: str) -> list[str]:
    async with aiohttp.ClientSession() as s, s.get(base + "/api/runtime", timeout=aiohttp.ClientTimeout(total=5)) as r:
        return [m["model"] for m in (await r.json())["models"]]


async def unserved_pickups(procs: Procs, root: Path, token: str, client: Node, pickups: int) -> list[float]:
    """Seconds from a request for a model nobody serves (through the client) to its answer."""
    spare = write_tiny_model(root / "spare-tiny.gguf", SPARE)
    standby = Node(procs, root, "standby", ["--join", token, "--on-demand", str(spare), "--idle-unload", str(IDLE_UNLOAD_SECS), *CTX])
    await wait_http(client.base + "/api/status", client.proc, timeout=120,
                    ok=lambda d: any(n["on_demand"] == ["spare-tiny"] for n in d["nodes"]))
    body = {"model": "spare-tiny", "prompt": "hello", "max_tokens": 8}
    out: list[float] = []
    async with aiohttp.ClientSession() as s:
        for i in range(pickups):
            sent, sent_at = time.monotonic(), time.time()
            async with s.post(client.base + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=120)) as r:
                answer = await r.json()
            if r.status != 200:
                raise SystemExit(f"pickup {i + 1}: {r.status} {answer}")
            out.append(time.monotonic() - sent)
            decided = (await status(standby.base))["demand"]["decisions"][0]  # the newest: this pickup (same machine, same clock)
            print(f"pickup {i + 1}: answered after {out[-1]:.2f} s; the standby decided after {decided['at'] - sent_at:.2f} s")
            deadline = time.monotonic() + 120
            while "spare-tiny" in await runtime_models(standby.base):  # unloaded again as idle: unserved for the next round
                if time.monotonic() > deadline:
                    raise SystemExit("the standby did not unload spare-tiny as idle")
                await asyncio.sleep(0.3)
            await asyncio.sleep(1)
    return out


async def host_loss_pickup(procs: Procs, root: Path, token: str, client: Node) -> float:
    """Seconds from `kill -9` of the only host of a model (the standby has its file on demand)
    to the first answer for it through the client; requests are sent one after another,
    again at once (0.1 s) after each failure, as a client retrying would."""
    host = Node(procs, root, "spare-host", ["--join", token, "--model", str(root / "spare-tiny.gguf"), *CTX])
    await wait_http(client.base + "/api/status", client.proc, timeout=120, ok=lambda d: "spare-tiny" in d["api"]["servers"] and d["api"]["servers"]["spare-tiny"])
    body = {"model": "spare-tiny", "prompt": "hello", "max_tokens": 8}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        host.proc.kill()
        killed = time.monotonic()
        failures = 0
        while time.monotonic() - killed < 120:
            try:
                async with s.post(client.base + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=60)) as r:
                    await r.read()
                    if r.status == 200:
                        took = time.monotonic() - killed
                        print(f"host loss: answered {took:.2f} s after the kill ({failures} request(s) failed before)")
                        return took
            except (TimeoutError, aiohttp.ClientError):
                pass
            failures += 1
            await asyncio.sleep(0.1)
    raise SystemExit("no answer for spare-tiny within 120 s of its host's loss")


async def run(args: argparse.Namespace) -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench-churn-"))
    model_path = write_tiny_model(root / "churn-tiny.gguf", SPEC)
    need = prepare(str(model_path), ModelOptions(ctx_size=1024), lambda line: None).need / 1e9
    host_cap, worker_cap = f"{0.40 * need:.6f}", f"{0.35 * need:.6f}"
    procs = Procs(root)
    try:
        host = Node(procs, root, "host", ["--model", str(model_path), *CTX, "--max-vram", host_cap])
        token = await invite_token(root / "host.log")
        workers = [Node(procs, root, f"w{i}", ["--model", str(model_path), *CTX, "--max-vram", worker_cap, "--join", token]) for i in range(3)]
        await wait_http(host.base + "/api/status", host.proc, ok=lambda d: serving_ready(d) and len(served(d)["split"]["spares"]) == 1)
        client = Node(procs, root, "client", ["--client", "--join", token])
        await wait_http(client.base + "/health", client.proc)
        model = served(await status(host.base))["model"]
        print(f"split ready: {served(await status(host.base))['split']['workers']} + a spare; {args.streams} streams through a client")
        stop = asyncio.Event()
        tally = {"started": 0, "completed": 0, "failed": 0}
        loops = [asyncio.ensure_future(stream_loop(client.base, model, args.tokens, stop, tally)) for _ in range(args.streams)]
        await asyncio.sleep(3)
        recover: list[float] = []
        by_id = {(await status(w.base))["node"]["id"]: w for w in workers}
        for k in range(args.kills):
            doc = await status(host.base)
            victim = by_id[served(doc)["split"]["workers"][0]]
            victim.proc.kill()
            killed = time.monotonic()
            await asyncio.sleep(0.3)
            await wait_http(host.base + "/api/status", host.proc, timeout=120,
                            ok=lambda d, gone=victim: serving_ready(d) and all(by_id.get(w) is not gone for w in served(d)["split"]["workers"]))
            recover.append(time.monotonic() - killed)
            print(f"kill {k + 1}: serving again after {recover[-1]:.2f} s; requests so far {tally}")
            victim.restart()  # back as the next spare
            await wait_http(host.base + "/api/status", host.proc, timeout=120, ok=lambda d: len(served(d)["split"]["spares"]) == 1)
            await asyncio.sleep(2)
        stop.set()
        await asyncio.gather(*loops)
        causes = await restarts(host.base)
        print(f"requests {tally}; restarts by cause {causes}")
        pickups = await unserved_pickups(procs, root, token, client, args.pickups) if args.pickups else []
        loss = await host_loss_pickup(procs, root, token, client) if args.pickups else None
        return {
            "kills": args.kills,
            "streams": args.streams,
            "requests": tally["started"],
            "completed_fraction": round(tally["completed"] / max(1, tally["started"]), 4),
            "recover_p50_s": round(statistics.median(recover), 2) if recover else None,
            "recover_max_s": round(max(recover), 2) if recover else None,
            # each kill may change the workers once; any other cause, or more re-plans than kills, was needless
            "needless_restarts": int(sum(v for c, v in causes.items() if c != "workers changed")
                                     + max(0, causes.get("workers changed", 0) - args.kills)),
            "unserved_pickup_s": round(statistics.median(pickups), 2) if pickups else None,
            "unserved_pickup_max_s": round(max(pickups), 2) if pickups else None,
            "host_loss_pickup_s": round(loss, 2) if loss is not None else None,
        }
    finally:
        procs.stop_all()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=4)
    p.add_argument("--streams", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--pickups", type=int, default=3, help="requests for a model nobody serves, each after it was unloaded again (0: none)")
    result = asyncio.run(run(p.parse_args()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
