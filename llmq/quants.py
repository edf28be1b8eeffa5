"""Bit-exact ggml block encoders with an error-minimising choice of scales.

`quantize(w, qtype, importance)` returns exactly the bytes ggml stores for `w` in `qtype`, so that
`gguf.quants.dequantize` (the oracle; `dequantize` below is a thin wrapper over it) reads them back.

How a block is encoded, for every type:

1. choose the block's scales (`choose_scales`): a search over candidate scales that ALWAYS contains the choice of
   the reference encoder (gguf-py / ggml's `quantize_row_*_ref`, or ggml's imatrix path `quantize_row_*_impl`
   when an importance vector is given, ported below bit for bit) and keeps the candidate whose
   (importance-weighted) squared error is lowest, measured after the scales are rounded to what the block stores
   (fp16 scales, 4/6/8-bit sub-block scales). So no block is ever worse than the reference's.
2. round every value to the nearest point of the grid those stored scales define (`round_to_grid`); for fixed
   scales this is the per-value optimum, and it is ggml's "re-quantise given the final scales" step.
3. pack scales and codes into ggml's byte layout (`pack_blocks`, the one place that knows the layouts).

Every grid is affine per group of values: value = step * q + offset with integer q in [qmin, qmax], where
(step, offset) is what the dequantizer computes from the stored fields (`BlockScales.grid`). GPTQ-style
column-by-column quantisation can therefore call `choose_scales` once per block (on the current, error-compensated
values) and `round_values` per column.

Hot loops are numba kernels; `choose_scales_legacy_numpy` is the plain numpy version of the legacy-type search,
kept next to the kernels and tested against them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT
import gguf.quants
from numba import njit, prange

from llmq.errors import LlmqError

QK_K = 256  # values per K-quant super-block

SUPPORTED = frozenset({QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1,
                       QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.NVFP4, QT.MXFP4})


@dataclass(frozen=True)
class GridSpec:
    """The value grid of one quantisation type (the byte layout itself lives in `pack_blocks`)."""
    block_size: int   # values per block (super-block for K-quants)
    group_size: int   # values sharing one (step, offset)
    qmin: int         # code range of one value: value = step * q + offset
    qmax: int
    affine: bool      # has a per-group offset (a "min")
    code_min: int = 0  # K-quants: range of the quantised sub-block scales (and of the mins, from 0)
    code_max: int = 0


# Q8_0 could use q = -128, but ggml's own encoder never does and the x86 dot products negate weights with
# _mm256_sign_epi8, which overflows on -128; stay on the symmetric range.
SPECS: dict[QT, GridSpec] = {
    QT.Q8_0: GridSpec(32, 32, -127, 127, False),
    QT.Q4_0: GridSpec(32, 32, -8, 7, False),
    QT.Q5_0: GridSpec(32, 32, -16, 15, False),
    QT.Q4_1: GridSpec(32, 32, 0, 15, True),
    QT.Q5_1: GridSpec(32, 32, 0, 31, True),
    QT.Q2_K: GridSpec(QK_K, 16, 0, 3, True, 0, 15),
    QT.Q3_K: GridSpec(QK_K, 16, -4, 3, False, -32, 31),
    QT.Q4_K: GridSpec(QK_K, 32, 0, 15, True, 0, 63),
    QT.Q5_K: GridSpec(QK_K, 32, 0, 31, True, 0, 63),
    QT.Q6_K: GridSpec(QK_K, 16, -32, 31, False, -128, 127),
}
for _t, _s in SPECS.items():
    assert GGML_QUANT_SIZES[_t][0] == _s.block_size


@dataclass
class BlockScales:
    """The scale fields of a run of blocks, as ggml stores them.

    d:    (n_blocks,) float32 holding fp16-exact values: the block scale (legacy) or super-block scale (K-quants).
    dmin: (n_blocks,) fp16-exact: Q4_1/Q5_1's block min m, or the K-quants' super-block scale of the mins.
    sc:   (n_blocks, n_groups) int32: K-quants' quantised sub-block scales (signed for Q3_K/Q6_K).
    m:    (n_blocks, n_groups) int32: Q2_K/Q4_K/Q5_K's quantised sub-block mins.
    """
    qtype: QT
    d: np.ndarray
    dmin: np.ndarray | None = None
    sc: np.ndarray | None = None
    m: np.ndarray | None = None

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """(step, offset), each (n_blocks, n_groups) float32, computed exactly as the dequantizer does."""
        spec = SPECS[self.qtype]
        d = self.d.astype(np.float32)[:, None]
        if spec.block_size != QK_K:
            offset = self.dmin.astype(np.float32)[:, None] if spec.affine else np.zeros_like(d)
            return d, offset
        step = d * self.sc.astype(np.float32)
        if not spec.affine:
            return step, np.zeros_like(step)
        return step, -(self.dmin.astype(np.float32)[:, None] * self.m.astype(np.float32))


# ----------------------------------------------------------------------------------------------------------------
# Rounding onto a fixed grid (numpy; also what GPTQ uses column by column)

def round_values(x: np.ndarray, step: np.ndarray, offset: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Nearest code q in [qmin, qmax] of x on the grid step*q + offset (elementwise, broadcasting); int32.

    Computed as ggml's re-quantisation does: rint((x - offset) / step), in float32. Where step is 0 every code
    gives the same value; we store the code of 0 (or qmin, if 0 is out of range).
    """
    x = np.asarray(x, np.float32)
    step = np.asarray(step, np.float32)
    offset = np.asarray(offset, np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.rint((x - offset) / step)
    t = np.where(step == 0, np.float32(0), t)
    return np.clip(t, qmin, qmax).astype(np.int32)


def grid_values(q: np.ndarray, step: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """The float32 values codes q stand for, computed as the dequantizer does."""
    return np.asarray(step, np.float32) * np.asarray(q, np.float32) + np.asarray(offset, np.float32)


def round_to_grid(blocks: np.ndarray, scales: BlockScales) -> np.ndarray:
    """Codes (n_blocks, block_size) int32 of `blocks` on the grid of `scales` (value = step * q + offset)."""
    spec = SPECS[scales.qtype]
    step, offset = scales.grid()
    n = blocks.shape[0]
    x = blocks.reshape(n, -1, spec.group_size)
    return round_values(x, step[..., None], offset[..., None], spec.qmin, spec.qmax).reshape(n, spec.block_size)


def dequantize_codes(q: np.ndarray, scales: BlockScales) -> np.ndarray:
    """Values (n_blocks, block_size) float32 of codes q on the grid of `scales`."""
    spec = SPECS[scales.qtype]
    step, offset = scales.grid()
    n = q.shape[0]
    return grid_values(q.reshape(n, -1, spec.group_size), step[..., None], offset[..., None]).reshape(n, -1)


# ----------------------------------------------------------------------------------------------------------------
# Block layouts: bytes per block and bit packing, for every type, in one place

def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, np.float32).astype(np.float16).reshape(-1, 1).view(np.uint8)


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo & 0xF).astype(np.uint8) | ((hi & 0xF).astype(np.uint8) << 4)


def _crumbs(L: np.ndarray) -> np.ndarray:
    """2-bit codes (n, 256) -> (n, 64): per 128 values, byte l holds values l, l+32, l+64, l+96 at bits 0,2,4,6."""
    L = (L & 3).astype(np.uint8).reshape(L.shape[0], 2, 4, 32)
    packed = L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)
    return packed.reshape(L.shape[0], 64)


def _bits_of_value(bits: np.ndarray) -> np.ndarray:
    """One bit per value (n, 32) -> 4 bytes, bit j of the little-endian uint32 = value j (Q5_0/Q5_1 qh)."""
    return np.packbits(bits.astype(np.uint8), axis=-1, bitorder="little")


def _k_scales_6bit(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: eight 6-bit scales and eight 6-bit mins in 12 bytes (inverse of ggml's get_scale_min_k4)."""
    sc = sc.astype(np.uint8)
    m = m.astype(np.uint8)
    return np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
                           m[:, :4] | ((m[:, 4:] >> 4) << 6),
                           (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)], axis=1)


