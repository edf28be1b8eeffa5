"""Reading Hugging Face checkpoints: resolve the source, read config.json, and read safetensors tensor by tensor.

The safetensors header is parsed and validated here (sizes, dtypes, shapes, offsets inside the file, no overlaps)
before anything is allocated, so a truncated or lying file gives one clear error instead of a crash or a huge
allocation. Tensors are read from a memory map, one at a time, so converting never holds the whole model in RAM.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import LlmqError

# safetensors dtype -> (numpy dtype used to read the bytes, bytes per element)
_DTYPES = {
    "F32": (np.float32, 4),
    "F16": (np.float16, 2),
    "BF16": (np.uint16, 2),  # widened to float32 by bits, numpy has no bfloat16
    "F64": (np.float64, 8),
    "I64": (np.int64, 8),
    "I32": (np.int32, 4),
    "I16": (np.int16, 2),
    "I8": (np.int8, 1),
    "U8": (np.uint8, 1),
    "BOOL": (np.bool_, 1),
}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    begin: int  # absolute byte offset in the file
    end: int


def read_safetensors_header(path: Path) -> list[TensorEntry]:
    """Validated tensor table of one .safetensors file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LlmqError(f"{path.name}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise LlmqError(f"{path.name}: header length {n} does not fit in a file of {size} bytes (truncated?)")
            raw = f.read(n)
    except OSError as e:
        raise LlmqError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 / JSON, 4300+ digit ints, nesting beyond the stack
        raise LlmqError(f"{path.name}: safetensors header is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise LlmqError(f"{path.name}: safetensors header is not a JSON object")
    data_start = 8 + n
    data_len = size - data_start
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise LlmqError(f"{path.name}: tensor {name!r} has a malformed header entry")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise LlmqError(f"{path.name}: tensor {name!r} has unsupported dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)):
            raise LlmqError(f"{path.name}: tensor {name!r} has an invalid shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise LlmqError(f"{path.name}: tensor {name!r} has invalid data_offsets {offs!r}")
        begin, end = offs
        nbytes = math.prod(shape) * _DTYPES[dtype][1]  # Python ints: np.prod(int64) wraps round silently
        if not (0 <= begin <= end <= data_len):
            raise LlmqError(f"{path.name}: tensor {name!r} lies outside the file "
                            f"(bytes {begin}..{end} of {data_len}; truncated file?)")
        if end - begin != nbytes:
            raise LlmqError(f"{path.name}: tensor {name!r} has {end - begin} bytes but shape {shape} x {dtype} "
                            f"needs {nbytes}")
        entries.append(TensorEntry(name, dtype, tuple(shape), path, data_start + begin, data_start + end))
    ordered = sorted(entries, key=lambda e: e.begin)
    for a, b in zip(ordered, ordered[1:]):
        if b.begin < a.end:
            raise LlmqError(f"{path.name}: tensors {a.name!r} and {b.name!r} overlap")
    return entries


class Checkpoint:
    """An HF checkpoint directory: config plus a lazily read tensor table over one or more safetensors shards."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        self.config = load_config(self.dir)
        self.entries: dict[str, TensorEntry] = {}
        for shard in self._shard_files():
            for e in read_safetensors_header(shard):
                if e.name in self.entries:
                    raise LlmqError(f"tensor {e.name!r} appears in two shards ({self.entries[e.name].file.name}, "
                                    f"{shard.name})")
                self.entries[e.name] = e
        self._maps: dict[Path, mmap.mmap] = {}

    def _shard_files(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                names = sorted(set(weight_map.values()))
                if not all(isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..") for n in names):
                    raise TypeError("shard names must be plain file names")
            except (ValueError, RecursionError, KeyError, TypeError, AttributeError, OSError):
                raise LlmqError(f"{index}: not a valid safetensors index (expected a 'weight_map' object)") from None
            files = [self.dir / n for n in names]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise LlmqError(f"{self.dir}: shards listed in the index are missing: {', '.join(missing[:3])}")
            return files
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            if list(self.dir.glob("*.bin")) or list(self.dir.glob("*.pth")):
                raise LlmqError(f"{self.dir}: only PyTorch pickle weights found; llmq reads safetensors only "
                                "(pickles can run code); convert them with transformers' save_pretrained first")
            raise LlmqError(f"{self.dir}: no *.safetensors weights found")
        return files

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def read(self, name: str) -> np.ndarray:
        """The tensor as float32 (a fresh array; the mmap is not kept referenced)."""
        e = self.entries[name]
        mm = self._maps.get(e.file)
        if mm is None:
            with open(e.file, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[e.file] = mm
        np_dtype, _ = _DTYPES[e.dtype]
        count = int(np.prod(e.shape, dtype=np.int64)) if e.shape else 1
        raw = np.frombuffer(mm, dtype=np_dtype, count=count, offset=e.begin).reshape(e.shape)
        if e.dtype == "BF16":
            return bf16_to_f32(raw)
        return raw.astype(np.float32)

    def close(self) -> None:
        for mm in self._maps.values():
            mm.close()
        self._maps.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise LlmqError(f"{model_dir}: no config.json (is this a Hugging Face model directory?)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError, OSError) as e:  # ValueError covers JSON, UTF-8 and 4300+ digit ints
        raise LlmqError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise LlmqError(f"{path}: expected a JSON object")
    # multimodal wrappers keep the language model's settings under text_config
    if isinstance(config.get("text_config"), dict) and "num_hidden_layers" not in config:
        config = {**config, **config["text_config"]}
    return config


def resolve_source(src: str) -> Path:
    """A local directory as is; anything else is treated as a hub id and downloaded (safetensors, configs,
    tokenizer files only)."""
    p = Path(src).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise LlmqError(f"{src} is a file; expected a Hugging Face model directory or hub id")
    if src.count("/") != 1 or src.startswith((".", "/")):
        raise LlmqError(f"{src}: no such directory (and not a hub id of the form owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise LlmqError("huggingface-hub is not installed; pass a local model directory instead") from None
    try:
        return Path(snapshot_download(
            src, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]))
    except Exception as e:  # hub errors come in many classes (offline, 404, gated, timeouts)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise LlmqError(f"cannot download {src} from the Hugging Face hub: {msg[:200]}") from None
