"""NVFP4 and MXFP4 weight kernels, as ggml-cpu computes them (ggml_vec_dot_nvfp4_q8_0 / ggml_vec_dot_mxfp4_q8_0).

Both types take a Q8_0 activation (vec_dot_type, ggml-cpu.c). Layouts and value tables: llmq/fp4.py.

    MXFP4 block b (17 B), Q8_0 block b:      sum += (f16(dy_b) * 2^(e-128)) * sum_j KV[q_j] * xq_j
    NVFP4 block b (36 B), Q8_0 blocks 2b, 2b+1: sub-block s (16 values) reads Q8_0 block 2b + s//2 at offset
                                             16 * (s % 2):  sum += dy * UE4M3(d_s)/2 * sum_j KV[q_j] * xq_j

The order of the float sums is ggml's generic one (one float add per group); ggml's AVX2 code keeps 8 float lanes,
which differs only in float rounding. llama.cpp multiplies the matmul output by the tensor scale `<name>.scale`
afterwards (runtime/models/llama.py does the same).

`matvec_ref` / `matmul_ref` are the plain numpy references (gguf-py's dequantizer for the weights, ggml's Q8_0 for
the activation, float64 products).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT

from llmq.fp4 import E8M0_HALF, KVALUES, UE4M3_HALF

from numba import prange

from .kernels import QK, _jit, _kernel, _quantize_q8_0_cpu, _roundtrip_q8_0, _TypeKernels

_KV = KVALUES.astype(np.int32)
_UE4M3 = UE4M3_HALF
_E8M0 = E8M0_HALF


@_jit
def _dot_mxfp4(w, r, xq, xd, f16):
    acc = np.float32(0.0)
    for b in range(w.shape[1]):
        d = xd[b] * _E8M0[w[r, b, 0]]
        s = np.int32(0)
        for j in range(16):
            q = np.int32(w[r, b, 1 + j])
            s = np.int32(s + _KV[q & 15] * xq[b, j] + _KV[q >> 4] * xq[b, j + 16])
        acc += d * np.float32(s)
    return acc


@_jit
def _dot_nvfp4(w, r, xq, xd, f16):
    acc = np.float32(0.0)
    for b in range(w.shape[1]):
        for sub in range(4):
            qb = 2 * b + sub // 2
            off = 16 * (sub % 2)
            s = np.int32(0)
            for j in range(8):
                q = np.int32(w[r, b, 4 + 8 * sub + j])
                s = np.int32(s + _KV[q & 15] * xq[qb, off + j] + _KV[q >> 4] * xq[qb, off + 8 + j])
            acc += xd[qb] * _UE4M3[w[r, b, sub]] * np.float32(s)
    return acc


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
    QT.MXFP4: _TypeKernels(QT.Q8_0, _matvec_mxfp4, None, _dequant_mxfp4, _roundtrip_q8_0),
    QT.NVFP4: _TypeKernels(QT.Q8_0, _matvec_nvfp4, None, _dequant_nvfp4, _roundtrip_q8_0),
}


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
