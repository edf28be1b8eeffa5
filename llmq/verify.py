"""`llmq verify`: is this GGUF file whole and self-consistent?

    container:  `check_gguf` accepts the header, tensor table, offsets and sizes (a file it accepts, gguf-py's
                reader opens: tests/test_fuzz.py holds it to that);
    weights:    every tensor decodes (gguf-py's reference dequantizers) to finite values, read in chunks of about
                `CHUNK_VALUES` values so memory stays bounded whatever the tensor size;
    metadata:   the architecture's hyper-parameters are present and positive, tensor shapes agree with them,
                tokenizer arrays have one entry per token, special token ids are inside the vocabulary, a
                byte-level BPE ("gpt2") vocabulary has merges.

Exit codes: 0 clean, 1 problems found (one per line on stdout), 2 unreadable input (one line on stderr).
"""

from __future__ import annotations

import mmap
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from .gguf_check import GGUFLayout, TensorInfo, check_gguf, read_metadata

CHUNK_VALUES = 1 << 20  # decoded float32 values per step: 4 MiB, plus the dequantizer's temporaries

_INT_TYPES = {QT.I8: np.int8, QT.I16: np.int16, QT.I32: np.int32, QT.I64: np.int64}
_TOKEN_TYPES = range(0, 7)  # gguf.TokenType (1..6) and 0, "undefined", which llama.cpp also accepts


@dataclass
class VerifyReport:
    path: Path
    n_tensors: int = 0
    n_weights: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_gguf(path, *, decode: bool = True) -> VerifyReport:
    """Check the GGUF file at `path`. Raises LlmqError if it cannot be read at all; otherwise returns a report
    whose `problems` lists everything found wrong (empty when the file is clean)."""
    path = Path(path)
    layout = check_gguf(path)
    meta = read_metadata(layout)
    report = VerifyReport(path, len(layout.tensors), sum(t.n_elements for t in layout.tensors))
    report.problems += metadata_problems(meta, layout)
    if decode:
        report.problems += weight_problems(layout)
    return report


# ---- weights ------------------------------------------------------------------------------------------------------

