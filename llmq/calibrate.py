"""Calibrated quantisation: text -> tokens -> a layer-by-layer pass over the float model -> ggml tensors.

    tokens:  N windows of L tokens from the calibration text (HF tokenizer.json, fixed seed);
    pass:    for each layer, with only that layer's float weights and the hidden states (N, L, dim) in memory:
               1. run the float block on the hidden states, hooks collecting each linear input's statistics
                  (X^T X for GPTQ and AWQ's error measure, its diagonal = llama.cpp's imatrix, mean and max |x|);
               2. optionally fold SmoothQuant / AWQ scales into the float weights (the statistics follow);
               3. quantise every linear (importance RTN, or GPTQ) onto its ggml type;
               4. run the block again with the QUANTISED weights: the next layer calibrates on the inputs it will
                  really see (sequential, as GPTQ does);
             then the final norm's output gives the statistics of output.weight (or tied token_embd).

Methods: 'rtn' (imatrix RTN: scale search weighted by diag(X^T X)), 'gptq', 'awq' (AWQ scales then imatrix RTN),
'awq+gptq' (AWQ scales then GPTQ).
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as QT

from . import awq, fp4, gptq, quants, smooth as smoothquant
from .errors import LlmqError

log = logging.getLogger("llmq.calibrate")

METHODS = ("rtn", "awq", "gptq", "awq+gptq")
DEFAULT_SAMPLES = 64  # x DEFAULT_LEN tokens: 32k, > 20x the widest input (1536 in SmolLM2); 128 costs 2x the time
DEFAULT_LEN = 512
SEED = 1234


@dataclass
class CalibSettings:
    method: str
    text: Path
    samples: int = DEFAULT_SAMPLES
    length: int = DEFAULT_LEN
    smooth: float | None = None
    act_order: bool = False
    damp: float = gptq.DAMP
    seed: int = SEED
    clip: bool = False  # AWQ's clipping search (awq.search_clip); opt-in, see the note at CLIPPED

    def metadata(self) -> dict:
        """GGUF metadata recording how the file was made (values: str, int, float or bool)."""
        meta = {"llmq.method": self.method, "llmq.calib_sha256": file_sha256(self.text),
                "llmq.calib_samples": self.samples, "llmq.calib_len": self.length, "llmq.calib_seed": self.seed}
        if self.smooth is not None:
            meta["llmq.smooth_alpha"] = float(self.smooth)
        if "gptq" in self.method:
            meta.update({"llmq.gptq_damp": float(self.damp), "llmq.gptq_act_order": self.act_order})
        if "awq" in self.method:
            meta["llmq.awq_alphas"] = ",".join(f"{a:g}" for a in awq.ALPHAS)
            meta["llmq.awq_clip"] = bool(self.clip and self.method == "awq")
        return meta


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ text -> tokens

def calibration_tokens(model_dir: Path, text_path: Path, samples: int, length: int, seed: int = SEED) -> np.ndarray:
    """(samples, length) int32 token windows at random (seeded) offsets of the tokenised text."""
    from tokenizers import Tokenizer

    tok_file = Path(model_dir) / "tokenizer.json"
    if not tok_file.is_file():
        raise LlmqError(f"calibration needs the model's tokenizer.json, not found in {model_dir}")
    try:
        text = Path(text_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LlmqError(f"cannot read --calib {text_path}: {getattr(e, 'strerror', None) or e}") from None
    if samples < 1 or length < 2:
        raise LlmqError("--calib-samples must be >= 1 and --calib-len >= 2")
    tokenizer = Tokenizer.from_file(str(tok_file))
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    ids = np.concatenate([np.asarray(e.ids, np.int32) for e in
                          tokenizer.encode_batch([p + "\n\n" for p in paragraphs], add_special_tokens=False)]
                         or [np.zeros(0, np.int32)])
    if ids.size < length:
        raise LlmqError(f"calibration text has {ids.size} tokens, fewer than --calib-len {length}")
    rng = np.random.default_rng(seed)
    starts = rng.choice(ids.size - length + 1, size=samples, replace=ids.size - length + 1 < samples)
    return np.stack([ids[s:s + length] for s in np.sort(starts)])


# ------------------------------------------------------------------------------------------ input statistics

class InputStats:
    """Running statistics of the inputs x (n, cols) of one or more linears sharing them."""

    def __init__(self, cols: int):
        self.xtx = np.zeros((cols, cols), np.float64)
        self.abs_sum = np.zeros(cols, np.float64)
        self.abs_max = np.zeros(cols, np.float32)
        self.n = 0
        self._factor = None

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32).reshape(-1, self.xtx.shape[0])
        self.xtx += x.T @ x
        a = np.abs(x)
        self.abs_sum += a.sum(axis=0, dtype=np.float64)
        np.maximum(self.abs_max, a.max(axis=0), out=self.abs_max)
        self.n += x.shape[0]

    @property
    def hessian(self) -> np.ndarray:
        """X^T X / n (cols, cols) float64."""
        return self.xtx / max(self.n, 1)

    def inverse_hessian_factor(self, damp: float) -> tuple[np.ndarray, float]:
        """GPTQ's factor of this input's inverse Hessian, computed once for the linears sharing the input."""
        if self._factor is None or self._factor[0] != (self.n, damp):
            self._factor = ((self.n, damp), gptq.inverse_hessian_factor(self.hessian, damp))
        return self._factor[1]

    @property
    def importance(self) -> np.ndarray:
        """mean x^2 per column: llama.cpp's imatrix."""
        return np.diag(self.hessian).astype(np.float32)

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.n, 1)

    def divide_inputs(self, s: np.ndarray) -> None:
        """The statistics of x / s (after folding a scale s into the producer of x)."""
        s = np.asarray(s, np.float64)
        self._factor = None
        self.xtx /= np.outer(s, s)
        self.abs_sum /= s
        self.abs_max /= s.astype(np.float32)