def _q3_k_scales(sc: np.ndarray) -> np.ndarray:
    """Q3_K: sixteen signed 6-bit scales (stored +32) in 12 bytes: low nibbles in bytes 0-7, high crumbs in 8-11."""
    u = (sc + 32).astype(np.uint8)
    low = u & 0xF
    high = (u >> 4).reshape(-1, 4, 4)  # [group g of 4 scales, k]; scale 4g+k -> byte 8+k, bits 2g
    packed_high = high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) | (high[:, 3] << 6)
    return np.concatenate([low[:, :8] | (low[:, 8:] << 4), packed_high], axis=1)


def pack_blocks(scales: BlockScales, q: np.ndarray) -> np.ndarray:
    """Bytes (n_blocks, type_size) of blocks with stored scale fields `scales` and codes q (n_blocks, block_size)."""
    qt = scales.qtype
    spec = SPECS[qt]
    n = q.shape[0]
    u = (q - spec.qmin).astype(np.int32)  # the unsigned code ggml stores
    if qt == QT.Q8_0:
        parts = [_f16_bytes(scales.d), q.astype(np.int8).view(np.uint8)]
    elif qt in (QT.Q4_0, QT.Q4_1):
        header = [_f16_bytes(scales.d)] + ([_f16_bytes(scales.dmin)] if spec.affine else [])
        parts = header + [_nibbles(u[:, :16], u[:, 16:])]
    elif qt in (QT.Q5_0, QT.Q5_1):
        header = [_f16_bytes(scales.d)] + ([_f16_bytes(scales.dmin)] if spec.affine else [])
        parts = header + [_bits_of_value(u >> 4), _nibbles(u[:, :16], u[:, 16:])]
    elif qt == QT.Q2_K:
        parts = [(scales.sc.astype(np.uint8) | (scales.m.astype(np.uint8) << 4)), _crumbs(u),
                 _f16_bytes(scales.d), _f16_bytes(scales.dmin)]
    elif qt == QT.Q3_K:
        # hmask: bit j//32 of byte j%32 is the high bit of value j (set = no -4 offset)
        high = (u >> 2).astype(np.uint8).reshape(n, 8, 32)
        hmask = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
        parts = [hmask, _crumbs(u), _q3_k_scales(scales.sc), _f16_bytes(scales.d)]
    elif qt == QT.Q4_K:
        L = u.reshape(n, 4, 2, 32)  # per 64 values: low nibbles = first 32, high nibbles = next 32
        parts = [_f16_bytes(scales.d), _f16_bytes(scales.dmin), _k_scales_6bit(scales.sc, scales.m),
                 _nibbles(L[:, :, 0], L[:, :, 1]).reshape(n, 128)]
    elif qt == QT.Q5_K:
        L = u.reshape(n, 4, 2, 32)
        high = (L >> 4).astype(np.uint8).reshape(n, 8, 32)  # value 64c + 32h + j -> bit 2c+h of qh[j]
        qh = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
        parts = [_f16_bytes(scales.d), _f16_bytes(scales.dmin), _k_scales_6bit(scales.sc, scales.m), qh,
                 _nibbles(L[:, :, 0], L[:, :, 1]).reshape(n, 128)]
    elif qt == QT.Q6_K:
        L = u.reshape(n, 2, 4, 32)  # per 128 values: four runs of 32
        ql = np.concatenate([_nibbles(L[:, :, 0], L[:, :, 2]), _nibbles(L[:, :, 1], L[:, :, 3])], axis=2)
        qh = _crumbs(u >> 4)
        parts = [ql.reshape(n, 128), qh, scales.sc.astype(np.int8).view(np.uint8), _f16_bytes(scales.d)]
    else:
        raise LlmqError(f"no block encoder for {qt.name}")
    out = np.concatenate([np.asarray(p, np.uint8).reshape(n, -1) for p in parts], axis=1)
    assert out.shape[1] == GGML_QUANT_SIZES[qt][1], (qt.name, out.shape)
    return out


# ----------------------------------------------------------------------------------------------------------------
# numba kernels: shared scalar helpers

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_FP16_MAX = 65504.0
_FP16_TINY = np.float32(2.0 ** -24)  # smallest positive fp16 (subnormal)


@njit(cache=True)
def fp16_round(v):
    """v rounded to the nearest fp16 value (ties to even, overflow to inf), as float32: GGML_FP32_TO_FP16."""
    a = abs(np.float64(v))
    if a >= 65520.0:
        return np.float32(math.copysign(math.inf, v))
    if a < 6.103515625e-05:
        ulp = 5.9604644775390625e-08
    else:
        _, e = math.frexp(a)
        ulp = math.ldexp(1.0, e - 11)
    return np.float32(math.copysign(np.rint(a / ulp) * ulp, v))


@njit(cache=True)
def _fp16_sat(v):
    """fp16_round, but saturating at +-65504 so a huge candidate scale is still a usable one."""
    r = fp16_round(v)
    if math.isinf(r):
        return np.float32(math.copysign(_FP16_MAX, v))
    return r


@njit(cache=True)
def _fp16_step(v, k):
    """The fp16 value k ulps (of v's binade) away from fp16-exact v."""
    a = abs(np.float64(v))
    if a < 6.103515625e-05:
        ulp = 5.9604644775390625e-08
    else:
        _, e = math.frexp(a)
        ulp = math.ldexp(1.0, e - 11)
    return _fp16_sat(np.float32(np.float64(v) + k * ulp))


@njit(cache=True)
def _nearest_int(v):
    """ggml's nearest_int: round half to even of a float32."""
    return int(np.rint(v))


# Our own error sums may be reassociated (vectorised); values themselves are still computed exactly as the
# dequantizer does (no contraction into fma, no reciprocal instead of division).
_SUMS = {"reassoc", "nsz"}


@njit(cache=True, fastmath=_SUMS)
def _group_error(x, w, step, offset, qmin, qmax):
    """Weighted squared error of x rounded to the nearest point of step*q + offset, q in [qmin, qmax].

    Values are reconstructed in float32 exactly as the dequantizer does; the error is accumulated in float64.
    """
    err = 0.0
    if step == 0:
        for i in range(x.size):
            r = np.float64(x[i]) - np.float64(offset)
            err += w[i] * r * r
        return err
    for i in range(x.size):
        q = np.rint((x[i] - offset) / step)
        q = min(max(q, qmin), qmax)
        v = step * q + offset
        r = np.float64(x[i]) - np.float64(v)
        err += w[i] * r * r
    return err


@njit(cache=True, fastmath=_SUMS)
def _symmetric_ls(x, w, d, qmin, qmax):
    """Weighted least-squares scale of the codes x rounds to on d*q (0 if there is none)."""
    slx = 0.0
    sll = 0.0
    for i in range(x.size):
        q = np.float64(min(max(np.rint(x[i] / d), qmin), qmax))
        slx += np.float64(w[i]) * np.float64(x[i]) * q
        sll += np.float64(w[i]) * q * q
    return slx / sll if sll > 0 else 0.0


# ----------------------------------------------------------------------------------------------------------------
# numba kernels: our searches for one group of values

