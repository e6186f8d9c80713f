"""The same-model check that decides whether a worker may join a split."""

import shutil
from pathlib import Path

from mesh_llm.models.fingerprint import cached_fingerprint, fingerprint
from mesh_llm.models.gguf_file import inspect_model
from mesh_llm.models.tiny import TinyModelSpec, write_tiny_model


def test_copies_match_and_other_weights_do_not(tmp_path: Path) -> None:
    a = write_tiny_model(tmp_path / "a" / "m.gguf", TinyModelSpec(seed=1))
    copy = tmp_path / "copy" / "m.gguf"
    copy.parent.mkdir()
    shutil.copy(a, copy)
    other = write_tiny_model(tmp_path / "b" / "m.gguf", TinyModelSpec(seed=2))  # same header, other weights
    assert fingerprint(inspect_model(a)) == fingerprint(inspect_model(copy))
    assert fingerprint(inspect_model(a)) != fingerprint(inspect_model(other))


def test_a_changed_byte_in_the_data_is_noticed_at_a_sampled_place(tmp_path: Path) -> None:
    a = write_tiny_model(tmp_path / "m.gguf", TinyModelSpec(seed=1))
    info = inspect_model(a)
    before = fingerprint(info)
    with a.open("r+b") as f:  # the first sample starts at the data section
        f.seek(info.data_offset)
        byte = f.read(1)
        f.seek(info.data_offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert fingerprint(inspect_model(a)) != before


def test_cache_is_used_and_invalidated_by_a_new_file(tmp_path: Path, monkeypatch) -> None:
    a = write_tiny_model(tmp_path / "m.gguf", TinyModelSpec(seed=1))
    cache = tmp_path / "fp.json"
    first = cached_fingerprint(inspect_model(a), cache)
    calls = []
    import mesh_llm.models.fingerprint as fp_mod

    monkeypatch.setattr(fp_mod, "fingerprint", lambda info: calls.append(1) or "x")
    assert cached_fingerprint(inspect_model(a), cache) == first and not calls
    write_tiny_model(a, TinyModelSpec(seed=5))  # rewritten: new mtime and content
    assert cached_fingerprint(inspect_model(a), cache) == "x" and calls
    cache.write_text("not json")
    assert cached_fingerprint(inspect_model(a), cache) == "x"  # a broken cache is only a miss
