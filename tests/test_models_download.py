"""Downloads against a local stand-in for the Hugging Face hub (never the real one)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh_llm.models.tiny import TinyModelSpec, write_tiny_model
from tests.conftest import assert_one_line_error, run_cli, wait_for
from tests.hub_standin import COMMIT, HubStandIn

TARGET = ("Qwen/Qwen2.5-3B-Instruct-GGUF", "qwen2.5-3b-instruct-q4_k_m.gguf")
DRAFT = ("Qwen/Qwen2.5-0.5B-Instruct-GGUF", "qwen2.5-0.5b-instruct-q4_k_m.gguf")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hubfiles")
    return {
        "target": write_tiny_model(root / "target.gguf", TinyModelSpec(seed=1, name="stand-in 3b")),
        "draft": write_tiny_model(root / "draft.gguf", TinyModelSpec(n_layers=1, seed=2, name="stand-in 0.5b")),
        # 32 MB: huggingface_hub writes in 10 MB pieces, so a kill after 14 MB leaves 10 MB to resume from
        "big": write_tiny_model(root / "big.gguf", TinyModelSpec(n_layers=2, n_embd=512, n_ff=2048, seed=4, name="big")),
        # the next version of "big": same size and header, other weights
        "big2": write_tiny_model(root / "big2.gguf", TinyModelSpec(n_layers=2, n_embd=512, n_ff=2048, seed=5, name="big")),
    }


@pytest.fixture
def hub(files: dict[str, Path]) -> Iterator[HubStandIn]:
    yield from standin_for(files, redirect=False)


@pytest.fixture
def cdn_hub(files: dict[str, Path]) -> Iterator[HubStandIn]:
    """The stand-in as the real hub serves large files: resolve answers 302 to a CDN on another host."""
    yield from standin_for(files, redirect=True)


def standin_for(files: dict[str, Path], redirect: bool) -> Iterator[HubStandIn]:
    standin = HubStandIn(redirect=redirect)
    standin.add(*TARGET, files["target"])
    standin.add(*DRAFT, files["draft"])
    standin.add("org/tiny-GGUF", "tiny-Q4_K_M.gguf", files["target"])
    standin.add("org/tiny-GGUF", "tiny-Q8_0.gguf", files["draft"])
    standin.add("org/tiny-GGUF", "sub/big-Q2_K.gguf", files["big"])
    standin.add("org/split-GGUF", "s/m-00001-of-00002.gguf", files["target"])
    standin.add("org/split-GGUF", "s/m-00002-of-00002.gguf", files["draft"])
    standin.start()
    yield standin
    standin.stop()


def hub_env(hub: HubStandIn, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), **extra}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def downloaded(proc: subprocess.CompletedProcess[str]) -> Path:
    return Path(proc.stdout.strip().splitlines()[-1].split(": ", 1)[1])


def kill_midway(hub: HubStandIn, tmp_path: Path, ref: str) -> None:
    """Start `mesh-llm download REF` slowly and kill -9 it once 14 MB have been sent."""
    hub.bytes_per_s = 16_000_000
    proc = subprocess.Popen([sys.executable, "-m", "mesh_llm", "download", ref], env={**os.environ, **hub_env(hub, tmp_path)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    wait_for(lambda: hub.sent(Path(ref).name) > 14_000_000, timeout=30, what="14 MB sent")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    hub.bytes_per_s = None


def test_download_3b_with_its_draft_into_the_hf_cache(hub: HubStandIn, files: dict[str, Path], tmp_path: Path) -> None:
    env = hub_env(hub, tmp_path)
    proc = run_cli("download", "3b", "--draft", env=env)
    assert proc.returncode == 0, proc.stderr
    repo_dir = tmp_path / "hf" / "hub" / "models--Qwen--Qwen2.5-3B-Instruct-GGUF"
    pointer = repo_dir / "snapshots" / COMMIT / TARGET[1]
    assert pointer.is_symlink() and sha(pointer) == sha(files["target"])
    assert (repo_dir / "refs" / "main").read_text() == COMMIT
    draft = tmp_path / "hf" / "hub" / "models--Qwen--Qwen2.5-0.5B-Instruct-GGUF" / "snapshots" / COMMIT / DRAFT[1]
    assert sha(draft) == sha(files["draft"])
    assert f"qwen2.5-3b-instruct-q4_k_m: {pointer}" in proc.stdout and f"draft Qwen2.5-0.5B-Instruct-Q4_K_M: {draft}" in proc.stdout

    gets = len([s for s in hub.log if s.method == "GET"])
    again = run_cli("download", "Qwen2.5-3B", "--draft", env=env)  # cached: no transfer at all
    assert again.returncode == 0 and len([s for s in hub.log if s.method == "GET"]) == gets and len(hub.log) == 4

    installed = run_cli("models", "installed", env=env)
    assert "Qwen2.5-3B-Instruct-Q4_K_M" in installed.stdout and "Qwen2.5-0.5B-Instruct-Q4_K_M" in installed.stdout
    listing = run_cli("download", env=env)
    row = next(line for line in listing.stdout.splitlines() if line.startswith("Qwen2.5-3B-Instruct-Q4_K_M "))
    assert " yes " in row
    shown = run_cli("models", "show", "3b", env=env)
    assert "arch      : llama, 4 layers" in shown.stdout and "draft     : Qwen2.5-0.5B-Instruct-Q4_K_M (on disk)" in shown.stdout


def test_every_reference_form_downloads(hub: HubStandIn, files: dict[str, Path], tmp_path: Path) -> None:
    env = hub_env(hub, tmp_path)
    forms = {
        f"{hub.url}/org/tiny-GGUF/resolve/main/tiny-Q8_0.gguf": files["draft"],  # URL
        "org/tiny-GGUF/sub/big-Q2_K.gguf": files["big"],  # shorthand, file in a folder
        "org/tiny-GGUF": files["target"],  # repo: Q4_K_M by default
        "org/tiny-GGUF:q2_k": files["big"],  # repo:QUANT
        "qwen2.5-0.5b-instruct-q4_k_m.gguf": files["draft"],  # a catalog file's name
    }
    for ref, source in forms.items():
        proc = run_cli("models", "download", ref, env=env)
        assert proc.returncode == 0, (ref, proc.stderr)
        path = downloaded(proc)
        assert sha(path) == sha(source), ref
    split = run_cli("download", "org/split-GGUF/s/m-00001-of-00002.gguf", env=env)  # every shard of a split GGUF
    assert split.returncode == 0, split.stderr
    assert {s.path for s in hub.gets("-of-00002.gguf")} == {"s/m-00001-of-00002.gguf", "s/m-00002-of-00002.gguf"}
    missing = run_cli("download", "org/tiny-GGUF:Q4_K", env=env)  # whole words only: Q4_K is not Q4_K_M
    assert_one_line_error(missing, "org/tiny-GGUF has no Q4_K file; it has: big-Q2_K.gguf, tiny-Q4_K_M.gguf, tiny-Q8_0.gguf")


def test_a_killed_download_resumes_where_it_stopped(hub: HubStandIn, files: dict[str, Path], tmp_path: Path) -> None:
    size = files["big"].stat().st_size
    kill_midway(hub, tmp_path, "org/tiny-GGUF/sub/big-Q2_K.gguf")
    partial = list((tmp_path / "hf" / "hub").rglob("*.incomplete"))
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < size
    kept = partial[0].stat().st_size
    other = run_cli("download", "org/tiny-GGUF/tiny-Q8_0.gguf", env=hub_env(hub, tmp_path))  # another file of the repo
    assert other.returncode == 0 and partial[0].stat().st_size == kept  # leaves this partial alone

    done = run_cli("download", "org/tiny-GGUF/sub/big-Q2_K.gguf", env=hub_env(hub, tmp_path))
    assert done.returncode == 0, done.stderr
    first, second = hub.gets("big-Q2_K.gguf")
    assert first.start == 0 and second.start == kept  # asked only for the missing bytes
    assert second.sent == size - kept
    assert "resuming at" in done.stdout
    path = downloaded(done)
    assert sha(path) == sha(files["big"]) and not list((tmp_path / "hf" / "hub").rglob("*.incomplete"))


def test_a_redirected_download_is_named_by_the_linked_etag_and_the_token_stays_on_the_hub(cdn_hub: HubStandIn, files: dict[str, Path], tmp_path: Path) -> None:
    size, digest = files["big"].stat().st_size, sha(files["big"])
    done = run_cli("download", "org/tiny-GGUF/sub/big-Q2_K.gguf", env=hub_env(cdn_hub, tmp_path, HF_TOKEN="hf_secret_for_the_test"))
    assert done.returncode == 0, done.stderr
    path = downloaded(done)
    blobs = tmp_path / "hf" / "hub" / "models--org--tiny-GGUF" / "blobs"
    assert sha(path) == digest and path.resolve() == blobs / digest  # X-Linked-Etag, not the 302's ETag
    assert [p.name for p in blobs.iterdir()] == [digest]  # no .incomplete left
    assert f"({size / 1e9:.2f} GB)" in done.stdout and size / 1e9 >= 0.01  # X-Linked-Size, not the 302's Content-Length
    (get,) = cdn_hub.gets("big-Q2_K.gguf")  # the bytes come from the CDN, in one go
    assert get.server == "cdn" and get.start == 0 and get.sent == size
    resolves = [s.authorization for s in cdn_hub.seen if s.server == "hub" and "/resolve/" in s.path]
    assert resolves and set(resolves) == {"Bearer hf_secret_for_the_test"}  # the hub gets the token...
    assert cdn_hub.authorizations("cdn") == [None]  # ...the CDN never does


def test_a_file_changed_on_the_hub_after_a_kill_is_fetched_anew_from_byte_0(cdn_hub: HubStandIn, files: dict[str, Path], tmp_path: Path) -> None:
    old, new = files["big"], files["big2"]
    assert old.stat().st_size == new.stat().st_size  # so only the ETag can tell the versions apart
    kill_midway(cdn_hub, tmp_path, "org/tiny-GGUF/sub/big-Q2_K.gguf")
    repo_dir = tmp_path / "hf" / "hub" / "models--org--tiny-GGUF"
    (partial,) = (repo_dir / "blobs").iterdir()
    assert partial.name == f"{sha(old)}.incomplete" and 0 < partial.stat().st_size < old.stat().st_size

    commit = cdn_hub.replace("org/tiny-GGUF", "sub/big-Q2_K.gguf", new)  # a push: new bytes, new ETag, new commit
    done = run_cli("download", "org/tiny-GGUF/sub/big-Q2_K.gguf", env=hub_env(cdn_hub, tmp_path))
    assert done.returncode == 0, done.stderr
    first, second = cdn_hub.gets("big-Q2_K.gguf")
    assert first.start == second.start == 0 and second.sent == new.stat().st_size and "resuming at" not in done.stdout
    path = downloaded(done)
    assert path == repo_dir / "snapshots" / commit / "sub" / "big-Q2_K.gguf"
    assert sha(path) == sha(new)  # all of the new version, none of the old
    assert [p.name for p in (repo_dir / "blobs").iterdir()] == [sha(new)]  # the old version's partial is gone


def test_offline_and_missing_models_are_one_clear_line(hub: HubStandIn, tmp_path: Path) -> None:
    unreachable = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    assert_one_line_error(run_cli("download", "3b", env=unreachable), "cannot reach http://127.0.0.1:9", "qwen2.5-3b-instruct-q4_k_m.gguf")
    assert_one_line_error(run_cli("download", "3b", env={**unreachable, "HF_HUB_OFFLINE": "1"}), "HF_HUB_OFFLINE is set")
    # a node asked for a model it cannot fetch fails the same way, before any engine work
    assert_one_line_error(run_cli("--model", "Qwen3-8B", "--port", "0", env=unreachable), "cannot reach", "Qwen3-8B-Q4_K_M.gguf")
    # a model in several files is refused before anything is fetched
    assert_one_line_error(run_cli("--model", "MiniMax", "--port", "0", env=unreachable), "MiniMax-M2.5-Q4_K_M is split over several GGUF files")
    env = hub_env(hub, tmp_path)
    assert_one_line_error(run_cli("download", "org/nope-GGUF/x.gguf", env=env), "no such repository")
    assert_one_line_error(run_cli("download", "org/tiny-GGUF/x.gguf", env=env), "no such file in the repository")
    assert_one_line_error(run_cli("download", "org/tiny-GGUF:IQ1_S", env=env), "has no IQ1_S file")
    assert_one_line_error(run_cli("download", "32b", env=env), "matches several catalog models")


def test_search_lists_catalog_and_hub(hub: HubStandIn, tmp_path: Path) -> None:
    found = run_cli("models", "search", "qwen2.5", env=hub_env(hub, tmp_path))
    assert found.returncode == 0, found.stderr
    assert "catalog  Qwen2.5-7B-Instruct-Q4_K_M" in found.stdout
    assert "hub      Qwen/Qwen2.5-3B-Instruct-GGUF" in found.stdout
    offline = run_cli("models", "search", "qwen2.5", env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert offline.returncode == 0 and "hub search unavailable" in offline.stdout and "catalog  Qwen2.5-7B" in offline.stdout


@pytest.fixture
def in_process_hub(hub: HubStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    return point_at(hub, tmp_path, monkeypatch)


def point_at(hub: HubStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """huggingface_hub in this process pointed at the stand-in (it reads HF_ENDPOINT at import)."""
    from huggingface_hub import constants

    from mesh_llm.models import hub as hub_module

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    return hub_module


def test_not_enough_disk_space_stops_before_downloading(in_process_hub, hub: HubStandIn, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from mesh_llm.errors import UserError

    monkeypatch.setattr(in_process_hub.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(UserError, match=r"not enough disk space for Qwen/Qwen2.5-3B-Instruct-GGUF/qwen2.5-3b-instruct-q4_k_m.gguf: .*set HF_HOME"):
        in_process_hub.download_model(*TARGET, say=lambda line: None)
    assert not hub.gets(TARGET[1])  # nothing was fetched


def test_the_disk_check_counts_the_linked_size_not_the_redirects(cdn_hub: HubStandIn, files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mesh_llm.errors import UserError

    hub_module = point_at(cdn_hub, tmp_path, monkeypatch)
    size = files["big"].stat().st_size
    free = size + hub_module.DISK_MARGIN - 1  # one byte short
    monkeypatch.setattr(hub_module.shutil, "disk_usage", lambda p: type("U", (), {"free": free})())
    with pytest.raises(UserError, match="not enough disk space"):
        hub_module.download_file("org/tiny-GGUF", "sub/big-Q2_K.gguf", say=lambda line: None)
    assert not cdn_hub.gets("big-Q2_K.gguf")
    free += 1  # just enough
    assert sha(hub_module.download_file("org/tiny-GGUF", "sub/big-Q2_K.gguf", say=lambda line: None)) == sha(files["big"])


def test_a_write_error_mid_download_is_one_line_and_keeps_the_partial(in_process_hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import errno

    from huggingface_hub import file_download

    from mesh_llm.errors import UserError

    def full_disk(url, f, **kw):  # type: ignore[no-untyped-def]
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_download, "http_get", full_disk)
    with pytest.raises(UserError, match=r"could not download Qwen/.*q4_k_m.gguf \(No space left on device\): .*run the same command again to resume"):
        in_process_hub.download_model(*TARGET, say=lambda line: None)
    (partial,) = (tmp_path / "cache").rglob("*.incomplete")
    assert partial.stat().st_size == 1000


@pytest.mark.engine
def test_a_node_downloads_the_model_it_is_asked_to_serve(start_node, hub: HubStandIn, files: dict[str, Path], tmp_path: Path) -> None:
    url = f"{hub.url}/org/tiny-GGUF/resolve/main/tiny-Q4_K_M.gguf"
    node = start_node("--model", url, "--ctx-size", "512", "--no-relay", "--bind-host", "127.0.0.1", env=hub_env(hub, tmp_path))
    node.wait_ready()
    assert "Downloading org/tiny-GGUF/tiny-Q4_K_M.gguf" in node.output()
    (model,) = node.status()["models"]
    assert model["name"] == "tiny-Q4_K_M" and model["state"] == "ready"
    assert hub.sent("tiny-Q4_K_M.gguf") == files["target"].stat().st_size


@pytest.mark.parametrize(("repo", "file", "revision"), [("org/r", "../x.gguf", "main"), ("org/r", "x.gguf", "../../main"), ("org/my--r", "x.gguf", "main")])
def test_every_download_refuses_names_that_leave_the_cache(repo: str, file: str, revision: str) -> None:
    """Names from a hub listing or the catalog pass the same check as the user's (before any network)."""
    from mesh_llm.errors import UserError
    from mesh_llm.models import hub as hub_module

    with pytest.raises(UserError, match="path outside its repository|not a valid Hugging Face repo id"):
        hub_module.download_file(repo, file, revision, say=lambda line: None)
