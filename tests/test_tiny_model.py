import re
from pathlib import Path

import pytest

from mesh_llm.models.gguf_file import read_gguf
from mesh_llm.models.tiny import TinyModelSpec, gpt2_byte_alphabet, tiny_vocab, write_tiny_model


def test_byte_alphabet_is_a_bijection() -> None:
    alphabet = gpt2_byte_alphabet()
    assert len(alphabet) == 256 and len(set(alphabet)) == 256
    assert alphabet[ord("A")] == "A" and alphabet[ord(" ")] == "Ġ"


def test_vocab_has_merges_and_chatml_specials() -> None:
    tokens, types, merges, printable = tiny_vocab()
    assert len(tokens) == len(types)
    for m in merges:
        left, right = m.split(" ")
        assert left + right in tokens
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= set(tokens)
    assert all(tokens[i] not in ("<|im_end|>", "<|endoftext|>") for i in printable)


def test_size_follows_arguments(tmp_path: Path) -> None:
    small = read_gguf(write_tiny_model(tmp_path / "a.gguf", TinyModelSpec(n_layers=2, n_embd=32, n_ff=64)))
    big = read_gguf(write_tiny_model(tmp_path / "b.gguf", TinyModelSpec(n_layers=6, n_embd=128, n_ff=256, dtype="f16")))
    assert small.n_layers == 2 and big.n_layers == 6
    assert big.tensor_bytes > small.tensor_bytes
    assert len([t for t in big.tensors if t.name.startswith("blk.5.")]) == 9


def test_bad_specs_are_refused() -> None:
    with pytest.raises(ValueError):
        TinyModelSpec(n_embd=30, n_heads=4)


@pytest.mark.parametrize(("experts", "used", "words"), [
    (4, 5, "n_experts_used must be between 1 and n_experts (4)"),
    (4, 0, "n_experts_used must be between 1 and n_experts (4)"),
    (1, 1, "n_experts must be 0 (dense) or between 2 and 512"),
    (513, 2, "n_experts must be 0 (dense) or between 2 and 512"),
    (-1, 2, "n_experts must be 0 (dense) or between 2 and 512"),
])
def test_bad_expert_specs_are_refused_in_words(experts: int, used: int, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        TinyModelSpec(n_experts=experts, n_experts_used=used)


def test_moe_spec_writes_a_router_and_stacked_experts_per_layer(tmp_path: Path) -> None:
    spec = TinyModelSpec(n_layers=2, n_embd=32, n_ff=48, n_experts=4, n_experts_used=2)
    info = read_gguf(write_tiny_model(tmp_path / "moe.gguf", spec))
    assert info.metadata["llama.expert_count"] == 4 and info.metadata["llama.expert_used_count"] == 2
    shapes = {t.name: t.shape for t in info.tensors if t.name.startswith("blk.1.ffn")}
    # ggml order, as llama.cpp's llama loader asks for them: expert axis last
    assert shapes == {
        "blk.1.ffn_norm.weight": (32,),
        "blk.1.ffn_gate_inp.weight": (32, 4),
        "blk.1.ffn_gate_exps.weight": (32, 48, 4),
        "blk.1.ffn_up_exps.weight": (32, 48, 4),
        "blk.1.ffn_down_exps.weight": (48, 32, 4),
    }
    dense = read_gguf(write_tiny_model(tmp_path / "dense.gguf", TinyModelSpec(n_layers=2, n_embd=32, n_ff=48)))
    assert "llama.expert_count" not in dense.metadata
    # same tokenizer: the vocabulary arrays are the dense model's
    assert info.array_lengths["tokenizer.ggml.tokens"] == dense.array_lengths["tokenizer.ggml.tokens"]
