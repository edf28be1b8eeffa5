"""FP4 block types with double scaling: NVFP4 (with llama.cpp's per-tensor FP32 scale) and MXFP4.

Both store 4-bit E2M1 values (sign + {0, 0.5, 1, 1.5, 2, 3, 4, 6}); ggml keeps them doubled as the integers
KVALUES and halves the group scale instead. Layouts (ggml-common.h):

    MXFP4  17 B per 32 values: e (E8M0) | qs[16]         x[j] = KV[qs[j] & 15] * d, x[j+16] = KV[qs[j] >> 4] * d,
                                                         d = 2^(e - 128)  (ggml_e8m0_to_fp32_half)
    NVFP4  36 B per 64 values: d[4] (UE4M3, one per 16) | qs[32]; sub-block s holds bytes qs[8s..8s+7] laid out
                                                         like a 16-value MXFP4 block, d = UE4M3(d[s]) / 2
    plus, for NVFP4 in llama.cpp, an optional F32 tensor `<name>.scale` (shape {1}) multiplied into the matmul
    output: weight = scale * block value.

Why a tensor scale: UE4M3 has 3 mantissa bits and a smallest normal of 2^-6. ggml's own encoder
(quantize_row_nvfp4_ref) stores amax/6 per 16 values with no tensor scale, so for typical LLM weights
(|w| ~ 0.01..0.1) the micro-scales land in the subnormal range with 1-3 significant bits. Dividing the tensor by
s = amax(tensor) / (6 * 448) moves the largest micro-scale to the top of the E4M3 range and all the others into its
normal range, where every step is 1/8 of a binade.

How a tensor is encoded (`quantize`):
1. tensor scale s: candidates s0 * 2^(j/16) (the 3-bit mantissa grid is the same in every binade, so only the
   alignment inside one binade matters) and 1 (no tensor scale), each scored by the total (importance-weighted)
   squared error of steps 2-3; the best wins, so the result is never worse than having no tensor scale.
2. each micro-scale: candidates around the reference choice (amax/6, ggml's rule, always included) and around the
   weighted least-squares scale of the codes it gives, scored by the weighted squared error after rounding.
3. each value: the nearest E2M1 point on its group's grid (the per-value optimum for a diagonal weighting).

MXFP4 is the same with E8M0 (power-of-two) group scales; its tensor scale shifts the power-of-two grid by a
fraction of a binade, which llama.cpp applies to MXFP4 layer linears as well (its loader reads `.scale` for any
weight type; only output.scale is limited to NVFP4 weights).

GPTQ (`gptq_quantize`) uses the same pieces: the tensor scale is chosen on the original weights, the group scales
block by block on the error-compensated values, and every column is rounded on those fixed grids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from numba import njit, prange

from .errors import LlmqError

# E2M1 values doubled, by 4-bit code (bit 3 = sign): ggml's kvalues_fp4
KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)
FP4_TYPES = frozenset({QT.NVFP4, QT.MXFP4})
E2M1_MAX = 6.0
UE4M3_MAX = 448.0
UE4M3_MAX_CODE = 0x7E  # 0x7F is NaN in E4M3FN (ggml decodes it as 0)


@dataclass(frozen=True)
class Fp4Layout:
    block_size: int   # values per ggml block
    group_size: int   # values per scale
    scale_bytes: int  # scale bytes at the start of a block (one per group)


LAYOUTS = {QT.NVFP4: Fp4Layout(64, 16, 4), QT.MXFP4: Fp4Layout(32, 32, 1)}
for _t, _l in LAYOUTS.items():
    assert GGML_QUANT_SIZES[_t] == (_l.block_size, _l.scale_bytes + _l.block_size // 2)


# ----------------------------------------------------------------------------------------------------------------
# Scale codecs


def _ue4m3_half_table() -> np.ndarray:
    """ggml_ue4m3_to_fp32 for every byte: the E4M3 value (bias 7, no sign) times 0.5; 0 and 0x7F decode to 0."""
    x = np.arange(256)
    exp = (x >> 3) & 0xF
    man = (x & 7).astype(np.float64)
    raw = np.where(exp == 0, man * 2.0 ** -9, (1 + man / 8) * 2.0 ** (exp - 7))
    return np.where((x == 0) | (x == 0x7F), 0.0, raw * 0.5).astype(np.float32)


def _e8m0_half_table() -> np.ndarray:
    """ggml_e8m0_to_fp32_half for every byte: 2^(e - 128) (subnormal float32 bit patterns for e < 2)."""
    e = np.arange(256, dtype=np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << np.uint32(23)).astype(np.uint32)
    return bits.view(np.float32)


UE4M3_HALF = _ue4m3_half_table()
E8M0_HALF = _e8m0_half_table()


def float_to_ue4m3(x: np.ndarray) -> np.ndarray:
    """ggml_fp32_to_ue4m3: float32 -> UE4M3 byte (round half up on the 4th mantissa bit, saturating at 448 = 0x7E,
    subnormals as round(x * 512) with 0 below 2^-10); x <= 0 or NaN -> 0."""
    x = np.asarray(x, np.float32)
    pos = x > 0
    xc = np.where(pos, np.minimum(x, np.float32(UE4M3_MAX)), np.float32(1)).astype(np.float32)
    bits = xc.view(np.uint32).astype(np.int64)
    exp = ((bits >> 23) & 0xFF) - 127 + 7
    man = ((bits >> 20) & 7) + ((bits >> 19) & 1)  # top 3 mantissa bits + the next one (round half up)
    carry = man > 7
    exp_r, man_r = exp + carry, np.where(carry, 0, man)
    normal = np.where(exp_r >= 15, UE4M3_MAX_CODE, (np.clip(exp_r, 0, 15) << 3) | man_r)
    sub = np.clip((xc * np.float32(512) + np.float32(0.5)).astype(np.int64), 0, 7)
    code = np.where(exp <= 0, sub, np.where(exp >= 15, UE4M3_MAX_CODE, normal))
    return np.where(pos, code, 0).astype(np.uint8)


def e8m0_reference(amax: np.ndarray) -> np.ndarray:
    """ggml's MXFP4 block exponent: floor(log2(amax)) - 2 + 127 (0 for an all-zero block)."""
    amax = np.asarray(amax, np.float32)
    with np.errstate(divide="ignore"):
        e = np.where(amax > 0, np.floor(np.log2(amax)) - 2 + 127, 0)
    return e.astype(np.uint8)


