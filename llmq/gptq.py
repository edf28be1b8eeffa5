"""GPTQ (Frantar et al. 2022) onto ggml's block grids.

For one linear layer y = x W^T with calibration inputs X (n, cols), the layer output error of a quantised W' is

    sum_rows (W - W') H (W - W')^T,   H = X^T X / n

GPTQ quantises W one column at a time and spreads each column's rounding error over the not yet quantised columns
through the inverse Hessian (the optimal update for a quadratic objective), using the upper Cholesky factor U of
H^-1 (H^-1 = U^T U): for column i,

    err = (w_i - q(w_i)) / U[i, i];   W[:, j>i] -= err * U[i, j>i]

Updates are applied lazily: within a batch of columns only the batch is updated, the rest of W once per batch.

ggml stores per-block scales (32 values for legacy types, 256-value super-blocks with 16/32-value sub-block scales
for K-quants) in the natural column order. Two ways to combine that with GPTQ:

- natural order (default): when the first column of a ggml block is reached, the block's scales are chosen on the
  current, error-compensated values (importance-weighted by diag(H)), then its columns are rounded on that grid;
- act order: the grids of all blocks are chosen up front from the original weights, then the columns are quantised
  in order of decreasing diag(H) (the most important first) on those fixed grids.

Measured on a synthetic 256 x 512 layer with correlated inputs (output error, lower is better; imatrix RTN in
brackets): Q4_0 0.18 natural vs 0.21 act order (0.71), Q4_K 0.17 vs 0.18 (0.50), Q3_K 0.69 vs 0.77 (2.27),
Q2_K 2.9 vs 3.4 (7.2): natural order with re-chosen scales wins on ggml grids, because the scales then see the
compensated values; it is the default (act order: `act_order=True`, CLI `--act-order`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import logging
import os

import numpy as np
from gguf import GGMLQuantizationType as QT
from numba import njit

from .errors import LlmqError
from .quants import SPECS, BlockScales, choose_scales, grid_values, pack_blocks, round_values

log = logging.getLogger("llmq.gptq")

DAMP = 0.01        # fraction of mean(diag H) added to the diagonal
LAZY_BATCH = 128   # columns per lazy update (rounded up to whole ggml blocks)


@contextlib.contextmanager
def _serial_lapack():
    """Run numpy's OpenBLAS LAPACK single-threaded: its threaded Cholesky of a few-hundred-wide matrix is ~100x
    slower than the serial one when the cores are busy (measured: 2.8 s vs 0.025 s for 576 x 576)."""
    lib = _openblas()
    if lib is None:
        yield
        return
    before = lib.scipy_openblas_get_num_threads64_()
    lib.scipy_openblas_set_num_threads64_(1)
    try:
        yield
    finally:
        lib.scipy_openblas_set_num_threads64_(before)


@functools.cache
def _openblas():
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "libscipy_openblas64_*.so"))
    try:
        lib = ctypes.CDLL(libs[0]) if libs else None
        if lib is not None:
            lib.scipy_openblas_get_num_threads64_()
        return lib
    except (OSError, AttributeError):
        return None


def inverse_hessian_factor(H: np.ndarray, damp: float = DAMP) -> tuple[np.ndarray, float]:
    """Upper Cholesky factor U of (H + damp*mean(diag H)*I)^-1, raising damp x10 until the factorisations succeed.
    Returns (U, damp used)."""
    with _serial_lapack():
        return _inverse_hessian_factor(H, damp)


def _inverse_hessian_factor(H: np.ndarray, damp: float) -> tuple[np.ndarray, float]:
    H = np.array(H, np.float64, copy=True)
    diag = np.diag(H).copy()
    dead = diag <= 0
    H[dead, dead] = 1.0  # columns never activated: their error costs nothing and must not propagate
    mean_diag = float(np.mean(np.diag(H)))
    while damp <= 1e3:
        Hd = H + damp * mean_diag * np.eye(H.shape[0])
        try:
            L = np.linalg.cholesky(Hd)
            Linv = np.linalg.inv(L)
            U = np.linalg.cholesky(Linv.T @ Linv).T
            if np.isfinite(U).all():
                return U, damp
        except np.linalg.LinAlgError:
            pass
        log.info("Cholesky failed at damp %.3g; retrying with more damping", damp)
        damp *= 10
    raise LlmqError("GPTQ: the calibration Hessian is not positive definite even with heavy damping")


@njit(cache=True)
def _quantize_batch(W1, U1, step, offset, qmin, qmax, codes, Q1, Err1):
    """Columns of one lazy batch in order: round column i on its grid (step/offset per row and column), record
    the scaled error, push it onto the batch's later columns. Writes codes, Q1 (grid values) and Err1."""
    rows, count = W1.shape
    for i in range(count):
        d = U1[i, i]
        for r in range(rows):
            w = W1[r, i]
            st = step[r, i]
            off = offset[r, i]
            if st == 0:
                t = np.float32(0.0)
            else:
                t = np.rint((w - off) / st)
            if t < qmin:
                t = np.float32(qmin)
            elif t > qmax:
                t = np.float32(qmax)
            q = st * t + off
            codes[r, i] = np.int32(t)
            Q1[r, i] = q
            e = (w - q) / d
            Err1[r, i] = e
            for j in range(i + 1, count):
                W1[r, j] -= e * U1[i, j]


