"""Membership and routing rules (pure)."""

from __future__ import annotations

from mesh_llm.mesh.peers import DEAD_AFTER_SECS, HUNG_AFTER_SECS, REDIAL_BACKOFF_SECS, EventKind, HostedModel, Membership, PeerRecord, keep_new_connection


def rec(n: int, **kw) -> PeerRecord:  # type: ignore[no-untyped-def]
    return PeerRecord(id=f"{n:064x}", addrs=("127.0.0.1:1",), **kw)


def test_admit_update_and_remove_produce_events() -> None:
    m = Membership(self_id=rec(0).id)
    assert m.admit(rec(1), 0.0).kind == EventKind.JOINED
    assert m.heard_from(rec(1), 1.0) is None  # nothing changed
    ev = m.heard_from(rec(1, hosting=(HostedModel("x", "ready"),)), 2.0, rtt_ms=3.0)
    assert ev is not None and ev.kind == EventKind.UPDATED
    assert m.members[rec(1).id].rtt_ms == 3.0
    assert m.heard_from(rec(9), 2.0) is None  # not a member: gossip alone does not admit
    left = m.remove(rec(1).id, "left the mesh")
    assert left is not None and left.kind == EventKind.LEFT and left.reason == "left the mesh"
    assert m.remove(rec(1).id, "again") is None


def test_silent_members_are_reported_after_the_bound() -> None:
    m = Membership(self_id=rec(0).id)
    m.admit(rec(1), 0.0)
    m.admit(rec(2), 0.0)
    m.heard_from(rec(2), 5.0)
    assert m.silent(DEAD_AFTER_SECS - 0.1) == []
    assert m.silent(DEAD_AFTER_SECS + 0.1) == [rec(1).id]


def test_a_member_whose_connection_still_answers_is_not_dropped_until_it_hangs() -> None:
    m = Membership(self_id=rec(0).id)
    m.admit(rec(1), 0.0)
    m.admit(rec(2), 0.0)
    for t in range(1, 10):  # rec(1)'s node is too starved to gossip, but its QUIC stack acks our packets
        m.signal(rec(1).id, float(t))
    m.signal(rec(9).id, 9.0)  # not a member: nothing to refresh
    assert m.silent(9.5) == [rec(2).id]  # rec(2) sent nothing at all: dead
    assert m.why_silent(rec(2).id, 9.5) == "silent for 9.5 s"
    m.signal(rec(1).id, HUNG_AFTER_SECS + 0.5)
    assert m.silent(HUNG_AFTER_SECS + 0.5) == [rec(1).id, rec(2).id]  # no gossip for that long: hung
    assert m.why_silent(rec(1).id, HUNG_AFTER_SECS + 0.5) == f"connected but no gossip for {HUNG_AFTER_SECS + 0.5:.1f} s"


def test_time_this_node_was_held_up_is_not_its_members_silence() -> None:
    m = Membership(self_id=rec(0).id)
    m.admit(rec(1), 0.0)
    m.excuse(10.0)  # our own loop was blocked for 10 s: nobody could be heard
    assert m.silent(10.0 + DEAD_AFTER_SECS - 0.1) == []
    assert m.silent(10.0 + DEAD_AFTER_SECS + 0.1) == [rec(1).id]


def test_to_dial_skips_self_members_clients_and_recent_failures() -> None:
    m = Membership(self_id=rec(0).id)
    m.admit(rec(1), 0.0)
    found = [rec(0), rec(1), rec(2), rec(3, role="client"), PeerRecord(id=f"{4:064x}"), rec(5)]
    m.note_dial_failure(rec(5).id, 10.0)
    assert [p.id for p in m.to_dial(found, 10.0 + REDIAL_BACKOFF_SECS / 2)] == [rec(2).id]
    assert {p.id for p in m.to_dial(found, 10.0 + REDIAL_BACKOFF_SECS + 1)} == {rec(2).id, rec(5).id}


def test_duplicate_connections_resolve_the_same_way_on_both_sides() -> None:
    lo, hi = rec(1).id, rec(2).id
    # Both dialed at once: each side holds one and receives the other; both keep lo's.
    assert keep_new_connection("i", "i", existing_dialer=hi, new_dialer=lo, lower_id=lo)
    assert not keep_new_connection("i", "i", existing_dialer=lo, new_dialer=hi, lower_id=lo)
    # A restarted peer (new incarnation) always replaces the stale connection.
    assert keep_new_connection("old", "new", existing_dialer=lo, new_dialer=hi, lower_id=lo)
