"""Member and client tokens: a client token admits its holder to the mesh's API and nothing else."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest

from mesh_llm.mesh import auth
from mesh_llm.mesh.handshake import Refused
from mesh_llm.mesh.identity import MeshCredentials
from mesh_llm.mesh.peers import HostedModel
from mesh_llm.mesh.token import InviteToken, TokenError, client_token, decode_token
from mesh_llm.mesh.wire import FramedReader, StreamKind
from tests.conftest import LOCAL, assert_one_line_error, free_port, run_cli
from tests.mesh_helpers import make_mesh, wait_until
from tests.test_e2e_mesh import chat


def _b64(doc: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()


def test_a_client_token_carries_a_secret_that_cannot_admit_a_member() -> None:
    creds = MeshCredentials.generate()
    member = InviteToken(creds, b"\x01" * 32, ("127.0.0.1:5000",))
    client = decode_token(client_token(member).encode())
    assert client.mesh.kind == "client" and client.mesh.mesh_id == creds.mesh_id
    assert client.mesh.secret != creds.secret
    assert client.mesh.secret_for("member") is None  # a client has no member key to prove with
    assert client.mesh.secret_for("client") == creds.secret_for("client")  # both ends agree on the clients' key
    assert client.mesh.for_clients() == client.mesh  # and a client's client token is itself


def test_old_tokens_are_member_tokens_and_unknown_kinds_are_refused() -> None:
    creds = MeshCredentials.generate()
    v1 = {"v": 1, "mesh": creds.mesh_id.hex(), "secret": creds.secret.hex(), "id": "01" * 32, "addrs": ["127.0.0.1:5000"]}
    assert decode_token(_b64(v1)).mesh == creds  # kind member
    assert decode_token(_b64({**v1, "kind": "client"})).mesh.kind == "member"  # v1 knows no kinds
    with pytest.raises(TokenError, match="unknown kind"):
        decode_token(_b64({**v1, "v": 2, "kind": "admin"}))


def test_proofs_of_one_kind_never_pass_as_the_other() -> None:
    key, a, b = b"k" * 32, b"a" * 32, b"b" * 32
    n1, n2 = auth.new_nonce(), auth.new_nonce()
    assert not auth.check(auth.proof(key, "dialer", a, b, n1, n2, "client"), auth.proof(key, "dialer", a, b, n1, n2, "member"))


async def test_a_client_token_holder_is_a_client_whatever_its_record_says() -> None:
    creds = MeshCredentials.generate()
    a = make_mesh(creds, name="a")
    await a.start()
    served: list[str] = []

    async def http(peer: str, header: dict, send, reader: FramedReader) -> None:  # type: ignore[no-untyped-def]
        served.append(peer)
        await send.write_all(b"hello")
        await send.finish()

    async def rpc(peer: str, header: dict, send, reader: FramedReader) -> None:  # type: ignore[no-untyped-def]
        served.append("rpc")

    a.on_stream(StreamKind.HTTP, http)
    a.on_stream(StreamKind.RPC, rpc)
    # The rogue claims to be a standby with memory that serves a model: none of it may count.
    rogue = make_mesh(creds.for_clients(), role="standby", name="rogue", served=("bait",))
    rogue.me = type(rogue.me)(**{**rogue.me.__dict__, "vram_bytes": 10**12, "free_bytes": 10**12, "hosting": (HostedModel("bait", "ready"),)})
    await rogue.start()
    await rogue.join([decode_token(a.token("client") or "")])
    await wait_until(lambda: len(a.members()) == 1)
    seen = a.members()[0].record
    assert (seen.role, seen.hosting, seen.vram_bytes, seen.models_served) == ("client", (), 0, ())
    assert a.is_client(rogue.me.id)
    assert not rogue.is_client(a.me.id)  # the member it joined is one

    # Only HTTP streams: an RPC stream is reset before any handler sees it.
    send, recv = await rogue.open_stream(a.me.id, StreamKind.RPC, {"model": "bait"})
    with pytest.raises(Exception):  # noqa: B017 - iroh reports the reset as its own error type
        await asyncio.wait_for(recv.read_to_end(1024), 10)
    await wait_until(lambda: any("does not allow RPC" in line for line in a.logs))  # type: ignore[attr-defined]
    send, recv = await rogue.open_stream(a.me.id, StreamKind.HTTP, {"model": "x"})
    assert await asyncio.wait_for(recv.read_to_end(1024), 10) == b"hello"
    assert served == [rogue.me.id]

    # Even after gossip the record stays a client's, and a's token minting still works.
    await asyncio.sleep(2)
    assert a.members()[0].record.role == "client" and a.members()[0].record.hosting == ()
    assert rogue.token() is None  # a client holds no secret to make tokens from
    await rogue.close()
    await a.close()


async def test_a_client_cannot_admit_members_and_a_wrong_client_secret_is_refused() -> None:
    creds = MeshCredentials.generate()
    a = make_mesh(creds, name="a")
    await a.start()
    c = make_mesh(creds.for_clients(), role="client", name="c")
    await c.start()
    member = make_mesh(creds, name="m")
    await member.start()
    # c's endpoint cannot admit a member: it holds no mesh secret to prove with.
    c_addr = InviteToken(creds, bytes.fromhex(c.me.id), c.me.addrs)
    with pytest.raises(Refused, match="client token"):
        await member.join([c_addr])
    forged = make_mesh(MeshCredentials(creds.mesh_id, b"\x00" * 32, "client"), role="client", name="forged")
    await forged.start()
    with pytest.raises(Refused, match="secret"):
        await forged.join([decode_token(a.token("client") or "")])
    assert a.members() == []
    for m in (forged, member, c, a):
        await m.close()


@pytest.mark.engine
def test_a_node_started_with_a_client_token_runs_as_a_client(start_node, tiny_model: Path, engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a = start_node("--model", str(tiny_model), *LOCAL)
    a.wait_ready()
    member_token = a.token()
    printed = a.wait_output("Client token: ").split("Client token: ", 1)[1].split()[0]
    got = run_cli("token", "--client", "--port", str(a.port))
    assert got.returncode == 0 and got.stdout.strip() == printed
    assert run_cli("token", "--port", str(a.port)).stdout.strip() == member_token
    assert decode_token(printed).mesh.kind == "client"

    # Serving with it is refused in one line; without --model it is a client, no --client needed.
    assert_one_line_error(run_cli("--join", printed, "--model", str(tiny_model), "--port", str(free_port()), "--state-dir", str(tmp_path / "x")), "client token")
    c = start_node("--join", printed, *LOCAL)
    c.wait_ready()
    assert "as a client" in c.output()
    assert chat(c.port, "tiny-llama")["choices"]
    roles = {n["id"]: n["role"] for n in a.status()["nodes"]}
    assert roles[c.node_id()] == "client"
    assert run_cli("token", "--port", str(c.port)).returncode == 1  # a client has no token to give


@pytest.mark.engine
async def test_a_rogue_client_token_holder_cannot_serve_or_reach_workers(start_node, split_model: Path, engine) -> None:  # type: ignore[no-untyped-def]
    # A real two-node split: b lends its worker to a. The rogue holds only the client token.
    a = start_node("--model", str(split_model), "--ctx-size", "256", "--split", "--max-vram", "1", *LOCAL)
    a.wait_output("Invite token: ")
    b = start_node("--model", str(split_model), "--ctx-size", "256", "--split", "--max-vram", "1", "--join", a.token(), *LOCAL)
    a.wait_ready()
    b.wait_ready()
    model = a.status()["serving"][0]["model"]
    rogue = make_mesh(decode_token(a.token()).mesh.for_clients(), role="standby", name="rogue")
    rogue.me = type(rogue.me)(**{**rogue.me.__dict__, "vram_bytes": 10**12, "free_bytes": 10**12, "models_on_disk": (model,),
                                 "hosting": (HostedModel("bait", "ready"), HostedModel(model, "ready"))})
    await rogue.start()
    client_tok = a.wait_output("Client token: ").split("Client token: ", 1)[1].split()[0]
    await rogue.join([decode_token(client_tok)])
    await wait_until(lambda: rogue.me.id in b.peer_ids() and rogue.me.id in a.peer_ids())  # it dialed b from a's hints
    await asyncio.sleep(3)  # two heartbeats: its record has been heard
    for node in (a, b):
        doc = node.status()
        assert {n["id"]: n["role"] for n in doc["nodes"]}[rogue.me.id] == "client"
        assert "bait" not in doc["api"]["models"] and rogue.me.id not in sum(doc["api"]["servers"].values(), [])
    # The worker refuses its RPC stream: it is not the host, and a client may not open one.
    send, recv = await rogue.open_stream(b.node_id(), StreamKind.RPC, {"model": model})
    with pytest.raises(Exception):  # noqa: B017 - iroh's own error type for a reset stream
        await asyncio.wait_for(recv.read_to_end(1024), 10)
    assert chat(a.port, model)["choices"]  # the split still serves
    await rogue.close()
