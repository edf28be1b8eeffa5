"""`llmq compare`: quant levels side by side, on perplexity and KL divergence, across producers and engines.

    build     SRC (HF directory) -> llmq F16 (the reference) and one file per (method, type) by llmq's converter;
              with --with-llama-quantize also llama.cpp's convert_hf_to_gguf F16 and llama-quantize of the same
              types (and, with --calib, llama-quantize with an imatrix from llama-imatrix on that text)
    score     per engine: the llmq F16 file's log-probs are saved as the base (llmq.evaluate save_base), every
              file is scored against it (PPL ± err, mean / p99 KLD, same top token), and a short greedy
              generation is timed (decode tok/s)
    measure   file size and bits per weight (tensor data bits / weights, from the GGUF tensor table)
    report    report.json (the records), report.md (a table generated from the same records), report.png

Everything lands in --out; files already there are reused, and scores are cached in scores.json keyed by the file,
engine, text, ctx and chunks, so a rerun only does what changed. Delete a file to rebuild it.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import LlmqError

DEFAULT_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")
# llmq methods: 'rtn' is plain round-to-nearest; the others need --calib ('rtn+imatrix' = RTN whose scale search is
# weighted by the calibration activations, llama.cpp's imatrix idea; 'awq', 'gptq', 'awq+gptq' see llmq.calibrate)
METHODS = ("rtn", "rtn+imatrix", "awq", "gptq", "awq+gptq")
ENGINES = ("native", "llama.cpp")
LLAMACPP = "llama.cpp"
LLAMACPP_IMATRIX = "llama.cpp+imatrix"
DECODE_PROMPT_TOKENS = 16


@dataclass
class GgufFile:
    path: Path
    producer: str  # "llmq rtn", "llmq awq+gptq", "llama.cpp", "llama.cpp+imatrix"
    ftype: str
    reference: bool = False  # the llmq F16 file every other file's KLD is measured against


# ---- build -----------------------------------------------------------------------------------------------------

def _progress(iterable, desc: str, total: int | None = None, enabled: bool = True):
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="file", file=sys.stderr,
                disable=not (enabled and sys.stderr.isatty()))


def _convert(src: Path, out: Path, ftype: str, method: str, calib: Path | None, calib_samples: int | None) -> None:
    from .convert import convert

    kwargs = {}
    if method != "rtn":
        params = inspect.signature(convert).parameters
        if "method" not in params or "calib" not in params:
            raise LlmqError(f"this llmq's converter has no calibrated methods; --methods {method} is unavailable")
        kwargs = dict(method=method.replace("rtn+imatrix", "rtn"), calib=calib, calib_samples=calib_samples)
    convert(src, out, ftype, force=True, progress=False, **kwargs)


def _llamacpp_step(cmd_fn, out: Path, what: str) -> None:
    """Run a llama.cpp tool that writes `out`, atomically (a crash leaves no half file for the next run to reuse)."""
    from . import llamacpp_tools as lt
    from .atomic import atomic_output

    with atomic_output(out, force=True) as tmp:
        lt.run(cmd_fn(tmp), what)


def build_files(src: Path, out: Path, types: Sequence[str], methods: Sequence[str] = ("rtn",), *,
                with_llama_quantize: bool = False, calib: Path | None = None, calib_samples: int | None = None,
                threads: int | None = None, progress: bool = True) -> list[GgufFile]:
    """Make (or reuse) every file of the comparison in `out`; the llmq F16 reference comes first."""
    from . import llamacpp_tools as lt

    threads = threads or os.cpu_count() or 2
    # (output path, how to make it, the model file it is or None for intermediate data), in dependency order
    steps: list[tuple[Path, object, GgufFile | None]] = []

    def model(f: GgufFile, make) -> None:
        steps.append((f.path, make, f))

    model(GgufFile(out / "llmq-F16.gguf", "llmq", "F16", reference=True),
          lambda p: _convert(src, p, "F16", "rtn", None, None))
    for method in methods:
        for t in types:
            model(GgufFile(out / f"llmq-{method}-{t}.gguf", f"llmq {method}", t),
                  lambda p, t=t, m=method: _convert(src, p, t, m, calib, calib_samples))
    # llama-quantize has no dense NVFP4/MXFP4 target: those types are compared against its other types only
    llamacpp_types = [t for t in types if t.upper() not in ("NVFP4", "MXFP4")]
    if with_llama_quantize:
        base = out / "llamacpp-F16.gguf"
        model(GgufFile(base, LLAMACPP, "F16"),
              lambda p: _llamacpp_step(lambda tmp: lt.convert_hf(src, tmp, "f16"), p, "llama.cpp convert_hf_to_gguf"))
        for t in llamacpp_types:
            model(GgufFile(out / f"llamacpp-{t}.gguf", LLAMACPP, t),
                  lambda p, t=t: _llamacpp_step(lambda tmp: lt.quantize_cmd(base, tmp, t, threads=threads),
                                                p, f"llama-quantize {t}"))
        if calib is not None:
            imatrix = out / "llamacpp-imatrix.gguf"
            # the same calibration budget as llmq's: calib_samples windows of 512 tokens
            steps.append((imatrix, lambda p: _llamacpp_step(
                lambda tmp: lt.imatrix_cmd(base, calib, tmp, ctx=512, chunks=calib_samples or 128, threads=threads),
                p, "llama-imatrix"), None))
            for t in llamacpp_types:
                model(GgufFile(out / f"llamacpp-imatrix-{t}.gguf", LLAMACPP_IMATRIX, t),
                      lambda p, t=t: _llamacpp_step(
                          lambda tmp: lt.quantize_cmd(base, tmp, t, imatrix=imatrix, threads=threads),
                          p, f"llama-quantize --imatrix {t}"))

    bar = _progress(steps, "build", enabled=progress)
    for path, make, _ in bar:
        if not path.is_file():
            bar.set_postfix_str(path.name)
            t0 = time.perf_counter()
            make(path)
            bar.write(f"built {path.name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return [f for _, _, f in steps if f is not None]


# ---- measure -----------------------------------------------------------------------------------------------------

def tensor_stats(path: Path) -> tuple[int, int]:
    """(number of weights, bytes of tensor data) over all tensors of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    return (sum(int(t.n_elements) for t in reader.tensors), sum(int(t.n_bytes) for t in reader.tensors))


