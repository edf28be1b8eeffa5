"""A small CPU runtime for llama.cpp GGUF files: load a model, run it with a KV cache, sample, generate and chat.

    import runtime
    model = runtime.load_gguf("model.gguf", n_ctx=2048)
    cache = model.new_cache()
    logits = model.forward(model.tokenizer.encode("Hello"), cache)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from llmq.errors import LlmqError


def _numba_cache_dir() -> None:
    """Key numba's on-disk cache by all of the runtime's sources. numba revalidates a cached kernel against its own
    source file only, not against the kernels it inlines from other modules (decode.py's fused layer inlines
    kernels_avx2's dots, for one), so after an update a stale cached layer could run old arithmetic. A user's
    NUMBA_CACHE_DIR is kept (as a parent directory)."""
    from numba.core import config

    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.rglob("*.py")):
        h.update(f.read_bytes())
    base = os.environ.get("NUMBA_CACHE_DIR") or str(Path.home() / ".cache" / "llmq" / "numba")
    config.CACHE_DIR = os.path.join(base, h.hexdigest()[:12])


_numba_cache_dir()  # before any kernel module creates its cached dispatchers

from .gguf_file import open_gguf, open_layout, read_metadata, tensors  # noqa: E402
from .kvcache import CACHE_TYPES, KVCache  # noqa: E402
from .models import model_module  # noqa: E402


def load_gguf(path, *, n_ctx: int | None = None, cache_type_k: str = "f16", cache_type_v: str = "f16",
              threads: int | None = None):
    """Map a GGUF file and build its model (weights stay in the mapped file). n_ctx defaults to the training
    context, capped at 4096; the cache types and n_ctx are the defaults of `model.new_cache()`."""
    for name, cache_type in (("cache_type_k", cache_type_k), ("cache_type_v", cache_type_v)):
        if cache_type not in CACHE_TYPES:
            raise LlmqError(f"{name} {cache_type!r} is not one of {', '.join(CACHE_TYPES)}")
    _numba_target_without_scipy()
    from . import kernels

    kernels.set_num_threads(threads if threads is not None else kernels.physical_cores())
    reader = open_layout(path)
    meta = read_metadata(reader, lazy_strings=True)  # the vocabulary stays bytes until the tokenizer reads it
    module = model_module(meta.get("general.architecture", "?"))
    weights = tensors(reader)
    if "token_embd.weight" not in weights:
        raise LlmqError(f"{path} has no token_embd.weight tensor")
    args = module.ModelArgs.from_metadata(meta, vocab_size=weights["token_embd.weight"].shape[0])
    model = module.Model(args, weights)
    model.metadata = meta
    model.path = str(path)
    model.reader = reader  # the checked header (tensor infos); the weights keep the mapping alive
    if n_ctx is not None:
        if n_ctx < 1:
            raise LlmqError(f"n_ctx must be positive, got {n_ctx}")
        model.n_ctx = n_ctx
    model.cache_type_k, model.cache_type_v = cache_type_k, cache_type_v
    return model


def _numba_target_without_scipy() -> None:
    """Build numba's CPU target (done once, before the first kernel is compiled or loaded from its cache) with
    scipy.linalg hidden. Building it imports numba.np.arraymath, which imports scipy.linalg only to decide whether
    np.correlate/np.convolve inside numba code may call BLAS: ~13 MB resident (scipy.linalg and its LAPACK/BLAS
    libraries) that the runtime never uses. Without it numba takes its own loop for those two functions; np.dot and
    np.linalg in numba code still import scipy.linalg when they are compiled."""
    import sys

    if "scipy.linalg" in sys.modules or "numba.np.arraymath" in sys.modules:
        return  # already imported (by the caller or an earlier target build): nothing to save
    from numba.core.registry import cpu_target

    sys.modules["scipy.linalg"] = None  # `import scipy.linalg...` raises ImportError
    try:
        cpu_target.target_context.refresh()
    finally:
        del sys.modules["scipy.linalg"]


__all__ = ["load_gguf", "KVCache", "CACHE_TYPES", "read_metadata", "open_gguf", "open_layout", "tensors",
           "LlmqError"]