def scale_table(qtype: QT) -> np.ndarray:
    """Group step d (float32) by stored scale byte: value = KVALUES[code] * d."""
    return UE4M3_HALF if QT(qtype) == QT.NVFP4 else E8M0_HALF


# ----------------------------------------------------------------------------------------------------------------
# Packing: the one place that knows the byte layouts


def pack_blocks(qtype: QT, scale_codes: np.ndarray, nibbles: np.ndarray) -> np.ndarray:
    """Bytes (n_blocks, type_size) from scale bytes (n_blocks, groups) and 4-bit codes (n_blocks, block_size)."""
    lay = LAYOUTS[QT(qtype)]
    n = nibbles.shape[0]
    g = nibbles.reshape(n, -1, lay.group_size).astype(np.uint8)
    half = lay.group_size // 2
    qs = (g[:, :, :half] & 0xF) | ((g[:, :, half:] & 0xF) << 4)
    return np.concatenate([scale_codes.reshape(n, -1).astype(np.uint8), qs.reshape(n, -1)], axis=1)


def unpack_blocks(qtype: QT, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scale bytes (n_blocks, groups), 4-bit codes (n_blocks, block_size)) of ggml bytes."""
    lay = LAYOUTS[QT(qtype)]
    blocks = np.asarray(data, np.uint8).reshape(-1, lay.scale_bytes + lay.block_size // 2)
    n = blocks.shape[0]
    qs = blocks[:, lay.scale_bytes:].reshape(n, -1, lay.group_size // 2)
    nib = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(n, lay.block_size)
    return blocks[:, :lay.scale_bytes].copy(), nib


def dequantize(data: np.ndarray, qtype: QT, tensor_scale: float = 1.0) -> np.ndarray:
    """float32 values (rows, cols) of ggml-encoded rows (rows, row_bytes), times the tensor scale as llama.cpp
    applies it (in float32, after the block values)."""
    qtype = QT(qtype)
    lay = LAYOUTS[qtype]
    data = np.asarray(data, np.uint8)
    rows = data.shape[0] if data.ndim == 2 else 1
    codes, nib = unpack_blocks(qtype, data)
    d = scale_table(qtype)[codes]
    v = KVALUES[nib].astype(np.float32).reshape(nib.shape[0], -1, lay.group_size) * d[:, :, None]
    v = v.reshape(rows, -1)
    return v if tensor_scale == 1.0 else (v * np.float32(tensor_scale)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# ggml's reference encoders (quantize_row_nvfp4_ref / quantize_row_mxfp4_ref), ported bit for bit


@njit(cache=True)
def _best_index_ggml(x, d, kv):
    """best_index_mxfp4: the first of the 16 codes minimising |KV*d - x| in float32 (ties: the lower code)."""
    best = 0
    best_err = abs(np.float32(kv[0]) * d - x)
    for i in range(1, 16):
        err = abs(np.float32(kv[i]) * d - x)
        if err < best_err:
            best = i
            best_err = err
    return best


@njit(parallel=True, cache=True)
def _round_ggml(groups, d, kv):
    out = np.empty(groups.shape, np.uint8)
    for g in prange(groups.shape[0]):
        for j in range(groups.shape[1]):
            out[g, j] = _best_index_ggml(groups[g, j], d[g], kv)
    return out


def reference_quantize(w: np.ndarray, qtype: QT) -> np.ndarray:
    """ggml's own encoder for NVFP4 (micro-scale UE4M3(amax/6), no tensor scale) or MXFP4: bytes (rows, row_bytes)."""
    qtype = QT(qtype)
    lay = LAYOUTS[qtype]
    w = np.ascontiguousarray(np.atleast_2d(w), np.float32)
    rows = w.shape[0]
    groups = w.reshape(-1, lay.group_size)
    amax = np.abs(groups).max(axis=1)
    if qtype == QT.NVFP4:
        codes = float_to_ue4m3((amax / np.float32(6.0)).astype(np.float32))
    else:
        codes = e8m0_reference(amax)
    nib = _round_ggml(groups, scale_table(qtype)[codes], KVALUES)
    return pack_blocks(qtype, codes.reshape(-1, lay.block_size // lay.group_size),
                       nib.reshape(-1, lay.block_size)).reshape(rows, -1)


# ----------------------------------------------------------------------------------------------------------------
# Our search (numba): per group, in float64, values already divided by the tensor scale


@njit(cache=True)
def _nearest_kv(t):
    """4-bit code of the E2M1 point (doubled units) nearest to t = x / d."""
    a = abs(t)
    if a < 0.5:
        m = 0
    elif a < 1.5:
        m = 1
    elif a < 2.5:
        m = 2
    elif a < 3.5:
        m = 3
    elif a < 5.0:
        m = 4
    elif a < 7.0:
        m = 5
    elif a < 10.0:
        m = 6
    else:
        m = 7
    return m + 8 if (t < 0 and m != 0) else m


@njit(cache=True)
def _group_error(x, w, d, kv):
    """Weighted squared error of x rounded to the nearest point of KV * d (d >= 0)."""
    err = 0.0
    if d == 0:
        for i in range(x.size):
            err += w[i] * x[i] * x[i]
        return err
    for i in range(x.size):
        r = x[i] - kv[_nearest_kv(x[i] / d)] * d
        err += w[i] * r * r
    return err


@njit(cache=True)
def _ls_step(x, w, d, kv):
    """Weighted least-squares step for the codes x rounds to on KV * d (0 if none is nonzero)."""
    sxk = 0.0
    skk = 0.0
    for i in range(x.size):
        k = np.float64(kv[_nearest_kv(x[i] / d)])
        sxk += w[i] * x[i] * k
        skk += w[i] * k * k
    return sxk / skk if skk > 0 else 0.0


@njit(cache=True)
def _ue4m3_code(v):
    """ggml_fp32_to_ue4m3 of one float (float64 argument rounded to float32 first)."""
    x = np.float32(v)
    if not x > 0:
        return 0
    if x > 448.0:
        x = np.float32(448.0)
    m, e = math.frexp(np.float64(x))  # x = m * 2^e, m in [0.5, 1)
    exp = e - 1 + 7
    if exp <= 0:
        man = int(np.float32(x * np.float32(512.0) + np.float32(0.5)))
        return min(man, 7) if man >= 1 else 0
    if exp >= 15:
        return UE4M3_MAX_CODE
    frac = (2.0 * m - 1.0) * 16.0  # 4 mantissa bits: the top 3 plus the rounding bit
    man4 = int(frac)
    man = (man4 >> 1) + (man4 & 1)
    if man > 7:
        man = 0
        exp += 1
        if exp >= 15:
            return UE4M3_MAX_CODE
    return (exp << 3) | man


@njit(cache=True)
def _e8m0_code(d):
    """Nearest (in log) E8M0 byte for a group step d > 0: d = 2^(e - 128)."""
    e = int(np.rint(math.log2(d))) + 128
    return min(max(e, 0), 254)


@njit(cache=True)
def _search_group(x, w, table, nvfp4, ref_code, kv, radius):
    """Best scale byte for one group (x already divided by the tensor scale). Returns (code, error)."""
    max_code = UE4M3_MAX_CODE if nvfp4 else 254
    best_code = ref_code
    best_err = _group_error(x, w, np.float64(table[ref_code]), kv)
    err0 = _group_error(x, w, 0.0, kv)  # storing zeros
    if nvfp4 and err0 < best_err:
        best_code, best_err = 0, err0
    centers = np.empty(2, np.int64)
    centers[0] = ref_code
    centers[1] = -1
    d_ref = np.float64(table[ref_code])
    if d_ref > 0:
        d_ls = _ls_step(x, w, d_ref, kv)
        if d_ls > 0:
            centers[1] = _ue4m3_code(2.0 * d_ls) if nvfp4 else _e8m0_code(d_ls)
    for c in range(2):
        if centers[c] < 0:
            continue
        for k in range(-radius, radius + 1):
            code = centers[c] + k
            if code < 1 or code > max_code:
                continue
            e = _group_error(x, w, np.float64(table[code]), kv)
            if e < best_err:
                best_code, best_err = code, e
    # one least-squares refit of the winner
    d_best = np.float64(table[best_code])
    if d_best > 0:
        d_ls = _ls_step(x, w, d_best, kv)
        if d_ls > 0:
            code = _ue4m3_code(2.0 * d_ls) if nvfp4 else _e8m0_code(d_ls)
            if code >= 1:
                e = _group_error(x, w, np.float64(table[code]), kv)
                if e < best_err:
                    best_code, best_err = code, e
    return best_code, best_err


@njit(parallel=True, cache=True)
def _search_kernel(groups, weights, inv_scale, table, nvfp4, kv, radius):
    """Scale bytes (n,), nibbles (n, G) and weighted errors (n,) (in units of the scaled values) of every group."""
    n, G = groups.shape
    codes = np.empty(n, np.uint8)
    nib = np.empty((n, G), np.uint8)
    errs = np.empty(n, np.float64)
    for g in prange(n):
        x = np.empty(G, np.float64)
        amax = 0.0
        for j in range(G):
            x[j] = np.float64(groups[g, j]) * inv_scale
            amax = max(amax, abs(x[j]))
        if nvfp4:
            ref = _ue4m3_code(amax / 6.0)
        elif amax > 0:
            ref = min(max(int(math.floor(math.log2(np.float32(amax)))) - 2 + 127, 0), 254)
        else:
            ref = 0
        code, err = _search_group(x, weights[g], table, nvfp4, ref, kv, radius)
        codes[g] = code
        errs[g] = err
        d = np.float64(table[code])
        for j in range(G):
            nib[g, j] = _nearest_kv(x[j] / d) if d > 0 else 0
    return codes, nib, errs


SEARCH_RADIUS = {QT.NVFP4: 2, QT.MXFP4: 1}


def encode_groups(groups: np.ndarray, weights: np.ndarray, qtype: QT, tensor_scale: float = 1.0):
    """Searched scale bytes (n,), nibbles (n, G) and total weighted squared error (in the original units) of
    groups (n, G) of `qtype`'s group size encoded as groups / tensor_scale."""
    qtype = QT(qtype)
    s = np.float64(np.float32(tensor_scale))
    codes, nib, errs = _search_kernel(np.ascontiguousarray(groups, np.float32),
                                      np.ascontiguousarray(weights, np.float64), 1.0 / s, scale_table(qtype),
                                      qtype == QT.NVFP4, KVALUES, SEARCH_RADIUS[qtype])
    return codes, nib, float(errs.sum()) * s * s


# ----------------------------------------------------------------------------------------------------------------
# Importance and the tensor scale


def selection_weights(importance: np.ndarray | None, rows: int, cols: int, group_size: int) -> np.ndarray:
    """Per-value error weights (rows * cols / group_size, group_size) float64: the importance of each value's
    column (llama.cpp's imatrix), or 1. A group whose importance is all zero gets a vanishing uniform weight so it is
    still encoded well (otherwise every candidate would tie)."""
    if importance is None:
        return np.ones((rows * cols // group_size, group_size), np.float64)
    imp = np.asarray(importance, np.float64).reshape(-1)
    per_col = imp.reshape(-1, group_size)
    dead = per_col.sum(axis=1) == 0
    if dead.any():
        fill = imp.mean() * 1e-9 if imp.mean() > 0 else 1.0
        per_col = per_col.copy()
        per_col[dead] = fill
    return np.ascontiguousarray(np.broadcast_to(per_col[None], (rows,) + per_col.shape).reshape(-1, group_size))


def tensor_scale_candidates(w: np.ndarray, qtype: QT) -> list[float]:
    """1 (no tensor scale) first, then float32 scales spanning one binade from the one that puts the largest
    micro-scale at the top of the scale format's range (NVFP4: amax / (6 * 448))."""
    amax = float(np.abs(w).max(initial=0.0))
    out = [1.0]
    if amax == 0 or not math.isfinite(amax):
        return out
    if QT(qtype) == QT.NVFP4:
        s0 = amax / (E2M1_MAX * UE4M3_MAX)
        steps = range(-2, 16)  # a little below s0 too: clipping the one largest group can pay
    else:
        s0 = 1.0
        steps = range(1, 8)
    for j in steps:
        s = float(np.float32(s0 * 2.0 ** (j / (16 if QT(qtype) == QT.NVFP4 else 8))))
        if s > 0 and math.isfinite(s) and s not in out:
            out.append(s)
    return out


SEARCH_VALUES = 1 << 16  # values (whole rows, evenly spaced) the tensor-scale candidates are scored on


def search_rows(rows: int, cols: int, max_values: int = SEARCH_VALUES) -> np.ndarray:
    """Evenly spaced row indices holding at most max_values values (at least one row)."""
    k = max(1, min(rows, max_values // max(cols, 1)))
    return np.unique(np.linspace(0, rows - 1, k).round().astype(np.int64))


def choose_tensor_scale(w: np.ndarray, qtype: QT, importance: np.ndarray | None = None,
                        candidates: list[float] | None = None,
                        max_values: int = SEARCH_VALUES) -> tuple[float, dict[float, float]]:
    """(best tensor scale, candidate -> total weighted squared error on the scored rows) for w (rows, cols).
    The candidates come from the whole tensor; they are scored on `search_rows` (the whole tensor when small)."""
    qtype = QT(qtype)
    lay = LAYOUTS[qtype]
    w = np.ascontiguousarray(np.atleast_2d(w), np.float32)
    candidates = candidates or tensor_scale_candidates(w, qtype)
    part = np.ascontiguousarray(w[search_rows(*w.shape, max_values)])
    groups = part.reshape(-1, lay.group_size)
    weights = selection_weights(importance, part.shape[0], part.shape[1], lay.group_size)
    errors = {}
    for s in candidates:
        errors[s] = encode_groups(groups, weights, qtype, s)[2]
    best = min(errors, key=lambda s: (errors[s], s != 1.0))
    return best, errors


@dataclass
class Fp4Tensor:
    data: np.ndarray      # ggml bytes (rows, row_bytes)
    tensor_scale: float   # multiply the block values by this (1.0: none)
    error: float          # total weighted squared error


def quantize(w: np.ndarray, qtype: QT, importance: np.ndarray | None = None,
             tensor_scale: float | str = "search") -> Fp4Tensor:
    """Encode w (rows, cols) to NVFP4/MXFP4 blocks; tensor_scale: 'search', or a fixed value (1.0: none).

    importance: optional per-column weights (cols,) >= 0 (imatrix); the encoder minimises
    sum(importance * (w - tensor_scale * block value)^2)."""
    qtype = QT(qtype)
    if qtype not in FP4_TYPES:
        raise LlmqError(f"{qtype.name} is not an FP4 type")
    lay = LAYOUTS[qtype]
    w = np.ascontiguousarray(np.atleast_2d(w), np.float32)
    rows, cols = w.shape
    if cols % lay.block_size:
        raise LlmqError(f"cannot quantise to {qtype.name}: row length {cols} is not a multiple of the block size "
                        f"{lay.block_size}")
    if not np.isfinite(w).all():
        raise LlmqError(f"cannot quantise to {qtype.name}: the tensor holds non-finite values")
    if importance is not None:
        importance = np.asarray(importance, np.float32).reshape(-1)
        if importance.shape != (cols,):
            raise LlmqError(f"importance has {importance.size} values but the tensor rows have {cols}")
    groups = w.reshape(-1, lay.group_size)
    weights = selection_weights(importance, rows, cols, lay.group_size)
    search = tensor_scale == "search"
    if search:
        tensor_scale = choose_tensor_scale(w, qtype, importance)[0]
    tensor_scale = float(np.float32(tensor_scale))
    if not (tensor_scale > 0 and math.isfinite(tensor_scale)):
        raise LlmqError(f"tensor scale must be a positive finite number, got {tensor_scale}")
    codes, nib, err = encode_groups(groups, weights, qtype, tensor_scale)
    if search and tensor_scale != 1.0 and w.shape[0] > len(search_rows(rows, cols)):
        # scored on a subset of rows: on the whole tensor, keep it only if it beats no tensor scale
        codes1, nib1, err1 = encode_groups(groups, weights, qtype, 1.0)
        if err1 <= err:
            tensor_scale, codes, nib, err = 1.0, codes1, nib1, err1
    data = pack_blocks(qtype, codes.reshape(-1, lay.block_size // lay.group_size), nib.reshape(-1, lay.block_size))
    return Fp4Tensor(data.reshape(rows, -1), tensor_scale, err)


# ----------------------------------------------------------------------------------------------------------------
# GPTQ on the FP4 grids


@njit(cache=True)
def _gptq_block(W1, U1, d, group_size, kv, nib, Q1, Err1):
    """Columns of one block in order: round column i to the nearest KV * d of its group, record the scaled error and
    push it onto the block's later columns. d: (rows, groups) steps in the units of W1 (tensor scale included)."""
    rows, count = W1.shape
    for i in range(count):
        u = U1[i, i]
        g = i // group_size
        for r in range(rows):
            x = W1[r, i]
            dd = d[r, g]
            k = _nearest_kv(np.float64(x) / dd) if dd > 0 else 0
            q = np.float32(kv[k] * dd)
            nib[r, i] = k
            Q1[r, i] = q
            e = (x - q) / u
            Err1[r, i] = e
            for j in range(i + 1, count):
                W1[r, j] -= e * U1[i, j]


def gptq_quantize(W: np.ndarray, H: np.ndarray, qtype: QT, *, damp: float | None = None,
                  tensor_scale: float | str = "search") -> tuple[np.ndarray, np.ndarray, float]:
    """GPTQ of W (rows, cols) onto NVFP4/MXFP4 under H = X^T X / n: returns (ggml bytes, dequantised W' including the
    tensor scale, tensor scale). Natural column order; each block's group scales are searched on the
    error-compensated values, weighted by diag(H)."""
    from . import gptq

    qtype = QT(qtype)
    lay = LAYOUTS[qtype]
    W = np.array(W, np.float32, copy=True)
    rows, cols = W.shape
    bs, G = lay.block_size, lay.group_size
    if cols % bs:
        raise LlmqError(f"GPTQ: row length {cols} is not a multiple of {qtype.name}'s block size {bs}")
    importance = np.clip(np.diag(H), 0, None).astype(np.float32)
    if tensor_scale == "search":
        tensor_scale = choose_tensor_scale(W, qtype, importance)[0]
    s = float(np.float32(tensor_scale))
    U = gptq.inverse_hessian_factor(H, gptq.DAMP if damp is None else damp)[0].astype(np.float32)
    table = scale_table(qtype)
    n_blocks = cols // bs
    codes = np.zeros((rows, n_blocks, bs // G), np.uint8)
    nib = np.zeros((rows, cols), np.uint8)
    Q = np.zeros((rows, cols), np.float32)
    for b0 in range(0, cols, bs):
        b1 = b0 + bs
        Wb = np.ascontiguousarray(W[:, b0:b1])
        weights = selection_weights(importance[b0:b1], rows, bs, G)
        c, _, _ = encode_groups(Wb.reshape(-1, G), weights, qtype, s)
        c = c.reshape(rows, bs // G)
        codes[:, b0 // bs] = c
        d = (table[c].astype(np.float64) * s).astype(np.float32)  # steps in the units of W
        Eb = np.zeros_like(Wb)
        nb = np.zeros((rows, bs), np.uint8)
        qb = np.zeros((rows, bs), np.float32)
        _gptq_block(Wb, np.ascontiguousarray(U[b0:b1, b0:b1]), d, G, KVALUES, nb, qb, Eb)
        nib[:, b0:b1], Q[:, b0:b1] = nb, qb
        W[:, b1:] -= Eb @ U[b0:b1, b1:]
    data = pack_blocks(qtype, codes.reshape(rows * n_blocks, -1), nib.reshape(rows * n_blocks, bs))
    data = data.reshape(rows, -1)
    return data, dequantize(data, qtype, s), s


# ----------------------------------------------------------------------------------------------------------------
# Where llama.cpp applies `<name>.scale`: its loader reads the tensor for every layer linear (any weight type) and
# for output.weight only when that is NVFP4 and not tied to token_embd (llama-model.cpp, "generic pass"); the graph
# multiplies it into the matmul output only where the architecture's builder passes it on (src/models/*.cpp).
# A scale written anywhere else would be ignored silently, so it is written only here.

_SCALED_LINEARS = {
    "llama": ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"),
    "qwen3": ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"),
    "qwen2": ("attn_q", "attn_k", "attn_v", "attn_output"),  # qwen2.cpp passes NULL for the FFN scales
}


def scale_tensor_name(weight_name: str) -> str:
    """GGUF name of the tensor scale of a weight: blk.0.attn_q.weight -> blk.0.attn_q.scale."""
    return weight_name[: -len(".weight")] + ".scale"


def llama_cpp_applies_scale(arch: str, weight_name: str, qtype: QT) -> bool:
    """Whether llama.cpp multiplies `<weight>.scale` (when present) into the output of this weight's matmul, for a
    file of GGUF architecture `arch`: layer linears of any type, output.weight only as NVFP4."""
    if not weight_name.endswith(".weight"):
        return False
    if weight_name == "output.weight":
        return QT(qtype) == QT.NVFP4 and arch in _SCALED_LINEARS
    parts = weight_name.split(".")
    return len(parts) == 4 and parts[0] == "blk" and parts[2] in _SCALED_LINEARS.get(arch, ())


def applies_tensor_scale(arch: str, weight_name: str, qtype: QT) -> bool:
    """Whether the converter writes a searched `<weight>.scale`: an FP4 weight whose scale llama.cpp applies."""
    return QT(qtype) in FP4_TYPES and llama_cpp_applies_scale(arch, weight_name, qtype)


def quantize_linear(weight: np.ndarray, qtype: QT, hessian: np.ndarray, use_gptq: bool, damp: float | None = None,
                    tensor_scale: float | str = "search") -> tuple[np.ndarray, np.ndarray, float]:
    """The calibrated encoders for one linear (llmq.calibrate): importance RTN weighted by diag(H) (llama.cpp's
    imatrix), or GPTQ. Returns (ggml bytes, dequantised weight including the tensor scale, tensor scale)."""
    if use_gptq:
        return gptq_quantize(weight, hessian, qtype, damp=damp, tensor_scale=tensor_scale)
    enc = quantize(weight, qtype, np.clip(np.diag(hessian), 0, None).astype(np.float32), tensor_scale)
    return enc.data, dequantize(enc.data, qtype, enc.tensor_scale), enc.tensor_scale
