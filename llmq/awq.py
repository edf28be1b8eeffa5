"""Activation-aware weight quantisation (AWQ, Lin et al. 2023), folded so the GGUF stays a standard model.

Input channels that see large activations matter more. Scaling input channel j of a linear by s_j (W[:, j] *= s_j)
and its input by 1/s_j leaves the float output unchanged but makes the quantisation grid finer, relative to the
weight, where s_j > 1. The 1/s_j is folded into whatever produces the input:

    attn_norm -> q, k, v       attn_norm.weight /= s           (one s shared by the three)
    ffn_norm  -> gate, up      ffn_norm.weight /= s
    up        -> down          up rows /= s                     (silu(gate) * up is linear in up)
    v         -> output        v rows (and bias) /= s           (attention mixes v linearly); with GQA one s per
                                                                kv channel, shared by the query heads that read it

s = mean|x|^alpha (normalised to geometric mean 1 of its extremes), alpha from a grid on [0, 1] chosen by the
error of the layer outputs under the TARGET ggml type, measured exactly from the calibration statistics:
for y = x W^T and H = X^T X / n the output error of a quantised W' is sum_rows (W - W') H (W - W')^T.
alpha = 0 (no scaling) is on the grid, so the search never picks something worse than plain quantisation.

Then clipping (llm-awq's auto_clip, `search_clip`): per row and quantisation group, shrink the range to a fraction
of max |w| when rounding the clipped group costs less output error than rounding the whole range; q and k are not
clipped (their error reaches the output through the softmax, not linearly), nor are weights GPTQ will quantise
(GPTQ compensates rounding errors against the unclipped weights itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT

from . import quants

ALPHAS = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))
SEARCH_ROWS = 128  # rows per tensor used to score a candidate (a fixed random subset; the error is a sum over rows)
CLIP_RATIOS = tuple(np.round(1.0 - np.arange(10) / 20, 2))  # llm-awq auto_clip: max shrink 0.5, grid of 20


@dataclass
class ScaleChoice:
    scale: np.ndarray       # per scale parameter (input channel, or kv channel for v -> output)
    alpha: float
    errors: dict[float, float]  # alpha -> output error on the search rows


def fake_quantize(w: np.ndarray, qtype: QT, importance: np.ndarray) -> np.ndarray:
    """w (rows, cols) rounded onto `qtype`'s grid by ggml's own (imatrix) scale choice: the fast stand-in for the
    full encoder inside the search. Float types come back as they are stored."""
    qtype = QT(qtype)
    if qtype not in quants.SPECS:
        return quants.dequantize(quants.quantize(w, qtype), qtype).reshape(w.shape)
    spec = quants.SPECS[qtype]
    rows, cols = w.shape
    blocks = np.ascontiguousarray(w, np.float32).reshape(-1, spec.block_size)
    imp = np.ascontiguousarray(np.broadcast_to(importance.astype(np.float32), w.shape)).reshape(blocks.shape)
    if spec.block_size == quants.QK_K:
        scales = quants.ggml_reference_scales_k(blocks, qtype, imp)
    else:
        sigma2 = np.repeat((w.astype(np.float64) ** 2).mean(axis=1).astype(np.float32), cols // spec.block_size)
        scales = quants.ggml_reference_scales_legacy(blocks, qtype, imp, sigma2)
    q = quants.round_to_grid(blocks, scales)
    return quants.dequantize_codes(q, scales).reshape(rows, cols)


def layer_output_error(w: np.ndarray, wq: np.ndarray, H: np.ndarray) -> float:
    """sum_rows (w - wq) H (w - wq)^T; float32 products (H float32 for speed), summed in float64."""
    d = np.asarray(w, np.float32) - np.asarray(wq, np.float32)
    return float(np.einsum("ij,ij->", d @ np.asarray(H, np.float32), d, dtype=np.float64))


def group_output_errors(w: np.ndarray, wq: np.ndarray, H_blocks: np.ndarray) -> np.ndarray:
    """(rows, n_groups) output error of each group of `group` consecutive columns on its own: d_g H_gg d_g^T, with
    H_blocks (n_groups, group, group) the diagonal blocks of H (what llm-awq's auto_clip scores per group)."""
    n_groups, g = H_blocks.shape[:2]
    d = (np.asarray(w, np.float32) - np.asarray(wq, np.float32)).reshape(w.shape[0], n_groups, g)
    return np.einsum("rgi,gij,rgj->rg", d, H_blocks, d, optimize=True)


def diagonal_blocks(H: np.ndarray, group: int) -> np.ndarray:
    n = H.shape[0] // group
    idx = np.arange(n)
    return np.ascontiguousarray(H.reshape(n, group, n, group)[idx, :, idx, :], np.float32)


def search_clip(w: np.ndarray, qtype: QT, H: np.ndarray, ratios=CLIP_RATIOS) -> tuple[np.ndarray, np.ndarray]:
    """llm-awq's auto_clip on ggml grids: for every row and quantisation group (the values sharing one scale),
    the max-abs clip ratio from `ratios` whose group output error (`group_output_errors`) after rounding with
    ggml's scale choice is lowest, measured against the UNCLIPPED weights.

    Returns (clipped w, chosen ratio per (row, group)). Kept only if it lowers the whole layer's output error
    under H (cross-group terms included); otherwise w comes back unchanged with all ratios 1."""
    qtype = QT(qtype)
    spec = quants.SPECS[qtype]
    rows, cols = w.shape
    g = spec.group_size
    w = np.ascontiguousarray(w, np.float32)
    importance = np.clip(np.diag(H), 0, None).astype(np.float32)
    blocks = diagonal_blocks(H, g)
    amax = np.abs(w.reshape(rows, -1, g)).max(axis=2, keepdims=True)
    best_err = np.full((rows, cols // g), np.inf)
    best_ratio = np.ones((rows, cols // g), np.float32)
    for r in ratios:
        lim = np.float32(r) * amax
        wc = np.clip(w.reshape(rows, -1, g), -lim, lim).reshape(rows, cols)
        err = group_output_errors(w, fake_quantize(wc, qtype, importance), blocks)
        better = err < best_err
        best_err[better] = err[better]
        best_ratio[better] = r
    lim = best_ratio[:, :, None] * amax
    clipped = np.clip(w.reshape(rows, -1, g), -lim, lim).reshape(rows, cols)
    if layer_output_error(w, fake_quantize(clipped, qtype, importance), H) >= \
            layer_output_error(w, fake_quantize(w, qtype, importance), H):
        return w, np.ones_like(best_ratio)
    return clipped, best_ratio


def search_scale(weights: list[np.ndarray], qtypes: list[QT], H: np.ndarray, mean_abs: np.ndarray,
                 expand: np.ndarray | None = None, alphas=ALPHAS, search_rows: int = SEARCH_ROWS,
                 seed: int = 0) -> ScaleChoice:
    """The AWQ scale for a group of linears sharing one input (weights (rows_k, cols) each, H (cols, cols)).

    mean_abs: mean |x| per scale parameter. expand: maps each input column to its scale parameter (for v -> output
    under GQA); None when they are the same."""
    rng = np.random.default_rng(seed)
    subsets = []
    for w in weights:
        rows = np.sort(rng.choice(w.shape[0], min(search_rows, w.shape[0]), replace=False))
        subsets.append(np.ascontiguousarray(w[rows], np.float32))
    diag = np.clip(np.diag(H), 0, None)
    H = np.asarray(H, np.float32)
    x = np.maximum(np.asarray(mean_abs, np.float64), 1e-8)
    errors: dict[float, float] = {}
    best = (np.inf, 0.0, np.ones_like(x))
    for alpha in alphas:
        s = x ** alpha
        s = s / np.sqrt(s.max() * s.min())
        s_cols = (s if expand is None else s[expand]).astype(np.float32)
        err = 0.0
        for w, qt in zip(subsets, qtypes):
            wq = fake_quantize(w * s_cols, qt, (diag / s_cols.astype(np.float64) ** 2).astype(np.float32))
            err += layer_output_error(w, wq / s_cols, H)
        errors[float(alpha)] = err
        if err < best[0]:
            best = (err, float(alpha), s)
    return ScaleChoice(best[2].astype(np.float32), best[1], errors)


def gqa_expand(n_heads: int, n_kv_heads: int, head_dim: int) -> np.ndarray:
    """Column c = h*head_dim + j of attn_output reads kv channel (h // G)*head_dim + j of attn_v."""
    G = n_heads // n_kv_heads
    h = np.arange(n_heads)[:, None]
    j = np.arange(head_dim)[None, :]
    return ((h // G) * head_dim + j).reshape(-1)


def per_parameter_mean(values: np.ndarray, expand: np.ndarray, n_params: int) -> np.ndarray:
    """Mean of per-column values over the columns sharing each scale parameter."""
    total = np.bincount(expand, weights=values, minlength=n_params)
    count = np.bincount(expand, minlength=n_params)
    return total / np.maximum(count, 1)
