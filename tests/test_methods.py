"""Calibrated quantisers: GPTQ on ggml grids, AWQ / SmoothQuant folding, calibration, and whole files in llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
import gguf.quants

from llmq import awq, calibrate, gptq
from llmq.quants import SPECS, quantize


def correlated_layer(rows: int, cols: int, n: int = 2048, seed: int = 0):
    """A linear layer with correlated inputs and a few loud channels (what GPTQ and AWQ exploit)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((cols, cols)) * (0.1 + rng.random(cols)[:, None] ** 2)
    X = (rng.standard_normal((n, cols)) @ mix / np.sqrt(cols)).astype(np.float32)
    X[:, :4] *= 6
    H = X.T.astype(np.float64) @ X / n
    W = (0.05 * rng.standard_normal((rows, cols))).astype(np.float32)
    return W, H


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_K, QT.Q3_K])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_bytes_and_error(qtype, act_order):
    W, H = correlated_layer(64, 512)
    data, Wq = gptq.gptq_quantize(W, H, qtype, act_order=act_order)
    # the bytes are a valid ggml encoding of exactly the values GPTQ optimised
    assert np.array_equal(gguf.quants.dequantize(data, qtype).reshape(W.shape), Wq)
    imatrix_rtn = gguf.quants.dequantize(quantize(W, qtype, np.diag(H).astype(np.float32)), qtype).reshape(W.shape)
    err_gptq, err_rtn = gptq.output_error(W, Wq, H), gptq.output_error(W, imatrix_rtn, H)
    assert err_gptq < 0.6 * err_rtn, (err_gptq, err_rtn)


def test_gptq_kernel_matches_numpy():
    rng = np.random.default_rng(1)
    W, H = correlated_layer(16, 64, seed=1)
    U = gptq.inverse_hessian_factor(H)[0].astype(np.float32)
    step = np.abs(rng.standard_normal((16, 64))).astype(np.float32) * 0.02
    step[0, :3] = 0  # a dead block: every code gives the same value
    offset = (-8 * step).astype(np.float32)
    ref = gptq.quantize_batch_numpy(W, U, step, offset, 0, 15)
    codes, Q, Err = np.zeros((16, 64), np.int32), np.zeros((16, 64), np.float32), np.zeros((16, 64), np.float32)
    gptq._quantize_batch(W.copy(), U, step, offset, 0, 15, codes, Q, Err)
    assert np.array_equal(codes, ref[0])
    np.testing.assert_allclose(Q, ref[1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(Err, ref[2], rtol=1e-4, atol=1e-6)


def test_damping_rises_on_singular_hessian():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((8, 64))  # rank 8 < 64, and a column never active
    X[:, 5] = 0
    H = X.T @ X / 8
    H[3, 3] *= -1  # indefinite: the first damping cannot fix it
    U, used = gptq.inverse_hessian_factor(H, damp=0.01)
    assert used > 0.01 and np.isfinite(U).all()
    W = (0.1 * rng.standard_normal((4, 64))).astype(np.float32)
    data, Wq = gptq.gptq_quantize(W, X.T @ X / 8, QT.Q4_0)
    assert np.isfinite(Wq).all()


def test_awq_search_never_worse_than_unscaled():
    W, H = correlated_layer(96, 256, seed=3)
    x = np.sqrt(np.diag(H))
    choice = awq.search_scale([W], [QT.Q4_0], H, x)
    assert choice.errors[choice.alpha] <= choice.errors[0.0]
    assert choice.alpha > 0  # with loud channels, scaling them helps


# ---------------------------------------------------------------------------------------------- folding is exact

def _layer(arch, tmp_path):
    import sys
    from tiny_models import make_tiny_checkpoint

    from llmq import arch as archs
    from llmq.checkpoint import Checkpoint
    from llmq.convert import plan_tensors

    ckpt_dir = make_tiny_checkpoint(arch, tmp_path / arch)
    with Checkpoint(ckpt_dir) as ckpt:
        spec, hp = archs.get_arch(ckpt.config), archs.read_hparams(ckpt.config)
        plans = plan_tensors(ckpt, spec, hp, "F32")
        w = {p.name: p.read() for p in plans if p.name.startswith("blk.0.")}
    return spec, hp, w


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fold_leaves_float_outputs_unchanged(arch, tmp_path):
    from runtime.models.llama import Rope, TransformerBlock

    spec, hp, w = _layer(arch, tmp_path)
    assert hp.n_head_kv < hp.n_head  # GQA: v -> output scales are shared by query heads
    args = calibrate.model_args(spec, hp)
    rope = Rope(args)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((24, hp.n_embd)).astype(np.float32)
    before = TransformerBlock(args, 0, w, rope)(x, 0)
    folded = dict(w)
    for group, n in [("attn_in", hp.n_embd), ("ffn_in", hp.n_embd), ("ffn_down_in", hp.n_ff),
                     ("attn_out", hp.n_head_kv * hp.head_dim)]:
        s = np.exp(rng.uniform(-1.5, 1.5, n)).astype(np.float32)
        calibrate.fold_input_scale(folded, 0, group, s, args)
    if arch == "qwen2":
        assert not np.allclose(folded["blk.0.attn_v.bias"], w["blk.0.attn_v.bias"])
    after = TransformerBlock(args, 0, folded, rope)(x, 0)
    assert np.abs(after - before).max() <= 1e-5 * np.abs(before).max()
    assert not np.allclose(folded["blk.0.attn_q.weight"], w["blk.0.attn_q.weight"])


def test_calibration_tokens_are_deterministic(tmp_path):
    from tiny_models import make_tiny_checkpoint
    from tiny_tokenizers import heldout_text

    from llmq.errors import LlmqError

    ckpt = make_tiny_checkpoint("llama", tmp_path / "m")
    text = tmp_path / "calib.txt"
    text.write_text(heldout_text(400))
    a = calibrate.calibration_tokens(ckpt, text, 6, 32)
    b = calibrate.calibration_tokens(ckpt, text, 6, 32)
    assert a.shape == (6, 32) and np.array_equal(a, b) and len({tuple(r) for r in a}) > 1
    with pytest.raises(LlmqError):
        calibrate.calibration_tokens(ckpt, text, 2, 10**7)


# ---------------------------------------------------------------------------------- whole files in llama.cpp

def _kld(base: np.ndarray, other: np.ndarray) -> float:
    lp = base - np.logaddexp.reduce(base, axis=1, keepdims=True)
    lq = other - np.logaddexp.reduce(other, axis=1, keepdims=True)
    return float((np.exp(lp) * (lp - lq)).sum(axis=1).mean())


def _llama_logits(path, tokens):
    llama_cpp = pytest.importorskip("llama_cpp")
    m = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=1)
    m.eval(tokens)
    out = np.array(m.scores[: len(tokens)], np.float64)
    m.close()
    return out


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory):
    """A tiny llama whose norms make a few activation channels loud, like real LLMs (random weights alone give
    AWQ nothing to find), plus calibration and held-out text from different parts of the training text."""
    from tiny_models import make_loud_channel_checkpoint

    return make_loud_channel_checkpoint(tmp_path_factory.mktemp("methods"), seed=5, channels=[3, 17, 40], factor=8.0,
                                        n_lines=3000)


