"""Validate a GGUF file's header before anything trusts it.

gguf.GGUFReader believes every count and length it reads: an array count of 2**60 makes it loop for ever, a lying
tensor offset gives a numpy error far from the cause. `check_gguf` walks the same header with `struct` over a
read-only memory map and checks each field against the bytes that are actually there, so a hostile or truncated
file costs a few reads and one clear `LlmqError`, never an allocation sized by the file.

Layout (little-endian, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x      key: string | value type u32 | value
    n_tensors x name: string | n_dims u32 | ne[n_dims] u64 | ggml type u32 | offset u64
    padding to `general.alignment` (default 32) | tensor data, each tensor at data start + offset

    string = length u64 | bytes (UTF-8);  array = element type u32 | count u64 | elements

The checks are llama.cpp's gguf_init_from_file_impl's, plus UTF-8 for every string (gguf-py decodes them lazily
and would raise later) and no overlapping tensor data.
"""

from __future__ import annotations

import mmap
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .errors import LlmqError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME: tensor names are shorter than this (with the C string's NUL)
_HEADER = struct.Struct("<4sIQQ")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# fixed-size value types: struct format (for reading scalars) and size
_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_SCALAR_SIZE = {t: struct.calcsize(f) for t, f in _SCALARS.items()}
_VALUE_TYPES = {int(t): t for t in GGUFValueType}
_GGML_TYPES = {int(t): t for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order: ne[0] (the row length) first
    n_elements: int
    n_bytes: int
    offset: int  # absolute position of the data in the file


@dataclass(frozen=True)
class KVInfo:
    type: GGUFValueType
    element_type: GGUFValueType | None  # arrays only
    count: int  # array length (1 for scalars and strings)
    value: object  # scalars and strings; arrays stay in the file (they can be vocabulary sized), see read_metadata
    offset: int = 0  # arrays: where the first element starts


@dataclass(frozen=True)
class GGUFLayout:
    path: Path
    file_size: int
    version: int
    alignment: int
    data_offset: int  # where the tensor data section starts
    kv: dict[str, KVInfo]
    tensors: list[TensorInfo]


class _Cursor:
    """Reads fields from the map, each bounded by the bytes left in the file."""

    def __init__(self, buf, size: int, name: str):
        self.buf, self.size, self.name, self.pos = buf, size, name, 0

    def fail(self, what: str):
        raise LlmqError(f"{self.name}: {what}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                      f"the file ends {self.size - self.pos} bytes later")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        if n > self.size - self.pos:
            self.fail(f"{what}: string length {n} exceeds the {self.size - self.pos} bytes left in the file")
        start = self.pos
        self.pos += n
        try:
            return self.buf[start:self.pos].decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8 (offset {start})")

    def skip_strings(self, count: int, what: str) -> None:
        """`count` strings back to back (vocabularies: tens of thousands), validated without keeping them."""
        buf, size, pos = self.buf, self.size, self.pos
        unpack = _U64.unpack_from
        for i in range(count):
            if size - pos < 8:
                self.pos = pos
                self.fail(f"truncated: {what}[{i}] of {count} starts at offset {pos}, past the end of the file")
            (n,) = unpack(buf, pos)
            pos += 8
            if n > size - pos:
                self.fail(f"{what}[{i}]: string length {n} exceeds the {size - pos} bytes left in the file")
            try:
                buf[pos:pos + n].decode("utf-8")
            except UnicodeDecodeError:
                self.fail(f"{what}[{i}] is not valid UTF-8 (offset {pos})")
            pos += n
        self.pos = pos


def _value_type(cur: _Cursor, raw: int, what: str) -> GGUFValueType:
    t = _VALUE_TYPES.get(raw)
    if t is None:
        cur.fail(f"{what} has unknown value type {raw}")
    return t


def _read_kv(cur: _Cursor, key: str) -> KVInfo:
    vtype = _value_type(cur, cur.u32(f"value type of {key!r}"), f"key {key!r}")
    if vtype == GGUFValueType.STRING:
        return KVInfo(vtype, None, 1, cur.string(f"value of {key!r}"))
    if vtype in _SCALARS:
        size = _SCALAR_SIZE[vtype]
        cur.need(size, f"value of {key!r}")
        (v,) = struct.unpack_from(_SCALARS[vtype], cur.buf, cur.pos)
        cur.pos += size
        return KVInfo(vtype, None, 1, v)
    # array
    etype = _value_type(cur, cur.u32(f"element type of {key!r}"), f"array {key!r}")
    count = cur.u64(f"length of array {key!r}")
    left = cur.size - cur.pos
    start = cur.pos
    if etype == GGUFValueType.ARRAY:
        cur.fail(f"array {key!r} holds arrays, which GGUF readers do not support")
    if etype == GGUFValueType.STRING:
        if count > left // 8:  # every string takes at least its 8-byte length
            cur.fail(f"array {key!r} claims {count} strings but only {left} bytes are left in the file")
        cur.skip_strings(count, key)
    else:
        nbytes = count * _SCALAR_SIZE[etype]
        if nbytes > left:
            cur.fail(f"array {key!r} claims {count} {etype.name} values ({nbytes} bytes) but only {left} bytes "
                     "are left in the file")
        cur.pos += nbytes
    return KVInfo(GGUFValueType.ARRAY, etype, count, None, start)


def _read_tensor_info(cur: _Cursor, index: int) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
    name = cur.string(f"name of tensor {index}")
    if len(name.encode()) >= MAX_NAME:
        cur.fail(f"tensor {index} name {name[:40]!r}... is {len(name.encode())} bytes; ggml allows at most "
                 f"{MAX_NAME - 1}")
    n_dims = cur.u32(f"n_dims of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        cur.fail(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
    cur.need(8 * n_dims, f"shape of tensor {name!r}")
    shape = struct.unpack_from(f"<{n_dims}Q", cur.buf, cur.pos)
    cur.pos += 8 * n_dims
    raw_type = cur.u32(f"type of tensor {name!r}")
    offset = cur.u64(f"data offset of tensor {name!r}")
    if any(d == 0 or d >= 2**63 for d in shape):
        cur.fail(f"tensor {name!r} has invalid shape {list(shape)} (dimensions must be positive)")
    qtype = _GGML_TYPES.get(raw_type)
    if qtype is None:
        cur.fail(f"tensor {name!r} has unknown ggml type id {raw_type}")
    return name, shape, qtype, offset


def check_gguf(path) -> GGUFLayout:
    """Validate the header and tensor table of the GGUF file at `path`; raise LlmqError naming the first problem."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < _HEADER.size:
                raise LlmqError(f"{path}: not a GGUF file ({size} bytes, shorter than the {_HEADER.size}-byte header)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _check(mm, size, path)
    except IsADirectoryError:
        raise LlmqError(f"{path} is a directory, not a GGUF file") from None
    except OSError as e:
        raise LlmqError(f"cannot read {path}: {e.strerror or e}") from None


def _check(buf, size: int, path: Path) -> GGUFLayout:
    cur = _Cursor(buf, size, str(path))
    magic, version, n_tensors, n_kv = _HEADER.unpack_from(buf, 0)
    cur.pos = _HEADER.size
    if magic != GGUF_MAGIC:
        cur.fail(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    if version not in SUPPORTED_VERSIONS:
        if int.from_bytes(version.to_bytes(4, "little"), "big") in SUPPORTED_VERSIONS:
            cur.fail("big-endian GGUF files are not supported")
        cur.fail(f"unsupported GGUF version {version} (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
    # smallest encodings: a kv pair is a 1-byte key (8 + 1), a type (4) and a 1-byte value;
    # a tensor info is a 1-byte name (8 + 1), n_dims (4), one dimension (8), a type (4) and an offset (8)
    left = size - cur.pos
    if n_kv > left // 14:
        cur.fail(f"header claims {n_kv} metadata entries, more than {left} bytes can hold (truncated?)")
    if n_tensors > left // 33:
        cur.fail(f"header claims {n_tensors} tensors, more than {left} bytes can hold (truncated?)")

    kv: dict[str, KVInfo] = {}
    for i in range(n_kv):
        key = cur.string(f"key of metadata entry {i}")
        if not key:
            cur.fail(f"metadata entry {i} has an empty key")
        if key in kv:
            cur.fail(f"duplicate metadata key {key!r}")
        kv[key] = _read_kv(cur, key)

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in kv:
        a = kv["general.alignment"]
        if a.type != GGUFValueType.UINT32:
            cur.fail(f"general.alignment has type {a.type.name}, expected UINT32")
        alignment = a.value
        if alignment == 0 or alignment & (alignment - 1):
            cur.fail(f"general.alignment {alignment} is not a power of two")

    infos = []
    names: set[str] = set()
    for i in range(n_tensors):
        info = _read_tensor_info(cur, i)
        if info[0] in names:
            cur.fail(f"duplicate tensor name {info[0]!r}")
        names.add(info[0])
        infos.append(info)

    data_offset = cur.pos + (-cur.pos % alignment)
    tensors = []
    for name, shape, qtype, offset in infos:
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_elements = 1
        for d in shape:
            n_elements *= d
        if n_elements >= 2**63:
            cur.fail(f"tensor {name!r} has {n_elements} elements (shape {list(shape)}), more than ggml can count")
        if shape[0] % block:
            cur.fail(f"tensor {name!r}: row length {shape[0]} is not a multiple of the {qtype.name} block size {block}")
        n_bytes = n_elements // block * type_size
        if offset % alignment:
            cur.fail(f"tensor {name!r}: data offset {offset} is not a multiple of the alignment {alignment}")
        if data_offset + offset + n_bytes > size:
            cur.fail(f"tensor {name!r}: bytes {data_offset + offset}..{data_offset + offset + n_bytes} lie beyond "
                     f"the end of the file ({size} bytes; truncated?)")
        tensors.append(TensorInfo(name, qtype, tuple(shape), n_elements, n_bytes, data_offset + offset))

    by_start = sorted(tensors, key=lambda t: t.offset)
    for a, b in zip(by_start, by_start[1:]):
        if b.offset < a.offset + a.n_bytes:
            cur.fail(f"tensors {a.name!r} and {b.name!r} overlap")
    return GGUFLayout(path, size, version, alignment, data_offset, kv, tensors)


_NUMPY_TYPES = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4", GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


class StringArray(Sequence):
    """A GGUF string array kept as its encoded bytes, each string decoded when it is read: a 49k-token vocabulary and
    its 49k merges as Python strings take ~8 MB, as bytes and positions ~2.5 MB. Compares equal to the list of its
    strings."""

    def __init__(self, data: bytes, starts: array):
        self._data = data
        self._starts = starts  # element i is data[starts[i] + 8 : starts[i + 1]] (after its u64 length)

    def __len__(self) -> int:
        return len(self._starts) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError("StringArray index out of range")
        return self._data[self._starts[i] + 8:self._starts[i + 1]].decode("utf-8")

    def __iter__(self):
        data, starts = self._data, self._starts
        for i in range(len(starts) - 1):
            yield data[starts[i] + 8:starts[i + 1]].decode("utf-8")

    def __eq__(self, other) -> bool:
        if isinstance(other, StringArray):
            return self._data == other._data
        return isinstance(other, (list, tuple)) and len(other) == len(self) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"StringArray({len(self)} strings)"


def read_metadata(layout: GGUFLayout, lazy_strings: bool = False) -> dict:
    """All key/value pairs of a checked file as Python values (the same dict runtime.gguf_file.read_metadata
    builds from gguf.GGUFReader, at a fraction of the time and memory: no numpy array per vocabulary string).
    lazy_strings: string arrays become StringArray sequences (decoded when read) instead of lists."""
    import numpy as np

    meta = {}
    with open(layout.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for key, kv in layout.kv.items():
            if kv.type != GGUFValueType.ARRAY:
                meta[key] = kv.value
            elif kv.element_type == GGUFValueType.STRING:
                starts, pos = array("q"), kv.offset
                for _ in range(kv.count):
                    starts.append(pos - kv.offset)
                    (n,) = _U64.unpack_from(mm, pos)
                    pos += 8 + n
                starts.append(pos - kv.offset)
                strings = StringArray(mm[kv.offset:pos], starts)
                meta[key] = strings if lazy_strings else list(strings)
            else:
                meta[key] = np.frombuffer(mm, dtype=_NUMPY_TYPES[kv.element_type], count=kv.count,
                                          offset=kv.offset).tolist()
    return meta
