"""The element-wise ops and the f16-cache attention as ggml-cpu computes them on an AVX2 + FMA + F16C machine
(isa.LEVEL == "avx2"; kvcache.py and decode.py select these functions there, the AVX512 code stays theirs).

What each function mirrors (llama.cpp's ggml/src/ggml-cpu, `#elif defined(__AVX2__)` variants):
  ggml_expf          ggml_v_expf (vec.h, AVX2 + FMA): the same polynomial as the AVX512 variant, but the scaling by
                     2^n is fma(j, k, k) with k = 2^n built from the exponent bits, and |n| > 126 takes the two-factor
                     s1 / s2 path (|n| > 192: s1 * s1, 0 or inf).
  swiglu             ggml_vec_swiglu_f32: ggml_v_silu on 8 values at a time (x / (1 + expf(-x)), then * g); the
                     scalar tail (n % 8 values) uses libm's expf (ggml_silu_f32).
  soft_max           ggml_vec_soft_max_f32: y = exp(x - max) in 8-value chunks, each reduced by _hsum8 and summed in
                     double; the tail with libm's expf, each value added in double.
  vec_dot_f16        ggml_vec_dot_f16 (GGML_F16_STEP 32, GGML_F16_EPR 8): 4 accumulators of 8 lanes = 32 lanes, lane r
                     holding elements r, r + 32, ...; GGML_F32x8_REDUCE; the tail (n % 32) added in double.
  attend_f16         ggml's graph KQ = mul_mat(K f16, Q), soft_max_ext, KQV = mul_mat(V^T f16, P) (flash attention
                     off). With 2+ query tokens (llamafile_sgemm accepts n >= 2) both products run in
                     tinyBLAS<8, __m256>: lane i accumulates elements i, i+8, ... with fmadd, then hsum(__m256) (the
                     same reduction as the softmax's); the probabilities are rounded to f16 first. With one token sgemm
                     declines and ggml_compute_forward_mul_mat falls back to ggml_vec_dot_f16 for both products.
                     The softmax is ggml_compute_forward_soft_max_f32: x * scale (+ mask), max, ggml_vec_soft_max_f32,
                     then * (float)(1.0 / sum).
  attend_head_vec_dot / attend_f16_cache   the same on the cache's f16 bits, for decode.py.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .kernels import _fma
from .kvcache import half_to_f32 as _half_to_f32, round_half as _round_half

_jit = njit(cache=True, nogil=True)


@intrinsic
def _f32_bits(typingctx, x):
    """float32 -> its bits as an int64 in [0, 2^32)."""
    sig = types.int64(types.float32)

    def codegen(context, builder, signature, args):
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))
    return sig, codegen


@intrinsic
def _bits_f32(typingctx, bits):
    """The low 32 bits of an int64 as a float32."""
    sig = types.float32(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.trunc(args[0], ir.IntType(32)), ir.FloatType())
    return sig, codegen


def _as_f32(x):
    pass


@overload(_as_f32, inline="always")
def _as_f32_impl(x):
    if isinstance(x, types.Integer):  # f16 bits of the cache
        return lambda x: _half_to_f32(np.uint16(x))
    return lambda x: np.float32(x)


# ------------------------------------------------------------------------------------------------------ ggml_v_expf

_R = np.float32(float.fromhex("0x1.8p23"))
_LOG2E = np.float32(float.fromhex("0x1.715476p+0"))
_LN2_LO = np.float32(float.fromhex("0x1.7f7d1cp-20"))
_LN2_HI = np.float32(float.fromhex("0x1.62e4p-1"))
_C5 = np.float32(float.fromhex("0x1.0e4020p-7"))
_C4 = np.float32(float.fromhex("0x1.573e2ep-5"))
_C3 = np.float32(float.fromhex("0x1.555e66p-3"))
_C2 = np.float32(float.fromhex("0x1.fffdb6p-2"))
_C1 = np.float32(float.fromhex("0x1.ffffecp-1"))
_MASK32 = 0xFFFFFFFF


@_jit
def ggml_expf(x):
    """ggml_v_expf, AVX2 + FMA variant (vec.h), one float32 at a time (its lanes are independent)."""
    x = np.float32(x)
    z = _fma(x, _LOG2E, _R)
    n = z - _R
    b = _fma(-n, _LN2_LO, _fma(-n, _LN2_HI, x))
    e = (_f32_bits(z) << 23) & _MASK32
    k = _bits_f32((e + 0x3F800000) & _MASK32)
    u = b * b
    j = _fma(_fma(_fma(_C5, b, _C4), u, _fma(_C3, b, _C2)), u, _C1 * b)
    if not abs(n) > 126:  # also NaN
        return _fma(k, j, k)
    g = 0x82000000 if n <= 0 else 0
    s1 = _bits_f32((g + 0x7F000000) & _MASK32)
    if abs(n) > 192:
        return s1 * s1
    s2 = _bits_f32((e - g) & _MASK32)
    return _fma(s2, j, s2) * s1


@_jit
def _libm_expf(x):
    return np.float32(math.exp(np.float32(x)))  # llvm.exp.f32: a call to libm's expf, like ggml's scalar tails


@_jit
def _hsum8(v, o):
    """hsum(__m256) of v[o:o+8] (sgemm.cpp; also ggml_vec_soft_max_f32's AVX2 reduction): high 128 + low 128,
    then movehl (0+2, 1+3), then the two."""
    return ((v[o + 4] + v[o]) + (v[o + 6] + v[o + 2])) + ((v[o + 5] + v[o + 1]) + (v[o + 7] + v[o + 3]))


@_jit
def _reduce32(a):
    """GGML_F32x8_REDUCE of ggml_vec_dot_f16's 4 accumulators (a[8 j + l] = lane l of sum[j]): sum[0] + sum[2],
    sum[1] + sum[3], their sum; then low 128 + high 128 and two hadds."""
    t = np.empty(4, np.float32)
    for l in range(4):
        t[l] = ((a[l] + a[16 + l]) + (a[8 + l] + a[24 + l])) + ((a[4 + l] + a[20 + l]) + (a[12 + l] + a[28 + l]))
    return (t[0] + t[1]) + (t[2] + t[3])


@njit(cache=True, parallel=True)
def _swiglu_kernel(gate, up, out):
    cols = gate.shape[1]
    full = cols - cols % 8
    for r in prange(gate.shape[0]):
        for i in range(full):
            x = gate[r, i]
            out[r, i] = (x / (np.float32(1.0) + ggml_expf(np.float32(0.0) - x))) * up[r, i]
        for i in range(full, cols):  # ggml_silu_f32(x) * g
            x = gate[r, i]
            out[r, i] = (x / (np.float32(1.0) + _libm_expf(-x))) * up[r, i]


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up as ggml_vec_swiglu_f32 on AVX2, row by row (any row length)."""
    gate = np.ascontiguousarray(gate, np.float32)
    out = np.empty_like(gate)
    _swiglu_kernel(gate.reshape(-1, gate.shape[-1]), np.ascontiguousarray(up, np.float32).reshape(-1, gate.shape[-1]),
                   out.reshape(-1, gate.shape[-1]))
    return out


@_jit
def soft_max(x, mx, y):
    """ggml_vec_soft_max_f32(n, y, x, max) on AVX2: y = exp(x - max), returns the sum (float64)."""
    n = x.size
    full = n - n % 8
    total = 0.0
    for c0 in range(0, full, 8):
        for i in range(c0, c0 + 8):
            y[i] = ggml_expf(x[i] - mx)
        total += np.float64(_hsum8(y, c0))
    for i in range(full, n):
        v = _libm_expf(x[i] - mx)
        total += np.float64(v)
        y[i] = v
    return total


@_jit
def vec_dot_f16(x, y):
    """ggml_vec_dot_f16 on AVX2 for two equal-length arrays of f16 values (uint16 bits or float32 values)."""
    n = x.size
    full = n - n % 32
    acc = np.zeros(32, np.float32)
    for i0 in range(0, full, 32):
        for r in range(32):
            acc[r] += _as_f32(x[i0 + r]) * _as_f32(y[i0 + r])
    s = np.float64(_reduce32(acc))
    for i in range(full, n):
        s += np.float64(_as_f32(x[i]) * _as_f32(y[i]))
    return np.float32(s)


# ------------------------------------------------------------------------------------------------------- attention


@_jit
def _softmax_probs(scores, n):
    """soft_max_ext over scores[:n] (already scaled; masked positions are exp(-inf) = 0 and add nothing), then the
    probabilities rounded to f16 for the product with V."""
    top = -np.inf
    for j in range(n):
        top = max(top, scores[j])
    chunk = np.zeros(8, np.float32)
    total = 0.0
    for c0 in range(0, n, 8):
        chunk[:] = 0
        for i in range(min(8, n - c0)):
            p = ggml_expf(scores[c0 + i] - top)
            scores[c0 + i] = p
            chunk[i] = p
        total += np.float64(_hsum8(chunk, 0))
    inv = np.float32(1.0 / total)
    for j in range(n):
        scores[j] = _round_half(scores[j] * inv)


def _half_vec_ptr(builder, context, arr_type, arr, row, col, lanes):
    """Pointer to the <lanes x half> at arr[row, col:col + lanes] of a 2-D uint16 array."""
    a = context.make_array(arr_type)(context, builder, arr)
    stride = builder.extract_value(a.strides, 0)
    offset = builder.add(builder.mul(row, stride), builder.mul(col, ir.Constant(ir.IntType(64), 2)))
    base = builder.gep(builder.bitcast(a.data, ir.IntType(8).as_pointer()), [offset])
    return builder.bitcast(base, ir.VectorType(ir.HalfType(), lanes).as_pointer())


def _f32_vec_ptr(builder, context, arr_type, arr, offset, lanes):
    """Pointer to the <lanes x float> at flat offset `offset` of a C-contiguous float32 array."""
    a = context.make_array(arr_type)(context, builder, arr)
    base = builder.gep(builder.bitcast(a.data, ir.IntType(8).as_pointer()),
                       [builder.mul(offset, ir.Constant(ir.IntType(64), 4))])
    return builder.bitcast(base, ir.VectorType(ir.FloatType(), lanes).as_pointer())


def _lanes(builder, v, idx):
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), len(idx)), list(idx)))


