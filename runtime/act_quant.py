"""Per-token int8 activation quantisation: the W8A8 serving mode SmoothQuant was designed for.

ggml quantises activations per 32 values (q8_0), so one outlier channel only coarsens its own block. Integer GEMM
engines (SmoothQuant, LLM.int8, TensorRT W8A8) use one scale per token instead: an outlier channel of 20x the typical
magnitude then leaves ~6 levels for every other channel of that token. This mode simulates that on the native
runtime (each linear's input is rounded to int8 per row before the matmul), so `--smooth ALPHA` can be measured where
it matters.
"""

from __future__ import annotations

import numpy as np

MODES = ("none", "int8-token")


def quantize_per_token_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: x ~= q * scale[:, None], |q| <= 127, round half away from zero."""
    x = np.asarray(x, dtype=np.float32)
    amax = np.max(np.abs(x), axis=-1, keepdims=True)
    scale = (amax / np.float32(127.0)).astype(np.float32)
    inv = np.where(scale > 0, np.float32(1.0) / np.where(scale > 0, scale, 1), np.float32(0.0))
    q = np.clip(np.trunc(x * inv + np.copysign(np.float32(0.5), x)), -127, 127).astype(np.int8)
    return q, scale[..., 0]


def fake_quant_per_token_int8(x: np.ndarray) -> np.ndarray:
    """x rounded onto its per-row int8 grid, as float32 (what an int8 GEMM effectively multiplies)."""
    q, scale = quantize_per_token_int8(x)
    return q.astype(np.float32) * scale[..., None]


def check_mode(mode: str) -> str:
    from llmq.errors import LlmqError

    if mode not in MODES:
        raise LlmqError(f"unknown activation mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode
