"""The file proof (pure): challenges, bounds, answers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mesh_llm.mesh.file_proof import (
    MAX_RANGE_BYTES,
    MAX_RANGES,
    RANGE_BYTES,
    RANGES,
    Challenge,
    answer,
    answer_from_file,
    new_challenge,
    out_of_file,
)
from mesh_llm.mesh.wire import ProtocolError

PROVER = "ab" * 32


@pytest.fixture
def copies(tmp_path: Path) -> tuple[Path, Path, Path]:
    data = os.urandom(300_000)
    same, other = tmp_path / "same.gguf", tmp_path / "other.gguf"
    (tmp_path / "mine.gguf").write_bytes(data)
    same.write_bytes(data)
    flipped = bytearray(data)
    flipped[150_000] ^= 1  # one bit in the middle
    other.write_bytes(bytes(flipped))
    return tmp_path / "mine.gguf", same, other


def test_the_same_file_answers_alike_and_a_different_one_does_not(copies) -> None:
    mine, same, other = copies
    challenge = new_challenge("m", mine.stat().st_size)
    assert len(challenge.ranges) == RANGES and all(n == RANGE_BYTES and 0 <= o <= 300_000 - n for o, n in challenge.ranges)
    assert answer_from_file(mine, challenge, PROVER) == answer_from_file(same, challenge, PROVER)
    # the one bit that differs is found by a challenge that covers it
    covering = Challenge("m", challenge.nonce, ((149_000, 4096),))
    assert answer_from_file(mine, covering, PROVER) != answer_from_file(other, covering, PROVER)


def test_the_answer_depends_on_nonce_prover_and_every_byte() -> None:
    base = answer(b"n" * 16, PROVER, [b"abc", b"def"])
    assert base != answer(b"m" * 16, PROVER, [b"abc", b"def"])
    assert base != answer(b"n" * 16, "cd" * 32, [b"abc", b"def"])  # an answer is the prover's own: no replay by another peer
    assert base != answer(b"n" * 16, PROVER, [b"abc", b"deg"])
    assert base != answer(b"n" * 16, PROVER, [b"abcd", b"ef"])  # where ranges end counts too


def test_fresh_challenges_differ_and_a_small_file_is_asked_whole() -> None:
    a, b = new_challenge("m", 10**9), new_challenge("m", 10**9)
    assert a.nonce != b.nonce and a.ranges != b.ranges
    assert new_challenge("m", 100).ranges == ((0, 100),) * RANGES
    with pytest.raises(ValueError):
        new_challenge("m", 0)


def test_a_challenge_crosses_the_wire_and_malformed_ones_are_refused() -> None:
    c = new_challenge("split-tiny", 10**6)
    assert Challenge.from_doc(c.to_doc()) == c
    good = c.to_doc()
    for bad in ({"ranges": [[0, 1]] * (MAX_RANGES + 1)}, {"ranges": [[0, MAX_RANGE_BYTES + 1]]}, {"ranges": [[-1, 10]]},
                {"ranges": [[0, 0]]}, {"ranges": []}, {"ranges": [[0, True]]}, {"ranges": [[0, 1, 2]]}, {"ranges": "x"},
                {"nonce": "00"}, {"model": 5}):
        with pytest.raises(ProtocolError):
            Challenge.from_doc({**good, **bad})
    assert Challenge.from_doc({**good, "ranges": [[5, MAX_RANGE_BYTES]] * MAX_RANGES}).ranges[0] == (5, MAX_RANGE_BYTES)


def test_ranges_beyond_the_file_are_named() -> None:
    assert out_of_file([(0, 10), (90, 10)], 100) is None
    assert "beyond the end" in (out_of_file([(0, 10), (95, 10)], 100) or "")
