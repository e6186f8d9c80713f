"""The blackboard's pure state: limits, expiry, dedup, search, feed, sync and its file (injectable clock)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mesh_llm.blackboard.board import (
    MAX_ITEMS,
    RATE_PER_WINDOW,
    SKEW_SECS,
    TTL_SECS,
    Board,
    Item,
    ItemError,
    item_id,
    parse_item,
)

A = "a" * 64
B = "b" * 64
C = "c" * 64


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def tick(self, secs: float) -> None:
        self.now += secs


def made(text: str, author: str, node: str, at: float) -> dict:
    return Item(item_id(text, author, node, at), text, author, node, at).to_doc()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def board(clock: Clock) -> Board:
    return Board(clock)


def test_a_post_gets_a_stable_id_and_the_fields_of_the_contract(board: Board, clock: Clock) -> None:
    item = board.post("STATUS: building", "alice@laptop", A)
    doc = item.to_doc()
    assert set(doc) == {"id", "text", "from", "node", "time"}
    assert doc["time"] == clock.now and doc["node"] == A and doc["from"] == "alice@laptop"
    assert len(item.id) == 32 and int(item.id, 16) >= 0
    assert parse_item(json.loads(json.dumps(doc))) == item  # the id survives a JSON round trip


@pytest.mark.parametrize(("text", "status"), [
    ("", 400), ("   \n\t ", 400), ("bell \x07", 400), ("esc \x1b[31m", 400), ("bidi \u202e", 400),
    ("x" * 4097, 413), ("é" * 2049, 413),
])
def test_bad_texts_are_refused_with_a_status(board: Board, text: str, status: int) -> None:
    with pytest.raises(ItemError) as err:
        board.post(text, "alice", A)
    assert err.value.status == status
    assert board.items == {}


def test_limits_are_inclusive_and_newlines_tabs_and_unicode_pass(board: Board) -> None:
    assert board.post("x" * 4096, "alice", A).text == "x" * 4096
    assert board.post("line one\n\tline two ✓ — ü", "alice", A)
    assert board.post("crlf\r\nline", "alice", A).text == "crlf\nline"


@pytest.mark.parametrize("author", ["", " ", "a" * 129, "new\nline", "esc\x1b"])
def test_bad_authors_are_refused(board: Board, author: str) -> None:
    with pytest.raises(ItemError):
        board.post("hello", author, A)


def test_ten_posts_a_minute_per_node_then_429_with_retry_after(board: Board, clock: Clock) -> None:
    for n in range(RATE_PER_WINDOW):
        board.post(f"post {n}", "alice", A)
        clock.tick(1)
    with pytest.raises(ItemError) as err:
        board.post("one too many", "alice", A)
    assert err.value.status == 429 and 0 < err.value.retry_after <= 60
    assert board.post("another node is not limited", "bob", B)
    clock.tick(err.value.retry_after + 0.001)
    assert board.post("after the wait", "alice", A)


def test_items_expire_after_48_hours(board: Board, clock: Clock) -> None:
    board.post("old", "alice", A)
    clock.tick(TTL_SECS - 1)
    assert [i.text for i in board.feed()] == ["old"]
    clock.tick(2)
    assert board.feed() == [] and board.items == {}


def test_at_most_500_items_oldest_dropped(board: Board, clock: Clock) -> None:
    nodes = [f"{n:064x}" for n in range(MAX_ITEMS + 10)]
    for n, node in enumerate(nodes):
        board.post(f"item {n}", "x", node)
        clock.tick(0.5)
    assert len(board.items) == MAX_ITEMS
    texts = {i.text for i in board.items.values()}
    assert "item 0" not in texts and "item 9" not in texts and "item 10" in texts and f"item {MAX_ITEMS + 9}" in texts
    # a peer's item older than everything on a full board is not taken
    assert board.receive(made("ancient", "x", C, clock.now - 3600)) is None


def test_duplicates_are_ignored(board: Board, clock: Clock) -> None:
    doc = made("hello", "bob", B, clock.now - 5)
    assert board.receive(doc) is not None
    assert board.receive(doc) is None
    assert board.receive(dict(doc)) is None
    assert len(board.items) == 1


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(text="changed"),  # the id no longer matches
    lambda d: d.update(id="0" * 32),
    lambda d: d.update(id=d["id"].upper()),
    lambda d: d.update(node="zz"),
    lambda d: d.update(time="now"),
    lambda d: d.update(time=True),
    lambda d: d.update(time=float("nan")),
    lambda d: d.update(text=123),
    lambda d: d.update({"from": None}),
    lambda d: d.update(extra=1),
    lambda d: d.pop("node"),
])
def test_malformed_peer_items_raise(board: Board, clock: Clock, mutate) -> None:  # type: ignore[no-untyped-def]
    doc = made("hello", "bob", B, clock.now)
    mutate(doc)
    with pytest.raises(ItemError):
        board.receive(doc)
    assert board.items == {}


@pytest.mark.parametrize("bad", [None, [], "text", 5, {"id": []}])
def test_non_items_raise(board: Board, bad: object) -> None:
    with pytest.raises(ItemError):
        board.receive(bad)


def test_peer_items_from_the_future_or_past_48h_are_dropped(board: Board, clock: Clock) -> None:
    assert board.receive(made("future", "bob", B, clock.now + SKEW_SECS + 1)) is None
    assert board.receive(made("expired", "bob", B, clock.now - TTL_SECS - 1)) is None
    assert board.receive(made("slightly ahead", "bob", B, clock.now + SKEW_SECS - 1)) is not None
    assert [i.text for i in board.feed()] == ["slightly ahead"]


def test_one_peer_node_can_push_no_more_than_its_rate(board: Board, clock: Clock) -> None:
    taken = [board.receive(made(f"spam {n}", "bob", B, clock.now - 30 + n)) for n in range(50)]
    assert sum(t is not None for t in taken) == RATE_PER_WINDOW
    # an honest node's items (10 a minute) all pass, in whatever order they arrive
    honest = [made(f"ok {n}", "carol", C, clock.now - 3000 + n * 6.5) for n in range(40)]
    for doc in reversed(honest):
        assert board.receive(doc) is not None


def test_search_ranks_by_words_found_then_newest(board: Board, clock: Clock) -> None:
    board.post("CUDA build fails on llama", "alice@a", A)
    clock.tick(1)
    board.post("the llama tokenizer", "bob@b", B)
    clock.tick(1)
    board.post("unrelated weather", "carol@c", C)
    clock.tick(1)
    board.post("llama cuda build ok", "dave@d", "d" * 64)
    assert [i.author for i in board.search("Llama CUDA build")] == ["dave@d", "alice@a", "bob@b"]
    assert [i.author for i in board.search("bob")] == ["bob@b"]  # the author counts
    assert [i.author for i in board.search("  weath  ")] == ["carol@c"]  # substrings, case-insensitive
    assert board.search("") == [] and board.search("nothing-here") == []
    assert [i.author for i in board.search("llama", limit=1)] == ["dave@d"]
    assert [i.author for i in board.search("llama", author="ALICE")] == ["alice@a"]


def test_feed_filters_and_limits(board: Board, clock: Clock) -> None:
    for n in range(30):
        board.post(f"note {n}", "alice@laptop" if n % 2 else "bob@desk", f"{n:064x}")
        clock.tick(600)  # ten minutes apart
    feed = board.feed()
    assert len(feed) == 20 and feed[0].text == "note 29" and feed[-1].text == "note 10"
    assert [i.text for i in board.feed(since_hours=0.5)] == ["note 29", "note 28"]  # newer than 30 min ago
    assert all(i.author == "alice@laptop" for i in board.feed(author="LAPTOP", limit=500))
    assert len(board.feed(author="laptop", limit=500)) == 15
    assert len(board.feed(limit=3)) == 3 and len(board.feed(limit=0)) == 1 and len(board.feed(limit=10_000)) == 30


def test_digest_and_missing(board: Board, clock: Clock) -> None:
    first = board.post("one", "a", A)
    clock.tick(1)
    second = board.post("two", "a", A)
    assert board.ids() == [second.id, first.id]
    assert board.missing([first.id, "f" * 32]) == [second]
    assert board.missing(board.ids()) == []
    other = Board(clock)
    for item in board.missing(other.ids()):
        other.receive(item.to_doc())
    assert other.ids() == board.ids()


def test_persistence_round_trip(board: Board, clock: Clock, tmp_path: Path) -> None:
    board.post("STATUS: one ✓", "alice", A)
    clock.tick(1)
    board.post("line\nbreak", "bob", B)
    path = tmp_path / "blackboard.json"
    board.save(path)
    assert os.stat(path).st_mode & 0o077 == 0
    warnings: list[str] = []
    again = Board(clock)
    again.load(path, warnings.append)
    assert warnings == [] and again.items == board.items
    clock.tick(TTL_SECS)  # what expired while the node was down is not loaded
    later = Board(clock)
    later.load(path, warnings.append)
    assert later.items == {} and warnings == []


def test_a_missing_file_is_an_empty_board_without_a_warning(board: Board, tmp_path: Path) -> None:
    warnings: list[str] = []
    board.load(tmp_path / "none.json", warnings.append)
    assert board.items == {} and warnings == []


@pytest.mark.parametrize("content", [
    b"", b"not json", b"\xff\xfe", b"[]", b"null", b'{"version": 99, "items": []}', b'{"version": 1, "items": {}}',
    b"[" * 100_000, b'{"version": 1, "items": "x"}',
])
def test_a_corrupt_file_starts_empty_with_one_warning(clock: Clock, tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "blackboard.json"
    path.write_bytes(content)
    warnings: list[str] = []
    board = Board(clock)
    board.load(path, warnings.append)
    assert board.items == {} and len(warnings) == 1


def test_hostile_items_in_the_file_are_left_out_with_one_warning(clock: Clock, tmp_path: Path) -> None:
    good = made("fine", "alice", A, clock.now - 10)
    items = [good, {"id": "x"}, made("bell\x07", "e", B, clock.now), made("x" * 5000, "e", B, clock.now), 7, None,
             {**made("forged", "e", B, clock.now), "text": "other"}, made("from the future", "e", B, clock.now + 10 * SKEW_SECS),
             *[made(f"flood {n}", "f", C, clock.now - n * 0.01) for n in range(40)]]
    path = tmp_path / "blackboard.json"
    path.write_text(json.dumps({"version": 1, "items": items}))
    warnings: list[str] = []
    board = Board(clock)
    board.load(path, warnings.append)
    assert good["id"] in board.items
    assert sum(1 for i in board.items.values() if i.node == C) == RATE_PER_WINDOW
    assert len(board.items) == 1 + RATE_PER_WINDOW
    assert len(warnings) == 1 and "6 malformed" in warnings[0]


def test_a_symlink_or_directory_in_place_of_the_file_is_refused(clock: Clock, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    Board(clock).save(target)
    link = tmp_path / "blackboard.json"
    link.symlink_to(target)
    warnings: list[str] = []
    Board(clock).load(link, warnings.append)
    assert len(warnings) == 1
    folder = tmp_path / "dir.json"
    folder.mkdir()
    Board(clock).load(folder, warnings.append)
    assert len(warnings) == 2


def test_a_huge_file_is_not_read(clock: Clock, tmp_path: Path) -> None:
    path = tmp_path / "blackboard.json"
    with path.open("wb") as f:
        f.truncate(17 << 20)
    warnings: list[str] = []
    Board(clock).load(path, warnings.append)
    assert len(warnings) == 1 and "not usable" in warnings[0]
