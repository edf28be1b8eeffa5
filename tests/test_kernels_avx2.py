"""The 32-element products on an AVX2 build of ggml-cpu (runtime/kernels_avx2.py; NVFP4/MXFP4: kernels_fp4.py)
against llama-cpp-python's libggml-cpu, bit for bit: decode (matvec, the fused decode products) and prefill (matmul),
n = 1 ... 512 rows.

What ggml runs here: Q8_0/Q5_0 (and Q4_0 with rows % 8 != 0) go to ggml_vec_dot_*_q8_0 for one activation row and to
llamafile's tinyBLAS_Q0_AVX for more (ggml_mul_mat through a real graph below); Q4_0 with rows % 8 == 0 is repacked
(block_q4_0x8) and multiplied by ggml_gemm_q4_0_8x8_q8_0 / ggml_gemv_q4_0_8x8_q8_0, split over the activation rows as
repack.cpp's forward_mul_mat splits them (ggml_repacked_q4_0 below); Q4_1 and Q5_1 are ggml_vec_dot_q{4,5}_1_q8_1 for
every n."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from numba import njit

from ggml_cpu import FROM_FLOAT, ggml_mul_mat, open_ggml_cpu, quantize_mat, repack_mul
from runtime import decode, isa
from runtime import kernels as K

# The vec_dots (decode) are ggml's AVX2 code on AVX512 builds too (isa.X86_AVX2_DOTS); the batched kernels of this
# module are what an AVX2-only build runs (AVX2_BUILD).
pytestmark = pytest.mark.skipif(not isa.X86_AVX2_DOTS, reason="ggml-cpu's AVX2 orders: only on an AVX2+ x86 CPU")
AVX2_BUILD = isa.LEVEL == "avx2"

if isa.X86_AVX2_DOTS:
    from runtime import kernels_avx2 as A

N_ROWS = [1, 2, 4, 7, 16, 37, 512]
BLOCK_BYTES = {QT.Q4_0: 18, QT.Q5_0: 22, QT.Q8_0: 34, QT.Q4_1: 20, QT.Q5_1: 24}


@pytest.fixture(scope="module")
def lib():
    return open_ggml_cpu()


def random_blocks(qtype: QT, rows: int, cols: int, rng, adversarial: bool = False) -> np.ndarray:
    """(rows, row bytes) uint8: every quant bit pattern (Q8_0: -128 included), f16 scales (and Q4_1/Q5_1 mins)."""
    nb = cols // 32
    data = rng.integers(0, 256, (rows, nb, BLOCK_BYTES[qtype]), dtype=np.uint8)
    d = rng.uniform(1e-4, 0.05, (rows, nb))
    if adversarial:  # wide scale range (tiny, large, negative, zero) and all-extreme quants
        d *= rng.choice([1e-3, 1.0, 40.0, -1.0, 0.0], (rows, nb), p=[0.2, 0.4, 0.2, 0.15, 0.05])
        data[0, :, 2:] = 0x80 if qtype == QT.Q8_0 else 0x00  # Q8_0 -128, Q4_0 -8, Q5_0 (qh random) mostly -16
        data[-1, :, 2:] = 0x7F if qtype == QT.Q8_0 else 0xFF
    data[:, :, 0:2] = d.astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
    if qtype in (QT.Q4_1, QT.Q5_1):
        data[:, :, 2:4] = rng.uniform(-0.1, 0.1, (rows, nb)).astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
    return np.ascontiguousarray(data.reshape(rows, -1))


def random_x(rng, n: int, cols: int, adversarial: bool = False) -> np.ndarray:
    x = rng.standard_normal((n, cols)).astype(np.float32)
    x.reshape(-1)[rng.integers(0, x.size, max(1, x.size // 100))] *= 20
    x[:, :32] = 0 if cols > 32 else x[:, :32]
    if adversarial and cols >= 128:
        x[:, 32:64] = np.arange(32) - 15.5                            # rounding ties of the q8_0 quantisation
        x[:, 64:96] = np.where(np.arange(32) % 2, 1e4, -1e4)         # |q| = 127 everywhere
        x[: n // 2, 96:128] = 1e-30                                   # tiny block scale
    return x


def repack_q4_0(data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """repack.cpp's make_block_q4_0x8 (blck_size_interleave 8) for every group of 8 rows: per block d[8] | qs[128],
    qs chunk i = 8 bytes at offset (i // 8) * 8 of row i % 8, xor 0x88."""
    nb = cols // 32
    g = data.reshape(rows // 8, 8, nb, 18).transpose(0, 2, 1, 3)  # (groups, blocks, 8 rows, 18)
    d = g[..., 0:2].reshape(rows // 8, nb, 16)
    qs = g[..., 2:18].reshape(rows // 8, nb, 8, 2, 8).transpose(0, 1, 3, 2, 4).reshape(rows // 8, nb, 128) ^ 0x88
    return np.ascontiguousarray(np.concatenate([d, qs], axis=-1))


def ggml_repacked_q4_0(lib, data: np.ndarray, rows: int, cols: int, x: np.ndarray) -> np.ndarray:
    """x @ W.T as ggml-cpu's repacked Q4_0 product computes it (forward_mul_mat: activation rows quantised 4 at a
    time by ggml_quantize_mat_t<8, Q8_0>, the rest by quantize_row_q8_0; gemm for the first n - n % 4, gemv after)."""
    gemm = repack_mul(lib, "gemm", "block_q4_0", 8, 8, int(QT.Q8_0))
    gemv = repack_mul(lib, "gemv", "block_q4_0", 8, 8, int(QT.Q8_0))
    qmat = quantize_mat(lib, 8, int(QT.Q8_0))
    from_float = FROM_FLOAT(lib.ggml_get_type_traits_cpu(int(QT.Q8_0)).contents.from_float)
    x = np.ascontiguousarray(x, np.float32)
    n = x.shape[0]
    packed = repack_q4_0(data, rows, cols)
    row_bytes = cols // 32 * 34
    wdata = np.zeros(n * row_bytes + 64, np.uint8)
    n4 = n - n % 4
    for t in range(0, n4, 4):
        qmat(x[t].ctypes.data, wdata[t * row_bytes:].ctypes.data, 4, cols)
    for t in range(n4, n):
        from_float(x[t].ctypes.data, wdata[t * row_bytes:].ctypes.data, cols)
    out = np.zeros((n, rows), np.float32)
    if n4:
        gemm(cols, out.ctypes.data, rows, packed.ctypes.data, wdata.ctypes.data, n4, rows)
    for t in range(n4, n):
        gemv(cols, out[t].ctypes.data, rows, packed.ctypes.data, wdata[t * row_bytes:].ctypes.data, 1, rows)
    return out


def ggml_product(lib, qtype, data, rows, cols, x):
    if qtype == QT.Q4_0 and rows % 8 == 0:
        return ggml_repacked_q4_0(lib, data, rows, cols, x)
    return ggml_mul_mat(lib, data, int(qtype), (rows, cols), x)


def ours(qtype, data, rows, cols, x):
    w = K.QTensor(data, qtype, (rows, cols))
    if len(x) == 1:
        return K.matvec(w, x[0])[None]
    return K.matmul(w, x)


TYPES = [QT.Q8_0, QT.Q4_0, QT.Q5_0, QT.Q4_1, QT.Q5_1]
SHAPES = [(72, 576), (36, 512), (13, 1536), (8, 32)]  # 36, 13: not multiples of 8 (no Q4_0 repack) nor of 4


@pytest.mark.parametrize("adversarial", [False, True], ids=["random", "adversarial"])
@pytest.mark.parametrize("n", N_ROWS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_products_are_ggml_avx2_bit_for_bit(lib, qtype, n, adversarial):
    rng = np.random.default_rng(1000 * int(qtype) + n + adversarial)
    for rows, cols in SHAPES if n < 512 else SHAPES[:2]:
        data = random_blocks(qtype, rows, cols, rng, adversarial)
        x = random_x(rng, n, cols, adversarial)
        np.testing.assert_array_equal(ours(qtype, data, rows, cols, x), ggml_product(lib, qtype, data, rows, cols, x),
                                      err_msg=f"{qtype.name} {rows}x{cols} n={n}")


@pytest.mark.parametrize("rows", [64, 40, 37])
@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q5_0], ids=lambda t: t.name)
def test_matvec_kernels_and_references(lib, qtype, rows):
    """kernels_avx2's matvec kernels (parallel and serial) = its numpy reference = ggml's decode product."""
    rng = np.random.default_rng(rows)
    cols = 1024
    data = random_blocks(qtype, rows, cols, rng, adversarial=True)
    x = random_x(rng, 1, cols, adversarial=True)[0]
    w = K.QTensor(data, qtype, (rows, cols))
    kernel = K._TYPES[qtype].matvec
    assert kernel is {QT.Q8_0: A._matvec_q8_0, QT.Q4_0: A._matvec_q4_0, QT.Q5_0: A._matvec_q5_0}[qtype]
    expected = ggml_product(lib, qtype, data, rows, cols, x[None])[0]
    np.testing.assert_array_equal(kernel(w._view, x, K.F16_TO_F32), expected)
    np.testing.assert_array_equal(K._serial(kernel)(w._view, x, K.F16_TO_F32), expected)
    xq = np.empty((cols // 32, 32), np.int8)
    xd = np.empty(cols // 32, np.float32)
    K._quantize_q8_0_cpu(x, xq, xd)
    ref = A.matvec_ref(w._view, qtype.name, xq, xd, repacked=qtype == QT.Q4_0 and rows % 8 == 0)
    np.testing.assert_array_equal(ref, expected)
    kind = {QT.Q8_0: 0, QT.Q5_0: 2}.get(qtype, 3 if rows % 8 == 0 else 1)
    np.testing.assert_array_equal(_scalar_dots(w._view, xq, xd, K._block_sums(xq), K.F16_TO_F32, kind), expected)


@pytest.mark.parametrize("rows", [64, 40, 37])
def test_q5_1_matvec_kernel(lib, rows):
    """Q5_1 decode on AVX2: kernels_avx2._matvec_q5_1 (parallel and serial) = ggml_vec_dot_q5_1_q8_1; the prefill
    kernel (_gemm_q32, Q4_1's lane order) was already ggml's and stays."""
    rng = np.random.default_rng(rows + 5)
    cols = 1024
    data = random_blocks(QT.Q5_1, rows, cols, rng, adversarial=True)
    x = random_x(rng, 1, cols, adversarial=True)[0]
    w = K.QTensor(data, QT.Q5_1, (rows, cols))
    kernel = K._TYPES[QT.Q5_1].matvec
    assert kernel is A._matvec_q5_1
    assert K._TYPES[QT.Q5_1].matmul is K._matmul_q5_1_lanes
    expected = ggml_product(lib, QT.Q5_1, data, rows, cols, x[None])[0]
    np.testing.assert_array_equal(kernel(w._view, x, K.F16_TO_F32), expected)
    np.testing.assert_array_equal(K._serial(kernel)(w._view, x, K.F16_TO_F32), expected)


@njit
def _scalar_dots(w, xq, xd, xsum, f16, kind):
    """kernels_avx2's written-out dots (the readable form of the vector intrinsics the kernels run)."""
    out = np.empty(w.shape[0], np.float32)
    lanes = np.empty(8, np.float32)
    for r in range(w.shape[0]):
        if kind == 0:
            out[r] = A.dot_q8_0(w, r, xq, xd, f16, lanes)
        elif kind == 1:
            out[r] = A.dot_q4_0(w, r, xq, xd, f16, lanes)
        elif kind == 2:
            out[r] = A.dot_q5_0(w, r, xq, xd, f16, lanes)
        else:
            out[r] = A.dot_q4_0_repacked(w, r, xq, xsum, xd, f16)
    return out


@pytest.mark.parametrize("qtypes", [(QT.Q4_0, QT.Q5_0, QT.Q8_0), (QT.Q8_0, QT.Q4_0, QT.Q4_1),
                                    (QT.Q5_1, QT.Q5_1, QT.Q4_1), (QT.Q5_1, QT.Q8_0, QT.Q5_0)],
                         ids=["q4_0-q5_0-q8_0", "q8_0-q4_0-q4_1", "q5_1-q5_1-q4_1", "q5_1-q8_0-q5_0"])
def test_fused_decode_products_are_ggml_avx2(lib, qtypes):
    """decode.py's fused per-layer products (three matrices in one parallel loop) use the same AVX2 order."""
    rng = np.random.default_rng(7)
    cols = 576
    shapes = [(64, cols), (37, cols), (192, cols)]
    mats = [random_blocks(q, r, c, rng, adversarial=True) for q, (r, c) in zip(qtypes, shapes)]
    views = [K.QTensor(m, q, s)._view for m, q, s in zip(mats, qtypes, shapes)]
    codes = np.array([decode._code(K.QTensor(m, q, s)) for m, q, s in zip(mats, qtypes, shapes)], np.int64)
    assert (codes >= 0).all()
    x = random_x(rng, 1, cols, adversarial=True)[0]
    got = decode._products(x, *views, codes, K.F16_TO_F32)
    for g, m, q, (r, c) in zip(got, mats, qtypes, shapes):
        np.testing.assert_array_equal(g, ggml_product(lib, q, m, r, c, x[None])[0], err_msg=q.name)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 37])
@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q5_0], ids=lambda t: t.name)
def test_avx2_integer_gemm_equals_float_reference(qtype, n):
    """kernels_avx2._gemm_q32 (AVX2 integer sums) = kernels._gemm_q32_float (float32 integer sums), both orders."""
    if not AVX2_BUILD:
        pytest.skip("AVX512 builds keep kernels.py's VNNI gemm (tests/test_gemm_int8.py)")
    rng = np.random.default_rng(n)
    kind = {QT.Q4_0: K._KIND_Q4_0, QT.Q5_0: K._KIND_Q5_0, QT.Q8_0: K._KIND_Q8_0}[qtype]
    for rows, cols in [(40, 576), (23, 256), (3, 32)]:
        w = K.QTensor(random_blocks(qtype, rows, cols, rng, adversarial=True), qtype, (rows, cols))
        x = random_x(rng, n, cols, adversarial=True)
        for sequential in (False, True):
            np.testing.assert_array_equal(A._gemm_q32(w._view, x, K.F16_TO_F32, kind, sequential),
                                          K._gemm_q32_float(w._view, x, K.F16_TO_F32, kind, sequential))
    assert K._TYPES[qtype].matmul is {QT.Q4_0: A.matmul_q4_0, QT.Q5_0: A.matmul_q5_0, QT.Q8_0: A.matmul_q8_0}[qtype]


# ----------------------------------------------------------------------------------------------------------------------
# NVFP4 / MXFP4 (runtime/kernels_fp4.py). ggml-cpu here: NVFP4 is ggml_vec_dot_nvfp4_q8_0 for every output, any n (no
# repack, no tinyBLAS); MXFP4 with rows % 8 != 0 likewise ggml_vec_dot_mxfp4_q8_0; MXFP4 with rows % 8 == 0 is repacked
# (block_mxfp4x8) and multiplied by ggml_gemm_mxfp4_8x8_q8_0 / ggml_gemv_mxfp4_8x8_q8_0 as Q4_0 is (the gemv for the
# n % 4 last activation rows, so for decode).


def repack_mxfp4(data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """repack.cpp's make_block_mxfp4x8 (interleave 8) for every group of 8 rows: per block e[8] | qs[128], qs chunk
    i = 8 bytes at offset (i // 8) * 8 of row i % 8 (no xor: the nibbles index kvalues_mxfp4)."""
    nb = cols // 32
    g = data.reshape(rows // 8, 8, nb, 17).transpose(0, 2, 1, 3)
    e = g[..., 0]
    qs = g[..., 1:17].reshape(rows // 8, nb, 8, 2, 8).transpose(0, 1, 3, 2, 4).reshape(rows // 8, nb, 128)
    return np.ascontiguousarray(np.concatenate([e, qs], axis=-1))


def ggml_repacked(lib, block: str, packed: np.ndarray, rows: int, cols: int, x: np.ndarray) -> np.ndarray:
    """x @ W.T as repack.cpp's forward_mul_mat computes it for an 8x8-interleaved 32-block type with a Q8_0
    activation (see ggml_repacked_q4_0)."""
    gemm = repack_mul(lib, "gemm", block, 8, 8, int(QT.Q8_0))
    gemv = repack_mul(lib, "gemv", block, 8, 8, int(QT.Q8_0))
    qmat = quantize_mat(lib, 8, int(QT.Q8_0))
    from_float = FROM_FLOAT(lib.ggml_get_type_traits_cpu(int(QT.Q8_0)).contents.from_float)
    x = np.ascontiguousarray(x, np.float32)
    n = x.shape[0]
    row_bytes = cols // 32 * 34
    wdata = np.zeros(n * row_bytes + 64, np.uint8)
    n4 = n - n % 4
    for t in range(0, n4, 4):
        qmat(x[t].ctypes.data, wdata[t * row_bytes:].ctypes.data, 4, cols)
    for t in range(n4, n):
        from_float(x[t].ctypes.data, wdata[t * row_bytes:].ctypes.data, cols)
    out = np.zeros((n, rows), np.float32)
    if n4:
        gemm(cols, out.ctypes.data, rows, packed.ctypes.data, wdata.ctypes.data, n4, rows)
    for t in range(n4, n):
        gemv(cols, out[t].ctypes.data, rows, packed.ctypes.data, wdata[t * row_bytes:].ctypes.data, 1, rows)
    return out


def random_fp4_blocks(qtype: QT, rows: int, cols: int, rng, adversarial: bool = False) -> np.ndarray:
    """(rows, row bytes) uint8: random nibbles (every FP4 code), MXFP4 E8M0 / NVFP4 UE4M3 scales."""
    if qtype == QT.MXFP4:
        data = rng.integers(0, 256, (rows, cols // 32, 17), dtype=np.uint8)
        data[:, :, 0] = rng.integers(118, 132, data.shape[:2])
        if adversarial:  # extreme exponents (2^-127 .. 2^125 halves), all-zero / all-max-magnitude rows
            data[:, :, 0] = np.where(rng.random(data.shape[:2]) < 0.2, rng.choice([0, 1, 80, 170, 253], data.shape[:2]),
                                     data[:, :, 0])
            data[0, :, 1:] = 0x00
            data[-1, :, 1:] = 0xFF if rows > 1 else data[-1, :, 1:]
        return np.ascontiguousarray(data.reshape(rows, -1))
    data = rng.integers(0, 256, (rows, cols // 64, 36), dtype=np.uint8)
    data[:, :, 0:4] = rng.integers(0x20, 0x50, (rows, cols // 64, 4))
    if adversarial:  # UE4M3 zero, smallest, largest codes; all-zero / all-max-magnitude rows
        data[:, :, 0:4] = np.where(rng.random((rows, cols // 64, 4)) < 0.25,
                                   rng.choice([0x00, 0x01, 0x08, 0x7E], (rows, cols // 64, 4)), data[:, :, 0:4])
        data[0, :, 4:] = 0x00
        data[-1, :, 4:] = 0x77 if rows > 1 else data[-1, :, 4:]
    return np.ascontiguousarray(data.reshape(rows, -1))


def ggml_fp4_product(lib, qtype, data, rows, cols, x):
    if qtype == QT.MXFP4 and rows % 8 == 0:
        return ggml_repacked(lib, "block_mxfp4", repack_mxfp4(data, rows, cols), rows, cols, x)
    return ggml_mul_mat(lib, data, int(qtype), (rows, cols), x)


FP4_SHAPES = {QT.NVFP4: [(72, 576), (36, 1024), (13, 1536), (8, 64)],
              QT.MXFP4: [(72, 576), (36, 1056), (13, 1536), (8, 32)]}  # 1056: an odd block count (vec_dot's tail)


@pytest.mark.parametrize("adversarial", [False, True], ids=["random", "adversarial"])
@pytest.mark.parametrize("n", N_ROWS)
@pytest.mark.parametrize("qtype", [QT.NVFP4, QT.MXFP4], ids=lambda t: t.name)
def test_fp4_products_are_ggml_avx2_bit_for_bit(lib, qtype, n, adversarial):
    rng = np.random.default_rng(100 * int(qtype) + n + adversarial)
    shapes = FP4_SHAPES[qtype]
    for rows, cols in shapes if n < 512 else shapes[:2]:
        data = random_fp4_blocks(qtype, rows, cols, rng, adversarial)
        x = random_x(rng, n, cols, adversarial)
        np.testing.assert_array_equal(ours(qtype, data, rows, cols, x),
                                      ggml_fp4_product(lib, qtype, data, rows, cols, x),
                                      err_msg=f"{qtype.name} {rows}x{cols} n={n}")


def test_mxfp4_repacked_decode_kernel(lib):
    """MXFP4 decode on AVX2: kernels_fp4._matvec_mxfp4_avx2 (parallel and serial): the repacked gemv's order for
    rows % 8 == 0, vec_dot's otherwise."""
    from runtime import kernels_fp4

    assert K._TYPES[QT.MXFP4].matvec is kernels_fp4._matvec_mxfp4_avx2
    rng = np.random.default_rng(11)
    for rows, cols in [(64, 1024), (40, 1056), (37, 1024)]:
        data = random_fp4_blocks(QT.MXFP4, rows, cols, rng, adversarial=True)
        x = random_x(rng, 1, cols, adversarial=True)[0]
        w = K.QTensor(data, QT.MXFP4, (rows, cols))
        expected = ggml_fp4_product(lib, QT.MXFP4, data, rows, cols, x[None])[0]
        kernel = K._TYPES[QT.MXFP4].matvec
        np.testing.assert_array_equal(kernel(w._view, x, K.F16_TO_F32), expected)
        np.testing.assert_array_equal(K._serial(kernel)(w._view, x, K.F16_TO_F32), expected)
