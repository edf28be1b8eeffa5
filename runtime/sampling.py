"""Token sampling with llama.cpp's default chain and defaults:

    repeat penalty (last n) -> top-k -> top-p -> min-p -> temperature -> draw

A temperature <= 0 means greedy decoding (argmax after the penalty). Each filter works on the candidates sorted by
logit, best first, and always keeps at least one token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class SamplerParams:
    temperature: float = 0.8
    top_k: int = 40          # <= 0: off
    top_p: float = 0.95      # >= 1: off
    min_p: float = 0.05      # <= 0: off
    repeat_penalty: float = 1.0  # 1: off
    repeat_last_n: int = 64  # 0: off, -1: the whole history
    seed: int | None = None  # None: a fresh random seed


def apply_repeat_penalty(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    """llama.cpp's repetition penalty: every token seen in `recent` gets its logit divided by the penalty if
    positive, multiplied if negative (so it always becomes less likely), once however often it occurred."""
    if penalty == 1.0 or len(recent) == 0:
        return logits
    out = logits.copy()
    seen = np.unique(np.asarray(recent, dtype=np.int64))
    out[seen] = np.where(out[seen] > 0, out[seen] / penalty, out[seen] * penalty)
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


def top_k_candidates(logits: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest logits (all ids if k <= 0), sorted by logit, best first."""
    if 0 < k < logits.size:
        ids = np.argpartition(-logits, k - 1)[:k]
    else:
        ids = np.arange(logits.size)
    return ids[np.argsort(-logits[ids], kind="stable")]


def top_p_cut(sorted_logits: np.ndarray, p: float) -> int:
    """How many of the sorted candidates to keep: the smallest prefix whose probability mass reaches p."""
    if p >= 1.0:
        return sorted_logits.size
    cumulative = np.cumsum(softmax(sorted_logits))
    return int(min(np.searchsorted(cumulative, p) + 1, sorted_logits.size))


def min_p_cut(sorted_logits: np.ndarray, min_p: float) -> int:
    """How many of the sorted candidates have probability >= min_p times the best one's."""
    if min_p <= 0.0:
        return sorted_logits.size
    threshold = sorted_logits[0] + np.log(min_p)
    return max(1, int(np.count_nonzero(sorted_logits >= threshold)))


class Sampler:
    """sampler(logits, history) -> token id. The random generator is seeded once, so the same seed and the same
    logits give the same tokens."""

    def __init__(self, params: SamplerParams | None = None, **overrides):
        self.params = params or SamplerParams()
        for name, value in overrides.items():
            if not hasattr(self.params, name):
                raise TypeError(f"unknown sampler parameter {name}")
            setattr(self.params, name, value)
        self.rng = np.random.default_rng(self.params.seed)

    def candidates(self, logits: np.ndarray, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, probabilities) the next token is drawn from, after every filter and the temperature."""
        p = self.params
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)
        if p.repeat_last_n != 0 and len(history):
            recent = history if p.repeat_last_n < 0 else history[-p.repeat_last_n:]
            logits = apply_repeat_penalty(logits, recent, p.repeat_penalty)
        if p.temperature <= 0.0:
            return np.array([int(np.argmax(logits))]), np.ones(1, np.float32)
        ids = top_k_candidates(logits, p.top_k)
        kept = logits[ids]
        kept = kept[: top_p_cut(kept, p.top_p)]
        kept = kept[: min_p_cut(kept, p.min_p)]
        ids = ids[: kept.size]
        return ids, softmax(kept.astype(np.float64) / p.temperature)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        ids, probs = self.candidates(logits, history)
        if ids.size == 1:
            return int(ids[0])
        return int(ids[self.rng.choice(ids.size, p=probs)])
