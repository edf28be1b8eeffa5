"""The integer block sums of the 32-element prefill products (kernels._gemm_q32) as AVX512-VNNI int8 dot products.

llama.cpp's batched Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 products (kernels.py, "Prefill kernels") need, per weight row, activation
row and block, either the 8 sums of 4 adjacent products (lane l: elements 4l..4l+3, the AVX2 vec_dot / tinyBLAS
order) or their total (the repacked Q4_0 order). vpdpbusd computes exactly that sum of 4 byte products in each 32-bit
lane, so one instruction gives one lane's integer sum for 16 weight rows. Integer sums are exact in any order; the
float operations after them are kernels._gemm_q32_tile's, in its order, only in 16-row vectors:
    scale = d_w * d_x;  lane_l = fma(scale, float(dot4_l), lane_l)       (8-lane order; then hsum_float_8 [+ mins])
    acc = fma(float(sum of the 8 dot4), scale, acc)                      (repacked order)
    mins = fma(m_w, s_x, mins)                                           (Q4_1, Q5_1)

vpdpbusd multiplies unsigned by signed bytes. The weight values (-128..127 for Q8_0, smaller for the rest) are stored
offset by 128 as unsigned bytes, the activation quants as they are (int8); the offset's contribution,
128 * (sum of the 4 activation quants), is subtracted by starting the accumulator at -128 * that sum. With the
corrections on the activation side the weight tile, which every activation row reads again, stays at one byte per
weight and in L1 (measured ~25% faster than per-weight-row corrections).

Activations, per row t:  xq int8 (blocks * 32), xc int32 (blocks, 8) = -128 * sum of elements 4l..4l+3,
                         xcs int32 (blocks) = sum_l xc, xd float32 (blocks) scale, xs float32 (blocks) Q8_1 sum
Weight tile, 16 rows i:  wv uint8 (blocks, 8, 16, 4) wv[b, l, i, k] = 128 + value of element 4l+k of block b of row i
                         wd, wm float32 (blocks, 16) block scale, (Q4_1/Q5_1) block min
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

TILE = 16
# numba compiles for the host CPU; without VNNI kernels._gemm_q32 is the float32 version (same results, ~5x slower)
HAVE_VNNI = "+avx512vnni" in llvm.get_host_cpu_features().flatten().split(",")


def splat16(builder, x):
    """<16 x T> with every lane x (a value of type T)."""
    v16, i32 = ir.VectorType(x.type, TILE), ir.IntType(32)
    one = builder.insert_element(ir.Constant(v16, None), x, ir.Constant(i32, 0))
    return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(i32, TILE), [0] * TILE))


def declare_vpdpbusd(builder):
    """llvm.x86.avx512.vpdpbusd.512 (acc, unsigned bytes, signed bytes) -> acc + the 4-product sum per i32 lane."""
    v16i = ir.VectorType(ir.IntType(32), TILE)
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16i, [v16i, v16i, v16i]),
                                          "llvm.x86.avx512.vpdpbusd.512")


def _make_dot_tile16(n_act):
    """An intrinsic (xq, xc, xcs, xd, xs, wv, wd, wm, t, sequential, with_min, out): out[t + a, 0:16] = activation
    row t + a (a < n_act) against one 16-row weight tile, in _gemm_q32_tile's float order. Several activation rows
    per pass share the weight loads."""

    @intrinsic
    def dot_tile16(typingctx, xq, xc, xcs, xd, xs, wv, wd, wm, t, sequential, with_min, out):
        sig = types.void(xq, xc, xcs, xd, xs, wv, wd, wm, types.int64, types.boolean, types.boolean, out)

        def codegen(context, builder, signature, args):
            xq_v, xc_v, xcs_v, xd_v, xs_v, wv_v, wd_v, wm_v, t_v, seq_v, min_v, out_v = args
            i8, i32, i64, f32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
            v16i, v16f = ir.VectorType(i32, 16), ir.VectorType(f32, 16)

            def data(k, value):
                return context.make_array(signature.args[k])(context, builder, value)

            def const(v):
                return ir.Constant(i64, v)

            wd_a = data(6, wd_v)
            nb = builder.extract_value(wd_a.shape, 0)
            rows = [builder.add(t_v, const(a)) for a in range(n_act)]

            def row_ptrs(k, value, per_block):  # row t + a of an activation array with `per_block` items a block
                base = data(k, value).data
                return [builder.gep(base, [builder.mul(r, builder.mul(nb, const(per_block)))]) for r in rows]

            xq_rows = [builder.bitcast(p, i32.as_pointer()) for p in row_ptrs(0, xq_v, 32)]  # 4 quants a load
            xc_rows, xcs_rows = row_ptrs(1, xc_v, 8), row_ptrs(2, xcs_v, 1)
            xd_rows, xs_rows = row_ptrs(3, xd_v, 1), row_ptrs(4, xs_v, 1)
            wv_p = builder.bitcast(data(5, wv_v).data, v16i.as_pointer())     # one <16 x i32> per (block, lane)
            wd_p = builder.bitcast(wd_a.data, v16f.as_pointer())
            wm_p = builder.bitcast(data(7, wm_v).data, v16f.as_pointer())

            dpbusd = declare_vpdpbusd(builder)
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f, [v16f, v16f, v16f]),
                                                 "llvm.fma.v16f32")

            def splat(ptr, index):
                return splat16(builder, builder.load(builder.gep(ptr, [index])))

            zero = ir.Constant(v16f, [0.0] * 16)
            lanes = [[cgutils.alloca_once_value(builder, zero) for _ in range(8)] for _ in range(n_act)]
            mins = [cgutils.alloca_once_value(builder, zero) for _ in range(n_act)]
            with cgutils.for_range(builder, nb) as loop:
                b = loop.index
                b8 = builder.mul(b, const(8))
                wd_b = builder.load(builder.gep(wd_p, [b]), align=4)
                scales = [builder.fmul(wd_b, splat(xd_rows[a], b)) for a in range(n_act)]

                def dot4(a, l, acc, w):  # acc + (sum over k of wv[b, l, :, k] * x[4l + k]), 16 weight rows
                    return builder.call(dpbusd, [acc, w, splat(xq_rows[a], builder.add(b8, const(l)))])

                with builder.if_else(seq_v) as (then, otherwise):
                    with then:
                        # two dependency chains (lanes 0-3, 4-7): vpdpbusd's latency, not its throughput, would
                        # otherwise bound the loop
                        isums = [[splat(xcs_rows[a], b), ir.Constant(v16i, [0] * 16)] for a in range(n_act)]
                        for l in range(8):
                            w = builder.load(builder.gep(wv_p, [builder.add(b8, const(l))]), align=4)
                            for a in range(n_act):
                                isums[a][l // 4] = dot4(a, l, isums[a][l // 4], w)
                        for a in range(n_act):
                            isum = builder.add(isums[a][0], isums[a][1])
                            acc = builder.call(fma, [builder.sitofp(isum, v16f), scales[a],
                                                     builder.load(lanes[a][0])])
                            builder.store(acc, lanes[a][0])
                    with otherwise:
                        for l in range(8):
                            w = builder.load(builder.gep(wv_p, [builder.add(b8, const(l))]), align=4)
                            for a in range(n_act):
                                s = dot4(a, l, splat(xc_rows[a], builder.add(b8, const(l))), w)
                                builder.store(builder.call(fma, [scales[a], builder.sitofp(s, v16f),
                                                                 builder.load(lanes[a][l])]), lanes[a][l])
                with builder.if_then(min_v):
                    wm_b = builder.load(builder.gep(wm_p, [b]), align=4)
                    for a in range(n_act):
                        builder.store(builder.call(fma, [wm_b, splat(xs_rows[a], b),
                                                         builder.load(mins[a])]), mins[a])

            out_a = data(11, out_v)
            for a in range(n_act):
                dst = builder.bitcast(builder.gep(out_a.data, [builder.mul(rows[a], const(TILE))]),
                                      v16f.as_pointer())
                result = cgutils.alloca_once_value(builder, builder.load(lanes[a][0]))
                with builder.if_then(builder.not_(seq_v)):
                    L = [builder.load(lane) for lane in lanes[a]]  # hsum_float_8: high + low half, (0+2) + (1+3)
                    h = builder.fadd(builder.fadd(builder.fadd(L[4], L[0]), builder.fadd(L[6], L[2])),
                                     builder.fadd(builder.fadd(L[5], L[1]), builder.fadd(L[7], L[3])))
                    builder.store(h, result)
                    with builder.if_then(min_v):
                        builder.store(builder.fadd(h, builder.load(mins[a])), result)
                builder.store(builder.load(result), dst, align=4)
            return context.get_dummy_value()
        return sig, codegen
    return dot_tile16


N_ACT = 2
_dot_tile16 = _make_dot_tile16(1)
_dot_tile16_multi = _make_dot_tile16(N_ACT)


@njit(cache=True, nogil=True)
def pack_activation(qs, xq, xc, xcs):
    """One activation row's int8 quants qs (blocks, 32) -> xq, xc, xcs (see the module docstring)."""
    for b in range(qs.shape[0]):
        xcs[b] = 0
        for l in range(8):
            s = np.int32(0)
            for k in range(4):
                q = qs[b, 4 * l + k]
                xq[32 * b + 4 * l + k] = q
                s += np.int32(q)
            xc[b, l] = -128 * s
            xcs[b] += -128 * s


@njit(cache=True, nogil=True)
def gemm_tile16(xq, xc, xcs, xd, xs, wv, wd, wm, sequential, with_min):
    """Every activation row against one 16-row weight tile (wv, wd, wm as kernels._unpack_row_vnni fills them):
    (n, 16) float32, equal to kernels._gemm_q32_tile on the same rows."""
    wd, wm = np.ascontiguousarray(wd), np.ascontiguousarray(wm)
    n = xq.shape[0]
    out = np.empty((n, TILE), np.float32)
    n_multi = n - n % N_ACT
    for t in range(0, n_multi, N_ACT):
        _dot_tile16_multi(xq, xc, xcs, xd, xs, wv, wd, wm, t, sequential, with_min, out)
    for t in range(n_multi, n):
        _dot_tile16(xq, xc, xcs, xd, xs, wv, wd, wm, t, sequential, with_min, out)
    return out