# linear -> the statistics key of its input
INPUT_OF = {"attn_q": "attn_in", "attn_k": "attn_in", "attn_v": "attn_in", "attn_output": "attn_out",
            "ffn_gate": "ffn_in", "ffn_up": "ffn_in", "ffn_down": "ffn_down_in"}
HOOKED = ("attn_q", "attn_output", "ffn_gate", "ffn_down")  # one linear per distinct input


def model_args(spec, hp):
    from runtime.models.llama import NEOX_ROPE_ARCHS, ModelArgs

    rope_type = str(hp.rope.get("rope_type") or "default").lower()
    freq_scale = 1.0 / float(hp.rope["factor"]) if rope_type == "linear" else 1.0
    if rope_type not in ("default", "linear", "llama3"):
        raise LlmqError(f"calibration does not support rope type {rope_type!r} (supported: default, linear, llama3)")
    return ModelArgs(arch=spec.arch_name, n_layers=hp.n_layer, dim=hp.n_embd, hidden_dim=hp.n_ff,
                     n_heads=hp.n_head, n_kv_heads=hp.n_head_kv, head_dim=hp.head_dim, vocab_size=hp.n_vocab,
                     norm_eps=hp.rms_eps, rope_theta=hp.rope_theta, rope_dim=hp.head_dim,
                     rope_neox=spec.arch_name in NEOX_ROPE_ARCHS, rope_freq_scale=freq_scale, n_ctx_train=hp.n_ctx)


def collect_stats(block, hidden: np.ndarray) -> dict[str, InputStats]:
    """Run `block` on every sample of hidden (N, L, dim) with hooks; hidden is not modified."""
    stats: dict[str, InputStats] = {}
    linears = {"attn_q": block.attention.wq, "attn_output": block.attention.wo,
               "ffn_gate": block.feed_forward.w_gate, "ffn_down": block.feed_forward.w_down}

    def hook(key):
        def f(name, x):
            if key not in stats:
                stats[key] = InputStats(x.shape[-1])
            stats[key].add(x)
        return f

    for short, lin in linears.items():
        lin.input_hook = hook(INPUT_OF[short])
    try:
        for s in range(hidden.shape[0]):
            block(hidden[s], 0)
    finally:
        for lin in linears.values():
            lin.input_hook = None
    return stats


def run_block(block, hidden: np.ndarray) -> None:
    for s in range(hidden.shape[0]):
        hidden[s] = block(hidden[s], 0)


# --------------------------------------------------------------------------------------- scale folding (AWQ, SQ)

def fold_input_scale(w: dict, layer: int, group: str, s: np.ndarray, args) -> None:
    """Multiply the columns of the group's linears by s (per input column after expansion) and divide the
    producer of their input by s, in place on the layer's float weights dict w."""
    p = f"blk.{layer}."
    if group == "attn_in":
        w[p + "attn_norm.weight"] = w[p + "attn_norm.weight"] / s
        for n in ("attn_q", "attn_k", "attn_v"):
            w[p + n + ".weight"] = w[p + n + ".weight"] * s[None, :]
    elif group == "ffn_in":
        w[p + "ffn_norm.weight"] = w[p + "ffn_norm.weight"] / s
        for n in ("ffn_gate", "ffn_up"):
            w[p + n + ".weight"] = w[p + n + ".weight"] * s[None, :]
    elif group == "ffn_down_in":
        w[p + "ffn_up.weight"] = w[p + "ffn_up.weight"] / s[:, None]
        w[p + "ffn_down.weight"] = w[p + "ffn_down.weight"] * s[None, :]
    elif group == "attn_out":  # s per kv channel
        expand = awq.gqa_expand(args.n_heads, args.n_kv_heads, args.head_dim)
        w[p + "attn_v.weight"] = w[p + "attn_v.weight"] / s[:, None]
        if p + "attn_v.bias" in w:
            w[p + "attn_v.bias"] = w[p + "attn_v.bias"] / s
        w[p + "attn_output.weight"] = w[p + "attn_output.weight"] * s[expand][None, :]
    else:
        raise ValueError(group)
    for k in list(w):
        if k.startswith(p):
            w[k] = np.ascontiguousarray(w[k], np.float32)


