"""Mutation fuzzing of the two file readers: whatever the bytes, the only exception is LlmqError, nothing hangs,
nothing allocates more than a few MB, and a file a validator accepts is one the code behind it can use.

    GGUF:         check_gguf, then (if accepted) open_gguf (gguf.GGUFReader), the metadata both ways, and
                  verify_gguf's full decode; accepted files must give gguf-py exactly check_gguf's tensor table.
    safetensors:  read_safetensors_header, then (if accepted) Checkpoint.read of every tensor.

Mutations of a small valid file: bit flips, truncation, an integer field (or a JSON number) replaced by a boundary
value, inserted or deleted bytes, JSON values replaced by values of another type.
"""

from __future__ import annotations

import json
import re
import signal
import struct
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import malformed as M
from llmq.errors import LlmqError

BOUNDARY = [0, 1, 2, 3, 7, 8, 31, 32, 33, 255, 256, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40,
            2**62, 2**63 - 1, 2**63, 2**64 - 1]
MAX_ALLOC = 8 << 20  # the inputs are ~1 KB; anything near this is an allocation sized by a lie
SETTINGS = dict(max_examples=5000, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@contextmanager
def bounded(seconds: float = 5.0):
    """Fail on a hang (SIGALRM) or on a traced allocation peak above MAX_ALLOC (numpy reports to tracemalloc)."""
    def alarm(signum, frame):
        raise TimeoutError(f"no result within {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
        assert peak < MAX_ALLOC, f"allocated {peak} bytes for a {MAX_ALLOC >> 20} MiB-bounded input"
    finally:
        tracemalloc.stop()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _replace(data: bytes, offset: int, size: int, value: int) -> bytes:
    offset = min(offset, max(0, len(data) - size))
    return data[:offset] + (value % 2**(8 * size)).to_bytes(size, "little") + data[offset + size:]


@st.composite
def mutated(draw, base: bytes, field_offsets: list[int]) -> bytes:
    data = base
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "field", "int", "insert", "delete"]))
        n = max(1, len(data))
        if kind == "flip":
            pos = draw(st.integers(0, n - 1))
            if data:
                data = data[:pos] + bytes([data[pos] ^ (1 << draw(st.integers(0, 7)))]) + data[pos + 1:]
        elif kind == "truncate":
            data = data[:draw(st.integers(0, n))]
        elif kind == "field":  # a known header field gets a boundary value
            off = draw(st.sampled_from(field_offsets))
            data = _replace(data, off, draw(st.sampled_from([4, 8])), draw(st.sampled_from(BOUNDARY + [len(data)])))
        elif kind == "int":  # anywhere, a u32/u64 boundary value
            data = _replace(data, draw(st.integers(0, n - 1)), draw(st.sampled_from([4, 8])),
                            draw(st.sampled_from(BOUNDARY)))
        elif kind == "insert":
            pos = draw(st.integers(0, n))
            data = data[:pos] + draw(st.binary(min_size=1, max_size=16)) + data[pos:]
        else:
            pos = draw(st.integers(0, n - 1))
            data = data[:pos] + data[pos + draw(st.integers(1, 16)):]
    return data


# ---- GGUF -------------------------------------------------------------------------------------------------------

GGUF_BASE, GGUF_FIELDS = M.fuzz_gguf().build()


def _fields(offsets: dict[str, int]) -> list[int]:
    # the count/length/type/offset fields (and the array headers: type at +0, count at +4, first string at +12)
    out = []
    for name, off in offsets.items():
        out.append(off)
        if name.endswith(".value"):
            out += [off + 4, off + 12]
        if name.endswith(".dims"):
            out.append(off + 8)
    return sorted(set(out))


