"""Small random-weight GGUF models for tests and benchmarks.

`write_tiny_model` writes a dense llama-architecture model with a working
byte-level BPE tokenizer (GPT-2 byte alphabet, a few merges, ChatML special
tokens and template) that llama-server loads in well under a second. The
output head only has weights for printable ASCII tokens, so greedy text is
visible characters and generation never stops early on EOS.

With `n_experts` set the FFN of every layer is a Mixtral-style mixture of
experts (llama architecture, `<arch>.expert_count` / `expert_used_count`, a
router `ffn_gate_inp` and 3-D `ffn_{gate,up,down}_exps` tensors), which the
pinned llama.cpp runs through the same llama graph; everything else, the
tokenizer included, is the dense model's. `hot_expert` makes every layer's
router pick that expert for every token (tests of the expert ranking).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, LlamaFileType, TokenType

from mesh_llm.models.gguf_file import MAX_EXPERTS

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# hot_expert: every token embedding gets +HOT_OFFSET on dimension 0, which the residual stream
# keeps, and the hot expert's router row reads only that dimension, with HOT_GAIN
HOT_OFFSET, HOT_GAIN = 8.0, 4.0
COMMON_PAIRS = ["t h", "th e", "i n", "a n", "e r", "o n", "r e", "Ġ t", "Ġt he", "Ġ a", "e n", "a t", "o r", "e s"]


@dataclass(frozen=True)
class TinyModelSpec:
    n_layers: int = 4
    n_embd: int = 64
    n_ff: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2
    context_length: int = 4096
    dtype: str = "f32"  # "f32" or "f16" for the 2-D weights
    seed: int = 0
    name: str = "tiny-llama"
    n_experts: int = 0  # 0 = dense; otherwise experts per layer (each n_ff wide)
    n_experts_used: int = 2  # experts the router picks per token (MoE only)
    merges: tuple[str, ...] = tuple(COMMON_PAIRS)  # another list gives another vocabulary (a draft that cannot pair)
    bos_token: str = "<|endoftext|>"  # special tokens and whether the tokenizer adds them: drafts must match
    eos_token: str = "<|im_end|>"
    add_bos: bool = False
    add_eos: bool = False
    hot_expert: int | None = None  # MoE only: the expert every router prefers for every token
    chat_template: str = ""  # "" is ChatML without tools (CHATML_TEMPLATE); tests of tool calls give one that renders tools

    def __post_init__(self) -> None:
        if self.n_embd % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError("n_embd must divide by n_heads, and n_heads by n_kv_heads")
        if self.dtype not in ("f32", "f16"):
            raise ValueError("dtype must be f32 or f16")
        # llama.cpp asserts the upper bounds at load; one expert would be a dense FFN in disguise
        if self.n_experts and not 2 <= self.n_experts <= MAX_EXPERTS:
            raise ValueError(f"n_experts must be 0 (dense) or between 2 and {MAX_EXPERTS}, not {self.n_experts}")
        if self.n_experts and not 1 <= self.n_experts_used <= self.n_experts:
            raise ValueError(f"n_experts_used must be between 1 and n_experts ({self.n_experts}), not {self.n_experts_used}")
        if self.hot_expert is not None and not 0 <= self.hot_expert < self.n_experts:
            raise ValueError(f"hot_expert must be an expert id below n_experts ({self.n_experts}), not {self.hot_expert}")
        if not {self.bos_token, self.eos_token} <= set(SPECIAL_TOKENS):
            raise ValueError(f"bos_token and eos_token must be among {SPECIAL_TOKENS}")


def gpt2_byte_alphabet() -> list[str]:
    """The 256 printable stand-ins GPT-2 style BPE uses for raw bytes, indexed by byte."""
    direct = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping: dict[int, str] = {b: chr(b) for b in direct}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return [mapping[b] for b in range(256)]


def tiny_vocab(pairs: tuple[str, ...] = tuple(COMMON_PAIRS)) -> tuple[list[str], list[int], list[str], list[int]]:
    """tokens, token types, merges, and ids of printable-ASCII tokens."""
    alphabet = gpt2_byte_alphabet()
    tokens = list(alphabet)
    merges = []
    for pair in pairs:
        left, right = pair.split(" ")
        if left + right not in tokens:
            merges.append(pair)
            tokens.append(left + right)
    n_normal = len(tokens)
    tokens += SPECIAL_TOKENS
    types = [TokenType.NORMAL] * n_normal + [TokenType.CONTROL] * len(SPECIAL_TOKENS)
    byte_of = {symbol: b for b, symbol in enumerate(alphabet)}
    printable = [i for i, token in enumerate(tokens[:n_normal]) if all(0x20 <= byte_of[symbol] < 0x7F for symbol in token)]
    return tokens, [int(t) for t in types], merges, printable


def write_tiny_model(path: Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    tokens, types, merges, printable = tiny_vocab(spec.merges)
    n_vocab = len(tokens)
    head_dim = spec.n_embd // spec.n_heads
    n_embd_kv = head_dim * spec.n_kv_heads
    wtype = np.float16 if spec.dtype == "f16" else np.float32

    def mat(rows: int, cols: int, scale: float | None = None) -> np.ndarray:
        s = scale if scale is not None else 1.0 / np.sqrt(cols)
        return (rng.standard_normal((rows, cols)) * s).astype(wtype)

    w = GGUFWriter(str(path), "llama")
    w.add_name(spec.name)
    w.add_file_type(LlamaFileType.MOSTLY_F16 if spec.dtype == "f16" else LlamaFileType.ALL_F32)
    w.add_context_length(spec.context_length)
    w.add_embedding_length(spec.n_embd)
    w.add_feed_forward_length(spec.n_ff)
    if spec.n_experts:
        w.add_expert_count(spec.n_experts)
        w.add_expert_used_count(spec.n_experts_used)
    w.add_block_count(spec.n_layers)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index(spec.bos_token))
    w.add_eos_token_id(tokens.index(spec.eos_token))
    w.add_add_bos_token(spec.add_bos)
    if spec.add_eos:
        w.add_add_eos_token(True)
    w.add_chat_template(spec.chat_template or CHATML_TEMPLATE)

    embd = mat(n_vocab, spec.n_embd, 1.0)
    if spec.hot_expert is not None:
        embd[:, 0] += HOT_OFFSET
    w.add_tensor("token_embd.weight", embd)
    for i in range(spec.n_layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(spec.n_embd, dtype=np.float32))
        w.add_tensor(p + "attn_q.weight", mat(spec.n_embd, spec.n_embd))
        w.add_tensor(p + "attn_k.weight", mat(n_embd_kv, spec.n_embd))
        w.add_tensor(p + "attn_v.weight", mat(n_embd_kv, spec.n_embd))
        w.add_tensor(p + "attn_output.weight", mat(spec.n_embd, spec.n_embd))
        w.add_tensor(p + "ffn_norm.weight", np.ones(spec.n_embd, dtype=np.float32))
        for name, tensor in (_expert_ffn(spec, rng, wtype) if spec.n_experts else _dense_ffn(spec, mat)):
            w.add_tensor(p + name, tensor)
    w.add_tensor("output_norm.weight", np.ones(spec.n_embd, dtype=np.float32))
    head = np.zeros((n_vocab, spec.n_embd), dtype=wtype)
    head[printable] = mat(len(printable), spec.n_embd, 4.0 / np.sqrt(spec.n_embd))
    w.add_tensor("output.weight", head)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _dense_ffn(spec: TinyModelSpec, mat: Callable[[int, int], np.ndarray]) -> list[tuple[str, np.ndarray]]:
    return [
        ("ffn_gate.weight", mat(spec.n_ff, spec.n_embd)),
        ("ffn_up.weight", mat(spec.n_ff, spec.n_embd)),
        ("ffn_down.weight", mat(spec.n_embd, spec.n_ff)),
    ]


def _expert_ffn(spec: TinyModelSpec, rng: np.random.Generator, wtype: type) -> list[tuple[str, np.ndarray]]:
    """Router plus experts stacked on the slowest axis (numpy order: expert first)."""

    def stacked(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((spec.n_experts, rows, cols)) / np.sqrt(cols)).astype(wtype)

    # a strong random router spreads tokens over different experts, so the choice matters
    router = (rng.standard_normal((spec.n_experts, spec.n_embd)) * 4.0 / np.sqrt(spec.n_embd)).astype(np.float32)
    if spec.hot_expert is not None:
        router[spec.hot_expert] = 0.0
        router[spec.hot_expert, 0] = HOT_GAIN
    return [
        ("ffn_gate_inp.weight", router),
        ("ffn_gate_exps.weight", stacked(spec.n_ff, spec.n_embd)),
        ("ffn_up_exps.weight", stacked(spec.n_ff, spec.n_embd)),
        ("ffn_down_exps.weight", stacked(spec.n_embd, spec.n_ff)),
    ]
