"""`llmq compare` end to end on a tiny random llama (2 types, native engine), its report files, the Pareto front,
and `llmq bench` on both engines."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

from llmq import compare
from llmq.errors import LlmqError
from llmq.plot import DPI, FIGSIZE

CTX, CHUNKS = 64, 3


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tiny_models import make_tiny_checkpoint

    from llmq.data import sotu_text

    d = tmp_path_factory.mktemp("compare")
    ckpt = make_tiny_checkpoint("llama", d / "hf")
    text = d / "sotu-2022.txt"
    text.write_text(sotu_text(2022, 2022)[:30000])
    out = d / "out"
    report, paths = compare.run_compare(ckpt, out, text, types=["Q8_0", "Q4_0"], engines=["native"], ctx=CTX,
                                        chunks=CHUNKS, n_gen=8, progress=False)
    return report, paths, out, text


def _by_type(report):
    return {r["type"]: r for r in report["records"]}


def test_compare_scores_every_file_against_the_f16_reference(tiny_run):
    from llmq import evaluate as ev

    report, paths, out, text = tiny_run
    recs = _by_type(report)
    assert set(recs) == {"F16", "Q8_0", "Q4_0"}
    assert [r["file"] for r in report["records"]] == ["llmq-F16.gguf", "llmq-rtn-Q8_0.gguf", "llmq-rtn-Q4_0.gguf"]
    for r in recs.values():
        assert r["size_mib"] == (out / r["file"]).stat().st_size / 2**20
        assert r["n_chunks"] == CHUNKS and r["n_tokens"] == CHUNKS * (CTX // 2 - 1)
        assert r["decode_tps"] > 0
    # bits per weight: 2-D weights at 16 / 8.5 / 4.5 bits, 1-D norms kept in F32
    assert 16 <= recs["F16"]["bpw"] < 17
    assert 8.5 <= recs["Q8_0"]["bpw"] < recs["F16"]["bpw"]
    assert 4.5 <= recs["Q4_0"]["bpw"] < recs["Q8_0"]["bpw"]
    assert recs["F16"]["kld_mean"] is None and recs["F16"]["reference"]
    assert 0 < recs["Q8_0"]["kld_mean"] < recs["Q4_0"]["kld_mean"]
    assert recs["Q8_0"]["top1"] > recs["Q4_0"]["top1"]
    assert recs["Q8_0"]["kld_p99"] >= recs["Q8_0"]["kld_mean"]

    # the recorded numbers are what llmq.evaluate gives for the same file, text and settings
    engine = ev.open_engine(out / "llmq-rtn-Q4_0.gguf", "native", CTX)
    tokens, add_bos, bos = ev.tokenize_for_ppl(engine, text.read_text())
    res = ev.evaluate(ev.engine_logits_fn(engine), ev.make_chunks(tokens, CTX, CHUNKS, add_bos, bos),
                      kld_base=next(out.glob("base-native-*.npz")))
    assert res.ppl == pytest.approx(recs["Q4_0"]["ppl"], rel=1e-9)
    assert res.kld_mean == pytest.approx(recs["Q4_0"]["kld_mean"], rel=1e-9)
    assert res.ppl_base == pytest.approx(recs["F16"]["ppl"], rel=1e-6)


def _parse_markdown_table(md: str) -> list[dict]:
    rows = [line for line in md.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert set(rows[1].replace("|", "")) == {"-"}
    return [dict(zip(header, (c.strip() for c in row.strip("|").split("|")))) for row in rows[2:]]


def test_markdown_table_matches_json(tiny_run):
    _, paths, _, _ = tiny_run
    report = json.loads(paths["json"].read_text())  # what was written, not the in-memory copy
    rows = _parse_markdown_table(paths["md"].read_text())
    assert len(rows) == len(report["records"])
    numeric = {"MiB": ("size_mib", 0.05), "bpw": ("bpw", 5e-4), "PPL": ("ppl", 5e-5), "± PPL": ("ppl_err", 5e-5),
               "KLD mean": ("kld_mean", 5e-6), "KLD p99": ("kld_p99", 5e-5), "decode tok/s": ("decode_tps", 0.05)}
    for row, r in zip(rows, report["records"]):
        assert (row["engine"], row["producer"], row["type"]) == (r["engine"], r["producer"], r["type"])
        for col, (key, tol) in numeric.items():
            if r[key] is None:
                assert row[col] == "ref"
            else:
                assert abs(float(row[col]) - r[key]) <= tol * 1.0001, (col, row[col], r[key])
        assert (row["top-1 %"] == "ref") if r["top1"] is None else abs(float(row["top-1 %"]) - 100 * r["top1"]) <= 5e-3
        assert (row["Pareto"] == "*") == r["pareto"]
    s = report["settings"]
    assert f"{s['chunks']} chunks x {s['ctx']}" in paths["md"].read_text()


def test_png_written_at_the_expected_size(tiny_run):
    _, paths, _, _ = tiny_run
    data = paths["png"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))
    assert len(data) > 20_000  # three panels of axes, points and text, not a blank canvas


def test_rerun_reuses_files_and_scores(tiny_run):
    report, _, out, text = tiny_run
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.gguf")}
    again, _ = compare.run_compare(out.parent / "hf", out, text, types=["Q8_0", "Q4_0"], engines=["native"],
                                   ctx=CTX, chunks=CHUNKS, n_gen=8, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.gguf")} == mtimes
    assert [r["ppl"] for r in again["records"]] == [r["ppl"] for r in report["records"]]
    assert [r["decode_tps"] for r in again["records"]] == [r["decode_tps"] for r in report["records"]]


def test_pareto_front_on_synthetic_points():
    # (bpw, KLD): B dominates C (fewer bits, lower KLD); D ties A on bits with higher KLD; E is the only 2-bit file
    points = {"A": (8.5, 0.001), "B": (4.5, 0.02), "C": (4.9, 0.03), "D": (8.5, 0.002), "E": (2.6, 0.3),
              "F": (6.6, 0.004), "G": (6.6, 0.004)}
    front = dict(zip(points, compare.pareto_front(list(points.values()))))
    assert front == {"A": True, "B": True, "C": False, "D": False, "E": True, "F": True, "G": True}
    # brute force on random points: on the front <=> no point is <= on both and < on one
    rng = np.random.default_rng(0)
    pts = [tuple(p) for p in rng.integers(0, 6, size=(40, 2)).astype(float)]
    for p, on in zip(pts, compare.pareto_front(pts)):
        dominated = any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pts)
        assert on == (not dominated)


def test_mark_pareto_is_per_engine_among_quantised_files():
    def rec(engine, ftype, bpw, kld):
        return {"engine": engine, "type": ftype, "bpw": bpw, "kld_mean": kld}

    records = [rec("native", "F16", 16.0, None),  # the reference
               rec("native", "F16", 16.0, 0.0),  # another F16 file: KLD 0, but not a quant level
               rec("native", "Q8_0", 8.5, 0.01), rec("native", "Q4_0", 4.5, 0.1), rec("native", "Q4_K_M", 4.5, 0.05),
               rec("llama.cpp", "Q8_0", 8.5, 0.5), rec("llama.cpp", "Q4_0", 4.5, 0.05)]
    compare.mark_pareto(records)
    assert [r["pareto"] for r in records] == [False, False, True, False, True, False, True]


def test_bad_arguments_are_user_errors(tiny_run, tmp_path):
    _, _, out, text = tiny_run
    hf = out.parent / "hf"
    with pytest.raises(LlmqError, match="needs calibration text"):
        compare.run_compare(hf, tmp_path, text, types=["Q4_0"], methods=["gptq"], progress=False)
    with pytest.raises(LlmqError, match="unknown engine"):
        compare.run_compare(hf, tmp_path, text, types=["Q4_0"], engines=["vllm"], progress=False)
    with pytest.raises(LlmqError, match="no such file"):
        compare.run_compare(hf, tmp_path, tmp_path / "missing.txt", types=["Q4_0"], progress=False)
    with pytest.raises(LlmqError, match="unknown --type"):
        compare.run_compare(hf, tmp_path, text, types=["Q5_Z"], progress=False)


def test_bench_times_both_engines_in_their_own_processes(tiny_run):
    pytest.importorskip("llama_cpp")
    from llmq.benchmark import bench

    _, _, out, _ = tiny_run
    results = bench(out / "llmq-rtn-Q8_0.gguf", ctx=64, n_prompt=32, n_gen=8, threads=1)
    assert [r["engine"] for r in results] == ["native", "llama.cpp"]
    for r in results:
        assert r["n_prompt"] == 32 and r["n_gen"] == 8 and r["threads"] == 1
        assert r["prefill_tps"] > 0 and r["decode_tps"] > 0 and math.isfinite(r["decode_tps"])
        assert 30 < r["peak_rss_mib"] < 4000
    # the native process imports numba and the runtime, the llama.cpp one does not: the RSS are separate measurements
    assert results[0]["peak_rss_mib"] != results[1]["peak_rss_mib"]
    with pytest.raises(LlmqError, match="must hold"):
        bench(out / "llmq-rtn-Q8_0.gguf", ["native"], ctx=16, n_prompt=32, n_gen=8)
