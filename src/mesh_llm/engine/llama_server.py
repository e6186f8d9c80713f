"""Command lines for llama-server (pure: no I/O, unit-tested)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_CTX = 8192


@dataclass(frozen=True)
class ServerConfig:
    model: Path
    alias: str  # the id clients use in `model` and see in /v1/models
    port: int
    ctx_size: int = DEFAULT_CTX
    gpu: bool = False  # does this engine flavor offload to a GPU?
    device: str | None = None
    threads: int | None = None
    parallel: int | None = None
    extra: tuple[str, ...] = ()


def choose_ctx(requested: int | None, trained: int) -> int:
    """The context to run: what was asked, else our default capped by what the model was trained on."""
    if requested:
        return requested
    return min(DEFAULT_CTX, trained) if trained > 0 else DEFAULT_CTX


def server_argv(binary: Path, cfg: ServerConfig) -> list[str]:
    """Explicit flags so placement is predictable: no auto-fit, fixed -ngl and -c."""
    argv = [
        str(binary),
        "--model", str(cfg.model),
        "--alias", cfg.alias,
        "--host", "127.0.0.1",  # only our proxy talks to it
        "--port", str(cfg.port),
        "--fit", "off",
        "--n-gpu-layers", "all" if cfg.gpu else "0",
        "--ctx-size", str(cfg.ctx_size),
        "--jinja",
        "--load-mode", "mmap",
    ]
    if cfg.device:
        argv += ["--device", cfg.device]
    if cfg.threads:
        argv += ["--threads", str(cfg.threads)]
    if cfg.parallel:
        argv += ["--parallel", str(cfg.parallel)]
    return argv + list(cfg.extra)
