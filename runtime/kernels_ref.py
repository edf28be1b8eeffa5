"""Plain numpy references for runtime.kernels, used by the tests.

The weights are decoded by gguf-py's own dequantizers (an implementation of the block layouts independent of ours),
the activations are quantised here with vectorised numpy following the same ggml functions as the kernels, and the
products are done in float64. ggml's quantised dot product is, mathematically, exactly "dequantised weight times
dequantised activation" except for one term: Q4_1/Q5_1 blocks add m * s with s = f16(d * sum(q)) stored in the Q8_1
activation block, which `matvec_ref` adds the same way.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import quants as gguf_quants

QK = 32
QK_K = 256

ACT_TYPE = {
    QT.F32: QT.F32, QT.F16: QT.F16, QT.BF16: QT.BF16,
    QT.Q4_0: QT.Q8_0, QT.Q5_0: QT.Q8_0, QT.Q8_0: QT.Q8_0, QT.Q4_1: QT.Q8_1, QT.Q5_1: QT.Q8_1,
    QT.Q2_K: QT.Q8_K, QT.Q3_K: QT.Q8_K, QT.Q4_K: QT.Q8_K, QT.Q5_K: QT.Q8_K, QT.Q6_K: QT.Q8_K,
}


def f16_round(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


def bf16_round(x: np.ndarray) -> np.ndarray:
    """gguf-py's BF16 quantizer (ggml_compute_fp32_to_bf16) and back."""
    x = np.asarray(x, dtype=np.float32)
    bits = gguf_quants.quantize(x, QT.BF16).view(np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32).reshape(x.shape)


def quantize_q8_0_cpu(x: np.ndarray):
    """ggml-cpu x86 quantize_row_q8_0 on rows of x: (qs int8 (n, blocks, 32), d float32 (n, blocks))."""
    blocks = np.asarray(x, dtype=np.float32).reshape(len(x), -1, QK)
    amax = np.abs(blocks).max(axis=-1)
    d = f16_round(amax / np.float32(127))
    with np.errstate(divide="ignore"):
        iscale = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    qs = np.clip(np.rint(blocks * iscale[..., None]), -128, 127).astype(np.int8)
    return qs, d


def quantize_q8_1_cpu(x: np.ndarray):
    """ggml-cpu x86 quantize_row_q8_1: Q8_0 plus s = f16(d * sum(qs)) with d before rounding to f16."""
    blocks = np.asarray(x, dtype=np.float32).reshape(len(x), -1, QK)
    qs, d = quantize_q8_0_cpu(x)
    amax = np.abs(blocks).max(axis=-1)
    s = f16_round((amax / np.float32(127)) * qs.astype(np.int32).sum(axis=-1).astype(np.float32))
    return qs, d, s


def quantize_q8_k(x: np.ndarray):
    """quantize_row_q8_K_ref: (qs int8 (n, blocks, 256), d float32 (n, blocks), bsums int32 (n, blocks, 16))."""
    blocks = np.asarray(x, dtype=np.float32).reshape(len(x), -1, QK_K)
    vmax = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = (np.float32(-127) / vmax).astype(np.float32)
        qs = np.minimum(127, np.rint(iscale[..., None] * blocks))
        d = (np.float32(1) / iscale).astype(np.float32)
    zero = vmax == 0
    qs = np.where(zero[..., None], 0, qs).astype(np.int8)
    d = np.where(zero, np.float32(0), d)
    bsums = qs.astype(np.int32).reshape(*qs.shape[:2], 16, 16).sum(axis=-1)
    return qs, d, bsums


def activation_ref(x: np.ndarray, act_type: QT):
    """Rows of x as ggml's dot products see them (float64), and for Q8_1 the per-block s."""
    x = np.asarray(x, dtype=np.float32)
    if act_type == QT.F32:
        return x.astype(np.float64), None
    if act_type == QT.F16:
        return f16_round(x).astype(np.float64), None
    if act_type == QT.BF16:
        return bf16_round(x).astype(np.float64), None
    if act_type == QT.Q8_0:
        qs, d = quantize_q8_0_cpu(x)
        return (qs * d[..., None].astype(np.float64)).reshape(x.shape), None
    if act_type == QT.Q8_1:
        qs, d, s = quantize_q8_1_cpu(x)
        return (qs * d[..., None].astype(np.float64)).reshape(x.shape), s
    if act_type == QT.Q8_K:
        qs, d, _ = quantize_q8_k(x)
        return (qs * d[..., None].astype(np.float64)).reshape(x.shape), None
    raise ValueError(act_type)


