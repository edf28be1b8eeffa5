"""runtime.kernels_repack bit for bit against llama.cpp's own repacked Q4_K/Q2_K kernels (libggml-cpu through ctypes:
ggml::cpu::repack::gemm/gemv<block_q*_K, 8, 8, Q8_K> and ggml_quantize_mat_t<8, Q8_K>, the instances that
tensor_traits<block_q4_K/q2_K, 8, 8, GGML_TYPE_Q8_K> runs) and against its numpy reference."""

from __future__ import annotations

import os

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from ggml_cpu import FROM_FLOAT, libggml_cpu_path, open_ggml_cpu, quantize_mat, repack_mul
from runtime import kernels as K
from runtime import kernels_ref as R
from runtime import kernels_repack as KR

QTYPES = [QT.Q4_K, QT.Q2_K]
QK_K = 256
Q8_K = int(QT.Q8_K)
Q8_K_BYTES = 4 + QK_K + 2 * 16              # block_q8_K: d f32 | qs int8[256] | bsums int16[16]
Q8_KX4_BYTES = 4 * 4 + 4 * QK_K + 2 * 64     # block_q8_Kx4: d f32[4] | qs int8[1024] | bsums int16[64]
# (byte offset, low, high) of each f16 super-block scale; every other byte (quants, sub-block scales) is random
F16_FIELDS = {QT.Q4_K: [(0, 0.0, 0.002), (2, 0.0, 0.002)], QT.Q2_K: [(80, 0.0, 0.01), (82, 0.0, 0.01)]}


@pytest.fixture
def rng():
    return np.random.default_rng(4321)


@pytest.fixture(scope="module")
def ggml_cpu():
    try:
        import llama_cpp  # noqa: F401  (skip cleanly without llama-cpp-python)
    except ImportError:
        pytest.skip("llama-cpp-python is not installed")
    path = libggml_cpu_path()
    if not os.path.exists(path):
        pytest.skip(f"{path} not found")
    return open_ggml_cpu(path)


@pytest.fixture(autouse=True)
def repack_dispatch(monkeypatch):
    """kernels.py dispatches Q4_K/Q2_K to this module's entry points, except on an AVX2 build, where ggml does not
    repack Q2_K and runs the AVX2 vec_dot for unrepacked matrices (kernels_kquant_avx2, tested against ggml in
    test_kernels_kquant_avx2.py): these tests put this module's entry points back, so they test it on any CPU."""
    import dataclasses

    for qtype, matvec, matmul in ((QT.Q4_K, KR.matvec_q4_k, KR.matmul_q4_k), (QT.Q2_K, KR.matvec_q2_k, KR.matmul_q2_k)):
        monkeypatch.setitem(K._TYPES, qtype, dataclasses.replace(K._TYPES[qtype], matvec=matvec, matmul=matmul))