def check_gguf_contract(path: Path) -> None:
    from llmq.gguf_check import check_gguf, read_metadata
    from llmq.verify import verify_gguf
    from runtime.gguf_file import open_gguf, read_metadata as reader_metadata

    try:
        layout = check_gguf(path)
    except LlmqError:
        return
    reader = open_gguf(path)  # must not raise: check_gguf accepted the file
    got = [(t.name, int(t.tensor_type), tuple(int(d) for d in t.shape), int(t.data_offset), int(t.n_bytes))
           for t in reader.tensors]
    want = [(t.name, int(t.ggml_type), t.shape, t.offset, t.n_bytes) for t in layout.tensors]
    assert got == want
    assert read_metadata(layout) == _nan_safe(reader_metadata(reader), read_metadata(layout))
    del reader
    verify_gguf(path)  # decodes every tensor; problems are reported, never raised


def _nan_safe(a: dict, b: dict) -> dict:
    """NaN != NaN: where both sides hold a NaN, take b's value so equality compares everything else."""
    out = {}
    for k, v in a.items():
        w = b.get(k)
        same_nan = isinstance(v, float) and isinstance(w, float) and v != v and w != w
        out[k] = w if same_nan else v
    return out


def test_gguf_base_is_valid(tmp_path):
    path = M.write(tmp_path / "f.gguf", GGUF_BASE)
    check_gguf_contract(path)
    from llmq.gguf_check import check_gguf
    assert len(check_gguf(path).tensors) == 3


@settings(**SETTINGS)
@given(data=mutated(GGUF_BASE, _fields(GGUF_FIELDS)))
def test_fuzz_gguf(data, tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "fuzz.gguf"
    path.write_bytes(data)
    with bounded():
        check_gguf_contract(path)


# ---- safetensors ------------------------------------------------------------------------------------------------

ST_BASE = M.small_safetensors()
_NUMBER = re.compile(rb"-?\d+")


@st.composite
def mutated_st(draw) -> bytes:
    data = ST_BASE
    if draw(st.booleans()):  # structure-aware: edit the JSON header, then re-frame it
        (n,) = struct.unpack_from("<Q", data)
        header, body = data[8:8 + n], data[8 + n:]
        for _ in range(draw(st.integers(1, 3))):
            numbers = list(_NUMBER.finditer(header))
            choice = draw(st.sampled_from(["number", "value", "key"]))
            if choice == "number" and numbers:
                m = draw(st.sampled_from(numbers))
                new = draw(st.sampled_from(BOUNDARY + [-1, -(2**63), 10**30, len(body), len(body) + 1]))
                header = header[:m.start()] + str(new).encode() + header[m.end():]
            elif choice == "value":
                obj = json.loads(header)
                name = draw(st.sampled_from(sorted(obj)))
                field = draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
                junk = draw(st.sampled_from([None, [], {}, "F32", ["F32"], 1.5, True, [1, 2, 3], [[1]], "x" * 9]))
                if field and isinstance(obj[name], dict):
                    obj[name][field] = junk
                else:
                    obj[name] = junk
                header = json.dumps(obj).encode()
            else:
                obj = json.loads(header)
                obj[draw(st.sampled_from(["", "__metadata__", "w", "z" * 300]))] = json.loads(json.dumps(
                    {"dtype": "U8", "shape": [draw(st.integers(0, 64))], "data_offsets": [0, draw(st.integers(0, 64))]}))
                header = json.dumps(obj).encode()
        data = struct.pack("<Q", len(header)) + header + body
    return draw(mutated(data, [0, 4]))


def check_st_contract(d: Path) -> None:
    from llmq.checkpoint import Checkpoint, read_safetensors_header

    try:
        entries = read_safetensors_header(d / "model.safetensors")
    except LlmqError:
        return
    with Checkpoint(d) as ckpt:  # config.json is valid; the shard must load as it was validated
        for e in entries:
            ckpt.read(e.name)


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("st")
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return d


def test_safetensors_base_is_valid(st_dir):
    (st_dir / "model.safetensors").write_bytes(ST_BASE)
    from llmq.checkpoint import read_safetensors_header
    assert [e.name for e in read_safetensors_header(st_dir / "model.safetensors")] == ["w", "h", "b", "i"]
    check_st_contract(st_dir)


@settings(**SETTINGS)
@given(data=mutated_st())
def test_fuzz_safetensors(data, st_dir):
    (st_dir / "model.safetensors").write_bytes(data)
    with bounded():
        check_st_contract(st_dir)