@njit(cache=True)
def _symmetric_search(x, w, qmin, qmax, n_shift, shift, to_fp16, d_start):
    """Best scale d for x on the grid d*q, q in [qmin, qmax], under weights w. Returns (d, error).

    Candidates: d_start (e.g. the reference's choice), and for the largest-magnitude value mapped onto each end of
    the code range shifted by shift*k (k in -n_shift..n_shift, like ggml's make_qx_quants), the scale itself and
    the weighted least-squares scale of the codes it gives. Then a least-squares refit of the winner and, for fp16
    scales, its neighbouring fp16 values. Every candidate is scored after rounding to fp16 when to_fp16.
    """
    fqmin = np.float32(qmin)
    fqmax = np.float32(qmax)
    # storing zeros is always a candidate (it wins for blocks far below the fp16 resolution)
    best_d = _F0
    best_e = _group_error(x, w, _F0, _F0, fqmin, fqmax)
    e = _group_error(x, w, d_start, _F0, fqmin, fqmax)
    if e < best_e:
        best_d = d_start
        best_e = e
    amax = 0.0
    vmax = np.float32(0.0)
    for i in range(x.size):
        if abs(x[i]) > amax:
            amax = abs(x[i])
            vmax = x[i]
    if amax == 0:
        return best_d, best_e
    for side in range(2):
        base = qmin if side == 0 else qmax
        if base == 0:
            continue
        for k in range(-n_shift, n_shift + 1):
            target = np.float64(base) + np.float64(shift) * k
            if target * base <= 0:
                continue
            d = np.float32(np.float64(vmax) / target)
            if d == 0 or not math.isfinite(d):
                continue
            d_ls = _symmetric_ls(x, w, d, fqmin, fqmax)
            for c in range(2):
                if c == 0:
                    cand = d
                elif d_ls != 0:
                    cand = np.float32(d_ls)
                else:
                    continue
                if to_fp16:
                    cand = _fp16_sat(cand)
                e = _group_error(x, w, cand, _F0, fqmin, fqmax)
                if e < best_e:
                    best_e = e
                    best_d = cand
    if best_d != 0:
        d_ls = _symmetric_ls(x, w, best_d, fqmin, fqmax)
        if d_ls != 0:
            cand = np.float32(d_ls)
            if to_fp16:
                cand = _fp16_sat(cand)
            e = _group_error(x, w, cand, _F0, fqmin, fqmax)
            if e < best_e:
                best_e = e
                best_d = cand
    if to_fp16 and best_d != 0:
        center = best_d
        for k in (-2, -1, 1, 2):
            cand = _fp16_step(center, k)
            e = _group_error(x, w, cand, _F0, fqmin, fqmax)
            if e < best_e:
                best_e = e
                best_d = cand
    return best_d, best_e


@njit(cache=True, fastmath=_SUMS)
def _affine_fit(x, w, d, m, qmax, nonpositive_offset):
    """Weighted least-squares (d, m) for the codes x rounds to on d*q + m. Returns (ok, d, m)."""
    if d == 0:
        return False, d, m
    fqmax = np.float32(qmax)
    sw = 0.0
    sx = 0.0
    sl = 0.0
    sll = 0.0
    sxl = 0.0
    for i in range(x.size):
        q = np.float64(min(max(np.rint((x[i] - m) / d), _F0), fqmax))
        wi = np.float64(w[i])
        xi = np.float64(x[i])
        sw += wi
        sx += wi * xi
        sl += wi * q
        sll += wi * q * q
        sxl += wi * xi * q
    det = sw * sll - sl * sl
    if not det > 0:
        return False, d, m
    new_d = (sw * sxl - sx * sl) / det
    new_m = (sll * sx - sl * sxl) / det
    if nonpositive_offset and new_m > 0:
        new_m = 0.0
        new_d = sxl / sll
    return True, np.float32(new_d), np.float32(new_m)


@njit(cache=True)
def _affine_search(x, w, qmax, rmin, rdelta, nstep, to_fp16, nonpositive_offset, d_start, m_start):
    """Best (d, m) for x on the grid d*q + m, q in [0, qmax], under weights w. Returns (d, m, error).

    Candidates: (d_start, m_start) (e.g. the reference's choice); for iscale = (rmin + rdelta*k + qmax)/(max - min),
    k = 0..nstep (ggml's make_qkx2/3_quants), the plain (1/iscale, min) and the weighted least-squares (d, m) of
    the codes it gives; then two least-squares refits of the winner and, for fp16 fields, neighbouring fp16 values.
    nonpositive_offset keeps m <= 0, as K-quants store the min as a subtracted non-negative value.
    """
    fqmax = np.float32(qmax)
    best_d = _F0
    best_m = _F0
    best_e = _group_error(x, w, _F0, _F0, _F0, fqmax)
    e = _group_error(x, w, d_start, m_start, _F0, fqmax)
    if e < best_e:
        best_d = d_start
        best_m = m_start
        best_e = e
    xmin = x[0]
    xmax = x[0]
    for i in range(1, x.size):
        xmin = min(xmin, x[i])
        xmax = max(xmax, x[i])
    if nonpositive_offset and xmin > 0:
        xmin = _F0
    if to_fp16:
        xmin = _fp16_sat(xmin)
    if xmax <= xmin:
        e = _group_error(x, w, _F0, xmin, _F0, fqmax)
        if e < best_e:
            return _F0, xmin, e
        return best_d, best_m, best_e
    for k in range(nstep + 1):
        iscale = np.float32((np.float64(rmin) + np.float64(rdelta) * k + qmax) / np.float64(xmax - xmin))
        if not (iscale > 0 and math.isfinite(iscale)):
            continue
        d0 = np.float32(1.0 / np.float64(iscale))
        if d0 == 0:
            continue
        for c in range(2):
            if c == 0:
                d, m = d0, xmin
            else:
                ok, d, m = _affine_fit(x, w, d0, xmin, qmax, nonpositive_offset)
                if not ok:
                    continue
            if to_fp16:
                d = _fp16_sat(d)
                m = _fp16_sat(m)
            if not (d > 0 and math.isfinite(d) and math.isfinite(m)):
                continue
            e = _group_error(x, w, d, m, _F0, fqmax)
            if e < best_e:
                best_e = e
                best_d = d
                best_m = m
    for _ in range(2):
        if best_d <= 0:
            break
        ok, d, m = _affine_fit(x, w, best_d, best_m, qmax, nonpositive_offset)
        if not ok:
            break
        if to_fp16:
            d = _fp16_sat(d)
            m = _fp16_sat(m)
        if not (d > 0 and math.isfinite(d) and math.isfinite(m)):
            break
        e = _group_error(x, w, d, m, _F0, fqmax)
        if e < best_e:
            best_e = e
            best_d = d
            best_m = m
        else:
            break
    if to_fp16 and best_d > 0:
        d_center = best_d
        m_center = best_m
        for kd in range(-2, 3):
            for km in range(-1, 2):
                if kd == 0 and km == 0:
                    continue
                d = _fp16_step(d_center, kd)
                m = _fp16_step(m_center, km) if m_center != 0 else m_center
                if d <= 0:
                    continue
                e = _group_error(x, w, d, m, _F0, fqmax)
                if e < best_e:
                    best_e = e
                    best_d = d
                    best_m = m
    return best_d, best_m, best_e


# ----------------------------------------------------------------------------------------------------------------
# numba kernels: ggml's own scale searches (ggml-quants.c), ported in float32 operation for operation so that the
# reference choice is one of our candidates