def random_weights(qtype: QT, rows: int, cols: int, rng) -> np.ndarray:
    block_bytes = GGML_QUANT_SIZES[qtype][1]
    data = rng.integers(0, 256, (rows, cols // QK_K, block_bytes), dtype=np.uint8)
    for offset, lo, hi in F16_FIELDS[qtype]:
        scale = rng.uniform(lo, hi, (rows, cols // QK_K)).astype(np.float16)
        data[:, :, offset:offset + 2] = scale.view(np.uint8).reshape(rows, -1, 2)
    return data.reshape(rows, -1)


def random_activations(rng, n: int, cols: int) -> np.ndarray:
    """Gaussian rows with outliers, a zero block, and blocks where -amax comes before +amax (the 4x8 quantiser and
    quantize_row_q8_K pick opposite signs for the scale there)."""
    x = rng.standard_normal((n, cols)).astype(np.float32)
    x.reshape(-1)[rng.integers(0, x.size, max(1, x.size // 100))] *= 20
    if cols > QK_K:
        x[:, :QK_K] = 0
    last = cols - QK_K
    x[:, last + 3] = -1000.0
    x[::2, last + 200] = 1000.0
    return x


# ----------------------------------------------------------------------------------------------------------------------
# The repacked layouts (repack.cpp make_block_q4_Kx8 / make_block_q2_Kx8, blck_size_interleave 8), built in numpy.


def _by_row_groups(data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(rows/8, blocks, 8, block_bytes): block b of the 8 rows of each group side by side, the input of make_block."""
    return data.reshape(rows // 8, 8, cols // QK_K, -1).transpose(0, 2, 1, 3).astype(np.int64)


def interleave_q4_k(data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """block_q4_Kx8: d[8] f16 | dmin[8] f16 | scales[96] | qs[1024] for every 8 rows and block."""
    blocks = _by_row_groups(data, rows, cols)
    sc = blocks[..., 4:16]  # (groups, blocks, 8 rows, 12)
    scales = []
    for second in (False, True):  # sub-blocks 0-3, then 4-7 (their 6 bits are spread over the 12 bytes)
        for i in range(4):
            if second:
                s = ((sc[..., i] & 192) >> 2) | (sc[..., i + 8] & 15)
                m = ((sc[..., i + 4] & 192) >> 2) | ((sc[..., i + 8] & 240) >> 4)
            else:
                s, m = sc[..., i] & 63, sc[..., i + 4] & 63
            scales += [(s[..., :4] & 63) + ((s[..., 4:] & 48) << 2), (m[..., :4] & 63) + ((m[..., 4:] & 48) << 2),
                       (s[..., 4:] & 15) + ((m[..., 4:] & 15) << 4)]
    lead = blocks.shape[:2]
    qs = blocks[..., 16:].reshape(*lead, 8, 16, 8).transpose(0, 1, 3, 2, 4)  # 8-byte chunks, cycling through the rows
    out = np.concatenate([blocks[..., 0:2].reshape(*lead, 16), blocks[..., 2:4].reshape(*lead, 16), *scales,
                          qs.reshape(*lead, 1024)], axis=-1)
    assert out.shape[-1] == 1152
    return np.ascontiguousarray(out.astype(np.uint8))


def interleave_q2_k(data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """block_q2_Kx8: d[8] f16 | dmin[8] f16 | scales[128] | qs[512]; scales[i] = in[(i % 16) / 2].scales[(i / 16) * 2
    + i % 2], i.e. the scale bytes of sub-blocks 2a, 2a+1 of the 8 rows in turn."""
    blocks = _by_row_groups(data, rows, cols)
    lead = blocks.shape[:2]
    scales = blocks[..., :16].reshape(*lead, 8, 8, 2).transpose(0, 1, 3, 2, 4).reshape(*lead, 128)
    qs = blocks[..., 16:80].reshape(*lead, 8, 8, 8).transpose(0, 1, 3, 2, 4).reshape(*lead, 512)
    out = np.concatenate([blocks[..., 80:82].reshape(*lead, 16), blocks[..., 82:84].reshape(*lead, 16), scales, qs], -1)
    return np.ascontiguousarray(out.astype(np.uint8))


INTERLEAVE = {QT.Q4_K: interleave_q4_k, QT.Q2_K: interleave_q2_k}
BLOCK_NAME = {QT.Q4_K: "block_q4_K", QT.Q2_K: "block_q2_K"}


def ggml_quantize_x4(lib, x: np.ndarray) -> np.ndarray:
    """ggml_quantize_mat_t<8, Q8_K> on each group of 4 rows: block_q8_Kx4 (groups, blocks, 1168 bytes)."""
    x = np.ascontiguousarray(x, np.float32)
    out = np.zeros((len(x) // 4, x.shape[1] // QK_K, Q8_KX4_BYTES), np.uint8)
    quantize = quantize_mat(lib, 8, Q8_K)
    for g in range(len(out)):
        quantize(x[4 * g:].ctypes.data, out[g].ctypes.data, 4, x.shape[1])
    return out


def ggml_quantize_row(lib, x: np.ndarray) -> np.ndarray:
    """quantize_row_q8_K (the Q8_K type traits' from_float): block_q8_K (blocks, 292 bytes)."""
    x = np.ascontiguousarray(x, np.float32)
    out = np.zeros((x.size // QK_K, Q8_K_BYTES), np.uint8)
    FROM_FLOAT(lib.ggml_get_type_traits_cpu(Q8_K).contents.from_float)(x.ctypes.data, out.ctypes.data, x.size)
    return out


def deinterleave_x4(blocks: np.ndarray):
    """block_q8_Kx4 -> per row (qs int8 (n, blocks, 256), d (n, blocks), bsums (n, blocks, 16)). Byte j of qs is
    element 8 (j / 32) + j % 8 of row (j % 32) / 8; bsum of 16-group g of row r sits at (g / 4) 16 + 4 r + g % 4."""
    groups, nb = blocks.shape[:2]
    d = blocks[..., :16].copy().view(np.float32).transpose(0, 2, 1).reshape(4 * groups, nb)
    qs = blocks[..., 16:1040].view(np.int8).reshape(groups, nb, 32, 4, 8).transpose(0, 3, 1, 2, 4)
    bsums = blocks[..., 1040:].copy().view(np.int16).reshape(groups, nb, 4, 4, 4).transpose(0, 3, 1, 2, 4)
    return qs.reshape(4 * groups, nb, QK_K), d, bsums.reshape(4 * groups, nb, 16).astype(np.int32)


def ggml_product(lib, qtype: QT, data: np.ndarray, shape, x: np.ndarray) -> np.ndarray:
    """x @ W.T as ggml's repack tensor_traits::forward_mul_mat computes it: groups of 4 rows quantised by
    ggml_quantize_mat_t and multiplied by gemm, the remaining rows by quantize_row_q8_K and gemv."""
    rows, cols = shape
    n = len(x)
    n_gemm = n - n % 4
    vx = INTERLEAVE[qtype](data, rows, cols)
    out = np.zeros((n, rows), np.float32)
    if n_gemm:
        vy = ggml_quantize_x4(lib, x[:n_gemm])
        gemm = repack_mul(lib, "gemm", BLOCK_NAME[qtype], 8, 8, Q8_K)
        gemm(cols, out.ctypes.data, rows, vx.ctypes.data, vy.ctypes.data, n_gemm, rows)
    gemv = repack_mul(lib, "gemv", BLOCK_NAME[qtype], 8, 8, Q8_K)
    for t in range(n_gemm, n):
        vy = ggml_quantize_row(lib, x[t])
        gemv(cols, out[t].ctypes.data, rows, vx.ctypes.data, vy.ctypes.data, 1, rows)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Against llama.cpp


def test_activation_quantiser_is_ggml_quantize_mat(ggml_cpu, rng):
    x = random_activations(rng, 8, 768)
    x[1, 300] = x[1, 256:512].max() + 1  # a block whose largest magnitude is positive and unique
    x[2, 256:512] = 0
    qs, d, bsums = deinterleave_x4(ggml_quantize_x4(ggml_cpu, x))
    ours = KR.quantize_rows_q8_k_x4(x)
    np.testing.assert_array_equal(ours[0], qs)
    np.testing.assert_array_equal(ours[1].view(np.uint32), d.view(np.uint32))
    np.testing.assert_array_equal(ours[2], bsums)
    ref = KR.quantize_q8_k_x4_ref(x)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)
    # the -amax-before-+amax blocks are where it differs from quantize_row_q8_K: same values, opposite signs
    row_qs, row_d, _ = R.quantize_q8_k(x)
    assert np.array_equal(d[0, -1], -row_d[0, -1]) and np.array_equal(qs[0, -1], -row_qs[0, -1])


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows, cols, n", [(8, 256, 4), (24, 512, 5), (64, 1536, 9), (40, 512, 20), (16, 256, 1),
                                           (64, 512, 512), (576, 1536, 7)])
def test_matmul_bit_exact_with_ggml_repack(qtype, rows, cols, n, ggml_cpu, rng):
    """rows % 16 == 8 runs the AVX2 remainder branch of ggml's gemm, n >= 16 its 16-row AVX512 branch."""
    data = random_weights(qtype, rows, cols, rng)
    x = random_activations(rng, n, cols)
    expected = ggml_product(ggml_cpu, qtype, data, (rows, cols), x)
    w = K.QTensor(data, qtype, (rows, cols))
    np.testing.assert_array_equal(K.matmul(w, x), expected)
    np.testing.assert_array_equal(K.matvec(w, x[-1]), ggml_product(ggml_cpu, qtype, data, (rows, cols), x[-1:])[0])


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
def test_large_matvec_bit_exact_with_ggml_gemv(qtype, ggml_cpu, rng):
    """A matrix above kernels' parallel-matvec size (the numba-parallel build of the kernel, not the serial copy)."""
    cols = 1024
    row_bytes = cols // QK_K * GGML_QUANT_SIZES[qtype][1]
    rows = (K._PARALLEL_MATVEC_BYTES // row_bytes // 8 + 1) * 8
    data = random_weights(qtype, rows, cols, rng)
    x = random_activations(rng, 1, cols)
    w = K.QTensor(data, qtype, (rows, cols))
    assert w.nbytes >= K._PARALLEL_MATVEC_BYTES
    np.testing.assert_array_equal(K.matvec(w, x[0]), ggml_product(ggml_cpu, qtype, data, (rows, cols), x)[0])


# ----------------------------------------------------------------------------------------------------------------------
# Kernel against its numpy reference, and the dispatch


def group_sums_by(vnni: bool, monkeypatch) -> None:
    """The batched product's integer group sums by VNNI byte dot products or by float32 BLAS (same integers)."""
    if vnni and not KR.HAVE_VNNI:
        pytest.skip("this CPU has no AVX512-VNNI")
    monkeypatch.setattr(KR, "HAVE_VNNI", vnni)


@pytest.mark.parametrize("vnni", [False, True], ids=["blas", "vnni"])
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n", [4, 6, 11])
def test_kernel_matches_numpy_reference(qtype, n, vnni, rng, monkeypatch):
    group_sums_by(vnni, monkeypatch)
    rows, cols = 32, 768
    data = random_weights(qtype, rows, cols, rng)
    x = random_activations(rng, n, cols)
    w = K.QTensor(data, qtype, (rows, cols))
    matmul = {QT.Q4_K: KR.matmul_q4_k, QT.Q2_K: KR.matmul_q2_k}[qtype]
    matvec = {QT.Q4_K: KR.matvec_q4_k, QT.Q2_K: KR.matvec_q2_k}[qtype]
    np.testing.assert_array_equal(matmul(w._view, x, K.F16_TO_F32), KR.matmul_ref(data, qtype, (rows, cols), x))
    expected = KR.matmul_ref(data, qtype, (rows, cols), x[-1:])[0]
    np.testing.assert_array_equal(matvec(w._view, x[-1], K.F16_TO_F32), expected)


@pytest.mark.parametrize("vnni", [False, True], ids=["blas", "vnni"])
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
def test_tiles_cover_all_rows(qtype, vnni, rng, monkeypatch):
    group_sums_by(vnni, monkeypatch)
    rows, cols = 88, 512
    monkeypatch.setattr(KR, "_TILE_BYTES", 4 * 5 * 24 * cols // 64)  # 5 activation rows: tiles of 24 (Q4_K), 48 rows
    data = random_weights(qtype, rows, cols, rng)
    x = random_activations(rng, 5, cols)
    y = K.matmul(K.QTensor(data, qtype, (rows, cols)), x)
    np.testing.assert_array_equal(y, KR.matmul_ref(data, qtype, (rows, cols), x))


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
def test_unrepacked_matrices_go_where_ggml_sends_them(qtype, rng):
    """rows % 8 != 0: ggml keeps the matrix as is: ggml_vec_dot_q*_K_q8_K per row (kernels.py's dot) for decode and
    batches below 8 rows, its tiled K-quant matmul (kernels_tiled) from 8 rows."""
    from runtime.kernels_tiled import matmul_tiled

    rows, cols = 36, 512
    data = random_weights(qtype, rows, cols, rng)
    x = random_activations(rng, 9, cols)
    w = K.QTensor(data, qtype, (rows, cols))
    vec_dot = {QT.Q4_K: K._matvec_q4_k, QT.Q2_K: K._matvec_q2_k}[qtype]
    np.testing.assert_array_equal(K.matvec(w, x[0]), vec_dot(w._view, x[0], K.F16_TO_F32))
    np.testing.assert_array_equal(K.matmul(w, x[:6]), np.stack([vec_dot(w._view, r, K.F16_TO_F32) for r in x[:6]]))
    np.testing.assert_array_equal(K.matmul(w, x), matmul_tiled(w._view, x, K.F16_TO_F32, qtype))


def test_fma_f32_rounds_once(rng):
    """The reference's fma emulation against the hardware fma (llvm.fma through numba), on hard cases: products that
    nearly cancel the addend and sums that land on float32 rounding ties."""
    from numba import njit

    @njit
    def hardware_fma(a, b, c):
        out = np.empty_like(a)
        for i in range(a.size):
            out[i] = K._fma_f32(a[i], b[i], c[i])
        return out

    a = rng.standard_normal(20000).astype(np.float32)
    b = rng.standard_normal(20000).astype(np.float32)
    c = (-(a.astype(np.float64) * b) * (1 + rng.integers(-3, 4, 20000) * 2.0 ** -24)).astype(np.float32)
    c[::3] = rng.standard_normal(c[::3].size).astype(np.float32)
    # ties: a*b = 1 + 2^-24 exactly, plus tiny addends either side of the halfway point
    a[:4] = np.float32(1 + 2 ** -12)
    b[:4] = np.float32(1 + 2 ** -12)
    c[:4] = np.array([0, 2 ** -60, -(2 ** -60), -1], np.float32)
    expected = hardware_fma(a, b, c)
    np.testing.assert_array_equal(KR.fma_f32(a, b, c).view(np.uint32), expected.view(np.uint32))
    naive = (a.astype(np.float64) * b + c).astype(np.float32)
    assert not np.array_equal(naive[:4], expected[:4])  # the cases do need the single rounding
