"""Engine flavors (CPU, CUDA, Metal, Vulkan, ROCm) and which one to pick."""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

from mesh_llm.errors import UserError

FLAVORS: dict[str, list[str]] = {
    "cpu": [],
    "cuda": ["-DGGML_CUDA=ON"],
    "metal": ["-DGGML_METAL=ON"],
    "vulkan": ["-DGGML_VULKAN=ON"],
    "rocm": ["-DGGML_HIP=ON"],
}


@dataclass(frozen=True)
class Toolchains:
    """What the machine has; gathered by `detect_toolchains`, consumed by `pick_flavor`."""

    system: str  # platform.system()
    nvcc: bool = False
    nvidia_gpu: bool = False
    hipcc: bool = False
    amd_gpu: bool = False
    vulkan_sdk: bool = False


def pick_flavor(requested: str | None, tools: Toolchains) -> str:
    """The flavor to build: the one asked for, else the best the machine can use.

    A toolchain alone is not enough for auto-pick: a CUDA compiler on a box
    with no NVIDIA GPU would build an engine that cannot run anything faster.
    """
    if requested and requested != "auto":
        if requested not in FLAVORS:
            raise UserError(f"unknown --llama-flavor {requested!r}: use one of {', '.join(FLAVORS)}, or auto")
        return requested
    if tools.system == "Darwin":
        return "metal"
    if tools.nvcc and tools.nvidia_gpu:
        return "cuda"
    if tools.hipcc and tools.amd_gpu:
        return "rocm"
    if tools.vulkan_sdk:
        return "vulkan"
    return "cpu"


def detect_toolchains() -> Toolchains:
    return Toolchains(
        system=platform.system(),
        nvcc=shutil.which("nvcc") is not None,
        nvidia_gpu=Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/gpus").is_dir(),
        hipcc=shutil.which("hipcc") is not None,
        amd_gpu=Path("/dev/kfd").exists(),
        vulkan_sdk=shutil.which("glslc") is not None and bool(os.environ.get("VULKAN_SDK") or Path("/usr/include/vulkan").is_dir()),
    )
