"""One decode step of a llama-family block in a single numba call: the same float operations, in the same order,
as the op-by-op path of models/llama.py (Linear -> kernels.matvec, rms_norm, Rope, kvcache.attend_f16, swiglu),
so the logits are bit-identical to it (tests/test_decode.py).

Why: a decode step of SmolLM2-135M is ~30 x 15 small operations of 5-200 us each. Called one by one from Python,
with numba's thread pool woken for each product, the calls and the f16 -> f32 copies of the cache cost more than
the products themselves. Here a layer is one call: its products run on all threads (one parallel region for
q/k/v, one for the output projection, one for gate/up, one for down), the attention reads the f16 cache in place.

The fused path covers the common case (see `DecodeStep.supports`): weights in a type listed in `_CODES` whose
matvec kernel is the one this module mirrors, an f16 cache, no biases, no q/k norms, no hooks; anything else
runs op by op.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import kernels
from .kernels import (QK, QK_K, _block_sums, _dot_q2_k, _dot_q3_k, _dot_q4_0, _dot_q4_1, _dot_q4_k, _dot_q5_0,
                      _dot_q5_1, _dot_q5_k, _dot_q6_k, _dot_q8_0, _dot_rows16_q4_0, _dot_rows16_q4_0_repacked,
                      _dot_rows16_q5_0,
                      _dot_rows16_q8_0, _jit, _kernel, _quantize_q8_0_cpu,
                      _quantize_q8_1_cpu, _quantize_q8_k)
from . import kvcache as _kv
from .gemm_int8 import splat16 as _splat16
from .kvcache import _reduce_add_16, f32_to_half, ggml_expf, half_to_f32, round_half
from . import isa as _isa
from .kernels_avx2 import PREFETCH_ROWS as _PREFETCH_ROWS
from .kernels_avx2 import _dot_vec_q4_0, _dot_vec_q4_0_repacked, _dot_vec_q5_0, _dot_vec_q5_1, _dot_vec_q8_0
from .kernels_avx2 import _prefetch_row

_AVX2_DOTS = _isa.X86_AVX2_DOTS  # Q4_0/Q5_0/Q8_0/Q5_1 in ggml-cpu's AVX2 order (kernels_avx2.py)
from . import kernels_kquant_avx2 as _kq_avx2
from .kernels_kquant_avx2 import dot_q2_k_avx2, dot_q3_k_avx2, dot_q5_k_avx2, dot_q6_k_avx2

_AVX2_KQUANT = _kq_avx2.ACTIVE  # Q2_K/Q3_K/Q5_K/Q6_K: ggml_vec_dot_q*_K_q8_K's AVX2 order (kernels_kquant_avx2.py)

# Weight type -> (code in the fused kernel, the matvec kernel whose per-row results it reproduces).
_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0, _Q2_K, _Q3_K, _Q4_K, _Q5_K, _Q6_K = range(10)
# (kernels._TYPES[...].matvec: on AVX2 the Q4_0/Q5_0/Q8_0/Q5_1 ones are kernels_avx2's, mirrored below under _AVX2_DOTS)
_CODES = {QT.Q4_0: (_Q4_0, kernels._TYPES[QT.Q4_0].matvec), QT.Q4_1: (_Q4_1, kernels._matvec_q4_1),
          QT.Q5_0: (_Q5_0, kernels._TYPES[QT.Q5_0].matvec), QT.Q5_1: (_Q5_1, kernels._TYPES[QT.Q5_1].matvec),
          QT.Q8_0: (_Q8_0, kernels._TYPES[QT.Q8_0].matvec), QT.Q2_K: (_Q2_K, kernels._matvec_q2_k),
          QT.Q3_K: (_Q3_K, kernels._matvec_q3_k), QT.Q4_K: (_Q4_K, kernels._matvec_q4_k),
          QT.Q5_K: (_Q5_K, kernels._matvec_q5_k), QT.Q6_K: (_Q6_K, kernels._matvec_q6_k)}
if _AVX2_KQUANT:  # their matvec kernels are kernels_kquant_avx2's there (Q4_K: repacked gemv, not fused)
    _CODES.update({qt: (_CODES[qt][0], mv) for qt, mv in _kq_avx2.FUSED_MATVECS.items()})
_ROWS_PER_TASK = 16
_LANES = 16


# ------------------------------------------------------------------------------------------- the pieces of a layer


@_jit
def _pairwise_block(a, lo, n):
    """numpy's pairwise_sum of float64 a[lo:lo+n] for n <= 128: 8 running sums, then the rest one by one."""
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            res += a[i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    while i < n - n % 8:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@_jit
def _pairwise_sum(a):
    """numpy's pairwise summation of float64 a (what np.sum does along a contiguous axis), so rms_norm below rounds
    exactly like models.llama.rms_norm: above 128 values, the sum of the two halves (the first a multiple of 8).
    The recursion runs on an explicit stack (numba's cache does not reload recursive functions reliably)."""
    lo_ = np.empty(64, np.int64)
    n_ = np.empty(64, np.int64)
    stage = np.empty(64, np.int64)
    left = np.empty(64, np.float64)
    lo_[0], n_[0], stage[0] = 0, a.size, 0
    top = 1
    result = 0.0
    while top > 0:
        f = top - 1
        lo, n = lo_[f], n_[f]
        if n <= 128:
            result = _pairwise_block(a, lo, n)
            top -= 1
            continue
        half = n // 2
        half -= half % 8
        if stage[f] == 0:  # sum the first half
            stage[f] = 1
            lo_[top], n_[top], stage[top] = lo, half, 0
            top += 1
        elif stage[f] == 1:  # then the second
            left[f] = result
            stage[f] = 2
            lo_[top], n_[top], stage[top] = lo + half, n - half, 0
            top += 1
        else:
            result = left[f] + result
            top -= 1
    return result


@_jit
def _rms_norm(x, weight, eps):
    """models.llama.rms_norm of one row."""
    squares = np.empty(x.size, np.float64)
    for i in range(x.size):
        squares[i] = np.float64(x[i] * x[i])
    mean = np.float32(_pairwise_sum(squares) / x.size)
    scale = np.float32(1.0) / np.sqrt(mean + eps)
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = (x[i] * scale) * weight[i]
    return out


@_jit
def _quantize_activation(x, codes):
    """x quantised to each vec_dot_type the matrices with these type codes need (others left empty)."""
    nb = x.size // QK
    need_q8_0 = need_q8_1 = need_q8_k = False
    for c in codes:
        if c < 0:
            continue
        if c == _Q4_0 or c == _Q5_0 or c == _Q8_0:
            need_q8_0 = True
        elif c == _Q4_1 or c == _Q5_1:
            need_q8_1 = True
        else:
            need_q8_k = True
    q8_0 = np.empty((nb if need_q8_0 else 0, QK), np.int8)
    d8_0 = np.empty(nb if need_q8_0 else 0, np.float32)
    if need_q8_0:
        _quantize_q8_0_cpu(x, q8_0, d8_0)
    sum8_0 = _block_sums(q8_0)
    q8_1 = np.empty((nb if need_q8_1 else 0, QK), np.int8)
    d8_1 = np.empty(nb if need_q8_1 else 0, np.float32)
    s8_1 = np.empty(nb if need_q8_1 else 0, np.float32)
    if need_q8_1:
        _quantize_q8_1_cpu(x, q8_1, d8_1, s8_1)
    nbk = x.size // QK_K if need_q8_k else 0
    q8_k = np.empty((nbk, QK_K), np.int8)
    d8_k = np.empty(nbk, np.float32)
    bsums8_k = np.empty((nbk, QK_K // 16), np.int32)
    if need_q8_k:
        _quantize_q8_k(x, q8_k, d8_k, bsums8_k)
    return q8_0, d8_0, sum8_0, q8_1, d8_1, s8_1, q8_k, d8_k, bsums8_k


@_jit
def _dot_rows(w, code, r0, r1, act, f16, out, o0):
    """out[o0 + r - r0] = row r of w (type `code`) . the quantised activation, for r in [r0, r1), as the type's
    matvec kernel computes it (one branch per run of rows, so each loop is the kernel's own)."""
    q8_0, d8_0, sum8_0, q8_1, d8_1, s8_1, q8_k, d8_k, bsums8_k = act
    o = o0 - r0
    if (code == _Q4_0 or code == _Q8_0 or code == _Q5_0) and _AVX2_DOTS:  # kernels_avx2's matvec, row by row
        repacked = w.shape[0] % 8 == 0  # Q4_0: ggml's repacked gemv order
        if code == _Q4_0 and repacked:
            while r0 + 16 <= r1:  # 16 rows in one vector, as kernels_avx2._matvec_q4_0
                for k in range(16):
                    _prefetch_row(w, r0 + 16 + k)
                _dot_rows16_q4_0_repacked(w, r0, q8_0, sum8_0, d8_0, out, o + r0)
                r0 += 16
        for r in range(r0, r1):
            _prefetch_row(w, r + _PREFETCH_ROWS)
            if code == _Q8_0:
                out[o + r] = _dot_vec_q8_0(w, r, q8_0, d8_0)
            elif code == _Q5_0:
                out[o + r] = _dot_vec_q5_0(w, r, q8_0, d8_0)
            elif repacked:
                out[o + r] = _dot_vec_q4_0_repacked(w, r, q8_0, d8_0)
            else:
                out[o + r] = _dot_vec_q4_0(w, r, q8_0, d8_0)
    elif code == _Q4_0 or code == _Q8_0 or code == _Q5_0:
        r = r0
        while r + 16 <= r1:  # kernels.py's 16-row kernels, as its matvec uses them
            if code == _Q4_0:
                _dot_rows16_q4_0(w, r, q8_0, sum8_0, d8_0, out, o + r)
            elif code == _Q8_0:
                _dot_rows16_q8_0(w, r, q8_0, d8_0, d8_0, out, o + r)
            else:
                _dot_rows16_q5_0(w, r, q8_0, sum8_0, d8_0, out, o + r)
            r += 16
        for r in range(r, r1):
            if code == _Q4_0:
                out[o + r] = _dot_q4_0(w[r], q8_0, sum8_0, d8_0, f16)
            elif code == _Q8_0:
                out[o + r] = _dot_q8_0(w, r, q8_0, d8_0, f16)
            else:
                out[o + r] = _dot_q5_0(w[r], q8_0, sum8_0, d8_0, f16)
    elif code == _Q4_1 or code == _Q5_1:
        lanes = np.empty(8, np.float32)
        for r in range(r0, r1):
            if code == _Q4_1:
                out[o + r] = _dot_q4_1(w, r, q8_1, d8_1, s8_1, f16, lanes)
            elif _AVX2_DOTS:  # ggml_vec_dot_q5_1_q8_1's AVX2 order (kernels_avx2.dot_q5_1, as vector code)
                out[o + r] = _dot_vec_q5_1(w, r, q8_1, d8_1, s8_1)
            else:
                out[o + r] = _dot_q5_1(w, r, q8_1, d8_1, s8_1, f16, lanes)
    elif _AVX2_KQUANT and code != _Q4_K:  # K-quants as kernels_kquant_avx2's matvec kernels
        lanes = np.empty(8, np.float32)
        prod = np.empty(QK_K, np.int32)
        for r in range(r0, r1):
            _prefetch_row(w, r + _PREFETCH_ROWS)
            if code == _Q6_K:
                out[o + r] = dot_q6_k_avx2(w, r, q8_k, d8_k, bsums8_k, f16, lanes, prod)
            elif code == _Q5_K:
                out[o + r] = dot_q5_k_avx2(w, r, q8_k, d8_k, bsums8_k, f16, lanes, prod)
            elif code == _Q3_K:
                out[o + r] = dot_q3_k_avx2(w, r, q8_k, d8_k, bsums8_k, f16, lanes, prod)
            else:
                out[o + r] = dot_q2_k_avx2(w, r, q8_k, d8_k, bsums8_k, f16, lanes, prod)
    elif code == _Q4_K:
        for r in range(r0, r1):
            out[o + r] = _dot_q4_k(w, r, q8_k, d8_k, bsums8_k, f16)
    elif code == _Q6_K:
        for r in range(r0, r1):
            out[o + r] = _dot_q6_k(w, r, q8_k, d8_k, f16)
    elif code == _Q5_K:
        for r in range(r0, r1):
            out[o + r] = _dot_q5_k(w, r, q8_k, d8_k, bsums8_k, f16)
    elif code == _Q3_K:
        for r in range(r0, r1):
            out[o + r] = _dot_q3_k(w, r, q8_k, d8_k, f16)
    else:
        for r in range(r0, r1):
            out[o + r] = _dot_q2_k(w, r, q8_k, d8_k, bsums8_k, f16)


@njit(cache=True, nogil=True, parallel=True)
def _products(x, w0, w1, w2, codes, f16):
    """(w0 @ x, w1 @ x, w2 @ x) in one parallel loop over all their rows; codes[i] < 0: no matrix i (0 rows)."""
    act = _quantize_activation(x, codes)
    n0, n1, n2 = w0.shape[0], w1.shape[0], w2.shape[0]
    out = np.empty(n0 + n1 + n2, np.float32)
    for task in prange((n0 + n1 + n2 + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
        start, end = task * _ROWS_PER_TASK, min(n0 + n1 + n2, (task + 1) * _ROWS_PER_TASK)
        if start < n0:  # a task may span two matrices
            _dot_rows(w0, codes[0], start, min(end, n0), act, f16, out, start)
        if start < n0 + n1 and end > n0:
            _dot_rows(w1, codes[1], max(start, n0) - n0, min(end, n0 + n1) - n0, act, f16, out, max(start, n0))
        if end > n0 + n1:
            _dot_rows(w2, codes[2], max(start, n0 + n1) - n0 - n1, end - n0 - n1, act, f16, out, max(start, n0 + n1))
    return out[:n0], out[n0:n0 + n1], out[n0 + n1:]


@_jit
def _rope(x, heads, d, rope_dim, neox, cos, sin):
    """models.llama.Rope on one token (x: heads * d values, in place): the rotation in float64, rounded once."""
    half = rope_dim // 2
    for h in range(heads):
        base = h * d
        for i in range(half):
            if neox:
                a, b = base + i, base + half + i
            else:
                a, b = base + 2 * i, base + 2 * i + 1
            x0, x1 = x[a], x[b]
            c, s = cos[i], sin[i]
            x[a] = np.float32(np.float64(x0) * np.float64(c) + np.float64(-(x1 * s)))
            x[b] = np.float32(np.float64(x0) * np.float64(s) + np.float64(x1 * c))


def _f32x16_ptr(builder, byte_ptr):
    return builder.bitcast(byte_ptr, ir.VectorType(ir.FloatType(), _LANES).as_pointer())


def _half_row16(builder, context, arr_type, arr, row, col):
    """<16 x float> from the 16 halves (uint16 bits) at arr[row, col:col + 16] of a 2-D array."""
    a = context.make_array(arr_type)(context, builder, arr)
    stride = builder.extract_value(a.strides, 0)
    offset = builder.add(builder.mul(row, stride), builder.mul(col, ir.Constant(ir.IntType(64), 2)))
    base = builder.gep(builder.bitcast(a.data, ir.IntType(8).as_pointer()), [offset])
    halves = builder.load(builder.bitcast(base, ir.VectorType(ir.HalfType(), _LANES).as_pointer()), align=2)
    return builder.fpext(halves, ir.VectorType(ir.FloatType(), _LANES))


def _f32_row16_ptr(builder, context, arr_type, arr, offset):
    """Pointer to the 16 floats at flat offset `offset` of a C-contiguous float32 array."""
    a = context.make_array(arr_type)(context, builder, arr)
    return _f32x16_ptr(builder, builder.gep(builder.bitcast(a.data, ir.IntType(8).as_pointer()),
                                            [builder.mul(offset, ir.Constant(ir.IntType(64), 4))]))


def _emit_reduce_add_16(builder, v):
    """_reduce_add_16 of a <16 x float> as LLVM code: high half + low half, three times, then the last two."""
    for n in (8, 4, 2):
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), n), list(range(n, 2 * n))))
        v = builder.fadd(hi, lo)
    return builder.fadd(builder.extract_element(v, ir.Constant(ir.IntType(32), 0)),
                        builder.extract_element(v, ir.Constant(ir.IntType(32), 1)))


@intrinsic
def _key_score(typingctx, q, q0, keys, j, col, d):
    """kvcache's score of one key before scaling: ggml's 16 float lanes, lane i = q[q0+i]*k[i] + q[q0+i+16]*k[i+16]
    + ... (the products of two halves are exact), then _reduce_add_16; k = keys[j, col:col+d] (half bits).
    Written as LLVM vector code because numba's loops over a 16-float scratch array stay scalar."""
    sig = types.float32(q, types.int64, keys, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        qt, _, kt, _, _, _ = signature.args
        qv, q_start, kv, row, col, dim = args
        i64 = ir.IntType(64)

        def product(chunk):
            off = builder.mul(chunk, ir.Constant(i64, _LANES))
            qs = builder.load(_f32_row16_ptr(builder, context, qt, qv, builder.add(q_start, off)), align=4)
            return builder.fmul(qs, _half_row16(builder, context, kt, kv, row, builder.add(col, off)))
        acc = cgutils.alloca_once_value(builder, product(ir.Constant(i64, 0)))
        n_chunks = builder.udiv(dim, ir.Constant(i64, _LANES))
        with cgutils.for_range_slice(builder, ir.Constant(i64, 1), n_chunks, ir.Constant(i64, 1)) as (chunk, _):
            builder.store(builder.fadd(builder.load(acc), product(chunk)), acc)
        v = builder.load(acc)
        return _emit_reduce_add_16(builder, v)
    return sig, codegen


def _emit_reduce_add_16_x16(builder, vectors):
    """_emit_reduce_add_16 of 16 <16 x float> at once -> <16 x float> (element k: the sum of vectors[k]). Each step
    adds the same two partial sums as the one-vector tree (hi + lo halves, then the last two lanes), with the halves
    of two vectors gathered into one: 15 additions for 16 sums instead of 64."""
    def shuffle(a, b, lanes):
        return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(ir.IntType(32), _LANES), lanes))
    n = 8  # each vector holds 16 / (2n) keys' partial sums, 2n lanes each
    while n >= 1:
        width = 2 * n
        lo_lanes = [k * width + i for k in range(_LANES // width) for i in range(n)]
        lo_lanes = lo_lanes + [_LANES + x for x in lo_lanes]
        hi_lanes = [x + n for x in lo_lanes]
        vectors = [builder.fadd(shuffle(a, b, hi_lanes), shuffle(a, b, lo_lanes))
                   for a, b in zip(vectors[0::2], vectors[1::2])]
        n //= 2
    return vectors[0]


@intrinsic
def _key_scores16(typingctx, q, q0, keys, j0, col, d, scale, scores):
    """scores[j0 + k] = _key_score(q, q0, keys, j0 + k, col, d) * scale for k < 16: 16 keys' products in flight
    together, each q chunk loaded once, and the 16 sums reduced together (_emit_reduce_add_16_x16)."""
    sig = types.void(q, types.int64, keys, types.int64, types.int64, types.int64, types.float32, scores)

    def codegen(context, builder, signature, args):
        qt, _, kt, _, _, _, _, st = signature.args
        qv, q_start, kv, row0, col_, dim, scale_, sv = args
        i64 = ir.IntType(64)
        rows = [builder.add(row0, ir.Constant(i64, k)) for k in range(_LANES)]

        def products(off):
            qs = builder.load(_f32_row16_ptr(builder, context, qt, qv, builder.add(q_start, off)), align=4)
            return [builder.fmul(qs, _half_row16(builder, context, kt, kv, r, builder.add(col_, off))) for r in rows]
        accs = [cgutils.alloca_once_value(builder, v) for v in products(ir.Constant(i64, 0))]
        n_chunks = builder.udiv(dim, ir.Constant(i64, _LANES))
        with cgutils.for_range_slice(builder, ir.Constant(i64, 1), n_chunks, ir.Constant(i64, 1)) as (chunk, _):
            for acc, prod in zip(accs, products(builder.mul(chunk, ir.Constant(i64, _LANES)))):
                builder.store(builder.fadd(builder.load(acc), prod), acc)
        sums = _emit_reduce_add_16_x16(builder, [builder.load(acc) for acc in accs])
        builder.store(builder.fmul(sums, _splat16(builder, scale_)), _f32_row16_ptr(builder, context, st, sv, row0),
                      align=4)
        return context.get_dummy_value()
    return sig, codegen


def _emit_ggml_expf16(builder, x):
    """kvcache.ggml_expf (ggml_v_expf, AVX512) of a <16 x float>, the same operations lane by lane."""
    v16 = x.type
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v16, v16, v16]), "llvm.fma.v16f32")

    def c(value):
        return ir.Constant(v16, [float(value)] * _LANES)

    def fmadd(a, b, acc):
        return builder.call(fma, [a, b, acc])
    r = c(_kv._EXPF_8P23)
    n = builder.fsub(fmadd(x, c(_kv._EXPF_715476PP0), r), r)
    neg_n = builder.fneg(n)
    b = fmadd(neg_n, c(_kv._EXPF_7F7D1CPM20), fmadd(neg_n, c(_kv._EXPF_62E4PM1), x))
    u = builder.fmul(b, b)
    j = fmadd(fmadd(fmadd(c(_kv._EXPF_0E4020PM7), b, c(_kv._EXPF_573E2EPM5)), u,
                    fmadd(c(_kv._EXPF_555E66PM3), b, c(_kv._EXPF_FFFDB6PM2))), u,
              fmadd(c(_kv._EXPF_FFFFECPM1), b, c(1.0)))
    # j * 2^n exact in double and rounded once (what scalef does); lanes with |n| > 192 become 0 or inf, as there
    fabs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v16]), "llvm.fabs.v16f32")
    big = builder.fcmp_ordered(">", builder.call(fabs, [n]), c(192))
    v16d, v16i = ir.VectorType(ir.DoubleType(), _LANES), ir.VectorType(ir.IntType(64), _LANES)
    exponent = builder.add(builder.fptosi(builder.select(big, c(0), n), v16i), ir.Constant(v16i, [1023] * _LANES))
    pow2 = builder.bitcast(builder.shl(exponent, ir.Constant(v16i, [52] * _LANES)), v16d)
    scaled = builder.fptrunc(builder.fmul(builder.fpext(j, v16d), pow2), v16)
    limit = builder.select(builder.fcmp_ordered("<=", n, c(0)), c(0), c(float("inf")))
    return builder.select(big, limit, scaled)


