"""NVFP4 and MXFP4 weight kernels, as ggml-cpu computes them (ggml_vec_dot_nvfp4_q8_0 / ggml_vec_dot_mxfp4_q8_0).

Both types take a Q8_0 activation (vec_dot_type, ggml-cpu.c). Layouts and value tables: llmq/fp4.py.

    MXFP4 block b (17 B), Q8_0 block b:      sum += (f16(dy_b) * 2^(e-128)) * sum_j KV[q_j] * xq_j
    NVFP4 block b (36 B), Q8_0 blocks 2b, 2b+1: sub-block s (16 values) reads Q8_0 block 2b + s//2 at offset
                                             16 * (s % 2):  sum += dy * UE4M3(d_s)/2 * sum_j KV[q_j] * xq_j

NVFP4 follows ggml's AVX2 ggml_vec_dot_nvfp4_q8_0 bit for bit: 8 float lanes, lane k summing the 4 products of
elements 4k..4k+3 of each 32-value half-block (so lanes 0-3 take the scale of the half's first sub-block, lanes 4-7 the
second's), one fma per lane and half-block, then hsum_float_8. ggml-cpu has no batched NVFP4 kernel (no repack, no
tinyBLAS, no tiled path), so llama.cpp's prefill is this same dot for every output: `_matmul_nvfp4` reproduces it with
the activation tile swept across a tile of unpacked weight rows. llama.cpp repacks MXFP4 matrices whose row count is a
multiple of 8 (mxfp4_8x8) and multiplies them with the same GEMM template as the repacked Q4_0 (only the value table
and the E8M0 scale differ): `_matmul_mxfp4` runs runtime.kernels' one-accumulator tile on them. The other row counts, and
decode, follow ggml's AVX2 ggml_vec_dot_mxfp4_q8_0 (`_dot_mxfp4`). Decode of a repacked matrix is ggml's GEMV:
mirrored on AVX2 and AVX512 builds (isa.X86_AVX2_DOTS, `_matvec_mxfp4_avx2`: one accumulator, the gemm tile's
order; the gemv has no AVX512 branch). Both vec_dots are the same code on AVX2 and AVX512 builds (no AVX512 branch). llama.cpp multiplies the
matmul output by the tensor scale `<name>.scale` afterwards (runtime/models/llama.py does the same).

`matvec_ref` / `matmul_ref` are the plain numpy references (gguf-py's dequantizer for the weights, ggml's Q8_0 for
the activation, float64 products).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT

from llmq.fp4 import E8M0_HALF, KVALUES, UE4M3_HALF

from numba import prange

from . import isa

from .kernels import (QK, _fma, _gemm_q32_tile, _hsum8_col, _hsum_float_8, _jit, _kernel, _quantize_q8_0_cpu,
                      _roundtrip_q8_0, _TypeKernels)

_KV = KVALUES.astype(np.int32)
_UE4M3 = UE4M3_HALF
_E8M0 = E8M0_HALF
# The scalar tail of ggml_vec_dot_mxfp4_q8_0 (an odd last block), sumf += d * (sumi1 + sumi2): this machine's AVX2
# build of libggml-cpu does not contract it (vmulss + vaddss, objdump; seen where d * s overflows to inf against a
# -inf sum: NaN, where an fma gives -inf). The AVX512 builds keep the fma the kernels were first written with.
_TAIL_UNFUSED = isa.LEVEL == "avx2"


@_jit
def _dot_mxfp4(w, r, xq, xd, f16):
    """ggml's AVX2 ggml_vec_dot_mxfp4_q8_0: even and odd blocks in two sets of 8 fma lanes (lane k: elements
    4k..4k+3), added, hsum_float_8; an odd last block as a scalar tail (fused or not: _TAIL_UNFUSED)."""
    even = np.zeros(8, np.float32)
    odd = np.zeros(8, np.float32)
    nb = w.shape[1]
    for b in range(nb - nb % 2):
        lanes = even if b % 2 == 0 else odd
        scale = xd[b] * _E8M0[w[r, b, 0]]
        for k in range(8):
            s = np.int32(0)
            for e in range(4 * k, 4 * k + 4):
                q = np.int32(w[r, b, 1 + (e % 16)])
                v = _KV[q >> 4] if e >= 16 else _KV[q & 15]
                s = np.int32(s + v * xq[b, e])
            lanes[k] = _fma(scale, np.float32(s), lanes[k])
    for k in range(8):
        even[k] = even[k] + odd[k]
    acc = _hsum_float_8(even)
    if nb % 2:
        b = nb - 1
        s = np.int32(0)
        for j in range(16):
            q = np.int32(w[r, b, 1 + j])
            s = np.int32(s + _KV[q & 15] * xq[b, j] + _KV[q >> 4] * xq[b, j + 16])
        if _TAIL_UNFUSED:
            acc = acc + (xd[b] * _E8M0[w[r, b, 0]]) * np.float32(s)
        else:
            acc = _fma(xd[b] * _E8M0[w[r, b, 0]], np.float32(s), acc)
    return acc


@_jit
def _dot_nvfp4(w, r, xq, xd, f16):
    lanes = np.zeros(8, np.float32)
    for b in range(w.shape[1]):
        for half in range(2):
            qb = 2 * b + half
            for k in range(8):
                sub = 2 * half + k // 4
                scale = _UE4M3[w[r, b, sub]] * xd[qb]
                s = np.int32(0)
                for e in range(4 * k, 4 * k + 4):  # element e of the half: sub-block e // 16, position e % 16
                    q = np.int32(w[r, b, 4 + 8 * sub + (e % 8)])
                    v = _KV[q >> 4] if (e % 16) >= 8 else _KV[q & 15]
                    s = np.int32(s + v * xq[qb, e])
                lanes[k] = _fma(scale, np.float32(s), lanes[k])
    return _hsum_float_8(lanes)


@_kernel(parallel=True)
def _matvec_mxfp4(w, x, f16):
    xq = np.empty((x.shape[0] // QK, QK), np.int8)
    xd = np.empty(x.shape[0] // QK, np.float32)
    _quantize_q8_0_cpu(x, xq, xd)
    out = np.empty(w.shape[0], np.float32)
    for r in prange(w.shape[0]):
        out[r] = _dot_mxfp4(w, r, xq, xd, f16)
    return out


@_kernel(parallel=True)
def _matvec_nvfp4(w, x, f16):
    xq = np.empty((x.shape[0] // QK, QK), np.int8)
    xd = np.empty(x.shape[0] // QK, np.float32)
    _quantize_q8_0_cpu(x, xq, xd)
    out = np.empty(w.shape[0], np.float32)
    for r in prange(w.shape[0]):
        out[r] = _dot_nvfp4(w, r, xq, xd, f16)
    return out


_GEMM_ROWS = 64


@_kernel(parallel=True)
def _matmul_nvfp4(w, x, f16):
    """x (n, cols) @ W.T, every output the lane order of `_dot_nvfp4`. A tile of weight rows is unpacked once into
    float32 integers laid out (half-block, element, row) and swept across all activation rows: the integer sums of
    4 products are exact in float32, so only the lane fmas and the final hsum round, as in ggml."""
    n, nh, rows = x.shape[0], 2 * w.shape[1], w.shape[0]
    xq = np.empty((n, nh, QK), np.float32)
    xd = np.empty((n, nh), np.float32)
    for t in prange(n):
        qs = np.empty((nh, QK), np.int8)
        _quantize_q8_0_cpu(x[t], qs, xd[t])
        for h in range(nh):
            for e in range(QK):
                xq[t, h, e] = qs[h, e]
    out = np.empty((n, rows), np.float32)
    for task in prange((rows + _GEMM_ROWS - 1) // _GEMM_ROWS):
        r0 = task * _GEMM_ROWS
        m = min(_GEMM_ROWS, rows - r0)
        wq = np.empty((nh, QK, m), np.float32)
        wd = np.empty((nh, 2, m), np.float32)  # UE4M3 scale of each half's two sub-blocks
        for i in range(m):
            r = r0 + i
            for b in range(w.shape[1]):
                for sub in range(4):
                    h, part = 2 * b + sub // 2, 16 * (sub % 2)
                    wd[h, sub % 2, i] = _UE4M3[w[r, b, sub]]
                    for j in range(8):
                        q = np.int32(w[r, b, 4 + 8 * sub + j])
                        wq[h, part + j, i] = _KV[q & 15]
                        wq[h, part + 8 + j, i] = _KV[q >> 4]
        _nvfp4_tile(xq, xd, wq, wd, out[:, r0:r0 + m])
    return out


@_jit
def _nvfp4_tile(xq, xd, wq, wd, out):
    n, nh, m = xq.shape[0], xq.shape[1], wq.shape[2]
    lanes = np.empty((8, m), np.float32)
    scale = np.empty((2, m), np.float32)
    for t in range(n):
        lanes[:] = 0
        for h in range(nh):
            x, xdh = xq[t, h], xd[t, h]
            for p in range(2):
                for i in range(m):
                    scale[p, i] = wd[h, p, i] * xdh
            for k in range(8):
                e = 4 * k
                w0, w1, w2, w3 = wq[h, e], wq[h, e + 1], wq[h, e + 2], wq[h, e + 3]
                sc, lane = scale[k // 4], lanes[k]
                for i in range(m):
                    dot4 = (x[e] * w0[i] + x[e + 1] * w1[i]) + (x[e + 2] * w2[i] + x[e + 3] * w3[i])
                    lane[i] = _fma(sc[i], dot4, lane[i])
        o = out[t]
        for i in range(m):
            o[i] = _hsum8_col(lanes, i)


def _matmul_mxfp4(w, x, f16):
    if w.shape[0] % 8:  # not repacked by ggml: every output is its vec_dot
        return np.stack([_matvec_mxfp4(w, row, f16) for row in x])
    return _matmul_mxfp4_repacked(w, x)


@_kernel(parallel=True)
def _matmul_mxfp4_repacked(w, x):
    n, nb, rows = x.shape[0], w.shape[1], w.shape[0]
    xq = np.empty((n, nb, QK), np.float32)
    xd = np.empty((n, nb), np.float32)
    xs = np.zeros((n, nb), np.float32)
    for t in prange(n):
        qs = np.empty((nb, QK), np.int8)
        _quantize_q8_0_cpu(x[t], qs, xd[t])
        for b in range(nb):
            for e in range(QK):
                xq[t, b, e] = qs[b, e]
    out = np.empty((n, rows), np.float32)
    for task in prange((rows + _GEMM_ROWS - 1) // _GEMM_ROWS):
        r0 = task * _GEMM_ROWS
        m = min(_GEMM_ROWS, rows - r0)
        wq = np.empty((nb, QK, m), np.float32)
        wd = np.empty((nb, m), np.float32)
        wm = np.zeros((nb, m), np.float32)
        for i in range(m):
            for b in range(nb):
                wd[b, i] = _E8M0[w[r0 + i, b, 0]]
                for j in range(16):
                    q = np.int32(w[r0 + i, b, 1 + j])
                    wq[b, j, i] = _KV[q & 15]
                    wq[b, j + 16, i] = _KV[q >> 4]
        _gemm_q32_tile(xq, xd, xs, wq, wd, wm, True, False, out[:, r0:r0 + m])
    return out


# AVX2 builds (isa.LEVEL == "avx2"): a repacked MXFP4 matrix (rows % 8 == 0) is multiplied by ggml_gemv_mxfp4_8x8_q8_0
# for every activation row that is not in a group of 4 (decode, and n < 4 prefill batches): on AVX2 its
# gemv_q4_b32_8x8_q8_0_lut_avx, one float accumulator per output, acc = fma(float(integer block dot), e8m0 * d_x, acc)
# block after block: the order of the gemm tile above, not vec_dot's. AVX512 builds run the same gemv.


@_jit
def _dot_mxfp4_repacked(w, r, xq, xd):
    acc = np.float32(0.0)
    for b in range(w.shape[1]):
        s = np.int32(0)
        for j in range(16):
            q = np.int32(w[r, b, 1 + j])
            s = np.int32(s + _KV[q & 15] * xq[b, j] + _KV[q >> 4] * xq[b, j + 16])
        acc = _fma(np.float32(s), _E8M0[w[r, b, 0]] * xd[b], acc)
    return acc


@_kernel(parallel=True)
def _matvec_mxfp4_avx2(w, x, f16):
    xq = np.empty((x.shape[0] // QK, QK), np.int8)
    xd = np.empty(x.shape[0] // QK, np.float32)
    _quantize_q8_0_cpu(x, xq, xd)
    out = np.empty(w.shape[0], np.float32)
    repacked = w.shape[0] % 8 == 0
    for r in prange(w.shape[0]):
        if repacked:
            out[r] = _dot_mxfp4_repacked(w, r, xq, xd)
        else:
            out[r] = _dot_mxfp4(w, r, xq, xd, f16)
    return out


# Dequantisation (prefill tiles, embedding rows): the same float32 products as gguf-py / ggml's dequantize_row_*.


@_kernel(parallel=True)
def _dequant_mxfp4(w, rows, f16, out):
    for i in prange(rows.shape[0]):
        r = rows[i]
        for b in range(w.shape[1]):
            d = _E8M0[w[r, b, 0]]
            for j in range(16):
                q = np.int32(w[r, b, 1 + j])
                out[i, QK * b + j] = np.float32(_KV[q & 15]) * d
                out[i, QK * b + 16 + j] = np.float32(_KV[q >> 4]) * d


@_kernel(parallel=True)
def _dequant_nvfp4(w, rows, f16, out):
    for i in prange(rows.shape[0]):
        r = rows[i]
        for b in range(w.shape[1]):
            for sub in range(4):
                d = _UE4M3[w[r, b, sub]]
                base = 64 * b + 16 * sub
                for j in range(8):
                    q = np.int32(w[r, b, 4 + 8 * sub + j])
                    out[i, base + j] = np.float32(_KV[q & 15]) * d
                    out[i, base + 8 + j] = np.float32(_KV[q >> 4]) * d


FP4_KERNELS = {
    QT.MXFP4: _TypeKernels(QT.Q8_0, _matvec_mxfp4, _matmul_mxfp4, _dequant_mxfp4, _roundtrip_q8_0),
    QT.NVFP4: _TypeKernels(QT.Q8_0, _matvec_nvfp4, _matmul_nvfp4, _dequant_nvfp4, _roundtrip_q8_0),
}
if isa.X86_AVX2_DOTS:  # repacked MXFP4 decode: ggml's AVX2 gemv (above), the one AVX512 builds run too
    FP4_KERNELS[QT.MXFP4] = _TypeKernels(QT.Q8_0, _matvec_mxfp4_avx2, _matmul_mxfp4, _dequant_mxfp4, _roundtrip_q8_0)


# ----------------------------------------------------------------------------------------------------------------------
# numpy references


def matmul_ref(data: np.ndarray, qtype: QT, shape: tuple[int, int], x: np.ndarray,
               tensor_scale: float = 1.0) -> np.ndarray:
    """x (n, cols) @ W.T as ggml computes it, in float64: gguf-py's dequantised W, ggml's Q8_0 activation, then the
    tensor scale."""
    from gguf import quants as gguf_quants

    from .kernels_ref import activation_ref

    rows, cols = shape
    w = gguf_quants.dequantize(np.ascontiguousarray(data), qtype).reshape(rows, cols).astype(np.float64)
    xhat, _ = activation_ref(np.atleast_2d(x), QT.Q8_0)
    return (xhat @ w.T) * np.float64(np.float32(tensor_scale))


def matvec_ref(data: np.ndarray, qtype: QT, shape: tuple[int, int], x: np.ndarray,
               tensor_scale: float = 1.0) -> np.ndarray:
    return matmul_ref(data, qtype, shape, np.asarray(x)[None, :], tensor_scale)[0]