@intrinsic
def _key_dot32(typingctx, q, q0, keys, j, col, n32):
    """ggml_vec_dot_f16's SIMD part for q[q0:q0+n32] . keys[j, col:col+n32] (half bits), n32 a positive multiple
    of 32: 32 float lanes (4 accumulators of 8) summing exact products in order, then GGML_F32x8_REDUCE. LLVM vector
    code: numba's loops over a small scratch array stay scalar."""
    sig = types.float32(q, types.int64, keys, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        qt, _, kt, _, _, _ = signature.args
        qv, q_start, kv, row, col, n = args
        i64 = ir.IntType(64)

        def product(chunk):
            off = builder.mul(chunk, ir.Constant(i64, 32))
            qs = builder.load(_f32_vec_ptr(builder, context, qt, qv, builder.add(q_start, off), 32), align=4)
            halves = builder.load(_half_vec_ptr(builder, context, kt, kv, row, builder.add(col, off), 32), align=2)
            return builder.fmul(qs, builder.fpext(halves, ir.VectorType(ir.FloatType(), 32)))
        acc = cgutils.alloca_once_value(builder, product(ir.Constant(i64, 0)))
        n_chunks = builder.udiv(n, ir.Constant(i64, 32))
        with cgutils.for_range_slice(builder, ir.Constant(i64, 1), n_chunks, ir.Constant(i64, 1)) as (chunk, _):
            builder.store(builder.fadd(builder.load(acc), product(chunk)), acc)
        v = builder.load(acc)
        s = [_lanes(builder, v, range(8 * i, 8 * i + 8)) for i in range(4)]  # sum[0..3]
        y = builder.fadd(builder.fadd(s[0], s[2]), builder.fadd(s[1], s[3]))
        t = builder.fadd(_lanes(builder, y, range(4)), _lanes(builder, y, range(4, 8)))
        el = [builder.extract_element(t, ir.Constant(ir.IntType(32), i)) for i in range(4)]
        return builder.fadd(builder.fadd(el[0], el[1]), builder.fadd(el[2], el[3]))
    return sig, codegen


@intrinsic
def _mix_row8(typingctx, mix, lane, p, values, j, col, n8):
    """mix[lane, e] += p * values[j, col + e] for e < n8 (a multiple of 8), values half bits, mix C-contiguous."""
    sig = types.void(mix, types.int64, types.float32, values, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        mt, _, _, vt, _, _, _ = signature.args
        mv, lane_, p_, vv, row, col, n = args
        i64 = ir.IntType(64)
        width = builder.extract_value(context.make_array(mt)(context, builder, mv).shape, 1)
        p8 = builder.insert_element(ir.Constant(ir.VectorType(ir.FloatType(), 8), None), p_,
                                    ir.Constant(ir.IntType(32), 0))
        p8 = _lanes(builder, p8, [0] * 8)
        with cgutils.for_range(builder, builder.udiv(n, ir.Constant(i64, 8))) as loop:
            off = builder.mul(loop.index, ir.Constant(i64, 8))
            ptr = _f32_vec_ptr(builder, context, mt, mv, builder.add(builder.mul(lane_, width), off), 8)
            halves = builder.load(_half_vec_ptr(builder, context, vt, vv, row, builder.add(col, off), 8), align=2)
            v8 = builder.fpext(halves, ir.VectorType(ir.FloatType(), 8))
            builder.store(builder.fadd(builder.load(ptr, align=4), builder.fmul(p8, v8)), ptr, align=4)
        return context.get_dummy_value()
    return sig, codegen


def _key_dot(q, q0, keys, j, col, d):
    pass


@overload(_key_dot)
def _key_dot_impl(q, q0, keys, j, col, d):
    """ggml_vec_dot_f16(d, q[q0:], keys[j, col:]) (q f16 values as float32; keys f16 bits or values)."""
    vector = isinstance(keys.dtype, types.Integer)

    def impl(q, q0, keys, j, col, d):
        full = d - d % 32
        if vector and full > 0:
            s = np.float64(_key_dot32(q, q0, keys, j, col, full))
        else:
            acc = np.zeros(32, np.float32)
            for e0 in range(0, full, 32):
                for r in range(32):
                    acc[r] += q[q0 + e0 + r] * _as_f32(keys[j, col + e0 + r])
            s = np.float64(_reduce32(acc))
        for e in range(full, d):
            s += np.float64(q[q0 + e] * _as_f32(keys[j, col + e]))
        return np.float32(s)
    return impl


def _mix_row(mix, lane, p, values, j, col, d):
    pass


@overload(_mix_row)
def _mix_row_impl(mix, lane, p, values, j, col, d):
    """mix[lane, e] += p * values[j, col + e] for e < d."""
    vector = isinstance(values.dtype, types.Integer)

    def impl(mix, lane, p, values, j, col, d):
        done = d - d % 8 if vector else 0
        if done > 0:
            _mix_row8(mix, lane, p, values, j, col, done)
        row = mix[lane]
        for e in range(done, d):
            row[e] += p * _as_f32(values[j, col + e])
    return impl


@_jit
def attend_head_vec_dot(q, q0, k_cache, v_cache, L, kv_col, d, scale, out):
    """One query head of one token (ggml_vec_dot_f16 order for KQ and KQV): q[q0:q0+d] already rounded to f16
    values; k_cache / v_cache (n_ctx, KV * d) f16 bits (uint16) or f16 values (float32), this head's columns
    kv_col..kv_col+d; L positions visible; result to out[q0:q0+d]. Same signature as decode._attend_head."""
    scores = np.empty(L, np.float32)
    for j in range(L):
        scores[j] = _key_dot(q, q0, k_cache, j, kv_col, d) * scale
    _softmax_probs(scores, L)
    # KQV: each output value is a vec_dot over llama.cpp's n_kv positions (a multiple of 256, masked ones p = 0):
    # position j in lane j % 32, no tail.
    mix = np.zeros((32, d), np.float32)
    for j in range(L):
        _mix_row(mix, j % 32, scores[j], v_cache, j, kv_col, d)
    col = np.empty(32, np.float32)
    for e in range(d):
        for r in range(32):
            col[r] = mix[r, e]
        out[q0 + e] = _reduce32(col)


@njit(cache=True, parallel=True)
def _attend_vec_dot(q, keys, values, pos0, n_heads, n_kv_heads, d, scale, out):
    for task in prange(q.size // d):
        t, head = task // n_heads, task % n_heads
        attend_head_vec_dot(q, task * d, keys, values, pos0 + t + 1, (head // (n_heads // n_kv_heads)) * d, d, scale,
                            out)


@njit(cache=True, parallel=True)
def _attend_tinyblas(q, keys_t, values, scale, pos0, kv_heads, out):
    """kvcache._attend_f16_kernel with tinyBLAS<8, __m256>'s order: q (n, H, d) rounded to f16 values, keys_t
    (KV, d, L), values (L, KV*d) -> out (n, H*d). Lane i of a score sums q[e]*k[e] for e = i, i+8, ... (exact
    products, one rounding per add); the scores of all keys are computed together (lanes[i, j]) to vectorise."""
    n, H, d = q.shape
    G = H // kv_heads
    L = keys_t.shape[2]
    for task in prange(n * H):
        t, h = task // H, task % H
        kvh = h // G
        visible = min(L, pos0 + t + 1)
        lanes = np.empty((8, visible), np.float32)
        for i in range(8):
            lane = lanes[i]
            qv = q[t, h, i]
            k_row = keys_t[kvh, i]
            for j in range(visible):
                lane[j] = qv * k_row[j]
            for e in range(i + 8, d, 8):
                qv = q[t, h, e]
                k_row = keys_t[kvh, e]
                for j in range(visible):
                    lane[j] += qv * k_row[j]
        scores = np.empty(visible, np.float32)
        for j in range(visible):
            scores[j] = (((lanes[4, j] + lanes[0, j]) + (lanes[6, j] + lanes[2, j]))
                         + ((lanes[5, j] + lanes[1, j]) + (lanes[7, j] + lanes[3, j]))) * scale
        _softmax_probs(scores, visible)
        mix = np.zeros((8, d), np.float32)  # mix[i, e]: lane i of output e
        for j in range(visible):
            p = scores[j]
            row = mix[j % 8]
            for e in range(d):
                row[e] += p * values[j, kvh * d + e]
        for e in range(d):
            out[t, h * d + e] = _hsum8(mix[:, e], 0)


def attend_f16(q: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float, pos0: int,
               kv_heads: int) -> np.ndarray:
    """kvcache.attend_f16 on AVX2: causal attention of q (n, H, d) at positions pos0.. over keys/values (L, KV*d)
    float32, as llama.cpp's CPU graph computes it here -> (n, H*d). d must be a multiple of 8."""
    n, H, d = q.shape
    out = np.empty((n, H * d), np.float32)
    q16 = np.ascontiguousarray(q, np.float32).astype(np.float16).astype(np.float32)
    if n == 1:  # llamafile_sgemm declines n < 2: ggml_vec_dot_f16
        _attend_vec_dot(q16.reshape(-1), np.ascontiguousarray(keys, np.float32),
                        np.ascontiguousarray(values, np.float32), pos0, H, kv_heads, d, np.float32(scale),
                        out.reshape(-1))
        return out
    keys_t = np.ascontiguousarray(np.asarray(keys, np.float32).reshape(-1, kv_heads, d).transpose(1, 2, 0))
    _attend_tinyblas(q16, keys_t, np.ascontiguousarray(values, np.float32), np.float32(scale), pos0, kv_heads, out)
    return out


def attend_f16_cache(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, scale, pos0: int,
                     n_kv_heads: int) -> np.ndarray:
    """decode.attend_f16_cache on AVX2: q (n, H, d) at positions pos0.., the f16 caches (n_ctx, KV * d)."""
    n, n_heads, d = q.shape
    L = pos0 + n
    if n == 1:
        q16 = np.ascontiguousarray(q, np.float32).astype(np.float16).astype(np.float32).reshape(-1)
        out = np.empty(n_heads * d, np.float32)
        _attend_vec_dot(q16, k_cache[:L].view(np.uint16), v_cache[:L].view(np.uint16), pos0, n_heads, n_kv_heads, d,
                        np.float32(scale), out)
        return out.reshape(1, n_heads * d)
    from .kvcache import f16_to_f32

    return attend_f16(q, f16_to_f32(k_cache[:L]), f16_to_f32(v_cache[:L]), scale, pos0, n_kv_heads)
