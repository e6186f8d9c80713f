"""The tunnel's RPC command counter, fed the byte stream in arbitrary pieces."""

import struct

from hypothesis import given
from hypothesis import strategies as st

from mesh_llm.mesh.rpc_traffic import NAME_OFFSET, RPC_TENSOR_SIZE, RpcTraffic


def command(cmd: int, payload: bytes) -> bytes:
    return struct.pack("<BQ", cmd, len(payload)) + payload


def tensor(name: str) -> bytes:
    raw = bytearray(RPC_TENSOR_SIZE)
    raw[NAME_OFFSET:NAME_OFFSET + len(name)] = name.encode()
    return bytes(raw)


def set_tensor(name: str, data: bytes) -> bytes:
    return command(6, tensor(name) + b"\0" + struct.pack("<Q", 0) + data)


STREAM = b"".join([
    command(14, bytes(24)),  # HELLO: a round trip
    command(18, tensor("blk.0.attn_q.weight") + struct.pack("<QQ", 0, 4096)),  # loaded locally
    set_tensor("blk.0.ffn_up.weight", b"w" * 1000),  # a weight that crossed
    set_tensor("inp_embd", b"a" * 64),  # an activation
    command(16, struct.pack("<I", 0)),  # GRAPH_RECOMPUTE: one-way
    command(8, tensor("out") + struct.pack("<QQ", 0, 16)),  # GET_TENSOR: a round trip
    command(15, b""),  # empty payload
])


def check(t: RpcTraffic) -> None:
    assert t.bytes_sent == len(STREAM)
    assert t.round_trips == 4  # HELLO, SET_TENSOR_GGUF, GET_TENSOR, DEVICE_COUNT
    assert t.local_loads == 1
    assert t.weight_bytes == 1000
    assert t.commands["SET_TENSOR"] == 2 and t.commands["GRAPH_RECOMPUTE"] == 1
    assert t.layers == {0} and not t.output


def test_counts_a_whole_stream() -> None:
    t = RpcTraffic(frozenset({"blk.0.ffn_up.weight", "blk.0.attn_q.weight"}))
    t.connection().feed(STREAM)
    check(t)


@given(st.lists(st.integers(1, 400), max_size=40))
def test_counts_the_same_in_any_chunking(cuts) -> None:
    t = RpcTraffic(frozenset({"blk.0.ffn_up.weight"}))
    parser = t.connection()
    pos = 0
    for n in cuts:
        parser.feed(STREAM[pos:pos + n])
        pos += n
    parser.feed(STREAM[pos:])
    check(t)


def test_round_trip_times_run_from_a_blocking_command_to_its_answer() -> None:
    t = RpcTraffic()
    parser = t.connection()
    assert t.snapshot()["rtt_ms"] is None
    parser.feed(command(14, bytes(24))[:5], now=1.0)  # HELLO, not yet all sent
    parser.answered(1.5)  # stray bytes with nothing awaiting an answer: no sample
    parser.feed(command(14, bytes(24))[5:], now=2.0)
    parser.feed(command(16, struct.pack("<I", 0)), now=2.1)  # one-way: awaits nothing
    parser.answered(2.25)
    parser.answered(2.5)  # the rest of the same answer
    parser.feed(command(15, b""), now=3.0)
    parser.answered(3.01)
    assert [round(r, 3) for r in t.rtts] == [0.25, 0.01]
    assert t.snapshot()["rtt_ms"] == {"min": 10.0, "median": 130.0, "samples": 2}
