"""Which of ggml-cpu's x86 code paths this CPU runs.

llama-cpp-python builds libggml-cpu for the machine it is installed on (-march=native), and ggml picks its vector
code at compile time (`#if defined(__AVX512F__) ... #elif defined(__AVX2__) ...`): the same product is summed in a
different order on an AVX512 machine than on an AVX2 one. The kernels that reproduce llama.cpp's rounding order bit
for bit therefore have to follow the variant of the CPU they run on; this module names it once.

    LEVEL  "avx512-vnni"  AVX512 F/DQ/BW/VL + VNNI: the variants the mirrored kernels were first written for
           "avx512"       AVX512 without VNNI
           "avx2"         AVX2 + FMA + F16C
           "generic"      anything else (ARM, older x86): no mirrored order; results are close, not identical
"""

from __future__ import annotations

from llvmlite import binding as llvm

FEATURES = frozenset(f[1:] for f in llvm.get_host_cpu_features().flatten().split(",") if f.startswith("+"))

AVX512 = {"avx512f", "avx512dq", "avx512bw", "avx512vl"} <= FEATURES
AVX512_VNNI = AVX512 and "avx512vnni" in FEATURES
AVX2 = {"avx2", "fma", "f16c"} <= FEATURES

LEVEL = "avx512-vnni" if AVX512_VNNI else "avx512" if AVX512 else "avx2" if AVX2 else "generic"

# ggml's x86 vec_dot functions (arch/x86/quants.c: Q4_0, Q5_0, Q8_0, Q4_1, Q5_1, Q2_K..Q6_K against Q8_*) have only an
# __AVX2__ branch, so every AVX2-or-better build, AVX512 included, runs them in the AVX2 float order: one token
# (decode) and the products no matrix kernel takes (tinyBLAS declines n < 2, the tiled K-quant matmul n < 8).
X86_AVX2_DOTS = LEVEL in ("avx2", "avx512", "avx512-vnni")