@intrinsic
def _exp_chunk16(typingctx, scores, c0, top):
    """scores[c0 + i] = ggml_expf(scores[c0 + i] - top) for i < 16 -> _reduce_add_16 of the 16 results."""
    sig = types.float32(scores, types.int64, types.float32)

    def codegen(context, builder, signature, args):
        st, _, _ = signature.args
        sv, start, top_ = args
        ptr = _f32_row16_ptr(builder, context, st, sv, start)
        p = _emit_ggml_expf16(builder, builder.fsub(builder.load(ptr, align=4), _splat16(builder, top_)))
        builder.store(p, ptr, align=4)
        return _emit_reduce_add_16(builder, p)
    return sig, codegen


@intrinsic
def _round_scaled16(typingctx, scores, c0, inv):
    """scores[c0 + i] = round_half(scores[c0 + i] * inv) for i < 16 (float -> half -> float: F16C's rounding)."""
    sig = types.void(scores, types.int64, types.float32)

    def codegen(context, builder, signature, args):
        st, _, _ = signature.args
        sv, start, inv_ = args
        ptr = _f32_row16_ptr(builder, context, st, sv, start)
        v = builder.fmul(builder.load(ptr, align=4), _splat16(builder, inv_))
        halves = builder.fptrunc(v, ir.VectorType(ir.HalfType(), _LANES))
        builder.store(builder.fpext(halves, v.type), ptr, align=4)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _mix_values16(typingctx, mix, probs, n_groups, values, col, d):
    """_mix_value for keys j < 16 * n_groups (lane j % 16, in j order), one chunk of 16 columns at a time with the
    16 lanes' partial sums held in registers across all the keys (no load and store of mix per key)."""
    sig = types.void(mix, probs, types.int64, values, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        mt, pt, _, vt, _, _ = signature.args
        mv, pv, groups, vv, col_, dim = args
        i64 = ir.IntType(64)
        p_arr = context.make_array(pt)(context, builder, pv)
        n_chunks = builder.udiv(dim, ir.Constant(i64, _LANES))
        with cgutils.for_range(builder, n_chunks) as chunk_loop:
            off = builder.mul(chunk_loop.index, ir.Constant(i64, _LANES))
            ptrs = [_f32_row16_ptr(builder, context, mt, mv, builder.add(builder.mul(ir.Constant(i64, i), dim), off))
                    for i in range(_LANES)]
            accs = [cgutils.alloca_once_value(builder, builder.load(ptr, align=4)) for ptr in ptrs]
            with cgutils.for_range(builder, groups) as group_loop:
                j0 = builder.mul(group_loop.index, ir.Constant(i64, _LANES))
                for i, acc in enumerate(accs):
                    j = builder.add(j0, ir.Constant(i64, i))
                    p16 = _splat16(builder, builder.load(builder.gep(p_arr.data, [j])))
                    v16 = _half_row16(builder, context, vt, vv, j, builder.add(col_, off))
                    builder.store(builder.fadd(builder.load(acc), builder.fmul(p16, v16)), acc)
            for ptr, acc in zip(ptrs, accs):
                builder.store(builder.load(acc), ptr, align=4)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _mix_value(typingctx, mix, lane, p, values, j, col, d):
    """mix[lane, e] += p * v[e] for e < d, v = values[j, col:col+d] (half bits); mix C-contiguous (16, d)."""
    sig = types.void(mix, types.int64, types.float32, values, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        mt, _, _, vt, _, _, _ = signature.args
        mv, lane_, p_, vv, row, col, dim = args
        i64 = ir.IntType(64)
        p16 = builder.insert_element(ir.Constant(ir.VectorType(ir.FloatType(), _LANES), None), p_,
                                     ir.Constant(ir.IntType(32), 0))
        p16 = builder.shuffle_vector(p16, p16, ir.Constant(ir.VectorType(ir.IntType(32), _LANES), [0] * _LANES))
        n_chunks = builder.udiv(dim, ir.Constant(i64, _LANES))
        with cgutils.for_range(builder, n_chunks) as loop:
            off = builder.mul(loop.index, ir.Constant(i64, _LANES))
            ptr = _f32_row16_ptr(builder, context, mt, mv, builder.add(builder.mul(lane_, dim), off))
            v16 = _half_row16(builder, context, vt, vv, row, builder.add(col, off))
            builder.store(builder.fadd(builder.load(ptr, align=4), builder.fmul(p16, v16)), ptr, align=4)
        return context.get_dummy_value()
    return sig, codegen


@_jit
def _attend_head(q, q0, k_cache, v_cache, L, kv_col, d, scale, out):
    """kvcache.attend_f16 for one query head of one token over L cached positions: q[q0:q0+d] already rounded to
    f16 values; k_cache/v_cache the f16 bits (n_ctx, KV * d), this head's keys/values in columns kv_col..kv_col+d;
    the result goes to out[q0:q0+d]."""
    lanes = np.empty(_LANES, np.float32)
    scores = np.empty(L, np.float32)
    full = L - L % _LANES
    for j0 in range(0, full, _LANES):
        _key_scores16(q, q0, k_cache, j0, kv_col, d, scale, scores)
    for j in range(full, L):
        scores[j] = _key_score(q, q0, k_cache, j, kv_col, d) * scale
    top = -np.inf
    for j in range(L):
        top = max(top, scores[j])
    total = 0.0
    for c0 in range(0, full, _LANES):
        total += np.float64(_exp_chunk16(scores, c0, top))
    if full < L:
        for i in range(_LANES):
            lanes[i] = 0
        for i in range(L - full):
            p = ggml_expf(scores[full + i] - top)
            scores[full + i] = p
            lanes[i] = p
        total += np.float64(_reduce_add_16(lanes))
    inv = np.float32(1.0 / total)
    for c0 in range(0, full, _LANES):
        _round_scaled16(scores, c0, inv)
    mix = np.zeros((_LANES, d), np.float32)
    _mix_values16(mix, scores, full // _LANES, v_cache, kv_col, d)
    for j in range(full, L):
        _mix_value(mix, j % _LANES, round_half(scores[j] * inv), v_cache, j, kv_col, d)
    for e in range(d):
        out[q0 + e] = _reduce_add_16(mix[:, e])


_DOT_STEP = 64  # ggml_vec_dot_f16 on AVX512: GGML_F32_STEP, 4 accumulators (GGML_F32_ARR) of 16 lanes


@intrinsic
def _key_score_steps(typingctx, q, q0, keys, j, col, n):
    """ggml_vec_dot_f16 (AVX512) over the first n elements (a multiple of 64) of q[q0:] and keys[j, col:] (half
    bits): accumulator a (a < 4) adds the products of elements 64s + 16a .. 64s + 16a + 15; then (0 + 2) + (1 + 3)
    lane by lane and _reduce_add_16. The LLVM vector form of _attend_head_one's score loop."""
    sig = types.float32(q, types.int64, keys, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        qt, _, kt, _, _, _ = signature.args
        qv, q_start, kv, row, col, dim = args
        i64 = ir.IntType(64)
        v16 = ir.VectorType(ir.FloatType(), _LANES)

        def product(off):
            qs = builder.load(_f32_row16_ptr(builder, context, qt, qv, builder.add(q_start, off)), align=4)
            return builder.fmul(qs, _half_row16(builder, context, kt, kv, row, builder.add(col, off)))
        accs = [cgutils.alloca_once_value(builder, ir.Constant(v16, [0.0] * _LANES)) for _ in range(4)]
        n_steps = builder.udiv(dim, ir.Constant(i64, _DOT_STEP))
        with cgutils.for_range(builder, n_steps) as loop:
            base = builder.mul(loop.index, ir.Constant(i64, _DOT_STEP))
            for a, acc in enumerate(accs):
                builder.store(builder.fadd(builder.load(acc), product(builder.add(base, ir.Constant(i64, 16 * a)))),
                              acc)
        x0, x1, x2, x3 = (builder.load(acc) for acc in accs)
        v = builder.fadd(builder.fadd(x0, x2), builder.fadd(x1, x3))
        return _emit_reduce_add_16(builder, v)
    return sig, codegen


@_jit
def _reduce_dot_step(acc, tmp):
    """GGML_F32x16_REDUCE of ggml_vec_dot_f16's accumulators acc[16 * a + lane]: (0 + 2), (1 + 3), their sum, then
    _mm512_reduce_add_ps."""
    for lane in range(16):
        tmp[lane] = (acc[lane] + acc[32 + lane]) + (acc[16 + lane] + acc[48 + lane])
    return _reduce_add_16(tmp)


@_jit
def _attend_head_one(q, q0, k_cache, v_cache, L, kv_col, d, scale, out):
    """_attend_head for the only token of a batch. llamafile's tinyBLAS (the order of _attend_head) declines products
    with one column, so llama.cpp computes each score and each output value with ggml_vec_dot_f16, whose AVX512 form
    puts element i of every 64-element step in accumulator (i % 64) // 16, lane i % 16, reduces them with
    _reduce_dot_step and adds the d % 64 tail in double. The KQV dots run over llama.cpp's n_kv positions (a multiple
    of 256; the masked ones have p = 0), so position j goes to slot j % 64 and there is no tail. The softmax in
    between is _attend_head's. All products (two f16 values) are exact in float32."""
    acc = np.empty(_DOT_STEP, np.float32)
    tmp = np.empty(16, np.float32)
    scores = np.empty(L, np.float32)
    full = d - d % _DOT_STEP
    for j in range(L):
        s = np.float64(_key_score_steps(q, q0, k_cache, j, kv_col, full))
        for i in range(full, d):
            s += np.float64(q[q0 + i] * half_to_f32(k_cache[j, kv_col + i]))
        scores[j] = np.float32(s) * scale
    top = -np.inf
    for j in range(L):
        top = max(top, scores[j])
    total = 0.0
    for c0 in range(0, L, 16):
        for i in range(16):
            tmp[i] = 0
        for i in range(min(16, L - c0)):
            p = ggml_expf(scores[c0 + i] - top)
            scores[c0 + i] = p
            tmp[i] = p
        total += np.float64(_reduce_add_16(tmp))
    inv = np.float32(1.0 / total)
    mix = np.zeros((_DOT_STEP, d), np.float32)
    for j in range(L):
        _mix_value(mix, j % _DOT_STEP, round_half(scores[j] * inv), v_cache, j, kv_col, d)  # slot j % 64
    for e in range(d):
        for i in range(_DOT_STEP):
            acc[i] = mix[i, e]
        out[q0 + e] = _reduce_dot_step(acc, tmp)


@_kernel(parallel=True)
def _attend_cached_one(q, k_cache, v_cache, pos0, n_heads, n_kv_heads, d, scale, out):
    for head in prange(n_heads):
        _attend_head_one(q, head * d, k_cache, v_cache, pos0 + 1, (head // (n_heads // n_kv_heads)) * d, d, scale,
                         out)


@_kernel(parallel=True)
def _attend_cached(q, k_cache, v_cache, pos0, n_heads, n_kv_heads, d, scale, out):
    for task in prange(q.size // d):
        t, head = task // n_heads, task % n_heads
        _attend_head(q, task * d, k_cache, v_cache, pos0 + t + 1, (head // (n_heads // n_kv_heads)) * d, d, scale,
                     out)


def attend_f16_cache(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, scale, pos0: int,
                     n_kv_heads: int) -> np.ndarray:
    """kvcache.attend_f16 (bit for bit) reading the f16 cache rows in place: q (n, H, d) at positions pos0..,
    k_cache / v_cache the cache's float16 arrays (n_ctx, KV * d) holding positions 0..pos0+n-1 -> (n, H * d)."""
    n, n_heads, d = q.shape
    q16 = np.ascontiguousarray(q, np.float32).astype(np.float16).astype(np.float32).reshape(-1)
    out = np.empty(n * n_heads * d, np.float32)
    attend = _attend_cached_one if n == 1 else _attend_cached  # one token: ggml_vec_dot_f16's order
    attend(q16, k_cache.view(np.uint16), v_cache.view(np.uint16), pos0, n_heads, n_kv_heads, d, np.float32(scale),
           out)
    return out.reshape(n, n_heads * d)


# AVX2 machines: ggml's 8-lane tinyBLAS (2+ tokens) / ggml_vec_dot_f16 (one token) orders, runtime/avx2_attention.py
from . import isa  # noqa: E402

if isa.LEVEL == "avx2":
    from .avx2_attention import attend_f16_cache, attend_head_vec_dot as _attend_head_one  # noqa: E402,F811


@_jit
def _store_f16(x, dst):
    for i in range(x.size):
        dst[i] = f32_to_half(x[i])


@_kernel(parallel=True)
def _decode_layer(h, attn_norm, ffn_norm, eps, wq, wk, wv, wo, w_gate, w_up, w_down, codes, cos, sin, rope_dim,
                  neox, k_cache, v_cache, pos, n_heads, n_kv_heads, scale, f16):
    """TransformerBlock.__call__ for one token at position pos, writing its K/V row into the caches (f16 bits):
    (output, _) or, when codes[3, 0] < 0, (h + attention, swiglu) for the caller's down projection."""
    d = wq.shape[0] // n_heads
    group = n_heads // n_kv_heads
    no_rows = wq[:0]
    x = _rms_norm(h, attn_norm, eps)
    q, k, v = _products(x, wq, wk, wv, codes[0], f16)
    _rope(q, n_heads, d, rope_dim, neox, cos, sin)
    _rope(k, n_kv_heads, d, rope_dim, neox, cos, sin)
    _store_f16(k, k_cache[pos])
    _store_f16(v, v_cache[pos])
    for i in range(q.size):
        q[i] = round_half(q[i])
    attn = np.empty(n_heads * d, np.float32)
    for head in prange(n_heads):
        kv_col = (head // group) * d
        _attend_head_one(q, head * d, k_cache, v_cache, pos + 1, kv_col, d, scale, attn)
    o = _products(attn, wo, no_rows, no_rows, codes[1], f16)[0]
    for i in range(h.size):
        o[i] = h[i] + o[i]
    x = _rms_norm(o, ffn_norm, eps)
    gate, up, _ = _products(x, w_gate, w_up, no_rows, codes[2], f16)
    for i in range(gate.size):
        g = gate[i]
        gate[i] = (g / (np.float32(1.0) + ggml_expf(-g))) * up[i]
    if codes[3, 0] < 0:  # the caller multiplies by w_down and adds the residual
        return o, gate
    down = _products(gate, w_down, no_rows, no_rows, codes[3], f16)[0]
    for i in range(o.size):
        down[i] = o[i] + down[i]
    return down, gate


class DecodeStep:
    """The fused decode path of a models.llama.Model (built once; `supports` says when it applies)."""

    def __init__(self, model):
        self.model = model
        a = model.args
        self.eps = np.float32(a.norm_eps)
        self.weights = [lin.weight for lin in model.linears()]
        self.layers = []
        self.external_down = []
        for block in model.layers:
            att, ffn = block.attention, block.feed_forward
            linears = (att.wq, att.wk, att.wv, att.wo, ffn.w_gate, ffn.w_up, ffn.w_down)
            q, k, v, o, gate, up, down = (_code(lin.weight) for lin in linears)
            codes = np.array([[q, k, v], [o, -1, -1], [gate, up, -1], [down, -1, -1]], np.int64)
            views = [lin.weight._view for lin in linears]
            if down < 0:  # a type this module does not mirror (e.g. a repacked K-quant): its own matvec kernel
                self.external_down.append(ffn.w_down.weight)
                views[-1] = views[0][:0]
            else:
                self.external_down.append(None)
            self.layers.append((block.attention_norm.weight, block.ffn_norm.weight, *views, codes))

    def matches(self, model) -> bool:
        return all(a is b.weight for a, b in zip(self.weights, model.linears()))

    @staticmethod
    def supports(model, cache) -> bool:
        from .models.llama import EXACT_ATTENTION

        a = model.args
        if not (EXACT_ATTENTION and cache.type_k == cache.type_v == "f16" and a.head_dim % _LANES == 0
                and a.rope_dim % 2 == 0 and a.rope_dim <= a.head_dim):
            return False
        for block in model.layers:
            att, ffn = block.attention, block.feed_forward
            if att.q_norm is not None or att.k_norm is not None:
                return False
            for lin in (att.wq, att.wk, att.wv, att.wo, ffn.w_gate, ffn.w_up, ffn.w_down):
                if (lin.bias is not None or lin.scale is not None or lin.input_hook is not None
                        or lin.act_quant is not None or not isinstance(lin.weight, kernels.QTensor)):
                    return False
                if lin is not ffn.w_down and _code(lin.weight) < 0:
                    return False
        return True

    def __call__(self, h: np.ndarray, cache) -> np.ndarray:
        """h (dim,) float32, the embedded token at position cache.pos -> the last layer's output (dim,)."""
        model, a, pos = self.model, self.model.args, cache.pos
        rope = model.layers[0].attention.rope
        if pos >= rope._cos.shape[0]:
            rope._table(max(2 * rope._cos.shape[0], pos + 1, 256))
        cos, sin = rope._cos[pos], rope._sin[pos]
        scale = model.layers[0].attention.scale
        for i, (attn_norm, ffn_norm, wq, wk, wv, wo, w_gate, w_up, w_down, codes) in enumerate(self.layers):
            h, hidden = _decode_layer(h, attn_norm, ffn_norm, self.eps, wq, wk, wv, wo, w_gate, w_up, w_down, codes,
                                      cos, sin, a.rope_dim, a.rope_neox, cache.k[i].data.view(np.uint16),
                                      cache.v[i].data.view(np.uint16), pos, a.n_heads, a.n_kv_heads, scale,
                                      kernels.F16_TO_F32)
            w = self.external_down[i]
            if w is not None:
                matvec = kernels._TYPES[w.qtype].matvec  # all threads, whatever the matrix size
                h = h + (matvec(w._view, hidden, kernels.F16_TO_F32) if matvec is not None
                         else kernels.matvec(w, hidden))
        return h


def _code(w) -> int:
    """The fused kernel's code for weight w, or -1 when its matvec kernel is not the one _CODES mirrors."""
    qtype = getattr(w, "qtype", None)
    if qtype not in _CODES or kernels._TYPES[qtype].matvec is not _CODES[qtype][1]:
        return -1
    return _CODES[qtype][0]
