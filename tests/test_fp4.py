"""NVFP4 / MXFP4: codecs against gguf-py and ggml, our encoder against ggml's, the tensor scale end to end
(converter -> llama.cpp and the native runtime), the runtime kernels against their numpy reference, GPTQ."""

from __future__ import annotations

import ctypes
import os
import shutil

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from llmq import fp4, quants
from llmq.errors import LlmqError

NV = gguf.quants.NVFP4
MX = gguf.quants.MXFP4
TYPES = [QT.NVFP4, QT.MXFP4]


def heavy_tailed(seed: int, rows: int = 48, cols: int = 256, scale: float = 0.02) -> np.ndarray:
    """Student-t(3) weights with a few large outliers, like LLM linears."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(3, size=(rows, cols)) * scale
    w[rng.integers(0, rows, 4), rng.integers(0, cols, 4)] *= 20
    return w.astype(np.float32)


def weighted_error(w, deq, importance=None):
    imp = np.ones(w.shape[1]) if importance is None else importance
    return float((((w.astype(np.float64) - deq) ** 2) * imp).sum())


# ------------------------------------------------------------------------------------------------ codecs


def test_scale_decoders_match_gguf_py_on_every_code():
    codes = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(fp4.UE4M3_HALF, NV.ue4m3_to_fp32(codes).astype(np.float32))
    np.testing.assert_array_equal(fp4.E8M0_HALF, MX.e8m0_to_fp32_half(codes[:, None])[:, 0])


def test_ue4m3_encoder_matches_gguf_py():
    rng = np.random.default_rng(0)
    exact = fp4.UE4M3_HALF * 2  # every representable value encodes back to its own code (0x7F is NaN -> 0) ...
    codes = fp4.float_to_ue4m3(exact)
    valid = np.arange(256) <= fp4.UE4M3_MAX_CODE
    expect = np.where(exact > 0, np.arange(256), 0)
    expect[0x78:0x7E] = 0x7E  # ... except exponent 15 (256..416): ggml treats it as overflow and stores 448
    np.testing.assert_array_equal(codes[valid], expect[valid])
    midpoints = (exact[1:fp4.UE4M3_MAX_CODE + 1] + exact[:fp4.UE4M3_MAX_CODE]) / 2  # ties: ggml rounds up
    x = np.concatenate([exact, midpoints, np.nextafter(midpoints, 0), rng.uniform(0, 500, 20000),
                        np.exp(rng.uniform(-16, 7, 20000)), [0, -1, 448, 449, 1e30, 2.0 ** -10, 2.0 ** -11]])
    x = x.astype(np.float32)
    np.testing.assert_array_equal(fp4.float_to_ue4m3(x), NV.fp32_to_ue4m3(x))
    # the numba scalar version used by the search
    sample = x[::7]
    np.testing.assert_array_equal([fp4._ue4m3_code(float(v)) for v in sample], NV.fp32_to_ue4m3(sample))


def test_e8m0_reference_matches_gguf_py():
    w = heavy_tailed(1, 16, 256)
    np.testing.assert_array_equal(fp4.reference_quantize(w, QT.MXFP4),
                                  gguf.quants.quantize(w, QT.MXFP4).reshape(16, -1))


def _libggml():
    import llama_cpp

    path = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so")
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_reference_encoder_is_ggmls(qtype):
    """reference_quantize is byte-identical to ggml's quantize_row_*_ref in the libggml llama.cpp runs."""
    lib = _libggml()
    w = np.concatenate([heavy_tailed(2, 24, 512), heavy_tailed(3, 8, 512, scale=3.0)])
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros((w.shape[0], w.shape[1] // bs * ts), np.uint8)
    n = lib.ggml_quantize_chunk(int(qtype), w.ctypes.data, out.ctypes.data, 0, w.shape[0], w.shape[1], None)
    assert n == out.nbytes
    np.testing.assert_array_equal(fp4.reference_quantize(w, qtype), out)


# ------------------------------------------------------------------------------------------------ encoder


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_blocks_round_trip_through_gguf_py(qtype):
    w = heavy_tailed(4, 32, 512)
    enc = fp4.quantize(w, qtype)
    assert enc.data.shape == (32, 512 // gguf.GGML_QUANT_SIZES[qtype][0] * gguf.GGML_QUANT_SIZES[qtype][1])
    oracle = gguf.quants.dequantize(enc.data, qtype).reshape(w.shape)
    np.testing.assert_array_equal(fp4.dequantize(enc.data, qtype), oracle)
    np.testing.assert_array_equal(fp4.dequantize(enc.data, qtype, enc.tensor_scale),
                                  oracle * np.float32(enc.tensor_scale))
    # the reported error is the error of what was stored
    assert enc.error == pytest.approx(weighted_error(w, fp4.dequantize(enc.data, qtype, enc.tensor_scale)), rel=1e-6)
    # quants.quantize: the same codec without a tensor scale
    plain = quants.quantize(w, qtype)
    np.testing.assert_array_equal(plain, fp4.quantize(w, qtype, tensor_scale=1.0).data)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("seed", range(4))
def test_search_never_worse_than_ggml(qtype, seed):
    """Per group the search contains ggml's scale choice, so with or without importance and with no tensor scale
    it is never worse than ggml's encoder, group by group."""
    w = heavy_tailed(10 + seed, 32, 256, scale=[0.002, 0.02, 0.3, 5.0][seed])
    imp = np.random.default_rng(seed).gamma(0.5, size=256).astype(np.float32) if seed % 2 else None
    ref = fp4.dequantize(fp4.reference_quantize(w, qtype), qtype)
    ours = fp4.dequantize(fp4.quantize(w, qtype, imp, tensor_scale=1.0).data, qtype)
    G = fp4.LAYOUTS[qtype].group_size
    imp_ = np.ones(256) if imp is None else imp.astype(np.float64)
    per_group = lambda d: (((w - d).astype(np.float64) ** 2) * imp_).reshape(-1, G).sum(1)  # noqa: E731
    assert (per_group(ours) <= per_group(ref) * (1 + 1e-9) + 1e-30).all()
    assert per_group(ours).sum() < per_group(ref).sum()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("seed", range(6))
def test_tensor_scale_search_never_worse_than_none(qtype, seed):
    scale = [0.001, 0.01, 0.05, 0.3, 2.0, 0.02][seed]
    w = heavy_tailed(20 + seed, 40, 256, scale=scale)
    imp = np.random.default_rng(seed).gamma(1.0, size=256).astype(np.float32) if seed >= 3 else None
    searched = fp4.quantize(w, qtype, imp)
    none = fp4.quantize(w, qtype, imp, tensor_scale=1.0)
    e_searched = weighted_error(w, fp4.dequantize(searched.data, qtype, searched.tensor_scale), imp)
    e_none = weighted_error(w, fp4.dequantize(none.data, qtype), imp)
    assert e_searched <= e_none * (1 + 1e-9)
    if qtype == QT.NVFP4 and scale <= 0.01:
        # small weights: without a tensor scale the micro-scales are E4M3 subnormals; the tensor scale fixes it
        assert searched.tensor_scale != 1.0 and e_searched < 0.9 * e_none


def test_tensor_scale_search_on_row_subset_still_checked_against_none():
    w = heavy_tailed(30, 600, 128, scale=0.3)
    enc = fp4.quantize(w, QT.NVFP4)  # 600 x 128 > SEARCH_VALUES: candidates scored on a subset of rows
    none = fp4.quantize(w, QT.NVFP4, tensor_scale=1.0)
    assert enc.error <= none.error * (1 + 1e-9)


def test_bad_input():
    with pytest.raises(LlmqError, match="multiple of the block size 64"):
        fp4.quantize(np.ones((2, 96), np.float32), QT.NVFP4)
    with pytest.raises(LlmqError, match="non-finite"):
        fp4.quantize(np.full((1, 64), np.nan, np.float32), QT.NVFP4)
    with pytest.raises(LlmqError, match="positive finite"):
        fp4.quantize(np.ones((1, 64), np.float32), QT.NVFP4, tensor_scale=0.0)
    assert (fp4.quantize(np.zeros((2, 64), np.float32), QT.NVFP4).data[:, 4:] == 0).all()


def test_where_tensor_scales_apply():
    assert fp4.applies_tensor_scale("llama", "blk.3.ffn_down.weight", QT.NVFP4)
    assert fp4.applies_tensor_scale("llama", "blk.3.attn_v.weight", QT.MXFP4)
    assert not fp4.applies_tensor_scale("llama", "blk.3.attn_v.weight", QT.Q4_0)
    assert not fp4.applies_tensor_scale("qwen2", "blk.0.ffn_up.weight", QT.NVFP4)  # qwen2.cpp passes NULL
    assert fp4.applies_tensor_scale("qwen2", "blk.0.attn_output.weight", QT.NVFP4)
    assert fp4.applies_tensor_scale("qwen3", "output.weight", QT.NVFP4)
    assert not fp4.applies_tensor_scale("qwen3", "output.weight", QT.MXFP4)
    assert not fp4.applies_tensor_scale("llama", "token_embd.weight", QT.NVFP4)
    assert fp4.scale_tensor_name("blk.1.attn_q.weight") == "blk.1.attn_q.scale"


# ------------------------------------------------------------------------------------------------ kernels


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_kernels_match_numpy_reference(qtype):
    from runtime import kernels, kernels_fp4

    rng = np.random.default_rng(5)
    w = heavy_tailed(6, 80, 384, scale=0.05)
    x = rng.standard_normal((6, 384)).astype(np.float32)
    enc = fp4.quantize(w, qtype)
    qt = kernels.QTensor(enc.data, qtype, w.shape)
    np.testing.assert_array_equal(kernels.dequantize(qt), gguf.quants.dequantize(enc.data, qtype).reshape(w.shape))
    np.testing.assert_array_equal(kernels.dequantize(qt, rows=[3, 0]), kernels.dequantize(qt)[[3, 0]])
    ref = kernels_fp4.matmul_ref(enc.data, qtype, w.shape, x)
    tol = 2e-6 * np.abs(ref).max()
    np.testing.assert_allclose(kernels.matvec(qt, x[0]), ref[0], atol=tol)
    np.testing.assert_allclose(kernels.matmul(qt, x), ref, atol=tol)
    np.testing.assert_allclose(kernels.matmul(qt, x[:2]), ref[:2], atol=tol)
    # the numba kernel quantises the activation to Q8_0 like ggml: far closer to the reference than to float x
    exact = x.astype(np.float64) @ gguf.quants.dequantize(enc.data, qtype).reshape(w.shape).T.astype(np.float64)
    assert np.abs(kernels.matmul(qt, x) - exact).max() > 10 * tol


@pytest.mark.parametrize("qtype, cols", [(QT.NVFP4, 1024), (QT.MXFP4, 1024), (QT.MXFP4, 1056)],
                         ids=["NVFP4", "MXFP4", "MXFP4-odd-blocks"])
def test_kernels_match_ggml_cpu_vec_dot(qtype, cols):
    """Against llama.cpp's own CPU backend (llama-cpp-python's libggml-cpu): same Q8_0 activation, the same float
    results as its vec_dot, for decode and for prefill (ggml-cpu's batched product for both types is that vec_dot,
    except MXFP4 matrices with a multiple of 8 rows, which it repacks: 20 rows here)."""
    from ggml_cpu import FROM_FLOAT, VEC_DOT, open_ggml_cpu

    from runtime import kernels

    lib = open_ggml_cpu()
    traits = lib.ggml_get_type_traits_cpu(int(qtype)).contents
    assert QT(traits.vec_dot_type) == QT.Q8_0
    rows = 20
    rng = np.random.default_rng(3)
    data = fp4.quantize(heavy_tailed(9, rows, cols, scale=0.05), qtype).data
    x = rng.standard_normal(cols).astype(np.float32)
    x_q8 = np.zeros(cols // 32 * 34, np.uint8)
    FROM_FLOAT(lib.ggml_get_type_traits_cpu(int(QT.Q8_0)).contents.from_float)(x.ctypes.data, x_q8.ctypes.data,
                                                                                cols)
    expected = np.zeros(rows, np.float32)
    vec_dot = VEC_DOT(traits.vec_dot)
    for r in range(rows):
        row = np.ascontiguousarray(data[r])
        vec_dot(cols, expected[r:].ctypes.data, 0, row.ctypes.data, 0, x_q8.ctypes.data, 0, 1)
    w = kernels.QTensor(data, qtype, (rows, cols))
    np.testing.assert_array_equal(kernels.matvec(w, x), expected)
    np.testing.assert_array_equal(kernels.matmul(w, np.stack([x] * 6))[4], expected)
    np.testing.assert_array_equal(kernels.matmul(w, np.stack([x] * 2))[1], expected)


# ------------------------------------------------------------------------------------------------ GPTQ


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_gptq_beats_importance_rtn(qtype):
    from llmq import gptq

    rng = np.random.default_rng(7)
    cols = 256
    mix = rng.standard_normal((cols, cols)) / np.sqrt(cols) + np.eye(cols)
    X = (rng.standard_normal((2048, cols)) * np.exp(rng.normal(0, 1, cols))) @ mix
    H = X.T @ X / len(X)
    W = heavy_tailed(8, 64, cols, scale=0.02)
    data, deq, s = fp4.gptq_quantize(W, H, qtype)
    np.testing.assert_array_equal(deq, fp4.dequantize(data, qtype, s))
    rtn = fp4.quantize(W, qtype, np.diag(H).astype(np.float32))
    e_gptq = gptq.output_error(W, deq, H)
    e_rtn = gptq.output_error(W, fp4.dequantize(rtn.data, qtype, rtn.tensor_scale), H)
    assert e_gptq < 0.9 * e_rtn


# ------------------------------------------------------------------------------------------------ end to end


def _set_scales(src, dst, factor: float) -> None:
    """Copy a GGUF with every `.scale` tensor multiplied by factor (in place in the copy's tensor data)."""
    shutil.copyfile(src, dst)
    reader = gguf.GGUFReader(dst, "r+")
    for t in reader.tensors:
        if t.name.endswith(".scale"):
            t.data[...] = t.data * np.float32(factor)
    del reader


@pytest.mark.parametrize("ftype", ["NVFP4", "MXFP4"])
def test_convert_runs_in_llamacpp_and_native(tiny_gguf, tmp_path, ftype):
    """Our FP4 file loads in llama.cpp; native and llama.cpp agree; llama.cpp really applies the tensor scales (the
    logits move when they change) and the native runtime moves with it."""
    from llmq.convert import convert
    from runtime.llamacpp_engine import LlamaCppEngine

    import runtime

    _, ckpt = tiny_gguf("llama")
    path = tmp_path / f"{ftype}.gguf"
    res = convert(ckpt, path, ftype)
    assert res.types.get(ftype, 0) >= 7
    reader = gguf.GGUFReader(path)
    names = {t.name: t for t in reader.tensors}
    scales = [n for n in names if n.endswith(".scale")]
    fp4_weights = [n for n, t in names.items() if t.tensor_type in (QT.NVFP4, QT.MXFP4)
                   and fp4.applies_tensor_scale("llama", n, t.tensor_type)]
    assert sorted(scales) == sorted(fp4.scale_tensor_name(n) for n in fp4_weights)
    del reader

    tokens = np.random.default_rng(0).integers(0, 200, 40)

    def both(p):
        model = runtime.load_gguf(p, n_ctx=64)
        native = model.forward(tokens, model.new_cache(type_k="f32", type_v="f32"))
        ref = LlamaCppEngine(p, n_ctx=64, threads=1, cache_type_k="f32", cache_type_v="f32").eval(tokens.tolist())
        return native, ref

    native, ref = both(path)
    assert np.abs(native - ref).max() <= 2e-3 * np.abs(ref).max()
    doubled = tmp_path / f"{ftype}-x2.gguf"
    _set_scales(path, doubled, 2.0)
    native2, ref2 = both(doubled)
    assert np.abs(ref2 - ref).max() > 100 * np.abs(native - ref).max()  # llama.cpp applies them ...
    assert np.abs(native2 - ref2).max() <= 2e-3 * np.abs(ref2).max()  # ... and so does the runtime
