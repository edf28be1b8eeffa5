"""runtime/avx2_attention.py against llama-cpp-python's libggml-cpu on an AVX2 machine (skipped elsewhere): ggml_v_expf,
ggml_vec_swiglu_f32, ggml_vec_soft_max_f32 and ggml_vec_dot_f16 called directly, and the f16 attention
(mul_mat(K, Q), soft_max_ext, mul_mat(V^T, P)) through a real ggml graph, all compared bit for bit."""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest

from runtime import isa

pytestmark = pytest.mark.skipif(isa.LEVEL != "avx2", reason="ggml-cpu's AVX2 variants run only on an AVX2 machine")

GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1


@pytest.fixture
def rng():
    return np.random.default_rng(2026)


@pytest.fixture(scope="module")
def lib():
    from ggml_cpu import open_ggml_cpu

    lib = open_ggml_cpu()
    lib.ggml_vec_swiglu_f32.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.ggml_vec_soft_max_f32.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float]
    lib.ggml_vec_soft_max_f32.restype = ctypes.c_double
    lib.ggml_vec_dot_f16.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                                     ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    lib.ggml_graph_compute_with_ctx.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return lib


def edge_values(rng, n):
    x = (rng.standard_normal(n) * np.float32(6)).astype(np.float32)
    edges = [0.0, -0.0, 1e-30, -1e-30, 88.3, 88.8, 90.0, -87.0, -87.4, -100.0, -103.9, -104.0, -150.0, 200.0, -200.0,
             1e6, -1e6, 126.5 * np.log(2), -126.5 * np.log(2), 1.0, -1.0, 0.5, np.inf, -np.inf]
    k = min(n, len(edges))
    x[:k] = edges[:k]
    x[-k:] = edges[:k][::-1]
    return x


@pytest.mark.parametrize("n", [1, 5, 8, 13, 64, 4096, 4099, 10007])
def test_swiglu_is_ggml_vec_swiglu_f32(lib, rng, n):
    from runtime import avx2_attention as A, kvcache

    gate = edge_values(rng, n)
    gate = gate[np.isfinite(gate)] if n > 30 else np.nan_to_num(gate, posinf=90.0, neginf=-90.0)
    n = gate.size
    up = rng.standard_normal(n).astype(np.float32)
    expected = np.zeros(n, np.float32)
    lib.ggml_vec_swiglu_f32(n, expected.ctypes.data, gate.ctypes.data, up.ctypes.data)
    np.testing.assert_array_equal(A.swiglu(gate[None], up[None])[0], expected)
    np.testing.assert_array_equal(kvcache.swiglu(gate[None], up[None])[0], expected)  # the dispatch


@pytest.mark.parametrize("n", [1, 7, 8, 9, 31, 256, 4096, 4101])
@pytest.mark.parametrize("shift", ["max", 0.0, -40.0, 60.0])
def test_soft_max_and_expf_are_ggml_vec_soft_max_f32(lib, rng, n, shift):
    from runtime import avx2_attention as A, kvcache

    x = edge_values(rng, n)
    mx = np.float32(np.max(x[np.isfinite(x)]) if shift == "max" else shift)
    y = np.zeros(n, np.float32)
    total = lib.ggml_vec_soft_max_f32(n, y.ctypes.data, x.ctypes.data, ctypes.c_float(mx))
    ours = np.zeros(n, np.float32)
    np.testing.assert_array_equal(A.soft_max(x, mx, ours), total)
    np.testing.assert_array_equal(ours, y)
    full = n - n % 8  # the vector part is ggml_v_expf itself
    np.testing.assert_array_equal(np.array([kvcache.ggml_expf(v - mx) for v in x[:full]], np.float32), y[:full])


