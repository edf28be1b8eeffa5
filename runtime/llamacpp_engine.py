"""The engine interface of runtime.generate over llama.cpp (llama-cpp-python), so that generation, chat and the
parity tests can switch between the native runtime and the reference implementation (`--engine llama.cpp`)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from llmq import llamacpp_tools
from llmq.errors import LlmqError

from .generate import Engine

GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8}  # ggml_type ids for type_k / type_v


def _restore_omp_wait_policy() -> None:
    """runtime.kernels asks libgomp for sleeping workers (OMP_WAIT_POLICY=PASSIVE, a short GOMP_SPINCOUNT) for
    numba's threads; llama.cpp's ggml-cpu uses libgomp too and must run with its own default, so the variables are
    dropped again before llama_cpp loads libgomp (values the user set stay)."""
    from . import kernels

    if kernels.OMP_WAIT_POLICY_SET_HERE and os.environ.get("OMP_WAIT_POLICY") == "PASSIVE":
        del os.environ["OMP_WAIT_POLICY"]
    if kernels.GOMP_SPINCOUNT_SET_HERE and os.environ.get("GOMP_SPINCOUNT") == kernels.GOMP_SPINCOUNT:
        del os.environ["GOMP_SPINCOUNT"]


class LlamaCppTokenizer:
    """llama.cpp's own tokenizer behind the runtime.tokenizer interface."""

    def __init__(self, llm):
        import llama_cpp

        self.llm = llm
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.eog_ids = {i for i in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)}
        self.bos_id = int(llama_cpp.llama_vocab_bos(vocab))
        self.eos_id = int(llama_cpp.llama_vocab_eos(vocab))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self.add_eos = bool(llama_cpp.llama_vocab_get_add_eos(vocab))
        self.chat_template = llm.metadata.get("tokenizer.chat_template")

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special))

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.llm.detokenize(list(ids), special=not skip_special).decode("utf-8", "replace")

    def token_to_piece(self, token_id: int) -> bytes:
        return self.llm.detokenize([token_id], special=True)


class LlamaCppEngine(Engine):
    name = "llama.cpp"

    def __init__(self, model_path, *, n_ctx: int | None = None, threads: int | None = None,
                 cache_type_k: str = "f16", cache_type_v: str = "f16", logits_all: bool = True):
        _restore_omp_wait_policy()
        try:
            import llama_cpp
        except ImportError as e:
            raise LlmqError("the llama.cpp engine needs llama-cpp-python: pip install llama-cpp-python") from e
        llamacpp_tools.check_loaded_package(llama_cpp)
        if not Path(model_path).is_file():
            raise LlmqError(f"no such GGUF file: {model_path}")
        for cache_type in (cache_type_k, cache_type_v):
            if cache_type not in GGML_TYPES:
                raise LlmqError(f"cache type {cache_type!r} is not one of {', '.join(GGML_TYPES)}")
        super().__init__()
        kwargs = dict(model_path=str(model_path), n_ctx=n_ctx or 4096, n_threads=threads or os.cpu_count(),
                      logits_all=logits_all, verbose=False, type_k=GGML_TYPES[cache_type_k],
                      type_v=GGML_TYPES[cache_type_v],
                      # llama.cpp needs flash attention for a quantised V cache; otherwise keep its default (off)
                      flash_attn=cache_type_v not in ("f32", "f16"))
        try:
            with _quiet_stderr():
                self.llm = llama_cpp.Llama(**kwargs)
        except (ValueError, RuntimeError) as e:
            raise LlmqError(f"llama.cpp could not load {model_path}: {e}") from e
        self.n_ctx = self.llm.n_ctx()
        self.logits_all = logits_all
        self.tokenizer = LlamaCppTokenizer(self.llm)

    def _eval(self, ids: list[int]) -> np.ndarray:
        start = self.llm.n_tokens
        self.llm.eval(ids)
        if self.logits_all:
            return np.array(self.llm.scores[start : start + len(ids)], dtype=np.float32)
        import llama_cpp

        last = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(last, shape=(1, self.llm.n_vocab())).astype(np.float32)

    def _truncate(self, n: int) -> None:
        self.llm.n_tokens = n  # Llama.eval() drops cache cells from n_tokens on before decoding


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp prints its load log on fd 2 even with verbose=False in some builds."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)