@pytest.mark.parametrize("ftype", ["Q4_0", "Q3_K_S"])
def test_methods_beat_rtn_in_llama_cpp(outlier_model, ftype, tmp_path):
    pytest.importorskip("llama_cpp")
    from gguf import GGUFReader

    from llmq.convert import convert

    ckpt, calib, heldout = outlier_model
    f32 = convert(ckpt, tmp_path / "f32.gguf", "F32").path
    import llama_cpp

    vocab = llama_cpp.Llama(str(f32), vocab_only=True, verbose=False)
    tokens = vocab.tokenize(heldout.encode(), add_bos=False)[:200]
    base = _llama_logits(f32, tokens)
    rtn = _kld(base, _llama_logits(convert(ckpt, tmp_path / "rtn.gguf", ftype).path, tokens))
    for method in ("rtn", "awq", "gptq", "awq+gptq"):
        path = convert(ckpt, tmp_path / f"calibrated-{method}.gguf", ftype, method=method, calib=calib, calib_samples=16,
                       calib_len=96).path
        kld = _kld(base, _llama_logits(path, tokens))
        assert kld < 0.97 * rtn, (method, kld, rtn)
        meta = GGUFReader(path).fields
        assert bytes(meta["llmq.method"].parts[-1]).decode() == method
        assert int(meta["llmq.calib_samples"].parts[-1][0]) == 16