def time_decode(engine, prompt_ids: Sequence[int], n_gen: int) -> float:
    """Greedy decode speed after `prompt_ids`: 1 / the median time of one token, robust to the pauses a shared
    machine inflicts on single steps (neither the prompt nor the first generated token, which may compile the
    single-token kernels, is timed)."""
    import numpy as np

    engine.reset()
    logits = engine.eval(list(prompt_ids))[-1]
    logits = engine.eval([int(np.argmax(logits))])[-1]
    step_s = []
    for _ in range(n_gen):
        t0 = time.perf_counter()
        logits = engine.eval([int(np.argmax(logits))])[-1]
        step_s.append(time.perf_counter() - t0)
    return 1.0 / float(np.median(step_s))


def _file_key(path: Path) -> str:
    st = path.stat()
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"


def score_files(files: Sequence[GgufFile], engines: Sequence[str], text_path: Path, out: Path, *, ctx: int = 512,
                chunks: int | None = None, n_gen: int = 32, threads: int | None = None,
                progress: bool = True) -> list[dict]:
    """One record per (file, engine): size, bpw, PPL, KLD against the reference file, decode tok/s."""
    from . import evaluate as ev

    text = text_path.read_text(encoding="utf-8")
    text_sha = hashlib.sha256(text.encode()).hexdigest()[:16]
    cache_path = out / "scores.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    reference = next(f for f in files if f.reference)
    records = []
    for engine_name in engines:
        settings = f"{engine_name}|{text_sha}|ctx{ctx}|chunks{chunks}|gen{n_gen}|ref={_file_key(reference.path)}"
        # one base per settings: a run with other settings must not overwrite the base cached scores refer to
        base = out / f"base-{engine_name}-{hashlib.sha256(settings.encode()).hexdigest()[:12]}.npz"
        if not base.is_file():  # the stored scores were measured against a base that is gone
            cache = {k: v for k, v in cache.items() if not k.startswith(settings)}
        bar = _progress(files, f"score [{engine_name}]", enabled=progress)
        for f in bar:
            bar.set_postfix_str(f.path.name)
            key = f"{settings}|{_file_key(f.path)}"
            if key not in cache:
                engine = ev.open_engine(f.path, engine_name, ctx, threads)
                tokens, add_bos, bos = ev.tokenize_for_ppl(engine, text)
                chunk_list = ev.make_chunks(tokens, ctx, chunks, add_bos, bos)
                res = ev.evaluate(ev.engine_logits_fn(engine), chunk_list,
                                  save_base=base if f.reference else None, kld_base=None if f.reference else base)
                gen = max(1, min(n_gen, ctx - DECODE_PROMPT_TOKENS - 1))
                score = dict(ppl=res.ppl, ppl_err=res.ppl_err, n_tokens=res.n_tokens, n_chunks=len(chunk_list),
                             decode_tps=time_decode(engine, tokens[:DECODE_PROMPT_TOKENS], gen))
                if not f.reference:
                    score.update(kld_mean=res.kld_mean, kld_mean_err=res.kld_mean_err, kld_p99=res.kld_p99,
                                 top1=res.top1)
                cache[key] = score
                cache_path.write_text(json.dumps(cache, indent=1))
                del engine
                gc.collect()
            n_weights, n_bytes = tensor_stats(f.path)
            records.append({
                "file": f.path.name, "producer": f.producer, "type": f.ftype, "engine": engine_name,
                "reference": f.reference, "size_mib": f.path.stat().st_size / 2**20, "bpw": 8 * n_bytes / n_weights,
                "n_weights": n_weights, "kld_mean": None, "kld_mean_err": None, "kld_p99": None, "top1": None,
                **cache[key]})
    return records


