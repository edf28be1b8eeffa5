"""llama.cpp's build on CPUs that advertise AMX but fault on it: the probe, the cmake flags, the engine's guard."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from llmq import llamacpp_tools as lt
from llmq.errors import LlmqError


def test_cmake_flags_follow_the_probe():
    flags = lt.cmake_cpu_flags()
    if lt.amx_faults():
        assert flags == [f"-DCMAKE_C_FLAGS={lt.NO_AMX_FLAGS}", f"-DCMAKE_CXX_FLAGS={lt.NO_AMX_FLAGS}"]
    else:
        assert flags == []


def test_no_amx_flags_really_remove_amx_under_march_native():
    # what the flags rely on: an explicit -mno-amx-* wins over -march=native whatever the order
    if not lt.cpu_advertises_amx():
        pytest.skip("this CPU does not advertise AMX")
    macros = subprocess.run(["gcc", *lt.NO_AMX_FLAGS.split(), "-march=native", "-dM", "-E", "-"], input="",
                            capture_output=True, text=True).stdout
    assert "__AMX_INT8__" not in macros and "__AVX512F__" in macros


def test_installed_llama_cpp_python_runs_here():
    # what `python -m llmq.llamacpp_tools ensure` (in .ci/run) guarantees: no AMX build where AMX faults
    if lt.amx_faults():
        assert not lt.installed_package_uses_amx()
    code = ("import llama_cpp, sys; from llmq import llamacpp_tools as lt; lt.check_loaded_package(llama_cpp); "
            "sys.stdout.write('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout == "ok", proc.stderr[-500:]


@pytest.mark.parametrize("info, faults, raises", [("AMX_INT8 = 1 | ", True, True), ("AVX512 = 1 | ", True, False),
                                                  ("AMX_INT8 = 1 | ", False, False)])
def test_engine_guard_names_the_fix(monkeypatch, info, faults, raises):
    fake = types.SimpleNamespace(llama_print_system_info=lambda: info.encode())
    monkeypatch.setattr(lt, "cpu_advertises_amx", lambda: True)
    monkeypatch.setattr(lt, "amx_faults", lambda: faults)
    if raises:
        with pytest.raises(LlmqError, match="llamacpp_tools ensure"):
            lt.check_loaded_package(fake)
    else:
        lt.check_loaded_package(fake)
