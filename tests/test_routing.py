"""Which model a request names and which server answers it (pure)."""

from mesh_llm.api.routing import ServerView, choose_server, match_model, request_doc, requested_model, session_of


def test_requested_model() -> None:
    assert requested_model(request_doc(b'{"model": "m1", "messages": []}')) == "m1"
    assert requested_model(request_doc(b'{"messages": []}')) is None
    assert requested_model(request_doc(b'{"model": 3}')) is None
    for body in (b"not json", b"[1,2]", b"", b"\xff\xfe"):
        assert request_doc(body) == {} and requested_model(request_doc(body)) is None


def test_a_model_answers_to_its_id_and_to_looser_names() -> None:
    served = {"qwen3-8b-q4_k_m": ("Qwen3-8B",), "tiny": (), "gemma-3-270m-q4_k_m": ("gemma-3-270m",)}
    assert match_model(None, served).model == "qwen3-8b-q4_k_m"  # no name: the first model
    assert match_model("tiny", served).model == "tiny"
    assert match_model("TINY.gguf", served).model == "tiny"  # case and .gguf forgiven
    assert match_model("gemma-3-270m", served).model == "gemma-3-270m-q4_k_m"  # the name it was started with
    assert match_model("qwen3-8b", served).model == "qwen3-8b-q4_k_m"  # the words it starts with
    assert match_model("Qwen3-8B-Q4_K_M", served).model == "qwen3-8b-q4_k_m"
    assert match_model("gpt-4", served).model is None and match_model("gpt-4", served).candidates == ()
    assert match_model(None, {}).model is None


def test_a_catalog_name_reaches_the_file_it_names() -> None:
    # started from a path (no alias), asked for by its catalog name
    assert match_model("Qwen2.5-3B-Instruct-Q4_K_M", {"qwen2.5-3b-instruct-q4_k_m": ()}).model == "qwen2.5-3b-instruct-q4_k_m"
    assert match_model("gemma-3-270m", {"gemma-3-270m-q4_k_m": ()}).model == "gemma-3-270m-q4_k_m"


def test_an_ambiguous_name_lists_the_candidates() -> None:
    served = {"qwen3-8b-q4_k_m": (), "qwen3-8b-q8_0": (), "tiny": ()}
    found = match_model("qwen3-8b", served)
    assert found.model is None and found.candidates == ("qwen3-8b-q4_k_m", "qwen3-8b-q8_0")
    assert match_model("qwen3-8b-q8_0", served).model == "qwen3-8b-q8_0"


def test_sessions_come_from_a_header_or_the_user_fields() -> None:
    assert session_of({}, {}) is None
    assert session_of({"user": "alice"}, {}) == "u:alice"
    assert session_of({"metadata": {"user_id": "claude-session-1"}}, {}) == "u:claude-session-1"  # Anthropic Messages
    assert session_of({"user": "alice"}, {"x-session-id": "s9"}) == "h:s9"  # the header wins
    assert session_of({"user": 5, "metadata": "x"}, {}) is None  # not text: no session


def test_new_requests_go_where_fewest_are_in_flight_then_nearest() -> None:
    a, c = ServerView("a", True, 2, 5.0), ServerView("c", True, 1, 9.0)
    assert choose_server([a, c]).id == "c"  # fewer in flight beats a shorter RTT
    assert choose_server([ServerView("a", True, 1, 5.0), c]).id == "a"  # equal load: the nearer
    assert choose_server([ServerView("x", True, 0, None), ServerView("y", True, 0, 40.0)]).id == "y"  # unknown RTT last
    assert choose_server([ServerView("local", False), c]).id == "c"  # not ready: skipped
    assert choose_server([ServerView("local", False)]) is None


def test_a_conversation_goes_to_the_next_server_by_hash_while_its_own_is_full_and_back_after() -> None:
    views = [ServerView(n, True, 0, 1.0) for n in ("a", "b", "c")]
    home = choose_server(views, session="u:carol")
    assert home is not None
    full = [ServerView(v.id, v.id != home.id, 0, 1.0) for v in views]
    elsewhere = choose_server(full, session="u:carol")
    assert elsewhere is not None and elsewhere.id != home.id
    assert choose_server(views, session="u:carol") == home  # free again: back where its cache is


def test_a_new_conversation_goes_where_its_session_hashes_so_every_node_picks_the_same_server() -> None:
    nodes = [f"{i:064x}" for i in range(3)]
    # two entry nodes see the same servers, one of them as "local", in another order and load
    seen_from_0 = [ServerView("local", True, 3, 0.0, nodes[0]), ServerView(nodes[1], True, 0, 5.0), ServerView(nodes[2], True, 1, 9.0)]
    seen_from_2 = [ServerView(nodes[1], True, 2, 4.0), ServerView("local", True, 0, 0.0, nodes[2]), ServerView(nodes[0], True, 0, 7.0)]

    def node_of(view: ServerView | None) -> str:
        assert view is not None
        return view.node or view.id

    picks = {}
    for user in (f"u:user-{i}" for i in range(60)):
        a, b = node_of(choose_server(seen_from_0, session=user)), node_of(choose_server(seen_from_2, session=user))
        assert a == b, user
        picks[user] = a
    assert {picks[u] for u in picks} == set(nodes)  # conversations spread over all three
    # the node of a third of them goes: only its conversations move
    without = [v for v in seen_from_0 if node_of(v) != nodes[1]]
    for user, before in picks.items():
        after = node_of(choose_server(without, session=user))
        assert after == before or before == nodes[1]