def _decode_chunks(buf, t: TensorInfo):
    """The tensor's values as float32 arrays of about CHUNK_VALUES each, in order."""
    from gguf.quants import dequantize

    block, type_size = GGML_QUANT_SIZES[t.ggml_type]
    n_blocks = t.n_elements // block
    step = max(1, CHUNK_VALUES // block)
    for first in range(0, n_blocks, step):
        count = min(step, n_blocks - first)
        raw = np.frombuffer(buf, dtype=np.uint8, count=count * type_size, offset=t.offset + first * type_size)
        if t.ggml_type in _INT_TYPES:
            yield raw.view(_INT_TYPES[t.ggml_type]).astype(np.float32)
        elif t.ggml_type == QT.F64:
            with np.errstate(over="ignore"):
                yield raw.view(np.float64).astype(np.float32)
        else:  # one row of `count` blocks: the dequantizers work on whole rows
            with np.errstate(all="ignore"):  # NaN/Inf scales are counted below, not warned about
                values = dequantize(raw.reshape(1, -1), t.ggml_type)
            yield np.asarray(values, dtype=np.float32).reshape(-1)


def tensor_problems(buf, t: TensorInfo) -> list[str]:
    bad = 0
    try:
        for values in _decode_chunks(buf, t):
            bad += values.size - int(np.count_nonzero(np.isfinite(values)))
    except NotImplementedError:
        return [f"tensor {t.name}: no reference decoder for type {t.ggml_type.name}; values not checked"]
    if bad:
        return [f"tensor {t.name} ({t.ggml_type.name}) has {bad} NaN/Inf value(s) of {t.n_elements}"]
    return []


def weight_problems(layout: GGUFLayout) -> list[str]:
    problems: list[str] = []
    if not layout.tensors:
        return problems
    with open(layout.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for t in layout.tensors:
            problems += tensor_problems(mm, t)
            # the decoded pages are file-backed: tell the kernel we are done so RSS stays one chunk, not the file
            start = t.offset - t.offset % mmap.PAGESIZE
            if hasattr(mm, "madvise") and t.offset + t.n_bytes > start:
                mm.madvise(mmap.MADV_DONTNEED, start, t.offset + t.n_bytes - start)
    return problems


# ---- metadata -----------------------------------------------------------------------------------------------------

def _positive_int(meta: dict, key: str, problems: list[str], required: bool = True) -> int | None:
    if key not in meta:
        if required:
            problems.append(f"metadata lacks {key}")
        return None
    v = meta[key]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        problems.append(f"metadata {key} = {v!r} is not a positive integer")
        return None
    return v


def _expected_shapes(arch: str, meta: dict, n_vocab: int, tensor_names: set[str],
                     problems: list[str]) -> dict[str, tuple[int, ...]] | None:
    """GGUF name -> ggml shape (ne0 first) for the architectures llmq converts; None for others."""
    from . import arch as archs

    model_type = archs.GGUF_TO_MODEL_TYPE.get(arch)
    if model_type is None:
        return None
    k = f"{arch}."
    n_layer = _positive_int(meta, k + "block_count", problems)
    n_embd = _positive_int(meta, k + "embedding_length", problems)
    n_ff = _positive_int(meta, k + "feed_forward_length", problems)
    n_head = _positive_int(meta, k + "attention.head_count", problems)
    _positive_int(meta, k + "context_length", problems)
    if not isinstance(meta.get(k + "attention.layer_norm_rms_epsilon"), float):
        problems.append(f"metadata lacks {k}attention.layer_norm_rms_epsilon (a float)")
    n_head_kv = _positive_int(meta, k + "attention.head_count_kv", problems, required=False) or n_head
    if None in (n_layer, n_embd, n_ff, n_head):
        return None
    if n_head % n_head_kv:
        problems.append(f"{k}attention.head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
        return None
    head_dim = _positive_int(meta, k + "attention.key_length", problems, required=False) or n_embd // n_head
    hp = archs.HParams(n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv,
                       head_dim=head_dim, n_vocab=n_vocab, n_ctx=1, rms_eps=1e-6, rope_theta=1e4, rope={},
                       tied_embeddings="output.weight" not in tensor_names, head_dim_explicit=True)
    if n_layer > len(tensor_names):  # a lying block_count must not make us build millions of names
        problems.append(f"{k}block_count {n_layer} exceeds the number of tensors ({len(tensor_names)})")
        return None
    numpy_order = archs.expected_shapes(archs.ARCHS[model_type], hp)
    return {name: tuple(reversed(shape)) for name, shape in numpy_order.items()}


def metadata_problems(meta: dict[str, Any], layout: GGUFLayout) -> list[str]:
    problems: list[str] = []
    shapes = {t.name: t.shape for t in layout.tensors}

    tokens = meta.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens) if isinstance(tokens, list) else None
    if tokens is None:
        problems.append("metadata lacks tokenizer.ggml.tokens (no vocabulary)")
    elif not n_tokens:
        problems.append("tokenizer.ggml.tokens is empty or not a list")
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        v = meta.get(key)
        if v is not None and n_tokens is not None and (not isinstance(v, list) or len(v) != n_tokens):
            problems.append(f"{key} has {len(v) if isinstance(v, list) else 'no'} entries, "
                            f"tokenizer.ggml.tokens has {n_tokens}")
    types = meta.get("tokenizer.ggml.token_type")
    if isinstance(types, list) and any(not isinstance(x, int) or x not in _TOKEN_TYPES for x in types):
        problems.append("tokenizer.ggml.token_type holds values outside 0..6")
    model = meta.get("tokenizer.ggml.model")
    if tokens is not None and not isinstance(model, str):
        problems.append("metadata lacks tokenizer.ggml.model")
    if model == "gpt2" and not meta.get("tokenizer.ggml.merges"):
        problems.append("tokenizer.ggml.model is gpt2 (byte-level BPE) but tokenizer.ggml.merges is missing or empty")
    for key, v in meta.items():
        if re.fullmatch(r"tokenizer\.ggml\.\w+_token_id", key):
            if isinstance(v, bool) or not isinstance(v, int):
                problems.append(f"{key} = {v!r} is not an integer")
            elif n_tokens and not 0 <= v < n_tokens:
                problems.append(f"{key} = {v} is outside the vocabulary (0..{n_tokens - 1})")

    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        problems.append("metadata lacks general.architecture")
        return problems
    vocab_size = meta.get(f"{arch}.vocab_size")
    if vocab_size is not None and n_tokens and vocab_size != n_tokens:
        problems.append(f"{arch}.vocab_size {vocab_size!r} differs from the {n_tokens} tokens of the vocabulary")
    emb = shapes.get("token_embd.weight")
    if emb is None:
        problems.append("tensor token_embd.weight is missing")
    n_vocab = n_tokens or (emb[1] if emb is not None and len(emb) == 2 else 0)

    expected = _expected_shapes(arch, meta, n_vocab, set(shapes), problems)
    if expected is not None:
        for name, shape in expected.items():
            if name not in shapes:
                problems.append(f"tensor {name} is missing")
            elif shapes[name] != shape:
                problems.append(f"tensor {name} has shape {list(shapes[name])}, the metadata implies {list(shape)}")
        # `<weight>.scale` (shape {1}): FP4 tensor scales, llmq/fp4.py
        extra = [n for n in shapes if n not in expected and n != "rope_freqs.weight"
                 and not (n.endswith(".scale") and tuple(shapes[n]) == (1,) and n[:-6] + ".weight" in expected)]
        if extra:
            problems.append(f"{len(extra)} tensor(s) unknown to a {arch} model, e.g. {extra[0]}")
        return problems

    # another architecture: the checks that hold for every transformer llama.cpp runs
    n_layer = _positive_int(meta, f"{arch}.block_count", problems)
    n_embd = _positive_int(meta, f"{arch}.embedding_length", problems)
    if emb is not None and n_embd is not None and emb[0] != n_embd:
        problems.append(f"token_embd.weight rows have {emb[0]} values, {arch}.embedding_length is {n_embd}")
    if emb is not None and n_tokens and len(emb) == 2 and emb[1] != n_tokens:
        problems.append(f"token_embd.weight has {emb[1]} rows for a vocabulary of {n_tokens} tokens")
    if n_layer is not None:
        layers = {int(m.group(1)) for n in shapes if (m := re.match(r"blk\.(\d+)\.", n))}
        outside = sorted(i for i in layers if i >= n_layer)
        if outside:
            problems.append(f"tensors of block {outside[0]} exist but {arch}.block_count is {n_layer}")
        elif len(layers) != n_layer:
            problems.append(f"{arch}.block_count is {n_layer} but tensors exist for {len(layers)} block(s)")
    return problems


# ---- command line -------------------------------------------------------------------------------------------------

def _cmd_verify(args) -> int:
    report = verify_gguf(args.file, decode=not args.metadata_only)
    if report.ok:
        what = "metadata consistent" + ("" if args.metadata_only else ", all weights finite")
        print(f"{report.path}: OK ({report.n_tensors} tensors, {report.n_weights:,} weights; {what})")
        return 0
    for p in report.problems:
        print(f"{report.path}: {p}")
    print(f"{report.path}: {len(report.problems)} problem(s)", file=sys.stderr)
    return 1


def register(subparsers) -> None:
    """Add `verify` to an argparse subparsers object (its func returns the exit code: 0 clean, 1 problems)."""
    v = subparsers.add_parser("verify", help="check a GGUF file: structure, finite weights, consistent metadata",
                              description=__doc__.split("\n\n")[0])
    v.add_argument("file")
    v.add_argument("--metadata-only", action="store_true", help="skip decoding the weights")
    v.set_defaults(func=_cmd_verify)


def main(argv: list[str] | None = None) -> int:
    """`python -m llmq.verify FILE`: the subcommand on its own, with the CLI's error conventions."""
    from .cli import main as cli_main

    return cli_main(["verify", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
