"""Reading GGUF files for the runtime: metadata as plain Python values, tensors as zero-copy views of the mapped file.

The file is mapped with np.memmap, so `tensors()` returns views into the page cache: loading a model costs no copy
of its weights, and pages are read from disk when a kernel first touches them.

Two readers of the header: `open_layout` (llmq.gguf_check: validated, vocabulary arrays decoded once, straight into
Python lists) is what the runtime loads models with; `open_gguf` (gguf.GGUFReader, for tools that want its objects)
builds a numpy array per vocabulary string, ~150 MB of peak memory for a 49k-token vocabulary."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from llmq.errors import LlmqError
from llmq.gguf_check import GGUFLayout, check_gguf
from llmq.gguf_check import read_metadata as layout_metadata


def open_layout(path) -> GGUFLayout:
    """The checked header of a GGUF file (key/values and tensor infos); any problem becomes a one-line LlmqError."""
    path = Path(path)
    if not path.is_file():
        raise LlmqError(f"no such GGUF file: {path}")
    return check_gguf(path)  # validates every count, length, type and offset


def open_gguf(path) -> GGUFReader:
    """Map a GGUF file with gguf-py; any problem with the file becomes a one-line LlmqError."""
    path = Path(path)
    open_layout(path)  # gguf-py trusts the header: check it first
    try:
        return GGUFReader(path, "r")
    except Exception as e:  # gguf-py raises ValueError, struct.error, IndexError... on malformed files
        raise LlmqError(f"{path} is not a readable GGUF file: {e}") from e


def read_metadata(reader: GGUFReader | GGUFLayout, lazy_strings: bool = False) -> dict[str, Any]:
    """All key/value pairs of the header as Python values (str, int, float, bool, or lists of them). lazy_strings
    (GGUFLayout only): string arrays as llmq.gguf_check.StringArray, decoded element by element when read.

    The GGUF.* pseudo-fields gguf-py adds (version, tensor_count, kv_count) are dropped: they describe the
    container, not the model."""
    if isinstance(reader, GGUFLayout):
        return layout_metadata(reader, lazy_strings=lazy_strings)
    meta: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        meta[name] = _field_value(field)
    return meta


def _field_value(field) -> Any:
    if not field.types:
        return None
    if field.types[0] == GGUFValueType.ARRAY and field.types[-1] != GGUFValueType.STRING and field.data:
        # One numpy array for the whole field instead of one .tolist() per element (vocab-sized arrays).
        return np.concatenate([field.parts[i] for i in field.data]).tolist()
    return field.contents()


def _tensor_views(source: GGUFReader | GGUFLayout) -> Iterator[tuple[str, GGMLQuantizationType, tuple, np.ndarray]]:
    """(name, ggml type, shape, raw data) of every tensor; shape is reversed from ggml's fastest-first ne, i.e.
    (rows, cols) for a matrix."""
    if isinstance(source, GGUFLayout):
        mapped = np.memmap(source.path, dtype=np.uint8, mode="r")
        for t in source.tensors:
            yield t.name, t.ggml_type, tuple(reversed(t.shape)), mapped[t.offset:t.offset + t.n_bytes]
    else:
        for t in source.tensors:
            yield (t.name, GGMLQuantizationType(int(t.tensor_type)), tuple(int(n) for n in reversed(t.shape.tolist())),
                   np.asarray(t.data))


def tensors(reader: GGUFReader | GGUFLayout) -> dict[str, Any]:
    """GGUF tensor name -> weight. F32 tensors become float32 arrays shaped (rows, cols) (or (n,) for vectors);
    every other type becomes a kernels.QTensor over the raw block bytes. Both are views of the mapped file."""
    out: dict[str, Any] = {}
    for name, qtype, shape, data in _tensor_views(reader):
        if qtype == GGMLQuantizationType.F32:
            out[name] = data.view(np.float32).reshape(shape) if data.dtype == np.uint8 else \
                np.asarray(data, dtype=np.float32).reshape(shape)
        elif len(shape) == 1:
            # Vectors (norms, biases, rope factors) are tiny: keep them as float32 whatever their storage type.
            out[name] = _dequantize_vector(data, qtype, shape[0])
        elif len(shape) == 2:
            from .kernels import QTensor

            out[name] = QTensor(data, qtype, shape)
        else:
            raise LlmqError(f"tensor {name} has {len(shape)} dimensions; only 1-D and 2-D tensors are supported")
    return out


def _dequantize_vector(data: np.ndarray, qtype: GGMLQuantizationType, n: int) -> np.ndarray:
    from gguf.quants import dequantize

    return np.asarray(dequantize(np.asarray(data), qtype), dtype=np.float32).reshape(n)