def block_mins(data: np.ndarray, qtype: QT, cols: int) -> np.ndarray:
    """The f16 min m of each Q4_1/Q5_1 block (bytes 2..3), float64 (rows, blocks)."""
    rows = data.shape[0]
    blocks = np.ascontiguousarray(data).view(np.uint8).reshape(rows, cols // QK, -1)
    return blocks[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float64)


def matmul_ref(data: np.ndarray, qtype: QT, shape: tuple[int, int], x: np.ndarray) -> np.ndarray:
    """x (n, cols) @ W.T the way ggml computes it, in float64: gguf-py dequantised W, ggml-quantised x."""
    rows, cols = shape
    w = gguf_quants.dequantize(np.ascontiguousarray(data), qtype).reshape(rows, cols).astype(np.float64)
    xhat, s = activation_ref(np.atleast_2d(x), ACT_TYPE[qtype])
    out = xhat @ w.T
    if s is not None:
        block_sums = xhat.reshape(len(xhat), -1, QK).sum(axis=-1)
        out += (s.astype(np.float64) - block_sums) @ block_mins(data, qtype, cols).T
    return out


def matvec_ref(data: np.ndarray, qtype: QT, shape: tuple[int, int], x: np.ndarray) -> np.ndarray:
    return matmul_ref(data, qtype, shape, np.asarray(x)[None, :])[0]


# ---- the float order of llama.cpp's batched products (kernels._gemm_q32) --------------------------------------------

def _fma32(a, b, c) -> np.ndarray:
    """float32 a*b + c with one rounding, emulated in float64 (the product of two floats is exact there; the sum
    rounds twice, which differs from one rounding only on ~2^-29 of ties)."""
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(np.float32)


def int_blocks(data: np.ndarray, qtype: QT, rows: int, cols: int):
    """Q4_0/Q4_1/Q5_0/Q8_0 rows as integers q (rows, blocks, 32), scales d and (Q4_1) mins m, float32 (rows, blocks)."""
    b = np.ascontiguousarray(data).view(np.uint8).reshape(rows, cols // QK, -1)
    half = lambda lo: b[..., lo:lo + 2].copy().view(np.float16)[..., 0].astype(np.float32)  # noqa: E731
    if qtype == QT.Q8_0:
        return b[..., 2:].view(np.int8).astype(np.int64), half(0), None
    if qtype == QT.Q5_0:
        qh = b[..., 2:6].copy().view(np.uint32).astype(np.int64)
        nib = b[..., 6:22].astype(np.int64)
        bit = lambda k: (qh >> k) & 1  # noqa: E731
        lo = (nib & 15) | (bit(np.arange(16)) << 4)
        hi = (nib >> 4) | (bit(np.arange(16, 32)) << 4)
        return np.concatenate([lo, hi], -1) - 16, half(0), None
    first = 4 if qtype == QT.Q4_1 else 2
    nib = b[..., first:first + 16].astype(np.int64)
    q = np.concatenate([nib & 15, nib >> 4], -1)
    if qtype == QT.Q4_1:
        return q, half(0), half(2)
    return q - 8, half(0), None


def matmul_order_ref(data: np.ndarray, qtype: QT, shape: tuple[int, int], x: np.ndarray) -> np.ndarray:
    """x (n, cols) @ W.T rounded step by step as llama.cpp's x86 CPU backend does it for a batch: the repacked Q4_0
    product (rows divisible by 8: one fma chain over blocks of float(integer block dot) * (d_w*d_x)) or tinyBLAS /
    ggml_vec_dot_q4_1_q8_1 (8 lanes of 4-element integer dots, fma chains, hsum; Q4_1 adds its fma chain of m*s)."""
    rows, cols = shape
    q, d, m = int_blocks(data, qtype, rows, cols)
    if qtype == QT.Q4_1:
        xq, xd, xs = quantize_q8_1_cpu(x)
    else:
        (xq, xd), xs = quantize_q8_0_cpu(x), None
    xq = xq.astype(np.int64)
    scale = (d[None] * xd[:, None]).astype(np.float32)  # (n, rows, blocks)
    if qtype == QT.Q4_0 and rows % 8 == 0:
        isum = np.einsum("tbe,rbe->trb", xq, q).astype(np.float32)
        acc = np.zeros((len(x), rows), np.float32)
        for b in range(q.shape[1]):
            acc = _fma32(isum[..., b], scale[..., b], acc)
        return acc
    nb = q.shape[1]
    isum = np.einsum("tble,rble->trbl", xq.reshape(len(x), nb, 8, 4), q.reshape(rows, nb, 8, 4)).astype(np.float32)
    lanes = np.zeros((len(x), rows, 8), np.float32)
    mins = np.zeros((len(x), rows), np.float32)
    for b in range(nb):
        lanes = _fma32(scale[..., b, None], isum[:, :, b], lanes)
        if m is not None:
            mins = _fma32(m[None, :, b], xs[:, None, b], mins)
    r = [lanes[..., 4 + i] + lanes[..., i] for i in range(4)]
    out = (r[0] + r[2]) + (r[1] + r[3])
    return out + mins if m is not None else out
