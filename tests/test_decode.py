"""The fused decode step (runtime/decode.py) against the op-by-op path of models/llama.py: identical logits and
cache contents token after token, for every weight type it mirrors, both rope layouts and a repacked (external)
down projection; and the half-precision / exp helpers it is built from against their scalar references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from numba import njit

from runtime import decode, isa, kernels, kvcache
from runtime.models import llama

DIM, HIDDEN, VOCAB = 256, 512, 300  # multiples of 256: the K-quant types fit every matrix


def random_qtensor(qtype: QT, rows: int, cols: int, rng) -> kernels.QTensor:
    """Random blocks with sane f16 scales (random bits would give nan/inf scales)."""
    block, block_bytes = kernels.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows, cols // block, block_bytes), dtype=np.uint8)
    for offset in kernels._F16_FIELDS[qtype]:
        scales = rng.uniform(2e-4, 2e-3, (rows, cols // block)).astype(np.float16)
        data[:, :, offset:offset + 2] = scales.view(np.uint8).reshape(rows, cols // block, 2)
    return kernels.QTensor(data.reshape(rows, -1), qtype, (rows, cols))


def random_model(types, *, neox=False, rope_dim=64, seed=0) -> llama.Model:
    """2 layers, 4 query heads of 64 over 2 kv heads; `types` for q, k, v, o, gate, up, down."""
    rng = np.random.default_rng(seed)
    args = llama.ModelArgs(arch="qwen2" if neox else "llama", n_layers=2, dim=DIM, hidden_dim=HIDDEN, n_heads=4,
                           n_kv_heads=2, head_dim=64, vocab_size=VOCAB, norm_eps=1e-5, rope_theta=10000.0,
                           rope_dim=rope_dim, rope_neox=neox)
    shapes = {"attn_q": (DIM, DIM), "attn_k": (128, DIM), "attn_v": (128, DIM), "attn_output": (DIM, DIM),
              "ffn_gate": (HIDDEN, DIM), "ffn_up": (HIDDEN, DIM), "ffn_down": (DIM, HIDDEN)}
    w = {"token_embd.weight": random_qtensor(QT.Q8_0, VOCAB, DIM, rng),
         "output_norm.weight": rng.uniform(0.5, 1.5, DIM).astype(np.float32)}
    for layer in range(2):
        for (name, shape), qtype in zip(shapes.items(), types):
            w[f"blk.{layer}.{name}.weight"] = random_qtensor(qtype, *shape, rng)
        for norm in ("attn_norm", "ffn_norm"):
            w[f"blk.{layer}.{norm}.weight"] = rng.uniform(0.5, 1.5, DIM).astype(np.float32)
    return llama.Model(args, w)


def decode_run(model, tokens, n_prefill, fused: bool):
    cache = model.new_cache(n_ctx=64)
    model.forward(tokens[:n_prefill], cache)
    if not fused:
        model._fused_decode_step = lambda cache: None
    try:
        logits = np.concatenate([model.forward(tokens[i:i + 1], cache) for i in range(n_prefill, len(tokens))])
    finally:
        model.__dict__.pop("_fused_decode_step", None)
    return logits, cache


TYPE_SETS = {
    "q8_0": [QT.Q8_0] * 7,
    "q4_0": [QT.Q4_0] * 7,
    "mixed-32": [QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_0, QT.Q5_0, QT.Q4_1],
    "k-quants": [QT.Q3_K, QT.Q5_K, QT.Q6_K, QT.Q5_K, QT.Q6_K, QT.Q3_K, QT.Q2_K],
    "q4_k_m-like": [QT.Q5_0, QT.Q5_0, QT.Q8_0, QT.Q5_0, QT.Q5_0, QT.Q5_0, QT.Q4_K],
}


@pytest.mark.parametrize("name", TYPE_SETS)
def test_fused_decode_is_bit_identical(name):
    types = TYPE_SETS[name]
    not_mirrored = [t for t in types[:6]
                    if t not in decode._CODES or kernels._TYPES[t].matvec is not decode._CODES[t][1]]
    if not_mirrored:  # kernels.py may move a K-quant to a new decode kernel; the fused path then leaves it alone
        pytest.skip(f"{not_mirrored} no longer use the decode kernels decode.py mirrors")
    model = random_model(types)
    tokens = np.random.default_rng(1).integers(0, VOCAB, 40)
    step = model._fused_decode_step(model.new_cache(n_ctx=64))
    assert step is not None
    # down goes through its own matvec kernel when decode.py does not mirror it (Q4_K/Q2_K: the repacked order)
    assert (step.external_down[0] is None) == (decode._code(model.layers[0].feed_forward.w_down.weight) >= 0)
    ops, ops_cache = decode_run(model, tokens, 24, fused=False)
    fused, fused_cache = decode_run(model, tokens, 24, fused=True)
    assert np.isfinite(ops).all() and np.abs(ops).max() > 0
    assert np.array_equal(fused, ops)
    for layer in range(2):
        for ours, theirs in ((fused_cache.k[layer], ops_cache.k[layer]), (fused_cache.v[layer], ops_cache.v[layer])):
            assert np.array_equal(ours.data[:40].view(np.uint16), theirs.data[:40].view(np.uint16))


@pytest.mark.parametrize("neox,rope_dim", [(True, 64), (False, 32), (True, 48)])
def test_fused_decode_rope_layouts(neox, rope_dim):
    model = random_model(TYPE_SETS["mixed-32"], neox=neox, rope_dim=rope_dim, seed=2)
    tokens = np.random.default_rng(3).integers(0, VOCAB, 30)
    assert np.array_equal(decode_run(model, tokens, 20, fused=True)[0], decode_run(model, tokens, 20, fused=False)[0])


def test_fused_decode_only_where_it_applies():
    model = random_model(TYPE_SETS["q8_0"])
    assert model._fused_decode_step(model.new_cache(n_ctx=16)) is not None
    assert model._fused_decode_step(model.new_cache(n_ctx=16, type_k="q8_0")) is None
    assert model._fused_decode_step(model.new_cache(n_ctx=16, type_v="f32")) is None
    model.layers[1].attention.wv.bias = np.zeros(128, np.float32)
    assert model._fused_decode_step(model.new_cache(n_ctx=16)) is None
    model.layers[1].attention.wv.bias = None
    model.set_act_quant("int8-token")
    assert model._fused_decode_step(model.new_cache(n_ctx=16)) is None
    model.set_act_quant("none")
    step = model._fused_decode_step(model.new_cache(n_ctx=16))
    model.layers[0].attention.wq.weight = random_qtensor(QT.Q8_0, DIM, DIM, np.random.default_rng(9))
    assert model._fused_decode_step(model.new_cache(n_ctx=16)) is not step  # new weights: built again


@njit
def _half_helpers(x, rounded, bits, back, expf):
    for i in range(x.size):
        rounded[i] = kvcache.round_half(x[i])
        bits[i] = kvcache.f32_to_half(x[i])
        back[i] = kvcache.half_to_f32(bits[i])
        expf[i] = kvcache.ggml_expf(x[i])


@njit
def _scalar_references(x, rounded, expf):
    """kernels._round_f16, and ggml_expf as it was written before: its final j * 2^n by libm's ldexp."""
    K = kvcache
    for i in range(x.size):
        rounded[i] = kernels._round_f16(x[i])
        r = K._EXPF_8P23
        n = kernels._fma(x[i], K._EXPF_715476PP0, r) - r
        b = kernels._fma(-n, K._EXPF_7F7D1CPM20, kernels._fma(-n, K._EXPF_62E4PM1, x[i]))
        u = b * b
        j = kernels._fma(kernels._fma(kernels._fma(K._EXPF_0E4020PM7, b, K._EXPF_573E2EPM5), u,
                                      kernels._fma(K._EXPF_555E66PM3, b, K._EXPF_FFFDB6PM2)), u,
                         kernels._fma(K._EXPF_FFFFECPM1, b, np.float32(1.0)))
        if abs(n) > 192:
            expf[i] = np.float32(0.0) if n <= 0 else np.float32(np.inf)
        else:
            expf[i] = np.float32(math.ldexp(np.float64(j), int(n)))


