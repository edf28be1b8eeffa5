"""K-quant vec_dot products (Q2_K..Q6_K) in the float order of ggml-cpu's AVX2 code (isa.X86_AVX2_DOTS).

Which ggml function computes a K-quant product on an AVX2 (+FMA, F16C, no AVX512) CPU with llama-cpp-python's
-march=native libggml-cpu (ggml-cpu.c ggml_compute_forward_mul_mat, repack.cpp ggml_repack_get_optimal_repack_type,
tiled/tiled.cpp):

    weight                    n = 1 (decode)              2 <= n < 8                   n >= 8
    Q4_K, rows % 8 == 0       gemv_q4_K_8x8_q8_K          gemm (groups of 4) + gemv    same (repacked: no tiled)
    Q4_K, rows % 8 != 0       ggml_vec_dot_q4_K_q8_K      vec_dot per (row, token)     tiled (AVX2 microkernel)
    Q2_K (repacked: AVX512)   ggml_vec_dot_q2_K_q8_K      vec_dot per (row, token)     tiled
    Q3_K / Q5_K / Q6_K        ggml_vec_dot_q*_K_q8_K      vec_dot per (row, token)     tiled

The repacked Q4_K kernels (kernels_repack.py) and the tiled matmul (kernels_tiled.py: tiled_run_microtile_avx2 does
the same per-output float operations as the VNNI microkernel: float(s1)*d, fnmadd dmin*float(s2), fmadd with d8)
already match this build bit for bit. What differs is ggml_vec_dot_q*_K_q8_K (arch/x86/quants.c): it has only an
__AVX2__ branch, which keeps 8 float lanes instead of the one float sum per block of kernels.py's `_dot_q*_k`.
This module mirrors those AVX2 branches:

    per block b:  d = d8 * f16(d_w) (Q2_K/Q4_K/Q5_K also dmin = -(d8 * f16(dmin_w)))
        integer lane l (0..7) = sum over the 8 chunks c of 32 elements of
                                scale(c, l) * (q[32c+4l..32c+4l+3] . y[32c+4l..32c+4l+3])
        (maddubs + madd: lane l takes bytes 4l..4l+3 of each 32-byte chunk; scale(c, l) is the chunk's sub-block scale,
        for the 16-element types the scale of sub-block 2c + (l >= 4))
        acc[l] = fma(d, float(lane l), acc[l])
    result = hsum_float_8(acc) (+ the min terms)

    ggml_vec_dot_q2_K_q8_K   before the block's d fma: acc[l] = fma(dmin, float(m[2l]*bs[2l] + m[2l+1]*bs[2l+1]),
                             acc[l]) (m: the 4-bit mins, bs: the 16-element activation sums)
    ggml_vec_dot_q3_K_q8_K   codes q = low 2 bits - 4 * (hmask bit clear), scales 6 bit - 32; no min term
    ggml_vec_dot_q4_K_q8_K   4 min lanes acc_m[k] = fma(dmin, float(m[2k]*(bs[4k]+bs[4k+1]) + m[2k+1]*(bs[4k+2]
                             +bs[4k+3])), acc_m[k]); result = hsum_float_8(acc) + ((acc_m0+acc_m2) + (acc_m1+acc_m3))
    ggml_vec_dot_q5_K_q8_K   codes 4 bits | qh bit c << 4; one scalar min sum per row: summs = fma(dmin,
                             float(sum_k m_k*(bs[2k]+bs[2k+1])), summs) (GCC contracts `summs += dmin * ...`,
                             vfmadd231ss in the shipped libggml-cpu); result = hsum_float_8(acc) + summs
    ggml_vec_dot_q6_K_q8_K   unsigned codes 0..63; lane l also subtracts 32 * (bs[2l]*sc[2l] + bs[2l+1]*sc[2l+1])
                             (the -32 offset of chunk l's two sub-blocks, as q8sclsub) before the conversion

Every integer sum is exact (maddubs cannot saturate with these code ranges), so only the lane split and the float
operations above matter. The vec_dot functions have no AVX512 branch, so an AVX512 build runs this same order for
decode and batches below 8 rows: where isa.X86_AVX2_DOTS (ACTIVE), kernels.py replaces the matvec/matmul of its _TYPES
entries for Q2_K..Q6_K by `AVX2_KQUANT` and decode.py's fused step calls the dot_*_avx2 functions for Q2_K, Q3_K, Q5_K
and Q6_K (FUSED_MATVECS; Q4_K matrices with rows % 8 == 0 use the repacked gemv order, not fused). AVX512 builds also
repack Q2_K (rows % 8 == 0): there its entry is `matvec_q2_k_repacking` / `matmul_q2_k_repacking` and it is not fused.
Tests: tests/test_kernels_kquant_avx2.py.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from . import isa
from . import kernels_repack as _repack
from . import kernels_tiled as _tiled
from .kernels_avx2 import PREFETCH_ROWS, _prefetch_row
from .kernels import (QK_K, _byte, _f16_at, _fma, _hsum_float_8, _jit_inline, _kernel, _quantize_q8_k, _scale_q3_k,
                      _scales_mins_k4)
from .kernels_repack import REPACK_ROWS, _gemv_dot_q2_k, _gemv_dot_q4_k

ACTIVE = isa.X86_AVX2_DOTS
_Q2_K_REPACKED = isa.AVX512  # ggml repacks Q2_K (rows % 8 == 0) only on AVX512 builds: kernels_repack's order


# ----------------------------------------------------------------------------------------------------------------------
# Row dots: weight row r of w ((rows, blocks, block_bytes) uint8) against one Q8_K row (xq, xd, xbsums); lanes
# (float32[8]) and prod (int32[256]: the block's code * activation products, natural element order) are scratch owned
# by the caller. Filling prod first and then summing it lane by lane keeps both loops vectorisable.


@_jit_inline
def _lane(prod, c, l):
    """Integer lane l of the maddubs + madd of 32-element chunk c (before its scale): elements 32c+4l .. 32c+4l+3."""
    o = 32 * c + 4 * l
    return (prod[o] + prod[o + 1]) + (prod[o + 2] + prod[o + 3])


@_jit_inline
def dot_q2_k_avx2(w, r, xq, xd, xbsums, f16, lanes, prod):
    """ggml_vec_dot_q2_K_q8_K, __AVX2__ branch."""
    for l in range(8):
        lanes[l] = np.float32(0.0)
    wr = w[r]
    for b in range(wr.shape[0]):
        d = xd[b] * _f16_at(w, r, b, 80, f16)
        dmin = -(xd[b] * _f16_at(w, r, b, 82, f16))
        for n in range(2):
            for m in range(32):
                q = np.int32(wr[b, 16 + 32 * n + m])
                x0 = 128 * n + m
                prod[x0] = (q & 3) * np.int32(xq[b, x0])
                prod[x0 + 32] = ((q >> 2) & 3) * np.int32(xq[b, x0 + 32])
                prod[x0 + 64] = ((q >> 4) & 3) * np.int32(xq[b, x0 + 64])
                prod[x0 + 96] = (q >> 6) * np.int32(xq[b, x0 + 96])
        for l in range(8):
            m = ((np.int32(wr[b, 2 * l]) >> 4) * xbsums[b, 2 * l]
                 + (np.int32(wr[b, 2 * l + 1]) >> 4) * xbsums[b, 2 * l + 1])
            lanes[l] = _fma(dmin, np.float32(m), lanes[l])
        for l in range(8):
            s = np.int32(0)
            for c in range(8):
                s += (np.int32(wr[b, 2 * c + (l >> 2)]) & 15) * _lane(prod, c, l)
            lanes[l] = _fma(d, np.float32(s), lanes[l])
    return _hsum_float_8(lanes)


@_jit_inline
def dot_q3_k_avx2(w, r, xq, xd, xbsums, f16, lanes, prod):
    """ggml_vec_dot_q3_K_q8_K, __AVX2__ branch (xbsums unused)."""
    for l in range(8):
        lanes[l] = np.float32(0.0)
    wr = w[r]
    for b in range(wr.shape[0]):
        d = xd[b] * _f16_at(w, r, b, 108, f16)
        for n in range(2):
            for k in range(4):
                bit = 4 * n + k
                for m in range(32):
                    q = (np.int32(wr[b, 32 + 32 * n + m]) >> (2 * k)) & 3
                    q -= (((np.int32(wr[b, m]) >> bit) & 1) ^ 1) << 2
                    prod[128 * n + 32 * k + m] = q * np.int32(xq[b, 128 * n + 32 * k + m])
        for l in range(8):
            s = np.int32(0)
            for c in range(8):
                s += _scale_q3_k(w, r, b, 2 * c + (l >> 2)) * _lane(prod, c, l)
            lanes[l] = _fma(d, np.float32(s), lanes[l])
    return _hsum_float_8(lanes)


@_jit_inline
def dot_q4_k_avx2(w, r, xq, xd, xbsums, f16, lanes, prod):
    """ggml_vec_dot_q4_K_q8_K, __AVX2__ branch."""
    for l in range(8):
        lanes[l] = np.float32(0.0)
    m0 = m1 = m2 = m3 = np.float32(0.0)
    wr = w[r]
    for b in range(wr.shape[0]):
        scales, mins = _scales_mins_k4(w, r, b)
        d = xd[b] * _f16_at(w, r, b, 0, f16)
        dmin = -(xd[b] * _f16_at(w, r, b, 2, f16))
        p0 = _byte(mins, 0) * (xbsums[b, 0] + xbsums[b, 1]) + _byte(mins, 1) * (xbsums[b, 2] + xbsums[b, 3])
        p1 = _byte(mins, 2) * (xbsums[b, 4] + xbsums[b, 5]) + _byte(mins, 3) * (xbsums[b, 6] + xbsums[b, 7])
        p2 = _byte(mins, 4) * (xbsums[b, 8] + xbsums[b, 9]) + _byte(mins, 5) * (xbsums[b, 10] + xbsums[b, 11])
        p3 = _byte(mins, 6) * (xbsums[b, 12] + xbsums[b, 13]) + _byte(mins, 7) * (xbsums[b, 14] + xbsums[b, 15])
        m0 = _fma(dmin, np.float32(p0), m0)
        m1 = _fma(dmin, np.float32(p1), m1)
        m2 = _fma(dmin, np.float32(p2), m2)
        m3 = _fma(dmin, np.float32(p3), m3)
        for j in range(4):
            for m in range(32):
                q = np.int32(wr[b, 16 + 32 * j + m])
                prod[64 * j + m] = (q & 15) * np.int32(xq[b, 64 * j + m])
                prod[64 * j + 32 + m] = (q >> 4) * np.int32(xq[b, 64 * j + 32 + m])
        for l in range(8):
            s = np.int32(0)
            for c in range(8):
                s += _byte(scales, c) * _lane(prod, c, l)
            lanes[l] = _fma(d, np.float32(s), lanes[l])
    return _hsum_float_8(lanes) + ((m0 + m2) + (m1 + m3))


@_jit_inline
def dot_q5_k_avx2(w, r, xq, xd, xbsums, f16, lanes, prod):
    """ggml_vec_dot_q5_K_q8_K, __AVX2__ branch."""
    for l in range(8):
        lanes[l] = np.float32(0.0)
    summs = np.float32(0.0)
    wr = w[r]
    for b in range(wr.shape[0]):
        scales, mins = _scales_mins_k4(w, r, b)
        d = xd[b] * _f16_at(w, r, b, 0, f16)
        dmin = -(xd[b] * _f16_at(w, r, b, 2, f16))
        p0 = _byte(mins, 0) * (xbsums[b, 0] + xbsums[b, 1]) + _byte(mins, 1) * (xbsums[b, 2] + xbsums[b, 3])
        p1 = _byte(mins, 2) * (xbsums[b, 4] + xbsums[b, 5]) + _byte(mins, 3) * (xbsums[b, 6] + xbsums[b, 7])
        p2 = _byte(mins, 4) * (xbsums[b, 8] + xbsums[b, 9]) + _byte(mins, 5) * (xbsums[b, 10] + xbsums[b, 11])
        p3 = _byte(mins, 6) * (xbsums[b, 12] + xbsums[b, 13]) + _byte(mins, 7) * (xbsums[b, 14] + xbsums[b, 15])
        summs = _fma(dmin, np.float32(np.int32((p0 + p1) + (p2 + p3))), summs)
        for j in range(4):
            for m in range(32):
                q = np.int32(wr[b, 48 + 32 * j + m])
                qh = np.int32(wr[b, 16 + m])
                prod[64 * j + m] = ((q & 15) | (((qh >> (2 * j)) & 1) << 4)) * np.int32(xq[b, 64 * j + m])
                prod[64 * j + 32 + m] = ((q >> 4) | (((qh >> (2 * j + 1)) & 1) << 4)) * np.int32(xq[b, 64 * j + 32 + m])
        for l in range(8):
            s = np.int32(0)
            for c in range(8):
                s += _byte(scales, c) * _lane(prod, c, l)
            lanes[l] = _fma(d, np.float32(s), lanes[l])
    return _hsum_float_8(lanes) + summs


@_jit_inline
def dot_q6_k_avx2_scalar(w, r, xq, xd, xbsums, f16, lanes, prod):
    """ggml_vec_dot_q6_K_q8_K, __AVX2__ branch, written out (dot_q6_k_avx2 is the same with _q6_k_lanes)."""
    for l in range(8):
        lanes[l] = np.float32(0.0)
    wr = w[r]
    for b in range(wr.shape[0]):
        d = xd[b] * _f16_at(w, r, b, 208, f16)
        for n in range(2):
            for m in range(32):
                ql_a = np.int32(wr[b, 64 * n + m])
                ql_b = np.int32(wr[b, 64 * n + 32 + m])
                qh = np.int32(wr[b, 128 + 32 * n + m])
                x0 = 128 * n + m
                prod[x0] = ((ql_a & 15) | ((qh & 3) << 4)) * np.int32(xq[b, x0])
                prod[x0 + 32] = ((ql_b & 15) | (((qh >> 2) & 3) << 4)) * np.int32(xq[b, x0 + 32])
                prod[x0 + 64] = ((ql_a >> 4) | (((qh >> 4) & 3) << 4)) * np.int32(xq[b, x0 + 64])
                prod[x0 + 96] = ((ql_b >> 4) | ((qh >> 6) << 4)) * np.int32(xq[b, x0 + 96])
        for l in range(8):
            s = np.int32(0)
            for c in range(8):
                s += np.int32(np.int8(wr[b, 192 + 2 * c + (l >> 2)])) * _lane(prod, c, l)
            s -= 32 * (xbsums[b, 2 * l] * np.int32(np.int8(wr[b, 192 + 2 * l]))
                       + xbsums[b, 2 * l + 1] * np.int32(np.int8(wr[b, 193 + 2 * l])))
            lanes[l] = _fma(d, np.float32(s), lanes[l])
    return _hsum_float_8(lanes)


@intrinsic
def _q6_k_lanes(typingctx, w, r, b, xq, out):
    """out[0:8] = the 8 integer lanes of block b of row r in dot_q6_k_avx2_scalar before the -32 offset: lane l =
    sum over the 8 chunks c of 32 elements of scale(2c + l // 4) * (codes . activations of elements 32c + 4l..+3).
    LLVM vector code (portable): codes 0..63 times |x| <= 128 fit in i16."""
    sig = types.void(w, types.int64, types.int64, xq, out)

    def codegen(context, builder, signature, args):
        i8, i16, i32, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
        v32, v8i = ir.VectorType(i8, 32), ir.VectorType(i32, 8)
        block, xrow, out_a = _repack.block_pointers(context, builder, signature, args)

        def vec(ty, n, value):
            return ir.Constant(ir.VectorType(ty, n), [value] * n)

        def load(ptr, at, ty=v32):
            return builder.load(builder.bitcast(builder.gep(ptr, [ir.Constant(i64, at)]), ty.as_pointer()), align=1)

        def shuffle(v, idx):
            return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, len(idx)), idx))
        lanes = ir.Constant(v8i, [0] * 8)
        for n in range(2):
            ql_a, ql_b, qh = load(block, 64 * n), load(block, 64 * n + 32), load(block, 128 + 32 * n)
            low4 = vec(i8, 32, 15)
            codes = [builder.or_(builder.and_(ql_a, low4), builder.shl(builder.and_(qh, vec(i8, 32, 3)), vec(i8, 32, 4))),
                     builder.or_(builder.and_(ql_b, low4),
                                 builder.shl(builder.and_(builder.lshr(qh, vec(i8, 32, 2)), vec(i8, 32, 3)),
                                             vec(i8, 32, 4))),
                     builder.or_(builder.lshr(ql_a, vec(i8, 32, 4)),
                                 builder.shl(builder.and_(builder.lshr(qh, vec(i8, 32, 4)), vec(i8, 32, 3)),
                                             vec(i8, 32, 4))),
                     builder.or_(builder.lshr(ql_b, vec(i8, 32, 4)),
                                 builder.shl(builder.lshr(qh, vec(i8, 32, 6)), vec(i8, 32, 4)))]
            for t, q in enumerate(codes):
                c = 4 * n + t
                x = load(xrow, 32 * c)
                p = builder.sext(builder.mul(builder.zext(q, ir.VectorType(i16, 32)), builder.sext(x, ir.VectorType(i16, 32))),
                                 ir.VectorType(i32, 32))
                pairs = builder.add(shuffle(p, list(range(0, 32, 2))), shuffle(p, list(range(1, 32, 2))))
                quads = builder.add(shuffle(pairs, list(range(0, 16, 2))), shuffle(pairs, list(range(1, 16, 2))))
                sc = builder.sext(load(block, 192 + 2 * c, ir.VectorType(i8, 2)), ir.VectorType(i32, 2))
                scale = builder.shuffle_vector(sc, sc, ir.Constant(ir.VectorType(i32, 8), [0] * 4 + [1] * 4))
                lanes = builder.add(lanes, builder.mul(quads, scale))
        for l in range(8):
            builder.store(builder.extract_element(lanes, ir.Constant(i32, l)),
                          builder.gep(out_a.data, [ir.Constant(i64, l)]))
        return context.get_dummy_value()
    return sig, codegen


@_jit_inline
def dot_q6_k_avx2(w, r, xq, xd, xbsums, f16, lanes, prod):
    """ggml_vec_dot_q6_K_q8_K, __AVX2__ branch (integer lanes by _q6_k_lanes into prod[0:8])."""
    for l in range(8):
        lanes[l] = np.float32(0.0)
    for b in range(w.shape[1]):
        d = xd[b] * _f16_at(w, r, b, 208, f16)
        _q6_k_lanes(w, r, b, xq, prod)
        for l in range(8):
            s = prod[l] - 32 * (xbsums[b, 2 * l] * np.int32(np.int8(w[r, b, 192 + 2 * l]))
                                + xbsums[b, 2 * l + 1] * np.int32(np.int8(w[r, b, 193 + 2 * l])))
            lanes[l] = _fma(d, np.float32(s), lanes[l])
    return _hsum_float_8(lanes)


# ----------------------------------------------------------------------------------------------------------------------
# Decode kernels (x: one float32 row)

_ROWS_PER_TASK = 16


@_kernel(parallel=True)
def matvec_q2_k_avx2(w, x, f16):
    """W @ x, every row as ggml_vec_dot_q2_K_q8_K (AVX2)."""
    xq = np.empty((w.shape[1], QK_K), np.int8)
    xd = np.empty(w.shape[1], np.float32)
    xbsums = np.empty((w.shape[1], QK_K // 16), np.int32)
    _quantize_q8_k(x, xq, xd, xbsums)
    out = np.empty(w.shape[0], np.float32)
    for task in prange((w.shape[0] + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
        lanes = np.empty(8, np.float32)
        prod = np.empty(QK_K, np.int32)
        for r in range(task * _ROWS_PER_TASK, min(w.shape[0], (task + 1) * _ROWS_PER_TASK)):
            out[r] = dot_q2_k_avx2(w, r, xq, xd, xbsums, f16, lanes, prod)
    return out


@_kernel(parallel=True)
def matvec_q3_k_avx2(w, x, f16):
    """W @ x, every row as ggml_vec_dot_q3_K_q8_K (AVX2)."""
    xq = np.empty((w.shape[1], QK_K), np.int8)
    xd = np.empty(w.shape[1], np.float32)
    xbsums = np.empty((w.shape[1], QK_K // 16), np.int32)
    _quantize_q8_k(x, xq, xd, xbsums)
    out = np.empty(w.shape[0], np.float32)
    for task in prange((w.shape[0] + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
        lanes = np.empty(8, np.float32)
        prod = np.empty(QK_K, np.int32)
        for r in range(task * _ROWS_PER_TASK, min(w.shape[0], (task + 1) * _ROWS_PER_TASK)):
            out[r] = dot_q3_k_avx2(w, r, xq, xd, xbsums, f16, lanes, prod)
    return out


@_kernel(parallel=True)
def matvec_q4_k_avx2(w, x, f16):
    """W @ x, every row as ggml_vec_dot_q4_K_q8_K (AVX2)."""
    xq = np.empty((w.shape[1], QK_K), np.int8)
    xd = np.empty(w.shape[1], np.float32)
    xbsums = np.empty((w.shape[1], QK_K // 16), np.int32)
    _quantize_q8_k(x, xq, xd, xbsums)
    out = np.empty(w.shape[0], np.float32)
    for task in prange((w.shape[0] + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
        lanes = np.empty(8, np.float32)
        prod = np.empty(QK_K, np.int32)
        for r in range(task * _ROWS_PER_TASK, min(w.shape[0], (task + 1) * _ROWS_PER_TASK)):
            out[r] = dot_q4_k_avx2(w, r, xq, xd, xbsums, f16, lanes, prod)
    return out


@_kernel(parallel=True)
def matvec_q5_k_avx2(w, x, f16):
    """W @ x, every row as ggml_vec_dot_q5_K_q8_K (AVX2)."""
    xq = np.empty((w.shape[1], QK_K), np.int8)
    xd = np.empty(w.shape[1], np.float32)
    xbsums = np.empty((w.shape[1], QK_K // 16), np.int32)
    _quantize_q8_k(x, xq, xd, xbsums)
    out = np.empty(w.shape[0], np.float32)
    for task in prange((w.shape[0] + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
        lanes = np.empty(8, np.float32)
        prod = np.empty(QK_K, np.int32)
        for r in range(task * _ROWS_PER_TASK, min(w.shape[0], (task + 1) * _ROWS_PER_TASK)):
            out[r] = dot_q5_k_avx2(w, r, xq, xd, xbsums, f16, lanes, prod)
    return out


@_kernel(parallel=True)
def matvec_q6_k_avx2(w, x, f16):
    """W @ x, every row as ggml_vec_dot_q6_K_q8_K (AVX2)."""
    xq = np.empty((w.shape[1], QK_K), np.int8)
    xd = np.empty(w.shape[1], np.float32)
    xbsums = np.empty((w.shape[1], QK_K // 16), np.int32)
    _quantize_q8_k(x, xq, xd, xbsums)
    out = np.empty(w.shape[0], np.float32)
    for task in prange((w.shape[0] + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
        lanes = np.empty(8, np.float32)
        prod = np.empty(QK_K, np.int32)
        for r in range(task * _ROWS_PER_TASK, min(w.shape[0], (task + 1) * _ROWS_PER_TASK)):
            out[r] = dot_q6_k_avx2(w, r, xq, xd, xbsums, f16, lanes, prod)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Entry points for kernels._TYPES (blocks view, x, F16_TO_F32) -> float32, where ggml sends each product on AVX2


def _repacking_matvec(qtype):
    """W @ x where ggml repacks W when its row count is divisible by 8: the repacked gemv's order then, else the
    AVX2 vec_dot's. The closure holds only the type's number: numba keys a closure's disk cache by its pickled cell
    contents, and a captured dispatcher pickles differently in every process (no cache hit, a compile per run)."""
    q4_k = qtype == QT.Q4_K

    @_kernel(parallel=True)
    def matvec(w, x, f16):
        xq = np.empty((w.shape[1], QK_K), np.int8)
        xd = np.empty(w.shape[1], np.float32)
        xbsums = np.empty((w.shape[1], QK_K // 16), np.int32)
        _quantize_q8_k(x, xq, xd, xbsums)
        repacked = w.shape[0] % REPACK_ROWS == 0
        out = np.empty(w.shape[0], np.float32)
        for task in prange((w.shape[0] + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
            lanes = np.empty(8, np.float32)
            prod = np.empty(QK_K, np.int32)
            for r in range(task * _ROWS_PER_TASK, min(w.shape[0], (task + 1) * _ROWS_PER_TASK)):
                _prefetch_row(w, r + PREFETCH_ROWS)
                if q4_k:
                    if repacked:
                        out[r] = _gemv_dot_q4_k(w, r, xq, xd, xbsums, f16)
                    else:
                        out[r] = dot_q4_k_avx2(w, r, xq, xd, xbsums, f16, lanes, prod)
                elif repacked:
                    out[r] = _gemv_dot_q2_k(w, r, xq, xd, xbsums, f16)
                else:
                    out[r] = dot_q2_k_avx2(w, r, xq, xd, xbsums, f16, lanes, prod)
        return out
    return matvec


# Decode: ggml's repacked gemv order when W has a row count divisible by 8 (kernels_repack), else
# ggml_vec_dot_q4_K_q8_K (AVX2).
matvec_q4_k = _repacking_matvec(QT.Q4_K)


def matmul_q4_k(w, x, f16):
    """Prefill: ggml's repacked gemm/gemv (rows % 8 == 0), else the tiled matmul from 8 rows, vec_dot below."""
    if w.shape[0] % REPACK_ROWS == 0:
        return _repack.matmul_q4_k(w, x, f16)
    return _matmul_q4_k_unpacked(w, x, f16)


_matmul_q4_k_unpacked = _tiled._entry(QT.Q4_K, matvec_q4_k_avx2)
matmul_q2_k = _tiled._entry(QT.Q2_K, matvec_q2_k_avx2)  # no Q2_K repack without AVX512


# Decode on AVX512 builds, which repack Q2_K: the gemv order for rows % 8 == 0, else the AVX2 vec_dot.
matvec_q2_k_repacking = _repacking_matvec(QT.Q2_K)


def matmul_q2_k_repacking(w, x, f16):
    """Prefill on AVX512 builds: the repacked gemm/gemv (rows % 8 == 0), else the tiled matmul / AVX2 vec_dot."""
    if w.shape[0] % REPACK_ROWS == 0:
        return _repack.matmul_q2_k(w, x, f16)
    return matmul_q2_k(w, x, f16)


matmul_q3_k = _tiled._entry(QT.Q3_K, matvec_q3_k_avx2)
matmul_q5_k = _tiled._entry(QT.Q5_K, matvec_q5_k_avx2)
matmul_q6_k = _tiled._entry(QT.Q6_K, matvec_q6_k_avx2)

# what kernels.py puts in _TYPES on an AVX2 CPU: (matvec, matmul) per type
AVX2_KQUANT = {
    QT.Q2_K: (matvec_q2_k_avx2, matmul_q2_k),
    QT.Q3_K: (matvec_q3_k_avx2, matmul_q3_k),
    QT.Q4_K: (matvec_q4_k, matmul_q4_k),
    QT.Q5_K: (matvec_q5_k_avx2, matmul_q5_k),
    QT.Q6_K: (matvec_q6_k_avx2, matmul_q6_k),
}
# the matvec kernels decode.py's fused step mirrors with the dot_*_avx2 functions above (Q4_K: see kernels_repack)
FUSED_MATVECS = {QT.Q2_K: matvec_q2_k_avx2, QT.Q3_K: matvec_q3_k_avx2, QT.Q5_K: matvec_q5_k_avx2,
                 QT.Q6_K: matvec_q6_k_avx2}
if _Q2_K_REPACKED:  # the fused decode step handles neither order switch: Q2_K decode runs unfused there
    AVX2_KQUANT[QT.Q2_K] = (matvec_q2_k_repacking, matmul_q2_k_repacking)
    del FUSED_MATVECS[QT.Q2_K]
