"""PII scrubbing for blackboard posts: a table of what must go and what must stay."""

from __future__ import annotations

import pytest

from mesh_llm.blackboard.scrub import describe, scrub

# (input, expected output, expected report)
SCRUBBED = [
    ("mail me at alice.smith+ci@example.co.uk please", "mail me at [email] please", [("email", 1)]),
    ("a@b.io and bob_99@mail-server.example.org", "[email] and [email]", [("email", 2)]),
    ("call +1 (555) 123-4567 now", "call [phone] now", [("phone", 1)]),
    ("+44 20 7946 0958", "[phone]", [("phone", 1)]),
    ("ring +49 (0)30 1234567.", "ring [phone].", [("phone", 1)]),
    ("+4915112345678", "[phone]", [("phone", 1)]),
    ("+33 6 12 34 56 78", "[phone]", [("phone", 1)]),
    ("us: 555-123-4567, 555.123.4567, (555) 123-4567", "us: [phone], [phone], [phone]", [("phone", 3)]),
    ("toll free 1-800-555-1234", "toll free [phone]", [("phone", 1)]),
    ("office 030 1234567", "office [phone]", [("phone", 1)]),
    ("uk 020 7946 0958 or 07700900123", "uk [phone] or [phone]", [("phone", 2)]),
    ("fr 06 12 34 56 78 / 06.12.34.56.78", "fr [phone] / [phone]", [("phone", 2)]),
    ("key sk-proj-abcdefghijklmnop1234567890", "key [api-key]", [("api-key", 1)]),
    ("sk-ant-api03-AbCdEfGhIjKlMnOpQrStUv_wxyz-0123", "[api-key]", [("api-key", 1)]),
    ("ghp_0123456789abcdefghijABCDEFGHIJ012345", "[api-key]", [("api-key", 1)]),
    ("gho_0123456789abcdefghijABCDEF ghs_0123456789abcdefghijKLMNOP", "[api-key] [api-key]", [("api-key", 2)]),
    ("github_pat_11ABCDEFG0123456789_abcdefghijklmnop", "[api-key]", [("api-key", 1)]),
    ("slack xoxb-1234567890-abcdefghij and xoxp-12345-67890-abcdef", "slack [api-key] and [api-key]", [("api-key", 2)]),
    ("aws AKIAIOSFODNN7EXAMPLE", "aws [api-key]", [("api-key", 1)]),
    ("AIzaSyA-1234567890abcdefghijklmnopqrstu", "[api-key]", [("api-key", 1)]),
    ("hf_abcdefghijklmnopqrstuvwxyz012345", "[api-key]", [("api-key", 1)]),
    ("glpat-abcdefghij0123456789", "[api-key]", [("api-key", 1)]),
    ("stripe sk_live_abcdefghij0123", "stripe [api-key]", [("api-key", 1)]),
    ("our key mlk_Xy3_abcdefghijklmnopqrstuvwxyz0123456789AB", "our key [api-key]", [("api-key", 1)]),
    ("Authorization: Bearer abc.def-ghi_jkl~123", "Authorization: Bearer [token]", [("token", 1)]),
    ("curl -H 'authorization: bearer 0123456789abcdef'", "curl -H 'authorization: bearer [token]'", [("token", 1)]),
    ("Authorization: Bearer ghp_0123456789abcdefghijABCDEFGHIJ012345", "Authorization: Bearer [api-key]", [("api-key", 1)]),
    ("the token ghp_0123456789abcdefghijABCDEFGHIJ012345 leaked", "the token [api-key] leaked", [("api-key", 1)]),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.abc_DEF-123", "jwt [token]", [("token", 1)]),
    ("password=hunter2hunter and api_key: 'zz9plural'", "password=[secret] and api_key: '[secret]'", [("secret", 2)]),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\n-----END OPENSSH PRIVATE KEY-----\nafter",
     "[private-key]\nafter", [("private-key", 1)]),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow...cut off", "[private-key]", [("private-key", 1)]),
    ("-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----", "[private-key]", [("private-key", 1)]),
    ("see /home/alice/projects/mesh/src/x.py:12", "see [home-path]/projects/mesh/src/x.py:12", [("home-path", 1)]),
    ("on mac /Users/bob.jones/Library/Logs", "on mac [home-path]/Library/Logs", [("home-path", 1)]),
    (r"win C:\Users\Carol\AppData\x.txt", r"win [home-path]\AppData\x.txt", [("home-path", 1)]),
    ("~dave/notes.md", "[home-path]/notes.md", [("home-path", 1)]),
    ("mixed: a@b.io, +1 555 123 4567, ghp_0123456789abcdefghijABCD in /home/eve/x",
     "mixed: [email], [phone], [api-key] in [home-path]/x", [("api-key", 1), ("email", 1), ("home-path", 1), ("phone", 1)]),
]