@njit
def _scalar_references_avx2(x, rounded, expf):
    """The same for ggml_v_expf's AVX2 variant (what kvcache.ggml_expf is on an AVX2 machine): its j ends in c1 * b
    (no + 1), and j * 2^n is fma(k, j, k) = k * (1 + j) rounded once, or for |n| > 126 (1 + j) * 2^(n - m) rounded,
    then times s1 = 2^m (m = -125 for n <= 0, else 127), or s1 * s1 above |n| = 192."""
    K = kvcache
    for i in range(x.size):
        rounded[i] = kernels._round_f16(x[i])
        r = K._EXPF_8P23
        n = kernels._fma(x[i], K._EXPF_715476PP0, r) - r
        b = kernels._fma(-n, K._EXPF_7F7D1CPM20, kernels._fma(-n, K._EXPF_62E4PM1, x[i]))
        u = b * b
        j = kernels._fma(kernels._fma(kernels._fma(K._EXPF_0E4020PM7, b, K._EXPF_573E2EPM5), u,
                                      kernels._fma(K._EXPF_555E66PM3, b, K._EXPF_FFFDB6PM2)), u,
                         K._EXPF_FFFFECPM1 * b)
        m = -125 if n <= 0 else 127
        if not abs(n) > 126:
            expf[i] = np.float32(math.ldexp(np.float64(j) + 1.0, int(n)))
        elif abs(n) > 192:
            expf[i] = np.float32(math.ldexp(1.0, m)) * np.float32(math.ldexp(1.0, m))
        else:
            expf[i] = np.float32(math.ldexp(np.float64(j) + 1.0, int(n) - m)) * np.float32(math.ldexp(1.0, m))


