"""The key/value cache: per layer, K and V rows for every position of the context, preallocated for n_ctx.

Each of K and V is stored as f32, f16, q8_0 or q4_0 (llama.cpp's --cache-type-k / --cache-type-v). A row holds one
token's keys (or values) for all kv heads, kv_dim = n_kv_heads * head_dim values; quantised rows are ggml blocks
of 32 values (head_dim must be a multiple of 32), laid out exactly as llama.cpp stores them.

llama.cpp's attention does not only store K/V at this precision, it also rounds the other operand of each product
to the cache's "vec_dot type" (ggml CPU backend, flash attention off, as llama-cpp-python runs by default):
  - Q.K: q is converted to f16 for an f16 K cache and quantised to q8_0 for a q8_0/q4_0 K cache;
  - P.V: the softmax probabilities are converted to f16 for an f16 V cache.
`round_query` and `round_probs` apply the same roundings so the native logits track llama.cpp's."""

from __future__ import annotations

import numpy as np
from numba import njit

from llmq.errors import LlmqError

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
                 head_dim: int | None = None):
        if n_ctx < 1:
            raise LlmqError(f"n_ctx must be positive, got {n_ctx}")
        self.n_layers, self.n_ctx, self.kv_dim = n_layers, n_ctx, kv_dim
        self.type_k, self.type_v = type_k, type_v
        head_dim = head_dim or kv_dim
        self.k = [_RowStore(type_k, n_ctx, kv_dim, head_dim) for _ in range(n_layers)]
        self.v = [_RowStore(type_v, n_ctx, kv_dim, head_dim) for _ in range(n_layers)]
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

def scores_dense(qh: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """qh (KV, G, n, d), keys (L, KV * d) -> (KV, G, n, L)."""
    KV, d = qh.shape[0], qh.shape[3]
    return qh @ keys.reshape(-1, KV, d).transpose(1, 2, 0)[:, None]


def mix_dense(probs: np.ndarray, values: np.ndarray) -> np.ndarray:
    """probs (KV, G, n, L), values (L, KV * d) -> (KV, G, n, d)."""
    KV = probs.shape[0]
    return probs @ values.reshape(probs.shape[3], KV, -1).transpose(1, 0, 2)[:, None]


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
