"""How much memory a conversion or a model run will take, and whether the machine has it.

Estimates are upper bounds of the anonymous memory (heap) a step allocates on top of the interpreter, plus the file
pages it must keep resident. They come from the code's own structure, with the constant factors measured once:

convert (one tensor at a time, see convert.py), for a tensor of n values encoded as `qtype`:
    4n              the float32 tensor as read (Checkpoint.read always returns a fresh float32 array)
  + 4n              its copy: the Q/K permutation, or the widened uint32 bits of a BF16 source
  + f(qtype) * 4n   the encoder's temporaries (tracemalloc peaks on a 1024x4096 tensor: <= 4.5 for the legacy and
                    k-quants, 8 for BF16, 1 for F16)
  + nbytes          the encoded tensor
  + source bytes    the mapped checkpoint pages of that tensor (file-backed: counted once, for the largest)
  peak = the largest of these sums over all tensors (tensors are converted one after another).

runtime (the GGUF is memory-mapped; every weight page is touched for every token, so all of it must stay resident):
    file tensor bytes
  + 2 KiB per metadata string          gguf.GGUFReader keeps two numpy arrays per string (measured: 1.7 KiB on
                                       SmolLM2's 98k vocabulary and merges strings)
  + KV cache                           2 (K and V) x n_layer x n_ctx x kv_dim x bytes per value of the cache type
  + one prefill batch of B = min(512, n_ctx) tokens, float32, twice for temporaries:
        B x (4 n_embd + q_dim + 2 kv_dim + 3 n_ff)   activations
      + B x n_head x n_ctx x 2                      attention scores and their softmax
      + B x n_vocab                                 logits

`check_memory` compares a need with MemAvailable (/proc/meminfo) and, inside a container, with the cgroup's
remaining allowance; `max_memory` (the CLI's --max-memory) replaces that figure when the user knows better.
"""

from __future__ import annotations

import re
from pathlib import Path
from .errors import LlmqError

MiB = 1 << 20
_QUANT_WORK = {"F32": 0.25, "F16": 1.0, "BF16": 8.0}
_DEFAULT_QUANT_WORK = 4.5  # legacy and k-quant encoders
_CACHE_BYTES_PER_VALUE = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
PREFILL_CHUNK = 512  # runtime.models.llama.PREFILL_CHUNK
_READER_BYTES_PER_STRING = 2048


def estimate_convert_peak(ckpt_entries, plans) -> int:
    """Peak bytes converting `plans` (convert.TensorPlan list) from a checkpoint whose tensor table is
    `ckpt_entries` (Checkpoint.entries: a dict or iterable of checkpoint.TensorEntry)."""
    entries = ckpt_entries.values() if isinstance(ckpt_entries, dict) else ckpt_entries
    largest_source = max((e.end - e.begin for e in entries), default=0)
    peak = 0
    for p in plans:
        n = 1
        for d in p.shape:
            n *= int(d)
        work = _QUANT_WORK.get(p.qtype.name, _DEFAULT_QUANT_WORK)
        peak = max(peak, int(4 * n * (2 + work)) + p.nbytes)
    return peak + largest_source


def _hparam(kv: dict, arch: str, key: str, default: int | None = None) -> int:
    info = kv.get(f"{arch}.{key}")
    v = info.value if info is not None else default
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise LlmqError(f"metadata {arch}.{key} is missing or not a positive integer")
    return v