def test_smooth_scales_balance_activations_and_weights():
    from llmq.smooth import smooth_scales

    rng = np.random.default_rng(6)
    act = np.exp(rng.uniform(-2, 3, 32)).astype(np.float32)
    ws = [rng.standard_normal((8, 32)).astype(np.float32), rng.standard_normal((5, 32)).astype(np.float32)]
    s = smooth_scales(act, ws, 0.5)
    w_max = np.max([np.abs(w).max(axis=0) for w in ws], axis=0)
    np.testing.assert_allclose(act / s, w_max * s, rtol=1e-5)  # alpha 0.5: both sides meet in the middle
    np.testing.assert_allclose(smooth_scales(act, ws, 1.0), act, rtol=1e-6)


# ------------------------------------------------------------------------------------------- AWQ clipping search

def test_clip_search_lowers_output_error_on_heavy_tailed_weights():
    W, H = correlated_layer(64, 256, seed=7)
    rng = np.random.default_rng(7)
    W = (W * np.exp(rng.standard_normal(W.shape))).astype(np.float32)  # heavy tails: a few large values per block
    importance = np.diag(H).astype(np.float32)
    for qtype, gain in ((QT.Q4_0, 0.97), (QT.Q4_K, 1.0)):  # K-quants' own scale search already trims ranges
        clipped, ratio = awq.search_clip(W, qtype, H)
        assert ratio.shape == (64, 256 // SPECS[qtype].group_size) and (ratio < 1).any()
        before = awq.layer_output_error(W, awq.fake_quantize(W, qtype, importance), H)
        after = awq.layer_output_error(W, awq.fake_quantize(clipped, qtype, importance), H)
        assert after < gain * before, (qtype, after, before)
        assert np.all(np.abs(clipped) <= np.abs(W))


# ---------------------------------------------------------------------------------------------- --auto-fallback

def test_allocate_spends_the_budget_on_the_most_sensitive_tensors():
    from llmq.fallback import allocate, bits_per_weight, candidates

    shapes = {"a.weight": (64, 256), "b.weight": (64, 256), "c.weight": (64, 256), "norm.weight": (256,)}
    base = {"a.weight": QT.Q4_0, "b.weight": QT.Q4_0, "c.weight": QT.Q4_0, "norm.weight": QT.F32}

    def sens(loud):
        # nsr roughly quartering per extra 2 bits; `loud` is 10x more sensitive than the others
        return {n: {t: (10.0 if n == loud else 1.0) * 4.0 ** (-bits_per_weight(t) / 2)
                    for t in candidates(QT.Q4_0, 256)} for n in ("a.weight", "b.weight", "c.weight")}

    n_weights = 3 * 64 * 256 + 256
    budget = (3 * 64 * 256 * 4.5 + 64 * 256 * 1.0 + 256 * 32) / n_weights  # about one tensor one bit higher
    for loud in ("a.weight", "c.weight"):
        alloc = allocate(shapes, base, sens(loud), budget)
        assert alloc.bpw <= budget and alloc.base_bpw < alloc.bpw
        assert list(alloc.upgraded) == [loud], alloc.upgraded
    everything = allocate(shapes, base, sens("a.weight"), 9.0)
    assert all(t == QT.Q8_0 for n, t in everything.types.items() if n != "norm.weight")
    with pytest.raises(Exception, match="auto-fallback"):
        allocate(shapes, base, sens("a.weight"), 4.0)


def test_auto_fallback_end_to_end(outlier_model, tmp_path):
    from gguf import GGUFReader

    from llmq.convert import convert
    from llmq.fallback import tensor_bits

    ckpt, calib, _ = outlier_model
    base = convert(ckpt, tmp_path / "base.gguf", "Q4_0", calib=calib, calib_samples=4, calib_len=64).path
    budget = 5.5
    path = convert(ckpt, tmp_path / "fb.gguf", "Q4_0", calib=calib, calib_samples=4, calib_len=64,
                   auto_fallback=budget).path

    def bpw(p):
        r = GGUFReader(p)
        bits = sum(tensor_bits(tuple(int(x) for x in t.shape[::-1]), t.tensor_type) for t in r.tensors)
        return bits / sum(int(t.n_elements) for t in r.tensors), r

    (b0, _), (b1, r) = bpw(base), bpw(path)
    assert b0 < b1 <= budget
    chosen = bytes(r.fields["llmq.auto_fallback"].parts[-1]).decode()
    assert chosen != "none" and all("=" in c for c in chosen.split(","))
    for item in chosen.split(","):
        name, tname = item.split("=")
        assert next(t for t in r.tensors if t.name == name).tensor_type.name == tname
    with pytest.raises(Exception, match="needs calibration"):
        convert(ckpt, tmp_path / "x.gguf", "Q4_0", auto_fallback=6.0)