@njit(cache=True)
def _ggml_make_qx_quants(x, nmax, qw, use_qw):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw or NULL): returns (scale, L) with L in [0, 2*nmax)."""
    n = x.size
    L = np.zeros(n, np.int32)
    mx = _F0
    amax = _F0
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < np.float32(1e-15):
        return _F0, L
    fnmax = np.float32(nmax)
    iscale = -fnmax / mx
    sumlx = _F0
    suml2 = _F0
    for i in range(n):
        l = _nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
        w = qw[i] if use_qw else x[i] * x[i]
        fl = np.float32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != 0 else _F0
    best = scale * sumlx
    for s in range(-9, 10):
        if s == 0:
            continue
        iscale = -(fnmax + np.float32(0.1) * np.float32(s)) / mx
        sumlx = _F0
        suml2 = _F0
        for i in range(n):
            l = _nearest_int(iscale * x[i])
            l = max(-nmax, min(nmax - 1, l))
            w = qw[i] if use_qw else x[i] * x[i]
            fl = np.float32(l)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                l = _nearest_int(iscale * x[i])
                L[i] = nmax + max(-nmax, min(nmax - 1, l))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale, L


@njit(cache=True)
def _ggml_make_q3_quants(x, nmax):
    """make_q3_quants(n, nmax, x, L, do_rmse=true): returns the scale."""
    n = x.size
    L = np.zeros(n, np.int32)
    mx = _F0
    amax = _F0
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < np.float32(1e-15):
        return _F0
    iscale = -np.float32(nmax) / mx
    sumlx = _F0
    suml2 = _F0
    for i in range(n):
        l = _nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l
        w = x[i] * x[i]
        fl = np.float32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = x[i] * x[i]
            fli = np.float32(L[i])
            slx = sumlx - w * x[i] * fli
            if slx > 0:
                sl2 = suml2 - w * fli * fli
                new_l = _nearest_int(x[i] * sl2 / slx)
                new_l = max(-nmax, min(nmax - 1, new_l))
                if new_l != L[i]:
                    fnl = np.float32(new_l)
                    slx += w * x[i] * fnl
                    sl2 += w * fnl * fnl
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > 0 else _F0


@njit(cache=True)
def _ggml_make_qkx(x, weights, use_weights, nmax, rmin, rdelta, nstep, use_mad, x3):
    """make_qkx2_quants (x3=False) / make_qkx3_quants (x3=True): returns (scale, the_min)."""
    n = x.size
    L = np.zeros(n, np.int32)
    Laux = np.zeros(n, np.int32)
    mn = x[0]
    mx = x[0]
    sum_w = weights[0] if use_weights else x[0] * x[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i] if use_weights else x[i] * x[i]
        sum_w += w
        sum_x += w * x[i]
    if mn > 0:
        mn = _F0
    if (x3 and mx <= mn) or ((not x3) and mx == mn):
        return _F0, -mn
    fnmax = np.float32(nmax)
    iscale = fnmax / (mx - mn)
    scale = _F1 / iscale
    best_error = _F0
    for i in range(n):
        l = _nearest_int(iscale * (x[i] - mn))
        L[i] = max(0, min(nmax, l))
        diff = scale * np.float32(L[i]) + mn - x[i]
        diff = abs(diff) if use_mad else diff * diff
        w = weights[i] if use_weights else x[i] * x[i]
        best_error += w * diff
    if nstep < 1:
        return scale, -mn
    for s in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(s) + fnmax) / (mx - mn)
        sum_l = _F0
        sum_l2 = _F0
        sum_xl = _F0
        for i in range(n):
            l = _nearest_int(iscale * (x[i] - mn))
            l = max(0, min(nmax, l))
            Laux[i] = l
            w = weights[i] if use_weights else x[i] * x[i]
            fl = np.float32(l)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = _F0
                this_scale = sum_xl / sum_l2
            cur_error = _F0
            for i in range(n):
                diff = this_scale * np.float32(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                w = weights[i] if use_weights else x[i] * x[i]
                cur_error += w * diff
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(cache=True)
def _ggml_make_qp_quants(x, nmax, quant_weights):
    """make_qp_quants(n, nmax, x, L, quant_weights): returns (scale, L)."""
    n = x.size
    L = np.zeros(n, np.int32)
    mx = _F0
    for i in range(n):
        mx = max(mx, x[i])
    if mx < np.float32(1e-15):
        return _F0, L
    fnmax = np.float32(nmax)
    iscale = fnmax / mx
    for i in range(n):
        L[i] = _nearest_int(iscale * x[i])
    scale = _F1 / iscale
    best_mse = _F0
    for i in range(n):
        diff = x[i] - scale * np.float32(L[i])
        best_mse += quant_weights[i] * diff * diff
    for s in range(-4, 5):
        if s == 0:
            continue
        iscale_is = (np.float32(0.1) * np.float32(s) + fnmax) / mx
        scale_is = _F1 / iscale_is
        mse = _F0
        for i in range(n):
            l = min(nmax, _nearest_int(iscale_is * x[i]))
            diff = x[i] - scale_is * np.float32(l)
            mse += quant_weights[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = _F0
    suml2 = _F0
    for i in range(n):
        l = min(nmax, _nearest_int(iscale * x[i]))
        L[i] = l
        w = quant_weights[i]
        fl = np.float32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = quant_weights[i]
            fli = np.float32(L[i])
            slx = sumlx - w * x[i] * fli
            sl2 = suml2 - w * fli * fli
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, _nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    fnl = np.float32(new_l)
                    slx += w * x[i] * fnl
                    sl2 += w * fnl * fnl
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return (sumlx / suml2 if suml2 > 0 else _F0), L


# ----------------------------------------------------------------------------------------------------------------
# Legacy types (32 values, one fp16 scale, optionally one fp16 min)

def _reference_legacy(blocks: np.ndarray, qtype: QT) -> tuple[np.ndarray, np.ndarray]:
    """gguf-py's / ggml's quantize_row_*_ref choice of (d, m), in float32 before fp16 rounding."""
    spec = SPECS[qtype]
    if spec.affine:
        mn = blocks.min(axis=1)
        mx = blocks.max(axis=1)
        return ((mx - mn) / np.float32(spec.qmax)).astype(np.float32), mn.astype(np.float32)
    if qtype == QT.Q8_0:
        return (np.abs(blocks).max(axis=1) / np.float32(127)).astype(np.float32), np.zeros(len(blocks), np.float32)
    imax = np.abs(blocks).argmax(axis=1)
    vmax = blocks[np.arange(len(blocks)), imax]
    return (vmax / np.float32(spec.qmin)).astype(np.float32), np.zeros(len(blocks), np.float32)


# Search grids. Symmetric types: (n_shift, shift), the largest value mapped to code ends +- shift*k (ggml:
# 9 x 0.1); 127 levels need a coarser step. Affine types: (rmin, rdelta, nstep), as make_qkx3_quants's
# (-0.9, 0.05, 36) but a little wider.
_SYMMETRIC_SEARCH = {QT.Q8_0: (4, 0.5), QT.Q4_0: (10, 0.1), QT.Q5_0: (10, 0.1)}
_AFFINE_SEARCH = {QT.Q4_1: (-1.0, 0.05, 40), QT.Q5_1: (-1.0, 0.05, 40)}


@njit(cache=True)
def _ggml_legacy_imatrix_choice(x, qw, sigma2, nmax_or_qmax, affine):
    """ggml's quantize_row_q{4,5}_{0,1}_impl choice of (d, m) for one block (float32, before fp16 rounding)."""
    n = x.size
    weight = np.empty(n, np.float32)
    for j in range(n):
        weight[j] = qw[j] * np.float32(math.sqrt(sigma2 + x[j] * x[j]))
    if affine:
        d, the_min = _ggml_make_qkx(x, weight, True, nmax_or_qmax, np.float32(-0.9), np.float32(0.05), 36,
                                    False, True)
        return d, -the_min
    d, _ = _ggml_make_qx_quants(x, nmax_or_qmax, weight, True)
    return d, _F0


@njit(parallel=True, cache=True)
def _choose_legacy_kernel(blocks, w, qw, sigma2, use_qw, ref_d, ref_m, qmin, qmax, affine,
                          n_shift, shift, rmin, rdelta, nstep):
    n = blocks.shape[0]
    out_d = np.empty(n, np.float32)
    out_m = np.empty(n, np.float32)
    for b in prange(n):
        x = blocks[b]
        wb = w[b]
        d0 = _fp16_sat(ref_d[b])
        m0 = _fp16_sat(ref_m[b])
        if affine:
            if use_qw:
                # ggml's imatrix choice competes with the reference one before our search starts
                gd, gm = _ggml_legacy_imatrix_choice(x, qw[b], sigma2[b], qmax, True)
                gd = _fp16_sat(gd)
                gm = _fp16_sat(gm)
                if _group_error(x, wb, gd, gm, _F0, np.float32(qmax)) < \
                        _group_error(x, wb, d0, m0, _F0, np.float32(qmax)):
                    d0, m0 = gd, gm
            d, m, _ = _affine_search(x, wb, qmax, rmin, rdelta, nstep, True, False, d0, m0)
        else:
            if use_qw:
                gd, _ = _ggml_legacy_imatrix_choice(x, qw[b], sigma2[b], -qmin, False)
                gd = _fp16_sat(gd)
                if _group_error(x, wb, gd, _F0, np.float32(qmin), np.float32(qmax)) < \
                        _group_error(x, wb, d0, _F0, np.float32(qmin), np.float32(qmax)):
                    d0 = gd
            d, _ = _symmetric_search(x, wb, qmin, qmax, n_shift, shift, True, d0)
            m = _F0
        out_d[b] = d
        out_m[b] = m
    return out_d, out_m