# ---- report ------------------------------------------------------------------------------------------------------

def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For points (cost, loss), both lower-is-better: True where no other point is at least as good on both and
    better on one."""
    return [not any(c2 <= c and l2 <= l and (c2 < c or l2 < l) for c2, l2 in points) for c, l in points]


FLOAT_TYPES = ("F32", "F16", "BF16")


def mark_pareto(records: list[dict]) -> None:
    """Set record['pareto'] per engine over KLD mean vs bits per weight, among the quantised files (the reference
    has no KLD; another float file, such as llama.cpp's own F16, is not a quant level)."""
    for engine in {r["engine"] for r in records}:
        group = [r for r in records
                 if r["engine"] == engine and r["kld_mean"] is not None and r["type"] not in FLOAT_TYPES]
        for r, on in zip(group, pareto_front([(r["bpw"], r["kld_mean"]) for r in group])):
            r["pareto"] = on
    for r in records:
        r.setdefault("pareto", False)


# One definition of every table column: header and how a record prints. The test parses report.md back with it.
COLUMNS = (
    ("engine", lambda r: r["engine"]),
    ("producer", lambda r: r["producer"]),
    ("type", lambda r: r["type"]),
    ("MiB", lambda r: f"{r['size_mib']:.1f}"),
    ("bpw", lambda r: f"{r['bpw']:.3f}"),
    ("PPL", lambda r: f"{r['ppl']:.4f}"),
    ("± PPL", lambda r: f"{r['ppl_err']:.4f}"),
    ("KLD mean", lambda r: "ref" if r["kld_mean"] is None else f"{r['kld_mean']:.5f}"),
    ("KLD p99", lambda r: "ref" if r["kld_p99"] is None else f"{r['kld_p99']:.4f}"),
    ("top-1 %", lambda r: "ref" if r["top1"] is None else f"{100 * r['top1']:.2f}"),
    ("decode tok/s", lambda r: f"{r['decode_tps']:.1f}"),
    ("Pareto", lambda r: "*" if r["pareto"] else ""),
)


def sort_records(records: list[dict]) -> list[dict]:
    return sorted(records, key=lambda r: (r["engine"], not r["reference"], -r["bpw"], r["producer"]))


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# Quant levels of {s['model']}", "",
             f"- text: {s['text']} ({s['n_tokens']} scored tokens: {s['chunks']} chunks x {s['ctx']}, second halves)",
             f"- reference: {s['reference']} (KLD and top-1 against its log-probs, per engine)",
             f"- engines: {', '.join(s['engines'])}; decode tok/s: 1 / median time of {s['n_gen']} greedy tokens, "
             f"{s['threads']} threads",
             f"- machine: {s['machine']}; date: {s['date']}", "",
             "| " + " | ".join(h for h, _ in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in report["records"]:
        lines.append("| " + " | ".join(fmt(r) for _, fmt in COLUMNS) + " |")
    lines += ["", "bpw: bits per weight over all tensors. KLD: KL(reference || file) per token (top-64 + rest). "
              "Pareto: no other quantised file of the same engine has both fewer bits per weight and lower mean "
              "KLD.", ""]
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()} {cpu}, {os.cpu_count()} cores"


def write_report(report: dict, out: Path) -> dict[str, Path]:
    from .plot import plot_report

    paths = {"json": out / "report.json", "md": out / "report.md", "png": out / "report.png"}
    paths["json"].write_text(json.dumps(report, indent=1) + "\n")
    paths["md"].write_text(markdown(report))
    plot_report(report, paths["png"])
    return paths


def run_compare(src: str | Path, out: str | Path, text: str | Path, *, types: Sequence[str] = DEFAULT_TYPES,
                methods: Sequence[str] = ("rtn",), engines: Sequence[str] = ("native",),
                with_llama_quantize: bool = False, calib: str | Path | None = None, calib_samples: int | None = None,
                ctx: int = 512, chunks: int | None = None, n_gen: int = 32, threads: int | None = None,
                progress: bool = True) -> tuple[dict, dict[str, Path]]:
    """Build, score and report; returns (report, {'json','md','png': path})."""
    from .checkpoint import resolve_source
    from .mixes import parse_file_type

    src, out, text = Path(resolve_source(str(src))), Path(out), Path(text)
    if not text.is_file():
        raise LlmqError(f"--text {text}: no such file")
    calib = Path(calib) if calib else None
    if calib is not None and not calib.is_file():
        raise LlmqError(f"--calib {calib}: no such file")
    types = [parse_file_type(t) for t in types]
    for m in methods:
        if m not in METHODS:
            raise LlmqError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        if m != "rtn" and calib is None:
            raise LlmqError(f"method {m} needs calibration text: pass --calib FILE")
    for e in engines:
        if e not in ENGINES:
            raise LlmqError(f"unknown engine {e!r}; choose from {', '.join(ENGINES)}")
    if not types or not engines:
        raise LlmqError("nothing to compare: give at least one --types and one --engines")
    out.mkdir(parents=True, exist_ok=True)

    files = build_files(src, out, types, methods, with_llama_quantize=with_llama_quantize, calib=calib,
                        calib_samples=calib_samples, threads=threads, progress=progress)
    records = score_files(files, engines, text, out, ctx=ctx, chunks=chunks, n_gen=n_gen, threads=threads,
                          progress=progress)
    mark_pareto(records)
    report = {
        "settings": dict(model=str(src), text=str(text), ctx=ctx, chunks=records[0]["n_chunks"],
                         n_tokens=records[0]["n_tokens"], engines=list(engines), n_gen=n_gen,
                         threads=threads or os.cpu_count(), reference=files[0].path.name, machine=machine(),
                         date=time.strftime("%Y-%m-%d %H:%M")),
        "records": sort_records(records),
    }
    return report, write_report(report, out)


# ---- command line ------------------------------------------------------------------------------------------------

def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def cmd_compare(args) -> int:
    report, paths = run_compare(args.src, args.out, args.text, types=[t.upper() for t in _csv(args.types)],
                                methods=_csv(args.methods), engines=_csv(args.engines),
                                with_llama_quantize=args.with_llama_quantize, calib=args.calib,
                                calib_samples=args.calib_samples, ctx=args.ctx, chunks=args.chunks, n_gen=args.n_gen,
                                threads=args.threads, progress=not args.quiet)
    print(paths["md"].read_text())
    print(f"wrote {paths['md']}, {paths['json']}, {paths['png']}")
    return 0


def register(subparsers) -> None:
    c = subparsers.add_parser(
        "compare", help="quant levels side by side: PPL, KLD, size, bits per weight, speed",
        description="Convert SRC to each type with each method (and llama.cpp's tools with --with-llama-quantize), "
                    "score every file against the llmq F16 reference with each engine, and write report.md, "
                    "report.json and report.png into --out. Files already in --out are reused.")
    c.add_argument("src", help="HF model directory")
    c.add_argument("--text", required=True, help="plain-text file to score on")
    c.add_argument("--types", default=",".join(DEFAULT_TYPES), help=f"file types (default {','.join(DEFAULT_TYPES)})")
    c.add_argument("--methods", default="rtn", help=f"llmq methods, comma-separated: {', '.join(METHODS)} "
                   "(all but rtn need --calib; default rtn)")
    c.add_argument("--with-llama-quantize", action="store_true",
                   help="also llama.cpp convert_hf_to_gguf F16 + llama-quantize (+ imatrix files with --calib)")
    c.add_argument("--engines", default="native", help="native, llama.cpp or both comma-separated (default native)")
    c.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    c.add_argument("--chunks", type=int, default=None, help="score at most N chunks per file (default: all)")
    c.add_argument("--calib", default=None, help="calibration text for calibrated methods and llama-imatrix")
    c.add_argument("--calib-samples", type=int, default=None,
                   help="calibration windows of 512 tokens (llmq) / llama-imatrix chunks (default 128)")
    c.add_argument("--n-gen", type=int, default=32, help="greedy tokens timed for decode tok/s (default 32)")
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--out", default="llmq-compare", help="output directory (default ./llmq-compare)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_compare)
