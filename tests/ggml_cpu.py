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
