"""runtime.kernels_kquant_avx2: K-quant products bit for bit against this machine's libggml-cpu (AVX2 build).

Only meaningful where ggml-cpu runs its AVX2 code (isa.LEVEL == "avx2"), so skipped elsewhere. References:
ggml_vec_dot_q*_K_q8_K from the CPU type traits (the per-row dot), a real ggml_mul_mat graph (what ggml's dispatch
does for a plain tensor: tiled from 8 rows, vec_dot below) and, for Q4_K matrices ggml repacks (rows % 8 == 0), the
repacked gemm/gemv as tests/test_kernels_repack.py calls them."""

from __future__ import annotations

import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from ggml_cpu import FROM_FLOAT, VEC_DOT, ggml_mul_mat, libggml_cpu_path, open_ggml_cpu
from runtime import isa
from runtime import kernels as K
from test_kernels import random_activations, random_weights

# ggml's K-quant vec_dots have only an AVX2 branch, so AVX512 builds run them too (isa.X86_AVX2_DOTS)
pytestmark = pytest.mark.skipif(not isa.X86_AVX2_DOTS, reason=f"ggml-cpu's AVX2 vec_dots do not run here ({isa.LEVEL})")

K_TYPES = [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]
Q8_K_BYTES = 292  # block_q8_K: d f32 | qs int8[256] | bsums int16[16]


@pytest.fixture
def rng():
    return np.random.default_rng(20261207)


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


