"""llama.cpp's own tools, the baseline `llmq compare`, `llmq demo` and the benchmarks measure against, obtained the
way a user here can:

- the Python package llama-cpp-python (inference);
- its PyPI sdist, which holds the whole llama.cpp tree: `convert_hf_to_gguf.py` and the C++ tools
  (`llama-quantize`, `llama-imatrix`, `llama-perplexity`), built once into ~/.cache/llmq (about 5 min on 2 cores;
  $LLMQ_CACHE moves it).

Nothing from llama.cpp is stored in this repository; this module downloads and builds it on demand. The `*_cmd`
functions return command lines; `run` executes one and turns a failure into an LlmqError.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

from .errors import LlmqError

CACHE = Path(os.environ.get("LLMQ_CACHE", Path.home() / ".cache" / "llmq"))
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")

# ggml built with -march=native uses AMX tiles for Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K products when the CPU advertises
# AMX-INT8. Some virtual machines advertise it (CPUID, arch_prctl permission) but fault on the first tile
# instruction, and llama.cpp then dies with SIGSEGV in its first matrix product. On such a machine llama.cpp is built
# without AMX (explicit -mno-amx-* wins over -march=native in gcc and clang): its AVX512 code, as on any AVX512 CPU.
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
_AMX_PROBE = r"""
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <immintrin.h>
int main(void) {
    unsigned char cfg[64];
    if (syscall(SYS_arch_prctl, 0x1023, 18)) return 2;  /* ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA */
    memset(cfg, 0, sizeof cfg);
    cfg[0] = 1; cfg[16] = 64; cfg[48] = 16;              /* palette 1; tile 0: 16 rows of 64 bytes */
    _tile_loadconfig(cfg);
    _tile_zero(0);
    _tile_release();
    return 0;
}
"""


def version() -> str:
    """The installed llama-cpp-python version: the tools are built from the same llama.cpp revision."""
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        raise LlmqError("llama.cpp's tools come from llama-cpp-python's source: pip install llama-cpp-python") from None


def source_tree() -> Path:
    """The llama.cpp tree from the sdist of the installed llama-cpp-python version (downloaded once)."""
    v = version()
    tree = CACHE / f"llama_cpp_python-{v}" / "vendor" / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"llama_cpp_python-{v}.tar.gz"
    if not sdist.is_file():
        run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={v}", "-d", str(CACHE)], f"downloading the llama-cpp-python {v} sdist")
    with tarfile.open(sdist) as tar:
        tar.extractall(CACHE, filter="data")
    return tree


def cpu_advertises_amx() -> bool:
    try:
        return " amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@functools.lru_cache(maxsize=None)
def amx_faults() -> bool:
    """True when the CPU advertises AMX-INT8 but a tile instruction kills the process (probe compiled with gcc)."""
    if not cpu_advertises_amx() or shutil.which("gcc") is None:
        return False
    CACHE.mkdir(parents=True, exist_ok=True)
    src, exe = CACHE / "amx_probe.c", CACHE / "amx_probe"
    if not exe.is_file():
        src.write_text(_AMX_PROBE)
        if subprocess.run(["gcc", "-O1", "-mamx-tile", "-o", str(exe), str(src)], capture_output=True).returncode:
            return False  # a compiler without AMX support cannot build llama.cpp's AMX code either
    return subprocess.run([str(exe)], capture_output=True).returncode < 0  # killed by a signal (SIGILL/SIGSEGV)


def check_loaded_package(llama_cpp) -> None:
    """A clear error instead of llama.cpp's SIGSEGV when the imported llama-cpp-python uses AMX that faults here."""
    if (cpu_advertises_amx() and "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode(errors="replace")
            and amx_faults()):
        raise LlmqError("this llama-cpp-python build uses AMX, which faults on this CPU: "
                        "run `python -m llmq.llamacpp_tools ensure` once to rebuild it without AMX")


