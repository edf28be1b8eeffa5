"""`llmq inspect`: what a GGUF file holds: metadata and a tensor table with bits per weight."""

from __future__ import annotations

from collections import Counter

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from runtime.gguf_file import open_gguf, read_metadata


def _short(v, max_array: int) -> str:
    if isinstance(v, list):
        head = ", ".join(repr(x) for x in v[:max_array])
        return f"[{head}{', ...' if len(v) > max_array else ''}] ({len(v)} items)"
    s = repr(v)
    return s if len(s) <= 120 else s[:117] + "..."


def tensor_rows(reader) -> list[tuple[str, str, tuple[int, ...], int, float]]:
    rows = []
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        qtype = QT(int(t.tensor_type))
        block, size = GGML_QUANT_SIZES[qtype]
        rows.append((t.name, qtype.name, shape, int(t.n_bytes), 8.0 * size / block))
    return rows


def inspect_gguf(path, show_metadata: bool = True, max_array: int = 8) -> str:
    reader = open_gguf(path)
    lines = [f"{path}: GGUF v{int(reader.fields['GGUF.version'].contents())}, "
             f"{len(reader.tensors)} tensors, {len(reader.fields) - 3} metadata keys"]
    if show_metadata:
        lines.append("")
        for k, v in read_metadata(reader).items():
            lines.append(f"  {k:<44} {_short(v, max_array)}")
    rows = tensor_rows(reader)
    lines += ["", f"  {'tensor':<34} {'type':<6} {'shape':<16} {'bytes':>12} {'bpw':>6}"]
    for name, tname, shape, nbytes, bpw in rows:
        lines.append(f"  {name:<34} {tname:<6} {'x'.join(map(str, shape)):<16} {nbytes:>12,} {bpw:>6.2f}")
    n_weights = sum(int(np.prod(s)) for _, _, s, _, _ in rows)
    n_bytes = sum(b for *_, b, _ in rows)
    counts = Counter(t for _, t, *_ in rows)
    lines += ["", f"  total: {n_weights:,} weights in {n_bytes:,} bytes = {8 * n_bytes / max(1, n_weights):.3f} "
              f"bits/weight; types: " + ", ".join(f"{t} x{n}" for t, n in counts.most_common())]
    return "\n".join(lines)
