"""SmoothQuant migration (Xiao et al. 2022): move activation outliers into the weights with per-input-channel scales

    s_j = max|x_j|^alpha / max_k |W_kj|^(1 - alpha)

over the linears sharing an input, folded like AWQ's scales (norm weight /= s, weight columns *= s) so the model
stays standard. Made for activation quantisation; for weight-only ggml types it is an option to try
(`--smooth ALPHA`), applied to the norm-fed groups (q/k/v after attn_norm, gate/up after ffn_norm) before the
chosen method.
"""

from __future__ import annotations

import numpy as np


def smooth_scales(act_absmax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """Per-input-channel scales (cols,) float32 for linears `weights` (rows_k, cols) sharing one input."""
    w_max = np.max([np.abs(w).max(axis=0) for w in weights], axis=0).astype(np.float64)
    a = np.maximum(np.asarray(act_absmax, np.float64), 1e-5)
    s = a ** alpha / np.maximum(w_max, 1e-5) ** (1.0 - alpha)
    s = np.where(np.isfinite(s) & (s > 0), s, 1.0)
    return s.astype(np.float32)
