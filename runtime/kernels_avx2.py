"""The 32-element weight products on an AVX2 (+FMA, F16C) build of ggml-cpu, bit for bit (isa.LEVEL == "avx2"); the
decode products (the ggml_vec_dot_* and the repacked gemv, which have no AVX512 branch) on AVX512 builds too
(isa.X86_AVX2_DOTS: kernels.py then takes only the matvec kernels from here).

llama-cpp-python builds libggml-cpu with -march=native, so on an AVX2-only CPU ggml runs its AVX2 code. What computes
each product there (ggml-cpu.c ggml_compute_forward_mul_mat, repack.cpp, llamafile/sgemm.cpp, arch/x86/*.c):

  Q4_0, rows % 8 == 0   repacked at load time to block_q4_0x8 (ggml_repack_get_optimal_repack_type: q4_0_8x8_q8_0
                        whenever ggml_cpu_has_avx2(), as on AVX512). forward_mul_mat: activation rows
                        t < n - n % 4 by ggml_gemm_q4_0_8x8_q8_0 (gemm_q4_b32_8x8_q8_0_lut_avx, AVX2 branch), the
                        n % 4 others (all of them for n < 4, so decode too) by ggml_gemv_q4_0_8x8_q8_0
                        (gemv_q4_b32_8x8_q8_0_lut_avx). Both: one float accumulator per output,
                            acc = fma(float(integer block dot), d_w * d_x, acc)        block after block.
  Q4_0 otherwise, Q5_0, Q8_0
                        n >= 2: llamafile_sgemm -> tinyBLAS_Q0_AVX (VECTOR_REGISTERS 16 on AVX2: tiles gemm4xN /
                        gemmMx4 / gemm<RM,RN>; the tile shape changes which thread computes an output, not how);
                        n == 1: llamafile_sgemm declines (n < 2), ggml_vec_dot_{q4_0,q5_0,q8_0}_q8_0 (AVX2 branch).
                        Both: 8 float lanes (__m256) per output, lane l = elements 4l..4l+3 of each block
                        (maddubs + madd), lane = fma(d_w * d_x, float(lane sum), lane), then hsum_float_8
                        ((hi128 + lo128), then (0+2) + (1+3)). The two are the same float operations.
  Q4_1 and Q5_1         no tinyBLAS case and no x86 repack: ggml_vec_dot_q{4,5}_1_q8_1 for every output, any n; their
                        AVX2 order is kernels._dot_q4_1 (8 lanes + a scalar fma sum of m_w * s_x) and dot_q5_1 below
                        (the same order; kernels._dot_q5_1 is not it). Prefill: kernels._gemm_q32 (already that order).

The integer sums are exact (no int16 saturation is reachable: |w| <= 16 for Q4_0/Q5_0, |x| <= 127 for Q8_0
activations), so only the float order above matters. That order is the one kernels.py's prefill kernels
(_gemm_q32, "8-lane" and "sequential") already follow; tinyBLAS_Q0_AVX uses __m256 accumulators on AVX512 too. What
differs on AVX2 is the decode path: kernels._matvec_q4_0/q5_0/q8_0 (and decode.py's fused products) keep a faster
one-sum-per-block order that is not ggml's. The kernels here are the ggml order:
  _matvec_q8_0 / _matvec_q5_0 / _matvec_q4_0 (rows % 8 != 0)   ggml_vec_dot_*_q8_0, AVX2 branch (8 lanes)
  _matvec_q4_0 (rows % 8 == 0)                                   ggml_gemv_q4_0_8x8_q8_0 (one fma accumulator)
  matmul_q8_0 / matmul_q5_0 / matmul_q4_0 (_gemm_q32)            tinyBLAS_Q0_AVX (AVX2 integer sums: vpsignb,
                                                                 vpmaddubsw, vpmaddwd) / ggml_gemm_q4_0_8x8_q8_0;
                                                                 = kernels._gemm_q32_float, ~2x faster on AVX2
kernels.matmul's per-row path for n < 4 uses the matvec kernels (ggml: tinyBLAS for n = 2, 3, the same per-output
order; the repacked Q4_0 gemv for every row when n < 4). decode.py's fused products call the _dot_vec_* below.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import isa
from .kernels import (QK, _block_sums, _dot_rows16_q4_0_repacked, _f16_at, _fma, _hsum_float_8, _int8_at, _jit_inline,
                      _kernel, _quantize_q8_0_cpu, _quantize_q8_1_cpu, _u32_at)

_ROWS_PER_TASK = 16


# ----------------------------------------------------------------------------------------------------------------------
# One weight row against one quantised activation row (xq int8 (blocks, 32), xd float32 (blocks)), written out: the
# readable form of the vector dots below (_dot_vec_*, what the kernels run), tested equal to them. `lanes` is an
# 8-float scratch owned by the caller.


@_jit_inline
def dot_q8_0(w, r, xq, xd, f16, lanes):
    """ggml_vec_dot_q8_0_q8_0 (arch/x86/quants.c, __AVX2__) = tinyBLAS_Q0_AVX<block_q8_0> per output."""
    for lane in range(8):
        lanes[lane] = 0
    for b in range(w.shape[1]):
        scale = _f16_at(w, r, b, 0, f16) * xd[b]
        for l in range(8):
            s = np.int32(0)
            for k in range(4):
                s = np.int32(s + _int8_at(w, r, b, 2 + 4 * l + k) * np.int32(xq[b, 4 * l + k]))
            lanes[l] = _fma(scale, np.float32(s), lanes[l])
    return _hsum_float_8(lanes)


@_jit_inline
def dot_q4_0(w, r, xq, xd, f16, lanes):
    """ggml_vec_dot_q4_0_q8_0 (__AVX2__) = tinyBLAS_Q0_AVX<block_q4_0> per output: elements 0-15 are the low
    nibbles (lanes 0-3), 16-31 the high nibbles (lanes 4-7), each minus 8."""
    for lane in range(8):
        lanes[lane] = 0
    for b in range(w.shape[1]):
        scale = _f16_at(w, r, b, 0, f16) * xd[b]
        for l in range(4):
            lo = np.int32(0)
            hi = np.int32(0)
            for k in range(4):
                q = np.int32(w[r, b, 2 + 4 * l + k])
                lo = np.int32(lo + ((q & 15) - 8) * np.int32(xq[b, 4 * l + k]))
                hi = np.int32(hi + ((q >> 4) - 8) * np.int32(xq[b, 16 + 4 * l + k]))
            lanes[l] = _fma(scale, np.float32(lo), lanes[l])
            lanes[4 + l] = _fma(scale, np.float32(hi), lanes[4 + l])
    return _hsum_float_8(lanes)


@_jit_inline
def dot_q5_0(w, r, xq, xd, f16, lanes):
    """ggml_vec_dot_q5_0_q8_0 (__AVX2__) = tinyBLAS_Q0_AVX<block_q5_0> per output: value j = (nibble | bit j of qh
    << 4) - 16."""
    for lane in range(8):
        lanes[lane] = 0
    for b in range(w.shape[1]):
        scale = _f16_at(w, r, b, 0, f16) * xd[b]
        qh = _u32_at(w, r, b, 2)
        for l in range(4):
            lo = np.int32(0)
            hi = np.int32(0)
            for k in range(4):
                e = 4 * l + k
                q = np.int32(w[r, b, 6 + e])
                lo = np.int32(lo + (((q & 15) | np.int32(((qh >> e) & 1) << 4)) - 16) * np.int32(xq[b, e]))
                hi = np.int32(hi + (((q >> 4) | np.int32(((qh >> (e + 16)) & 1) << 4)) - 16)
                              * np.int32(xq[b, 16 + e]))
            lanes[l] = _fma(scale, np.float32(lo), lanes[l])
            lanes[4 + l] = _fma(scale, np.float32(hi), lanes[4 + l])
    return _hsum_float_8(lanes)


@_jit_inline
def dot_q4_0_repacked(w, r, xq, xsum, xd, f16):
    """ggml_gemv_q4_0_8x8_q8_0 / ggml_gemm_q4_0_8x8_q8_0 (arch/x86/repack.cpp, AVX2) per output: one accumulator,
    acc = fma(float(integer block dot), d_w * d_x, acc). The block dot is taken over the unsigned nibbles with the
    -8 offset applied through the activation block sum xsum (exact)."""
    acc = np.float32(0.0)
    for b in range(w.shape[1]):
        s = np.int32(0)
        for l in range(16):
            q = np.int32(w[r, b, 2 + l])
            s = np.int32(s + (q & 15) * np.int32(xq[b, l]) + (q >> 4) * np.int32(xq[b, l + 16]))
        acc = _fma(np.float32(s - 8 * xsum[b]), _f16_at(w, r, b, 0, f16) * xd[b], acc)
    return acc


# ----------------------------------------------------------------------------------------------------------------------
# The same dots as LLVM vector code (what the kernels below run; the functions above are their readable form and what
# the tests compare them with). Per block: the 32 signed weight values and activation quants as <32 x i8>, multiplied
# and summed by ggml's own AVX2 instructions (vpsignb, vpmaddubsw, vpmaddwd) -> <8 x i32> lane sums (elements
# 4l..4l+3), then
#   8 lanes:      acc8 = fma(splat(d_w * d_x), float(lane sums), acc8); at the end hsum_float_8(acc8)
#   sequential:   acc = fma(float(sum of the 8 lane sums), d_w * d_x, acc)


def _avx2_byte_dot_intrinsics(builder):
    """vpsignb, vpmaddubsw, vpmaddwd: ggml's AVX2 byte products (mul_sum_i8_pairs_float and its unsigned form)."""
    i8, i16, i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
    v32b, v16w, v8i = ir.VectorType(i8, 32), ir.VectorType(i16, 16), ir.VectorType(i32, 8)

    def declare(name, result, operands):
        return cgutils.get_or_insert_function(builder.module, ir.FunctionType(result, operands), name)
    return (declare("llvm.x86.avx2.psign.b", v32b, [v32b, v32b]),
            declare("llvm.x86.avx2.pmadd.ub.sw", v16w, [v32b, v32b]),
            declare("llvm.x86.avx2.pmadd.wd", v8i, [v16w, v16w]))


def _make_dot_vec(kind, sequential):
    """An intrinsic (w, r, xq, xd) -> float32: row r of w (uint8 (rows, blocks, bytes)) against xq int8 (blocks, 32)
    C-contiguous with scales xd; kind "Q8_0" / "Q4_0" / "Q5_0". Kind "Q5_1" takes (w, r, xq, xd, xs), xs the Q8_1
    activation sums: unsigned values (no offset), plus the sum of fma(m_w, xs, mins) over the blocks at the end."""
    with_mins = kind == "Q5_1"
    qs_at, qh_at = {"Q8_0": (2, 0), "Q4_0": (2, 0), "Q5_0": (6, 2), "Q5_1": (8, 4)}[kind]

    def codegen(context, builder, signature, args):
        w_t, _, xq_t, xd_t = signature.args[:4]
        w_v, r_v, xq_v, xd_v = args[:4]
        i8, i16, i32, i64, f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
        w_a = context.make_array(w_t)(context, builder, w_v)
        xq_a = context.make_array(xq_t)(context, builder, xq_v)
        xd_a = context.make_array(xd_t)(context, builder, xd_v)
        row_stride, block_stride = (builder.extract_value(w_a.strides, k) for k in (0, 1))
        nb = builder.extract_value(w_a.shape, 1)
        w_base = builder.gep(builder.bitcast(w_a.data, i8.as_pointer()), [builder.mul(r_v, row_stride)])
        xq_base = builder.bitcast(xq_a.data, i8.as_pointer())
        v8f = ir.VectorType(f32, 8)

        def vec(ty, values):
            return ir.Constant(ir.VectorType(ty, len(values)), values)

        def load(ptr, ty):
            return builder.load(builder.bitcast(ptr, ty.as_pointer()), align=1)

        fma8 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8f, [v8f, v8f, v8f]),
                                              "llvm.fma.v8f32")
        v32i8 = ir.VectorType(i8, 32)
        if isa.AVX2:
            psign, maddubs, madd = _avx2_byte_dot_intrinsics(builder)
        fma1 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32, f32, f32]),
                                              "llvm.fma.f32")
        acc = cgutils.alloca_once_value(builder, ir.Constant(v8f, [0.0] * 8) if not sequential
                                        else ir.Constant(f32, 0.0))
        if with_mins:
            xs_a = context.make_array(signature.args[4])(context, builder, args[4])
            mins = cgutils.alloca_once_value(builder, ir.Constant(f32, 0.0))
        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            block = builder.gep(w_base, [builder.mul(b, block_stride)])
            d = builder.fpext(builder.bitcast(load(block, i16), ir.HalfType()), f32)
            scale = builder.fmul(d, builder.load(builder.gep(xd_a.data, [b])))
            if with_mins:  # summs = fma(m_w, s_x, summs), block by block
                m = builder.fpext(builder.bitcast(load(builder.gep(block, [ir.Constant(i64, 2)]), i16),
                                                  ir.HalfType()), f32)
                xs_b = builder.load(builder.gep(xs_a.data, [b]))
                builder.store(builder.call(fma1, [m, xs_b, builder.load(mins)]), mins)
            x8 = load(builder.gep(xq_base, [builder.mul(b, ir.Constant(i64, 32))]), v32i8)
            if kind == "Q8_0":
                q8 = load(builder.gep(block, [ir.Constant(i64, 2)]), v32i8)
            else:  # bytes_from_nibbles_32 (+ the fifth bits of Q5_0), minus the offset: signed values
                qs = load(builder.gep(block, [ir.Constant(i64, qs_at)]), ir.VectorType(i8, 16))
                lo = builder.and_(qs, vec(i8, [15] * 16))
                hi = builder.lshr(qs, vec(i8, [4] * 16))
                q8 = builder.shuffle_vector(lo, hi, vec(i32, list(range(32))))
                if kind in ("Q5_0", "Q5_1"):  # bit j of qh is the fifth bit of element j
                    # ggml's bytes_from_bits_32: byte j/8 of qh in lane j, tested against bit j%8 (byte lanes;
                    # 32 shifts of 32-bit lanes took half the time of the whole dot)
                    qh = load(builder.gep(block, [ir.Constant(i64, qh_at)]), ir.VectorType(i8, 4))
                    qh32 = builder.shuffle_vector(qh, ir.Constant(ir.VectorType(i8, 4), None),
                                                  vec(i32, [j // 8 for j in range(32)]))
                    masked = builder.and_(qh32, vec(i8, [1 << (j % 8) for j in range(32)]))
                    bits = builder.icmp_unsigned("!=", masked, vec(i8, [0] * 32))
                    q8 = builder.or_(q8, builder.select(bits, vec(i8, [16] * 32), vec(i8, [0] * 32)))
                if kind != "Q5_1":
                    q8 = builder.sub(q8, vec(i8, [8 if kind == "Q4_0" else 16] * 32))
            # ggml's mul_sum_i8_pairs_float: |q| (unsigned) times y with q's sign, maddubs (byte pairs -> i16),
            # madd with ones (i16 pairs -> i32): lane l = elements 4l..4l+3, the very instructions ggml runs
            if isa.AVX2 and with_mins:  # mul_sum_us8_pairs_float: the values are unsigned already
                quads = builder.call(madd, [builder.call(maddubs, [q8, x8]), vec(i16, [1] * 16)])
            elif isa.AVX2:
                ax = builder.call(psign, [q8, q8])
                sy = builder.call(psign, [x8, q8])
                quads = builder.call(madd, [builder.call(maddubs, [ax, sy]), vec(i16, [1] * 16)])
            else:  # other CPUs (these orders are x86's, but the kernels must still compile): the same sums
                p = builder.sext(builder.mul(builder.sext(q8, ir.VectorType(i16, 32)),
                                             builder.sext(x8, ir.VectorType(i16, 32))), ir.VectorType(i32, 32))
                pairs = builder.add(builder.shuffle_vector(p, p, vec(i32, list(range(0, 32, 2)))),
                                    builder.shuffle_vector(p, p, vec(i32, list(range(1, 32, 2)))))
                quads = builder.add(builder.shuffle_vector(pairs, pairs, vec(i32, list(range(0, 16, 2)))),
                                    builder.shuffle_vector(pairs, pairs, vec(i32, list(range(1, 16, 2)))))
            if sequential:
                v = quads  # integer tree sum (exact in any order)
                for half in (4, 2, 1):
                    v = builder.add(builder.shuffle_vector(v, v, vec(i32, list(range(half)))),
                                    builder.shuffle_vector(v, v, vec(i32, list(range(half, 2 * half)))))
                total = builder.extract_element(v, ir.Constant(i32, 0))
                builder.store(builder.call(fma1, [builder.sitofp(total, f32), scale, builder.load(acc)]), acc)
            else:
                splat = builder.shuffle_vector(
                    builder.insert_element(ir.Constant(v8f, None), scale, ir.Constant(i32, 0)),
                    ir.Constant(v8f, None), vec(i32, [0] * 8))
                builder.store(builder.call(fma8, [splat, builder.sitofp(quads, v8f), builder.load(acc)]), acc)
        result = builder.load(acc)
        if sequential:
            return result
        lane = [builder.extract_element(result, ir.Constant(i32, k)) for k in range(8)]
        r = [builder.fadd(lane[4 + k], lane[k]) for k in range(4)]  # hsum_float_8
        total = builder.fadd(builder.fadd(r[0], r[2]), builder.fadd(r[1], r[3]))
        return builder.fadd(total, builder.load(mins)) if with_mins else total

    if with_mins:
        @intrinsic
        def dot_vec(typingctx, w, r, xq, xd, xs):
            return types.float32(w, types.int64, xq, xd, xs), codegen
    else:
        @intrinsic
        def dot_vec(typingctx, w, r, xq, xd):
            return types.float32(w, types.int64, xq, xd), codegen
    return dot_vec


@intrinsic
def _prefetch_row(typingctx, w, r):
    """Ask for row r of w (uint8 (rows, blocks, bytes), C-contiguous) to be brought into the cache; nothing when w
    has no row r (callers ask for a row a few ahead of the one they compute). Decode reads each weight once, from
    memory: the hardware prefetcher alone left the dots waiting on it (the output head ran at a third of the read
    bandwidth)."""
    sig = types.void(w, types.int64)

    def codegen(context, builder, signature, args):
        i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
        w_a = context.make_array(signature.args[0])(context, builder, args[0])
        row = args[1]
        rows = builder.extract_value(w_a.shape, 0)
        in_range = builder.and_(builder.icmp_signed(">=", row, ir.Constant(i64, 0)),
                                builder.icmp_signed("<", row, rows))
        with builder.if_then(in_range):
            row_stride = builder.extract_value(w_a.strides, 0)
            base = builder.gep(builder.bitcast(w_a.data, i8.as_pointer()), [builder.mul(row, row_stride)])
            prefetch = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
                ir.VoidType(), [i8.as_pointer(), i32, i32, i32]), "llvm.prefetch.p0i8")
            with cgutils.for_range_slice(builder, ir.Constant(i64, 0), row_stride, ir.Constant(i64, 64)) as (offset, _):
                builder.call(prefetch, [builder.gep(base, [offset]), ir.Constant(i32, 0), ir.Constant(i32, 3),
                                        ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return sig, codegen


PREFETCH_ROWS = 4  # rows ahead


_dot_vec_q8_0 = _make_dot_vec("Q8_0", False)
_dot_vec_q4_0 = _make_dot_vec("Q4_0", False)
_dot_vec_q5_0 = _make_dot_vec("Q5_0", False)
_dot_vec_q4_0_repacked = _make_dot_vec("Q4_0", True)
_dot_vec_q5_1 = _make_dot_vec("Q5_1", False)


# ----------------------------------------------------------------------------------------------------------------------
# Decode kernels (x: one float32 row): the activation quantised once (quantize_row_q8_0, x86), rows in parallel.


@_kernel(parallel=True)
def _matvec_q8_0(w, x, f16):
    nb = w.shape[1]
    xq = np.empty((nb, QK), np.int8)
    xd = np.empty(nb, np.float32)
    _quantize_q8_0_cpu(x, xq, xd)
    out = np.empty(w.shape[0], np.float32)
    for task in prange((w.shape[0] + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
        for r in range(task * _ROWS_PER_TASK, min(w.shape[0], (task + 1) * _ROWS_PER_TASK)):
            _prefetch_row(w, r + PREFETCH_ROWS)
            out[r] = _dot_vec_q8_0(w, r, xq, xd)
    return out


@_kernel(parallel=True)
def _matvec_q5_0(w, x, f16):
    nb = w.shape[1]
    xq = np.empty((nb, QK), np.int8)
    xd = np.empty(nb, np.float32)
    _quantize_q8_0_cpu(x, xq, xd)
    out = np.empty(w.shape[0], np.float32)
    for task in prange((w.shape[0] + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
        for r in range(task * _ROWS_PER_TASK, min(w.shape[0], (task + 1) * _ROWS_PER_TASK)):
            out[r] = _dot_vec_q5_0(w, r, xq, xd)
    return out


@_kernel(parallel=True)
def _matvec_q4_0(w, x, f16):
    """Repacked (rows % 8 == 0): the gemv order; otherwise ggml_vec_dot_q4_0_q8_0's 8 lanes."""
    nb = w.shape[1]
    xq = np.empty((nb, QK), np.int8)
    xd = np.empty(nb, np.float32)
    _quantize_q8_0_cpu(x, xq, xd)
    repacked = w.shape[0] % 8 == 0
    xsum = _block_sums(xq)
    out = np.empty(w.shape[0], np.float32)
    for task in prange((w.shape[0] + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
        r0, r1 = task * _ROWS_PER_TASK, min(w.shape[0], (task + 1) * _ROWS_PER_TASK)
        if repacked and r1 - r0 == 16:  # the gemv's order, 16 rows in one vector
            _dot_rows16_q4_0_repacked(w, r0, xq, xsum, xd, out, r0)
            continue
        for r in range(r0, r1):
            if repacked:
                out[r] = _dot_vec_q4_0_repacked(w, r, xq, xd)
            else:
                out[r] = _dot_vec_q4_0(w, r, xq, xd)
    return out


# Q5_1: ggml_vec_dot_q5_1_q8_1 (arch/x86/quants.c, __AVX2__) for every output, any n (no tinyBLAS case, no x86
# repack). kernels._dot_q5_1 (kept for the AVX512 builds) sums lane l over elements l, l+8, l+16, l+24 with a
# multiply-add; ggml's AVX2 code is the Q4_1 order (kernels._dot_q4_1): bytes_from_nibbles_32 puts the low nibbles
# at elements 0-15 and the high ones at 16-31, the qh bit j (bytes_from_bits_32 & 0x10) is or'ed into element j,
# mul_sum_us8_pairs_float gives lane l = elements 4l..4l+3 (maddubs + madd, exact: |v| <= 31, |x| <= 127),
# acc = fma(q, d_w * d_x, acc), summs += m_w * s_x (GCC contracts it to an fma), hsum_float_8(acc) + summs.


@_jit_inline
def dot_q5_1(w, r, xq, xd, xs, f16, lanes):
    """ggml_vec_dot_q5_1_q8_1, x86 AVX2 order bit for bit (see above)."""
    for lane in range(8):
        lanes[lane] = 0
    mins = np.float32(0.0)
    for b in range(w.shape[1]):
        scale = _f16_at(w, r, b, 0, f16) * xd[b]
        mins = _fma(_f16_at(w, r, b, 2, f16), xs[b], mins)
        qh = _u32_at(w, r, b, 4)
        for l in range(4):
            lo = np.int32(0)
            hi = np.int32(0)
            for k in range(4):
                e = 4 * l + k
                q = np.int32(w[r, b, 8 + e])
                lo = np.int32(lo + ((q & 15) | np.int32(((qh >> e) & 1) << 4)) * np.int32(xq[b, e]))
                hi = np.int32(hi + ((q >> 4) | np.int32(((qh >> (e + 16)) & 1) << 4)) * np.int32(xq[b, 16 + e]))
            lanes[l] = _fma(scale, np.float32(lo), lanes[l])
            lanes[4 + l] = _fma(scale, np.float32(hi), lanes[4 + l])
    return _hsum_float_8(lanes) + mins


@_kernel(parallel=True)
def _matvec_q5_1(w, x, f16):
    nb = w.shape[1]
    xq = np.empty((nb, QK), np.int8)
    xd = np.empty(nb, np.float32)
    xs = np.empty(nb, np.float32)
    _quantize_q8_1_cpu(x, xq, xd, xs)
    out = np.empty(w.shape[0], np.float32)
    for task in prange((w.shape[0] + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
        for r in range(task * _ROWS_PER_TASK, min(w.shape[0], (task + 1) * _ROWS_PER_TASK)):
            out[r] = _dot_vec_q5_1(w, r, xq, xd, xs)  # = dot_q5_1, as LLVM vector code
    return out


# ----------------------------------------------------------------------------------------------------------------------
# numpy references (float32 operations in ggml's order, vectorised over rows; slow, for the tests)


def _fma_np(a, b, c):
    """float32 fma(a, b, c): a*b is exact in float64 (48 significant bits); the float64 sum and the float32 rounding
    can round twice, which differs from one rounding only on a float32 tie of the float64 sum (~2^-29 a step)."""
    return (np.float64(a) * np.float64(b) + np.float64(c)).astype(np.float32)


def values_q32(blocks: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows, nb, bytes) uint8 blocks -> (int32 values (rows, nb, 32), float32 scales (rows, nb))."""
    d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q8_0":
        return blocks[:, :, 2:34].view(np.int8).astype(np.int32), d
    if kind == "Q4_0":
        qs = blocks[:, :, 2:18].astype(np.int32)
        return np.concatenate([(qs & 15) - 8, (qs >> 4) - 8], axis=-1), d
    assert kind == "Q5_0"
    qh = blocks[:, :, 2:6].copy().view(np.uint32)[..., 0].astype(np.int64)
    qs = blocks[:, :, 6:22].astype(np.int32)
    bits = ((qh[..., None] >> np.arange(32)) & 1).astype(np.int32) << 4
    return (np.concatenate([qs & 15, qs >> 4], axis=-1) | bits) - 16, d


def matvec_ref(blocks: np.ndarray, kind: str, xq: np.ndarray, xd: np.ndarray, repacked: bool) -> np.ndarray:
    """One quantised activation row (xq int8 (nb, 32), xd float32 (nb)) against every row of `blocks`, in the order
    above: 8 lanes + hsum_float_8, or (repacked Q4_0) one accumulator."""
    v, d = values_q32(blocks, kind)
    rows, nb = d.shape
    lane_sums = (v * xq.astype(np.int32)[None]).reshape(rows, nb, 8, 4).sum(-1)  # exact int32
    scale = d * xd[None].astype(np.float32)  # float32 products, as _mm_mul_ps / scalar float
    if repacked:
        acc = np.zeros(rows, np.float32)
        for b in range(nb):
            acc = _fma_np(lane_sums[:, b].sum(-1).astype(np.float32), scale[:, b], acc)
        return acc
    lanes = np.zeros((rows, 8), np.float32)
    for b in range(nb):
        lanes = _fma_np(scale[:, b, None], lane_sums[:, b].astype(np.float32), lanes)
    r = [lanes[:, 4 + i] + lanes[:, i] for i in range(4)]
    return ((r[0] + r[2]) + (r[1] + r[3])).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------------
# Prefill: the same products as kernels._gemm_q32 (whose float order is already ggml's on AVX2, see the docstring),
# with the integer block sums as tinyBLAS_Q0_AVX computes them on AVX2: per block one __m256i of 8 lane sums,
# madd(1, maddubs(sign(w, w), sign(x, w))) (vpsignb, vpmaddubsw, vpmaddwd: no saturation, |w| <= 128, |x| <= 127),
# converted and fma'd per output into its own __m256 (8 lanes) or, repacked Q4_0, reduced to one integer and fma'd
# into one float. A call computes RM weight rows x RN activation rows (tinyBLAS's tiles: the accumulators stay in
# registers); the weight tile (16 rows, int8) is unpacked once and swept across every activation row.

_GEMM_ROWS = 16


def _make_gemm_tile(rm, rn, sequential):
    """An intrinsic (wq, wd, xq, xd, i0, t0, out, o0): out[t0 + t, o0 + i0 + i] for i < rm, t < rn; wq int8
    (rows, blocks, 32), wd float32 (rows, blocks), xq int8 (n, blocks, 32), xd float32 (n, blocks), all C-contiguous;
    out float32 (n, cols) C-contiguous."""

    @intrinsic
    def gemm_tile(typingctx, wq, wd, xq, xd, i0, t0, out, o0):
        sig = types.void(wq, wd, xq, xd, types.int64, types.int64, out, types.int64)

        def codegen(context, builder, signature, args):
            wq_v, wd_v, xq_v, xd_v, i0_v, t0_v, out_v, o0_v = args
            i8, i16, i32, i64, f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
            v32b, v16w, v8i, v8f = (ir.VectorType(i8, 32), ir.VectorType(i16, 16), ir.VectorType(i32, 8),
                                    ir.VectorType(f32, 8))

            def arr(k, v):
                return context.make_array(signature.args[k])(context, builder, v)

            def c64(v):
                return ir.Constant(i64, v)

            wq_a, wd_a, xq_a, xd_a, out_a = arr(0, wq_v), arr(1, wd_v), arr(2, xq_v), arr(3, xd_v), arr(6, out_v)
            nb = builder.extract_value(wq_a.shape, 1)
            ncols = builder.extract_value(out_a.shape, 1)
            wq_p = builder.bitcast(wq_a.data, v32b.as_pointer())  # one <32 x i8> per (row, block)
            xq_p = builder.bitcast(xq_a.data, v32b.as_pointer())
            w_rows = [builder.mul(builder.add(i0_v, c64(i)), nb) for i in range(rm)]
            x_rows = [builder.mul(builder.add(t0_v, c64(t)), nb) for t in range(rn)]

            psign, maddubs, maddwd = _avx2_byte_dot_intrinsics(builder)
            fma8 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8f, [v8f, v8f, v8f]),
                                                  "llvm.fma.v8f32")
            fma1 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32, f32, f32]),
                                                  "llvm.fma.f32")
            phadd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8i, [v8i, v8i]),
                                                   "llvm.x86.avx2.phadd.d")
            v4f = ir.VectorType(f32, 4)
            fma4 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v4f, [v4f, v4f, v4f]),
                                                  "llvm.fma.v4f32")
            ones = ir.Constant(v16w, [1] * 16)
            zero = ir.Constant(f32, 0.0) if sequential else ir.Constant(v8f, [0.0] * 8)
            acc = [[cgutils.alloca_once_value(builder, zero) for _ in range(rn)] for _ in range(rm)]
            # sequential, 4 weight rows: the 4 outputs of an activation row in one <4 x float> (lane i = row i)
            acc4 = [cgutils.alloca_once_value(builder, ir.Constant(v4f, [0.0] * 4)) for _ in range(rn)]
            vec4 = sequential and rm == 4
            with cgutils.for_range(builder, nb) as loop:
                b = loop.index
                a = [builder.load(builder.gep(wq_p, [builder.add(w_rows[i], b)]), align=1) for i in range(rm)]
                ua = [builder.call(psign, [a[i], a[i]]) for i in range(rm)]
                da = [builder.load(builder.gep(wd_a.data, [builder.add(w_rows[i], b)])) for i in range(rm)]
                x = [builder.load(builder.gep(xq_p, [builder.add(x_rows[t], b)]), align=1) for t in range(rn)]
                dx = [builder.load(builder.gep(xd_a.data, [builder.add(x_rows[t], b)])) for t in range(rn)]
                if vec4:
                    da4 = ir.Constant(v4f, None)
                    for i in range(4):
                        da4 = builder.insert_element(da4, da[i], ir.Constant(i32, i))
                    for t in range(rn):
                        q = [builder.call(maddwd, [ones, builder.call(maddubs, [ua[i], builder.call(psign,
                                                                                                   [x[t], a[i]])])])
                             for i in range(4)]
                        # phadd(phadd(q0, q1), phadd(q2, q3)) = [q0, q1, q2, q3 over 128-bit half 0 | ... half 1]
                        h = builder.call(phadd, [builder.call(phadd, [q[0], q[1]]), builder.call(phadd, [q[2], q[3]])])
                        v4i = ir.VectorType(i32, 4)
                        tot = builder.add(builder.shuffle_vector(h, h, ir.Constant(v4i, [0, 1, 2, 3])),
                                          builder.shuffle_vector(h, h, ir.Constant(v4i, [4, 5, 6, 7])))
                        dx4 = builder.shuffle_vector(builder.insert_element(ir.Constant(v4f, None), dx[t],
                                                                            ir.Constant(i32, 0)),
                                                     ir.Constant(v4f, None), ir.Constant(v4i, [0] * 4))
                        builder.store(builder.call(fma4, [builder.sitofp(tot, v4f), builder.fmul(da4, dx4),
                                                          builder.load(acc4[t])]), acc4[t])
                for i in range(rm if not vec4 else 0):
                    for t in range(rn):
                        signed_x = builder.call(psign, [x[t], a[i]])
                        q = builder.call(maddwd, [ones, builder.call(maddubs, [ua[i], signed_x])])
                        scale = builder.fmul(da[i], dx[t])
                        if sequential:
                            v = q
                            for half in (4, 2, 1):
                                idx = ir.Constant(ir.VectorType(i32, half), list(range(half)))
                                hi = ir.Constant(ir.VectorType(i32, half), list(range(half, 2 * half)))
                                v = builder.add(builder.shuffle_vector(v, v, idx), builder.shuffle_vector(v, v, hi))
                            total = builder.sitofp(builder.extract_element(v, ir.Constant(i32, 0)), f32)
                            builder.store(builder.call(fma1, [total, scale, builder.load(acc[i][t])]), acc[i][t])
                        else:
                            splat = builder.shuffle_vector(
                                builder.insert_element(ir.Constant(v8f, None), scale, ir.Constant(i32, 0)),
                                ir.Constant(v8f, None), ir.Constant(v8i, [0] * 8))
                            builder.store(builder.call(fma8, [splat, builder.sitofp(q, v8f), builder.load(acc[i][t])]),
                                          acc[i][t])
            for i in range(rm):
                for t in range(rn):
                    result = builder.load(acc[i][t])
                    if vec4:
                        result = builder.extract_element(builder.load(acc4[t]), ir.Constant(i32, i))
                    if not sequential:  # hsum_float_8
                        lane = [builder.extract_element(result, ir.Constant(i32, k)) for k in range(8)]
                        r = [builder.fadd(lane[4 + k], lane[k]) for k in range(4)]
                        result = builder.fadd(builder.fadd(r[0], r[2]), builder.fadd(r[1], r[3]))
                    index = builder.add(builder.mul(builder.add(t0_v, c64(t)), ncols),
                                        builder.add(o0_v, builder.add(i0_v, c64(i))))
                    builder.store(result, builder.gep(out_a.data, [index]))
            return context.get_dummy_value()
        return sig, codegen
    return gemm_tile


_tile_4x2 = _make_gemm_tile(4, 2, False)
_tile_4x1 = _make_gemm_tile(4, 1, False)
_tile_1x2 = _make_gemm_tile(1, 2, False)
_tile_1x1 = _make_gemm_tile(1, 1, False)
_tile_4x2_seq = _make_gemm_tile(4, 2, True)
_tile_4x1_seq = _make_gemm_tile(4, 1, True)
_tile_1x2_seq = _make_gemm_tile(1, 2, True)
_tile_1x1_seq = _make_gemm_tile(1, 1, True)

_KIND_Q4_0, _KIND_Q5_0, _KIND_Q8_0 = 0, 2, 3  # kernels._KIND_*


@_jit_inline
def _unpack_row_i8(w, r, kind, f16, wq, wd, i):
    """Weight row r -> wq[i] (blocks, 32) int8 values, wd[i] (blocks) float32 scales."""
    for b in range(w.shape[1]):
        wd[i, b] = _f16_at(w, r, b, 0, f16)
        if kind == _KIND_Q8_0:
            for e in range(QK):
                wq[i, b, e] = np.int8(_int8_at(w, r, b, 2 + e))
        elif kind == _KIND_Q5_0:
            qh = _u32_at(w, r, b, 2)
            for e in range(16):
                q = np.int32(w[r, b, 6 + e])
                wq[i, b, e] = np.int8(((q & 15) | np.int32(((qh >> e) & 1) << 4)) - 16)
                wq[i, b, e + 16] = np.int8(((q >> 4) | np.int32(((qh >> (e + 16)) & 1) << 4)) - 16)
        else:
            for e in range(16):
                q = np.int32(w[r, b, 2 + e])
                wq[i, b, e] = np.int8((q & 15) - 8)
                wq[i, b, e + 16] = np.int8((q >> 4) - 8)


@_kernel(parallel=True)
def _gemm_q32(w, x, f16, kind, sequential):
    """x (n, cols) @ W.T for Q4_0 / Q5_0 / Q8_0 (`kind` as kernels._KIND_*); sequential=True: the repacked Q4_0
    order. Equal to kernels._gemm_q32_float(w, x, f16, kind, sequential)."""
    n, nb, rows = x.shape[0], w.shape[1], w.shape[0]
    xq = np.empty((n, nb, QK), np.int8)
    xd = np.empty((n, nb), np.float32)
    for t in prange(n):
        _quantize_q8_0_cpu(x[t], xq[t], xd[t])
    out = np.empty((n, rows), np.float32)
    n2 = n - n % 2
    for task in prange((rows + _GEMM_ROWS - 1) // _GEMM_ROWS):
        r0 = task * _GEMM_ROWS
        m = min(_GEMM_ROWS, rows - r0)
        wq = np.empty((m, nb, QK), np.int8)
        wd = np.empty((m, nb), np.float32)
        for i in range(m):
            _unpack_row_i8(w, r0 + i, kind, f16, wq, wd, i)
        m4 = m - m % 4
        for t in range(0, n2, 2):
            for i in range(0, m4, 4):
                if sequential:
                    _tile_4x2_seq(wq, wd, xq, xd, i, t, out, r0)
                else:
                    _tile_4x2(wq, wd, xq, xd, i, t, out, r0)
            for i in range(m4, m):
                if sequential:
                    _tile_1x2_seq(wq, wd, xq, xd, i, t, out, r0)
                else:
                    _tile_1x2(wq, wd, xq, xd, i, t, out, r0)
        for t in range(n2, n):
            for i in range(0, m4, 4):
                if sequential:
                    _tile_4x1_seq(wq, wd, xq, xd, i, t, out, r0)
                else:
                    _tile_4x1(wq, wd, xq, xd, i, t, out, r0)
            for i in range(m4, m):
                if sequential:
                    _tile_1x1_seq(wq, wd, xq, xd, i, t, out, r0)
                else:
                    _tile_1x1(wq, wd, xq, xd, i, t, out, r0)
    return out


def matmul_q4_0(w, x, f16):
    return _gemm_q32(w, x, f16, _KIND_Q4_0, w.shape[0] % 8 == 0)  # ggml repacks only row counts divisible by 8


def matmul_q5_0(w, x, f16):
    return _gemm_q32(w, x, f16, _KIND_Q5_0, False)


def matmul_q8_0(w, x, f16):
    return _gemm_q32(w, x, f16, _KIND_Q8_0, False)
