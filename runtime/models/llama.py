"""The decoder-only transformer of the llama family: llama, mistral (a llama GGUF), qwen2 (q/k/v biases) and
qwen3 (per-head RMSNorm on q and k), in the numerics of llama.cpp's CPU backend.

The model is built from GGUF tensor names -> weights, where a weight is a float32 array or a kernels.QTensor, so
the same code runs a quantised GGUF and serves the converter's calibration on float weights. Every projection is a
`Linear` with a name and an `input_hook`, and the model can be run piece by piece:

    h = model.embed(tokens)
    for block in model.layers:
        h = block(h, pos=0)               # no cache: causal attention within the given tokens
    logits = model.output(model.norm(h))

Shapes: n = tokens in the batch, H = query heads, KV = key/value heads, G = H // KV (query heads per kv head),
d = head_dim, L = keys attended to."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from numba import njit

from llmq.errors import LlmqError

from ..kvcache import attend_f16, mix_dense, scores_dense, swiglu

# llama.cpp's llama_model_rope_type(): these architectures rotate (x[i], x[i + d/2]) pairs ("NEOX"); llama-type
# GGUFs rotate adjacent (x[2i], x[2i+1]) pairs ("NORM") because convert_hf_to_gguf permutes their q/k rows.
NEOX_ROPE_ARCHS = frozenset({"qwen2", "qwen3"})

PREFILL_CHUNK = 512  # tokens per forward pass during prefill, like llama.cpp's default n_batch
# The feed-forward part of a prefill batch runs in slices of this many rows: its products give every row the same
# result in any slice that starts at a multiple of 16 and has at least 16 rows (they group activation rows by 4 and
# 16 from the start and switch kernels only below 8 rows), and a quarter of a batch of gate/up/swiglu activations
# and kernel scratch is 7-10 MiB less peak RSS on SmolLM2 than the whole batch (512-token prefill, bench/runtime.py;
# 128 rather than 256 rows: 2 MiB). The attention is not sliced.
FFN_SLICE = 128
# Set LLMQ_FAST_ATTENTION=1 for numpy attention (BLAS products, np.exp softmax): faster, but not llama.cpp's rounding.
EXACT_ATTENTION = os.environ.get("LLMQ_FAST_ATTENTION") != "1"


@dataclass
class ModelArgs:
    arch: str
    n_layers: int
    dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    rope_dim: int
    rope_neox: bool
    rope_freq_scale: float = 1.0  # 1 / linear rope-scaling factor
    n_ctx_train: int = 4096

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], vocab_size: int | None = None) -> "ModelArgs":
        arch = meta.get("general.architecture")
        if arch is None:
            raise LlmqError("GGUF has no general.architecture key")

        def get(key, default=None):
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise LlmqError(f"GGUF is missing the {arch}.{key} key")
            return value

        dim = int(get("embedding_length"))
        n_heads = int(get("attention.head_count"))
        head_dim = int(get("attention.key_length", dim // n_heads))
        if vocab_size is None:
            vocab_size = int(meta.get(f"{arch}.vocab_size") or len(get_tokens(meta)))
        scaling = str(meta.get(f"{arch}.rope.scaling.type", "none"))
        if scaling == "linear":
            freq_scale = 1.0 / float(get("rope.scaling.factor"))
        elif scaling == "none":
            freq_scale = 1.0
        else:
            raise LlmqError(f"rope scaling type {scaling!r} is not supported (supported: none, linear, llama3)")
        return cls(
            arch=arch,
            n_layers=int(get("block_count")),
            dim=dim,
            hidden_dim=int(get("feed_forward_length")),
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            vocab_size=vocab_size,
            norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_dim=int(get("rope.dimension_count", head_dim)),
            rope_neox=arch in NEOX_ROPE_ARCHS,
            rope_freq_scale=freq_scale,
            n_ctx_train=int(get("context_length", 4096)),
        )


def get_tokens(meta: Mapping[str, Any]) -> list:
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise LlmqError("GGUF has neither a vocab_size key nor tokenizer.ggml.tokens")
    return tokens


# ----------------------------------------------------------------------------------------------- building blocks

class Linear:
    """y = x W^T (+ b). W is a float32 array (rows, cols) or a kernels.QTensor; decode (one token) uses the
    matrix-vector kernel, prefill the matrix-matrix one. `input_hook(name, x)` sees every input (for calibration)."""

    def __init__(self, name: str, weight, bias: np.ndarray | None = None):
        self.name = name
        self.weight = weight
        self.bias = bias
        self.scale: np.float32 | None = None  # `<name>.scale` (FP4 tensor scale), applied as llama.cpp does
        self.input_hook: Callable[[str, np.ndarray], None] | None = None
        # rounds the input before the product (act_quant.fake_quant_per_token_int8 for W8A8-style serving)
        self.act_quant: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.input_hook is not None:
            self.input_hook(self.name, x)
        if self.act_quant is not None:
            x = self.act_quant(x)
        w = self.weight
        if isinstance(w, np.ndarray):
            y = x @ w.T
        else:
            from .. import kernels

            y = kernels.matvec(w, x[0])[None, :] if x.shape[0] == 1 else kernels.matmul(w, x)
        if self.scale is not None:  # llama.cpp: ggml_mul(matmul, scale) before the bias (build_lora_mm)
            y = y * self.scale
        if self.bias is not None:
            y = y + self.bias
        return np.asarray(y, dtype=np.float32)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis, rounded step by step as ggml_rms_norm (float squares summed in double, float
    mean and scale) followed by the weight multiply."""
    sum_squares = np.sum(np.square(x).astype(np.float64), axis=-1, keepdims=True)
    mean = (sum_squares / x.shape[-1]).astype(np.float32)
    scale = np.float32(1.0) / np.sqrt(mean + np.float32(eps))
    return (x * scale) * weight