GROUP_LINEARS = {"attn_in": ("attn_q", "attn_k", "attn_v"), "attn_out": ("attn_output",),
                 "ffn_in": ("ffn_gate", "ffn_up"), "ffn_down_in": ("ffn_down",)}


def apply_awq(w: dict, layer: int, stats: dict[str, InputStats], qtypes: dict[str, QT], args) -> dict[str, float]:
    """Search and fold AWQ scales for the four input groups of a layer; returns group -> chosen alpha."""
    p = f"blk.{layer}."
    chosen = {}
    for group, names in GROUP_LINEARS.items():
        st = stats[group]
        weights = [w[p + n + ".weight"] for n in names]
        types = [qtypes[p + n + ".weight"] for n in names]
        if all(t not in quants.SPECS for t in types):
            continue
        if group == "attn_out":
            expand = awq.gqa_expand(args.n_heads, args.n_kv_heads, args.head_dim)
            n_params = args.n_kv_heads * args.head_dim
            choice = awq.search_scale(weights, types, st.hessian, awq.per_parameter_mean(st.mean_abs, expand, n_params),
                                      expand=expand, seed=layer)
            fold_input_scale(w, layer, group, choice.scale, args)
            st.divide_inputs(choice.scale[expand])
        else:
            choice = awq.search_scale(weights, types, st.hessian, st.mean_abs, seed=layer)
            fold_input_scale(w, layer, group, choice.scale, args)
            st.divide_inputs(choice.scale)
        chosen[group] = choice.alpha
    return chosen


# Measured on SmolLM2 (permuted) layer 10, Q4_0, 16 windows: clipping lowers the calibration output error of a few
# linears by < 1% and raises the held-out one by 0-2% (ggml's own scale search already trims each block's range
# by error), so it is opt-in (--awq-clip).
CLIPPED = ("attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")  # not q, k: see awq


def apply_clip(w: dict, layer: int, stats: dict[str, InputStats], qtypes: dict[str, QT]) -> dict[str, float]:
    """AWQ's clipping search on the layer's linears (in place); returns linear -> share of groups clipped."""
    p = f"blk.{layer}."
    shares = {}
    for short in CLIPPED:
        name = p + short + ".weight"
        if qtypes[name] not in quants.SPECS:
            continue
        w[name], ratio = awq.search_clip(w[name], qtypes[name], stats[INPUT_OF[short]].hessian)
        shares[short] = round(float((ratio < 1).mean()), 3)
    return shares


def apply_smooth(w: dict, layer: int, stats: dict[str, InputStats], alpha: float, args) -> None:
    p = f"blk.{layer}."
    for group in ("attn_in", "ffn_in"):
        s = smoothquant.smooth_scales(stats[group].abs_max, [w[p + n + ".weight"] for n in GROUP_LINEARS[group]],
                                      alpha)
        fold_input_scale(w, layer, group, s, args)
        stats[group].divide_inputs(s)


# ------------------------------------------------------------------------------------------------ quantisation

