"""Weight kernels: matrix-vector and matrix-matrix products straight from GGUF blocks, the way llama.cpp's CPU backend
computes them.

Why the activation is quantised: ggml never multiplies a quantised weight by a float activation. Each weight type has a
`vec_dot_type` (ggml-cpu.c, type_traits_cpu); the activation row is first quantised to it (Q8_0 for Q4_0/Q5_0/Q8_0,
Q8_1 for Q4_1/Q5_1, Q8_K for the K-quants, F16/BF16 for F16/BF16 weights) and the dot product is then an integer dot
per block times the two block scales. Reproducing that quantisation bit for bit is what lets this runtime agree with
llama.cpp token for token, so the activation quantisers below follow the x86 build of ggml-cpu (quantize_row_q8_0 /
q8_1 in ggml-cpu/arch/x86/quants.c: scale 127/amax, round half to even; quantize_row_q8_K_ref for Q8_K).

Block layouts (ggml-common.h; `f16` is an IEEE half, little endian; QK = 32, QK_K = 256):
    Q4_0   18 B: d f16 | qs[16]           x[j] = d*((qs[j] & 15) - 8), x[j+16] = d*((qs[j] >> 4) - 8)
    Q4_1   20 B: d f16 | m f16 | qs[16]   x[j] = d*(qs[j] & 15) + m,   x[j+16] = d*(qs[j] >> 4) + m
    Q5_0   22 B: d f16 | qh u32 | qs[16]  as Q4_0 with bit j (j+16) of qh as 5th bit, offset 16
    Q5_1   24 B: d f16 | m f16 | qh u32 | qs[16]
    Q8_0   34 B: d f16 | qs int8[32]
    Q2_K   84 B: scales[16] (lo nibble scale, hi nibble min) | qs[64] (2 bit) | d f16 | dmin f16
    Q3_K  110 B: hmask[32] | qs[64] (2 bit) | scales[12] (16 x 6 bit, offset 32) | d f16
    Q4_K  144 B: d f16 | dmin f16 | scales[12] (8 scales + 8 mins, 6 bit) | qs[128]
    Q5_K  176 B: d f16 | dmin f16 | scales[12] | qh[32] | qs[128]
    Q6_K  210 B: ql[128] | qh[64] | scales int8[16] | d f16
and the activation formats (kept as separate arrays here, not packed):
    Q8_0: qs int8[32], d = f16(amax/127)                      Q8_1: as Q8_0 plus s = f16(d*sum(qs))
    Q8_K: qs int8[256], d = float32, bsums = sums of 16 qs

Decode (`matvec`) is a fused numba kernel per type: rows in parallel, each row a float32 sum over blocks of
(weight scale * activation scale) * integer block dot, as ggml's `ggml_vec_dot_*` (ggml-cpu/quants.c; the generic
order, or for the 32-element 4/5-bit types 8 float lanes like the AVX2 code).
Prefill (`matmul`) follows llama.cpp's batched products on x86 bit for bit: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 here (see
"Prefill kernels" below; integer sums through AVX512-VNNI in gemm_int8.py), Q4_K/Q2_K in kernels_repack.py (ggml's
repacked GEMM), the other K-quants in kernels_tiled.py (ggml-cpu's tiled matmul), NVFP4/MXFP4 in kernels_fp4.py.
F32/F16/BF16 quantise the activations the same way, turn them back into exact floats and let BLAS do the products:
mathematically the same sums, only the float rounding order differs. On SmolLM2 any difference in rounding order, even of one ulp in one product, grows
through the layers (each matmul re-quantises its input) into ~3e-3 KLD and ~96% top-1 agreement, as large as
llama.cpp's own flash-attention on/off or batched/token-by-token differences: parity needs the same order.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import FunctionType
from typing import Callable

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from llmq.errors import LlmqError

from .gemm_int8 import HAVE_VNNI, gemm_tile16, pack_activation

QK = 32
QK_K = 256

# fp16 bit pattern -> float32; a 256 KiB table is faster than decoding halves with bit tricks inside numba.
F16_TO_F32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------------
# Compilation: LLVM's SLP vectoriser turns the fully unrolled 16/32-element block loops below into SIMD code (widen,
# multiply, horizontal add). Numba switches SLP off by default (numba PR #8852, miscompilations in other code), so it is
# switched on only while our own kernels compile; the tests compare every kernel against a numpy reference.


class _Kernel:
    """A numba dispatcher called with SLP on: numba compiles (or loads from its cache) inside the call whenever it
    meets a new argument signature, so the switch has to be on for every call; flipping it costs ~0.1 us. (A Python
    thread compiling other numba code while one of our nogil kernels runs would get SLP too.)"""

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher

    def __call__(self, *args):
        saved = numba.config.SLP_VECTORIZE
        numba.config.SLP_VECTORIZE = 1
        try:
            return self.dispatcher(*args)
        finally:
            numba.config.SLP_VECTORIZE = saved


def _kernel(parallel: bool = False):
    def wrap(fn):
        return _Kernel(njit(cache=True, parallel=parallel, nogil=True)(fn))
    return wrap


_jit = njit(cache=True, nogil=True)  # helpers; always reached through a _Kernel, so they compile with SLP too
# Inlined by numba itself: LLVM then sees the caller's scratch allocation and knows it aliases nothing else.
_jit_inline = njit(cache=True, nogil=True, inline="always")


# ----------------------------------------------------------------------------------------------------------------------
# Scalar helpers


@_jit
def _round_f16(v):
    """The float32 value of the half nearest to float32 `v` (round half to even): what F16C's vcvtps2ph stores."""
    a = abs(np.float64(v))
    if a != a:
        return v
    if a >= 65520.0:  # halfway between the largest half (65504) and the next power of two
        r = np.inf
    elif a < 6.103515625e-05:  # subnormal halves: multiples of 2^-24
        r = np.rint(a * 16777216.0) / 16777216.0
    else:
        m, e = math.frexp(a)
        r = math.ldexp(np.rint(math.ldexp(m, 11)), e - 11)
    return np.float32(math.copysign(r, v))


@_jit
def _f16_bits(v):
    """IEEE half bits of float32 `v`, rounded half to even (numpy's astype(float16), GGML_FP32_TO_FP16)."""
    sign = 0x8000 if math.copysign(1.0, v) < 0 else 0
    r = _round_f16(v)
    if r != r:
        return sign | 0x7E00
    a = abs(np.float64(r))
    if a == np.inf:
        return sign | 0x7C00
    if a < 6.103515625e-05:  # zero and subnormals: multiples of 2^-24
        return sign | np.int64(a * 16777216.0)
    m, e = math.frexp(a)  # a = (2m) * 2^(e-1) with 2m in [1, 2)
    return sign | ((e + 14) << 10) | np.int64((2.0 * m - 1.0) * 1024.0)


@_jit
def _f16_at(w, r, b, o, f16):
    """The f16 stored little endian at byte o of block b of row r, as float32."""
    return f16[np.int64(w[r, b, o]) | (np.int64(w[r, b, o + 1]) << 8)]


@_jit
def _u32_at(w, r, b, o):
    return (np.int64(w[r, b, o]) | (np.int64(w[r, b, o + 1]) << 8) | (np.int64(w[r, b, o + 2]) << 16)
            | (np.int64(w[r, b, o + 3]) << 24))


@_jit
def _scales_mins_k4(w, r, b):
    """The 8 six-bit scales and 8 mins of Q4_K/Q5_K block b (packed in bytes 4..15), one byte each in two int64s
    (byte j = sub-block j); ggml's utmp shuffle in ggml_vec_dot_q4_K_q8_K."""
    a0 = _u32_at(w, r, b, 4)
    a1 = _u32_at(w, r, b, 8)
    a2 = _u32_at(w, r, b, 12)
    scales = (a0 & 0x3F3F3F3F) | (((a2 & 0x0F0F0F0F) | (((a0 >> 6) & 0x03030303) << 4)) << 32)
    mins = (a1 & 0x3F3F3F3F) | ((((a2 >> 4) & 0x0F0F0F0F) | (((a1 >> 6) & 0x03030303) << 4)) << 32)
    return scales, mins


@_jit
def _byte(packed, j):
    return np.int32((packed >> (8 * j)) & 255)


@_jit
def _scale_q3_k(w, r, b, i):
    """Signed 6-bit scale of sub-block i (0..15) of Q3_K block b (scales at bytes 96..107): low nibbles in the first
    8 bytes, high 2 bits in the last 4."""
    lo = (np.int32(w[r, b, 96 + i]) & 15) if i < 8 else (np.int32(w[r, b, 88 + i]) >> 4)
    hi = (np.int32(w[r, b, 104 + (i & 3)]) >> (2 * (i >> 2))) & 3
    return (lo | (hi << 4)) - 32


# ----------------------------------------------------------------------------------------------------------------------
# Activation quantisers (vec_dot_type). x is one contiguous float32 row.


@_jit
def _quantize_q8_0_cpu(x, qs, d):
    """quantize_row_q8_0 of ggml-cpu on x86 (AVX2 path): d = f16(amax/127), q = round_half_even(x*127/amax)."""
    for b in range(d.shape[0]):
        amax = np.float32(0.0)
        for j in range(QK):
            amax = max(amax, abs(x[b * QK + j]))
        d[b] = _round_f16(amax / np.float32(127.0))
        iscale = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
        for j in range(QK):
            qs[b, j] = np.int8(min(127.0, max(-128.0, np.rint(x[b * QK + j] * iscale))))


@_jit
def _quantize_q8_1_cpu(x, qs, d, s):
    """quantize_row_q8_1 of ggml-cpu on x86: as Q8_0, plus s = f16(unrounded d * sum(q))."""
    for b in range(d.shape[0]):
        amax = np.float32(0.0)
        for j in range(QK):
            amax = max(amax, abs(x[b * QK + j]))
        dd = amax / np.float32(127.0)
        d[b] = _round_f16(dd)
        iscale = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
        total = 0
        for j in range(QK):
            q = np.int8(min(127.0, max(-128.0, np.rint(x[b * QK + j] * iscale))))
            qs[b, j] = q
            total += q
        s[b] = _round_f16(dd * np.float32(total))