def weights(qtype: QT, rows: int, cols: int, rng, adversarial: bool = False) -> np.ndarray:
    data = random_weights(qtype, rows, cols, rng).reshape(rows, cols // 256, -1)
    if adversarial:  # largest codes, scales and mins in half the blocks (maddubs/madd ranges), the rest random
        scale_fields = {QT.Q2_K: [(80, 82), (82, 84)], QT.Q3_K: [(108, 110)], QT.Q4_K: [(0, 2), (2, 4)],
                        QT.Q5_K: [(0, 2), (2, 4)], QT.Q6_K: [(208, 210)]}[qtype]
        keep = data.copy()
        data[:, ::2] = 0xFF
        if qtype == QT.Q6_K:
            data[:, ::2, 192:208] = 0x80  # int8 scales -128: the largest magnitude
            data[:, 1::4, 192:208] = 0x7F
        if qtype == QT.Q3_K:
            data[:, ::2, 0:32] = 0  # every high bit clear: codes -4
        for lo, hi in scale_fields:
            data[:, :, lo:hi] = keep[:, :, lo:hi]
    return np.ascontiguousarray(data.reshape(rows, -1))


def activations(rng, n: int, cols: int, adversarial: bool = False) -> np.ndarray:
    x = random_activations(rng, (n, cols))
    x[-1, 256:512] = 0  # a whole Q8_K block of zeros (d = 0)
    x[0, 300:332] = np.arange(32) - 15.5  # rounding ties in the Q8_K quantiser
    if adversarial:
        x[:, 512:768] = np.where(np.arange(256) % 2, 1.0, -1.0) * 1e3  # +amax and -amax: q = +-127 everywhere
        x[:, 768:1024] = np.float32(3e4) * rng.choice([-1.0, 1.0], (n, 256))
        x[n // 2:, :256] = np.float32(1e-30)  # tiny values
    return x


def ggml_vec_dots(lib, qtype: QT, data: np.ndarray, x: np.ndarray) -> np.ndarray:
    """ggml_vec_dot_<qtype>_q8_K per (row, activation row), the activation quantised by ggml's from_float."""
    rows, cols = data.shape[0], x.shape[1]
    from_float = FROM_FLOAT(lib.ggml_get_type_traits_cpu(int(QT.Q8_K)).contents.from_float)
    vec_dot = VEC_DOT(lib.ggml_get_type_traits_cpu(int(qtype)).contents.vec_dot)
    out = np.zeros((x.shape[0], rows), np.float32)
    for t in range(x.shape[0]):
        xg = np.zeros(cols // 256 * Q8_K_BYTES, np.uint8)
        from_float(np.ascontiguousarray(x[t]).ctypes.data, xg.ctypes.data, cols)
        for r in range(rows):
            vec_dot(cols, out[t, r:].ctypes.data, 0, data[r].ctypes.data, 0, xg.ctypes.data, 0, 1)
    return out


def llama_cpp_product(lib, qtype: QT, data: np.ndarray, shape, x: np.ndarray) -> np.ndarray:
    """x @ W.T as llama.cpp computes it on this CPU: repacked Q4_K (and on AVX512 Q2_K; rows % 8 == 0) through the
    repack kernels, every
    other K-quant matrix through a ggml_mul_mat graph (tiled from 8 rows, vec_dot below)."""
    if (qtype == QT.Q4_K or (qtype == QT.Q2_K and isa.AVX512)) and shape[0] % 8 == 0:  # ggml's repack buffer
        from test_kernels_repack import ggml_product

        return ggml_product(lib, qtype, data, shape, x)
    return ggml_mul_mat(lib, data, int(qtype), shape, x)


# ----------------------------------------------------------------------------------------------------------------------
# The row dots against ggml_vec_dot_q*_K_q8_K itself


@pytest.mark.parametrize("adversarial", [False, True], ids=["random", "adversarial"])
@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_vec_dot_bit_exact(qtype, adversarial, ggml_cpu, rng):
    from runtime import kernels_kquant_avx2 as A

    rows, cols = 37, 1536
    data = weights(qtype, rows, cols, rng, adversarial)
    x = activations(rng, 3, cols, adversarial)
    expected = ggml_vec_dots(ggml_cpu, qtype, data, x)
    matvec = {QT.Q2_K: A.matvec_q2_k_avx2, QT.Q3_K: A.matvec_q3_k_avx2, QT.Q4_K: A.matvec_q4_k_avx2,
              QT.Q5_K: A.matvec_q5_k_avx2, QT.Q6_K: A.matvec_q6_k_avx2}[qtype]
    w = K.QTensor(data, qtype, (rows, cols))
    for t in range(x.shape[0]):
        np.testing.assert_array_equal(matvec(w._view, x[t], K.F16_TO_F32), expected[t])


# ----------------------------------------------------------------------------------------------------------------------
# kernels.matvec / kernels.matmul (what the model runs) against llama.cpp's product for every batch size


@pytest.mark.parametrize("rows, cols", [(576, 1536), (1536, 512), (45, 1536)], ids=lambda v: str(v))
@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_products_bit_exact(qtype, rows, cols, ggml_cpu, rng):
    """rows 576 x 1536 columns: SmolLM2's ffn_down (the K-quant tensors of its Q4_K_M: 16 Q4_K, 14 Q6_K); 1536 rows:
    its gate/up shape (1536 x 576 is not a whole number of 256-blocks: 512 columns here); 45: not repacked."""
    data = weights(qtype, rows, cols, rng, adversarial=rows == 45)
    w = K.QTensor(data, qtype, (rows, cols))
    x = activations(rng, 512, cols, adversarial=rows == 45)
    for n in (1, 2, 4, 7, 16, 37, 512):
        xs = np.ascontiguousarray(x[:n])
        expected = llama_cpp_product(ggml_cpu, qtype, data, (rows, cols), xs)
        np.testing.assert_array_equal(K.matmul(w, xs), expected, err_msg=f"matmul n={n}")
        if n == 1:
            np.testing.assert_array_equal(K.matvec(w, xs[0]), expected[0], err_msg="matvec")


def test_dispatch_follows_ggml_on_avx2():
    """What ggml-cpu runs here: Q4_K is repacked (and Q2_K on AVX512: q2_K_8x8 needs it), every other K-quant matvec
    is the AVX2 vec_dot (or Q4_K's gemv)."""
    from runtime import kernels_kquant_avx2 as A

    assert (A.AVX2_KQUANT[QT.Q2_K][0] is A.matvec_q2_k_repacking) == isa.AVX512

    for qtype, (matvec, matmul) in A.AVX2_KQUANT.items():
        assert K._TYPES[qtype].matvec is matvec and K._TYPES[qtype].matmul is matmul
