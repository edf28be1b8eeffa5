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