def test_half_and_exp_helpers_match_scalar_code():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.integers(0, 2**32, 400_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
                        rng.uniform(-120, 90, 200_000).astype(np.float32),
                        np.array([0, -0.0, np.inf, -np.inf, 65504, 65519.99, 65520, 6.1e-5, 5.96e-8, 2.98e-8, 1e-9,
                                  -103.9, -87.4, 88.7, 89.0], np.float32)])
    x = x[~np.isnan(x)]
    rounded, bits, back, expf = (np.empty_like(x), np.empty(x.size, np.uint16), np.empty_like(x), np.empty_like(x))
    _half_helpers(x, rounded, bits, back, expf)
    ref_rounded, ref_expf = np.empty_like(x), np.empty_like(x)
    (_scalar_references_avx2 if isa.LEVEL == "avx2" else _scalar_references)(x, ref_rounded, ref_expf)
    with np.errstate(over="ignore"):
        assert np.array_equal(bits, x.astype(np.float16).view(np.uint16))
    assert np.array_equal(back, bits.view(np.float16).astype(np.float32))
    assert np.array_equal(rounded.view(np.uint32), ref_rounded.view(np.uint32))
    assert np.array_equal(expf.view(np.uint32), ref_expf.view(np.uint32))
    assert ((expf > 0) & (expf < 1e-38)).any()  # float32 subnormal results (the one rounding of j * 2^n) are covered


