"""What a split costs on the wire: llama.cpp RPC commands counted in the tunnel (pure).

The host's RPC tunnels feed every byte llama-server sends to a worker through
a `RpcStreamParser` (one per connection: framing restarts with each). A
request is `cmd:u8 | size:u64 | payload`; commands in `REPLY_COMMANDS` block
the host until the worker answers, so they are the network round trips.
Weight bytes are SET_TENSOR payloads for tensors named like the model's own
weights (activations and graph inputs have other names). The round-trip time
of a blocking command runs from its last byte entering the tunnel to the first
bytes of the answer coming back (llama.cpp's client waits for each answer
before it sends on, so answers come back in order).
"""

from __future__ import annotations

import re
import statistics
import struct
from collections import Counter, deque
from dataclasses import dataclass, field

COMMANDS = {
    0: "ALLOC_BUFFER", 1: "GET_ALIGNMENT", 2: "GET_MAX_SIZE", 3: "BUFFER_GET_BASE", 4: "FREE_BUFFER",
    5: "BUFFER_CLEAR", 6: "SET_TENSOR", 7: "SET_TENSOR_HASH", 8: "GET_TENSOR", 9: "COPY_TENSOR",
    10: "GRAPH_COMPUTE", 11: "GET_DEVICE_MEMORY", 12: "INIT_TENSOR", 13: "GET_ALLOC_SIZE", 14: "HELLO",
    15: "DEVICE_COUNT", 16: "GRAPH_RECOMPUTE", 17: "MEMSET_TENSOR", 18: "SET_TENSOR_GGUF",
}
REPLY_COMMANDS = frozenset({0, 1, 2, 3, 7, 8, 9, 11, 13, 14, 15, 18})
SET_TENSOR, SET_TENSOR_GGUF = 6, 18
RPC_TENSOR_SIZE = 296
NAME_OFFSET, NAME_SIZE = 228, 64  # rpc_tensor.name inside the packed struct
SET_TENSOR_HEADER = RPC_TENSOR_SIZE + 1 + 8  # tensor, cache flag, offset; then the data
_LAYER = re.compile(r"^blk\.(\d+)\.")
OUTPUT_TENSORS = ("output.weight", "output_norm.weight")
RTT_SAMPLES = 256  # the latest round trips kept per tunnel


@dataclass
class RpcTraffic:
    """Totals over every connection of one tunnel."""

    weight_names: frozenset[str] = frozenset()
    commands: Counter[str] = field(default_factory=Counter)
    bytes_sent: int = 0
    round_trips: int = 0
    weight_bytes: int = 0  # weight data that crossed (what zero-transfer loading avoids)
    local_loads: int = 0  # SET_TENSOR_GGUF requests: weights the worker read from its own disk
    layers: set[int] = field(default_factory=set)  # layers whose weights went to this worker
    output: bool = False  # and whether the output head did: where llama.cpp really put them
    rtts: deque[float] = field(default_factory=lambda: deque(maxlen=RTT_SAMPLES))  # seconds, latest last

    def connection(self) -> RpcStreamParser:
        return RpcStreamParser(self)

    def snapshot(self) -> dict[str, object]:
        return {
            "bytes_sent": self.bytes_sent,
            "round_trips": self.round_trips,
            "weight_bytes": self.weight_bytes,
            "local_loads": self.local_loads,
            "layers": sorted(self.layers),
            "output": self.output,
            "commands": dict(self.commands),
            "rtt_ms": rtt_summary(self.rtts),
        }


def rtt_summary(rtts: deque[float]) -> dict[str, float | int] | None:
    """Min and median of the latest round trips, in ms (None before the first)."""
    if not rtts:
        return None
    return {"min": round(min(rtts) * 1000, 3), "median": round(statistics.median(rtts) * 1000, 3), "samples": len(rtts)}


class RpcStreamParser:
    """Incremental parser for one client→server byte stream (and the timing of its answers)."""

    def __init__(self, totals: RpcTraffic) -> None:
        self.totals = totals
        self._head = bytearray()  # command header, then the first bytes of the payload we inspect
        self._cmd = -1
        self._left = 0  # payload bytes still to skip
        self._want = 0  # payload bytes to keep for inspection
        self._now = 0.0
        self._awaiting: deque[float] = deque()  # when each blocking command was fully sent, oldest first

    def feed(self, data: bytes | memoryview, now: float = 0.0) -> None:
        """Bytes llama-server sent towards the worker, seen at time `now` (seconds)."""
        self._now = now
        self.totals.bytes_sent += len(data)
        view = memoryview(data)
        while view:
            if self._cmd < 0:
                take = min(9 - len(self._head), len(view))
                self._head += view[:take]
                view = view[take:]
                if len(self._head) == 9:
                    self._start(self._head[0], struct.unpack_from("<Q", self._head, 1)[0])
                continue
            if self._want:
                take = min(self._want, len(view))
                self._head += view[:take]
                self._want -= take
                self._left -= take
                view = view[take:]
                if not self._want:
                    self._inspect()
                continue
            take = min(self._left, len(view))
            self._left -= take
            view = view[take:]
            if not self._left:
                self._end()

    def answered(self, now: float) -> None:
        """Bytes came back from the worker at `now`: the oldest blocking command has its answer."""
        if self._awaiting:
            self.totals.rtts.append(now - self._awaiting.popleft())

    def _end(self) -> None:
        if self._cmd in REPLY_COMMANDS:
            self._awaiting.append(self._now)
        self._cmd = -1
        self._head.clear()

    def _start(self, cmd: int, size: int) -> None:
        self._cmd, self._left = cmd, size
        self._head.clear()
        t = self.totals
        t.commands[COMMANDS.get(cmd, f"CMD_{cmd}")] += 1
        if cmd in REPLY_COMMANDS:
            t.round_trips += 1
        if cmd == SET_TENSOR_GGUF:
            t.local_loads += 1
        inspect = (cmd == SET_TENSOR and size >= SET_TENSOR_HEADER) or (cmd == SET_TENSOR_GGUF and size >= RPC_TENSOR_SIZE)
        self._want = RPC_TENSOR_SIZE if inspect else 0
        if not self._left:
            self._end()

    def _inspect(self) -> None:
        name = bytes(self._head[NAME_OFFSET:NAME_OFFSET + NAME_SIZE]).split(b"\0", 1)[0].decode("utf-8", "replace")
        t = self.totals
        if name in t.weight_names:
            if self._cmd == SET_TENSOR:
                t.weight_bytes += self._left + RPC_TENSOR_SIZE - SET_TENSOR_HEADER
            if m := _LAYER.match(name):
                t.layers.add(int(m.group(1)))
            elif name in OUTPUT_TENSORS:
                t.output = True
        self._head.clear()
        if not self._left:
            self._end()