def test_expf_over_the_whole_float_range(lib):
    """ggml_v_expf on every 4099th float32 bit pattern (nan, inf, denormals, both overflow paths)."""
    from runtime import avx2_attention as A

    x = np.arange(0, 1 << 32, 4099, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = x[: x.size - x.size % 8]
    y = np.zeros_like(x)
    lib.ggml_vec_soft_max_f32(x.size, y.ctypes.data, x.ctypes.data, ctypes.c_float(0.0))
    ours = np.array([A.ggml_expf(v) for v in x], np.float32)
    same = (ours.view(np.uint32) == y.view(np.uint32)) | (np.isnan(ours) & np.isnan(y))
    assert same.all(), x[~same][:10]


@pytest.mark.parametrize("n", [7, 32, 64, 80, 96, 128, 200, 256, 1000])
def test_vec_dot_f16(lib, rng, n):
    from runtime import avx2_attention as A

    for scale in (1.0, 30.0):
        x = (rng.standard_normal(n) * scale).astype(np.float16)
        y = (rng.standard_normal(n) * scale).astype(np.float16)
        expected = np.zeros(1, np.float32)
        lib.ggml_vec_dot_f16(n, expected.ctypes.data, 0, x.ctypes.data, 0, y.ctypes.data, 0, 1)
        assert A.vec_dot_f16(x.view(np.uint16), y.view(np.uint16)) == expected[0]
        assert A.vec_dot_f16(x.astype(np.float32), y.astype(np.float32)) == expected[0]


class GgmlInitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _base():
    from ggml_cpu import libggml_cpu_path

    base = ctypes.CDLL(os.path.join(os.path.dirname(libggml_cpu_path()), "libggml-base.so"))
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    for name, res, args in [("ggml_init", vp, [GgmlInitParams]),
                            ("ggml_new_tensor_2d", vp, [vp, ctypes.c_int, i64, i64]),
                            ("ggml_new_tensor_3d", vp, [vp, ctypes.c_int, i64, i64, i64]),
                            ("ggml_mul_mat", vp, [vp, vp, vp]), ("ggml_soft_max_ext", vp,
                                                                  [vp, vp, vp, ctypes.c_float, ctypes.c_float]),
                            ("ggml_new_graph", vp, [vp]), ("ggml_build_forward_expand", None, [vp, vp]),
                            ("ggml_get_data", vp, [vp]), ("ggml_nbytes", ctypes.c_size_t, [vp]),
                            ("ggml_free", None, [vp])]:
        fn = getattr(base, name)
        fn.restype, fn.argtypes = res, args
    return base


def ggml_attention(lib, q, keys, values, scale, pos0, kv_heads, n_kv, n_threads=2):
    """llama.cpp's f16-cache attention graph (flash attention off): q (n, H, d) f32 at positions pos0..;
    keys / values (n_kv, KV * d) float16, n_kv >= pos0 + n (the positions after pos0 + n - 1 masked, as llama.cpp
    pads its cache view); V stored transposed like llama.cpp's v_trans cache -> (n, H * d)."""
    base = _base()
    lib.ggml_graph_compute_with_ctx.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    n, H, d = q.shape
    qg = np.ascontiguousarray(q.transpose(1, 0, 2), np.float32)                           # ne (d, n, H)
    kg = np.ascontiguousarray(keys.reshape(n_kv, kv_heads, d).transpose(1, 0, 2))       # ne (d, n_kv, KV)
    vg = np.ascontiguousarray(values.reshape(n_kv, kv_heads, d).transpose(1, 2, 0))     # ne (n_kv, d, KV)
    mask = np.zeros((n, n_kv), np.float16)
    mask[np.arange(n_kv)[None, :] > pos0 + np.arange(n)[:, None]] = -np.inf
    mem = 8 * (qg.nbytes + kg.nbytes + vg.nbytes + mask.nbytes + 4 * n * H * n_kv) + (16 << 20)
    ctx = base.ggml_init(GgmlInitParams(mem, None, False))
    try:
        def tensor(arr, typ, *ne):
            t = (base.ggml_new_tensor_2d if len(ne) == 2 else base.ggml_new_tensor_3d)(ctx, typ, *ne)
            assert base.ggml_nbytes(t) == arr.nbytes
            ctypes.memmove(base.ggml_get_data(t), arr.ctypes.data, arr.nbytes)
            return t
        tq = tensor(qg, GGML_TYPE_F32, d, n, H)
        tk = tensor(kg, GGML_TYPE_F16, d, n_kv, kv_heads)
        tv = tensor(vg, GGML_TYPE_F16, n_kv, d, kv_heads)
        tm = tensor(mask, GGML_TYPE_F16, n_kv, n)
        kq = base.ggml_mul_mat(ctx, tk, tq)
        kq = base.ggml_soft_max_ext(ctx, kq, tm, ctypes.c_float(scale), ctypes.c_float(0.0))
        kqv = base.ggml_mul_mat(ctx, tv, kq)                                                   # ne (d, n, H)
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, kqv)
        assert lib.ggml_graph_compute_with_ctx(ctx, graph, n_threads) == 0
        out = np.empty((H, n, d), np.float32)
        ctypes.memmove(out.ctypes.data, base.ggml_get_data(kqv), out.nbytes)
        return np.ascontiguousarray(out.transpose(1, 0, 2)).reshape(n, H * d)
    finally:
        base.ggml_free(ctx)


ATTENTION_CASES = [  # (n query tokens, pos0, heads, kv heads, head_dim)
    (1, 0, 4, 2, 64), (1, 37, 9, 3, 64), (1, 300, 4, 4, 128), (1, 100, 2, 1, 80),
    (2, 0, 4, 2, 64), (7, 0, 9, 3, 64), (16, 5, 4, 2, 64), (33, 100, 9, 3, 64), (5, 20, 4, 4, 128), (6, 3, 2, 1, 96),
]


@pytest.mark.parametrize("n, pos0, H, KV, d", ATTENTION_CASES)
def test_attention_is_ggml_graph_bit_for_bit(lib, rng, n, pos0, H, KV, d):
    from runtime import avx2_attention as A, decode, kvcache

    L = pos0 + n
    n_kv = -(-L // 256) * 256  # llama.cpp's padded cache view; the padding rows hold other (masked) values
    keys = (rng.standard_normal((n_kv, KV * d)) * 2).astype(np.float16)
    values = rng.standard_normal((n_kv, KV * d)).astype(np.float16)
    q = (rng.standard_normal((n, H, d)) * 2).astype(np.float32)
    scale = np.float32(1 / np.sqrt(d))
    expected = ggml_attention(lib, q, keys, values, scale, pos0, KV, n_kv)
    k32, v32 = keys[:L].astype(np.float32), values[:L].astype(np.float32)
    np.testing.assert_array_equal(A.attend_f16(q, k32, v32, scale, pos0, KV), expected)
    np.testing.assert_array_equal(kvcache.attend_f16(q, k32, v32, scale, pos0, KV), expected)  # the dispatch
    if d % 16 == 0:
        cache_k, cache_v = keys.copy(), values.copy()
        np.testing.assert_array_equal(decode.attend_f16_cache(q, cache_k, cache_v, scale, pos0, KV), expected)
        if n == 1:  # the fused decode layer's per-head function
            out = np.empty(H * d, np.float32)
            q16 = q.astype(np.float16).astype(np.float32).reshape(-1)
            for h in range(H):
                decode._attend_head(q16, h * d, cache_k.view(np.uint16), cache_v.view(np.uint16), L,
                                    (h // (H // KV)) * d, d, scale, out)
            np.testing.assert_array_equal(out.reshape(1, -1), expected)
