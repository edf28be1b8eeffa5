"""The VNNI prefill kernel (runtime/gemm_int8.py through kernels._gemm_q32) against its float32 reference
(kernels._gemm_q32_float): the same float operations in the same order, so the outputs must be equal bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import quants as gguf_quants

from runtime import kernels as K
from runtime.gemm_int8 import HAVE_VNNI

pytestmark = pytest.mark.skipif(not HAVE_VNNI, reason="needs AVX512-VNNI (kernels._gemm_q32 is the float version)")

KINDS = {QT.Q4_0: K._KIND_Q4_0, QT.Q4_1: K._KIND_Q4_1, QT.Q5_0: K._KIND_Q5_0, QT.Q5_1: K._KIND_Q5_1,
         QT.Q8_0: K._KIND_Q8_0}


# sequential=True (one accumulator) is the repacked Q4_0 order; it has no min term, so Q4_1/Q5_1 never use it
@pytest.mark.parametrize("qtype, sequential", [(q, False) for q in KINDS] + [(QT.Q4_0, True), (QT.Q5_0, True),
                                                                            (QT.Q8_0, True)])
def test_vnni_gemm_equals_float_reference(qtype, sequential):
    rng = np.random.default_rng(int(qtype) * 2 + sequential)
    rows, cols, n = 37, 160, 7  # rows: two full 16-row tiles and a partial one; n odd: the single-row tail
    weights = rng.standard_normal((rows, cols)).astype(np.float32)
    weights[3, :32] = 0.0       # an all-zero block (scale 0)
    w = gguf_quants.quantize(weights, qtype).reshape(rows, cols // 32, -1)
    x = (rng.standard_normal((n, cols)) * rng.uniform(0.1, 10, (n, 1))).astype(np.float32)
    x[2, 32:64] = 0.0
    kind = KINDS[qtype]
    got = K._gemm_q32_vnni(w, x, K.F16_TO_F32, kind, sequential)
    want = K._gemm_q32_float(w, x, K.F16_TO_F32, kind, sequential)
    np.testing.assert_array_equal(got, want)
    assert np.abs(want).max() > 0


def test_vnni_gemm_extreme_quants():
    """Q8_0 weights of -128/127 and activations whose quants are +-127: the largest integer sums."""
    rows, cols, n = 16, 64, 3
    w = gguf_quants.quantize(np.tile([[1.0, -1.0]], (rows, cols // 2)).astype(np.float32), QT.Q8_0)
    w = w.reshape(rows, cols // 32, -1).copy()
    w[:, :, 2:] = np.uint8(0x80)  # every weight quant -128
    x = np.tile([[-1.0, 1.0]], (n, cols // 2)).astype(np.float32)
    for sequential in (False, True):
        got = K._gemm_q32_vnni(w, x, K.F16_TO_F32, K._KIND_Q8_0, sequential)
        np.testing.assert_array_equal(got, K._gemm_q32_float(w, x, K.F16_TO_F32, K._KIND_Q8_0, sequential))
