from mesh_llm.api.routing import pick_model, requested_model


def test_requested_model_reads_json_model_field() -> None:
    assert requested_model(b'{"model": "m1", "messages": []}') == "m1"
    assert requested_model(b'{"messages": []}') is None
    assert requested_model(b'{"model": 3}') is None
    assert requested_model(b"not json") is None
    assert requested_model(b"[1,2]") is None
    assert requested_model(b"") is None


def test_pick_model() -> None:
    served = ["Qwen3-8B-Q4_K_M", "tiny"]
    assert pick_model(None, served) == "Qwen3-8B-Q4_K_M"
    assert pick_model("tiny", served) == "tiny"
    assert pick_model("qwen3-8b-q4_k_m", served) == "Qwen3-8B-Q4_K_M"
    assert pick_model("tiny.gguf", served) == "tiny"
    assert pick_model("gpt-4", served) is None
    assert pick_model(None, []) is None
