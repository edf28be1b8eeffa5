"""`--auto-fallback BPW`: spend a bits-per-weight budget on the tensors whose quantisation hurts most.

    measure:   one float pass over (the first SAMPLES of) the calibration windows, layer by layer (only that layer's weights and the
               hidden states in memory), collecting each linear input's X^T X; for every quantised linear and
               every type it could take (its mix type and the types above it on the ladder), its sensitivity:
                   nsr(W, t) = sum_rows (W - Q_t(W)) H (W - Q_t(W))^T  /  sum_rows W H W^T
               the output noise-to-signal ratio of that linear alone quantised to t (Q_t: ggml's importance-
               weighted rounding, the fast stand-in AWQ's search also uses). A ratio, so linears of different
               layers and sizes compare on one scale.
    allocate:  start from the mix's types; while the file stays within BPW x (number of weights) bits, apply the
               upgrade (tensor, higher type) with the largest reduction of summed nsr per extra bit (greedy
               knapsack). The output head (or tied embedding) is scored on the final norm's output.

The choices are printed (progress) and stored in the GGUF metadata (`llmq.auto_fallback_bpw`,
`llmq.auto_fallback`: "name=TYPE,..." for every tensor moved off its mix type).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from . import awq, calibrate
from .errors import LlmqError

log = logging.getLogger("llmq.fallback")

# the types a tensor may be moved to, any of them above its mix type in bits per weight
SAMPLES = 16  # calibration windows for the sensitivity pass (a ranking, not a fit: fewer than the methods use)
LADDER = (QT.Q2_K, QT.Q3_K, QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q5_0, QT.Q5_1, QT.Q5_K, QT.Q6_K, QT.Q8_0)


def bits_per_weight(qtype: QT) -> float:
    block, size = GGML_QUANT_SIZES[qtype]
    return 8.0 * size / block


def candidates(qtype: QT, n_cols: int) -> list[QT]:
    """qtype and the ladder types above it that fit rows of n_cols values, by increasing bits per weight."""
    above = [t for t in LADDER if bits_per_weight(t) > bits_per_weight(qtype) and n_cols % GGML_QUANT_SIZES[t][0] == 0]
    return [qtype] + sorted(above, key=bits_per_weight)


def tensor_bits(shape: tuple[int, ...], qtype: QT) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return 8 * int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


@dataclass
class Allocation:
    budget_bpw: float
    types: dict[str, QT]                    # every plan's final type
    upgraded: dict[str, tuple[QT, QT]]      # name -> (mix type, chosen type)
    bpw: float                              # of the whole file's tensors
    base_bpw: float
    sensitivity: dict[str, dict[QT, float]] = field(default_factory=dict)

    def metadata(self) -> dict:
        return {"llmq.auto_fallback_bpw": float(self.budget_bpw),
                "llmq.auto_fallback": ",".join(f"{n}={t.name}" for n, (_, t) in self.upgraded.items()) or "none"}

    def summary(self) -> list[str]:
        lines = [f"auto-fallback: {self.base_bpw:.3f} -> {self.bpw:.3f} bits/weight (budget {self.budget_bpw:g}), "
                 f"{len(self.upgraded)} tensor(s) upgraded"]
        for n, (a, b) in self.upgraded.items():
            s = self.sensitivity.get(n, {})
            lines.append(f"  {n}: {a.name} -> {b.name} (nsr {s.get(a, float('nan')):.2e} -> {s.get(b, float('nan')):.2e})")
        return lines


def allocate(shapes: dict[str, tuple[int, ...]], base: dict[str, QT], sensitivity: dict[str, dict[QT, float]],
             budget_bpw: float) -> Allocation:
    """Greedy knapsack over (tensor, type) upgrades, see the module docstring. shapes/base cover every tensor of
    the file; sensitivity only the ones that may move (name -> type -> nsr, the mix type included)."""
    n_weights = sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values())
    types = dict(base)
    bits = sum(tensor_bits(shapes[n], t) for n, t in types.items())
    base_bpw = bits / n_weights
    budget = budget_bpw * n_weights
    if bits > budget:
        raise LlmqError(f"--auto-fallback {budget_bpw:g}: the file type alone needs {base_bpw:.3f} bits per weight; "
                        "give a larger budget or a smaller --type")
    while True:
        best = None
        for n, sens in sensitivity.items():
            cur = types[n]
            for t, s in sens.items():
                extra = tensor_bits(shapes[n], t) - tensor_bits(shapes[n], cur)
                gain = sens[cur] - s
                if extra <= 0 or gain <= 0 or bits + extra > budget:
                    continue
                if best is None or gain / extra > best[0]:
                    best = (gain / extra, n, t, extra)
        if best is None:
            break
        _, n, t, extra = best
        types[n] = t
        bits += extra
    upgraded = {n: (base[n], t) for n, t in types.items() if t != base[n]}
    return Allocation(budget_bpw, types, upgraded, bits / n_weights, base_bpw, sensitivity)


def nsr(w: np.ndarray, qtype: QT, H: np.ndarray, signal: float) -> float:
    wq = awq.fake_quantize(w, qtype, np.clip(np.diag(H), 0, None).astype(np.float32))
    return awq.layer_output_error(w, wq, H) / max(signal, 1e-30)


def linear_sensitivity(w: np.ndarray, types: list[QT], H: np.ndarray) -> dict[QT, float]:
    w = np.ascontiguousarray(w, np.float32)
    signal = awq.layer_output_error(w, np.zeros_like(w), H)
    return {t: nsr(w, t, H, signal) for t in types}


def measure_sensitivity(plans: list, spec, hp, tokens: np.ndarray, progress: bool = False
                        ) -> dict[str, dict[QT, float]]:
    """name -> {candidate type: nsr} for every quantised linear (and the output head), from a float pass."""
    from runtime.models.llama import RMSNorm, Rope, TransformerBlock

    from . import quants

    args = calibrate.model_args(spec, hp)
    by_name = {p.name: p for p in plans}
    rope = Rope(args, by_name["rope_freqs.weight"].read() if "rope_freqs.weight" in by_name else None)
    hidden = np.ascontiguousarray(by_name["token_embd.weight"].read()[tokens], np.float32)
    out: dict[str, dict[QT, float]] = {}

    def score(name, H):
        p = by_name[name]
        if p.qtype not in quants.SPECS:
            return
        types = candidates(p.qtype, p.shape[-1])
        if len(types) > 1:
            out[name] = linear_sensitivity(p.read(), types, H)

    layers = range(hp.n_layer)
    if progress:
        from tqdm import tqdm
        layers = tqdm(layers, desc="auto-fallback sensitivity", unit="layer", leave=False,
                      disable=not sys.stderr.isatty())
    for i in layers:
        prefix = f"blk.{i}."
        w = {n: np.ascontiguousarray(p.read(), np.float32) for n, p in by_name.items() if n.startswith(prefix)}
        block = TransformerBlock(args, i, w, rope)
        stats = calibrate.collect_stats(block, hidden)
        for short, key in calibrate.INPUT_OF.items():
            score(prefix + short + ".weight", stats[key].hessian)
        calibrate.run_block(block, hidden)
        del w, block, stats
    final = calibrate.InputStats(hp.n_embd)
    norm = RMSNorm(by_name["output_norm.weight"].read(), hp.rms_eps)
    for s in range(hidden.shape[0]):
        final.add(norm(hidden[s]))
    score("token_embd.weight" if hp.tied_embeddings else "output.weight", final.hessian)
    return out


def auto_fallback(plans: list, spec, hp, tokens: np.ndarray, budget_bpw: float, progress: bool = False
                  ) -> Allocation:
    """Measure, allocate and set the plans' types in place; returns the allocation."""
    if not budget_bpw > 0:
        raise LlmqError(f"--auto-fallback {budget_bpw}: the budget must be a positive number of bits per weight")
    shapes = {p.name: p.shape for p in plans}
    base = {p.name: p.qtype for p in plans}
    n_weights = sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values())
    base_bits = sum(tensor_bits(shapes[n], t) for n, t in base.items())
    if base_bits > budget_bpw * n_weights:  # fail before the (long) measurement
        allocate(shapes, base, {}, budget_bpw)
    sens = measure_sensitivity(plans, spec, hp, tokens, progress)
    alloc = allocate(shapes, base, sens, budget_bpw)
    for p in plans:
        p.qtype = alloc.types[p.name]
    for line in alloc.summary():
        log.info(line)
        if progress:
            print(line, flush=True)
    return alloc