@njit
def _vector_softmax_steps(x, inv):
    """decode._attend_head's 16-lane steps over x (a multiple of 16 long): exp(x - 0) in place with each chunk's sum,
    then round_half(p * inv)."""
    exps = x.copy()
    sums = np.empty(x.size // 16, np.float32)
    for c0 in range(0, x.size, 16):
        sums[c0 // 16] = decode._exp_chunk16(exps, c0, np.float32(0.0))
    rounded = exps.copy()
    for c0 in range(0, x.size, 16):
        decode._round_scaled16(rounded, c0, inv)
    return exps, sums, rounded


@njit
def _scalar_softmax_steps(x, inv):
    exps = np.empty_like(x)
    for i in range(x.size):
        exps[i] = kvcache.ggml_expf(x[i])
    sums = np.empty(x.size // 16, np.float32)
    for c in range(sums.size):
        sums[c] = kvcache._reduce_add_16(exps[16 * c:16 * c + 16])
    rounded = np.empty_like(x)
    for i in range(x.size):
        rounded[i] = kvcache.round_half(exps[i] * inv)
    return exps, sums, rounded


@pytest.mark.skipif(isa.LEVEL == "avx2", reason="AVX2 machines attend with runtime/avx2_attention.py")
def test_vector_softmax_steps_equal_the_scalar_code():
    """The prefill attention's 16-lane exp / sum / rounding (LLVM vector code) against the scalar functions, on every
    kind of float32 including those whose exp underflows to 0, to subnormals, or overflows."""
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
                        rng.uniform(-140, 90, 100_000).astype(np.float32),
                        np.array([0, -0.0, np.inf, -np.inf, -103.9, -87.4, 88.7, 89.0, -133.0, -133.2], np.float32)])
    x = x[~np.isnan(x)]
    x = x[:x.size // 16 * 16]
    for inv in (np.float32(1.0), np.float32(3.7e-3), np.float32(1e5)):
        with np.errstate(over="ignore", invalid="ignore"):
            got, want = _vector_softmax_steps(x, inv), _scalar_softmax_steps(x, inv)
        for g, w in zip(got, want):
            assert np.array_equal(g.view(np.uint32), w.view(np.uint32))
    assert ((want[0] > 0) & (want[0] < 1e-38)).any() and (want[0] == 0).any() and np.isinf(want[0]).any()


@njit
def _per_row(w, x, f16, kind):
    """The per-row decode dots of kernels.py (what the 16-row kernels must reproduce bit for bit)."""
    xq = np.empty((w.shape[1], 32), np.int8)
    xd = np.empty(w.shape[1], np.float32)
    kernels._quantize_q8_0_cpu(x, xq, xd)
    xsum = kernels._block_sums(xq)
    out = np.empty(w.shape[0], np.float32)
    for r in range(w.shape[0]):
        if kind == 0:
            out[r] = kernels._dot_q4_0(w[r], xq, xsum, xd, f16)
        elif kind == 2:
            out[r] = kernels._dot_q5_0(w[r], xq, xsum, xd, f16)
        else:
            out[r] = kernels._dot_q8_0(w, r, xq, xd, f16)
    return out


@pytest.mark.parametrize("qtype,kind", [(QT.Q4_0, 0), (QT.Q5_0, 2), (QT.Q8_0, 3)], ids=["Q4_0", "Q5_0", "Q8_0"])
def test_sixteen_row_decode_kernels_equal_the_per_row_dots(qtype, kind):
    rng = np.random.default_rng(5)
    for rows, cols in [(16, 32), (48, 576), (37, 1536)]:  # 37: five rows left over for the per-row dot
        data = random_qtensor(qtype, rows, cols, rng).data.copy()
        if qtype == QT.Q8_0:  # extreme quants and activations: |q * x| up to 128 * 127
            data.reshape(rows, cols // 32, 34)[0, :, 2:] = 128
        w = kernels.QTensor(data, qtype, (rows, cols))
        x = rng.standard_normal(cols).astype(np.float32) * rng.uniform(0.1, 10, cols).astype(np.float32)
        x[:32] = np.where(np.arange(32) % 2, 3.0, -3.0)
        expected = _per_row(w._view, x, kernels.F16_TO_F32, kind)
        sixteen = {QT.Q4_0: kernels._matvec_q4_0, QT.Q5_0: kernels._matvec_q5_0, QT.Q8_0: kernels._matvec_q8_0}[qtype]
        assert np.array_equal(sixteen(w._view, x, kernels.F16_TO_F32), expected)
        if kernels._TYPES[qtype].matvec is sixteen:  # (on AVX2 matvec is kernels_avx2's: tests/test_kernels_avx2.py)
            assert np.array_equal(kernels.matvec(w, x), expected)


@pytest.mark.parametrize("pos0,n,q_scale", [(0, 40, 3), (13, 21, 3), (57, 2, 3), (20, 30, 60)])
def test_attention_on_the_f16_cache_equals_kvcache_attend_f16(pos0, n, q_scale):
    """(One token follows ggml_vec_dot_f16 instead: test_one_token_attention_is_ggml_graph_bit_for_bit.)
    q_scale 60: scores far enough apart that some probabilities underflow to 0."""
    rng = np.random.default_rng(pos0)
    n_heads, n_kv_heads, d = 6, 2, 64
    k_cache = (rng.standard_normal((80, n_kv_heads * d)) * 2).astype(np.float16)
    v_cache = rng.standard_normal((80, n_kv_heads * d)).astype(np.float16)
    q = (rng.standard_normal((n, n_heads, d)) * q_scale).astype(np.float32)
    L = pos0 + n
    expected = kvcache.attend_f16(q, k_cache[:L].astype(np.float32), v_cache[:L].astype(np.float32), 0.125, pos0,
                                  n_kv_heads)
    got = decode.attend_f16_cache(q, k_cache, v_cache, 0.125, pos0, n_kv_heads)
    assert np.array_equal(got, expected)


@pytest.mark.skipif(not isa.LEVEL.startswith("avx512"), reason="ggml-cpu's AVX512 attention runs only here "
                    "(AVX2: tests/test_avx2_parity_attention.py)")
@pytest.mark.parametrize("n, pos0, H, KV, d", [(1, 0, 4, 2, 64), (1, 37, 9, 3, 64), (1, 300, 4, 4, 128),
                                               (1, 100, 2, 1, 80), (2, 0, 4, 2, 64), (33, 100, 9, 3, 64)])
def test_one_token_attention_is_ggml_graph_bit_for_bit(n, pos0, H, KV, d):
    """The f16-cache attention against llama.cpp's own graph (KQ, soft_max_ext, KQV) on this AVX512 build: one token
    goes through ggml_vec_dot_f16 (decode._attend_head_one, also the fused decode layer's), more through tinyBLAS."""
    from ggml_cpu import open_ggml_cpu
    from test_avx2_parity_attention import ggml_attention

    lib = open_ggml_cpu()
    rng = np.random.default_rng(pos0 + d)
    L = pos0 + n
    n_kv = -(-L // 256) * 256  # llama.cpp's padded cache view; the padding rows hold other (masked) values
    keys = (rng.standard_normal((n_kv, KV * d)) * 2).astype(np.float16)
    values = rng.standard_normal((n_kv, KV * d)).astype(np.float16)
    q = (rng.standard_normal((n, H, d)) * 2).astype(np.float32)
    scale = np.float32(1 / np.sqrt(d))
    expected = ggml_attention(lib, q, keys, values, scale, pos0, KV, n_kv)
    np.testing.assert_array_equal(decode.attend_f16_cache(q, keys.copy(), values.copy(), scale, pos0, KV), expected)
    if n == 1:
        out = np.empty(H * d, np.float32)
        q16 = q.astype(np.float16).astype(np.float32).reshape(-1)
        for h in range(H):
            decode._attend_head_one(q16, h * d, keys.view(np.uint16), values.view(np.uint16), L, (h // (H // KV)) * d,
                                    d, scale, out)
        np.testing.assert_array_equal(out.reshape(1, -1), expected)