def cmake_cpu_flags() -> list[str]:
    """Extra cmake arguments so the llama.cpp build runs on this CPU (see NO_AMX_FLAGS)."""
    if not amx_faults():
        return []
    return [f"-DCMAKE_C_FLAGS={NO_AMX_FLAGS}", f"-DCMAKE_CXX_FLAGS={NO_AMX_FLAGS}"]


def installed_package_uses_amx() -> bool:
    """Whether the installed llama-cpp-python's libggml-cpu was compiled with AMX (asked in a child process)."""
    code = "import llama_cpp, sys; sys.stdout.write(llama_cpp.llama_print_system_info().decode())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LlmqError("importing llama_cpp failed: " + " | ".join(proc.stderr.strip().splitlines()[-2:]))
    return "AMX_INT8 = 1" in proc.stdout


def ensure_python_package() -> str:
    """Rebuild llama-cpp-python without AMX where its AMX code would fault here; says what it did."""
    if not amx_faults():
        return "llama-cpp-python: this CPU runs its native build"
    if not installed_package_uses_amx():
        return "llama-cpp-python: built without AMX (this CPU advertises AMX but faults on it)"
    v = version()
    print(f"llama-cpp-python {v} was built with AMX, which faults on this CPU: rebuilding without it (~7 min) ...",
          file=sys.stderr, flush=True)
    # the cached wheel is the AMX build: drop it so pip compiles again and caches the working one
    subprocess.run([sys.executable, "-m", "pip", "cache", "remove", "llama_cpp_python"], capture_output=True)
    flags = f"-DCMAKE_C_FLAGS='{NO_AMX_FLAGS}' -DCMAKE_CXX_FLAGS='{NO_AMX_FLAGS}'"
    env = {**os.environ, "CMAKE_ARGS": (os.environ.get("CMAKE_ARGS", "") + " " + flags).strip()}
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--force-reinstall", "--no-deps",
                           f"llama-cpp-python=={v}"], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise LlmqError("rebuilding llama-cpp-python failed: " + " | ".join(proc.stderr.strip().splitlines()[-3:]))
    if installed_package_uses_amx():
        raise LlmqError("llama-cpp-python was rebuilt but still uses AMX")
    return f"llama-cpp-python {v}: rebuilt without AMX"


def tool(name: str) -> Path:
    """Path of a built llama.cpp tool; builds all of TOOLS on first use."""
    cpu_flags = cmake_cpu_flags()
    build = CACHE / (f"llama.cpp-build-{version()}" + ("-noamx" if cpu_flags else ""))
    exe = build / "bin" / name
    if exe.is_file():
        return exe
    if shutil.which("cmake") is None:
        raise LlmqError("building llama.cpp's tools needs cmake and a C++ compiler: apt-get install cmake g++")
    tree = source_tree()
    print(f"building llama.cpp tools in {build} (one time, ~5 min) ...", file=sys.stderr, flush=True)
    run(["cmake", "-S", str(tree), "-B", str(build), "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release",
         "-DLLAMA_BUILD_SERVER=OFF", *cpu_flags], "configuring llama.cpp")
    run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", *TOOLS], "building llama.cpp")
    if not exe.is_file():
        raise LlmqError(f"the llama.cpp build finished without {exe}")
    return exe


def run(cmd: list[str], what: str) -> str:
    """Run `cmd`; its combined output, or an LlmqError naming `what` failed with the output's last lines."""
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        tail = " | ".join(line for line in out.strip().splitlines()[-3:])
        raise LlmqError(f"{what} failed (exit {proc.returncode}): {tail}")
    return out


