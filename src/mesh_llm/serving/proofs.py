"""The file proof's shell: challenging peers, answering challenges (see mesh/file_proof.py).

`FileProofs` asks each peer that claims one of this node's models once per (peer,
incarnation, fingerprint of our copy): one round trip per peer per model, not per plan.
Until a peer has passed, the fleet neither plans with it (as host or worker) nor routes
that model's prompts to it; a peer that fails is left out, with the reason on both
sides, and asked again after a while (a failure may have been the network's).
`serve_file_proofs` answers the challenges of others from this node's own copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh_llm.mesh.file_proof import Challenge, answer_from_file, new_challenge, out_of_file
from mesh_llm.mesh.mesh import Mesh, PeerGone
from mesh_llm.mesh.peers import PeerRecord
from mesh_llm.mesh.transport import describe, iroh
from mesh_llm.mesh.wire import FramedReader, ProtocolError, StreamKind, encode_frame, get_str
from mesh_llm.text import printable

PROVE_SECS = 10.0  # a peer has this long to answer a challenge
RETRY_SECS = 60.0  # a peer that failed is asked again after this long
ANSWERING = 2  # challenges this node answers at once (each reads at most 1 MiB)

Key = tuple[str, str, str]  # (peer id, its incarnation, the fingerprint of our copy)


@dataclass(frozen=True)
class Outcome:
    ok: bool
    at: float
    reason: str = ""


class FileProofs:
    def __init__(self, mesh: Mesh, warn: Callable[[str], None], on_result: Callable[[], None]) -> None:
        self.mesh, self.warn, self.on_result = mesh, warn, on_result
        self._outcomes: dict[Key, Outcome] = {}
        self._running: dict[Key, asyncio.Task[None]] = {}

    def proven(self, record: PeerRecord, fingerprint: str) -> bool:
        outcome = self._outcomes.get((record.id, record.incarnation, fingerprint))
        return outcome is not None and outcome.ok

    def keep_only(self, peers: set[tuple[str, str]]) -> None:
        """Forget the outcomes of peers (id, incarnation) that are gone: a restart is asked again."""
        self._outcomes = {k: o for k, o in self._outcomes.items() if k[:2] in peers}

    def ask(self, record: PeerRecord, model: str, path: Path, fingerprint: str) -> None:
        """Challenge `record`'s node for `model` unless it has passed, is being asked or failed lately."""
        key = (record.id, record.incarnation, fingerprint)
        outcome = self._outcomes.get(key)
        if key in self._running or (outcome is not None and (outcome.ok or time.monotonic() - outcome.at < RETRY_SECS)):
            return
        self._running[key] = asyncio.ensure_future(self._challenge(key, model, path))

    async def _challenge(self, key: Key, model: str, path: Path) -> None:
        peer = key[0]
        try:
            reason = await self._verify(peer, model, path)
        except Exception as exc:  # whatever went wrong, the peer stays unproven and it is said
            reason = f"{exc.__class__.__name__}: {exc}"
        finally:
            self._running.pop(key, None)
        self._outcomes[key] = Outcome(reason is None, time.monotonic(), reason or "")
        if reason is not None:
            self.warn(f"peer {peer[:8]} failed the file check for {model}: {reason} — left out")
        self.on_result()

    async def _verify(self, peer: str, model: str, path: Path) -> str | None:
        """None if `peer` proved it holds our file for `model`, else why not."""
        try:
            challenge = new_challenge(model, path.stat().st_size)
            expected = await asyncio.to_thread(answer_from_file, path, challenge, peer)
        except OSError as exc:
            return f"this node cannot read its own copy ({exc.strerror or exc})"
        try:
            send, recv = await self.mesh.open_stream(peer, StreamKind.PROVE, challenge.to_doc())
            await send.finish()
            reply = await asyncio.wait_for(FramedReader(recv).read_frame(), PROVE_SECS)
        except PeerGone as exc:
            return str(exc)
        except (TimeoutError, ProtocolError, iroh.IrohError) as exc:
            return f"no answer ({describe(exc)})"
        if "error" in reply:
            return f"it says: {printable(get_str(reply, 'error', 300))}"
        if get_str(reply, "hash", 64, "") != expected:
            return "its answer does not match this node's copy"
        return None

    async def close(self) -> None:
        for task in list(self._running.values()):
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)


def serve_file_proofs(mesh: Mesh, path_of: Callable[[str], Path | None], log: Callable[[str], None]) -> None:
    """Answer PROVE streams from this node's own copy of the named model."""
    answering = asyncio.Semaphore(ANSWERING)

    async def handler(peer_id: str, header: dict[str, Any], send: Any, reader: FramedReader) -> None:
        challenge = Challenge.from_doc(header)  # malformed: the mesh closes the stream and says so
        path = path_of(challenge.model)
        error = None
        if mesh.is_client(peer_id):
            error = "a client takes no part in splits"
        elif path is None:
            error = f"this node has no {challenge.model[:100]}"
            log(f"peer {peer_id[:8]} challenged this node for {challenge.model[:100]}, a file it does not have: not proven")
        else:
            try:
                if (error := out_of_file(challenge.ranges, path.stat().st_size)) is not None:
                    log(f"peer {peer_id[:8]} challenged this node for {challenge.model[:100]}: {error}, so the copies differ: not proven")
                else:
                    async with answering:
                        digest = await asyncio.to_thread(answer_from_file, path, challenge, mesh.me.id)
            except OSError as exc:  # the file went away or became unreadable under us
                error = f"this node cannot read its copy of {challenge.model[:100]} ({exc.strerror or exc})"
                log(f"peer {peer_id[:8]} challenged this node for {challenge.model[:100]}: {error}")
        reply: dict[str, Any] = {"error": error} if error is not None else {"hash": digest}
        with contextlib.suppress(iroh.IrohError):
            await send.write_all(encode_frame(reply))
            await send.finish()

    mesh.on_stream(StreamKind.PROVE, handler)
