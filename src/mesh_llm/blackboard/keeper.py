"""The blackboard's shell: the one owner of this node's Board, its file and its BLACKBOARD streams.

Members and clients alike (a client with no model anywhere too) keep a board and talk
over their own stream kind. A stream opens with one header frame:

    {"op": "sync", "ids": [ID, …]}   the asker's digest (at most 500 ids); the answer is
                                     frames {"items": [ITEM, …]} of what it lacks (each
                                     under SYNC_FRAME_BYTES), then {"done": true}
    {"op": "post", "items": [ITEM]}  a new item (at most PUSH_ITEMS); the answer is {"taken": N}

A node syncs with every peer as it joins (so one that was down gets what it missed, and
the peer gets what it has), again every RESYNC_SECS, and pushes each new local post to
every connected peer. An item a peer sent that is new here goes on to the other peers
(its id stops it coming back). Every item is checked (board.parse_item) and each node's
items are rate-limited wherever they arrive; anything malformed closes that stream only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mesh_llm.blackboard.board import MAX_ITEMS, Board, Item, ItemError, write_board
from mesh_llm.blackboard.scrub import scrub
from mesh_llm.blackboard.signing import signer, verify_item
from mesh_llm.mesh.admission import LogLimiter
from mesh_llm.mesh.mesh import Mesh, PeerGone
from mesh_llm.mesh.peers import EventKind
from mesh_llm.mesh.transport import describe, iroh
from mesh_llm.mesh.wire import FramedReader, ProtocolError, StreamKind, encode_frame, get_list, get_str, get_str_list

FILE_NAME = "blackboard.json"
SYNC_SECS = 15.0  # a sync's answer must be complete within this
RESYNC_SECS = 60.0  # every peer is synced again this often (a push lost in transit is caught up)
SAVE_DELAY_SECS = 0.5  # changes are written at most this often
SYNC_FRAME_BYTES = 256 * 1024  # an answer's frames stay well under wire.MAX_FRAME
PUSH_ITEMS = 16
STREAMS_PER_PEER = 4  # BLACKBOARD streams one peer may have open here at once
ID_CHARS = 32


class BlackboardKeeper:
    def __init__(self, mesh: Mesh, state_dir: Path, warn: Callable[[str], None], clock: Callable[[], float] = time.time) -> None:
        self.mesh = mesh
        self.path = state_dir / FILE_NAME
        self.warn = warn
        self.board = Board(clock, sign=signer(mesh.secret_key), verify=verify_item)
        self._logs = LogLimiter()
        self._open: dict[str, int] = {}  # peer -> its BLACKBOARD streams being served here
        self._outbox: dict[str, dict[str, Item]] = {}  # peer -> items waiting to be pushed to it
        self._pushing: set[str] = set()  # peers a push stream is open to (one at a time each)
        self._syncing: set[str] = set()  # peers a sync is under way with (one at a time each)
        self.synced: set[str] = set()  # peers a sync has completed with (a one-call client waits for one)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dirty = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        self.board.load(self.path, self.warn)
        self.mesh.on_stream(StreamKind.BLACKBOARD, self._serve)
        events = self.mesh.subscribe()
        self._spawn(self._follow(events))
        self._spawn(self._resync_loop())
        self._spawn(self._saver())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._save_now()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _say_limited(self, kind: str, line: str) -> None:
        if (text := self._logs.line(kind, line, time.monotonic())) is not None:
            self.warn(text)

    # -- local posts ----------------------------------------------------------------

    def post(self, text: str, author: str) -> tuple[Item, list[tuple[str, int]]]:
        """Scrub, add and push a post from this machine. Raises ItemError (400, 413, 429)."""
        clean, found = scrub(text)
        item = self.board.post(clean, author, self.mesh.me.id)
        self._changed()
        self._push([item], exclude=None)
        return item, found

    # -- the file ----------------------------------------------------------------

    def _changed(self) -> None:
        self._dirty.set()

    async def _saver(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            await self._save_now()
            await asyncio.sleep(SAVE_DELAY_SECS)

    async def _save_now(self) -> None:
        doc = self.board.to_doc()  # taken here, on the loop: the board changes under a thread
        try:
            await asyncio.to_thread(write_board, self.path, doc)
        except OSError as exc:
            self._say_limited("save", f"cannot write the blackboard to {self.path}: {exc.strerror or exc}")

    # -- sync ----------------------------------------------------------------

    async def _follow(self, events: asyncio.Queue[Any]) -> None:
        try:
            while True:
                event = await events.get()
                if event.kind == EventKind.JOINED:
                    self._spawn(self._sync(event.peer.id))
        finally:
            self.mesh.unsubscribe(events)

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(RESYNC_SECS)
            for peer in list(self.mesh.links):
                self._spawn(self._sync(peer))

    async def _sync(self, peer: str) -> None:
        """Send our digest to `peer` and take the items it answers with (one sync per peer at a time)."""
        if peer in self._syncing:
            return
        self._syncing.add(peer)
        try:
            await self._sync_once(peer)
        finally:
            self._syncing.discard(peer)

    async def _sync_once(self, peer: str) -> None:
        taken: list[Item] = []
        recv: Any = None
        try:
            send, recv = await self.mesh.open_stream(peer, StreamKind.BLACKBOARD, {"op": "sync", "ids": self.board.ids()})
            await send.finish()
            reader = FramedReader(recv)
            received = 0
            async with asyncio.timeout(SYNC_SECS):
                while True:
                    frame = await reader.read_frame()
                    if frame.get("done") is True:
                        break
                    items = get_list(frame, "items", MAX_ITEMS)
                    received += len(items)
                    if received > MAX_ITEMS:
                        raise ProtocolError(f"a sync answer of more than {MAX_ITEMS} items")
                    taken += self._take(items)
        except (PeerGone, iroh.IrohError):
            pass  # gone, or it reset the stream: its next join syncs again
        except (TimeoutError, ProtocolError, ItemError) as exc:
            self._say_limited("sync", f"blackboard sync with {peer[:8]} failed: {describe(exc)}")
            if recv is not None:
                with contextlib.suppress(Exception):
                    await recv.stop(1)
        else:
            self.synced.add(peer)
        if taken:
            self._changed()
            self._push(taken, exclude=peer)

    @property
    def pending(self) -> int:
        """Pushes not yet delivered (a one-call client stays until its post has gone out)."""
        return sum(len(box) for box in self._outbox.values()) + len(self._pushing)

    def _take(self, docs: list[Any]) -> list[Item]:
        taken = []
        for doc in docs:
            item = self.board.receive(doc)  # ItemError: malformed, the stream ends
            if item is not None:
                taken.append(item)
        return taken

    # -- pushes ----------------------------------------------------------------

    def _push(self, items: list[Item], exclude: str | None) -> None:
        """Queue `items` for every connected peer but `exclude` (the one they came from) and
        their authors' nodes. Each peer has at most one push stream open from here: what
        piles up meanwhile goes in the next one, PUSH_ITEMS at a time."""
        for peer in list(self.mesh.links):
            wanted = [i for i in items if i.node != peer]
            if peer == exclude or not wanted:
                continue
            box = self._outbox.setdefault(peer, {})
            for item in wanted:
                box[item.id] = item
            while len(box) > MAX_ITEMS:  # a peer that takes nothing: the oldest wait for the next sync
                del box[next(iter(box))]
            if peer not in self._pushing:
                self._pushing.add(peer)
                self._spawn(self._pusher(peer))

    async def _pusher(self, peer: str) -> None:
        try:
            while box := self._outbox.get(peer):
                batch = [box.pop(ident) for ident in list(box)[:PUSH_ITEMS]]
                if not box:
                    del self._outbox[peer]
                if not await self._push_to(peer, batch):
                    self._outbox.pop(peer, None)  # gone or broken: the next sync catches it up
                    return
        finally:
            self._pushing.discard(peer)

    async def _push_to(self, peer: str, items: list[Item]) -> bool:
        try:
            send, recv = await self.mesh.open_stream(peer, StreamKind.BLACKBOARD, {"op": "post", "items": [i.to_doc() for i in items]})
            await send.finish()
            await asyncio.wait_for(FramedReader(recv).read_frame(), SYNC_SECS)
            return True
        except (PeerGone, TimeoutError, ProtocolError, iroh.IrohError):
            return False

    # -- serving ----------------------------------------------------------------

    async def _serve(self, peer: str, header: dict[str, Any], send: Any, reader: FramedReader) -> None:
        if self._open.get(peer, 0) >= STREAMS_PER_PEER:
            raise ProtocolError(f"more than {STREAMS_PER_PEER} blackboard streams at once")
        self._open[peer] = self._open.get(peer, 0) + 1
        try:
            op = get_str(header, "op", 16)
            if op == "sync":
                theirs = get_str_list(header, "ids", MAX_ITEMS, ID_CHARS)
                for frame in frames_of(self.board.missing(theirs)):
                    await send.write_all(frame)
                await send.write_all(encode_frame({"done": True}))
            elif op == "post":
                try:
                    taken = self._take(get_list(header, "items", PUSH_ITEMS))
                except ItemError as exc:
                    raise ProtocolError(f"a malformed blackboard item: {exc}") from None
                if taken:
                    self._changed()
                    self._push(taken, exclude=peer)
                await send.write_all(encode_frame({"taken": len(taken)}))
            else:
                raise ProtocolError(f"unknown blackboard op {op[:16]!r}")
            with contextlib.suppress(iroh.IrohError):
                await send.finish()
        finally:
            self._open[peer] -= 1
            if not self._open[peer]:
                del self._open[peer]


def frames_of(items: list[Item]) -> list[bytes]:
    """Items as {"items": […]} frames of at most SYNC_FRAME_BYTES each (one 4 KB item, escaped, is far below)."""
    frames: list[bytes] = []
    batch: list[dict[str, Any]] = []
    size = 0
    for item in items:
        doc = item.to_doc()
        doc_size = len(json.dumps(doc, separators=(",", ":")))
        if batch and size + doc_size > SYNC_FRAME_BYTES:
            frames.append(encode_frame({"items": batch}))
            batch, size = [], 0
        batch.append(doc)
        size += doc_size + 1
    if batch:
        frames.append(encode_frame({"items": batch}))
    return frames
