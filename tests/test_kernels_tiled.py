"""runtime.kernels_tiled (K-quant prefill) against llama.cpp's own tiled matmul, run through a real ggml graph, and
against its numpy reference."""

from __future__ import annotations

import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import quants as gguf_quants
from numba import njit

from ggml_cpu import ggml_mul_mat, libggml_cpu_path, open_ggml_cpu
from runtime import kernels as K
from runtime import kernels_tiled as T
from test_kernels import random_activations, random_weights

K_TYPES = [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]


@pytest.fixture
def rng():
    return np.random.default_rng(4321)


@pytest.fixture(scope="module")
def ggml_cpu():
    try:
        import llama_cpp  # noqa: F401  (skip cleanly without llama-cpp-python)
    except ImportError:
        pytest.skip("llama-cpp-python is not installed")
    if not os.path.exists(libggml_cpu_path()):
        pytest.skip(f"{libggml_cpu_path()} not found")
    if os.environ.get("GGML_CPU_TILED_MM", "1") == "0":
        pytest.skip("GGML_CPU_TILED_MM=0 switches ggml's tiled matmul off")
    return open_ggml_cpu()


def weight(qtype: QT, rows: int, cols: int, rng) -> K.QTensor:
    return K.QTensor(random_weights(qtype, rows, cols, rng), qtype, (rows, cols))


def activations(rng, n: int, cols: int) -> np.ndarray:
    x = random_activations(rng, (n, cols))
    x[-1, 256:512] = 0  # a whole Q8_K block of zeros (d = 0)
    x[0, 300:332] = np.arange(32) - 15.5  # rounding ties in the Q8_K quantiser
    return x


# rows: a multiple of 16 (whole microtiles), of 8 but not 16, of neither; n: the batch floor, a ragged 16-row band,
# a window of > 256 activation rows (two windows in ggml's driver)
@pytest.mark.parametrize("rows, n", [(48, 8), (40, 9), (36, 33), (24, 300)], ids=lambda v: str(v))
@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_bit_identical_to_llama_cpp_tiled_matmul(qtype, rows, n, ggml_cpu, rng):
    cols = 1536  # six slabs
    w = weight(qtype, rows, cols, rng)
    x = activations(rng, n, cols)
    expected = ggml_mul_mat(ggml_cpu, w.data, int(qtype), (rows, cols), x)
    np.testing.assert_array_equal(T.matmul_tiled(w._view, x, K.F16_TO_F32, qtype), expected)


@pytest.mark.parametrize("qtype", [QT.Q3_K, QT.Q5_K, QT.Q6_K], ids=lambda t: t.name)
def test_runtime_prefill_uses_the_tiled_order(qtype, ggml_cpu, rng):
    """K.matmul for the types that ggml never repacks: the tiled kernel from 8 rows on, including a weight with more
    than one 256-row window."""
    rows, cols = 272, 512
    w = weight(qtype, rows, cols, rng)
    x = activations(rng, 12, cols)
    np.testing.assert_array_equal(K.matmul(w, x), ggml_mul_mat(ggml_cpu, w.data, int(qtype), (rows, cols), x))


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_small_batches_go_row_by_row(qtype, rng):
    """Below 8 rows ggml calls vec_dot per row, not the tiled kernel: the per-type entry points use the plain matvec
    (ggml_vec_dot order) there."""
    w = weight(qtype, 20, 512, rng)
    x = activations(rng, 8, 512)
    entry = getattr(T, f"matmul_tiled_{qtype.name.lower()}")
    matvec = getattr(K, f"_matvec_{qtype.name.lower()}")
    rowwise = np.stack([matvec(w._view, row, K.F16_TO_F32) for row in x])
    for n in (4, 7):
        np.testing.assert_array_equal(entry(w._view, x[:n], K.F16_TO_F32), rowwise[:n])
    np.testing.assert_array_equal(entry(w._view, x, K.F16_TO_F32), T.matmul_tiled(w._view, x, K.F16_TO_F32, qtype))
    assert entry(w._view, x[:0], K.F16_TO_F32).shape == (0, 20)


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_kernel_matches_numpy_reference(qtype, rng):
    rows, cols, n = 37, 768, 11  # two row tiles (32 + 5), the last one padded to whole 4-row groups
    w = weight(qtype, rows, cols, rng)
    x = activations(rng, n, cols)
    ours = T.matmul_tiled(w._view, x, K.F16_TO_F32, qtype)
    ref = T.matmul_tiled_ref(w._view, qtype, x)
    np.testing.assert_array_equal(ours, ref)
    # both versions of the kernel, whichever this CPU runs: float32 integer sums, and VNNI byte dot products
    np.testing.assert_array_equal(T._gemm_tiled(w._view, x, K.F16_TO_F32, T._KIND[qtype]), ref)
    if T.HAVE_VNNI:
        np.testing.assert_array_equal(T._gemm_tiled_vnni(w._view, x, K.F16_TO_F32, T._KIND[qtype]), ref)


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_reference_unpack_is_the_dequantiser(qtype, rng):
    """d * scale * (code - BIAS) - dmin * min, per element, against gguf-py's dequantizer."""
    rows, cols = 8, 512
    data = random_weights(qtype, rows, cols, rng)
    codes, scales, mins, d, dmin = T.unpack_tiled_ref(data.reshape(rows, cols // 256, -1), qtype)
    per = 256 // scales.shape[-1]
    value = d[..., None].astype(np.float64) * np.repeat(scales, per, -1) * codes
    if mins is not None:
        value -= dmin[..., None].astype(np.float64) * np.repeat(mins, per, -1)
    expected = gguf_quants.dequantize(data, qtype).reshape(value.shape).astype(np.float64)
    np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


@njit
def _hardware_fma(a, b, c):
    out = np.empty_like(a)
    for i in range(a.size):
        out[i] = K._fma(a[i], b[i], c[i])
    return out


def test_fma_reference_rounds_once(rng):
    a, b, c = ((rng.standard_normal(20000) * 10.0 ** rng.integers(-4, 5, 20000)).astype(np.float32) for _ in range(3))
    # exact results 2^-54 off a tie between two floats: the float64 sum lands on the tie, and rounding it again
    # would go to the even neighbour, the wrong way in both cases
    a = np.concatenate([a, np.float32([1047553 * 2.0 ** -20, 1 + 2.0 ** -15])])  # 1047553 * 1025 = 2^30 + 1
    b = np.concatenate([b, np.float32([1025 * 2.0 ** -34, 2.0 ** -24 * (1 - 2.0 ** -15)])])
    c = np.concatenate([c, np.float32([1.0, 1 + 2.0 ** -23])])
    got = T.fma_f32_ref(a, b, c)
    assert got[-2] == np.float32(1 + 2.0 ** -23) and got[-1] == np.float32(1 + 2.0 ** -23)
    np.testing.assert_array_equal(got, _hardware_fma(a, b, c))
