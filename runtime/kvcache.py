"""The key/value cache: per layer, K and V rows for every position of the context, preallocated for n_ctx.

Each of K and V is stored as f32, f16, q8_0 or q4_0 (llama.cpp's --cache-type-k / --cache-type-v). A row holds one
token's keys (or values) for all kv heads, kv_dim = n_kv_heads * head_dim values; quantised rows are ggml blocks
of 32 values (head_dim must be a multiple of 32), laid out exactly as llama.cpp stores them.

llama.cpp's attention does not only store K/V at this precision, it also rounds the other operand of each product
to the cache's "vec_dot type" (ggml CPU backend, flash attention off, as llama-cpp-python runs by default):
  - Q.K: q is converted to f16 for an f16 K cache and quantised to q8_0 for a q8_0/q4_0 K cache;
  - P.V: the softmax probabilities are converted to f16 for an f16 V cache.
`round_query` and `round_probs` apply the same roundings so the native logits track llama.cpp's (on the dense path:
models/llama.py runs f16, q8_0 and q4_0 caches through `attend_f16`, llama.cpp's f16-cache attention, with quantised
rows dequantised first, so there q keeps f16 precision for every cache type).

Quantised caches are rotated, as llama.cpp does (llama-kv-cache.cpp, attn_rot_k / attn_rot_v): an orthonormal
Walsh-Hadamard matrix H mixes each head's values in chunks of n before they are quantised, which spreads the few
large channels of K and V over the whole chunk, so a block's scale no longer wastes most of its levels on one outlier.
With H @ H = I nothing changes in exact arithmetic: q is rotated like k (q.k = Hq.Hk), and the attention output, a
mix of rotated v rows, is rotated back. Chunk n: for K the largest power of two >= 64 dividing head_dim, for V 64
(llama.cpp found smaller chunks better for V); no rotation when head_dim % 64 != 0 or the cache is f16/f32."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from llmq.errors import LlmqError

from .kernels import _fma, serial_copy

CACHE_TYPES = ("f32", "f16", "q8_0", "q4_0")
QK = 32  # values per q8_0 / q4_0 block


def _codec(cache_type: str):
    """(quantize rows (n, k) f32 -> uint8 (n, bytes), dequantize uint8 (n, bytes) -> f32 (n, k), bytes per block)."""
    from . import kernels

    if cache_type == "q8_0":
        return _quantize_q8_0_like_ggml_cpu, kernels.dequantize_rows_q8_0, 34
    return kernels.quantize_rows_q4_0, kernels.dequantize_rows_q4_0, 18


def _quantize_q8_0_like_ggml_cpu(rows: np.ndarray) -> np.ndarray:
    """q8_0 as ggml's x86 CPU backend quantises cache rows and activations (not the _ref codec of file writers)."""
    from . import kernels

    return kernels.quantize_rows_q8_0(rows, ref=False)