def quantize_linear(weight: np.ndarray, qtype: QT, stats: InputStats | None, use_gptq: bool, settings: CalibSettings,
                    encode: Callable[[np.ndarray, QT], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(ggml bytes, dequantised float32 values) of one weight."""
    if qtype in quants.SPECS and stats is not None:
        if use_gptq:
            return gptq.gptq_quantize(weight, stats.hessian, qtype, act_order=settings.act_order, damp=settings.damp,
                                      factor=None if settings.act_order else stats.inverse_hessian_factor(settings.damp))
        data = quants.quantize(weight, qtype, importance=stats.importance)
    else:
        data = encode(weight, qtype)
    return data, quants.dequantize(data, qtype).reshape(weight.shape)


def _quantize_fp4(weight, name, qtype, stats, use_gptq, settings, spec, out) -> tuple[np.ndarray, np.ndarray]:
    """NVFP4/MXFP4: with a searched tensor scale where llama.cpp applies one, stored in out as `<name>.scale`
    (the converter writes it from there); the dequantised weight includes it, so later layers calibrate on it."""
    scaled = fp4.applies_tensor_scale(spec.arch_name, name, qtype)
    data, deq, s = fp4.quantize_linear(weight, qtype, stats.hessian, use_gptq, settings.damp,
                                       "search" if scaled else 1.0)
    if scaled:
        out[fp4.scale_tensor_name(name)] = np.array([s], np.float32).view(np.uint8)
    return data, deq.reshape(weight.shape)


@dataclass
class CalibReport:
    awq_alphas: dict[int, dict[str, float]] = field(default_factory=dict)
    clipped: dict[int, dict[str, float]] = field(default_factory=dict)  # layer -> linear -> share of groups clipped


def quantize_calibrated(plans: list, spec, hp, tokens: np.ndarray, settings: CalibSettings,
                        encode: Callable[[np.ndarray, QT, str], np.ndarray], progress: bool = False,
                        report: CalibReport | None = None) -> dict[str, np.ndarray]:
    """GGUF name -> encoded bytes for every planned tensor, calibrated layer by layer (see module docstring).
    `encode(w, qtype, name)` is the converter's plain encoder (used for float and uncalibrated tensors)."""
    from runtime.models.llama import RMSNorm, Rope, TransformerBlock

    if settings.method not in METHODS:
        raise LlmqError(f"unknown --method {settings.method!r}; choose one of {', '.join(METHODS)}")
    use_awq = settings.method in ("awq", "awq+gptq")
    use_gptq = settings.method in ("gptq", "awq+gptq")
    args = model_args(spec, hp)
    by_name = {p.name: p for p in plans}
    qtypes = {p.name: p.qtype for p in plans}
    out: dict[str, np.ndarray] = {}
    report = report if report is not None else CalibReport()

    rope_freqs = by_name["rope_freqs.weight"].read() if "rope_freqs.weight" in by_name else None
    rope = Rope(args, rope_freqs)
    hidden = by_name["token_embd.weight"].read()[tokens]  # (N, L, dim) float32; only the rows used
    hidden = np.ascontiguousarray(hidden, np.float32)

    layers = range(hp.n_layer)
    if progress:
        from tqdm import tqdm
        layers = tqdm(layers, desc=f"calibrate {settings.method}", unit="layer", leave=False,
                      disable=not sys.stderr.isatty())
    for i in layers:
        prefix = f"blk.{i}."
        names = [n for n in by_name if n.startswith(prefix)]
        w = {n: np.ascontiguousarray(by_name[n].read(), np.float32) for n in names}
        t0 = time.perf_counter()
        stats = collect_stats(TransformerBlock(args, i, w, rope), hidden)
        t1 = time.perf_counter()
        if settings.smooth is not None:
            apply_smooth(w, i, stats, settings.smooth, args)
        if use_awq:
            report.awq_alphas[i] = apply_awq(w, i, stats, qtypes, args)
            if settings.clip and not use_gptq:
                report.clipped[i] = apply_clip(w, i, stats, qtypes)
        t2 = time.perf_counter()
        wq = {}
        for n in names:
            m = n[len(prefix):].split(".")
            key = INPUT_OF.get(m[0]) if m[-1] == "weight" else None
            if key is None:  # norms, biases
                out[n] = encode(w[n], qtypes[n], n)
                wq[n] = w[n]
                continue
            if qtypes[n] in fp4.FP4_TYPES:
                data, deq = _quantize_fp4(w[n], n, qtypes[n], stats[key], use_gptq, settings, spec, out)
            else:
                data, deq = quantize_linear(w[n], qtypes[n], stats[key], use_gptq, settings,
                                            lambda a, t, n=n: encode(a, t, n))
            out[n] = data
            wq[n] = deq
        del w, stats
        t3 = time.perf_counter()
        run_block(TransformerBlock(args, i, wq, rope), hidden)
        del wq
        log.info("layer %d: stats %.1fs, scales %.1fs, quantise %.1fs, forward %.1fs%s%s", i, t1 - t0, t2 - t1,
                 t3 - t2, time.perf_counter() - t3, f", awq alphas {report.awq_alphas[i]}" if use_awq else "",
                 f", clipped {report.clipped[i]}" if i in report.clipped else "")

    final = InputStats(hp.n_embd)
    norm = RMSNorm(by_name["output_norm.weight"].read(), hp.rms_eps)
    for s in range(hidden.shape[0]):
        final.add(norm(hidden[s]))
    del hidden
    head = "token_embd.weight" if hp.tied_embeddings else "output.weight"
    for n, p in by_name.items():
        if n in out:
            continue
        if n == head:
            # a tied embedding is also the input table: importance RTN (GPTQ would trade its row error for output error)
            gp = use_gptq and not hp.tied_embeddings
            if p.qtype in fp4.FP4_TYPES:
                out[n] = _quantize_fp4(p.read(), n, p.qtype, final, gp, settings, spec, out)[0]
            else:
                out[n] = quantize_linear(p.read(), p.qtype, final, gp, settings,
                                         lambda a, t, n=n: encode(a, t, n))[0]
        else:
            out[n] = encode(p.read(), p.qtype, n)
    return out
