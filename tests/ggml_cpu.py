"""llama.cpp's own CPU kernels through ctypes: ggml's CPU type traits (from_float of the vec_dot_type, vec_dot) from
llama-cpp-python's libggml-cpu, the build the runtime is compared with token for token."""

from __future__ import annotations

import ctypes
import os


class GgmlTraits(ctypes.Structure):
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
VEC_DOT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                           ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def libggml_cpu_path() -> str:
    import llama_cpp

    return os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-cpu.so")


def open_ggml_cpu(path: str | None = None) -> ctypes.CDLL:
    """libggml-cpu with ggml_get_type_traits_cpu typed and the CPU backend initialised."""
    lib = ctypes.CDLL(path or libggml_cpu_path())
    lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(GgmlTraits)
    lib.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    lib.ggml_cpu_init()
    return lib


# ggml-cpu/repack.cpp's batched kernels, exported as C++ templates (nm -D --demangle libggml-cpu.so):
#   ggml::cpu::repack::gemm<block, INTER_SIZE, NB_COLS, PARAM_TYPE>(int n, float *s, size_t bs, const void *vx,
#                                                                  const void *vy, int nr, int nc)   (and gemv)
#   ggml_quantize_mat_t<INTER_SIZE, PARAM_TYPE>(const float *x, void *vy, int64_t nrow, int64_t n_per_row)
REPACK_MUL = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p,
                              ctypes.c_int, ctypes.c_int)
QUANTIZE_MAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)


def repack_mul(lib: ctypes.CDLL, op: str, block: str, inter_size: int, nb_cols: int, param_type: int):
    """ggml::cpu::repack::<op><block, inter_size, nb_cols, param_type>, op "gemm" or "gemv", by its mangled name."""
    return REPACK_MUL(_address(lib, f"_ZN4ggml3cpu6repack{len(op)}{op}I{len(block)}{block}Ll{inter_size}ELl{nb_cols}"
                                    f"EL9ggml_type{param_type}EEEviPfmPKvS7_ii"))


def quantize_mat(lib: ctypes.CDLL, inter_size: int, param_type: int):
    """ggml_quantize_mat_t<inter_size, param_type>: 4 activation rows into the interleaved block_q8_*x4 layout."""
    return QUANTIZE_MAT(_address(lib, f"_Z19ggml_quantize_mat_tILl{inter_size}EL9ggml_type{param_type}EEvPKfPvll"))


def _address(lib: ctypes.CDLL, symbol: str) -> int:
    # a prototype called with a function object would wrap it as a Python callback; it needs the address
    return ctypes.cast(getattr(lib, symbol), ctypes.c_void_p).value


class GgmlInitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


GGML_TYPE_F32 = 0


def ggml_mul_mat(lib: ctypes.CDLL, blocks, qtype: int, shape: tuple[int, int], x, n_threads: int = 2):
    """x (n, cols) float32 @ W.T through a real ggml graph (ggml_mul_mat + ggml_graph_compute_with_ctx) on the CPU
    backend: W (rows, cols) is a plain context tensor of type `qtype` holding `blocks` (no repack buffer, so K-quants
    take ggml's tiled matmul from 8 activation rows on). lib: open_ggml_cpu(); returns float32 (n, rows)."""
    import numpy as np

    base = ctypes.CDLL(os.path.join(os.path.dirname(libggml_cpu_path()), "libggml-base.so"))
    base.ggml_init.restype = ctypes.c_void_p
    base.ggml_init.argtypes = [GgmlInitParams]
    base.ggml_new_tensor_2d.restype = ctypes.c_void_p
    base.ggml_new_tensor_2d.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    base.ggml_mul_mat.restype = ctypes.c_void_p
    base.ggml_mul_mat.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    base.ggml_new_graph.restype = ctypes.c_void_p
    base.ggml_new_graph.argtypes = [ctypes.c_void_p]
    base.ggml_build_forward_expand.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    base.ggml_get_data.restype = ctypes.c_void_p
    base.ggml_get_data.argtypes = [ctypes.c_void_p]
    base.ggml_nbytes.restype = ctypes.c_size_t
    base.ggml_nbytes.argtypes = [ctypes.c_void_p]
    base.ggml_free.argtypes = [ctypes.c_void_p]
    lib.ggml_graph_compute_with_ctx.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]

    rows, cols = shape
    blocks = np.ascontiguousarray(blocks).view(np.uint8)
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    # tensors + graph + the work buffer (q8_K activations, 512 KiB tiled workspace per thread)
    mem = blocks.nbytes + 3 * x.nbytes + 4 * n * rows + (n_threads + 2) * (1 << 20) + (16 << 20)
    ctx = base.ggml_init(GgmlInitParams(mem, None, False))
    try:
        w = base.ggml_new_tensor_2d(ctx, qtype, cols, rows)
        assert base.ggml_nbytes(w) == blocks.nbytes, "block bytes do not match the ggml tensor size"
        ctypes.memmove(base.ggml_get_data(w), blocks.ctypes.data, blocks.nbytes)
        a = base.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, cols, n)
        ctypes.memmove(base.ggml_get_data(a), x.ctypes.data, x.nbytes)
        y = base.ggml_mul_mat(ctx, w, a)
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, y)
        status = lib.ggml_graph_compute_with_ctx(ctx, graph, n_threads)
        assert status == 0, f"ggml_graph_compute_with_ctx returned {status}"
        out = np.empty((n, rows), np.float32)
        ctypes.memmove(out.ctypes.data, base.ggml_get_data(y), out.nbytes)
        return out
    finally:
        base.ggml_free(ctx)
