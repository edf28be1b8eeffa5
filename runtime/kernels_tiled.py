"""K-quant prefill (Q2_K..Q6_K weights, batches of 8+ rows) bit for bit as llama.cpp's "tiled" CPU matmul.

What ggml-cpu does (ggml/src/ggml-cpu/tiled/, run before every other mul_mat path for K-quant weights outside a repack
buffer when the batch has >= 8 rows; on this AVX512-VNNI CPU the microkernel is tiled_run_micro_vnni_8x16):
the activation rows are quantised to Q8_K, the weight blocks are unpacked into unsigned codes (a per-type BIAS
centres them), per-sub-block scales and (Q2_K/Q4_K/Q5_K) mins, and for every (weight row r, activation row t)
the 256-element blocks ("slabs") b are accumulated in order:

    s1     = sum_s scale_s * sum_{e in s} (code_e - BIAS) * y_e          exact int32
    s2     = sum_s min_s * bsum_s                                         exact int32 (bsum_s = sum of s's y_e)
    result = float(s1) * d_b                                              float32 multiply
    result = fma(-dmin_b, float(s2), result)                              one rounding (vfnmadd), types with mins
    out    = fma(result, d8_b, out)                                       one rounding: GCC contracted the
                                                                          `buf + result*d1` of the source
                                                                          (vfmadd213ps in the shipped libggml-cpu)

    type   SUBBLK  BIAS  code                                    scale (min)
    Q2_K     16     0    2 bits                                  low nibble (high nibble)
    Q3_K     16     4    2 low bits | hmask bit << 2             6 bits - 32
    Q4_K     32     0    4 bits                                  6 bits (6 bits)
    Q5_K     32     0    4 low bits | qh bit << 4                6 bits (6 bits)
    Q6_K     16    32    4 low bits | 2 high bits << 4           int8

Codes are in the natural element order of the dequantisers (ggml's tiled_unpack_src0 overloads). Window sizes,
16x16 microtiles, the narrow path for <= 16 activation rows and thread chunking only decide which (r, t) pairs are
computed together: every output still sums its slabs in order with the operations above, so the result does not
depend on them. The integer sums are the same in any grouping, which this kernel uses: a 32-element sub-block is
two 16-element ones with the same scale and min.

`matmul_tiled(w_view, x, f16, qtype)` is the numba kernel: tiles of 32 weight rows in parallel, each swept slab by
slab, 4 weight rows at a time, across all activation rows. The 16-element integer sums are done in float32 (exact:
they stay below 2^24), vectorised over the activation rows, whose Q8_K codes are stored transposed for that; LLVM
stops vectorising these loops (too many runtime alias checks) beyond 4 weight rows x 4 elements per pass.
(Handing the integer sums to float32 BLAS instead, exact while partial sums stay below 2^24, ran 1.2-2x faster on one
thread, but alternating numba and OpenBLAS thread pools per slab stalled it 3-6x on a busy 2-core machine.)
`matmul_tiled_ref` is the plain numpy version of the same arithmetic. Batches below 8 rows are not tiled in llama.cpp
(ggml_vec_dot per row): the per-type entry points `matmul_tiled_q*_k` send them to the runtime's matvec kernels.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .kernels import (QK_K, _byte, _f16_at, _fma, _jit_inline, _kernel, _matvec_q2_k, _matvec_q3_k, _matvec_q4_k,
                      _matvec_q5_k, _matvec_q6_k, _quantize_q8_k, _scale_q3_k, _scales_mins_k4)
from .gemm_int8 import HAVE_VNNI, declare_vpdpbusd, splat16

TILED_MIN_BATCH = 8  # ggml_tiled_min_batch: fewer activation rows go through ggml_vec_dot
_SUB = 16             # elements per integer sub-sum here (Q4_K/Q5_K's 32-element sub-blocks are two of them)
_NSUB = QK_K // _SUB
_ROW_TILE = 32        # weight rows per parallel task
_ROW_GROUP = 4        # weight rows sharing each pass over the activations

_KIND_Q2_K, _KIND_Q3_K, _KIND_Q4_K, _KIND_Q5_K, _KIND_Q6_K = range(5)
_KIND = {QT.Q2_K: _KIND_Q2_K, QT.Q3_K: _KIND_Q3_K, QT.Q4_K: _KIND_Q4_K, QT.Q5_K: _KIND_Q5_K, QT.Q6_K: _KIND_Q6_K}


# ----------------------------------------------------------------------------------------------------------------------
# numba kernel


@_jit_inline
def _unpack_block(w, r, b, kind, f16, codes, scales, mins, d, dmin, i):
    """Block b of weight row r into row i: codes (rows, 256) debiased (code - BIAS) as float32 integers, scales
    and mins (rows, 16) per 16 elements, d/dmin (rows,) float32."""
    if kind == _KIND_Q6_K:
        d[i] = _f16_at(w, r, b, 208, f16)
        for h in range(2):
            for l in range(32):
                ql_a = np.int32(w[r, b, 64 * h + l])
                ql_b = np.int32(w[r, b, 64 * h + 32 + l])
                qh = np.int32(w[r, b, 128 + 32 * h + l])
                e = 128 * h + l
                codes[i, e] = ((ql_a & 15) | ((qh & 3) << 4)) - 32
                codes[i, e + 32] = ((ql_b & 15) | (((qh >> 2) & 3) << 4)) - 32
                codes[i, e + 64] = ((ql_a >> 4) | (((qh >> 4) & 3) << 4)) - 32
                codes[i, e + 96] = ((ql_b >> 4) | (((qh >> 6) & 3) << 4)) - 32
        for s in range(_NSUB):
            scales[i, s] = np.int8(w[r, b, 192 + s])
    elif kind == _KIND_Q3_K:
        d[i] = _f16_at(w, r, b, 108, f16)
        for e in range(QK_K):
            half, group, l = e >> 7, (e >> 5) & 3, e & 31
            low = (np.int32(w[r, b, 32 + 32 * half + l]) >> (2 * group)) & 3
            high = (np.int32(w[r, b, l]) >> (4 * half + group)) & 1
            codes[i, e] = (low | (high << 2)) - 4
        for s in range(_NSUB):
            scales[i, s] = _scale_q3_k(w, r, b, s)
    elif kind == _KIND_Q2_K:
        d[i] = _f16_at(w, r, b, 80, f16)
        dmin[i] = _f16_at(w, r, b, 82, f16)
        for e in range(QK_K):
            codes[i, e] = (np.int32(w[r, b, 16 + 32 * (e >> 7) + (e & 31)]) >> (2 * ((e >> 5) & 3))) & 3
        for s in range(_NSUB):
            scales[i, s] = np.int32(w[r, b, s]) & 15
            mins[i, s] = np.int32(w[r, b, s]) >> 4
    else:  # Q4_K, Q5_K: 32-element sub-blocks j, nibbles of 32 bytes per 64 elements
        d[i] = _f16_at(w, r, b, 0, f16)
        dmin[i] = _f16_at(w, r, b, 2, f16)
        packed_scales, packed_mins = _scales_mins_k4(w, r, b)
        qs = 48 if kind == _KIND_Q5_K else 16
        for j in range(8):
            scales[i, 2 * j] = scales[i, 2 * j + 1] = _byte(packed_scales, j)
            mins[i, 2 * j] = mins[i, 2 * j + 1] = _byte(packed_mins, j)
            for l in range(32):
                q = (np.int32(w[r, b, qs + 32 * (j >> 1) + l]) >> (4 * (j & 1))) & 15
                if kind == _KIND_Q5_K:
                    q |= ((np.int32(w[r, b, 16 + l]) >> j) & 1) << 4
                codes[i, 32 * j + l] = q


@_jit_inline
def _slab_rows(codes, scales, mins, d, dmin, with_min, y, yd, ybsums, acc, s1, s2, sums):
    """One slab of 4 weight rows against every activation row: acc[g, t] = fma(result, d8[t], acc[g, t]).
    codes (4, 256), scales/mins (4, 16), d/dmin (4,) of the weight rows; y (256, n) float32 integers, yd (n,) and
    ybsums (16, n) of the activation rows' Q8_K block; s1/s2 (4, n) int32 and sums (4, n) float32 scratch.
    The loops run over activation rows: long, and vectorised."""
    n = y.shape[1]
    a0, a1, a2, a3 = sums[0], sums[1], sums[2], sums[3]
    s1[:] = 0
    for s in range(_NSUB):
        # sums of <= 16 products of |code| <= 32 and |y| <= 127, and their products with |scale| <= 128, are
        # integers below 2^24: exact in float32 in any order
        sums[:] = 0
        for e in range(_SUB * s, _SUB * (s + 1), 4):
            y0, y1, y2, y3 = y[e], y[e + 1], y[e + 2], y[e + 3]
            c0, c1, c2, c3 = codes[0, e:e + 4], codes[1, e:e + 4], codes[2, e:e + 4], codes[3, e:e + 4]
            for t in range(n):
                a0[t] = _fma(c0[3], y3[t], _fma(c0[2], y2[t], _fma(c0[1], y1[t], _fma(c0[0], y0[t], a0[t]))))
                a1[t] = _fma(c1[3], y3[t], _fma(c1[2], y2[t], _fma(c1[1], y1[t], _fma(c1[0], y0[t], a1[t]))))
                a2[t] = _fma(c2[3], y3[t], _fma(c2[2], y2[t], _fma(c2[1], y1[t], _fma(c2[0], y0[t], a2[t]))))
                a3[t] = _fma(c3[3], y3[t], _fma(c3[2], y2[t], _fma(c3[1], y1[t], _fma(c3[0], y0[t], a3[t]))))
        for g in range(_ROW_GROUP):
            sg, ag, sc = s1[g], sums[g], scales[g, s]
            for t in range(n):
                sg[t] += np.int32(sc * ag[t])
    if with_min:
        s2[:] = 0
        for g in range(_ROW_GROUP):
            sg = s2[g]
            for s in range(_NSUB):
                mn, bsum = mins[g, s], ybsums[s]
                for t in range(n):
                    sg[t] += mn * bsum[t]
    for g in range(_ROW_GROUP):
        out, s1g, s2g, dg, dming = acc[g], s1[g], s2[g], d[g], -dmin[g]
        for t in range(n):
            result = np.float32(s1g[t]) * dg
            if with_min:
                result = _fma(dming, np.float32(s2g[t]), result)
            out[t] = _fma(result, yd[t], out[t])


@_kernel(parallel=True)
def _gemm_tiled(w, x, f16, kind):
    n, nb, rows = x.shape[0], w.shape[1], w.shape[0]
    with_min = kind == _KIND_Q2_K or kind == _KIND_Q4_K or kind == _KIND_Q5_K
    # activations by block, transposed: (block, element, activation row)
    y = np.empty((nb, QK_K, n), np.float32)
    yd = np.empty((nb, n), np.float32)
    ybsums = np.empty((nb, _NSUB, n), np.int32)
    for t in prange(n):
        qs = np.empty((nb, QK_K), np.int8)
        d8 = np.empty(nb, np.float32)
        bsums = np.empty((nb, _NSUB), np.int32)
        _quantize_q8_k(x[t], qs, d8, bsums)
        for b in range(nb):
            yd[b, t] = d8[b]
            for e in range(QK_K):
                y[b, e, t] = qs[b, e]
            for s in range(_NSUB):
                ybsums[b, s, t] = bsums[b, s]
    out = np.empty((n, rows), np.float32)
    for task in prange((rows + _ROW_TILE - 1) // _ROW_TILE):
        r0 = task * _ROW_TILE
        m = min(_ROW_TILE, rows - r0)
        m_pad = (m + _ROW_GROUP - 1) // _ROW_GROUP * _ROW_GROUP  # zero weight rows fill the last group
        codes = np.zeros((nb, m_pad, QK_K), np.float32)
        scales = np.zeros((nb, m_pad, _NSUB), np.float32)
        mins = np.zeros((nb, m_pad, _NSUB), np.int32)
        d = np.zeros((nb, m_pad), np.float32)
        dmin = np.zeros((nb, m_pad), np.float32)
        for b in range(nb):
            for i in range(m):
                _unpack_block(w, r0 + i, b, kind, f16, codes[b], scales[b], mins[b], d[b], dmin[b], i)
        acc = np.zeros((m_pad, n), np.float32)
        s1 = np.empty((_ROW_GROUP, n), np.int32)
        s2 = np.empty((_ROW_GROUP, n), np.int32)
        sums = np.empty((_ROW_GROUP, n), np.float32)
        for b in range(nb):  # slabs in order, as every output accumulates them
            for i0 in range(0, m_pad, _ROW_GROUP):
                i1 = i0 + _ROW_GROUP
                _slab_rows(codes[b, i0:i1], scales[b, i0:i1], mins[b, i0:i1], d[b, i0:i1], dmin[b, i0:i1], with_min,
                           y[b], yd[b], ybsums[b], acc[i0:i1], s1, s2, sums)
        out[:, r0:r0 + m] = acc[:m].T
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The same arithmetic with the integer sums as AVX512-VNNI byte dot products (vpdpbusd: 4 unsigned x signed byte
# products per 32-bit lane), 16 weight rows per vector: the codes are stored unsigned (code + BIAS, below 64) and the
# bias comes back as -BIAS * (the sub-block's activation sum), the start of each sub-block's accumulator.

_BIAS = np.array([0, 4, 0, 0, 32], np.int32)  # per kind: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
_TILE16 = 16


def _make_slab_tile16(with_min):
    """An intrinsic (wv, sc, mn, d, ndmin, y8, ybs, yd, bias, acc): one slab of a 16-row weight tile against every
    activation row t, acc[t, i] = fma(result, yd[t], acc[t, i]) with result as in _slab_rows. All arrays
    C-contiguous: wv uint8 (64, 16, 4) (wv[q, i, k]: unsigned code of element 4q + k of row i), sc/mn int32
    (16 sub-blocks, 16 rows), d/ndmin float32 (16,) (ndmin = -dmin), y8 int8 (n, 256), ybs int32 (n, 16) (sums of
    each 16 activation quants), yd float32 (n,), acc float32 (n, 16)."""

    @intrinsic
    def slab_tile16(typingctx, wv, sc, mn, d, ndmin, y8, ybs, yd, bias, acc):
        sig = types.void(wv, sc, mn, d, ndmin, y8, ybs, yd, types.int32, acc)

        def codegen(context, builder, signature, args):
            i32, i64 = ir.IntType(32), ir.IntType(64)
            v16i, v16f = ir.VectorType(i32, _TILE16), ir.VectorType(ir.FloatType(), _TILE16)
            arrays = [context.make_array(signature.args[k])(context, builder, args[k]) for k in range(10) if k != 8]
            wv_a, sc_a, mn_a, d_a, ndmin_a, y8_a, ybs_a, yd_a, acc_a = arrays
            bias_ = args[8]
            n = builder.extract_value(y8_a.shape, 0)
            dpbusd = declare_vpdpbusd(builder)
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f, [v16f, v16f, v16f]),
                                                 "llvm.fma.v16f32")

            def vec_at(arr, index, ty):  # the 16 values at flat element `index` of arr
                return builder.load(builder.bitcast(builder.gep(arr.data, [index]), ty.as_pointer()), align=4)

            wq = [builder.load(builder.bitcast(builder.gep(wv_a.data, [ir.Constant(i64, 64 * q)]), v16i.as_pointer()),
                               align=1) for q in range(64)]  # the whole slab of 16 rows: 64 vectors (4 KiB)
            scales = [vec_at(sc_a, ir.Constant(i64, 16 * s), v16i) for s in range(16)]
            mins = [vec_at(mn_a, ir.Constant(i64, 16 * s), v16i) for s in range(16)] if with_min else None
            d16 = vec_at(d_a, ir.Constant(i64, 0), v16f)
            ndmin16 = vec_at(ndmin_a, ir.Constant(i64, 0), v16f) if with_min else None
            neg_bias = builder.neg(bias_)
            with cgutils.for_range(builder, n) as loop:
                t = loop.index
                y_row = builder.bitcast(builder.gep(y8_a.data, [builder.mul(t, ir.Constant(i64, 256))]),
                                        i32.as_pointer())
                bs_row = builder.gep(ybs_a.data, [builder.mul(t, ir.Constant(i64, 16))])
                s1 = ir.Constant(v16i, [0] * _TILE16)
                s2 = ir.Constant(v16i, [0] * _TILE16)
                for s in range(16):
                    bsum = builder.load(builder.gep(bs_row, [ir.Constant(i64, s)]))
                    raw = splat16(builder, builder.mul(neg_bias, bsum))
                    for q in range(4 * s, 4 * s + 4):
                        quad = builder.load(builder.gep(y_row, [ir.Constant(i64, q)]), align=1)
                        raw = builder.call(dpbusd, [raw, wq[q], splat16(builder, quad)])
                    s1 = builder.add(s1, builder.mul(scales[s], raw))
                    if with_min:
                        s2 = builder.add(s2, builder.mul(mins[s], splat16(builder, bsum)))
                result = builder.fmul(builder.sitofp(s1, v16f), d16)
                if with_min:
                    result = builder.call(fma, [ndmin16, builder.sitofp(s2, v16f), result])
                out_ptr = builder.bitcast(builder.gep(acc_a.data, [builder.mul(t, ir.Constant(i64, 16))]),
                                          v16f.as_pointer())
                yd_t = builder.load(builder.gep(yd_a.data, [t]))
                updated = builder.call(fma, [result, splat16(builder, yd_t), builder.load(out_ptr, align=4)])
                builder.store(updated, out_ptr, align=4)
            return context.get_dummy_value()
        return sig, codegen
    return slab_tile16


_slab_tile16 = _make_slab_tile16(False)
_slab_tile16_min = _make_slab_tile16(True)


@_kernel(parallel=True)
def _gemm_tiled_vnni(w, x, f16, kind):
    """_gemm_tiled's results, 16 weight rows per task and the integer sums by vpdpbusd."""
    n, nb, rows = x.shape[0], w.shape[1], w.shape[0]
    with_min = kind == _KIND_Q2_K or kind == _KIND_Q4_K or kind == _KIND_Q5_K
    bias = _BIAS[kind]
    y8 = np.empty((nb, n, QK_K), np.int8)
    yd = np.empty((nb, n), np.float32)
    ybs = np.empty((nb, n, _NSUB), np.int32)
    for t in prange(n):
        qs = np.empty((nb, QK_K), np.int8)
        d8 = np.empty(nb, np.float32)
        bsums = np.empty((nb, _NSUB), np.int32)
        _quantize_q8_k(x[t], qs, d8, bsums)
        for b in range(nb):
            yd[b, t] = d8[b]
            y8[b, t] = qs[b]
            ybs[b, t] = bsums[b]
    out = np.empty((n, rows), np.float32)
    for task in prange((rows + _TILE16 - 1) // _TILE16):
        r0 = task * _TILE16
        m = min(_TILE16, rows - r0)
        wv = np.zeros((nb, 64, _TILE16, 4), np.uint8)  # rows past m stay zero: codes, scales and d of 0
        sc = np.zeros((nb, _NSUB, _TILE16), np.int32)
        mn = np.zeros((nb, _NSUB, _TILE16), np.int32)
        d = np.zeros((nb, _TILE16), np.float32)
        ndmin = np.zeros((nb, _TILE16), np.float32)
        codes = np.empty((1, QK_K), np.float32)
        scales = np.empty((1, _NSUB), np.float32)
        mins = np.zeros((1, _NSUB), np.int32)
        d1 = np.empty(1, np.float32)
        dmin1 = np.zeros(1, np.float32)
        for b in range(nb):
            for i in range(m):
                _unpack_block(w, r0 + i, b, kind, f16, codes, scales, mins, d1, dmin1, 0)
                for e in range(QK_K):
                    wv[b, e >> 2, i, e & 3] = np.uint8(np.int32(codes[0, e]) + bias)
                for s in range(_NSUB):
                    sc[b, s, i] = np.int32(scales[0, s])
                    mn[b, s, i] = mins[0, s]
                d[b, i] = d1[0]
                ndmin[b, i] = -dmin1[0]
        acc = np.zeros((n, _TILE16), np.float32)
        for b in range(nb):  # slabs in order, as every output accumulates them
            if with_min:
                _slab_tile16_min(wv[b], sc[b], mn[b], d[b], ndmin[b], y8[b], ybs[b], yd[b], bias, acc)
            else:
                _slab_tile16(wv[b], sc[b], mn[b], d[b], ndmin[b], y8[b], ybs[b], yd[b], bias, acc)
        out[:, r0:r0 + m] = acc[:, :m]
    return out


def matmul_tiled(w_view: np.ndarray, x: np.ndarray, f16: np.ndarray, qtype: QT) -> np.ndarray:
    """x (n, cols) float32 @ W.T for a K-quant W ((rows, blocks, block_bytes) uint8), as ggml's tiled matmul."""
    if HAVE_VNNI:
        return _gemm_tiled_vnni(w_view, x, f16, _KIND[QT(qtype)])
    return _gemm_tiled(w_view, x, f16, _KIND[QT(qtype)])


def _per_row(matvec, w_view, x, f16):
    return np.stack([matvec(w_view, row, f16) for row in x]) if len(x) else np.empty((0, w_view.shape[0]), np.float32)


def _entry(qtype: QT, matvec):
    def matmul(w_view, x, f16):
        if x.shape[0] < TILED_MIN_BATCH:
            return _per_row(matvec, w_view, x, f16)
        return matmul_tiled(w_view, x, f16, qtype)
    matmul.__name__ = matmul.__qualname__ = f"matmul_tiled_{qtype.name.lower()}"
    matmul.__doc__ = f"Prefill for {qtype.name}: the tiled kernel from {TILED_MIN_BATCH} rows, ggml_vec_dot below."
    return matmul


matmul_tiled_q2_k = _entry(QT.Q2_K, _matvec_q2_k)
matmul_tiled_q3_k = _entry(QT.Q3_K, _matvec_q3_k)
matmul_tiled_q4_k = _entry(QT.Q4_K, _matvec_q4_k)
matmul_tiled_q5_k = _entry(QT.Q5_K, _matvec_q5_k)
matmul_tiled_q6_k = _entry(QT.Q6_K, _matvec_q6_k)


# ----------------------------------------------------------------------------------------------------------------------
# numpy reference: the same arithmetic, vectorised over whole block arrays


def _half(blocks: np.ndarray, offset: int) -> np.ndarray:
    return blocks[..., offset:offset + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _bits(packed: np.ndarray, shifts, mask: int) -> np.ndarray:
    """(..., n) bytes -> (..., len(shifts), n): the `mask` field at each shift."""
    return (packed[..., None, :].astype(np.int64) >> np.asarray(shifts)[:, None]) & mask


def unpack_tiled_ref(blocks: np.ndarray, qtype: QT):
    """(rows, blocks, block_bytes) uint8 -> codes - BIAS int64 (rows, blocks, 256), scales and mins int64
    (rows, blocks, sub-blocks; mins None without), d and dmin float32 (rows, blocks)."""
    if qtype == QT.Q6_K:  # ql[128] qh[64] scales int8[16] d
        ql, qh = blocks[..., :128].reshape(*blocks.shape[:2], 2, 2, 32), blocks[..., 128:192]
        low = _bits(ql, [0, 4], 15).swapaxes(-3, -2)         # (.., half, nibble, ql half 0/1, 32)
        high = _bits(qh.reshape(*blocks.shape[:2], 2, 32), [0, 2, 4, 6], 3).reshape(low.shape)
        codes = (low | (high << 4)).reshape(*blocks.shape[:2], QK_K) - 32
        return codes, blocks[..., 192:208].view(np.int8).astype(np.int64), None, _half(blocks, 208), None
    if qtype == QT.Q3_K:  # hmask[32] qs[64] scales[12] d
        low = _bits(blocks[..., 32:96].reshape(*blocks.shape[:2], 2, 32), [0, 2, 4, 6], 3)
        high = _bits(blocks[..., :32], np.arange(8), 1).reshape(low.shape)
        codes = (low | (high << 2)).reshape(*blocks.shape[:2], QK_K) - 4
        sc = blocks[..., 96:108].astype(np.int64)
        lo = np.concatenate([sc[..., :8] & 15, sc[..., :8] >> 4], -1)
        hi = (sc[..., 8 + np.arange(16) % 4] >> (2 * (np.arange(16) // 4))) & 3
        return codes, (lo | (hi << 4)) - 32, None, _half(blocks, 108), None
    if qtype == QT.Q2_K:  # scales[16] qs[64] d dmin
        codes = _bits(blocks[..., 16:80].reshape(*blocks.shape[:2], 2, 32), [0, 2, 4, 6], 3)
        sc = blocks[..., :16].astype(np.int64)
        return codes.reshape(*blocks.shape[:2], QK_K), sc & 15, sc >> 4, _half(blocks, 80), _half(blocks, 82)
    # Q4_K: d dmin scales[12] qs[128]; Q5_K: d dmin scales[12] qh[32] qs[128]
    qs = blocks[..., 48:176] if qtype == QT.Q5_K else blocks[..., 16:144]
    codes = _bits(qs.reshape(*blocks.shape[:2], 4, 32), [0, 4], 15).reshape(*blocks.shape[:2], 8, 32)
    if qtype == QT.Q5_K:
        codes |= _bits(blocks[..., 16:48], np.arange(8), 1) << 4
    s = blocks[..., 4:16].astype(np.int64)
    scales = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], -1)
    mins = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
    return codes.reshape(*blocks.shape[:2], QK_K), scales, mins, _half(blocks, 0), _half(blocks, 2)


def fma_f32_ref(a, b, c) -> np.ndarray:
    """float32 a*b + c rounded once. The product is exact in float64; the float64 sum s and its error e (TwoSum)
    hold the exact result, and rounding s to float32 is right unless s lies exactly halfway between two floats,
    where the sign of e decides."""
    p = np.asarray(a, np.float64) * np.asarray(b, np.float64)
    c = np.asarray(c, np.float64)
    s = p + c
    pv = s - c
    e = (p - pv) + (c - (s - pv))
    r = s.astype(np.float32)
    toward = np.nextafter(r, np.where(s > r, np.float32(np.inf), np.float32(-np.inf)))
    halfway = (s != r) & (2 * s == r.astype(np.float64) + toward.astype(np.float64))
    nudged = np.where(e > 0, np.nextafter(s, np.inf), np.nextafter(s, -np.inf)).astype(np.float32)
    return np.where(halfway & (e != 0), nudged, r)


def matmul_tiled_ref(blocks: np.ndarray, qtype: QT, x: np.ndarray) -> np.ndarray:
    """numpy version of matmul_tiled: blocks (rows, blocks, block_bytes) uint8, x (n, cols) float32."""
    from .kernels_ref import quantize_q8_k

    codes, scales, mins, d, dmin = unpack_tiled_ref(np.asarray(blocks), QT(qtype))
    rows, nb = codes.shape[:2]
    nsub = scales.shape[-1]
    yq, yd, ybsums = quantize_q8_k(x)
    n = len(yq)
    raw = np.einsum("tbse,rbse->trbs", yq.astype(np.int64).reshape(n, nb, nsub, -1),
                    codes.reshape(rows, nb, nsub, -1))
    s1 = (raw * scales[None]).sum(-1)                                     # (n, rows, blocks), exact
    result = s1.astype(np.float32) * d[None]
    if mins is not None:
        bsum = ybsums.reshape(n, nb, nsub, -1).sum(-1)
        s2 = np.einsum("tbs,rbs->trb", bsum, mins)
        result = fma_f32_ref(-dmin[None], s2.astype(np.float32), result)
    out = np.zeros((n, rows), np.float32)
    for b in range(nb):
        out = fma_f32_ref(result[..., b], yd[:, None, b], out)
    return out
