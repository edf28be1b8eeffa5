"""Q4_K and Q2_K products in the float order of llama.cpp's repacked x86 kernels.

When a Q4_K matrix (AVX2) or a Q2_K matrix (AVX512) has a row count divisible by 8, ggml-cpu stores it interleaved
8 rows at a time (block_q4_Kx8 / block_q2_Kx8, ggml-cpu/repack.cpp) and multiplies it with its own kernels
(arch/x86/repack.cpp) instead of ggml_vec_dot_*: `ggml_gemm_*_8x8_q8_K` for each group of 4 activation rows and
`ggml_gemv_*_8x8_q8_K` for the 1-3 rows left over and for decode. Nothing here repacks: only the arithmetic order
matters, and every integer sum is exact, so what has to be reproduced is where the floats are rounded:

    gemv (decode, leftover rows), per block b of 256 elements, in integers:
        isum = sum_s scale_s * dot_s      msum = sum_s min_s * (sum of the activation quants of sub-block s)
        acc  = fma(float(isum), d_w * d_x, acc)      accm = fma(float(msum), dmin_w * d_x, accm)
    gemm (groups of 4 rows): the same, but one fma pair per *group* of sub-blocks instead of per block:
        Q4_K: 4 groups of 64 elements (two 32-element sub-blocks, the low and high nibbles of 32 bytes),
        Q2_K: 2 groups of 128 elements (eight 16-element sub-blocks, one 32-byte run of qs);
    result = acc - accm.

(d_w, dmin_w are the block's f16 scales; the AVX512 branch of the gemm, which is what the shipped -march=native build
runs for 16-column tiles, and its AVX2 remainder branch have this same per-output order.)

The activations of the gemm rows are quantised by ggml_quantize_mat_q8_K_4x8 (AVX2), which differs from
quantize_row_q8_K_ref in one case: when both +amax and -amax occur in a block, it takes the positive one for the
scale's sign (-127/amax), the reference takes the first. The leftover rows use quantize_row_q8_K (= the reference).

How the batch is computed here: with the sub-block scales folded into the weights (scale * q <= 945 for Q4_K,
<= 45 for Q2_K) every group sum is an integer below 2^24 whatever the order of its terms, so float32 BLAS gives it
exactly (one single-threaded BLAS call per group, the groups shared among Python threads); numba then runs the fma
chains group after group, in llama.cpp's order. `matmul_ref` is the plain numpy version of the same order (with an
exact fma emulation).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from gguf import GGMLQuantizationType as QT
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .gemm_int8 import HAVE_VNNI, declare_vpdpbusd, splat16
from .kernels import (QK_K, _byte, _dot_q2_k, _dot_q4_k, _f16_at, _fma, _jit, _kernel, _quantize_q8_k,
                      _scales_mins_k4)

REPACK_ROWS = 8  # ggml repacks a matrix only when its row count is a multiple of this
_Q4_K, _Q2_K = 0, 1
# per kind: sub-blocks per block (each with its own scale and min), elements per gemm group
_SUBS = (8, 16)
_GROUP = (64, 128)
# float32 group sums (groups x activation rows x weight rows) per tile, and the tile's unpacked weight rows (rows x
# columns): kept between calls (see _scratch), so this is resident memory, part of the runtime's peak RSS. Per
# 256-token prefill chunk (SmolLM2's 576x1536 Q4_K), tiles of 4 / 2 / 1 MiB took 20 / 21 / 26 ms (16 MiB was no
# faster than 4 for 512 tokens). Results do not depend on either.
_TILE_BYTES = 2 << 20
_WQ_BYTES = 1 << 20


# ----------------------------------------------------------------------------------------------------------------------
# Activations


@_jit
def _quantize_q8_k_x4(x, qs, d, bsums):
    """ggml_quantize_mat_q8_K_4x8 (x86 AVX2) for one row: iscale = -127/amax if +amax occurs in the block, else
    127/amax; d = 1/iscale; q = round_half_even(x * iscale)."""
    for b in range(d.shape[0]):
        amax = np.float32(0.0)
        for j in range(QK_K):
            amax = max(amax, abs(x[b * QK_K + j]))
        positive = False
        for j in range(QK_K):
            positive = positive or x[b * QK_K + j] == amax
        if amax == 0:
            iscale = np.float32(0.0)
            d[b] = 0
        else:
            iscale = (np.float32(-127.0) if positive else np.float32(127.0)) / amax
            d[b] = np.float32(1.0) / iscale
        for j in range(QK_K):
            qs[b, j] = np.int8(np.rint(x[b * QK_K + j] * iscale))
        for g in range(QK_K // 16):
            total = 0
            for j in range(16):
                total += qs[b, g * 16 + j]
            bsums[b, g] = total


@_kernel()  # serial: ~1 ms of work, less than a parallel region costs when the cores are busy (prange = range)
def _quantize_activations(x, xq, xd, xsub):
    """Rows of x quantised as ggml's repacked mul_mat does: groups of 4 rows with the 4x8 quantiser, the rest with
    quantize_row_q8_K. Writes the quants as float32 xq (n, cols), d to xd (n, blocks) and the quant sums of each
    sub-block to xsub (n, blocks, sub-blocks)."""
    n, nb, n_subs = x.shape[0], x.shape[1] // QK_K, xsub.shape[2]
    n_gemm = n - n % 4
    per_sub = 16 // n_subs
    for t in prange(n):
        qs = np.empty((nb, QK_K), np.int8)
        bsums = np.empty((nb, 16), np.int32)
        if t < n_gemm:
            _quantize_q8_k_x4(x[t], qs, xd[t], bsums)
        else:
            _quantize_q8_k(x[t], qs, xd[t], bsums)
        for b in range(nb):
            for e in range(QK_K):
                xq[t, b * QK_K + e] = qs[b, e]
            for s in range(n_subs):
                total = 0
                for g in range(s * per_sub, (s + 1) * per_sub):
                    total += bsums[b, g]
                xsub[t, b, s] = total


@_kernel()
def _quantize_rows_q8_k_x4(x):
    nb = x.shape[1] // QK_K
    qs = np.empty((x.shape[0], nb, QK_K), np.int8)
    d = np.empty((x.shape[0], nb), np.float32)
    bsums = np.empty((x.shape[0], nb, 16), np.int32)
    for t in range(x.shape[0]):
        _quantize_q8_k_x4(x[t], qs[t], d[t], bsums[t])
    return qs, d, bsums


def quantize_rows_q8_k_x4(x: np.ndarray):
    """ggml_quantize_mat_q8_K_4x8 on every row of x (n, cols): (qs int8 (n, blocks, 256), d float32 (n, blocks),
    bsums int32 (n, blocks, 16)) in plain row order (ggml interleaves 4 rows; the tests undo that)."""
    return _quantize_rows_q8_k_x4(np.require(x, np.float32, ["C", "W"]))


# ----------------------------------------------------------------------------------------------------------------------
# Weights: a tile of rows as float32 integers scale_s * q (rows, cols), and per block (transposed, rows last for the
# vectorised loops) d, dmin and the integer mins of the sub-blocks.


@_kernel()  # serial, as _quantize_activations
def _unpack(w, r0, kind, f16, wq, wd, wdmin, wmin, m):
    """Rows r0..r0+m-1 of w into the arrays described above (wq only if it has rows: the VNNI path has no use
    for it)."""
    nb = w.shape[1]
    with_codes = wq.shape[0] > 0
    for i in prange(m):
        r = r0 + i
        for b in range(nb):
            base = b * QK_K
            if kind == _Q4_K:
                wd[b, i] = _f16_at(w, r, b, 0, f16)
                wdmin[b, i] = _f16_at(w, r, b, 2, f16)
                scales, mins = _scales_mins_k4(w, r, b)
                for s in range(8):
                    wmin[b, s, i] = _byte(mins, s)
                for k in range(4 if with_codes else 0):
                    lo = np.float32(_byte(scales, 2 * k))
                    hi = np.float32(_byte(scales, 2 * k + 1))
                    for j in range(32):
                        q = np.int32(w[r, b, 16 + 32 * k + j])
                        wq[i, base + 64 * k + j] = lo * np.float32(q & 15)
                        wq[i, base + 64 * k + 32 + j] = hi * np.float32(q >> 4)
            else:
                wd[b, i] = _f16_at(w, r, b, 80, f16)
                wdmin[b, i] = _f16_at(w, r, b, 82, f16)
                for s in range(16):
                    wmin[b, s, i] = np.int32(w[r, b, s]) >> 4
                for h in range(2 if with_codes else 0):
                    for shift in range(4):
                        for j in range(32):
                            e = 128 * h + 32 * shift + j  # sub-block e // 16
                            q = (np.int32(w[r, b, 16 + 32 * h + j]) >> (2 * shift)) & 3
                            wq[i, base + e] = np.float32((np.int32(w[r, b, e >> 4]) & 15) * q)


# ----------------------------------------------------------------------------------------------------------------------
# Batched product


@_kernel(parallel=True)
def _fma_chains(p, groups_per_block, xd, xsub, wd, wdmin, wmin, n_gemm, out):
    """The float part: p (groups, n, m) holds the exact integer sum of every group, activation row and weight row.
    Gemm rows (t < n_gemm) take one fma pair per group, gemv rows one per block (their group sums are added up in
    float64, exactly, then rounded to float32 as ggml converts its int32 block sum)."""
    n, m = p.shape[1], p.shape[2]
    nb, n_subs = wmin.shape[0], wmin.shape[1]
    subs = n_subs // groups_per_block
    for t in prange(n):
        acc = np.zeros(m, np.float32)
        accm = np.zeros(m, np.float32)
        msum = np.empty(m, np.float32)
        scale = np.empty(m, np.float32)
        scale_min = np.empty(m, np.float32)
        block_sum = np.empty(m, np.float64)
        gemm = t < n_gemm
        for b in range(nb):
            xdb = xd[t, b]
            for i in range(m):
                scale[i] = wd[b, i] * xdb
                scale_min[i] = wdmin[b, i] * xdb
            block_sum[:] = 0
            for k in range(groups_per_block):
                pg = p[b * groups_per_block + k, t]
                if gemm:
                    msum[:] = 0
                    for s in range(k * subs, (k + 1) * subs):
                        xs, mins = xsub[t, b, s], wmin[b, s]
                        for i in range(m):
                            msum[i] += mins[i] * xs
                    for i in range(m):
                        acc[i] = _fma(pg[i], scale[i], acc[i])
                        accm[i] = _fma(msum[i], scale_min[i], accm[i])
                else:
                    for i in range(m):
                        block_sum[i] += pg[i]
            if not gemm:
                msum[:] = 0
                for s in range(n_subs):
                    xs, mins = xsub[t, b, s], wmin[b, s]
                    for i in range(m):
                        msum[i] += mins[i] * xs
                for i in range(m):
                    acc[i] = _fma(np.float32(block_sum[i]), scale[i], acc[i])
                    accm[i] = _fma(msum[i], scale_min[i], accm[i])
        for i in range(m):
            out[t, i] = acc[i] - accm[i]


def _matmul(w: np.ndarray, x: np.ndarray, f16: np.ndarray, kind: int) -> np.ndarray:
    """All group sums of a tile of weight rows by BLAS, then the fma chains by numba: alternating the two thread pools
    per group instead was 10x slower on a loaded machine (each side's idle threads spin while the other works)."""
    n, rows, nb = x.shape[0], w.shape[0], w.shape[1]
    group = _GROUP[kind]
    groups = nb * QK_K // group
    n_subs = _SUBS[kind]
    # wq is bounded too: a short batch (e.g. a 16-token warm-up) would otherwise take a tile of all rows and keep a
    # whole matrix unpacked in float32 resident
    tile = min(rows, _TILE_BYTES // (4 * n * groups), _WQ_BYTES // (4 * nb * QK_K))
    tile = max(REPACK_ROWS, tile // REPACK_ROWS * REPACK_ROWS)
    xq = _scratch("xq", (n, nb * QK_K))
    xd, xsub = np.empty((n, nb), np.float32), np.empty((n, nb, n_subs), np.float32)
    wd, wdmin = np.empty((nb, tile), np.float32), np.empty((nb, tile), np.float32)
    wmin = np.empty((nb, n_subs, tile), np.float32)
    _quantize_activations(x, xq, xd, xsub)
    out = np.empty((n, rows), np.float32)
    if HAVE_VNNI:  # integer group sums by vpdpbusd, 16 weight rows per vector, from one byte per weight
        xq8 = xq.astype(np.int8)
        chunks = (min(tile, rows) + _TILE16 - 1) // _TILE16
        p = _scratch("p", (groups, n, chunks * _TILE16))
        wv = np.empty((chunks, nb * QK_K // 4, _TILE16, 4), np.uint8)
        scl = np.empty((chunks, nb * n_subs, _TILE16), np.int32)
        no_wq = np.empty((0, nb * QK_K), np.float32)
    else:
        p = _scratch("p", (groups, n, min(tile, rows)))
        wq = _scratch("wq", (min(tile, rows), nb * QK_K))
    for r0 in range(0, rows, tile):
        m = min(rows, r0 + tile) - r0
        if HAVE_VNNI:
            wv[:] = 0
            scl[:] = 0
            _unpack_codes(w, r0, m, kind, wv, scl)
            _unpack(w, r0, kind, f16, no_wq, wd[:, :m], wdmin[:, :m], wmin[:, :, :m], m)
            _group_sums_vnni(xq8, wv[:(m + _TILE16 - 1) // _TILE16], scl, kind, p)
        else:
            _unpack(w, r0, kind, f16, wq[:m], wd[:, :m], wdmin[:, :m], wmin[:, :, :m], m)
            _group_sums(xq, wq[:m], group, p[:, :, :m])
        _fma_chains(p[:, :, :m], QK_K // group, xd, xsub, wd[:, :m], wdmin[:, :m], wmin[:, :, :m], n - n % 4,
                    out[:, r0:r0 + m])
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The group sums as AVX512-VNNI byte dot products (vpdpbusd: 4 unsigned x signed byte products per 32-bit lane), 16
# weight rows per vector: the unsigned codes (0..15 / 0..3) against the int8 activation quants sub-block by sub-block,
# each sub-block's integer sum times its scale added into its group's sum. Same integers as the BLAS version.

_TILE16 = 16


def _make_sub_sums16(kind):
    """An intrinsic (wv, scl, xq8, t, p, i0): p[g, t, i0 + i] = float(group g's sum) for a 16-row chunk, every g.
    wv uint8 (cols / 4, 16, 4): codes of elements 4q..4q+3 per row; scl int32 (sub-blocks, 16); xq8 int8 (n, cols);
    p float32 (groups, n, >= i0 + 16), all C-contiguous."""
    sub_quads = (32 if kind == _Q4_K else 16) // 4
    subs_per_group = _GROUP[kind] // (4 * sub_quads)

    @intrinsic
    def sub_sums16(typingctx, wv, scl, xq8, t, p, i0):
        sig = types.void(wv, scl, xq8, types.int64, p, types.int64)

        def codegen(context, builder, signature, args):
            i32, i64 = ir.IntType(32), ir.IntType(64)
            v16i, v16f = ir.VectorType(i32, _TILE16), ir.VectorType(ir.FloatType(), _TILE16)
            wv_a, scl_a, x_a, p_a = (context.make_array(signature.args[k])(context, builder, args[k])
                                     for k in (0, 1, 2, 4))
            t_, i0_ = args[3], args[5]
            cols = builder.extract_value(x_a.shape, 1)
            n = builder.extract_value(x_a.shape, 0)
            p_cols = builder.extract_value(p_a.shape, 2)
            dpbusd = declare_vpdpbusd(builder)
            x_row = builder.bitcast(builder.gep(x_a.data, [builder.mul(t_, cols)]), i32.as_pointer())
            w_quads = builder.bitcast(wv_a.data, v16i.as_pointer())
            groups = builder.udiv(cols, ir.Constant(i64, 4 * sub_quads * subs_per_group))

            with cgutils.for_range(builder, groups) as loop:
                g = loop.index
                gsum = ir.Constant(v16i, [0] * _TILE16)
                for k in range(subs_per_group):
                    sub = builder.add(builder.mul(g, ir.Constant(i64, subs_per_group)), ir.Constant(i64, k))
                    raw = ir.Constant(v16i, [0] * _TILE16)
                    for qk in range(sub_quads):
                        q = builder.add(builder.mul(sub, ir.Constant(i64, sub_quads)), ir.Constant(i64, qk))
                        quad = builder.load(builder.gep(x_row, [q]), align=1)
                        weights = builder.load(builder.gep(w_quads, [q]), align=1)
                        raw = builder.call(dpbusd, [raw, weights, splat16(builder, quad)])
                    scale = builder.load(builder.bitcast(builder.gep(scl_a.data, [builder.mul(sub, ir.Constant(
                        i64, _TILE16))]), v16i.as_pointer()), align=4)
                    gsum = builder.add(gsum, builder.mul(scale, raw))
                at = builder.add(builder.mul(builder.add(builder.mul(g, n), t_), p_cols), i0_)
                builder.store(builder.sitofp(gsum, v16f), builder.bitcast(builder.gep(p_a.data, [at]),
                                                                          v16f.as_pointer()), align=4)
            return context.get_dummy_value()
        return sig, codegen
    return sub_sums16


_sub_sums16_q4_k = _make_sub_sums16(_Q4_K)
_sub_sums16_q2_k = _make_sub_sums16(_Q2_K)


@_kernel()
def _unpack_codes(w, r0, m, kind, wv, scl):
    """Rows r0..r0+m-1 of w as unsigned codes and integer sub-block scales in 16-row chunks: wv uint8 (chunks,
    cols / 4, 16, 4), scl int32 (chunks, sub-blocks, 16); the rows past m stay zero."""
    nb = w.shape[1]
    n_subs = _SUBS[kind]
    for i in prange(m):
        r, c, lane = r0 + i, i // _TILE16, i % _TILE16
        for b in range(nb):
            if kind == _Q4_K:
                scales, _ = _scales_mins_k4(w, r, b)
                for k in range(4):
                    scl[c, b * n_subs + 2 * k, lane] = _byte(scales, 2 * k)
                    scl[c, b * n_subs + 2 * k + 1, lane] = _byte(scales, 2 * k + 1)
                    for j in range(32):
                        q = w[r, b, 16 + 32 * k + j]
                        e = b * QK_K + 64 * k + j
                        wv[c, e >> 2, lane, e & 3] = q & 15
                        wv[c, (e + 32) >> 2, lane, (e + 32) & 3] = q >> 4
            else:
                for s in range(16):
                    scl[c, b * n_subs + s, lane] = np.int32(w[r, b, s]) & 15
                for h in range(2):
                    for shift in range(4):
                        for j in range(32):
                            e = 128 * h + 32 * shift + j
                            g = b * QK_K + e
                            wv[c, g >> 2, lane, g & 3] = (w[r, b, 16 + 32 * h + j] >> (2 * shift)) & 3


@_kernel(parallel=True)
def _group_sums_vnni(xq8, wv, scl, kind, p):
    """p[g, t, i] for every activation row t and 16-row chunk (see _make_sub_sums16)."""
    for t in prange(xq8.shape[0]):
        for c in range(wv.shape[0]):
            if kind == _Q4_K:
                _sub_sums16_q4_k(wv[c], scl[c], xq8, t, p, c * _TILE16)
            else:
                _sub_sums16_q2_k(wv[c], scl[c], xq8, t, p, c * _TILE16)


_WORKSPACE = threading.local()


def _scratch(name: str, shape) -> np.ndarray:
    """A float32 scratch array kept between calls (per thread): fresh multi-MB arrays cost a page fault per 4 KiB
    page, which on this loaded VM made the activation quantisation 20x slower than its arithmetic (measured)."""
    size = int(np.prod(shape))
    buf = getattr(_WORKSPACE, name, None)
    if buf is None or buf.size < size:
        buf = np.empty(size, np.float32)
        setattr(_WORKSPACE, name, buf)
    return buf[:size].reshape(shape)


def _group_sums(xq, wq, group, out):
    """out[g] = xq[:, g] @ wq[:, g].T over the columns of every group g: single-threaded BLAS calls, the groups shared
    among as many Python threads as numba uses. OpenBLAS's own threads sync on every call, and with the cores busy
    24 calls of a 576x1536 product took 0.4-0.8 s with 2 BLAS threads, 15 ms with 1 (measured)."""
    groups = out.shape[0]

    def run(part):
        for g in part:
            np.matmul(xq[:, g * group:(g + 1) * group], wq[:, g * group:(g + 1) * group].T, out=out[g])

    workers = min(numba.get_num_threads(), groups)
    with _serial_blas():
        if workers == 1:
            run(range(groups))
        else:
            list(_pool(workers).map(run, [range(k, groups, workers) for k in range(workers)]))


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="llmq-repack")


@contextlib.contextmanager
def _serial_blas():
    lib = _openblas()
    if lib is None:
        yield
        return
    before = lib.scipy_openblas_get_num_threads64_()
    lib.scipy_openblas_set_num_threads64_(1)
    try:
        yield
    finally:
        lib.scipy_openblas_set_num_threads64_(before)


@functools.cache
def _openblas():
    """numpy's OpenBLAS (scipy-openblas64 wheels), or None when numpy is linked otherwise."""
    for path in glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "libscipy_openblas64_*.so")):
        try:
            lib = ctypes.CDLL(path)
            lib.scipy_openblas_get_num_threads64_()
            return lib
        except (OSError, AttributeError):
            continue
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Decode: ggml_gemv_*_8x8_q8_K, one fma pair per block.


def block_pointers(context, builder, signature, args):
    """For an intrinsic (w, r, b, xq, out): byte pointers to block b of row r of w and to activation row b of xq
    (blocks, 256), and the out array."""
    w_t, _, _, xq_t, out_t = signature.args
    w_v, r_v, b_v, xq_v, out_v = args
    i8 = ir.IntType(8)
    w_a = context.make_array(w_t)(context, builder, w_v)
    xq_a = context.make_array(xq_t)(context, builder, xq_v)
    offset = builder.add(builder.mul(r_v, builder.extract_value(w_a.strides, 0)),
                         builder.mul(b_v, builder.extract_value(w_a.strides, 1)))
    block = builder.gep(builder.bitcast(w_a.data, i8.as_pointer()), [offset])
    xrow = builder.gep(builder.bitcast(xq_a.data, i8.as_pointer()),
                       [builder.mul(b_v, builder.extract_value(xq_a.strides, 0))])
    return block, xrow, context.make_array(out_t)(context, builder, out_v)


@intrinsic
def _q4_k_subblock_dots(typingctx, w, r, b, xq, out):
    """out[2k] / out[2k + 1] = the low / high nibbles of the 32 bytes 16 + 32k.. of block b of row r against
    xq[b, 64k:64k + 32] / xq[b, 64k + 32:64k + 64], k < 4 (exact integers; LLVM vector code, portable)."""
    sig = types.void(w, types.int64, types.int64, xq, out)

    def codegen(context, builder, signature, args):
        i16, i32, i64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)
        block, xrow, out_a = block_pointers(context, builder, signature, args)
        v32 = ir.VectorType(ir.IntType(8), 32)
        reduce_add = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(i32, [ir.VectorType(i32, 32)]), "llvm.vector.reduce.add.v32i32")

        def load(ptr, at):
            return builder.load(builder.bitcast(builder.gep(ptr, [ir.Constant(i64, at)]), v32.as_pointer()), align=1)

        def dot(q, x):  # q 0..15, |x| <= 128: products fit in i16
            p = builder.mul(builder.zext(q, ir.VectorType(i16, 32)), builder.sext(x, ir.VectorType(i16, 32)))
            return builder.call(reduce_add, [builder.sext(p, ir.VectorType(i32, 32))])
        for k in range(4):
            q = load(block, 16 + 32 * k)
            lo = builder.and_(q, ir.Constant(v32, [15] * 32))
            hi = builder.lshr(q, ir.Constant(v32, [4] * 32))
            for h, codes in enumerate((lo, hi)):
                builder.store(dot(codes, load(xrow, 64 * k + 32 * h)),
                              builder.gep(out_a.data, [ir.Constant(i64, 2 * k + h)]))
        return context.get_dummy_value()
    return sig, codegen


@_jit
def _gemv_dot_q4_k(w, r, xq, xd, xbsums, f16):
    acc = np.float32(0.0)
    accm = np.float32(0.0)
    wr = w[r]
    sub = np.empty(8, np.int32)
    for b in range(wr.shape[0]):
        scales, mins = _scales_mins_k4(w, r, b)
        _q4_k_subblock_dots(w, r, b, xq, sub)
        isum = np.int32(0)
        for k in range(4):
            isum += _byte(scales, 2 * k) * sub[2 * k] + _byte(scales, 2 * k + 1) * sub[2 * k + 1]
        msum = np.int32(0)
        for s in range(8):
            msum += _byte(mins, s) * (xbsums[b, 2 * s] + xbsums[b, 2 * s + 1])
        acc = _fma(np.float32(isum), _f16_at(w, r, b, 0, f16) * xd[b], acc)
        accm = _fma(np.float32(msum), _f16_at(w, r, b, 2, f16) * xd[b], accm)
    return acc - accm


@_jit
def _gemv_dot_q2_k(w, r, xq, xd, xbsums, f16):
    acc = np.float32(0.0)
    accm = np.float32(0.0)
    wr = w[r]
    for b in range(wr.shape[0]):
        isum = np.int32(0)
        for h in range(2):
            for shift in range(4):
                s0 = np.int32(0)
                s1 = np.int32(0)
                for j in range(16):
                    e = 128 * h + 32 * shift + j
                    s0 += ((np.int32(wr[b, 16 + 32 * h + j]) >> (2 * shift)) & 3) * np.int32(xq[b, e])
                    s1 += ((np.int32(wr[b, 32 + 32 * h + j]) >> (2 * shift)) & 3) * np.int32(xq[b, e + 16])
                g = 8 * h + 2 * shift  # the sub-block of s0; s1's is the next one
                isum += s0 * (np.int32(wr[b, g]) & 15) + s1 * (np.int32(wr[b, g + 1]) & 15)
        msum = np.int32(0)
        for s in range(16):
            msum += (np.int32(wr[b, s]) >> 4) * xbsums[b, s]
        acc = _fma(np.float32(isum), _f16_at(w, r, b, 80, f16) * xd[b], acc)
        accm = _fma(np.float32(msum), _f16_at(w, r, b, 82, f16) * xd[b], accm)
    return acc - accm


@_kernel(parallel=True)
def matvec_q4_k(w, x, f16):
    """W @ x: the gemv order when ggml repacks W (rows % 8 == 0), else ggml_vec_dot_q4_K_q8_K's (kernels.py)."""
    xq = np.empty((w.shape[1], QK_K), np.int8)
    xd = np.empty(w.shape[1], np.float32)
    xbsums = np.empty((w.shape[1], QK_K // 16), np.int32)
    _quantize_q8_k(x, xq, xd, xbsums)
    repacked = w.shape[0] % REPACK_ROWS == 0
    out = np.empty(w.shape[0], np.float32)
    for r in prange(w.shape[0]):
        out[r] = _gemv_dot_q4_k(w, r, xq, xd, xbsums, f16) if repacked else _dot_q4_k(w, r, xq, xd, xbsums, f16)
    return out


@_kernel(parallel=True)
def matvec_q2_k(w, x, f16):
    """W @ x: the gemv order when ggml repacks W (rows % 8 == 0), else ggml_vec_dot_q2_K_q8_K's (kernels.py)."""
    xq = np.empty((w.shape[1], QK_K), np.int8)
    xd = np.empty(w.shape[1], np.float32)
    xbsums = np.empty((w.shape[1], QK_K // 16), np.int32)
    _quantize_q8_k(x, xq, xd, xbsums)
    repacked = w.shape[0] % REPACK_ROWS == 0
    out = np.empty(w.shape[0], np.float32)
    for r in prange(w.shape[0]):
        out[r] = _gemv_dot_q2_k(w, r, xq, xd, xbsums, f16) if repacked else _dot_q2_k(w, r, xq, xd, xbsums, f16)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Entry points for kernels._TYPES, (blocks view, x, F16_TO_F32) -> float32. kernels.matmul sends batches of 1-3 rows
# to matvec, so matmul sees n >= 4. A matrix ggml does not repack (rows % 8 != 0) goes where ggml sends it: the tiled
# K-quant kernel from 8 rows, ggml_vec_dot per row below (kernels_tiled's entry points do both).


def matmul_q4_k(w, x, f16):
    if w.shape[0] % REPACK_ROWS:
        from .kernels_tiled import matmul_tiled_q4_k

        return matmul_tiled_q4_k(w, x, f16)
    return _matmul(w, x, f16, _Q4_K)


def matmul_q2_k(w, x, f16):
    if w.shape[0] % REPACK_ROWS:
        from .kernels_tiled import matmul_tiled_q2_k

        return matmul_tiled_q2_k(w, x, f16)
    return _matmul(w, x, f16, _Q2_K)


# ----------------------------------------------------------------------------------------------------------------------
# numpy reference of the same order


def fma_f32(a, b, c) -> np.ndarray:
    """float32 a*b + c rounded once, exactly: the float64 product of two floats is exact; their sum is rounded to
    odd (TwoSum gives the rounding error; an inexact result with an even last bit moves one ulp towards it), and a
    round-to-odd result with 53 bits rounds to float32 as the exact sum would."""
    p = np.asarray(a, np.float32).astype(np.float64) * np.asarray(b, np.float32).astype(np.float64)
    c = np.asarray(c, np.float32).astype(np.float64)
    s = p + c
    sp = s - p
    err = (p - (s - sp)) + (c - sp)
    even = (s.view(np.int64) & 1) == 0
    s = np.where((err != 0) & even, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)


def weights_ref(data: np.ndarray, qtype: QT, rows: int, cols: int):
    """Q4_K/Q2_K rows as integers: q (rows, blocks, 256), sub-block scales and mins (rows, blocks, subs), d and
    dmin float32 (rows, blocks)."""
    b = np.ascontiguousarray(data).view(np.uint8).reshape(rows, cols // QK_K, -1).astype(np.int64)
    half = lambda o: b[..., o:o + 2].astype(np.uint8).copy().view(np.float16)[..., 0].astype(np.float32)  # noqa: E731
    if qtype == QT.Q4_K:
        nib = b[..., 16:144].reshape(rows, -1, 4, 1, 32)
        q = np.concatenate([nib & 15, nib >> 4], axis=3).reshape(rows, -1, QK_K)
        s = b[..., 4:16]
        lo_sc, lo_m = s[..., 0:4] & 63, s[..., 4:8] & 63
        hi_sc = (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)
        hi_m = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
        return (q, np.concatenate([lo_sc, hi_sc], -1), np.concatenate([lo_m, hi_m], -1), half(0), half(2))
    if qtype == QT.Q2_K:
        qs = b[..., 16:80].reshape(rows, -1, 2, 1, 32)
        q = ((qs >> (2 * np.arange(4)).reshape(4, 1)) & 3).reshape(rows, -1, QK_K)
        return q, b[..., :16] & 15, b[..., :16] >> 4, half(80), half(82)
    raise ValueError(qtype)


def quantize_q8_k_x4_ref(x: np.ndarray):
    """ggml_quantize_mat_q8_K_4x8 (AVX2) per row, vectorised: (qs int8 (n, blocks, 256), d, bsums)."""
    blocks = np.asarray(x, np.float32).reshape(len(x), -1, QK_K)
    amax = np.abs(blocks).max(axis=-1)
    positive = (blocks == amax[..., None]).any(axis=-1)
    with np.errstate(divide="ignore"):
        iscale = np.where(amax != 0, np.where(positive, np.float32(-127), np.float32(127)) / amax, 0).astype(np.float32)
        d = np.where(amax != 0, np.float32(1) / iscale, 0).astype(np.float32)
    qs = np.rint(blocks * iscale[..., None]).astype(np.int8)
    return qs, d, qs.astype(np.int32).reshape(*qs.shape[:2], 16, 16).sum(-1)


def matmul_ref(data: np.ndarray, qtype: QT, shape: tuple[int, int], x: np.ndarray) -> np.ndarray:
    """x (n, cols) @ W.T rounded step by step as llama.cpp's repacked product: groups of 4 rows through the gemm order,
    the rest through the gemv order (see the module docstring)."""
    from .kernels_ref import quantize_q8_k

    rows, cols = shape
    x = np.atleast_2d(np.asarray(x, np.float32))
    n, n_gemm = len(x), len(x) - len(x) % 4
    q, scale, wmin, d, dmin = weights_ref(data, qtype, rows, cols)
    n_subs = scale.shape[-1]
    parts = [quantize(rows_) for quantize, rows_ in ((quantize_q8_k_x4_ref, x[:n_gemm]), (quantize_q8_k, x[n_gemm:]))
             if len(rows_)]
    xq, xd, bsums = (np.concatenate([p[i] for p in parts]) for i in range(3))
    xsub = bsums.reshape(n, -1, n_subs, 16 // n_subs).sum(-1).astype(np.int64)
    nb = cols // QK_K
    dots = np.einsum("tbse,rbse->trbs", xq.astype(np.int64).reshape(n, nb, n_subs, -1),
                     q.reshape(rows, nb, n_subs, -1))
    isub = dots * scale[None]                     # (n, rows, blocks, subs), exact integers
    msub = xsub[:, None] * wmin[None]
    scale_d = (d[None] * xd[:, None]).astype(np.float32)       # (n, rows, blocks)
    scale_m = (dmin[None] * xd[:, None]).astype(np.float32)
    groups = QK_K // _GROUP[0 if qtype == QT.Q4_K else 1]
    acc = np.zeros((n, rows), np.float32)
    accm = np.zeros((n, rows), np.float32)
    g = slice(0, n_gemm)
    v = slice(n_gemm, n)
    for b in range(nb):
        igroup = isub[:, :, b].reshape(n, rows, groups, -1).sum(-1).astype(np.float32)
        mgroup = msub[:, :, b].reshape(n, rows, groups, -1).sum(-1).astype(np.float32)
        for k in range(groups):
            acc[g] = fma_f32(igroup[g, :, k], scale_d[g, :, b], acc[g])
            accm[g] = fma_f32(mgroup[g, :, k], scale_m[g, :, b], accm[g])
        acc[v] = fma_f32(isub[v, :, b].sum(-1).astype(np.float32), scale_d[v, :, b], acc[v])
        accm[v] = fma_f32(msub[v, :, b].sum(-1).astype(np.float32), scale_m[v, :, b], accm[v])
    return acc - accm