@njit(parallel=True, cache=True)
def _ggml_legacy_imatrix_kernel(blocks, qw, sigma2, n_levels, affine):
    n = blocks.shape[0]
    out_d = np.empty(n, np.float32)
    out_m = np.empty(n, np.float32)
    for b in prange(n):
        d, m = _ggml_legacy_imatrix_choice(blocks[b], qw[b], sigma2[b], n_levels, affine)
        out_d[b] = fp16_round(d)
        out_m[b] = fp16_round(m)
    return out_d, out_m


def ggml_reference_scales_legacy(blocks: np.ndarray, qtype: QT, importance: np.ndarray | None = None,
                                 sigma2: np.ndarray | None = None) -> BlockScales:
    """ggml's own legacy-type scale choice alone: quantize_row_*_ref, or the imatrix path with `importance`."""
    spec = SPECS[qtype]
    blocks = np.ascontiguousarray(blocks, np.float32)
    if importance is None or qtype == QT.Q8_0:
        d, m = _reference_legacy(blocks, qtype)
        return BlockScales(qtype, fp16_of(d), fp16_of(m) if spec.affine else None)
    if sigma2 is None:
        sigma2 = np.cumsum(blocks * blocks, axis=1, dtype=np.float32)[:, -1] / np.float32(blocks.shape[1])
    n_levels = spec.qmax if spec.affine else -spec.qmin
    d, m = _ggml_legacy_imatrix_kernel(blocks, np.ascontiguousarray(importance, np.float32),
                                       np.ascontiguousarray(sigma2, np.float32), n_levels, spec.affine)
    return BlockScales(qtype, d, m if spec.affine else None)


def fp16_of(v: np.ndarray) -> np.ndarray:
    """float32 values rounded to fp16 (ties to even, overflow to inf), kept as float32."""
    with np.errstate(over="ignore"):
        return np.asarray(v, np.float32).astype(np.float16).astype(np.float32)


def choose_scales_legacy(blocks: np.ndarray, qtype: QT, weights: np.ndarray | None = None,
                         importance: np.ndarray | None = None, sigma2: np.ndarray | None = None) -> BlockScales:
    """Scales for legacy-type blocks (n_blocks, 32): the fp16 d (and m) of least weighted squared error.

    weights: per-value weights of the error metric (None = plain MSE). importance: per-value imatrix weights,
    which also enable ggml's imatrix candidate (it needs sigma2 = mean x^2 of each block's row; defaults to the
    block's own). Normally weights = importance.
    """
    spec = SPECS[qtype]
    blocks = np.ascontiguousarray(blocks, np.float32)
    n = blocks.shape[0]
    w = np.ones_like(blocks) if weights is None else np.ascontiguousarray(weights, np.float32)
    use_qw = importance is not None
    qw = np.ascontiguousarray(importance, np.float32) if use_qw else np.zeros((n, 1), np.float32)
    if sigma2 is None:
        sigma2 = (blocks.astype(np.float64) ** 2).mean(axis=1)
    sigma2 = np.ascontiguousarray(sigma2, np.float32)
    ref_d, ref_m = _reference_legacy(blocks, qtype)
    n_shift, shift = _SYMMETRIC_SEARCH.get(qtype, (0, 0.0))
    rmin, rdelta, nstep = _AFFINE_SEARCH.get(qtype, (0.0, 0.0, 0))
    d, m = _choose_legacy_kernel(blocks, w, qw, sigma2, use_qw, ref_d, ref_m, spec.qmin, spec.qmax, spec.affine,
                                 n_shift, np.float32(shift), np.float32(rmin), np.float32(rdelta), nstep)
    return BlockScales(qtype, d, m if spec.affine else None)


# ---- the same legacy search in plain numpy (vectorised over blocks), the reference for the kernel above

def _np_fp16(v):
    v = np.asarray(v, np.float32)
    with np.errstate(over="ignore"):
        r = v.astype(np.float16).astype(np.float32)
    return np.where(np.isinf(r), np.copysign(np.float32(_FP16_MAX), v), r).astype(np.float32)


def _np_fp16_step(v, k):
    a = np.abs(v.astype(np.float64))
    e = np.frexp(np.maximum(a, 6.103515625e-05))[1]
    ulp = np.where(a < 6.103515625e-05, 2.0 ** -24, np.ldexp(1.0, e - 11))
    return _np_fp16((v.astype(np.float64) + k * ulp).astype(np.float32))


