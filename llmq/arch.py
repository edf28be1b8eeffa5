"""The architectures the converter knows, one `ArchSpec` each, in a registry keyed by HF `model_type`.

All four are the same dense decoder (RMSNorm, rotary attention with GQA, SwiGLU MLP); they differ in the GGUF
architecture name, in rope layout (llama.cpp's llama arch expects Q/K rows permuted to interleaved rope pairs), in
q/k/v biases (qwen2) and per-head q/k RMSNorm (qwen3).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import gguf
import numpy as np

from .errors import LlmqError


@dataclass(frozen=True)
class HParams:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx: int
    rms_eps: float
    rope_theta: float
    rope: dict  # the checkpoint's rope parameters (rope_type, factor, ...), old or new layout
    tied_embeddings: bool
    head_dim_explicit: bool


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool  # llama arch: HF rotate-half layout -> ggml interleaved pairs
    qkv_bias: bool = False
    qk_norm: bool = False
    write_rope_dim: bool = False  # llama.cpp's LlamaModel writes rope.dimension_count and vocab_size

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", gguf.MODEL_ARCH.LLAMA, permute_qk=True, write_rope_dim=True),
    "mistral": ArchSpec("mistral", gguf.MODEL_ARCH.LLAMA, permute_qk=True, write_rope_dim=True),
    "qwen2": ArchSpec("qwen2", gguf.MODEL_ARCH.QWEN2, permute_qk=False, qkv_bias=True),
    "qwen3": ArchSpec("qwen3", gguf.MODEL_ARCH.QWEN3, permute_qk=False, qk_norm=True),
}
# GGUF architecture name -> HF model_type written by `llmq unpack`
GGUF_TO_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def get_arch(config: dict) -> ArchSpec:
    mt = config.get("model_type")
    if mt not in ARCHS:
        archs = config.get("architectures") or []
        found = f"model_type {mt!r}" + (f" ({archs[0]})" if archs else "")
        raise LlmqError(f"unsupported architecture: {found}; supported: {', '.join(ARCHS)}")
    return ARCHS[mt]


def _need(config: dict, key: str):
    if key not in config or config[key] is None:
        raise LlmqError(f"config.json lacks {key!r}, which a {config.get('model_type')} model needs")
    v = config[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise LlmqError(f"config.json: {key} = {v!r} is not a positive number")
    return v


def rope_parameters(config: dict) -> dict:
    """transformers 5 writes `rope_parameters` (with rope_theta inside); older files `rope_theta` + `rope_scaling`."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope = dict(rope.get("full_attention", rope))
    if "rope_type" not in rope and "type" in rope:
        rope["rope_type"] = rope["type"]
    if "rope_theta" not in rope:
        rope["rope_theta"] = config.get("rope_theta", 10000.0)
    return rope


def read_hparams(config: dict) -> HParams:
    n_head = int(_need(config, "num_attention_heads"))
    n_embd = int(_need(config, "hidden_size"))
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    head_dim = config.get("head_dim")
    explicit = head_dim is not None
    head_dim = int(head_dim) if explicit else n_embd // n_head
    if n_head % n_head_kv:
        raise LlmqError(f"config.json: num_attention_heads {n_head} is not a multiple of num_key_value_heads {n_head_kv}")
    rope = rope_parameters(config)
    return HParams(
        n_layer=int(_need(config, "num_hidden_layers")), n_embd=n_embd, n_ff=int(_need(config, "intermediate_size")),
        n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, n_vocab=int(_need(config, "vocab_size")),
        n_ctx=int(config.get("max_position_embeddings") or 2048), rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope["rope_theta"]), rope=rope,
        tied_embeddings=bool(config.get("tie_word_embeddings", False)), head_dim_explicit=explicit,
    )


def write_hparams(w: gguf.GGUFWriter, spec: ArchSpec, hp: HParams) -> None:
    """The hyper-parameter keys llama.cpp's convert_hf_to_gguf.py writes for these architectures."""
    w.add_block_count(hp.n_layer)
    w.add_context_length(hp.n_ctx)
    w.add_embedding_length(hp.n_embd)
    w.add_feed_forward_length(hp.n_ff)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    rope_type = str(hp.rope.get("rope_type") or "default").lower()
    factor = hp.rope.get("factor")
    if rope_type == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(hp.rope["original_max_position_embeddings"])
    elif rope_type not in ("default", "llama3"):
        raise LlmqError(f"rope type {rope_type!r} is not supported (supported: default, linear, yarn, llama3)")
    w.add_rope_freq_base(hp.rope_theta)
    w.add_layer_norm_rms_eps(hp.rms_eps)
    if hp.head_dim_explicit:
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
    if spec.write_rope_dim:
        w.add_vocab_size(hp.n_vocab)
        w.add_rope_dimension_count(hp.head_dim)