# things that look a bit like PII but must stay as they are
KEPT = [
    "llama.cpp 1.2.3 and Python 3.11.4, version 10.0.19045",
    "released 2024-01-15, due 15/01/2024 or 01.02.2024, at 10:30:00",
    "the server at 192.168.1.100 and 10.0.0.1:9337, also ::1",
    "42 tokens, 1234567 bytes, 8192 context, port 9337, 3 of 4",
    "rank 100 200 300 of 4096",
    "commit 8a6eb4c83438db and sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "C++ 17 and +5 points, -3 degrees, +1.5",
    "an @mention and user@localhost and foo@bar",
    "task-force work, desk-top, ask-me-anything-please-really-long",
    "~/projects/x and ~ about 5 min and ~/.cache",
    "/srv/home/data and /tmp/Users.txt and /home/ alone",
    "Bearer of bad news, bearer instruments",
    "the token tokenizer and Token embeddings",
    "token: see above",
    "STATUS: building llama.cpp b4800 on CUDA, 3/8 done",
    "eyJ is how base64 JSON starts",
    "1-2-3 and 12-34 and 2024",
    "skeleton sk- prefix alone and hf_ short",
    "model gemma-3-270m-q4_k_m.gguf at 0.25 GB",
    "a 1e-6 learning rate, 3.14159, 2.718281828",
    "the mesh printed: Peer joined: standby 1a2b3c4d (host)",
]


@pytest.mark.parametrize(("text", "expected", "report"), SCRUBBED)
def test_pii_is_replaced_with_a_marker_and_counted(text: str, expected: str, report: list[tuple[str, int]]) -> None:
    out, found = scrub(text)
    assert out == expected
    assert sorted(found) == sorted(report)


@pytest.mark.parametrize("text", KEPT)
def test_lookalikes_are_left_alone(text: str) -> None:
    assert scrub(text) == (text, [])


def test_our_own_invite_token_is_scrubbed() -> None:
    from mesh_llm.mesh.identity import MeshCredentials
    from mesh_llm.mesh.token import InviteToken

    for creds in (MeshCredentials.generate(), MeshCredentials.generate().for_clients()):
        tok = InviteToken(creds, bytes(range(32)), ("127.0.0.1:4433",)).encode()
        out, found = scrub(f"join with {tok} please")
        assert out == "join with [token] please" and found == [("token", 1)]


def test_our_own_api_key_is_scrubbed() -> None:
    from mesh_llm.api.keys import new_key

    out, found = scrub(f"use {new_key()}")
    assert out == "use [api-key]" and found == [("api-key", 1)]


def test_scrubbing_is_idempotent() -> None:
    for _text, expected, _ in SCRUBBED:
        assert scrub(expected) == (expected, [])


def test_describe_says_what_was_replaced() -> None:
    assert describe([("email", 1), ("api-key", 2)]) == "1 email, 2 api keys"
    assert describe([]) == ""


def test_long_texts_of_repeated_fragments_go_through() -> None:
    """Texts of the maximum size made of pattern fragments (where a backtracking pattern would
    take quadratic or worse time) are scrubbed, or left, in one pass each."""
    for filler in ("a" * 4096, "1" * 4096, "1 " * 2048, "a." * 2048, "+1 " * 1365, "-" * 4096, "a@" * 2048, "eyJ" * 1365, "/home/" * 680, "0 1" * 1365):
        out, _ = scrub(filler)
        assert len(out) <= len(filler) + 16
