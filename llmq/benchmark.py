"""`llmq bench`: prefill and decode speed and peak memory of one GGUF file on both engines, in the same run.

Measured the way llama-bench does: prefill = one batch of n_prompt tokens from an empty cache (pp), decode =
n_gen greedy tokens one at a time from an empty cache after one start token (tg), both after an untimed warm-up
(which also compiles the native engine's numba kernels, cached on disk after the first run). Each engine runs in
its own Python subprocess, so its peak RSS (ru_maxrss: the interpreter, the libraries and the model) is its own.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from .errors import LlmqError

ENGINES = ("native", "llama.cpp")
# any text will do: speed does not depend on which tokens are processed
FILLER = ("The Congress shall have power to lay and collect taxes, duties, imposts and excises, to pay the debts "
          "and provide for the common defence and general welfare of the United States. ")


def time_engine(model: Path, engine_name: str, *, ctx: int = 512, n_prompt: int = 512, n_gen: int = 64,
                threads: int | None = None) -> dict:
    """Load `model` on one engine in this process and time prefill and decode; tokens/s and seconds."""
    import numpy as np

    if n_prompt < 1 or n_gen < 1:
        raise LlmqError("--n-prompt and --n-gen must be positive")
    if n_prompt > ctx or n_gen + 1 > ctx:
        raise LlmqError(f"--ctx {ctx} must hold --n-prompt {n_prompt} and --n-gen {n_gen} + 1 tokens")
    t0 = time.perf_counter()
    if engine_name == "native":
        from runtime.generate import NativeEngine

        engine = NativeEngine.from_gguf(model, n_ctx=ctx, threads=threads)
    elif engine_name == "llama.cpp":
        from runtime.llamacpp_engine import LlamaCppEngine

        engine = LlamaCppEngine(model, n_ctx=ctx, threads=threads, logits_all=False)
    else:
        raise LlmqError(f"unknown engine {engine_name!r}; choose from {', '.join(ENGINES)}")
    load_s = time.perf_counter() - t0

    tok = engine.tokenizer
    ids: list[int] = []
    while len(ids) < n_prompt:
        ids += tok.encode(FILLER, add_special=False)
    prompt = ids[:n_prompt]
    start = [tok.bos_id if tok.bos_id is not None and tok.bos_id >= 0 else prompt[0]]

    engine.reset()  # warm-up: a short batch, then two single tokens
    logits = engine.eval(prompt[:8])[-1]
    for _ in range(2):
        logits = engine.eval([int(np.argmax(logits))])[-1]

    engine.reset()
    t0 = time.perf_counter()
    engine.eval(prompt)
    prefill_s = time.perf_counter() - t0

    engine.reset()
    logits = engine.eval(start)[-1]
    t0 = time.perf_counter()
    for _ in range(n_gen):
        logits = engine.eval([int(np.argmax(logits))])[-1]
    decode_s = time.perf_counter() - t0
    return {"engine": engine_name, "load_s": load_s, "n_prompt": n_prompt, "prefill_s": prefill_s,
            "prefill_tps": n_prompt / prefill_s, "n_gen": n_gen, "decode_s": decode_s, "decode_tps": n_gen / decode_s,
            "threads": threads or os.cpu_count()}


def peak_rss_mib() -> float:
    """This process's peak resident memory. On Linux VmHWM, which belongs to the address space made at exec;
    ru_maxrss is not usable there, it carries over the RSS of the parent the process was forked from."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB elsewhere


def _worker(argv: list[str]) -> None:
    """Subprocess entry: time one engine, print the result (with this process's peak RSS) as one JSON line."""
    model, engine_name, ctx, n_prompt, n_gen, threads = argv
    try:
        res = time_engine(Path(model), engine_name, ctx=int(ctx), n_prompt=int(n_prompt), n_gen=int(n_gen),
                          threads=int(threads) or None)
    except LlmqError as e:
        print("@@BENCH " + json.dumps({"error": str(e)}), flush=True)
        sys.exit(2)
    res["peak_rss_mib"] = peak_rss_mib()
    print("@@BENCH " + json.dumps(res), flush=True)


def bench(model: str | Path, engines=ENGINES, *, ctx: int = 512, n_prompt: int = 512, n_gen: int = 64,
          threads: int | None = None) -> list[dict]:
    """Each engine in its own subprocess, one after the other (so they do not compete for the cores)."""
    model = Path(model)
    if not model.is_file():
        raise LlmqError(f"no such GGUF file: {model}")
    results = []
    for engine_name in engines:
        # the child must import this llmq (and runtime), even when run from a checkout that is not installed
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, "-c", "import sys; from llmq.benchmark import _worker; "
                               "_worker(sys.argv[1:])", str(model), engine_name, str(ctx), str(n_prompt), str(n_gen),
                               str(threads or 0)], capture_output=True, text=True, env=env)
        line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("@@BENCH ")), None)
        if line is None:
            raise LlmqError(f"the {engine_name} benchmark process failed (exit {proc.returncode}): "
                            + " | ".join(proc.stderr.strip().splitlines()[-3:]))
        res = json.loads(line[len("@@BENCH "):])
        if "error" in res:
            raise LlmqError(res["error"])
        results.append(res)
    return results


def table(model: Path, results: list[dict]) -> str:
    r0 = results[0]
    lines = [f"{model.name} ({model.stat().st_size / 2**20:.1f} MiB), {r0['threads']} threads",
             f"| engine | load s | prefill pp{r0['n_prompt']} tok/s | decode tg{r0['n_gen']} tok/s | peak RSS MiB |",
             "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['engine']} | {r['load_s']:.2f} | {r['prefill_tps']:.1f} | {r['decode_tps']:.1f} "
                     f"| {r['peak_rss_mib']:.0f} |")
    if len(results) == 2:
        a, b = results
        lines.append(f"| {a['engine']} / {b['engine']} | | {a['prefill_tps'] / b['prefill_tps']:.2f} "
                     f"| {a['decode_tps'] / b['decode_tps']:.2f} | {a['peak_rss_mib'] / b['peak_rss_mib']:.2f} |")
    return "\n".join(lines)


def cmd_bench(args) -> int:
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for e in engines:
        if e not in ENGINES:
            raise LlmqError(f"unknown engine {e!r}; choose from {', '.join(ENGINES)}")
    results = bench(args.model, engines, ctx=args.ctx, n_prompt=args.n_prompt, n_gen=args.n_gen,
                    threads=args.threads)
    print(json.dumps(results, indent=1) if args.json else table(Path(args.model), results))
    return 0


def register(subparsers) -> None:
    b = subparsers.add_parser("bench", help="prefill / decode tok/s and peak memory, native vs llama.cpp",
                              description="Time prefill (n-prompt tokens in one batch) and decode (n-gen greedy "
                                          "tokens) of a GGUF file on each engine, each in its own process.")
    b.add_argument("model", metavar="MODEL.gguf")
    b.add_argument("--engines", default=",".join(ENGINES), help="default: native,llama.cpp")
    b.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all)")
    b.add_argument("-c", "--ctx", type=int, default=512, help="KV cache size in tokens (default 512)")
    b.add_argument("-p", "--n-prompt", type=int, default=512, help="prefill tokens (default 512)")
    b.add_argument("-n", "--n-gen", type=int, default=64, help="decode tokens (default 64)")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.set_defaults(func=cmd_bench)