def hadamard(n: int) -> np.ndarray:
    """The orthonormal n x n Walsh-Hadamard matrix (n a power of two), Sylvester's construction as ggml_gen_hadamard."""
    h = np.full((1, 1), 1.0 / np.sqrt(np.float32(n)), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def rotation_chunks(cache_type: str, head_dim: int, for_keys: bool) -> int:
    """Chunk size of the Hadamard rotation llama.cpp applies to a K or V cache of this type (0: none)."""
    if cache_type not in ("q8_0", "q4_0") or head_dim % 64:
        return 0
    n = 64
    while for_keys and head_dim % (2 * n) == 0:
        n *= 2
    return n


def rotate(x: np.ndarray, n: int) -> np.ndarray:
    """x (..., width) with each chunk of n values along the last axis multiplied by hadamard(n) (n = 0: x)."""
    if not n:
        return x
    return (np.ascontiguousarray(x, np.float32).reshape(-1, n) @ _hadamard_cached(n)).reshape(x.shape)


_HADAMARD: dict[int, np.ndarray] = {}


def _hadamard_cached(n: int) -> np.ndarray:
    if n not in _HADAMARD:
        _HADAMARD[n] = hadamard(n)
    return _HADAMARD[n]


class _RowStore:
    """n_ctx rows of `width` values in one cache type."""

    def __init__(self, cache_type: str, n_ctx: int, width: int, head_dim: int):
        if cache_type not in CACHE_TYPES:
            raise LlmqError(f"unknown cache type {cache_type!r} (choose from {', '.join(CACHE_TYPES)})")
        self.cache_type, self.width = cache_type, width
        if cache_type in ("f32", "f16"):
            self.data = np.zeros((n_ctx, width), dtype=np.float32 if cache_type == "f32" else np.float16)
        else:
            if head_dim % QK:  # llama.cpp's rule too: each head's row must be whole blocks
                raise LlmqError(f"cache type {cache_type} needs head_dim ({head_dim}) to be a multiple of {QK}")
            self._quantize, self._dequantize, block_bytes = _codec(cache_type)
            self.data = np.zeros((n_ctx, width // QK * block_bytes), dtype=np.uint8)

    def write(self, start: int, rows: np.ndarray) -> None:
        end = start + rows.shape[0]
        if self.data.dtype == np.uint8:
            self.data[start:end] = np.asarray(self._quantize(np.ascontiguousarray(rows, np.float32))).reshape(
                rows.shape[0], -1)
        else:
            self.data[start:end] = rows  # numpy's f32 -> f16 cast rounds to nearest even, like ggml_fp32_to_fp16

    def read(self, end: int) -> np.ndarray:
        if self.data.dtype == np.uint8:
            return np.asarray(self._dequantize(self.data[:end]), np.float32).reshape(end, self.width)
        if self.data.dtype == np.float16:
            return f16_to_f32(self.data[:end])
        return self.data[:end].copy()


class KVCache:
    def __init__(self, n_layers: int, n_ctx: int, kv_dim: int, type_k: str = "f16", type_v: str = "f16", *,
                 head_dim: int | None = None, rotate: bool = True):
        if n_ctx < 1:
            raise LlmqError(f"n_ctx must be positive, got {n_ctx}")
        self.n_layers, self.n_ctx, self.kv_dim = n_layers, n_ctx, kv_dim
        self.type_k, self.type_v = type_k, type_v
        head_dim = head_dim or kv_dim
        self.k = [_RowStore(type_k, n_ctx, kv_dim, head_dim) for _ in range(n_layers)]
        self.v = [_RowStore(type_v, n_ctx, kv_dim, head_dim) for _ in range(n_layers)]
        # Hadamard chunk sizes (module docstring); rotate=False stores quantised rows as they come
        self.rot_k = rotation_chunks(type_k, head_dim, for_keys=True) if rotate else 0
        self.rot_v = rotation_chunks(type_v, head_dim, for_keys=False) if rotate else 0
        self.pos = 0  # tokens stored; the next token goes to this position

    @property
    def nbytes(self) -> int:
        return sum(s.data.nbytes for s in self.k + self.v)

    def reset(self) -> None:
        self.pos = 0

    def truncate(self, n_tokens: int) -> None:
        """Forget everything after the first n_tokens positions (their rows are overwritten later)."""
        if not 0 <= n_tokens <= self.pos:
            raise ValueError(f"cannot truncate a cache of {self.pos} tokens to {n_tokens}")
        self.pos = n_tokens

    def store(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        self.k[layer].write(start, k)
        self.v[layer].write(start, v)

    def keys(self, layer: int, end: int) -> np.ndarray:
        return self.k[layer].read(end)

    def values(self, layer: int, end: int) -> np.ndarray:
        return self.v[layer].read(end)

    def rotate_qkv(self, q: np.ndarray, k: np.ndarray, v: np.ndarray):
        """q, k, v as they enter this cache's attention (rotated for a quantised K or V cache)."""
        return rotate(q, self.rot_k), rotate(k, self.rot_k), rotate(v, self.rot_v)

    def unrotate_output(self, out: np.ndarray) -> np.ndarray:
        """The attention output (n, heads * head_dim) back in the unrotated basis (H is its own inverse)."""
        return rotate(out, self.rot_v)

    def round_query(self, q: np.ndarray) -> np.ndarray:
        """q (n, heads, head_dim) rounded as ggml converts it for the dot products with this K cache."""
        if self.type_k == "f16":
            return q.astype(np.float16).astype(np.float32)
        if self.type_k in ("q8_0", "q4_0"):  # each head's row, in q8_0 blocks
            from . import kernels

            rows = np.ascontiguousarray(q.reshape(-1, q.shape[-1]), np.float32)
            blocks = _quantize_q8_0_like_ggml_cpu(rows)
            return np.asarray(kernels.dequantize_rows_q8_0(blocks), np.float32).reshape(q.shape)
        return q

    def round_probs(self, probs: np.ndarray) -> np.ndarray:
        if self.type_v == "f16":
            return probs.astype(np.float16).astype(np.float32)
        return probs


# ------------------------------------------------------------------------------------------- attention products

# One GEMM per KV head over all the query heads that share it: numpy only hands a stacked product to BLAS when
# each operand matrix is contiguous, so the strided views of the cache are copied first (4x faster in prefill and
# calibration than broadcasting over the strided views).
def scores_dense(qh: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """qh (KV, G, n, d), keys (L, KV * d) -> (KV, G, n, L)."""
    KV, G, n, d = qh.shape
    q = np.ascontiguousarray(qh).reshape(KV, G * n, d)
    k = np.ascontiguousarray(keys.reshape(-1, KV, d).transpose(1, 0, 2))  # (KV, L, d)
    return (q @ k.transpose(0, 2, 1)).reshape(KV, G, n, -1)


def mix_dense(probs: np.ndarray, values: np.ndarray) -> np.ndarray:
    """probs (KV, G, n, L), values (L, KV * d) -> (KV, G, n, d)."""
    KV, G, n, L = probs.shape
    p = np.ascontiguousarray(probs).reshape(KV, G * n, L)
    v = np.ascontiguousarray(values.reshape(L, KV, -1).transpose(1, 0, 2))  # (KV, L, d)
    return (p @ v).reshape(KV, G, n, -1)


# Decoding reads the whole cache for every token: numpy's f16 -> f32 cast (a scalar loop, ~3 ns a value) would
# cost more than the weights' matrix-vector products at a few hundred tokens of context. A table lookup in numba
# does the same exact conversion about 4x faster.
F16_TO_F32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@njit(cache=True)
def _f16_bits_to_f32(bits, table, out):
    flat_bits, flat_out = bits.reshape(-1), out.reshape(-1)
    for i in range(flat_bits.size):
        flat_out[i] = table[flat_bits[i]]


def f16_to_f32(x: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape, np.float32)
    _f16_bits_to_f32(np.ascontiguousarray(x).view(np.uint16), F16_TO_F32, out)
    return out


# IEEE half conversions as single LLVM instructions (fpext / fptrunc, round to nearest even: F16C's vcvtph2ps /
# vcvtps2ph, which LLVM vectorises), and exact powers of two for ggml_expf.


@intrinsic
def half_to_f32(typingctx, bits):
    """uint16 half bits -> float32 (exact)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return sig, codegen


@intrinsic
def f32_to_half(typingctx, x):
    """float32 -> uint16 bits of the nearest half (numpy's astype(float16), GGML_FP32_TO_FP16)."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return sig, codegen


@intrinsic
def round_half(typingctx, x):
    """float32 -> the float32 value of the nearest half (kernels._round_f16 in two instructions)."""
    sig = types.float32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())
    return sig, codegen


@intrinsic
def _pow2_f64(typingctx, n):
    """2.0**n as float64 for an int64 n in [-1022, 1023], built from its exponent bits."""
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        bits = builder.shl(builder.add(args[0], ir.Constant(ir.IntType(64), 1023)), ir.Constant(ir.IntType(64), 52))
        return builder.bitcast(bits, ir.DoubleType())
    return sig, codegen


# ------------------------------------------------------------------------------- attention as llama.cpp computes it
# With an f16 cache (flash attention off) ggml computes KQ and KQV as f16 x f16 matrix products in llamafile's
# tinyBLAS (AVX512: 16 float lanes, lane i accumulating elements i, i+16, ... in order, then _mm512_reduce_add_ps),
# and the softmax with ggml_v_expf (a polynomial, not libm's expf) over 16-value chunks summed in double. Matching
# this bit for bit matters because every later matmul re-quantises its input: a last-bit difference here flips
# q8 roundings downstream and grows into visible logit differences.

_LANES = 16


@njit(cache=True, inline="always")
def _reduce_add_16(lanes):
    """GCC's _mm512_reduce_add_ps: halves added (hi + lo) down to 4 lanes, then (0+2), (1+3), then their sum."""
    t0 = (lanes[8] + lanes[0]) + (lanes[12] + lanes[4])  # 256-bit halves, then 128-bit halves
    t1 = (lanes[9] + lanes[1]) + (lanes[13] + lanes[5])
    t2 = (lanes[10] + lanes[2]) + (lanes[14] + lanes[6])
    t3 = (lanes[11] + lanes[3]) + (lanes[15] + lanes[7])
    return (t0 + t2) + (t1 + t3)


# ggml_v_expf's constants (hex float literals in vec.h)
_EXPF_8P23 = np.float32(float.fromhex("0x1.8p23"))
_EXPF_715476PP0 = np.float32(float.fromhex("0x1.715476p+0"))
_EXPF_7F7D1CPM20 = np.float32(float.fromhex("0x1.7f7d1cp-20"))
_EXPF_62E4PM1 = np.float32(float.fromhex("0x1.62e4p-1"))
_EXPF_0E4020PM7 = np.float32(float.fromhex("0x1.0e4020p-7"))
_EXPF_573E2EPM5 = np.float32(float.fromhex("0x1.573e2ep-5"))
_EXPF_555E66PM3 = np.float32(float.fromhex("0x1.555e66p-3"))
_EXPF_FFFDB6PM2 = np.float32(float.fromhex("0x1.fffdb6p-2"))
_EXPF_FFFFECPM1 = np.float32(float.fromhex("0x1.ffffecp-1"))


@njit(cache=True)
def ggml_expf(x):
    """ggml_v_expf (AVX512 variant, ggml-cpu/vec.h), one float32 at a time."""
    r = _EXPF_8P23
    z = _fma(x, _EXPF_715476PP0, r)
    n = z - r
    b = _fma(-n, _EXPF_7F7D1CPM20, _fma(-n, _EXPF_62E4PM1, x))
    u = b * b
    j = _fma(_fma(_fma(_EXPF_0E4020PM7, b, _EXPF_573E2EPM5), u,
                  _fma(_EXPF_555E66PM3, b, _EXPF_FFFDB6PM2)), u,
             _fma(_EXPF_FFFFECPM1, b, np.float32(1.0)))
    if abs(n) > 192:
        return np.float32(0.0) if n <= 0 else np.float32(np.inf)
    return np.float32(np.float64(j) * _pow2_f64(np.int64(n)))  # j * 2^n exact in float64, rounded once


@njit(cache=True, parallel=True)
def _swiglu_kernel(gate, up, out):
    for r in prange(gate.shape[0]):
        for i in range(gate.shape[1]):
            x = gate[r, i]
            out[r, i] = (x / (np.float32(1.0) + ggml_expf(-x))) * up[r, i]


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up as ggml_vec_swiglu_f32 (AVX512): x / (1 + ggml_v_expf(-x)), then times up, all in float32.
    The rows' length must be a multiple of 16 (ggml's scalar tail uses libm's expf)."""
    gate = np.ascontiguousarray(gate, np.float32)
    out = np.empty_like(gate)
    _swiglu_kernel(gate.reshape(-1, gate.shape[-1]), np.ascontiguousarray(up, np.float32).reshape(-1, gate.shape[-1]),
                   out.reshape(-1, gate.shape[-1]))
    return out


@njit(cache=True, parallel=True)
def _attend_f16_kernel(q, keys_t, values, scale, pos0, kv_heads, out):
    """q (n, H, d) already rounded to f16 values, keys_t (KV, d, L) and values (L, KV*d) f16 values as float32 ->
    out (n, H*d). The products of two halves are exact in float32, so summing them lane by lane in ggml's order
    gives its result whatever loop order computes it: the scores are computed for all keys at once (lane i of key j
    in lanes[i, j]), which vectorises over the keys."""
    n, H, d = q.shape
    G = H // kv_heads
    L = keys_t.shape[2]
    for task in prange(n * H):
        t, h = task // H, task % H
        kvh = h // G
        visible = min(L, pos0 + t + 1)
        lanes = np.empty((_LANES, visible), np.float32)
        for i in range(_LANES):
            lane = lanes[i]
            qv = q[t, h, i]
            k_row = keys_t[kvh, i]
            for j in range(visible):
                lane[j] = qv * k_row[j]
            for e in range(i + _LANES, d, _LANES):
                qv = q[t, h, e]
                k_row = keys_t[kvh, e]
                for j in range(visible):
                    lane[j] += qv * k_row[j]
        scores = np.empty(visible, np.float32)
        for j in range(visible):
            scores[j] = (((lanes[8, j] + lanes[0, j]) + (lanes[12, j] + lanes[4, j]))
                         + ((lanes[10, j] + lanes[2, j]) + (lanes[14, j] + lanes[6, j]))
                         + (((lanes[9, j] + lanes[1, j]) + (lanes[13, j] + lanes[5, j]))
                            + ((lanes[11, j] + lanes[3, j]) + (lanes[15, j] + lanes[7, j])))) * scale
        top = -np.inf
        for j in range(visible):
            top = max(top, scores[j])
        # ggml_vec_soft_max_f32: 16-value chunks of the (padded) row, each reduced in float, summed in double;
        # masked positions are exp(-inf) = 0 and do not change any sum.
        chunk = np.zeros(_LANES, np.float32)
        total = 0.0
        for c0 in range(0, visible, _LANES):
            chunk[:] = 0
            for i in range(min(_LANES, visible - c0)):
                p = ggml_expf(scores[c0 + i] - top)
                scores[c0 + i] = p
                chunk[i] = p
            total += np.float64(_reduce_add_16(chunk))
        inv = np.float32(1.0 / total)
        for j in range(visible):
            scores[j] = round_half(scores[j] * inv)  # probabilities converted to f16 for the product with V
        mix = np.zeros((_LANES, d), np.float32)  # mix[i, e]: lane i of output e; rows of V read contiguously
        for j in range(visible):
            p = scores[j]
            row = mix[j % _LANES]
            for e in range(d):
                row[e] += p * values[j, kvh * d + e]
        for e in range(d):
            out[t, h * d + e] = _reduce_add_16(mix[:, e])


_attend_f16_serial = serial_copy(_attend_f16_kernel)


def attend_f16(q: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float, pos0: int,
               kv_heads: int) -> np.ndarray:
    """Causal attention of q (n, H, d) at positions pos0.. over an f16 cache's keys/values (L, KV*d) as float32,
    bit-identical to llama.cpp's CPU graph (KQ, soft_max_ext, KQV) -> (n, H*d)."""
    n, H, d = q.shape
    out = np.empty((n, H * d), np.float32)
    q16 = np.ascontiguousarray(q, np.float32).astype(np.float16).astype(np.float32)
    kernel = _attend_f16_kernel if n > 1 else _attend_f16_serial  # decode: not worth waking the thread pool
    keys_t = np.ascontiguousarray(np.asarray(keys, np.float32).reshape(-1, kv_heads, d).transpose(1, 2, 0))
    kernel(q16, keys_t, np.ascontiguousarray(values), np.float32(scale), pos0, kv_heads, out)
    return out


# On an AVX2 machine ggml-cpu runs its AVX2 variants (8-lane sums, another ggml_v_expf): mirror those instead.
from . import isa  # noqa: E402

if isa.LEVEL == "avx2":
    from .avx2_attention import attend_f16, ggml_expf, swiglu  # noqa: E402,F401,F811