class RMSNorm:
    def __init__(self, weight: np.ndarray, eps: float):
        self.weight = np.asarray(weight, dtype=np.float32)
        self.eps = eps

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return rms_norm(x, self.weight, self.eps)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


class Rope:
    """Rotary position embedding as ggml_rope_ext computes it (no YaRN): the angle of pair i at position p is
    p * theta_scale**i, built by repeated float32 multiplication like ggml_rope_cache_init, divided by llama3's
    per-pair frequency factor (`rope_freqs.weight`) and multiplied by the linear-scaling freq_scale."""

    def __init__(self, args: ModelArgs, freq_factors: np.ndarray | None = None):
        self.rope_dim = args.rope_dim
        self.neox = args.rope_neox
        self.theta_scale = np.float32(args.rope_theta ** (-2.0 / args.rope_dim))
        self.freq_scale = np.float32(args.rope_freq_scale)
        n_pairs = args.rope_dim // 2
        self.freq_factors = (np.ones(n_pairs, np.float32) if freq_factors is None
                             else np.asarray(freq_factors, np.float32)[:n_pairs])
        self._cos = self._sin = np.zeros((0, n_pairs), np.float32)

    def _table(self, n_positions: int) -> None:
        self._cos, self._sin = _rope_table(n_positions, self.theta_scale, self.freq_scale, self.freq_factors)

    def __call__(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """x: (n, heads, d) -> rotated copy; the channels past rope_dim pass through."""
        if positions[-1] >= self._cos.shape[0]:
            self._table(max(2 * self._cos.shape[0], int(positions[-1]) + 1, 256))
        cos = self._cos[positions][:, None, :]
        sin = self._sin[positions][:, None, :]
        out = x.copy()
        r = self.rope_dim
        first, second = (slice(0, r // 2), slice(r // 2, r)) if self.neox else (slice(0, r, 2), slice(1, r, 2))
        x0, x1 = x[..., first], x[..., second]
        # ggml's rotate_pairs as GCC compiles it: the first product of each line is fused into the add (FMA), the
        # second rounded on its own. In float64 the product of two floats is exact, so one rounding remains.
        out[..., first] = (x0.astype(np.float64) * cos + (-(x1 * sin))).astype(np.float32)
        out[..., second] = (x0.astype(np.float64) * sin + (x1 * cos)).astype(np.float32)
        return out


@njit(cache=True)
def _rope_table(n_positions, theta_scale, freq_scale, freq_factors):
    """cos and sin (n_positions, pairs) as ggml_rope_cache_init: theta = p * theta_scale**i by repeated float
    multiplication, cosf/sinf of libm (numba calls them for float32 arguments, as ggml does)."""
    cos = np.empty((n_positions, freq_factors.size), np.float32)
    sin = np.empty((n_positions, freq_factors.size), np.float32)
    for p in range(n_positions):
        theta = np.float32(p)
        for i in range(freq_factors.size):
            angle = freq_scale * (theta / freq_factors[i])
            cos[p, i] = math.cos(angle)
            sin[p, i] = math.sin(angle)
            theta = theta * theta_scale
    return cos, sin


def softmax(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------------- the model

class Attention:
    def __init__(self, args: ModelArgs, layer: int, w: Mapping[str, Any], rope: Rope):
        p = f"blk.{layer}."
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = _linear(w, p + "attn_q")
        self.wk = _linear(w, p + "attn_k")
        self.wv = _linear(w, p + "attn_v")
        self.wo = _linear(w, p + "attn_output")
        self.q_norm = RMSNorm(w[p + "attn_q_norm.weight"], args.norm_eps) if p + "attn_q_norm.weight" in w else None
        self.k_norm = RMSNorm(w[p + "attn_k_norm.weight"], args.norm_eps) if p + "attn_k_norm.weight" in w else None
        self.rope = rope
        self.scale = np.float32(1.0 / math.sqrt(args.head_dim))

    def __call__(self, x: np.ndarray, pos: int, cache=None) -> np.ndarray:
        n, H, KV, d = x.shape[0], self.n_heads, self.n_kv_heads, self.head_dim
        G = H // KV
        q = self.wq(x).reshape(n, H, d)
        k = self.wk(x).reshape(n, KV, d)
        v = self.wv(x).reshape(n, KV, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        positions = np.arange(pos, pos + n)
        q, k = self.rope(q, positions), self.rope(k, positions)
        if cache is not None:
            q, k, v = cache.rotate_qkv(q, k, v)

        if EXACT_ATTENTION and cache is not None and "f32" not in (cache.type_k, cache.type_v) and d % 16 == 0:
            cache.store(self.layer, pos, k.reshape(n, KV * d), v.reshape(n, KV * d))
            if cache.type_k == cache.type_v == "f16":
                from ..decode import attend_f16_cache

                out = attend_f16_cache(q, cache.k[self.layer].data, cache.v[self.layer].data, self.scale, pos, KV)
            else:
                # q8_0 / q4_0 rows go through the same products and softmax once dequantised. q stays at f16
                # precision instead of being quantised to q8_0 like llama.cpp's vec_dot does: that rounding is as
                # large as the cache's own, and dropping it cuts the KLD against the f16 cache by 40%
                # (bench/results/runtime.md).
                out = attend_f16(q, cache.keys(self.layer, pos + n), cache.values(self.layer, pos + n), self.scale,
                                 pos, KV)
            return self.wo(cache.unrotate_output(out))
        qh = q.reshape(n, KV, G, d).transpose(1, 2, 0, 3)          # (KV, G, n, d)
        if cache is None:  # calibration / stateless use: attend within this batch only
            key_pos0, L = pos, n
            scores = scores_dense(qh, k.reshape(n, KV * d))          # (KV, G, n, L)
        else:
            cache.store(self.layer, pos, k.reshape(n, KV * d), v.reshape(n, KV * d))
            key_pos0, L = 0, pos + n
            scores = scores_dense(cache.round_query(qh), cache.keys(self.layer, L))
        scores *= self.scale
        future = (key_pos0 + np.arange(L))[None, :] > positions[:, None]
        scores[..., future] = -np.inf
        probs = softmax(scores)
        if cache is None:
            out = mix_dense(probs, v.reshape(n, KV * d))              # (KV, G, n, d)
        else:
            out = mix_dense(cache.round_probs(probs), cache.values(self.layer, L))
        out = out.transpose(2, 0, 1, 3).reshape(n, H * d)
        return self.wo(out if cache is None else cache.unrotate_output(out))


class FeedForward:
    def __init__(self, layer: int, w: Mapping[str, Any]):
        p = f"blk.{layer}."
        self.w_gate = _linear(w, p + "ffn_gate")
        self.w_up = _linear(w, p + "ffn_up")
        self.w_down = _linear(w, p + "ffn_down")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # one expression, so gate and up are freed before the down projection runs (lower peak memory in prefill)
        if self.w_gate.shape[0] % 16 == 0:
            return self.w_down(swiglu(self.w_gate(x), self.w_up(x)))  # ggml_vec_swiglu_f32's rounding
        return self.w_down(silu(self.w_gate(x)) * self.w_up(x))


class TransformerBlock:
    def __init__(self, args: ModelArgs, layer: int, w: Mapping[str, Any], rope: Rope):
        p = f"blk.{layer}."
        self.attention_norm = RMSNorm(w[p + "attn_norm.weight"], args.norm_eps)
        self.attention = Attention(args, layer, w, rope)
        self.ffn_norm = RMSNorm(w[p + "ffn_norm.weight"], args.norm_eps)
        self.feed_forward = FeedForward(layer, w)

    def __call__(self, x: np.ndarray, pos: int = 0, cache=None) -> np.ndarray:
        h = x + self.attention(self.attention_norm(x), pos, cache)
        n = h.shape[0]
        if cache is None or n < FFN_SLICE + 16:  # cache=None (calibration): input hooks see the whole batch
            return h + self.feed_forward(self.ffn_norm(h))
        out = np.empty_like(h)
        for start in range(0, n, FFN_SLICE):
            # the last slice takes the rest when fewer than 16 rows would be left over
            stop = n if n - start < FFN_SLICE + 16 else start + FFN_SLICE
            out[start:stop] = h[start:stop] + self.feed_forward(self.ffn_norm(h[start:stop]))
            if stop == n:
                break
        return out


class Model:
    """The whole decoder. `forward(tokens, cache)` runs a prefill batch or one decode token and advances the
    cache; the pieces (`embed`, `layers`, `norm`, `output`) can be driven directly for calibration."""

    def __init__(self, args: ModelArgs, weights: Mapping[str, Any]):
        try:
            self.args = args
            self.tok_embeddings = weights["token_embd.weight"]
            rope = Rope(args, weights.get("rope_freqs.weight"))
            self.layers = [TransformerBlock(args, i, weights, rope) for i in range(args.n_layers)]
            self.norm = RMSNorm(weights["output_norm.weight"], args.norm_eps)
            # Tied embeddings: llama.cpp reuses token_embd as the output matrix when output.weight is absent.
            self.output = _linear(weights, "output" if "output.weight" in weights else "token_embd")
        except KeyError as e:
            raise LlmqError(f"GGUF is missing tensor {e.args[0]}") from None
        self._attach_tensor_scales(weights)
        self._check_shapes()
        # Defaults for new_cache(); load_gguf sets them from its arguments.
        self.n_ctx = min(args.n_ctx_train, 4096)
        self.cache_type_k = self.cache_type_v = "f16"
        self.metadata: Mapping[str, Any] = {}

    def new_cache(self, n_ctx: int | None = None, type_k: str | None = None, type_v: str | None = None):
        from ..kvcache import KVCache

        a = self.args
        return KVCache(a.n_layers, n_ctx or self.n_ctx, a.n_kv_heads * a.head_dim,
                       type_k or self.cache_type_k, type_v or self.cache_type_v, head_dim=a.head_dim)

    @property
    def tokenizer(self):
        """The GGUF tokenizer, built from the metadata on first use."""
        if getattr(self, "_tokenizer", None) is None:
            from ..tokenizer import GGUFTokenizer

            self._tokenizer = GGUFTokenizer.from_metadata(self.metadata)
        return self._tokenizer

    def _attach_tensor_scales(self, weights: Mapping[str, Any]) -> None:
        """`<linear>.scale` tensors, where llama.cpp's loader and graph use them (llmq/fp4.py has the rule)."""
        from llmq.fp4 import llama_cpp_applies_scale

        for linear in self.linears():
            scale = weights.get(linear.name + ".scale")
            qtype = getattr(linear.weight, "qtype", None)
            if scale is not None and qtype is not None and \
                    llama_cpp_applies_scale(self.args.arch, linear.name + ".weight", qtype):
                linear.scale = np.float32(np.asarray(scale, np.float32).reshape(-1)[0])

    def _check_shapes(self) -> None:
        a = self.args
        expect = {self.output: (a.vocab_size, a.dim)}
        for block in self.layers:
            att, ffn = block.attention, block.feed_forward
            expect.update({att.wq: (a.n_heads * a.head_dim, a.dim), att.wk: (a.n_kv_heads * a.head_dim, a.dim),
                           att.wv: (a.n_kv_heads * a.head_dim, a.dim), att.wo: (a.dim, a.n_heads * a.head_dim),
                           ffn.w_gate: (a.hidden_dim, a.dim), ffn.w_up: (a.hidden_dim, a.dim),
                           ffn.w_down: (a.dim, a.hidden_dim)})
        for linear, shape in expect.items():
            if linear.shape != shape:
                raise LlmqError(f"tensor {linear.name}.weight has shape {linear.shape}, expected {shape}")
        if a.n_heads % a.n_kv_heads:
            raise LlmqError(f"head_count {a.n_heads} is not a multiple of head_count_kv {a.n_kv_heads}")

    def set_act_quant(self, mode: str) -> None:
        """'none' (ggml's own q8 activation blocks for quantised weights) or 'int8-token' (every linear's input
        rounded to int8 with one scale per token first, see runtime/act_quant.py)."""
        from .. import act_quant

        fn = act_quant.fake_quant_per_token_int8 if act_quant.check_mode(mode) == "int8-token" else None
        for lin in self.linears():
            lin.act_quant = fn

    def linears(self) -> Iterator[Linear]:
        for block in self.layers:
            att, ffn = block.attention, block.feed_forward
            yield from (att.wq, att.wk, att.wv, att.wo, ffn.w_gate, ffn.w_up, ffn.w_down)
        yield self.output

    def embed(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.args.vocab_size):
            raise LlmqError(f"token id out of range [0, {self.args.vocab_size})")
        table = self.tok_embeddings
        if isinstance(table, np.ndarray):
            return np.array(table[tokens], dtype=np.float32)
        from .. import kernels

        return np.asarray(kernels.dequantize(table, rows=tokens), dtype=np.float32)

    def forward(self, tokens, cache, *, all_logits: bool = True) -> np.ndarray:
        """Logits (n_tokens, vocab) for the tokens appended at position cache.pos, or (1, vocab) for the last
        one only when all_logits=False. Prefill runs in chunks of PREFILL_CHUNK tokens. cache=None runs the
        tokens as a whole sequence from position 0 in float32 attention, keeping nothing."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if tokens.size == 0:
            raise LlmqError("forward() needs at least one token")
        if cache is None:
            h = self.embed(tokens)
            for block in self.layers:
                h = block(h, 0)
            return self.output(self.norm(h if all_logits else h[-1:]))
        if cache.pos + tokens.size > cache.n_ctx:
            raise LlmqError(f"context is full: {cache.pos} + {tokens.size} tokens > n_ctx {cache.n_ctx}")
        if tokens.size == 1:
            step = self._fused_decode_step(cache)
            if step is not None:  # one numba call per layer, bit-identical to the loop below
                h = step(self.embed(tokens)[0], cache)
                cache.pos += 1
                return self.output(self.norm(h[None, :]))
        outputs = []
        for start in range(0, tokens.size, PREFILL_CHUNK):
            chunk = tokens[start : start + PREFILL_CHUNK]
            h = self.embed(chunk)
            for block in self.layers:
                h = block(h, cache.pos, cache)
            cache.pos += chunk.size
            if not all_logits:
                h = h[-1:]
            if all_logits or start + PREFILL_CHUNK >= tokens.size:
                outputs.append(self.output(self.norm(h)))
        return np.concatenate(outputs) if len(outputs) > 1 else outputs[0]

    def _fused_decode_step(self, cache):
        """runtime.decode.DecodeStep for this model and cache when it applies (built again if weights changed)."""
        from ..decode import DecodeStep

        if not DecodeStep.supports(self, cache):
            return None
        step = getattr(self, "_decode_step", None)
        if step is None or not step.matches(self):
            step = self._decode_step = DecodeStep(self)
        return step


def _linear(weights: Mapping[str, Any], prefix: str) -> Linear:
    bias = weights.get(prefix + ".bias")
    return Linear(prefix, weights[prefix + ".weight"], None if bias is None else np.asarray(bias, np.float32))
