"""Reading GGUF files for the runtime: metadata as plain Python values, tensors as zero-copy views of the mapped file.

gguf.GGUFReader maps the file with np.memmap, so `tensors()` returns views into the page cache: loading a model
costs no copy of its weights, and pages are read from disk when a kernel first touches them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from llmq.errors import LlmqError


def open_gguf(path) -> GGUFReader:
    """Map a GGUF file; any problem with the file becomes a one-line LlmqError."""
    path = Path(path)
    if not path.is_file():
        raise LlmqError(f"no such GGUF file: {path}")
    from llmq.gguf_check import check_gguf
    check_gguf(path)  # validates every count, length, type and offset before gguf-py trusts them
    try:
        return GGUFReader(path, "r")
    except Exception as e:  # gguf-py raises ValueError, struct.error, IndexError... on malformed files
        raise LlmqError(f"{path} is not a readable GGUF file: {e}") from e


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """All key/value pairs of the header as Python values (str, int, float, bool, or lists of them).

    The GGUF.* pseudo-fields gguf-py adds (version, tensor_count, kv_count) are dropped: they describe the
    container, not the model."""
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


def tensors(reader: GGUFReader) -> dict[str, Any]:
    """GGUF tensor name -> weight. F32 tensors become float32 arrays shaped (rows, cols) (or (n,) for vectors);
    every other type becomes a kernels.QTensor over the raw block bytes. Both are views of the mapped file."""
    out: dict[str, Any] = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml ne is fastest-first: (cols, rows)
        qtype = GGMLQuantizationType(int(t.tensor_type))
        if qtype == GGMLQuantizationType.F32:
            out[t.name] = np.asarray(t.data, dtype=np.float32).reshape(shape)
        elif len(shape) == 1:
            # Vectors (norms, biases, rope factors) are tiny: keep them as float32 whatever their storage type.
            out[t.name] = _dequantize_vector(t.data, qtype, shape[0])
        elif len(shape) == 2:
            from .kernels import QTensor

            out[t.name] = QTensor(np.asarray(t.data), qtype, shape)
        else:
            raise LlmqError(f"tensor {t.name} has {len(shape)} dimensions; only 1-D and 2-D tensors are supported")
    return out


def _dequantize_vector(data: np.ndarray, qtype: GGMLQuantizationType, n: int) -> np.ndarray:
    from gguf.quants import dequantize

    return np.asarray(dequantize(np.asarray(data), qtype), dtype=np.float32).reshape(n)