def _np_error(x, w, d, m, qmin, qmax):
    """(n, 32) values, per-block d and m (n,) -> (n,) weighted squared errors (numpy twin of _group_error)."""
    d = d[:, None]
    m = m[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(np.rint((x - m) / d), np.float32(qmin), np.float32(qmax))
    v = np.where(d != 0, d * q + m, m)
    r = x.astype(np.float64) - v.astype(np.float64)
    return (w * r * r).sum(axis=1)


def _np_keep_better(best, cand_d, cand_m, x, w, qmin, qmax, valid=None):
    best_d, best_m, best_e = best
    e = _np_error(x, w, cand_d, cand_m, qmin, qmax)
    better = e < best_e
    if valid is not None:
        better &= valid
    return np.where(better, cand_d, best_d), np.where(better, cand_m, best_m), np.where(better, e, best_e)


def _np_ls_symmetric(x, w, d, qmin, qmax):
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(np.rint(x / d[:, None]), np.float32(qmin), np.float32(qmax)).astype(np.float64)
        slx = (w * x * q).sum(axis=1)
        sll = (w * q * q).sum(axis=1)
        return np.where(sll > 0, slx / sll, 0).astype(np.float32), (sll > 0) & (d != 0)


def _np_ls_affine(x, w, d, m, qmax):
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(np.rint((x - m[:, None]) / d[:, None]), np.float32(0), np.float32(qmax)).astype(np.float64)
        sw, sx, sl = w.sum(axis=1), (w * x).sum(axis=1), (w * q).sum(axis=1)
        sll, sxl = (w * q * q).sum(axis=1), (w * x * q).sum(axis=1)
        det = sw * sll - sl * sl
        ok = (det > 0) & (d != 0)
        return (np.where(ok, (sw * sxl - sx * sl) / det, d).astype(np.float32),
                np.where(ok, (sll * sx - sl * sxl) / det, m).astype(np.float32), ok)


def choose_scales_legacy_numpy(blocks: np.ndarray, qtype: QT, weights: np.ndarray | None = None) -> BlockScales:
    """Plain-numpy twin of `choose_scales_legacy` (without the imatrix candidate): same candidates, same order."""
    spec = SPECS[qtype]
    x = np.ascontiguousarray(blocks, np.float32)
    n = len(x)
    w = np.ones(x.shape, np.float64) if weights is None else np.asarray(weights, np.float64)
    qmin, qmax = spec.qmin, spec.qmax
    ref_d, ref_m = _reference_legacy(x, qtype)
    zero = np.zeros(n, np.float32)
    if not spec.affine:
        best = (zero, zero, _np_error(x, w, zero, zero, qmin, qmax))
        best = _np_keep_better(best, _np_fp16(ref_d), zero, x, w, qmin, qmax)
        vmax = x[np.arange(n), np.abs(x).argmax(axis=1)]
        nonzero = vmax != 0
        n_shift, shift = _SYMMETRIC_SEARCH[qtype]
        for base in (qmin, qmax):
            for k in range(-n_shift, n_shift + 1):
                target = float(base) + float(np.float32(shift)) * k
                if target * base <= 0:
                    continue
                d = (vmax.astype(np.float64) / target).astype(np.float32)
                ok = nonzero & (d != 0)
                d_ls, ok_ls = _np_ls_symmetric(x, w, np.where(ok, d, 1).astype(np.float32), qmin, qmax)
                best = _np_keep_better(best, _np_fp16(d), zero, x, w, qmin, qmax, ok)
                best = _np_keep_better(best, _np_fp16(d_ls), zero, x, w, qmin, qmax, ok & ok_ls)
        d_ls, ok_ls = _np_ls_symmetric(x, w, best[0], qmin, qmax)
        best = _np_keep_better(best, _np_fp16(d_ls), zero, x, w, qmin, qmax, nonzero & ok_ls)
        center = best[0]
        for k in (-2, -1, 1, 2):
            best = _np_keep_better(best, _np_fp16_step(center, k), zero, x, w, qmin, qmax, nonzero & (center != 0))
        return BlockScales(qtype, best[0])
    rmin, rdelta, nstep = _AFFINE_SEARCH[qtype]
    best = (zero, zero, _np_error(x, w, zero, zero, qmin, qmax))
    best = _np_keep_better(best, _np_fp16(ref_d), _np_fp16(ref_m), x, w, qmin, qmax)
    xmin = _np_fp16(x.min(axis=1))
    xmax = x.max(axis=1)
    flat = xmax <= xmin
    best = _np_keep_better(best, zero, xmin, x, w, qmin, qmax, flat)
    span = np.where(flat, 1, xmax - xmin).astype(np.float32)
    for k in range(nstep + 1):
        iscale = ((float(np.float32(rmin)) + float(np.float32(rdelta)) * k + qmax) / span.astype(np.float64))
        with np.errstate(over="ignore"):
            iscale = iscale.astype(np.float32)
        ok = ~flat & (iscale > 0) & np.isfinite(iscale)
        d = (1.0 / np.where(ok, iscale, 1).astype(np.float64)).astype(np.float32)
        ok &= d != 0
        best = _np_keep_better(best, _np_fp16(d), xmin, x, w, qmin, qmax, ok & (_np_fp16(d) > 0))
        d_ls, m_ls, ok_ls = _np_ls_affine(x, w, d, xmin, qmax)
        d_ls, m_ls = _np_fp16(d_ls), _np_fp16(m_ls)
        best = _np_keep_better(best, d_ls, m_ls, x, w, qmin, qmax, ok & ok_ls & (d_ls > 0))
    for _ in range(2):
        positive = ~flat & (best[0] > 0)
        d_ls, m_ls, ok_ls = _np_ls_affine(x, w, np.where(positive, best[0], 1).astype(np.float32), best[1], qmax)
        d_ls, m_ls = _np_fp16(d_ls), _np_fp16(m_ls)
        e = _np_error(x, w, d_ls, m_ls, qmin, qmax)
        better = positive & ok_ls & (e < best[2]) & (d_ls > 0)
        best = (np.where(better, d_ls, best[0]), np.where(better, m_ls, best[1]), np.where(better, e, best[2]))
        if not better.any():
            break
    d_center, m_center = best[0], best[1]
    for kd in range(-2, 3):
        for km in range(-1, 2):
            if kd == 0 and km == 0:
                continue
            d = _np_fp16_step(d_center, kd)
            m = np.where(m_center != 0, _np_fp16_step(m_center, km), m_center).astype(np.float32)
            best = _np_keep_better(best, d, m, x, w, qmin, qmax, ~flat & (d_center > 0) & (d > 0))
    return BlockScales(qtype, best[0], best[1])


# ----------------------------------------------------------------------------------------------------------------
# K-quants (super-blocks of 256 values: quantised sub-block scales under fp16 super-block scales)

@njit(cache=True)
def _k_error(x, w, qtype_affine, gs, qmin, qmax, d, dmin, sc, m):
    """Weighted squared error of a super-block encoded with (d, dmin, sc, m), every value rounded to nearest."""
    err = 0.0
    for j in range(sc.size):
        step = d * np.float32(sc[j])
        offset = -(dmin * np.float32(m[j])) if qtype_affine else _F0
        err += _group_error(x[j * gs:(j + 1) * gs], w[j * gs:(j + 1) * gs], step, offset,
                            np.float32(qmin), np.float32(qmax))
    return err


@njit(cache=True)
def _ggml_k_choice(kind, x, qw, use_qw, sc, m):
    """ggml's choice for one super-block: quantize_row_qX_K_ref, or quantize_row_qX_K_impl with an imatrix.

    kind: 2, 3, 4, 5, 6 for Q2_K..Q6_K. Fills the code arrays sc (and m); returns the fp16 (d, dmin).
    """
    n = x.size
    sum_x2 = _F0
    for l in range(n):
        sum_x2 += x[l] * x[l]
    if kind == 6 or kind == 3:
        G = 16
        scales = np.empty(G, np.float32)
        sw = np.empty(G, np.float32)
        sigma2 = np.float32(2) * sum_x2 / np.float32(QK_K)
        weight = np.empty(16, np.float32)
        max_scale = _F0
        max_abs_scale = _F0
        for j in range(G):
            xs = x[16 * j:16 * j + 16]
            if kind == 6:
                s, _ = _ggml_make_qx_quants(xs, 32, qw[16 * j:16 * j + 16], use_qw)
            elif use_qw:
                for l in range(16):
                    weight[l] = qw[16 * j + l] * np.float32(math.sqrt(sigma2 + xs[l] * xs[l]))
                sw_j = _F0
                for l in range(16):
                    sw_j += weight[l]
                sw[j] = sw_j
                s, _ = _ggml_make_qx_quants(xs, 4, weight, True)
            else:
                s = _ggml_make_q3_quants(xs, 4)
            scales[j] = s
            if abs(s) > max_abs_scale:
                max_abs_scale = abs(s)
                max_scale = s
        if kind == 6:
            if max_abs_scale < np.float32(1e-15):
                sc[:] = 0
                return _F0, _F0
            iscale = np.float32(-128) / max_scale
            for j in range(G):
                sc[j] = min(127, _nearest_int(iscale * scales[j]))
            return fp16_round(_F1 / iscale), _F0
        if use_qw:
            d_block, Ls = _ggml_make_qx_quants(scales, 32, sw, True)
            for j in range(G):
                sc[j] = Ls[j] - 32
            return fp16_round(d_block), _F0
        if max_scale == 0:
            sc[:] = -32
            return _F0, _F0
        iscale = np.float32(-32) / max_scale
        for j in range(G):
            l = _nearest_int(iscale * scales[j])
            sc[j] = max(-32, min(31, l))
        return fp16_round(_F1 / iscale), _F0

    # affine kinds: Q2_K (16 x 16, 4-bit codes), Q4_K / Q5_K (8 x 32, 6-bit codes)
    gs = 16 if kind == 2 else 32
    G = QK_K // gs
    nmax = 3 if kind == 2 else (15 if kind == 4 else 31)
    code_max = 15 if kind == 2 else 63
    scales = np.empty(G, np.float32)
    mins = np.empty(G, np.float32)
    sw = np.empty(G, np.float32)
    weights = np.empty(gs, np.float32)
    sigma2 = sum_x2 / np.float32(QK_K) if kind == 2 else np.float32(2) * sum_x2 / np.float32(QK_K)
    for j in range(G):
        xs = x[gs * j:gs * j + gs]
        if use_qw:
            for l in range(gs):
                weights[l] = qw[gs * j + l] * np.float32(math.sqrt(sigma2 + xs[l] * xs[l]))
            sw_j = _F0
            for l in range(gs):
                sw_j += weights[l]
            sw[j] = sw_j
            s, mn = _ggml_make_qkx(xs, weights, True, nmax, np.float32(-0.9), np.float32(0.05), 36, False, True)
        else:
            if kind == 2:
                for l in range(gs):
                    weights[l] = abs(xs[l])
                s, mn = _ggml_make_qkx(xs, weights, True, 3, np.float32(-0.5), np.float32(0.1), 15, True, False)
            else:
                sx2 = _F0
                for l in range(gs):
                    sx2 += xs[l] * xs[l]
                av_x = np.float32(math.sqrt(sx2 / np.float32(32)))
                for l in range(gs):
                    weights[l] = av_x + abs(xs[l])
                if kind == 4:
                    s, mn = _ggml_make_qkx(xs, weights, True, 15, np.float32(-1), np.float32(0.1), 20, False, False)
                else:
                    s, mn = _ggml_make_qkx(xs, weights, True, 31, np.float32(-0.5), np.float32(0.1), 15, False,
                                           False)
        scales[j] = s
        mins[j] = mn
    if use_qw:
        d_block, Ls = _ggml_make_qp_quants(scales, code_max, sw)
        m_block, Lm = _ggml_make_qp_quants(mins, code_max, sw)
        for j in range(G):
            sc[j] = min(code_max, Ls[j])
            m[j] = min(code_max, Lm[j])
        return fp16_round(d_block), fp16_round(m_block)
    max_scale = _F0
    max_min = _F0
    for j in range(G):
        max_scale = max(max_scale, scales[j])
        max_min = max(max_min, mins[j])
    fcode = np.float32(code_max)
    if kind == 2:
        d = _F0
        dmin = _F0
        sc[:] = 0
        m[:] = 0
        if max_scale > 0:
            iscale = fcode / max_scale
            for j in range(G):
                sc[j] = _nearest_int(iscale * scales[j]) & 0xFF
            d = fp16_round(max_scale / fcode)
        if max_min > 0:
            iscale = fcode / max_min
            for j in range(G):
                m[j] = _nearest_int(iscale * mins[j]) & 0xF
            dmin = fp16_round(max_min / fcode)
        return d, dmin
    inv_scale = fcode / max_scale if max_scale > 0 else _F0
    inv_min = fcode / max_min if max_min > 0 else _F0
    for j in range(G):
        sc[j] = min(code_max, _nearest_int(inv_scale * scales[j]) & 0xFF)
        m[j] = min(code_max, _nearest_int(inv_min * mins[j]) & 0xFF)
    return fp16_round(max_scale / fcode), fp16_round(max_min / fcode)


@njit(cache=True)
def _codes_for_superscale_sym(x, w, gs, qmin, qmax, s, d, code_min, code_max, radius, sc):
    """Sub-block codes for super-scale d: nearest code to s_j/d and its +-radius neighbours, by exact error."""
    total = 0.0
    for j in range(s.size):
        xs = x[j * gs:(j + 1) * gs]
        ws = w[j * gs:(j + 1) * gs]
        c0 = max(code_min, min(code_max, _nearest_int(s[j] / d)))
        best_e = math.inf
        for c in range(max(code_min, c0 - radius), min(code_max, c0 + radius) + 1):
            e = _group_error(xs, ws, d * np.float32(c), _F0, np.float32(qmin), np.float32(qmax))
            if e < best_e:
                best_e = e
                sc[j] = c
        total += best_e
    return total


@njit(cache=True)
def _codes_for_superscale_affine(x, w, gs, qmax, s, mn, d, dmin, code_max, radius, sc, m):
    """Sub-block (scale, min) codes for super-scales (d, dmin), searched around the nearest codes by exact error."""
    total = 0.0
    for j in range(s.size):
        xs = x[j * gs:(j + 1) * gs]
        ws = w[j * gs:(j + 1) * gs]
        c0 = max(0, min(code_max, _nearest_int(s[j] / d))) if d > 0 else 0
        m0 = max(0, min(code_max, _nearest_int(mn[j] / dmin))) if dmin > 0 else 0
        best_e = math.inf
        for c in range(max(0, c0 - radius), min(code_max, c0 + radius) + 1):
            for mm in range(max(0, m0 - radius), min(code_max, m0 + radius) + 1):
                if dmin == 0 and mm != m0:
                    continue
                e = _group_error(xs, ws, d * np.float32(c), -(dmin * np.float32(mm)), _F0, np.float32(qmax))
                if e < best_e:
                    best_e = e
                    sc[j] = c
                    m[j] = mm
        total += best_e
    return total


@njit(parallel=True, cache=True)
def _choose_k_kernel(kind, blocks, w, qw, use_qw, gs, qmin, qmax, affine, code_min, code_max, radius):
    n = blocks.shape[0]
    G = QK_K // gs
    out_d = np.zeros(n, np.float32)
    out_dmin = np.zeros(n, np.float32)
    out_sc = np.zeros((n, G), np.int32)
    out_m = np.zeros((n, G), np.int32)
    fqmin = np.float32(qmin)
    fqmax = np.float32(qmax)
    for b in prange(n):
        x = blocks[b]
        wb = w[b]
        sc = np.zeros(G, np.int32)
        m = np.zeros(G, np.int32)
        # candidate 0: all zeros (out_* start zeroed); candidate 1: ggml's own encoding
        best_e = _k_error(x, wb, affine, gs, qmin, qmax, _F0, _F0, out_sc[b], out_m[b])
        d, dmin = _ggml_k_choice(kind, x, qw[b], use_qw, sc, m)
        e = _k_error(x, wb, affine, gs, qmin, qmax, d, dmin, sc, m)
        if e < best_e:  # false for the NaN of an overflowing fp16 scale
            best_e = e
            out_d[b] = d
            out_dmin[b] = dmin
            out_sc[b] = sc
            out_m[b] = m
        ref_d = d if math.isfinite(d) else np.float32(math.copysign(_FP16_MAX, d))
        ref_dmin = dmin if math.isfinite(dmin) else np.float32(_FP16_MAX)
        # candidate 2..: our sub-block scales (continuous), quantised under several super-scales
        s = np.zeros(G, np.float32)
        mn = np.zeros(G, np.float32)
        for j in range(G):
            xs = x[j * gs:(j + 1) * gs]
            ws = wb[j * gs:(j + 1) * gs]
            if affine:
                sj, mj, _ = _affine_search(xs, ws, qmax, np.float32(-1.0), np.float32(0.1), 20, False, True,
                                           _F0, _F0)
                s[j] = sj
                mn[j] = -mj
            else:
                sj, _ = _symmetric_search(xs, ws, qmin, qmax, 6, np.float32(0.15), False, _F0)
                s[j] = sj
        if affine:
            smax = _F0
            mmax = _F0
            for j in range(G):
                smax = max(smax, s[j])
                mmax = max(mmax, mn[j])
            fcode = np.float32(code_max)
            n_d = 5
            for id_ in range(n_d + 1):
                if id_ < n_d:
                    if smax <= 0:
                        continue
                    dc = max(_fp16_sat(smax / (fcode - np.float32(0.5) * np.float32(id_))), _FP16_TINY)
                else:
                    dc = ref_d
                for im in range(3):
                    if im < 2:
                        dminc = max(_fp16_sat(mmax / (fcode - np.float32(im))), _FP16_TINY) if mmax > 0 else _F0
                        if im == 1 and mmax <= 0:
                            continue
                    else:
                        dminc = ref_dmin
                    if dc <= 0 or dminc < 0:
                        continue
                    e = _codes_for_superscale_affine(x, wb, gs, qmax, s, mn, dc, dminc, code_max, radius, sc, m)
                    if e < best_e:
                        best_e = e
                        out_d[b] = dc
                        out_dmin[b] = dminc
                        out_sc[b] = sc
                        out_m[b] = m
        else:
            smax = _F0
            for j in range(G):
                if abs(s[j]) > abs(smax):
                    smax = s[j]
            n_t = 5
            for side in range(2):
                for it in range(n_t + 1):
                    if it < n_t:
                        if smax == 0:
                            continue
                        target = np.float32(code_min) + np.float32(0.5) * np.float32(it) if side == 0 else \
                            np.float32(code_max) - np.float32(0.5) * np.float32(it)
                        dc = _fp16_sat(smax / target)
                        if dc == 0:
                            dc = np.float32(math.copysign(_FP16_TINY, smax / target))
                    elif side == 0:
                        dc = ref_d
                    else:
                        continue
                    if dc == 0:
                        continue
                    e = _codes_for_superscale_sym(x, wb, gs, qmin, qmax, s, dc, code_min, code_max, radius, sc)
                    if e < best_e:
                        best_e = e
                        out_d[b] = dc
                        out_sc[b] = sc
    return out_d, out_dmin, out_sc, out_m


_K_KIND = {QT.Q2_K: 2, QT.Q3_K: 3, QT.Q4_K: 4, QT.Q5_K: 5, QT.Q6_K: 6}
_K_RADIUS = {QT.Q2_K: 1, QT.Q3_K: 1, QT.Q4_K: 1, QT.Q5_K: 1, QT.Q6_K: 1}


def choose_scales_k(blocks: np.ndarray, qtype: QT, weights: np.ndarray | None = None,
                    importance: np.ndarray | None = None) -> BlockScales:
    """Scales for K-quant super-blocks (n_blocks, 256): fp16 d (and dmin) plus quantised sub-block scales (and
    mins), of least weighted squared error among ggml's own choice (ref, or imatrix path when `importance` is
    given) and ours: per sub-block least-squares scale searches, quantised under several super-scales with the
    sub-block codes searched around the nearest ones."""
    spec = SPECS[qtype]
    blocks = np.ascontiguousarray(blocks, np.float32)
    n = blocks.shape[0]
    w = np.ones_like(blocks) if weights is None else np.ascontiguousarray(weights, np.float32)
    use_qw = importance is not None
    qw = np.ascontiguousarray(importance, np.float32) if use_qw else np.zeros((n, QK_K), np.float32)
    d, dmin, sc, m = _choose_k_kernel(_K_KIND[qtype], blocks, w, qw, use_qw, spec.group_size, spec.qmin,
                                      spec.qmax, spec.affine, spec.code_min, spec.code_max, _K_RADIUS[qtype])
    if spec.affine:
        return BlockScales(qtype, d, dmin, sc, m)
    return BlockScales(qtype, d, None, sc, None)


@njit(parallel=True, cache=True)
def _ggml_k_kernel(kind, blocks, qw, use_qw, G):
    n = blocks.shape[0]
    out_d = np.zeros(n, np.float32)
    out_dmin = np.zeros(n, np.float32)
    out_sc = np.zeros((n, G), np.int32)
    out_m = np.zeros((n, G), np.int32)
    for b in prange(n):
        sc = np.zeros(G, np.int32)
        m = np.zeros(G, np.int32)
        d, dmin = _ggml_k_choice(kind, blocks[b], qw[b], use_qw, sc, m)
        out_d[b] = d
        out_dmin[b] = dmin
        out_sc[b] = sc
        out_m[b] = m
    return out_d, out_dmin, out_sc, out_m


def ggml_reference_scales_k(blocks: np.ndarray, qtype: QT, importance: np.ndarray | None = None) -> BlockScales:
    """ggml's own K-quant scale choice alone (the port; for tests and comparisons)."""
    spec = SPECS[qtype]
    blocks = np.ascontiguousarray(blocks, np.float32)
    use_qw = importance is not None
    qw = np.ascontiguousarray(importance, np.float32) if use_qw else np.zeros_like(blocks)
    d, dmin, sc, m = _ggml_k_kernel(_K_KIND[qtype], blocks, qw, use_qw, QK_K // spec.group_size)
    return BlockScales(qtype, d, dmin if spec.affine else None, sc, m if spec.affine else None)


# ----------------------------------------------------------------------------------------------------------------
# Public entry points

def choose_scales(blocks: np.ndarray, qtype: QT, importance: np.ndarray | None = None,
                  sigma2: np.ndarray | None = None) -> BlockScales:
    """Scale fields for blocks (n_blocks, block_size) of `qtype`, minimising the (importance-weighted) squared
    error; importance is per value (n_blocks, block_size) or None (plain MSE). sigma2 (legacy types with
    importance): mean x^2 of each block's row, as ggml's imatrix path uses."""
    weights = None if importance is None else _selection_weights(importance, SPECS[qtype].group_size)
    if SPECS[qtype].block_size == QK_K:
        return choose_scales_k(blocks, qtype, weights, importance)
    return choose_scales_legacy(blocks, qtype, weights, importance, sigma2)


def _selection_weights(importance: np.ndarray, group_size: int) -> np.ndarray:
    """The error weights for a search under importance (n_blocks, block_size).

    Where a whole group has zero importance every candidate ties and storing zeros would "win"; such groups get
    a vanishing weight instead (plain MSE for a block with no importance at all), so they are still encoded well.
    """
    w = np.array(importance, np.float32, copy=True)
    n = w.shape[0]
    groups = w.reshape(n, -1, group_size)
    dead = groups.sum(axis=2) == 0
    if dead.any():
        block_mean = w.mean(axis=1)
        fill = np.where(block_mean > 0, block_mean * np.float32(1e-9), np.float32(1))
        groups[dead] = np.broadcast_to(fill[:, None], dead.shape)[dead][:, None]
    return w


def _bf16_bytes(w: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16: round to nearest even on the upper 16 bits (inputs are finite)."""
    n = w.view(np.uint32).astype(np.uint64)
    return ((n + 0x7FFF + ((n >> 16) & 1)) >> 16).astype(np.uint16).view(np.uint8)


def quantize(w: np.ndarray, qtype: QT, importance: np.ndarray | None = None) -> np.ndarray:
    """Encode w (rows, cols) float32, or one row, as ggml stores it in `qtype`: uint8 (rows, bytes per row).

    importance: optional per-column weights (cols,) >= 0, like llama.cpp's imatrix (diagonal of X^T X); the
    encoder then minimises sum(importance * (w - dequantized)^2) per row instead of the plain squared error.
    """
    qtype = QT(qtype)
    if qtype not in SUPPORTED:
        raise LlmqError(f"quantisation type {qtype.name} is not supported (supported: "
                        f"{', '.join(sorted(t.name for t in SUPPORTED))})")
    w = np.asarray(w)
    if w.ndim == 1:
        w = w[None, :]
    if w.ndim != 2:
        raise LlmqError(f"cannot quantise a tensor of shape {w.shape}: expected (rows, cols)")
    w = np.ascontiguousarray(w, np.float32)
    rows, cols = w.shape
    if not np.isfinite(w).all():
        raise LlmqError(f"cannot quantise to {qtype.name}: the tensor holds {(~np.isfinite(w)).sum()} "
                        f"non-finite values (NaN or inf)")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if cols % block_size:
        raise LlmqError(f"cannot quantise to {qtype.name}: row length {cols} is not a multiple of the "
                        f"block size {block_size}")
    if qtype == QT.F32:
        return w.view(np.uint8).reshape(rows, cols * 4)
    if qtype == QT.F16:
        if np.abs(w).max(initial=0) > _FP16_MAX + 16:
            raise LlmqError("cannot store the tensor as F16: it has values beyond the float16 range (+-65504)")
        return w.astype(np.float16).view(np.uint8).reshape(rows, cols * 2)
    if qtype == QT.BF16:
        return _bf16_bytes(w).reshape(rows, cols * 2)
    if qtype in (QT.NVFP4, QT.MXFP4):
        # the bytes alone stand for w here (no tensor scale); convert.py searches one where llama.cpp applies it
        from . import fp4
        return fp4.quantize(w, qtype, importance, tensor_scale=1.0).data

    n_blocks = rows * cols // block_size
    blocks = w.reshape(n_blocks, block_size)
    per_value = sigma2 = None
    if importance is not None:
        importance = np.asarray(importance, np.float32).reshape(-1)
        if importance.shape != (cols,):
            raise LlmqError(f"importance has {importance.size} values but the tensor rows have {cols}")
        if not np.isfinite(importance).all() or (importance < 0).any():
            raise LlmqError("importance values must be finite and non-negative")
        per_value = np.ascontiguousarray(np.broadcast_to(importance, (rows, cols))).reshape(n_blocks, block_size)
        # ggml: float sum_x2 accumulated value by value, then / n_per_row (cumsum is sequential, as in C)
        row_sigma2 = np.cumsum(w * w, axis=1, dtype=np.float32)[:, -1] / np.float32(cols)
        sigma2 = np.repeat(row_sigma2.astype(np.float32), cols // block_size)
    scales = choose_scales(blocks, qtype, per_value, sigma2)
    q = round_to_grid(blocks, scales)
    return pack_blocks(scales, q).reshape(rows, cols // block_size * type_size)


def dequantize(data: np.ndarray, qtype: QT) -> np.ndarray:
    """float32 values of ggml-encoded data (gguf-py's dequantizers, the oracle for our encoders)."""
    return gguf.quants.dequantize(np.asarray(data), QT(qtype))
