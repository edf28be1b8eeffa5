"""Perplexity and KL divergence, with llama-perplexity's protocol, for either engine.

Protocol (tools/perplexity/perplexity.cpp): tokenise the whole text once (BOS if the vocabulary adds one), cut it
into n_ctx-token chunks, evaluate each chunk from an empty cache with its first token replaced by BOS (when the
vocabulary adds BOS), and score the second half: the logits at positions first..n_ctx-2 predict tokens first+1..
n_ctx-1, first = n_ctx/2. PPL = exp(mean NLL), its uncertainty = PPL * std(NLL)/sqrt(count-1).

`save_base` keeps, per scored position, the reference model's top-k log-probs (fp16) plus the probability mass of
the rest, instead of llama.cpp's full-vocabulary dump: KL(base||Q) is then computed exactly over the top-k and
with the tail grouped into one outcome (a lower bound that is tight when the top-k hold nearly all the mass).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import LlmqError

TOP_K = 64


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def make_chunks(tokens: Sequence[int], n_ctx: int, n_chunks: int | None, add_bos: bool, bos_id: int | None
                ) -> list[np.ndarray]:
    if n_ctx < 4:
        raise LlmqError(f"--ctx must be at least 4, got {n_ctx}")
    if len(tokens) < 2 * n_ctx:
        raise LlmqError(f"the text tokenises to {len(tokens)} tokens; at least {2 * n_ctx} are needed for "
                        f"--ctx {n_ctx}")
    n = len(tokens) // n_ctx
    if n_chunks:
        n = min(n, n_chunks)
    chunks = []
    for i in range(n):
        c = np.array(tokens[i * n_ctx:(i + 1) * n_ctx], dtype=np.int64)
        if add_bos:
            c[0] = bos_id
        chunks.append(c)
    return chunks


@dataclass
class ChunkScores:
    """Scored positions of one chunk: log-probs (n, vocab) and the targets (n,)."""
    logprobs: np.ndarray
    targets: np.ndarray


def score_chunks(logits_fn: Callable[[np.ndarray], np.ndarray], chunks: list[np.ndarray],
                 progress: bool = False) -> Iterator[ChunkScores]:
    it = chunks
    if progress:
        import sys

        from tqdm import tqdm
        it = tqdm(chunks, desc="perplexity", unit="chunk", disable=not sys.stderr.isatty())
    for c in it:
        first = len(c) // 2
        logits = np.asarray(logits_fn(c))
        if logits.shape[0] != len(c):
            raise AssertionError(f"engine returned {logits.shape[0]} logit rows for {len(c)} tokens")
        yield ChunkScores(log_softmax(logits[first:-1]), c[first + 1:])


@dataclass
class PerplexityResult:
    ppl: float
    ppl_err: float
    n_tokens: int
    n_chunks: int
    nll: np.ndarray = field(repr=False)


def _ppl(nll: np.ndarray) -> tuple[float, float]:
    mean = float(nll.mean())
    ppl = math.exp(mean)
    var = float((nll ** 2).mean() - mean * mean)
    return ppl, (ppl * math.sqrt(var / (len(nll) - 1)) if var > 0 and len(nll) > 1 else 0.0)


@dataclass
class KLDResult:
    ppl: float
    ppl_err: float
    ppl_base: float
    kld_mean: float
    kld_mean_err: float
    kld_median: float
    kld_p99: float
    kld_p999: float
    kld_max: float
    top1: float  # fraction of positions where both models' most likely token agree
    rms_dp: float  # RMS of the change in the probability of the correct token
    n_tokens: int


def evaluate(logits_fn, chunks, *, save_base: Path | None = None, kld_base: Path | None = None,
             progress: bool = False):
    """Perplexity over `chunks`; with `save_base`, also store the compact reference; with `kld_base`, compare with
    a stored reference (same text, ctx and tokenizer) and return KLDResult."""
    base = None
    if kld_base is not None:
        base = load_base(kld_base)
        if len(base["chunks"]) < len(chunks) or not np.array_equal(base["chunks"][: len(chunks)], np.stack(chunks)):
            raise LlmqError(f"{kld_base} was made from other tokens (different text, --ctx or tokenizer)")
    nlls, top_ids, top_lp, rest, kl, top1, dp = [], [], [], [], [], [], []
    pos = 0
    for sc in score_chunks(logits_fn, chunks, progress):
        n = len(sc.targets)
        rows = np.arange(n)
        nll = -sc.logprobs[rows, sc.targets]
        nlls.append(nll)
        if save_base is not None:
            idx = np.argpartition(-sc.logprobs, TOP_K, axis=1)[:, :TOP_K]
            lp = np.take_along_axis(sc.logprobs, idx, 1)
            order = np.argsort(-lp, axis=1)
            idx, lp = np.take_along_axis(idx, order, 1), np.take_along_axis(lp, order, 1)
            top_ids.append(idx.astype(np.int32))
            top_lp.append(lp.astype(np.float16))
            rest.append(np.clip(1.0 - np.exp(lp.astype(np.float16).astype(np.float64)).sum(1), 0.0, 1.0))
        if base is not None:
            b_ids = base["top_ids"][pos:pos + n]
            b_lp = base["top_logprobs"][pos:pos + n].astype(np.float64)
            b_rest = base["rest"][pos:pos + n]
            q_lp = np.take_along_axis(sc.logprobs, b_ids.astype(np.int64), 1)
            q_rest = np.clip(1.0 - np.exp(q_lp).sum(1), 1e-12, 1.0)
            p = np.exp(b_lp)
            k = (p * (b_lp - q_lp)).sum(1) + np.where(b_rest > 0, b_rest * (np.log(np.maximum(b_rest, 1e-12))
                                                                              - np.log(q_rest)), 0.0)
            kl.append(np.maximum(k, 0.0))
            top1.append(b_ids[:, 0] == sc.logprobs.argmax(1))
            dp.append(np.exp(-nll) - np.exp(-base["nll"][pos:pos + n]))
        pos += n
    nll = np.concatenate(nlls)
    ppl, err = _ppl(nll)
    if save_base is not None:
        np.savez_compressed(save_base, chunks=np.stack(chunks).astype(np.int32), nll=nll.astype(np.float32),
                            top_ids=np.concatenate(top_ids), top_logprobs=np.concatenate(top_lp),
                            rest=np.concatenate(rest).astype(np.float32))
        # np.savez adds .npz when missing; keep the name the user gave
        written = Path(str(save_base) + ".npz")
        if written.exists() and not Path(save_base).exists():
            written.rename(save_base)
    if base is None:
        return PerplexityResult(ppl, err, len(nll), len(chunks), nll)
    kl = np.concatenate(kl)
    ppl_base, _ = _ppl(base["nll"][: len(nll)].astype(np.float64))
    dp = np.concatenate(dp)
    return KLDResult(ppl=ppl, ppl_err=err, ppl_base=ppl_base, kld_mean=float(kl.mean()),
                     kld_mean_err=float(kl.std() / math.sqrt(max(1, len(kl) - 1))),
                     kld_median=float(np.median(kl)), kld_p99=float(np.percentile(kl, 99)),
                     kld_p999=float(np.percentile(kl, 99.9)), kld_max=float(kl.max()),
                     top1=float(np.concatenate(top1).mean()), rms_dp=float(np.sqrt((dp ** 2).mean())),
                     n_tokens=len(kl))


def load_base(path: Path) -> dict:
    try:
        with np.load(path) as z:
            return {k: z[k] for k in ("chunks", "nll", "top_ids", "top_logprobs", "rest")}
    except (OSError, KeyError, ValueError) as e:
        raise LlmqError(f"{path} is not a reference saved by `llmq ppl --save-base` ({e.__class__.__name__})") from None


# ---- engines --------------------------------------------------------------------------------------------------

def engine_logits_fn(engine) -> Callable[[np.ndarray], np.ndarray]:
    """All-position logits of a fresh sequence, from a runtime engine (native or llama.cpp)."""
    def fn(ids: np.ndarray) -> np.ndarray:
        engine.reset()
        if getattr(engine, "name", "") == "native":
            return engine.eval(ids.tolist(), all_logits=True)
        return engine.eval(ids.tolist())
    return fn


def open_engine(model: Path, engine: str, n_ctx: int, threads: int | None = None, act_quant: str = "none"):
    if engine == "native":
        from runtime.generate import NativeEngine

        native = NativeEngine.from_gguf(model, n_ctx=n_ctx, threads=threads)
        native.model.set_act_quant(act_quant)
        return native
    if act_quant != "none":
        raise LlmqError(f"--act-quant {act_quant} needs --engine native (llama.cpp quantises activations its own way)")
    if engine == "llama.cpp":
        from runtime.llamacpp_engine import LlamaCppEngine

        return LlamaCppEngine(model, n_ctx=n_ctx, threads=threads, logits_all=True)
    raise LlmqError(f"unknown engine {engine!r}; choose native or llama.cpp")


def tokenize_for_ppl(engine, text: str) -> tuple[list[int], bool, int | None]:
    tok = engine.tokenizer
    add_bos = bool(getattr(tok, "add_bos", False))
    return list(tok.encode(text, add_special=True, parse_special=False)), add_bos, getattr(tok, "bos_id", None)