@_jit
def _quantize_q8_k(x, qs, d, bsums):
    """quantize_row_q8_K_ref (also what x86 uses): scale -127/max by the signed value of largest magnitude."""
    for b in range(d.shape[0]):
        amax = np.float32(0.0)
        vmax = np.float32(0.0)
        for j in range(QK_K):
            ax = abs(x[b * QK_K + j])
            if ax > amax:
                amax = ax
                vmax = x[b * QK_K + j]
        if amax == 0:
            d[b] = 0
            qs[b, :] = 0
            bsums[b, :] = 0
            continue
        iscale = np.float32(-127.0) / vmax
        for j in range(QK_K):
            qs[b, j] = np.int8(min(127.0, np.rint(iscale * x[b * QK_K + j])))
        for g in range(QK_K // 16):
            total = 0
            for j in range(16):
                total += qs[b, g * 16 + j]
            bsums[b, g] = total
        d[b] = np.float32(1.0) / iscale


@_kernel()
def _quantize_rows_q8_0_cpu(x):
    qs = np.empty((x.shape[0], x.shape[1] // QK, QK), np.int8)
    d = np.empty((x.shape[0], x.shape[1] // QK), np.float32)
    for i in range(x.shape[0]):
        _quantize_q8_0_cpu(x[i], qs[i], d[i])
    return qs, d


@_kernel()
def _quantize_rows_q8_1_cpu(x):
    qs = np.empty((x.shape[0], x.shape[1] // QK, QK), np.int8)
    d = np.empty((x.shape[0], x.shape[1] // QK), np.float32)
    s = np.empty((x.shape[0], x.shape[1] // QK), np.float32)
    for i in range(x.shape[0]):
        _quantize_q8_1_cpu(x[i], qs[i], d[i], s[i])
    return qs, d, s


@_kernel()
def _quantize_rows_q8_k(x):
    qs = np.empty((x.shape[0], x.shape[1] // QK_K, QK_K), np.int8)
    d = np.empty((x.shape[0], x.shape[1] // QK_K), np.float32)
    bsums = np.empty((x.shape[0], x.shape[1] // QK_K, QK_K // 16), np.int32)
    for i in range(x.shape[0]):
        _quantize_q8_k(x[i], qs[i], d[i], bsums[i])
    return qs, d, bsums


# ----------------------------------------------------------------------------------------------------------------------
# Block dot products: weight row r (w is the (rows, blocks, block_bytes) view) against one quantised activation row.
# Integer sums are kept in int32 (np.int32(...) after each step) so LLVM can vectorise them in 16/32-bit lanes.
#
# Q4_0/Q4_1/Q5_0/Q5_1 (and Q4_K) accumulate like ggml's AVX2 code: 8 float lanes, lane l adding scale * (integer sum of
# elements l, l+8, l+16, l+24) for every block, summed across lanes once per row. Skipping a horizontal integer sum
# per block makes them ~30% faster than one float add per block; the result differs from ggml's only in float
# rounding order (as ggml's own SIMD and generic code differ). `lanes` is an 8-float scratch owned by the caller.


@_jit
def _sum_lanes(lanes):
    total = np.float32(0.0)
    for lane in range(8):
        total += lanes[lane]
    return total


@_jit
def _block_sums(xq):
    """Sum of each activation block's int8 quants (the offset term of the unsigned-value dots)."""
    xsum = np.zeros(xq.shape[0], np.int32)
    for b in range(xq.shape[0]):
        for j in range(xq.shape[1]):
            xsum[b] += np.int32(xq[b, j])
    return xsum


@_jit_inline
def _dot_q4_0(wr, xq, xsum, xd, f16):
    """One integer sum per block over the unsigned nibbles, the -8 offset applied once through the block's
    activation sum (xsum): LLVM vectorises this form, 3x faster than 8 signed float lanes (measured); the float
    order differs from ggml's only by rounding, like the other decode dots."""
    acc = np.float32(0.0)
    for b in range(wr.shape[0]):
        s = np.int32(0)
        for l in range(16):
            q = np.int32(wr[b, 2 + l])
            s = np.int32(s + (q & 15) * np.int32(xq[b, l]) + (q >> 4) * np.int32(xq[b, l + 16]))
        d = f16[np.int64(wr[b, 0]) | (np.int64(wr[b, 1]) << 8)]
        acc += np.float32(s - 8 * xsum[b]) * (d * xd[b])
    return acc


@intrinsic
def _fma_f32(typingctx, a, b, c):
    """llvm.fma.f32: a*b + c rounded once (vfmadd), as ggml's _mm256/_mm512_fmadd_ps; LLVM vectorises it."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fn, args)
    return sig, codegen


@_jit_inline
def _fma(a, b, c):
    """float32 a*b + c rounded once."""
    return _fma_f32(np.float32(a), np.float32(b), np.float32(c))


@_jit
def _hsum_float_8(lanes):
    """ggml's hsum_float_8: high half + low half, then pairs (0+2) + (1+3)."""
    r0 = lanes[4] + lanes[0]
    r1 = lanes[5] + lanes[1]
    r2 = lanes[6] + lanes[2]
    r3 = lanes[7] + lanes[3]
    return (r0 + r2) + (r1 + r3)


@_jit_inline
def _dot_q4_1(w, r, xq, xd, xs, f16, lanes):
    """ggml_vec_dot_q4_1_q8_1, x86 AVX2 order bit for bit: the 32 nibbles unpacked low halves first (elements 0-15)
    then high halves (16-31); integer lane l sums elements 4l..4l+3 (dpbusd / maddubs+madd); each block does
    lane = fma(d_w*d_x, float(lane sum), lane); the m*s terms go to a scalar sum (contracted to fma by GCC)."""
    for lane in range(8):
        lanes[lane] = 0
    mins = np.float32(0.0)
    for b in range(w.shape[1]):
        scale = _f16_at(w, r, b, 0, f16) * xd[b]
        mins = _fma(_f16_at(w, r, b, 2, f16), xs[b], mins)
        for l in range(4):
            lo = np.int32(0)
            hi = np.int32(0)
            for j in range(4):
                q = np.int32(w[r, b, 4 + 4 * l + j])
                lo = np.int32(lo + (q & 15) * xq[b, 4 * l + j])
                hi = np.int32(hi + (q >> 4) * xq[b, 16 + 4 * l + j])
            lanes[l] = _fma(scale, np.float32(lo), lanes[l])
            lanes[4 + l] = _fma(scale, np.float32(hi), lanes[4 + l])
    return _hsum_float_8(lanes) + mins


@_jit_inline
def _dot_q5_0(wr, xq, xsum, xd, f16):
    """As _dot_q4_0: one integer sum per block over the unsigned 5-bit values, offset 16 via the activation sum."""
    acc = np.float32(0.0)
    for b in range(wr.shape[0]):
        qh = np.int32(wr[b, 2]) | (np.int32(wr[b, 3]) << 8) | (np.int32(wr[b, 4]) << 16) | (np.int32(wr[b, 5]) << 24)
        s = np.int32(0)
        for l in range(16):
            q = np.int32(wr[b, 6 + l])
            s = np.int32(s + ((q & 15) | (((qh >> l) & 1) << 4)) * np.int32(xq[b, l])
                         + ((q >> 4) | (((qh >> (l + 16)) & 1) << 4)) * np.int32(xq[b, l + 16]))
        d = f16[np.int64(wr[b, 0]) | (np.int64(wr[b, 1]) << 8)]
        acc += np.float32(s - 16 * xsum[b]) * (d * xd[b])
    return acc


@_jit_inline
def _dot_q5_1(w, r, xq, xd, xs, f16, lanes):
    for lane in range(8):
        lanes[lane] = 0
    mins = np.float32(0.0)
    for b in range(w.shape[1]):
        scale = _f16_at(w, r, b, 0, f16) * xd[b]
        qh = _u32_at(w, r, b, 4)
        for l in range(8):
            q0 = np.int32(w[r, b, 8 + l])
            q1 = np.int32(w[r, b, 16 + l])
            p = np.int32(((q0 & 15) | (((qh >> l) & 1) << 4)) * xq[b, l]
                         + ((q1 & 15) | (((qh >> (l + 8)) & 1) << 4)) * xq[b, l + 8]
                         + ((q0 >> 4) | (((qh >> (l + 16)) & 1) << 4)) * xq[b, l + 16]
                         + ((q1 >> 4) | (((qh >> (l + 24)) & 1) << 4)) * xq[b, l + 24])
            lanes[l] += scale * np.float32(p)
        mins += _f16_at(w, r, b, 2, f16) * xs[b]
    return _sum_lanes(lanes) + mins


@_jit
def _int8_at(w, r, b, o):
    q = np.int32(w[r, b, o])
    return q - ((q & 128) << 1)


@_jit
def _dot_q8_0(w, r, xq, xd, f16):
    """Q8_0 keeps the generic order (one integer sum per block): measured faster than 8 float lanes here."""
    acc = np.float32(0.0)
    for b in range(w.shape[1]):
        s = np.int32(0)
        for j in range(QK):
            s = np.int32(s + _int8_at(w, r, b, 2 + j) * xq[b, j])
        acc += np.float32(s) * (_f16_at(w, r, b, 0, f16) * xd[b])
    return acc


@_jit
def _dot_q2_k(w, r, xq, xd, xbsums, f16):
    acc = np.float32(0.0)
    for b in range(w.shape[1]):
        mins = np.int32(0)
        for g in range(16):
            mins = np.int32(mins + xbsums[b, g] * (np.int32(w[r, b, g]) >> 4))
        isum = np.int32(0)
        for n in range(2):
            for shift in range(0, 8, 2):
                g = 8 * n + shift  # sub-block of the first 16 elements of these 32
                s0 = np.int32(0)
                s1 = np.int32(0)
                for j in range(16):
                    x0 = 128 * n + 16 * shift + j  # the 2-bit field at `shift` of qs byte 32n+j is element x0
                    s0 = np.int32(s0 + ((np.int32(w[r, b, 16 + 32 * n + j]) >> shift) & 3) * xq[b, x0])
                    s1 = np.int32(s1 + ((np.int32(w[r, b, 32 + 32 * n + j]) >> shift) & 3) * xq[b, x0 + 16])
                isum = np.int32(isum + s0 * (np.int32(w[r, b, g]) & 15) + s1 * (np.int32(w[r, b, g + 1]) & 15))
        dall = xd[b] * _f16_at(w, r, b, 80, f16)
        dmin = xd[b] * _f16_at(w, r, b, 82, f16)
        acc += dall * np.float32(isum) - dmin * np.float32(mins)
    return acc


@_jit
def _dot_q3_k(w, r, xq, xd, f16):
    acc = np.float32(0.0)
    for b in range(w.shape[1]):
        isum = np.int32(0)
        for n in range(2):
            for k in range(4):
                bit = 4 * n + k
                for h in range(2):
                    s = np.int32(0)
                    for j in range(16):
                        q = (np.int32(w[r, b, 32 + 32 * n + 16 * h + j]) >> (2 * k)) & 3
                        q -= ((np.int32(w[r, b, 16 * h + j]) >> bit) & 1 ^ 1) << 2  # high bit clear: minus 4
                        s = np.int32(s + q * xq[b, 128 * n + 32 * k + 16 * h + j])
                    isum = np.int32(isum + s * _scale_q3_k(w, r, b, 8 * n + 2 * k + h))
        acc += (_f16_at(w, r, b, 108, f16) * xd[b]) * np.float32(isum)
    return acc


@_jit
def _q4_k_min_term(w, r, b, mins, xd, xbsums, f16):
    """dmin * d8 * sum over sub-blocks of min * (sum of the sub-block's activation quants)."""
    msum = np.int32(0)
    for k in range(8):
        msum = np.int32(msum + _byte(mins, k) * (xbsums[b, 2 * k] + xbsums[b, 2 * k + 1]))
    return (_f16_at(w, r, b, 2, f16) * xd[b]) * np.float32(msum)


@_jit_inline
def _dot_q4_k(w, r, xq, xd, xbsums, f16):
    """One integer sum per block (sub-block sums times their 6-bit scales), as the Q4_0 dot: vectorises."""
    acc = np.float32(0.0)
    mins_total = np.float32(0.0)
    wr = w[r]
    for b in range(wr.shape[0]):
        scales, mins = _scales_mins_k4(w, r, b)
        isum = np.int32(0)
        for k in range(4):
            lo = np.int32(0)
            hi = np.int32(0)
            for j in range(QK):
                q = wr[b, 16 + 32 * k + j]
                lo += np.int32(q & np.uint8(15)) * np.int32(xq[b, 64 * k + j])
                hi += np.int32(q >> np.uint8(4)) * np.int32(xq[b, 64 * k + 32 + j])
            isum += _byte(scales, 2 * k) * lo + _byte(scales, 2 * k + 1) * hi
        acc += (_f16_at(w, r, b, 0, f16) * xd[b]) * np.float32(isum)
        mins_total += _q4_k_min_term(w, r, b, mins, xd, xbsums, f16)
    return acc - mins_total


@_jit
def _dot_q5_k(w, r, xq, xd, xbsums, f16):
    """One integer sum per block (8 float lanes measured slower for Q5_K)."""
    acc = np.float32(0.0)
    for b in range(w.shape[1]):
        scales, mins = _scales_mins_k4(w, r, b)
        isum = np.int32(0)
        for k in range(4):
            s_lo = np.int32(0)
            s_hi = np.int32(0)
            for j in range(QK):
                q = np.int32(w[r, b, 48 + 32 * k + j])
                qh = np.int32(w[r, b, 16 + j])
                s_lo = np.int32(s_lo + ((q & 15) | (((qh >> (2 * k)) & 1) << 4)) * xq[b, 64 * k + j])
                s_hi = np.int32(s_hi + ((q >> 4) | (((qh >> (2 * k + 1)) & 1) << 4)) * xq[b, 64 * k + 32 + j])
            isum = np.int32(isum + _byte(scales, 2 * k) * s_lo + _byte(scales, 2 * k + 1) * s_hi)
        acc += (_f16_at(w, r, b, 0, f16) * xd[b]) * np.float32(isum)
        acc -= _q4_k_min_term(w, r, b, mins, xd, xbsums, f16)
    return acc


@_jit
def _dot_q6_k(w, r, xq, xd, f16):
    acc = np.float32(0.0)
    for b in range(w.shape[1]):
        isum = np.int32(0)
        for n in range(2):
            for h in range(2):
                s1 = np.int32(0)
                s2 = np.int32(0)
                s3 = np.int32(0)
                s4 = np.int32(0)
                for j in range(16):
                    l = 16 * h + j
                    ql_a = np.int32(w[r, b, 64 * n + l])
                    ql_b = np.int32(w[r, b, 64 * n + 32 + l])
                    qh = np.int32(w[r, b, 128 + 32 * n + l])
                    x0 = 128 * n + l
                    s1 = np.int32(s1 + (((ql_a & 15) | ((qh & 3) << 4)) - 32) * xq[b, x0])
                    s2 = np.int32(s2 + (((ql_b & 15) | (((qh >> 2) & 3) << 4)) - 32) * xq[b, x0 + 32])
                    s3 = np.int32(s3 + (((ql_a >> 4) | (((qh >> 4) & 3) << 4)) - 32) * xq[b, x0 + 64])
                    s4 = np.int32(s4 + (((ql_b >> 4) | (((qh >> 6) & 3) << 4)) - 32) * xq[b, x0 + 96])
                g = 192 + 8 * n + h  # scale byte of the first 16-element group; the others follow every 2
                isum = np.int32(isum + s1 * np.int32(np.int8(w[r, b, g])) + s2 * np.int32(np.int8(w[r, b, g + 2]))
                                + s3 * np.int32(np.int8(w[r, b, g + 4])) + s4 * np.int32(np.int8(w[r, b, g + 6])))
        acc += (_f16_at(w, r, b, 208, f16) * xd[b]) * np.float32(isum)
    return acc


# 16 rows at a time (Q4_0, Q5_0, Q8_0): the same integer block sums and the same float operations per row as the
# _dot_* functions above, but as LLVM vector code over 16 rows. Each row's 32 products are first summed to 16 int32
# pairs; then the 16 rows' vectors are folded into one vector holding one sum per row (four rounds of shuffles and
# adds, ~1 instruction a row), and the float update acc += float(s - offset*xsum) * (d * xd) runs in 16 lanes, one
# lane per row. The per-row horizontal sum and scalar tail of the plain loops cost ~2/3 of their time.


def _fold_rows(builder, vectors):
    """16 <16 x i32> vectors (one per row) -> one <16 x i32>, lane k = the sum of vector k's lanes."""
    i32 = ir.IntType(32)
    group = 16
    while len(vectors) > 1:
        half = group // 2
        lo = [g * group + i for g in range(32 // group) for i in range(half)]
        hi = [g * group + half + i for g in range(32 // group) for i in range(half)]
        vectors = [builder.add(builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, 16), lo)),
                               builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, 16), hi)))
                   for a, b in zip(vectors[0::2], vectors[1::2])]
        group = half
    return vectors[0]


def _make_dot_rows16(kind, fused=False):
    """An intrinsic (w, r0, xq, xsum, xd, out, o): out[o + k] = _dot_<kind>(w[r0 + k], xq, xsum, xd) for k < 16.
    fused=True: acc = fma(float(s - offset * xsum), d * xd, acc) instead, the order of ggml's repacked Q4_0 gemv
    (kernels_avx2._dot_vec_q4_0_repacked, 16 rows at a time)."""

    @intrinsic
    def dot_rows16(typingctx, w, r0, xq, xsum, xd, out, o):
        sig = types.void(w, types.int64, xq, xsum, xd, out, types.int64)

        def codegen(context, builder, signature, args):
            w_t, _, xq_t, xsum_t, xd_t, out_t, _ = signature.args
            w_v, r0_v, xq_v, xsum_v, xd_v, out_v, o_v = args
            i8, i16, i32, i64, f32 = (ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64),
                                      ir.FloatType())
            w_a = context.make_array(w_t)(context, builder, w_v)
            xq_a = context.make_array(xq_t)(context, builder, xq_v)
            row_stride, block_stride = (builder.extract_value(w_a.strides, k) for k in (0, 1))
            nb = builder.extract_value(w_a.shape, 1)
            w_base = builder.gep(builder.bitcast(w_a.data, i8.as_pointer()), [builder.mul(r0_v, row_stride)])
            xq_base = builder.bitcast(xq_a.data, i8.as_pointer())
            xq_row_stride = builder.extract_value(xq_a.strides, 0)
            acc = cgutils.alloca_once_value(builder, ir.Constant(ir.VectorType(f32, 16), [0.0] * 16))

            def load(ptr, ty, align=1):
                return builder.load(builder.bitcast(ptr, ty.as_pointer()), align=align)

            def scalar(arr_t, arr_v, index):
                a = context.make_array(arr_t)(context, builder, arr_v)
                return builder.load(builder.gep(a.data, [index]))

            def const_vec(ty, values):
                return ir.Constant(ir.VectorType(ty, len(values)), values)

            with cgutils.for_range(builder, nb) as loop:
                b = loop.index
                x = load(builder.gep(xq_base, [builder.mul(b, xq_row_stride)]), ir.VectorType(i8, 32))
                x16 = builder.sext(x, ir.VectorType(i16, 32))
                sums, scales = [], ir.Constant(ir.VectorType(i16, 16), None)
                for k in range(16):
                    block = builder.gep(w_base, [builder.add(builder.mul(ir.Constant(i64, k), row_stride),
                                                             builder.mul(b, block_stride))])
                    scales = builder.insert_element(scales, load(block, i16), ir.Constant(i32, k))
                    if kind == _KIND_Q8_0:
                        q16 = builder.sext(load(builder.gep(block, [ir.Constant(i64, 2)]), ir.VectorType(i8, 32)),
                                           ir.VectorType(i16, 32))
                    else:
                        qs = load(builder.gep(block, [ir.Constant(i64, 2 if kind == _KIND_Q4_0 else 6)]),
                                  ir.VectorType(i8, 16))
                        lo = builder.and_(qs, const_vec(i8, [15] * 16))
                        hi = builder.lshr(qs, const_vec(i8, [4] * 16))
                        q16 = builder.zext(builder.shuffle_vector(lo, hi, const_vec(i32, list(range(32)))),
                                           ir.VectorType(i16, 32))
                        if kind == _KIND_Q5_0:  # bit j of qh is the fifth bit of element j
                            # byte j/8 of qh in lane j, tested against bit j%8: byte lanes, not 32-bit shifts
                            qh = load(builder.gep(block, [ir.Constant(i64, 2)]), ir.VectorType(i8, 4))
                            qh32 = builder.shuffle_vector(qh, ir.Constant(ir.VectorType(i8, 4), None),
                                                          const_vec(i32, [j // 8 for j in range(32)]))
                            masked = builder.and_(qh32, const_vec(i8, [1 << (j % 8) for j in range(32)]))
                            bits = builder.icmp_unsigned("!=", masked, const_vec(i8, [0] * 32))
                            q16 = builder.or_(q16, builder.select(bits, const_vec(i16, [16] * 32),
                                                                  const_vec(i16, [0] * 32)))
                    p = builder.sext(builder.mul(q16, x16), ir.VectorType(i32, 32))  # |q*x| <= 31*128 or 127*128
                    pairs = builder.add(builder.shuffle_vector(p, p, const_vec(i32, list(range(0, 32, 2)))),
                                        builder.shuffle_vector(p, p, const_vec(i32, list(range(1, 32, 2)))))
                    sums.append(pairs)
                s = _fold_rows(builder, sums)
                if kind != _KIND_Q8_0:  # the unsigned values' offset (8 or 16) times the activation block sum
                    offset = builder.mul(scalar(xsum_t, xsum_v, b), ir.Constant(i32, 8 if kind == _KIND_Q4_0 else 16))
                    offset = builder.shuffle_vector(
                        builder.insert_element(ir.Constant(ir.VectorType(i32, 16), None), offset, ir.Constant(i32, 0)),
                        ir.Constant(ir.VectorType(i32, 16), None), const_vec(i32, [0] * 16))
                    s = builder.sub(s, offset)
                d = builder.fpext(builder.bitcast(scales, ir.VectorType(ir.HalfType(), 16)), ir.VectorType(f32, 16))
                xd_b = scalar(xd_t, xd_v, b)
                xd16 = builder.shuffle_vector(
                    builder.insert_element(ir.Constant(ir.VectorType(f32, 16), None), xd_b, ir.Constant(i32, 0)),
                    ir.Constant(ir.VectorType(f32, 16), None), const_vec(i32, [0] * 16))
                if fused:
                    v16f = ir.VectorType(f32, 16)
                    fma16 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f, [v16f] * 3),
                                                           "llvm.fma.v16f32")
                    builder.store(builder.call(fma16, [builder.sitofp(s, v16f), builder.fmul(d, xd16),
                                                       builder.load(acc)]), acc)
                else:
                    term = builder.fmul(builder.sitofp(s, ir.VectorType(f32, 16)), builder.fmul(d, xd16))
                    builder.store(builder.fadd(builder.load(acc), term), acc)
            out_a = context.make_array(out_t)(context, builder, out_v)
            dst = builder.bitcast(builder.gep(out_a.data, [o_v]), ir.VectorType(f32, 16).as_pointer())
            builder.store(builder.load(acc), dst, align=4)
            return context.get_dummy_value()
        return sig, codegen
    return dot_rows16


_KIND_Q4_0, _KIND_Q4_1, _KIND_Q5_0, _KIND_Q8_0, _KIND_Q5_1 = 0, 1, 2, 3, 4
_dot_rows16_q4_0 = _make_dot_rows16(_KIND_Q4_0)
_dot_rows16_q5_0 = _make_dot_rows16(_KIND_Q5_0)
_dot_rows16_q8_0 = _make_dot_rows16(_KIND_Q8_0)
_dot_rows16_q4_0_repacked = _make_dot_rows16(_KIND_Q4_0, fused=True)


# ----------------------------------------------------------------------------------------------------------------------
# Decode kernels (x: one float32 row): quantise the activation once, then rows in parallel.

_ROWS_PER_TASK = 16


@_kernel(parallel=True)
def _matvec_q4_0(w, x, f16):
    xq = np.empty((w.shape[1], QK), np.int8)
    xd = np.empty(w.shape[1], np.float32)
    _quantize_q8_0_cpu(x, xq, xd)
    xsum = _block_sums(xq)
    out = np.empty(w.shape[0], np.float32)
    n16 = w.shape[0] // 16
    for task in prange(n16):
        _dot_rows16_q4_0(w, 16 * task, xq, xsum, xd, out, 16 * task)
    for r in range(16 * n16, w.shape[0]):
        out[r] = _dot_q4_0(w[r], xq, xsum, xd, f16)
    return out


@_kernel(parallel=True)
def _matvec_q5_0(w, x, f16):
    xq = np.empty((w.shape[1], QK), np.int8)
    xd = np.empty(w.shape[1], np.float32)
    _quantize_q8_0_cpu(x, xq, xd)
    xsum = _block_sums(xq)
    out = np.empty(w.shape[0], np.float32)
    n16 = w.shape[0] // 16
    for task in prange(n16):
        _dot_rows16_q5_0(w, 16 * task, xq, xsum, xd, out, 16 * task)
    for r in range(16 * n16, w.shape[0]):
        out[r] = _dot_q5_0(w[r], xq, xsum, xd, f16)
    return out


@_kernel(parallel=True)
def _matvec_q8_0(w, x, f16):
    xq = np.empty((w.shape[1], QK), np.int8)
    xd = np.empty(w.shape[1], np.float32)
    _quantize_q8_0_cpu(x, xq, xd)
    out = np.empty(w.shape[0], np.float32)
    n16 = w.shape[0] // 16
    for task in prange(n16):
        _dot_rows16_q8_0(w, 16 * task, xq, xd, xd, out, 16 * task)  # (no activation sums: xd passed in their place)
    for r in range(16 * n16, w.shape[0]):
        out[r] = _dot_q8_0(w, r, xq, xd, f16)
    return out


@_kernel(parallel=True)
def _matvec_q4_1(w, x, f16):
    xq = np.empty((w.shape[1], QK), np.int8)
    xd = np.empty(w.shape[1], np.float32)
    xs = np.empty(w.shape[1], np.float32)
    _quantize_q8_1_cpu(x, xq, xd, xs)
    out = np.empty(w.shape[0], np.float32)
    for task in prange((w.shape[0] + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
        lanes = np.empty(8, np.float32)
        for r in range(task * _ROWS_PER_TASK, min(w.shape[0], (task + 1) * _ROWS_PER_TASK)):
            out[r] = _dot_q4_1(w, r, xq, xd, xs, f16, lanes)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Prefill kernels (x: a batch of rows): llama.cpp's batched products on x86, in their float order.
#
# With more than one activation row ggml does not call the per-row dot of the decode path:
#   - a Q4_0 matrix whose row count is a multiple of 8 is repacked at load time and multiplied by
#     ggml_gemm_q4_0_8x8_q8_0 (arch/x86/repack.cpp): one float accumulator per output,
#     acc = fma(float(integer block dot), d_w * d_x, acc), block after block;
#   - Q8_0 and Q5_0 (and Q4_0 otherwise) go to llamafile's tinyBLAS_Q0_AVX (llamafile/sgemm.cpp): 8 float lanes per
#     output, lane l = fma(d_w * d_x, float(integer sum of elements 4l..4l+3), lane), then hsum;
#   - Q4_1 has no batched kernel: ggml_vec_dot_q4_1_q8_1 per output, the same 8 lanes plus a scalar fma sum of
#     m_w * s_x added after the hsum.
# The activations are quantised row by row as in the decode path (quantize_mat_q8_0 of the repacked product rounds
# exactly like quantize_row_q8_0). The K-quants are not mirrored: their batched product is ggml-cpu/tiled (a tiled
# K-quant matmul with its own order), so they keep the dequantise + BLAS path below.
#
# The integer block sums are exact in any order, so only the float operations after them have to be ggml's. _gemm_q32
# computes them with AVX512-VNNI int8 dot products (runtime/gemm_int8.py: one vpdpbusd is one lane's sum of 4
# products for 16 weight rows; ~5x the float version below on SmolLM2's shapes). _gemm_q32_float, its reference
# (and MXFP4's kernel, kernels_fp4), computes them in float32: every partial sum of at most 32 int8 x int8 products
# is an integer below 2^24, so float arithmetic gives it exactly in any order; a tile of weight rows is unpacked once
# into float32 integers laid out (block, element, row) and swept across all activation rows.

_GEMM_ROWS = 16  # gemm_int8.TILE


@_jit_inline
def _hsum8_col(lanes, i):
    """_hsum_float_8 of lanes[:, i]."""
    return ((lanes[4, i] + lanes[0, i]) + (lanes[6, i] + lanes[2, i])) + ((lanes[5, i] + lanes[1, i])
                                                                       + (lanes[7, i] + lanes[3, i]))


@_jit
def _unpack_row_q32(w, r, kind, f16, wq, wd, wm, i):
    """Weight row r of a 32-element block type into column i of wq (blocks, 32, rows) as float integers, its scales
    into wd[:, i] and (Q4_1, Q5_1) its mins into wm[:, i]."""
    for b in range(w.shape[1]):
        wd[b, i] = _f16_at(w, r, b, 0, f16)
        if kind == _KIND_Q8_0:
            for e in range(QK):
                wq[b, e, i] = _int8_at(w, r, b, 2 + e)
        elif kind == _KIND_Q4_1:
            wm[b, i] = _f16_at(w, r, b, 2, f16)
            for e in range(16):
                q = np.int32(w[r, b, 4 + e])
                wq[b, e, i] = q & 15
                wq[b, e + 16, i] = q >> 4
        elif kind == _KIND_Q5_1:
            wm[b, i] = _f16_at(w, r, b, 2, f16)
            qh = _u32_at(w, r, b, 4)
            for e in range(16):
                q = np.int32(w[r, b, 8 + e])
                wq[b, e, i] = (q & 15) | (((qh >> e) & 1) << 4)
                wq[b, e + 16, i] = (q >> 4) | (((qh >> (e + 16)) & 1) << 4)
        elif kind == _KIND_Q5_0:
            qh = _u32_at(w, r, b, 2)
            for e in range(16):
                q = np.int32(w[r, b, 6 + e])
                wq[b, e, i] = ((q & 15) | (((qh >> e) & 1) << 4)) - 16
                wq[b, e + 16, i] = ((q >> 4) | (((qh >> (e + 16)) & 1) << 4)) - 16
        else:
            for e in range(16):
                q = np.int32(w[r, b, 2 + e])
                wq[b, e, i] = (q & 15) - 8
                wq[b, e + 16, i] = (q >> 4) - 8


@_jit
def _unpack_row_vnni(w, r, kind, f16, wv, wd, wm, i):
    """Weight row r into row i of a gemm_int8 tile: wv[b, l, i, k] = 128 + the value of element 4l+k of block b (the
    values _unpack_row_q32 gives, as unsigned bytes), wd[b, i] its scale, (Q4_1, Q5_1) wm[b, i] its min."""
    for b in range(w.shape[1]):
        wd[b, i] = _f16_at(w, r, b, 0, f16)
        if kind == _KIND_Q8_0:
            for e in range(QK):
                wv[b, e >> 2, i, e & 3] = w[r, b, 2 + e] ^ 0x80  # the int8's bits + 128
        elif kind == _KIND_Q4_1 or kind == _KIND_Q5_1:
            wm[b, i] = _f16_at(w, r, b, 2, f16)
            qh = _u32_at(w, r, b, 4) if kind == _KIND_Q5_1 else np.uint32(0)
            o = 8 if kind == _KIND_Q5_1 else 4
            for e in range(16):
                q = np.int32(w[r, b, o + e])
                wv[b, e >> 2, i, e & 3] = 128 + ((q & 15) | (((qh >> e) & 1) << 4))
                wv[b, 4 + (e >> 2), i, e & 3] = 128 + ((q >> 4) | (((qh >> (e + 16)) & 1) << 4))
        elif kind == _KIND_Q5_0:
            qh = _u32_at(w, r, b, 2)
            for e in range(16):
                q = np.int32(w[r, b, 6 + e])
                wv[b, e >> 2, i, e & 3] = 112 + ((q & 15) | (((qh >> e) & 1) << 4))
                wv[b, 4 + (e >> 2), i, e & 3] = 112 + ((q >> 4) | (((qh >> (e + 16)) & 1) << 4))
        else:
            for e in range(16):
                q = np.int32(w[r, b, 2 + e])
                wv[b, e >> 2, i, e & 3] = 120 + (q & 15)
                wv[b, 4 + (e >> 2), i, e & 3] = 120 + (q >> 4)


@_kernel(parallel=True)
def _gemm_q32_vnni(w, x, f16, kind, sequential):
    """x (n, cols) @ W.T for a 32-element block type `kind`; sequential=True: the repacked (one accumulator) order,
    else the 8-lane order. The integer block sums are VNNI int8 dots (gemm_int8), the float operations
    _gemm_q32_tile's."""
    n, nb, rows = x.shape[0], w.shape[1], w.shape[0]
    with_min = kind == _KIND_Q4_1 or kind == _KIND_Q5_1
    xq = np.empty((n, nb * QK), np.int8)
    xc = np.empty((n, nb, 8), np.int32)
    xcs = np.empty((n, nb), np.int32)
    xd = np.empty((n, nb), np.float32)
    xs = np.zeros((n, nb), np.float32)
    for t in prange(n):
        qs = np.empty((nb, QK), np.int8)
        if with_min:
            _quantize_q8_1_cpu(x[t], qs, xd[t], xs[t])
        else:
            _quantize_q8_0_cpu(x[t], qs, xd[t])
        pack_activation(qs, xq[t], xc[t], xcs[t])
    out = np.empty((n, rows), np.float32)
    n_tasks = (rows + _GEMM_ROWS - 1) // _GEMM_ROWS
    for task in prange(n_tasks):
        r0 = task * _GEMM_ROWS
        m = min(_GEMM_ROWS, rows - r0)
        wv = np.full((nb, 8, _GEMM_ROWS, 4), 128, np.uint8)  # rows past the end: zeros; their outputs are dropped
        wd = np.zeros((nb, _GEMM_ROWS), np.float32)
        wm = np.zeros((nb, _GEMM_ROWS), np.float32)
        for i in range(m):
            _unpack_row_vnni(w, r0 + i, kind, f16, wv, wd, wm, i)
        out[:, r0:r0 + m] = gemm_tile16(xq, xc, xcs, xd, xs, wv, wd, wm, sequential, with_min)[:, :m]
    return out


@_kernel(parallel=True)
def _gemm_q32_float(w, x, f16, kind, sequential):
    """_gemm_q32_vnni with the integer block sums in float32 (_gemm_q32_tile), ~5x slower: the reference it is tested
    against, and _gemm_q32 on CPUs without VNNI."""
    n, nb, rows = x.shape[0], w.shape[1], w.shape[0]
    with_min = kind == _KIND_Q4_1 or kind == _KIND_Q5_1
    xq = np.empty((n, nb, QK), np.float32)
    xd = np.empty((n, nb), np.float32)
    xs = np.zeros((n, nb), np.float32)
    for t in prange(n):
        qs = np.empty((nb, QK), np.int8)
        if with_min:
            _quantize_q8_1_cpu(x[t], qs, xd[t], xs[t])
        else:
            _quantize_q8_0_cpu(x[t], qs, xd[t])
        for b in range(nb):
            for e in range(QK):
                xq[t, b, e] = qs[b, e]
    out = np.empty((n, rows), np.float32)
    for task in prange((rows + 63) // 64):
        r0 = task * 64
        m = min(64, rows - r0)
        wq = np.zeros((nb, QK, m), np.float32)
        wd = np.zeros((nb, m), np.float32)
        wm = np.zeros((nb, m), np.float32)
        for i in range(m):
            _unpack_row_q32(w, r0 + i, kind, f16, wq, wd, wm, i)
        _gemm_q32_tile(xq, xd, xs, wq, wd, wm, sequential, with_min, out[:, r0:r0 + m])
    return out


@_jit
def _gemm_q32_tile(xq, xd, xs, wq, wd, wm, sequential, with_min, out):
    """One tile of weight rows (the innermost loops, vectorised) against every activation row. Four products are
    summed per loop pass, so the running sums make few trips through memory."""
    n, nb, m = xq.shape[0], xq.shape[1], wq.shape[2]
    lanes = np.empty((8, m), np.float32)
    isum = np.empty(m, np.float32)
    scale = np.empty(m, np.float32)
    mins = np.empty(m, np.float32)
    for t in range(n):
        lanes[:] = 0
        mins[:] = 0
        for b in range(nb):
            xdb, wdb, x = xd[t, b], wd[b], xq[t, b]
            for i in range(m):
                scale[i] = wdb[i] * xdb
            if sequential:
                isum[:] = 0
                for e in range(0, QK, 4):
                    w0, w1, w2, w3 = wq[b, e], wq[b, e + 1], wq[b, e + 2], wq[b, e + 3]
                    for i in range(m):
                        isum[i] += (x[e] * w0[i] + x[e + 1] * w1[i]) + (x[e + 2] * w2[i] + x[e + 3] * w3[i])
                acc = lanes[0]
                for i in range(m):
                    acc[i] = _fma(isum[i], scale[i], acc[i])
            else:
                for l in range(8):
                    e = 4 * l
                    w0, w1, w2, w3 = wq[b, e], wq[b, e + 1], wq[b, e + 2], wq[b, e + 3]
                    lane = lanes[l]
                    for i in range(m):
                        dot4 = (x[e] * w0[i] + x[e + 1] * w1[i]) + (x[e + 2] * w2[i] + x[e + 3] * w3[i])
                        lane[i] = _fma(scale[i], dot4, lane[i])
                if with_min:
                    wmb, xsb = wm[b], xs[t, b]
                    for i in range(m):
                        mins[i] = _fma(wmb[i], xsb, mins[i])
        o = out[t]
        if sequential:
            for i in range(m):
                o[i] = lanes[0, i]
        elif with_min:
            for i in range(m):
                o[i] = _hsum8_col(lanes, i) + mins[i]
        else:
            for i in range(m):
                o[i] = _hsum8_col(lanes, i)


_gemm_q32 = _gemm_q32_vnni if HAVE_VNNI else _gemm_q32_float


def _matmul_q4_0(w, x, f16):
    return _gemm_q32(w, x, f16, _KIND_Q4_0, w.shape[0] % 8 == 0)  # ggml repacks only row counts divisible by 8


def _matmul_q4_1_lanes(w, x, f16):
    return _gemm_q32(w, x, f16, _KIND_Q4_1, False)


def _matmul_q5_1_lanes(w, x, f16):  # like Q4_1: no batched kernel in ggml-cpu, every output is its AVX2 vec_dot
    return _gemm_q32(w, x, f16, _KIND_Q5_1, False)


def _matmul_q5_0(w, x, f16):
    return _gemm_q32(w, x, f16, _KIND_Q5_0, False)


def _matmul_q8_0(w, x, f16):
    return _gemm_q32(w, x, f16, _KIND_Q8_0, False)


@_kernel(parallel=True)
def _matvec_q5_1(w, x, f16):
    xq = np.empty((w.shape[1], QK), np.int8)
    xd = np.empty(w.shape[1], np.float32)
    xs = np.empty(w.shape[1], np.float32)
    _quantize_q8_1_cpu(x, xq, xd, xs)
    out = np.empty(w.shape[0], np.float32)
    for task in prange((w.shape[0] + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
        lanes = np.empty(8, np.float32)
        for r in range(task * _ROWS_PER_TASK, min(w.shape[0], (task + 1) * _ROWS_PER_TASK)):
            out[r] = _dot_q5_1(w, r, xq, xd, xs, f16, lanes)
    return out


@_kernel(parallel=True)
def _matvec_q2_k(w, x, f16):
    xq = np.empty((w.shape[1], QK_K), np.int8)
    xd = np.empty(w.shape[1], np.float32)
    xbsums = np.empty((w.shape[1], QK_K // 16), np.int32)
    _quantize_q8_k(x, xq, xd, xbsums)
    out = np.empty(w.shape[0], np.float32)
    for r in prange(w.shape[0]):
        out[r] = _dot_q2_k(w, r, xq, xd, xbsums, f16)
    return out


@_kernel(parallel=True)
def _matvec_q3_k(w, x, f16):
    xq = np.empty((w.shape[1], QK_K), np.int8)
    xd = np.empty(w.shape[1], np.float32)
    xbsums = np.empty((w.shape[1], QK_K // 16), np.int32)
    _quantize_q8_k(x, xq, xd, xbsums)
    out = np.empty(w.shape[0], np.float32)
    for r in prange(w.shape[0]):
        out[r] = _dot_q3_k(w, r, xq, xd, f16)
    return out


@_kernel(parallel=True)
def _matvec_q4_k(w, x, f16):
    xq = np.empty((w.shape[1], QK_K), np.int8)
    xd = np.empty(w.shape[1], np.float32)
    xbsums = np.empty((w.shape[1], QK_K // 16), np.int32)
    _quantize_q8_k(x, xq, xd, xbsums)
    out = np.empty(w.shape[0], np.float32)
    for r in prange(w.shape[0]):
        out[r] = _dot_q4_k(w, r, xq, xd, xbsums, f16)
    return out


@_kernel(parallel=True)
def _matvec_q5_k(w, x, f16):
    xq = np.empty((w.shape[1], QK_K), np.int8)
    xd = np.empty(w.shape[1], np.float32)
    xbsums = np.empty((w.shape[1], QK_K // 16), np.int32)
    _quantize_q8_k(x, xq, xd, xbsums)
    out = np.empty(w.shape[0], np.float32)
    for r in prange(w.shape[0]):
        out[r] = _dot_q5_k(w, r, xq, xd, xbsums, f16)
    return out


@_kernel(parallel=True)
def _matvec_q6_k(w, x, f16):
    xq = np.empty((w.shape[1], QK_K), np.int8)
    xd = np.empty(w.shape[1], np.float32)
    xbsums = np.empty((w.shape[1], QK_K // 16), np.int32)
    _quantize_q8_k(x, xq, xd, xbsums)
    out = np.empty(w.shape[0], np.float32)
    for r in prange(w.shape[0]):
        out[r] = _dot_q6_k(w, r, xq, xd, f16)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Dequantisation: rows[i] of w -> out[i]. Same float32 operations, in the same order, as gguf-py's dequantize_blocks
# (and ggml's dequantize_row_*), so the results are bit-identical.


@_kernel(parallel=True)
def _dequant_q4_0(w, rows, f16, out):
    for i in prange(rows.shape[0]):
        r = rows[i]
        for b in range(w.shape[1]):
            d = _f16_at(w, r, b, 0, f16)
            for j in range(16):
                q = np.int32(w[r, b, 2 + j])
                out[i, QK * b + j] = d * np.float32((q & 15) - 8)
                out[i, QK * b + 16 + j] = d * np.float32((q >> 4) - 8)


@_kernel(parallel=True)
def _dequant_q4_1(w, rows, f16, out):
    for i in prange(rows.shape[0]):
        r = rows[i]
        for b in range(w.shape[1]):
            d = _f16_at(w, r, b, 0, f16)
            m = _f16_at(w, r, b, 2, f16)
            for j in range(16):
                q = np.int32(w[r, b, 4 + j])
                out[i, QK * b + j] = d * np.float32(q & 15) + m
                out[i, QK * b + 16 + j] = d * np.float32(q >> 4) + m


@_kernel(parallel=True)
def _dequant_q5_0(w, rows, f16, out):
    for i in prange(rows.shape[0]):
        r = rows[i]
        for b in range(w.shape[1]):
            d = _f16_at(w, r, b, 0, f16)
            qh = _u32_at(w, r, b, 2)
            for j in range(16):
                q = np.int32(w[r, b, 6 + j])
                out[i, QK * b + j] = d * np.float32(((q & 15) | np.int32(((qh >> j) & 1) << 4)) - 16)
                out[i, QK * b + 16 + j] = d * np.float32(((q >> 4) | np.int32(((qh >> (j + 16)) & 1) << 4)) - 16)


@_kernel(parallel=True)
def _dequant_q5_1(w, rows, f16, out):
    for i in prange(rows.shape[0]):
        r = rows[i]
        for b in range(w.shape[1]):
            d = _f16_at(w, r, b, 0, f16)
            m = _f16_at(w, r, b, 2, f16)
            qh = _u32_at(w, r, b, 4)
            for j in range(16):
                q = np.int32(w[r, b, 8 + j])
                out[i, QK * b + j] = d * np.float32((q & 15) | np.int32(((qh >> j) & 1) << 4)) + m
                out[i, QK * b + 16 + j] = d * np.float32((q >> 4) | np.int32(((qh >> (j + 16)) & 1) << 4)) + m


@_kernel(parallel=True)
def _dequant_q8_0(w, rows, f16, out):
    for i in prange(rows.shape[0]):
        r = rows[i]
        for b in range(w.shape[1]):
            d = _f16_at(w, r, b, 0, f16)
            for j in range(QK):
                q = np.int32(w[r, b, 2 + j])
                out[i, QK * b + j] = np.float32(q - ((q & 128) << 1)) * d


@_kernel(parallel=True)
def _dequant_q2_k(w, rows, f16, out):
    for i in prange(rows.shape[0]):
        r = rows[i]
        for b in range(w.shape[1]):
            d = _f16_at(w, r, b, 80, f16)
            dmin = _f16_at(w, r, b, 82, f16)
            for n in range(2):
                for shift in range(0, 8, 2):
                    for j in range(QK):
                        e = 128 * n + 16 * shift + j  # element within the block; its scale byte is e // 16
                        sc = np.int32(w[r, b, e >> 4])
                        q = (np.int32(w[r, b, 16 + 32 * n + j]) >> shift) & 3
                        out[i, QK_K * b + e] = (d * np.float32(sc & 15)) * np.float32(q) - dmin * np.float32(sc >> 4)


@_kernel(parallel=True)
def _dequant_q3_k(w, rows, f16, out):
    for i in prange(rows.shape[0]):
        r = rows[i]
        for b in range(w.shape[1]):
            d = _f16_at(w, r, b, 108, f16)
            for n in range(2):
                for k in range(4):
                    bit = 4 * n + k
                    for j in range(QK):
                        e = 128 * n + 32 * k + j
                        q = (np.int32(w[r, b, 32 + 32 * n + j]) >> (2 * k)) & 3
                        q -= ((np.int32(w[r, b, j]) >> bit) & 1 ^ 1) << 2
                        dl = d * np.float32(_scale_q3_k(w, r, b, e >> 4))
                        out[i, QK_K * b + e] = dl * np.float32(q)


@_kernel(parallel=True)
def _dequant_q4_k(w, rows, f16, out):
    for i in prange(rows.shape[0]):
        r = rows[i]
        for b in range(w.shape[1]):
            d = _f16_at(w, r, b, 0, f16)
            dmin = _f16_at(w, r, b, 2, f16)
            scales, mins = _scales_mins_k4(w, r, b)
            for k in range(4):
                d_lo = d * np.float32(_byte(scales, 2 * k))
                d_hi = d * np.float32(_byte(scales, 2 * k + 1))
                dm_lo = dmin * np.float32(_byte(mins, 2 * k))
                dm_hi = dmin * np.float32(_byte(mins, 2 * k + 1))
                for j in range(QK):
                    q = np.int32(w[r, b, 16 + 32 * k + j])
                    out[i, QK_K * b + 64 * k + j] = d_lo * np.float32(q & 15) - dm_lo
                    out[i, QK_K * b + 64 * k + 32 + j] = d_hi * np.float32(q >> 4) - dm_hi


@_kernel(parallel=True)
def _dequant_q5_k(w, rows, f16, out):
    for i in prange(rows.shape[0]):
        r = rows[i]
        for b in range(w.shape[1]):
            d = _f16_at(w, r, b, 0, f16)
            dmin = _f16_at(w, r, b, 2, f16)
            scales, mins = _scales_mins_k4(w, r, b)
            for k in range(4):
                d_lo = d * np.float32(_byte(scales, 2 * k))
                d_hi = d * np.float32(_byte(scales, 2 * k + 1))
                dm_lo = dmin * np.float32(_byte(mins, 2 * k))
                dm_hi = dmin * np.float32(_byte(mins, 2 * k + 1))
                for j in range(QK):
                    q = np.int32(w[r, b, 48 + 32 * k + j])
                    qh = np.int32(w[r, b, 16 + j])
                    lo = (q & 15) | (((qh >> (2 * k)) & 1) << 4)
                    hi = (q >> 4) | (((qh >> (2 * k + 1)) & 1) << 4)
                    out[i, QK_K * b + 64 * k + j] = d_lo * np.float32(lo) - dm_lo
                    out[i, QK_K * b + 64 * k + 32 + j] = d_hi * np.float32(hi) - dm_hi


@_kernel(parallel=True)
def _dequant_q6_k(w, rows, f16, out):
    for i in prange(rows.shape[0]):
        r = rows[i]
        for b in range(w.shape[1]):
            d = _f16_at(w, r, b, 208, f16)
            for n in range(2):
                for l in range(QK):
                    ql_a = np.int32(w[r, b, 64 * n + l])
                    ql_b = np.int32(w[r, b, 64 * n + 32 + l])
                    qh = np.int32(w[r, b, 128 + 32 * n + l])
                    g = 192 + 8 * n + (l >> 4)
                    e = QK_K * b + 128 * n + l
                    out[i, e] = (d * np.float32(np.int8(w[r, b, g]))) * np.float32(((ql_a & 15) | ((qh & 3) << 4)) - 32)
                    out[i, e + 32] = ((d * np.float32(np.int8(w[r, b, g + 2])))
                                      * np.float32(((ql_b & 15) | (((qh >> 2) & 3) << 4)) - 32))
                    out[i, e + 64] = ((d * np.float32(np.int8(w[r, b, g + 4])))
                                      * np.float32(((ql_a >> 4) | (((qh >> 4) & 3) << 4)) - 32))
                    out[i, e + 96] = ((d * np.float32(np.int8(w[r, b, g + 6])))
                                      * np.float32(((ql_b >> 4) | (((qh >> 6) & 3) << 4)) - 32))


# ----------------------------------------------------------------------------------------------------------------------
# Prefill: activations quantised to the vec_dot_type and turned back into exact floats (d*q), row by row.


@_kernel(parallel=True)
def _roundtrip_q8_0(x):
    out = np.empty_like(x)
    for i in prange(x.shape[0]):
        qs = np.empty((x.shape[1] // QK, QK), np.int8)
        d = np.empty(x.shape[1] // QK, np.float32)
        _quantize_q8_0_cpu(x[i], qs, d)
        for b in range(d.shape[0]):
            for j in range(QK):
                out[i, QK * b + j] = np.float32(qs[b, j]) * d[b]
    return out


@_kernel(parallel=True)
def _roundtrip_q8_1(x):
    """Also returns s - sum(d*q) per block: ggml's Q4_1/Q5_1 dot uses the min term m*s with s rounded to f16."""
    out = np.empty_like(x)
    s_excess = np.empty((x.shape[0], x.shape[1] // QK), np.float32)
    for i in prange(x.shape[0]):
        qs = np.empty((x.shape[1] // QK, QK), np.int8)
        d = np.empty(x.shape[1] // QK, np.float32)
        s = np.empty(x.shape[1] // QK, np.float32)
        _quantize_q8_1_cpu(x[i], qs, d, s)
        for b in range(d.shape[0]):
            total = 0.0
            for j in range(QK):
                v = np.float32(qs[b, j]) * d[b]
                out[i, QK * b + j] = v
                total += v
            s_excess[i, b] = np.float32(s[b] - total)
    return out, s_excess


@_kernel(parallel=True)
def _roundtrip_q8_k(x):
    out = np.empty_like(x)
    for i in prange(x.shape[0]):
        qs = np.empty((x.shape[1] // QK_K, QK_K), np.int8)
        d = np.empty(x.shape[1] // QK_K, np.float32)
        bsums = np.empty((x.shape[1] // QK_K, QK_K // 16), np.int32)
        _quantize_q8_k(x[i], qs, d, bsums)
        for b in range(d.shape[0]):
            for j in range(QK_K):
                out[i, QK_K * b + j] = d[b] * np.float32(qs[b, j])
    return out


def _round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (half to even, nan kept quiet) as float32: ggml_compute_fp32_to_bf16."""
    bits = x.view(np.uint32).astype(np.uint64)
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    rounded = np.where(is_nan, (bits & 0xFFFF0000) | (64 << 16), rounded)
    return rounded.astype(np.uint32).view(np.float32)


def _roundtrip_f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def _roundtrip_f32(x: np.ndarray) -> np.ndarray:
    return x


# ----------------------------------------------------------------------------------------------------------------------
# Dense weights (F32/F16/BF16): numpy does the conversion, BLAS the products.


def _dense_rows(dense: np.ndarray, qtype: QT, rows) -> np.ndarray:
    part = dense if rows is None else dense[rows]
    if qtype == QT.F32:
        return np.array(part, dtype=np.float32, copy=rows is None)
    if qtype == QT.F16:
        return part.view(np.float16).astype(np.float32)
    return (part.astype(np.uint32) << 16).view(np.float32)  # BF16


# ----------------------------------------------------------------------------------------------------------------------
# The per-type table. Adding a type (MXFP4, NVFP4, ...) = a dot + matvec kernel, a dequant kernel and one entry here.


@dataclass(frozen=True)
class _TypeKernels:
    act_type: QT                 # ggml's vec_dot_type: what the activation is quantised to
    matvec: Callable | None      # (blocks view, x, F16_TO_F32) -> (rows,); None: dense BLAS path
    matmul: Callable | None      # (blocks view, X, F16_TO_F32) -> (n, rows) bit-identical to llama.cpp's batched
                                 # product, or None: dequantise + BLAS
    dequant: Callable | None     # (blocks view, row indices, F16_TO_F32, out) -> None; None: dense
    roundtrip: Callable          # float32 (n, cols) -> activations as the kernels see them (float32 d*q)
    min_offset: int = -1         # byte offset of the f16 block min for Q8_1 weight types (s correction), else -1


# Q4_K/Q2_K matrices with rows % 8 == 0 are repacked by ggml-cpu; kernels_repack follows those kernels' order.
from .kernels_repack import matmul_q2_k, matmul_q4_k, matvec_q2_k, matvec_q4_k  # noqa: E402  (uses the helpers above)

# K-quant weights ggml-cpu does not repack go through its tiled matmul from 8 activation rows on.
from .kernels_tiled import matmul_tiled_q3_k, matmul_tiled_q5_k, matmul_tiled_q6_k  # noqa: E402

_TYPES: dict[QT, _TypeKernels] = {
    QT.F32: _TypeKernels(QT.F32, None, None, None, _roundtrip_f32),
    QT.F16: _TypeKernels(QT.F16, None, None, None, _roundtrip_f16),
    QT.BF16: _TypeKernels(QT.BF16, None, None, None, _round_bf16),
    QT.Q4_0: _TypeKernels(QT.Q8_0, _matvec_q4_0, _matmul_q4_0, _dequant_q4_0, _roundtrip_q8_0),
    QT.Q4_1: _TypeKernels(QT.Q8_1, _matvec_q4_1, _matmul_q4_1_lanes, _dequant_q4_1, _roundtrip_q8_1, min_offset=2),
    QT.Q5_0: _TypeKernels(QT.Q8_0, _matvec_q5_0, _matmul_q5_0, _dequant_q5_0, _roundtrip_q8_0),
    QT.Q5_1: _TypeKernels(QT.Q8_1, _matvec_q5_1, _matmul_q5_1_lanes, _dequant_q5_1, _roundtrip_q8_1, min_offset=2),
    QT.Q8_0: _TypeKernels(QT.Q8_0, _matvec_q8_0, _matmul_q8_0, _dequant_q8_0, _roundtrip_q8_0),
    QT.Q2_K: _TypeKernels(QT.Q8_K, matvec_q2_k, matmul_q2_k, _dequant_q2_k, _roundtrip_q8_k),
    QT.Q3_K: _TypeKernels(QT.Q8_K, _matvec_q3_k, matmul_tiled_q3_k, _dequant_q3_k, _roundtrip_q8_k),
    QT.Q4_K: _TypeKernels(QT.Q8_K, matvec_q4_k, matmul_q4_k, _dequant_q4_k, _roundtrip_q8_k),
    QT.Q5_K: _TypeKernels(QT.Q8_K, _matvec_q5_k, matmul_tiled_q5_k, _dequant_q5_k, _roundtrip_q8_k),
    QT.Q6_K: _TypeKernels(QT.Q8_K, _matvec_q6_k, matmul_tiled_q6_k, _dequant_q6_k, _roundtrip_q8_k),
}

SUPPORTED_TYPES = frozenset(_TYPES)
# NVFP4/MXFP4 (kernels_fp4.py, tested in tests/test_fp4.py); not yet in SUPPORTED_TYPES, which tests/test_kernels.py
# parametrizes over and whose random-block generator does not know their scale fields yet.
from .kernels_fp4 import FP4_KERNELS  # noqa: E402  (built from the helpers above)

_TYPES.update(FP4_KERNELS)

# On an AVX2 build of ggml-cpu the decode products of Q4_0/Q5_0/Q8_0 (ggml_vec_dot_*_q8_0 / the repacked Q4_0 gemv)
# are summed in the prefill kernels' order, not the one-sum-per-block order of the matvec kernels above: kernels_avx2
# has them (and explains what ggml runs for each n there), and the prefill products in the same float order as
# _gemm_q32 with AVX2 integer sums (_gemm_q32_float otherwise, without VNNI). Q4_1 is already ggml's AVX2 code, and
# so is Q5_1's prefill (_gemm_q32 in Q4_1's lane order); Q5_1's decode dot (_dot_q5_1, a different lane order, kept on
# AVX512) is replaced by kernels_avx2._matvec_q5_1 (ggml_vec_dot_q5_1_q8_1's AVX2 order; matmul uses it for n < 4).
from . import isa  # noqa: E402

# On AVX512 the decode dots are the same AVX2 code (isa.X86_AVX2_DOTS); only the batched products keep kernels.py's
# VNNI integer sums there (same float order as tinyBLAS / the repacked gemm of an AVX512 build).
if isa.X86_AVX2_DOTS:
    from . import kernels_avx2  # noqa: E402

    _AVX2_BUILD = isa.LEVEL == "avx2"
    for _qt, _mv, _mm in ((QT.Q4_0, kernels_avx2._matvec_q4_0, kernels_avx2.matmul_q4_0),
                          (QT.Q5_0, kernels_avx2._matvec_q5_0, kernels_avx2.matmul_q5_0),
                          (QT.Q8_0, kernels_avx2._matvec_q8_0, kernels_avx2.matmul_q8_0),
                          (QT.Q5_1, kernels_avx2._matvec_q5_1, _TYPES[QT.Q5_1].matmul)):
        _TYPES[_qt] = _TypeKernels(_TYPES[_qt].act_type, _mv, _mm if _AVX2_BUILD else _TYPES[_qt].matmul,
                                   _TYPES[_qt].dequant, _TYPES[_qt].roundtrip, _TYPES[_qt].min_offset)

# K-quants on an AVX2-or-better build: ggml_vec_dot_q*_K_q8_K's 8-lane order for decode and batches below 8 rows;
# Q2_K is repacked on AVX512 (kernels_repack, above), so AVX2_KQUANT leaves it out there; see kernels_kquant_avx2.
if isa.X86_AVX2_DOTS:
    from .kernels_kquant_avx2 import AVX2_KQUANT  # noqa: E402

    for _qt, (_mv, _mm) in AVX2_KQUANT.items():
        _TYPES[_qt] = _TypeKernels(_TYPES[_qt].act_type, _mv, _mm, _TYPES[_qt].dequant, _TYPES[_qt].roundtrip,
                                   _TYPES[_qt].min_offset)
_DENSE_DTYPES = {QT.F32: np.float32, QT.F16: np.uint16, QT.BF16: np.uint16}


# ----------------------------------------------------------------------------------------------------------------------
# Public API


class QTensor:
    """A 2-D weight matrix stored in a ggml type, backed by (a view into) the mmap; no copy.

    data: uint8 (rows, row_bytes) as gguf.GGUFReader gives for quantised tensors, or for F32/F16/BF16 the natural
    dtype (rows, cols); shape = (rows, cols), i.e. the tensor's ggml ne reversed.
    """

    __slots__ = ("data", "qtype", "shape", "nbytes", "_view")

    def __init__(self, data: np.ndarray, qtype: QT, shape: tuple[int, int]):
        qtype = QT(qtype)
        if qtype not in _TYPES:
            raise LlmqError(f"tensor type {qtype.name} is not supported by the runtime "
                            f"(supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))})")
        rows, cols = (int(n) for n in shape)
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        if cols % block:
            raise LlmqError(f"{qtype.name} tensor of shape {rows}x{cols}: {cols} columns is not a multiple of {block}")
        raw = np.ascontiguousarray(data)  # a view for anything the reader gives
        if raw.nbytes != rows * (cols // block) * block_bytes:
            raise LlmqError(f"{qtype.name} tensor of shape {rows}x{cols} needs {rows * (cols // block) * block_bytes} "
                            f"bytes, got {raw.nbytes}")
        raw = raw.reshape(-1).view(np.uint8).reshape(rows, -1)
        self.data = raw
        self.qtype = qtype
        self.shape = (rows, cols)
        self.nbytes = raw.nbytes
        if qtype in _DENSE_DTYPES:
            self._view = raw.view(_DENSE_DTYPES[qtype])
        else:
            self._view = raw.reshape(rows, cols // block, block_bytes)
        self._view.flags.writeable = False  # one compiled signature, whether the data is a read-only mmap or not

    @classmethod
    def from_gguf(cls, tensor) -> QTensor:
        """From a gguf.ReaderTensor (2-D)."""
        cols, rows = (int(n) for n in tensor.shape)
        return cls(tensor.data, tensor.tensor_type, (rows, cols))

    def __repr__(self) -> str:
        return f"QTensor({self.qtype.name}, {self.shape[0]}x{self.shape[1]})"


def _as_rows(x: np.ndarray, cols: int, what: str) -> np.ndarray:
    x = np.require(x, dtype=np.float32, requirements=["C", "W"])  # a single compiled signature per kernel
    if x.shape[-1] != cols:
        raise ValueError(f"{what}: activation has {x.shape[-1]} columns, weight has {cols}")
    return x


# The fused decode step (decode.py) runs its products on all threads itself; this is for the op-by-op path (other
# cache types, biases, hooks). Waking the sleeping workers costs ~5 us, more than it saves on the smallest products.
_PARALLEL_MATVEC_BYTES = 256 << 10
_SERIAL: dict = {}


def serial_copy(dispatcher, **options):
    """`dispatcher`'s function compiled again without parallel=True (prange runs as range), cached under its own
    name. numba's disk cache names its files after the function and keys them by signature only, not by the compile
    options: a plain second njit of the same function shares the parallel one's entries, and whichever was saved
    last is what both load (the parallel kernel then ran on one thread)."""
    fn = dispatcher.py_func
    copy = FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__)
    copy.__qualname__ = fn.__qualname__ + "_serial"
    copy.__module__, copy.__doc__ = fn.__module__, fn.__doc__
    return njit(cache=True, **options)(copy)


def _serial(kernel: _Kernel) -> _Kernel:
    """The same kernel compiled without parallel=True (prange runs as range)."""
    if kernel not in _SERIAL:
        _SERIAL[kernel] = _Kernel(serial_copy(kernel.dispatcher, nogil=True))
    return _SERIAL[kernel]


def matvec(w: QTensor, x: np.ndarray) -> np.ndarray:
    """W @ x for one activation row x (cols,) -> (rows,), float32: the decode path."""
    x = _as_rows(x, w.shape[1], "matvec")
    if x.ndim != 1:
        raise ValueError(f"matvec: x must be 1-D, got shape {x.shape}")
    kernels = _TYPES[w.qtype]
    if kernels.matvec is not None:
        if w.nbytes < _PARALLEL_MATVEC_BYTES:
            return _serial(kernels.matvec)(w._view, x, F16_TO_F32)
        return kernels.matvec(w._view, x, F16_TO_F32)
    return _dense_matmul(w, kernels.roundtrip(x[None, :]))[0]


_SMALL_BATCH = 4  # below this many rows, per-row fused matvecs beat dequantising the whole matrix
_TILE_BYTES = 8 << 20  # float32 weight rows dequantised per BLAS call: few switches between numba and BLAS threads


def matmul(w: QTensor, x: np.ndarray) -> np.ndarray:
    """x @ W.T for activations x (n, cols) -> (n, rows), float32: the prefill path."""
    x = _as_rows(x, w.shape[1], "matmul")
    if x.ndim != 2:
        raise ValueError(f"matmul: x must be 2-D, got shape {x.shape}")
    kernels = _TYPES[w.qtype]
    if kernels.matvec is not None and x.shape[0] < _SMALL_BATCH:
        return np.stack([kernels.matvec(w._view, row, F16_TO_F32) for row in x]) if len(x) else \
            np.empty((0, w.shape[0]), np.float32)
    if kernels.matmul is not None:
        return kernels.matmul(w._view, x, F16_TO_F32)
    if kernels.dequant is None:
        return _dense_matmul(w, kernels.roundtrip(x))
    if kernels.min_offset >= 0:
        xhat, s_excess = kernels.roundtrip(x)
    else:
        xhat, s_excess = kernels.roundtrip(x), None
    rows, cols = w.shape
    out = np.empty((x.shape[0], rows), np.float32)
    tile_rows = max(16, _TILE_BYTES // (4 * cols))
    tile = np.empty((min(tile_rows, rows), cols), np.float32)
    for r0 in range(0, rows, tile_rows):
        r1 = min(rows, r0 + tile_rows)
        kernels.dequant(w._view, np.arange(r0, r1), F16_TO_F32, tile)
        np.matmul(xhat, tile[: r1 - r0].T, out=out[:, r0:r1])
    if s_excess is not None:
        # ggml adds m*s per block where s = f16(d*sum(q)); the dequantised product above used m*sum(d*q).
        mins = w._view[:, :, kernels.min_offset:kernels.min_offset + 2].copy().view(np.float16)[:, :, 0]
        out += s_excess @ mins.astype(np.float32).T
    return out


def _dense_matmul(w: QTensor, xhat: np.ndarray) -> np.ndarray:
    rows, cols = w.shape
    if w.qtype == QT.F32:
        return xhat @ w._view.T
    out = np.empty((xhat.shape[0], rows), np.float32)
    tile_rows = max(16, _TILE_BYTES // (4 * cols))
    for r0 in range(0, rows, tile_rows):
        r1 = min(rows, r0 + tile_rows)
        np.matmul(xhat, _dense_rows(w._view[r0:r1], w.qtype, None).T, out=out[:, r0:r1])
    return out


def dequantize(w: QTensor, rows=None) -> np.ndarray:
    """float32 (len(rows), cols) for the given row indices (an embedding lookup), or the whole matrix."""
    kernels = _TYPES[w.qtype]
    if kernels.dequant is None:
        return _dense_rows(w._view, w.qtype, None if rows is None else np.asarray(rows, dtype=np.int64))
    index = np.arange(w.shape[0]) if rows is None else np.require(np.reshape(rows, -1), np.int64, ["C", "W"])
    if index.size and (index.min() < 0 or index.max() >= w.shape[0]):
        raise IndexError(f"row index out of range for {w!r}")
    out = np.empty((index.size, w.shape[1]), np.float32)
    kernels.dequant(w._view, index, F16_TO_F32, out)
    return out


def quantize_activation(x: np.ndarray, weight_type: QT) -> np.ndarray:
    """x (..., cols) as the dot products with a `weight_type` matrix see it: quantised to that type's vec_dot_type the
    way llama.cpp's x86 CPU backend does, and back to float32 (exact d*q values). E.g. a query against a q8_0 or q4_0
    K cache: quantize_activation(q, QT.Q8_0)."""
    kernels = _TYPES[QT(weight_type)]
    x = np.asarray(x, dtype=np.float32)
    out = kernels.roundtrip(np.require(x.reshape(-1, x.shape[-1]), np.float32, ["C", "W"]))
    return (out[0] if kernels.min_offset >= 0 else out).reshape(x.shape)


# ----------------------------------------------------------------------------------------------------------------------
# KV-cache codecs (llama.cpp --cache-type-k/-v q8_0 / q4_0): float32 rows <-> packed ggml blocks.


@_kernel(parallel=True)
def _pack_q8_0(x, ref):
    nb = x.shape[1] // QK
    out = np.empty((x.shape[0], nb * 34), np.uint8)
    for i in prange(x.shape[0]):
        for b in range(nb):
            amax = np.float32(0.0)
            for j in range(QK):
                amax = max(amax, abs(x[i, QK * b + j]))
            d = amax / np.float32(127.0)
            bits = _f16_bits(d)
            out[i, 34 * b] = bits & 255
            out[i, 34 * b + 1] = bits >> 8
            if ref:  # quantize_row_q8_0_ref: multiply by 1/d, round half away from zero
                iscale = np.float32(1.0) / d if d != 0 else np.float32(0.0)
                for j in range(QK):
                    v = np.float64(x[i, QK * b + j] * iscale)
                    q = math.floor(abs(v) + 0.5)
                    out[i, 34 * b + 2 + j] = np.int64(q if v >= 0 else -q) & 255
            else:  # ggml-cpu x86 quantize_row_q8_0: multiply by 127/amax, round half to even
                iscale = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
                for j in range(QK):
                    q = min(127.0, max(-128.0, np.rint(x[i, QK * b + j] * iscale)))
                    out[i, 34 * b + 2 + j] = np.int64(q) & 255
    return out


@_kernel(parallel=True)
def _pack_q4_0(x):
    nb = x.shape[1] // QK
    out = np.empty((x.shape[0], nb * 18), np.uint8)
    for i in prange(x.shape[0]):
        for b in range(nb):
            amax = np.float32(0.0)
            vmax = np.float32(0.0)
            for j in range(QK):
                if amax < abs(x[i, QK * b + j]):
                    amax = abs(x[i, QK * b + j])
                    vmax = x[i, QK * b + j]
            d = vmax / np.float32(-8.0)
            bits = _f16_bits(d)
            out[i, 18 * b] = bits & 255
            out[i, 18 * b + 1] = bits >> 8
            iscale = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            for j in range(16):
                lo = min(15, np.int32(x[i, QK * b + j] * iscale + np.float32(8.5)))  # C's (int8_t) truncates
                hi = min(15, np.int32(x[i, QK * b + 16 + j] * iscale + np.float32(8.5)))
                out[i, 18 * b + 2 + j] = lo | (hi << 4)
    return out


def _as_block_rows(x: np.ndarray) -> np.ndarray:
    x = np.require(x, dtype=np.float32, requirements=["C", "W"])
    if x.ndim != 2 or x.shape[1] % QK:
        raise ValueError(f"expected float32 rows (n, k) with k a multiple of {QK}, got shape {x.shape}")
    return x


def quantize_rows_q8_0(x: np.ndarray, ref: bool = True) -> np.ndarray:
    """float32 (n, k) -> Q8_0 blocks uint8 (n, k/32*34).

    ref=True is ggml's quantize_row_q8_0_ref (what gguf-py and the converters write). ref=False is what llama.cpp's
    CPU backend does on x86 when it writes a q8_0 KV cache (set_rows uses quantize_row_q8_0, AVX path: scale 127/amax,
    round half to even); the two differ only on rounding ties and in the last bit of the scale.
    """
    return _pack_q8_0(_as_block_rows(x), ref)


def quantize_rows_q4_0(x: np.ndarray) -> np.ndarray:
    """float32 (n, k) -> Q4_0 blocks uint8 (n, k/32*18), bit-exact with quantize_row_q4_0_ref (llama.cpp uses the
    reference for q4_0 on every CPU, KV cache included)."""
    return _pack_q4_0(_as_block_rows(x))


def dequantize_rows_q8_0(blocks: np.ndarray) -> np.ndarray:
    """Q8_0 blocks uint8 (n, k/32*34) -> float32 (n, k)."""
    return dequantize_rows(blocks, QT.Q8_0)


def dequantize_rows_q4_0(blocks: np.ndarray) -> np.ndarray:
    """Q4_0 blocks uint8 (n, k/32*18) -> float32 (n, k)."""
    return dequantize_rows(blocks, QT.Q4_0)


def dequantize_rows(blocks: np.ndarray, qtype: QT) -> np.ndarray:
    """Packed rows uint8 (n, row_bytes) of any supported type -> float32 (n, cols)."""
    qtype = QT(qtype)
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = np.ascontiguousarray(blocks).view(np.uint8)
    rows = blocks.shape[0]
    return dequantize(QTensor(blocks, qtype, (rows, blocks.size // rows // block_bytes * block)))


# ----------------------------------------------------------------------------------------------------------------------
# Threads


# libgomp (numba's "omp" threading layer) lets idle workers spin between parallel regions unless told otherwise. On a
# machine with other busy processes a spinning worker then holds the core the thread it waits for needs, and every
# parallel region costs a scheduler tick: an empty 2-thread region took 8 ms instead of 5 us (one other busy process
# on 2 cores), a decode step ~1 s instead of 25 ms. Sleeping workers cost a few microseconds to wake. libgomp reads
# this once, when it is loaded: when numba first starts its threads (runtime.load_gguf's set_num_threads, or the
# first parallel kernel), so it is set before that; a user's value wins. The threads are not started at import:
# llama.cpp's ggml-cpu shares the process's libgomp, and a process that imports the runtime only to drive llama.cpp
# (the llama.cpp engine, bench/runtime.py's llama.cpp child) must leave it to llama.cpp with its own default.
# Sleeping at once, though, makes every parallel region wake its workers through the kernel: a decode step has ~200
# regions (30 layers), and a short spin first (GOMP_SPINCOUNT, honoured by libgomp under PASSIVE too; ~30-100 us)
# catches the next region without holding a busy machine's core for long: SmolLM2 Q4_0 decode 37 -> 44 tok/s here.
OMP_WAIT_POLICY_SET_HERE = "OMP_WAIT_POLICY" not in os.environ  # llamacpp_engine undoes it for llama.cpp's own threads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
GOMP_SPINCOUNT = "30000"
GOMP_SPINCOUNT_SET_HERE = OMP_WAIT_POLICY_SET_HERE and "GOMP_SPINCOUNT" not in os.environ
if GOMP_SPINCOUNT_SET_HERE:
    os.environ["GOMP_SPINCOUNT"] = GOMP_SPINCOUNT


def physical_cores() -> int:
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:
        cpus = set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def set_num_threads(n: int) -> None:
    """Threads for the numba kernels (capped at numba's pool size) and, when it can be reached, OpenBLAS."""
    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    _set_blas_threads(n)


def get_num_threads() -> int:
    return numba.get_num_threads()


def _set_blas_threads(n: int) -> None:
    import ctypes
    import glob

    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), "..", "numpy.libs", "libscipy_openblas*.so*"))
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                return


# ----------------------------------------------------------------------------------------------------------------------
# python -m runtime.kernels [TYPE ...]: decode throughput on SmolLM2-135M shapes against the machine's read bandwidth.


@njit(parallel=True, cache=True)
def _read_all(a):
    partial = np.zeros(a.shape[0], np.uint64)
    for i in prange(a.shape[0]):
        total = np.uint64(0)
        for j in range(a.shape[1]):
            total += a[i, j]
        partial[i] = total
    return partial.sum()


# Byte offsets of the f16 scale fields in each block (see the layouts at the top).
_F16_FIELDS = {QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q5_0: (0,), QT.Q5_1: (0, 2), QT.Q8_0: (0,), QT.Q2_K: (80, 82),
               QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,)}


def _benchmark(type_names: list[str]) -> None:
    import sys
    import time

    def best_time(fn, seconds=2.0):
        fn()
        best, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < seconds:
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best

    rng = np.random.default_rng(0)
    print(f"threads: {get_num_threads()}")
    for mib in (32, 1024):
        a = np.ones(((mib << 20) // 8 // 4096, 4096), np.uint64)
        print(f"read bandwidth ({mib} MiB array): {a.nbytes / best_time(lambda: _read_all(a)) / 1e9:.1f} GB/s")
    types = [QT[name] for name in type_names] or [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q6_K]
    for qtype in types:
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        for rows, cols in [(576, 1536), (1536, 576), (49152, 576)]:
            if cols % block:
                continue
            data = rng.integers(0, 256, (rows, cols // block, block_bytes), dtype=np.uint8)
            for offset in _F16_FIELDS[qtype]:  # sane scales: random bits could be nan, inf or subnormal
                data[:, :, offset:offset + 2] = np.array([1e-3], np.float16).view(np.uint8)
            data = data.reshape(rows, -1)
            w = QTensor(data, qtype, (rows, cols))
            x = rng.standard_normal(cols).astype(np.float32)
            t = best_time(lambda: matvec(w, x))
            print(f"{qtype.name:5s} {rows:6d}x{cols:<5d} {t * 1e6:8.1f} us  {w.nbytes / t / 1e9:6.2f} GB/s", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    import sys

    _benchmark(sys.argv[1:])
