"""Command lines for llama-server (pure: no I/O, unit-tested)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CTX = 8192
TEMPLATES = Path(__file__).parent / "templates"
EMBEDDING_ARCHS = {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "modern-bert", "neo-bert", "t5encoder"}


def fallback_chat_template(metadata: Mapping[str, object]) -> Path | None:
    """A template file for models that ship without one (llama-server would fall
    back to ChatML, which e.g. Gemma does not understand)."""
    if "tokenizer.chat_template" in metadata:
        return None
    arch = str(metadata.get("general.architecture", ""))
    if arch.startswith("gemma"):
        return TEMPLATES / "gemma.jinja"
    return None


def is_embedding_model(metadata: Mapping[str, object]) -> bool:
    """Encoder models serve /v1/embeddings only (llama-server --embeddings)."""
    arch = str(metadata.get("general.architecture", ""))
    return arch in EMBEDDING_ARCHS or f"{arch}.pooling_type" in metadata


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
    chat_template_file: Path | None = None
    embeddings: bool = False
    rpc: tuple[str, ...] = ()  # host:port of RPC workers, in device order
    tensor_split: str | None = None  # -ts, one weight per device (RPC devices first)
    draft: Path | None = None  # a small model of the same vocabulary for speculative decoding
    draft_max: int = 8  # tokens drafted per step
    draft_device: str | None = None  # where the draft runs: a local GPU, or "none" for this host's CPU
    extra: tuple[str, ...] = ()


def choose_ctx(requested: int | None, trained: int) -> int:
    """The context to run: what was asked, else our default capped by what the model was trained on."""
    if requested:
        return requested
    return min(DEFAULT_CTX, trained) if trained > 0 else DEFAULT_CTX


def server_argv(binary: Path, cfg: ServerConfig) -> list[str]:
    """Explicit flags so placement is predictable: no auto-fit, fixed -ngl and -c."""
    argv = [str(binary), "--model", str(cfg.model)]
    if cfg.rpc:
        # before --device: --rpc registers the RPC devices when it is parsed
        argv += ["--rpc", ",".join(cfg.rpc)]
    argv += [
        "--alias", cfg.alias,
        "--host", "127.0.0.1",  # only our proxy talks to it
        "--port", str(cfg.port),
        "--fit", "off",
        "--n-gpu-layers", "all" if cfg.gpu or cfg.rpc else "0",
        "--ctx-size", str(cfg.ctx_size),
        "--jinja",
        "--load-mode", "mmap",
    ]
    if cfg.tensor_split:
        argv += ["--tensor-split", cfg.tensor_split]
    if cfg.rpc:
        argv += ["--cache-ram", "0"]  # the prompt cache aborts over RPC with several slots (llama.cpp #26529)
    if cfg.chat_template_file:
        argv += ["--chat-template-file", str(cfg.chat_template_file)]
    if cfg.embeddings:
        argv += ["--embeddings"]
    if cfg.device:
        argv += ["--device", cfg.device]
    if cfg.threads:
        argv += ["--threads", str(cfg.threads)]
    if cfg.parallel:
        argv += ["--parallel", str(cfg.parallel)]
    return argv + draft_args(cfg) + list(cfg.extra)


def draft_args(cfg: ServerConfig) -> list[str]:
    """Speculative decoding with a separate draft model (the pinned engine dropped --draft-max).

    The device is explicit because the draft otherwise follows the main model's
    devices, RPC workers included: a split would then ship every drafted token
    over the network, the very round trips the draft exists to save.
    """
    if cfg.draft is None:
        return []
    argv = ["--spec-type", "draft-simple", "--spec-draft-model", str(cfg.draft), "--spec-draft-n-max", str(cfg.draft_max)]
    if cfg.draft_device:
        argv += ["--spec-draft-device", cfg.draft_device]
        if cfg.draft_device != "none":
            argv += ["--spec-draft-ngl", "all"]
    return argv