def quantize_batch_numpy(W1, U1, step, offset, qmin, qmax):
    """The plain numpy version of `_quantize_batch` (reference for tests): returns (codes, Q1, Err1)."""
    W1 = W1.copy()
    rows, count = W1.shape
    codes = np.zeros((rows, count), np.int32)
    Q1 = np.zeros((rows, count), np.float32)
    Err1 = np.zeros((rows, count), np.float32)
    for i in range(count):
        t = round_values(W1[:, i], step[:, i], offset[:, i], qmin, qmax)
        q = grid_values(t, step[:, i], offset[:, i])
        codes[:, i], Q1[:, i] = t, q
        err = (W1[:, i] - q) / U1[i, i]
        Err1[:, i] = err
        W1[:, i + 1:] -= np.outer(err, U1[i, i + 1:]).astype(np.float32)
    return codes, Q1, Err1


def _block_importance(importance: np.ndarray, rows: int, c0: int, c1: int) -> np.ndarray:
    return np.ascontiguousarray(np.broadcast_to(importance[c0:c1], (rows, c1 - c0)), np.float32)


def _scales_of(W: np.ndarray, c0: int, qtype: QT, importance: np.ndarray, sigma2: np.ndarray) -> BlockScales:
    """Scales of the ggml blocks of columns [c0, c0 + block) of every row."""
    bs = SPECS[qtype].block_size
    blocks = np.ascontiguousarray(W[:, c0:c0 + bs], np.float32)
    return choose_scales(blocks, qtype, _block_importance(importance, W.shape[0], c0, c0 + bs), sigma2)


def _expand_grid(scales: BlockScales, qtype: QT) -> tuple[np.ndarray, np.ndarray]:
    """(step, offset) per row and column of a block's columns: (rows, block_size) each."""
    spec = SPECS[qtype]
    step, offset = scales.grid()
    return np.repeat(step, spec.group_size, axis=1), np.repeat(offset, spec.group_size, axis=1)


def _concat_scales(parts: list[BlockScales], qtype: QT, rows: int) -> BlockScales:
    """Per-column-block scales (each over all rows) -> scales of all blocks in row-major block order."""
    def stack(field):
        vals = [getattr(p, field) for p in parts]
        if vals[0] is None:
            return None
        return np.stack(vals, axis=1).reshape(rows * len(parts), *vals[0].shape[1:])
    return BlockScales(qtype, stack("d"), stack("dmin"), stack("sc"), stack("m"))


