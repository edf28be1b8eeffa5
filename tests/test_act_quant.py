"""Per-token int8 activation mode of the runtime, and SmoothQuant measured in it."""

from __future__ import annotations

import numpy as np
import pytest


def _reference_int8(x: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x)
    for i, row in enumerate(x):
        amax = float(np.max(np.abs(row)))
        if amax == 0:
            continue
        scale = np.float32(amax / 127.0)
        for j, v in enumerate(row):
            q = np.floor(abs(v) / scale + 0.5) * np.sign(v)
            out[i, j] = np.float32(min(max(q, -127), 127)) * scale
    return out


def test_per_token_int8_matches_a_plain_loop_and_keeps_the_row_maximum():
    from runtime.act_quant import fake_quant_per_token_int8, quantize_per_token_int8

    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 96)).astype(np.float32)
    x[1, 7] = 300.0  # an outlier channel coarsens its whole token
    x[4] = 0.0
    q, scale = quantize_per_token_int8(x)
    assert q.dtype == np.int8 and np.abs(q.astype(int)).max() == 127
    assert q[1, 7] == 127 and np.all(q[4] == 0)
    y = fake_quant_per_token_int8(x)
    assert np.allclose(y, _reference_int8(x), rtol=0, atol=1e-6 * np.abs(x).max())
    assert np.all(np.abs(y - x) <= scale[:, None] / 2 * (1 + 1e-5) + 1e-12)
    # the outlier's token loses far more than the others
    err = np.abs(y - x).mean(axis=1)
    assert err[1] > 10 * np.median(err[[0, 2, 3, 5]])


@pytest.fixture(scope="module")
def loud_channels(tmp_path_factory):
    """A tiny llama whose norms make a few residual channels 30x louder than the rest (the activation outliers of
    real LLMs), plus calibration and held-out token ids."""
    from tiny_models import make_loud_channel_checkpoint

    return make_loud_channel_checkpoint(tmp_path_factory.mktemp("actq"), seed=7, channels=[5, 21, 50], factor=30.0,
                                        n_lines=2000)


def _logits(path, text, mode):
    from runtime import load_gguf

    model = load_gguf(path, n_ctx=256)
    model.set_act_quant(mode)
    ids = model.tokenizer.encode(text, add_special=False)[:160]
    return model.forward(ids, None).astype(np.float64)


def _kld(base, other):
    lp = base - np.logaddexp.reduce(base, axis=1, keepdims=True)
    lq = other - np.logaddexp.reduce(other, axis=1, keepdims=True)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)))


def test_smoothquant_helps_int8_activations_and_keeps_the_float_model(loud_channels, tmp_path):
    from llmq.convert import convert

    ckpt, calib, heldout = loud_channels
    plain = convert(ckpt, tmp_path / "plain.gguf", "F32").path
    smooth = convert(ckpt, tmp_path / "smooth.gguf", "F32", calib=calib, calib_samples=8, calib_len=96,
                     smooth=0.8).path
    base = _logits(plain, heldout, "none")
    # folding the migration scales changes no function (up to float rounding)
    assert np.max(np.abs(_logits(smooth, heldout, "none") - base)) <= 1e-3 * np.max(np.abs(base))
    kld_plain = _kld(base, _logits(plain, heldout, "int8-token"))
    kld_smooth = _kld(base, _logits(smooth, heldout, "int8-token"))
    assert kld_plain > 1e-4  # int8 per token does hurt with loud channels
    assert kld_smooth < 0.5 * kld_plain, (kld_smooth, kld_plain)


def test_act_quant_mode_is_checked():
    from llmq.errors import LlmqError
    from runtime.act_quant import check_mode

    assert check_mode("int8-token") == "int8-token"
    with pytest.raises(LlmqError):
        check_mode("int4")