def estimate_runtime_peak(gguf_path, n_ctx: int, cache_type_k: str = "f16", cache_type_v: str = "f16") -> int:
    """Peak bytes running the GGUF model at `gguf_path` with a context of n_ctx tokens (see the module doc)."""
    from gguf import GGUFValueType

    from .gguf_check import check_gguf

    for t in (cache_type_k, cache_type_v):
        if t not in _CACHE_BYTES_PER_VALUE:
            raise LlmqError(f"unknown cache type {t!r} (choose from {', '.join(_CACHE_BYTES_PER_VALUE)})")
    if n_ctx < 1:
        raise LlmqError(f"n_ctx must be positive, got {n_ctx}")
    layout = check_gguf(gguf_path)
    kv = layout.kv
    arch_info = kv.get("general.architecture")
    arch = arch_info.value if arch_info is not None else None
    if not isinstance(arch, str):
        raise LlmqError(f"{gguf_path}: metadata lacks general.architecture")
    n_layer = _hparam(kv, arch, "block_count")
    n_embd = _hparam(kv, arch, "embedding_length")
    n_ff = _hparam(kv, arch, "feed_forward_length")
    n_head = _hparam(kv, arch, "attention.head_count")
    n_head_kv = _hparam(kv, arch, "attention.head_count_kv", n_head)
    head_dim = _hparam(kv, arch, "attention.key_length", n_embd // n_head)
    emb = next((t for t in layout.tensors if t.name == "token_embd.weight"), None)
    n_vocab = emb.shape[1] if emb is not None and len(emb.shape) == 2 else 0

    weights = sum(t.n_bytes for t in layout.tensors)
    n_strings = sum(i.count for i in kv.values()
                    if i.type == GGUFValueType.STRING or i.element_type == GGUFValueType.STRING)
    kv_dim, q_dim = n_head_kv * head_dim, n_head * head_dim
    cache = kv_cache_bytes(n_layer, n_ctx, kv_dim, cache_type_k, cache_type_v)
    batch = min(PREFILL_CHUNK, n_ctx)
    activations = 2 * 4 * batch * ((4 * n_embd + q_dim + 2 * kv_dim + 3 * n_ff) + n_head * n_ctx * 2 + n_vocab)
    return int(weights + _READER_BYTES_PER_STRING * n_strings + cache + activations)


def kv_cache_bytes(n_layer: int, n_ctx: int, kv_dim: int, cache_type_k: str = "f16", cache_type_v: str = "f16") -> int:
    """K and V rows for n_ctx positions in every layer (quantised types: 32-value blocks of 34 / 18 bytes)."""
    per_row = kv_dim * (_CACHE_BYTES_PER_VALUE[cache_type_k] + _CACHE_BYTES_PER_VALUE[cache_type_v])
    return int(n_layer * n_ctx * per_row)


def _meminfo_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        text = meminfo.read_text()
    except OSError:
        return None
    m = re.search(r"^MemAvailable:\s+(\d+)\s*kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


def _cgroup_available(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """What the cgroup v2 memory limit still allows (None without a limit)."""
    try:
        limit = (root / "memory.max").read_text().strip()
        used = int((root / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    if limit == "max" or not limit.isdigit():
        return None
    return max(0, int(limit) - used)


def available_memory() -> int | None:
    """Bytes this process can still allocate without swapping or being OOM-killed; None if unknown."""
    figures = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    return min(figures) if figures else None


def parse_memory_size(text: str) -> int:
    """'512M', '4G', '1.5GiB', '1000000' -> bytes (the --max-memory argument)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.I)
    if not m:
        raise LlmqError(f"--max-memory {text!r}: expected a size such as 512M, 4G or 1.5G")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def check_memory(needed_bytes: int, what: str, max_memory: int | str | None = None) -> int | None:
    """Raise LlmqError if `what` needs more than the memory available (or than `max_memory`, if given).
    Returns the figure compared against (None when it cannot be known, e.g. not Linux: then nothing is checked)."""
    if max_memory is not None:
        available = parse_memory_size(max_memory) if isinstance(max_memory, str) else int(max_memory)
        limit = "--max-memory allows {}"
    else:
        available = available_memory()
        limit = "only {} is available"
    if available is None:
        return None
    if needed_bytes > available:
        hint = ("raise --max-memory if you know better" if max_memory is not None
                else "free memory, use a smaller context / cache type, or pass --max-memory to override")
        have = limit.format(f"{available / MiB:,.0f} MiB")
        raise LlmqError(f"{what} needs about {needed_bytes / MiB:,.0f} MiB of memory but {have}; {hint}")
    return available