def llama3_rope_factors(hp: HParams) -> np.ndarray | None:
    """Per-frequency divisors of Llama 3.x long-context rope, stored as the `rope_freqs.weight` tensor."""
    if str(hp.rope.get("rope_type", "")).lower() != "llama3":
        return None
    dim = hp.head_dim
    freqs = 1.0 / (hp.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = hp.rope.get("factor", 8.0)
    low, high = hp.rope.get("low_freq_factor", 1.0), hp.rope.get("high_freq_factor", 4.0)
    old_ctx = hp.rope.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF stores each head's rotary dims as two halves; ggml's llama rope rotates adjacent pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# GGUF tensor name -> HF tensor name, for `llmq unpack` (the forward direction uses gguf-py's TensorNameMap;
# a test checks both agree).
_GGUF_TO_HF = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", r"model.layers.\1.self_attn.q_proj.\2"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", r"model.layers.\1.self_attn.k_proj.\2"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", r"model.layers.\1.self_attn.v_proj.\2"),
    (r"blk\.(\d+)\.attn_output\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.attn_q_norm\.weight", r"model.layers.\1.self_attn.q_norm.weight"),
    (r"blk\.(\d+)\.attn_k_norm\.weight", r"model.layers.\1.self_attn.k_norm.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", r"model.layers.\1.mlp.down_proj.weight"),
]


def gguf_to_hf_name(name: str) -> str | None:
    for pat, repl in _GGUF_TO_HF:
        if re.fullmatch(pat, name):
            return re.sub(pat, repl, name)
    return None  # e.g. rope_freqs.weight: derived from config, not a checkpoint tensor


def hf_to_gguf_name(tmap: gguf.TensorNameMap, name: str) -> str | None:
    return tmap.get_name(name, try_suffixes=(".weight", ".bias"))


def expected_shapes(spec: ArchSpec, hp: HParams) -> dict[str, tuple[int, ...]]:
    """GGUF name -> numpy shape (rows, cols) every checkpoint of this arch must provide."""
    q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (hp.n_vocab, hp.n_embd), "output_norm.weight": (hp.n_embd,)}
    if not hp.tied_embeddings:
        shapes["output.weight"] = (hp.n_vocab, hp.n_embd)
    for i in range(hp.n_layer):
        b = f"blk.{i}."
        shapes.update({
            b + "attn_norm.weight": (hp.n_embd,), b + "ffn_norm.weight": (hp.n_embd,),
            b + "attn_q.weight": (q, hp.n_embd), b + "attn_k.weight": (kv, hp.n_embd),
            b + "attn_v.weight": (kv, hp.n_embd), b + "attn_output.weight": (hp.n_embd, q),
            b + "ffn_gate.weight": (hp.n_ff, hp.n_embd), b + "ffn_up.weight": (hp.n_ff, hp.n_embd),
            b + "ffn_down.weight": (hp.n_embd, hp.n_ff),
        })
        if spec.qkv_bias:
            shapes.update({b + "attn_q.bias": (q,), b + "attn_k.bias": (kv,), b + "attn_v.bias": (kv,)})
        if spec.qk_norm:
            shapes.update({b + "attn_q_norm.weight": (hp.head_dim,), b + "attn_k_norm.weight": (hp.head_dim,)})
    return shapes


Transform = Callable[[np.ndarray], np.ndarray]


def tensor_transform(spec: ArchSpec, hp: HParams, gguf_name: str) -> Transform | None:
    if spec.permute_qk:
        if re.fullmatch(r"blk\.\d+\.attn_q\.(weight|bias)", gguf_name):
            return lambda w: permute_qk(w, hp.n_head)
        if re.fullmatch(r"blk\.\d+\.attn_k\.(weight|bias)", gguf_name):
            return lambda w: permute_qk(w, hp.n_head_kv)
    return None