def convert_hf(model_dir: Path, out: Path, outtype: str = "f16") -> list[str]:
    """llama.cpp's own converter, HF directory -> GGUF."""
    return [sys.executable, str(source_tree() / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(out),
            "--outtype", outtype]


def quantize_cmd(src: Path, out: Path, ftype: str, imatrix: Path | None = None, threads: int = 2) -> list[str]:
    cmd = [str(tool("llama-quantize"))]
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    return cmd + [str(src), str(out), ftype, str(threads)]


def imatrix_cmd(model: Path, text_file: Path, out: Path, ctx: int = 512, chunks: int | None = None,
                threads: int = 2) -> list[str]:
    cmd = [str(tool("llama-imatrix")), "-m", str(model), "-f", str(text_file), "-o", str(out), "-c", str(ctx),
           "-t", str(threads), "--no-ppl"]
    return cmd + (["--chunks", str(chunks)] if chunks else [])


def perplexity(model: Path, text_file: Path, ctx: int = 512, chunks: int | None = None, threads: int = 2,
               kld_base: Path | None = None, save_base: Path | None = None) -> dict:
    """Run llama-perplexity; returns {'ppl', 'ppl_err'} and, with kld_base, the KL-divergence statistics."""
    cmd = [str(tool("llama-perplexity")), "-m", str(model), "-f", str(text_file), "-c", str(ctx), "-t", str(threads),
           "-b", str(ctx)]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    if save_base:
        cmd += ["--kl-divergence-base", str(save_base)]
    if kld_base:
        cmd += ["--kl-divergence-base", str(kld_base), "--kl-divergence"]
    return parse_perplexity_output(run(cmd, "llama-perplexity"))


def parse_perplexity_output(text: str) -> dict:
    out: dict = {}
    m = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", text)
    if m:
        out["ppl"], out["ppl_err"] = float(m.group(1)), float(m.group(2))
    m = re.search(r"Mean PPL\(Q\)\s*:\s*([\d.]+)\s*±\s*([\d.]+)", text)
    if m:
        out["ppl"], out["ppl_err"] = float(m.group(1)), float(m.group(2))
    for key, pat in [("kld_mean", r"Mean\s+KLD:\s*([-\d.]+)"), ("kld_max", r"Maximum KLD:\s*([-\d.]+)"),
                     ("kld_p99", r"99\.0%\s+KLD:\s*([-\d.]+)"), ("kld_median", r"Median\s+KLD:\s*([-\d.]+)"),
                     ("top1", r"Same top p:\s*([\d.]+)"), ("rms_dp", r"RMS Δp\s*:\s*([\d.]+)")]:
        m = re.search(pat, text)
        if m:
            out[key] = float(m.group(1))
    m = re.search(r"KLD:\s*([-\d.]+)\s*±", text)
    if "kld_mean" not in out and m:
        out["kld_mean"] = float(m.group(1))
    if "ppl" not in out:
        tail = text[-300:].replace("\n", " | ")
        raise LlmqError(f"could not find the perplexity in llama-perplexity's output: {tail}")
    return out


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Run `cmd`; return (wall seconds, peak RSS in MiB of the process tree's largest process, output).

    A wrapper process runs the command so RUSAGE_CHILDREN covers only it."""
    wrapper = ("import resource, subprocess, sys, time, json\n"
               "t = time.perf_counter(); p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "dt = time.perf_counter() - t\n"
               "sys.stdout.write(p.stdout + p.stderr)\n"
               "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
               "print('\\n@@MEASURE', json.dumps([dt, rss, p.returncode]))\n")
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    out, _, tail = proc.stdout.rpartition("@@MEASURE")
    dt, rss_kb, rc = json.loads(tail)
    if rc != 0:
        raise LlmqError(f"command failed ({rc}): {' '.join(cmd)}: " + out[-300:].replace("\n", " | "))
    return dt, rss_kb / 1024, out


if __name__ == "__main__":
    # `python -m llmq.llamacpp_tools ensure`: make the installed llama-cpp-python and the tools usable on this CPU
    if sys.argv[1:] != ["ensure"]:
        sys.exit("usage: python -m llmq.llamacpp_tools ensure")
    try:
        print(ensure_python_package())
    except LlmqError as e:
        sys.exit(f"error: {e}")