def gptq_quantize(W: np.ndarray, H: np.ndarray, qtype: QT, *, act_order: bool = False, damp: float = DAMP,
                  lazy_batch: int = LAZY_BATCH, factor: tuple[np.ndarray, float] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Quantise W (rows, cols) to `qtype` minimising the output error under H = X^T X / n (cols, cols).

    factor: `inverse_hessian_factor(H, damp)` when already computed (linears sharing an input share it; natural
    order only). Returns (ggml bytes (rows, row_bytes) uint8, dequantised W' float32)."""
    qtype = QT(qtype)
    if qtype not in SPECS:
        raise LlmqError(f"GPTQ cannot target {qtype.name}")
    spec = SPECS[qtype]
    W = np.array(W, np.float32, copy=True)
    rows, cols = W.shape
    bs = spec.block_size
    if cols % bs:
        raise LlmqError(f"GPTQ: row length {cols} is not a multiple of {qtype.name}'s block size {bs}")
    importance = np.clip(np.diag(H), 0, None).astype(np.float32)
    # ggml's imatrix path weighs by sqrt(sigma2 + x^2) with sigma2 = mean x^2 of the (original) row
    sigma2 = (W.astype(np.float64) ** 2).mean(axis=1).astype(np.float32)
    n_blocks = cols // bs
    codes = np.zeros((rows, cols), np.int32)
    Q = np.zeros((rows, cols), np.float32)
    if act_order:
        parts = [_scales_of(W, b * bs, qtype, importance, sigma2) for b in range(n_blocks)]
        grids = [_expand_grid(p, qtype) for p in parts]
        step_all = np.concatenate([g[0] for g in grids], axis=1)
        offset_all = np.concatenate([g[1] for g in grids], axis=1)
        perm = np.argsort(-importance, kind="stable")
        U = inverse_hessian_factor(H[np.ix_(perm, perm)], damp)[0].astype(np.float32)
        Wp = np.ascontiguousarray(W[:, perm])
        step_p, offset_p = np.ascontiguousarray(step_all[:, perm]), np.ascontiguousarray(offset_all[:, perm])
        codes_p = np.zeros_like(codes)
        Q_p = np.zeros_like(Q)
        for i1 in range(0, cols, lazy_batch):
            i2 = min(i1 + lazy_batch, cols)
            W1 = np.ascontiguousarray(Wp[:, i1:i2])
            Err1 = np.zeros_like(W1)
            c1, q1 = codes_p[:, i1:i2].copy(), Q_p[:, i1:i2].copy()
            _quantize_batch(W1, np.ascontiguousarray(U[i1:i2, i1:i2]), np.ascontiguousarray(step_p[:, i1:i2]),
                            np.ascontiguousarray(offset_p[:, i1:i2]), spec.qmin, spec.qmax, c1, q1, Err1)
            codes_p[:, i1:i2], Q_p[:, i1:i2] = c1, q1
            Wp[:, i2:] -= Err1 @ U[i1:i2, i2:]
        codes[:, perm], Q[:, perm] = codes_p, Q_p
    else:
        U, used = factor if factor is not None else inverse_hessian_factor(H, damp)
        U = U.astype(np.float32)
        if used != damp:
            log.info("GPTQ used damp %.3g", used)
        batch = max(bs, (lazy_batch // bs) * bs)
        parts = []
        for i1 in range(0, cols, batch):
            i2 = min(i1 + batch, cols)
            W1 = np.ascontiguousarray(W[:, i1:i2])
            Err1 = np.zeros_like(W1)
            for b0 in range(i1, i2, bs):  # each ggml block: scales on the compensated values, then its columns
                s = _scales_of(W1, b0 - i1, qtype, importance[i1:], sigma2)
                parts.append(s)
                step, offset = _expand_grid(s, qtype)
                sub = slice(b0 - i1, b0 - i1 + bs)
                Wb = np.ascontiguousarray(W1[:, sub])
                Eb = np.zeros_like(Wb)
                cb = np.zeros((rows, bs), np.int32)
                qb = np.zeros((rows, bs), np.float32)
                Ub = np.ascontiguousarray(U[b0:b0 + bs, b0:b0 + bs])
                _quantize_batch(Wb, Ub, step, offset, spec.qmin, spec.qmax, cb, qb, Eb)
                codes[:, b0:b0 + bs], Q[:, b0:b0 + bs], Err1[:, sub] = cb, qb, Eb
                W1[:, sub] = Wb
                W1[:, sub.stop:] -= Eb @ U[b0:b0 + bs, b0 + bs:i2]  # the rest of this lazy batch
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    scales = _concat_scales(parts, qtype, rows)
    data = pack_blocks(scales, codes.reshape(rows * n_blocks, bs)).reshape(rows, -1)
    return data, Q


def output_error(W: np.ndarray, Wq: np.ndarray, H: np.ndarray) -> float:
    """sum over rows of (W - Wq) H (W - Wq)^T: the mean squared layer-output error times rows."""
    D = (np.asarray(W, np.float64) - np.asarray(Wq, np.float64))
    return float(np.einsum("ij,jk,ik->", D, H, D))
