"""How much memory a node offers to models (pure, plus one optional NVML probe).

The engine itself says what it can offload to: `llama-server --list-devices`
prints every GPU with its total and free MiB (CUDA, ROCm, Vulkan and Metal,
where the figure already follows Apple's working-set rule for unified memory).
NVIDIA figures come from NVML when nvidia-ml-py is installed. A CPU-only node
offers a fixed share of RAM: llama.cpp would report all of it as free.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

CPU_RAM_SHARE = 0.75  # leave a quarter of RAM to the OS and other programs
GB = 1_000_000_000

_DEVICE_LINE = re.compile(r"^\s+(?P<name>[A-Za-z]+\d*): .*\((?P<total>\d+) MiB, (?P<free>\d+) MiB free\)\s*$")


@dataclass(frozen=True)
class DeviceMemory:
    name: str  # llama.cpp device name: CUDA0, ROCm0, Vulkan0, MTL0
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class Offer:
    bytes: int
    device: str  # what llama.cpp runs the layers on: "CPU", "CUDA0", "CUDA0+CUDA1", …
    source: str  # how the figure was found, for the status page and logs


def parse_device_memory(text: str) -> list[DeviceMemory]:
    """GPUs from `--list-devices` output (`  CUDA0: NVIDIA … (24080 MiB, 23000 MiB free)`)."""
    out = []
    for line in text.splitlines():
        if m := _DEVICE_LINE.match(line):
            out.append(DeviceMemory(m["name"], int(m["total"]) << 20, int(m["free"]) << 20))
    return out


def nvml_devices() -> list[DeviceMemory]:
    """NVIDIA GPUs via NVML, or [] when nvidia-ml-py or a driver is missing."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver: NVMLError subclasses vary by version
        return []
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            mem = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i))
            out.append(DeviceMemory(f"CUDA{i}", int(mem.total), int(mem.free)))
        return out
    finally:
        pynvml.nvmlShutdown()


def system_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def choose_offer(gpus: list[DeviceMemory], ram_bytes: int, *, device: str | None = None, max_vram_gb: float | None = None, source: str = "llama.cpp") -> Offer:
    """What this node advertises: its GPUs' memory (or the one `--device` picks), else a
    share of RAM; `--max-vram` caps either."""
    chosen = [g for g in gpus if device is None or g.name == device]
    if device is not None and device.upper() != "CPU" and not chosen:
        names = ", ".join(g.name for g in gpus) or "none"
        raise ValueError(f"--device {device} is not a device of this machine (found: {names}, CPU)")
    if chosen and (device is None or device.upper() != "CPU"):
        offer = Offer(sum(g.total_bytes for g in chosen), "+".join(g.name for g in chosen), source)
    else:
        offer = Offer(int(CPU_RAM_SHARE * ram_bytes), "CPU", f"{CPU_RAM_SHARE:.0%} of RAM")
    if max_vram_gb is not None and max_vram_gb * GB < offer.bytes:
        offer = Offer(int(max_vram_gb * GB), offer.device, "--max-vram")
    return offer
