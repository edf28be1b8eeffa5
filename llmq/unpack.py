"""`llmq unpack`: GGUF -> HF checkpoint (safetensors, config.json, tokenizer files), the inverse of convert.

Tensors are dequantised with gguf-py's reference dequantizers and streamed into one safetensors file, so the
output is a checkpoint transformers loads and llmq converts back."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from . import arch as archs
from .atomic import atomic_directory, check_interrupted
from .errors import LlmqError

_DTYPE = {"bf16": "BF16", "f16": "F16", "f32": "F32"}


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, like torch's float32 -> bfloat16 cast (NaN stays NaN)."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def _encode(x: np.ndarray, dtype: str) -> bytes:
    if dtype == "bf16":
        return f32_to_bf16_bits(x).tobytes()
    return np.ascontiguousarray(x, dtype=np.float16 if dtype == "f16" else np.float32).tobytes()


def _config_from_metadata(meta: dict, arch: str, has_output: bool, tok) -> dict:
    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", n_embd // n_head))
    model_type = archs.GGUF_TO_MODEL_TYPE[arch]
    cls = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[model_type]
    cfg = {
        "architectures": [cls], "model_type": model_type,
        "hidden_size": n_embd, "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")), "num_attention_heads": n_head,
        "num_key_value_heads": int(get("attention.head_count_kv", n_head)), "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "vocab_size": int(get("vocab_size", tok.vocab_size)),
        "tie_word_embeddings": not has_output, "hidden_act": "silu", "torch_dtype": "bfloat16",
        "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
    }
    scaling = get("rope.scaling.type")
    if scaling in ("linear", "yarn"):
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": float(get("rope.scaling.factor"))}
        if scaling == "yarn":
            cfg["rope_scaling"]["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
    if model_type == "llama":
        cfg["attention_bias"] = False
        cfg["mlp_bias"] = False
    return cfg


def unpack(path, out_dir, *, dtype: str = "bf16", force: bool = False) -> Path:
    from runtime.gguf_file import open_gguf, read_metadata
    from runtime.tokenizer import GGUFTokenizer

    if dtype not in _DTYPE:
        raise LlmqError(f"--dtype must be one of {', '.join(_DTYPE)}")
    reader = open_gguf(path)
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in archs.GGUF_TO_MODEL_TYPE:
        raise LlmqError(f"{path}: architecture {arch!r} cannot be unpacked; supported: "
                        f"{', '.join(archs.GGUF_TO_MODEL_TYPE)}")
    names = {t.name for t in reader.tensors}
    tok = GGUFTokenizer.from_metadata(meta)
    config = _config_from_metadata(meta, arch, "output.weight" in names, tok)
    if "rope_freqs.weight" in names:
        raise LlmqError(f"{path}: llama3 rope scaling factors cannot be turned back into config parameters yet")
    n_head, n_head_kv = config["num_attention_heads"], config["num_key_value_heads"]

    # safetensors: 8-byte header length, JSON header, then the tensors back to back
    entries, offset = {}, 0
    tensors = []
    for t in reader.tensors:
        hf = archs.gguf_to_hf_name(t.name)
        if hf is None:
            raise LlmqError(f"{path}: tensor {t.name!r} has no HF counterpart")
        shape = [int(n) for n in reversed(t.shape.tolist())]
        nbytes = int(np.prod(shape)) * {"bf16": 2, "f16": 2, "f32": 4}[dtype]
        entries[hf] = {"dtype": _DTYPE[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        tensors.append((t, hf, shape))
    entries["__metadata__"] = {"format": "pt"}
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)

    with atomic_directory(Path(out_dir), force=force) as tmp:
        with open(tmp / "model.safetensors", "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for t, hf, shape in tensors:
                check_interrupted()
                qtype = QT(int(t.tensor_type))
                w = np.asarray(dequantize(np.asarray(t.data), qtype), dtype=np.float32).reshape(shape)
                if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias")):
                    w = archs.unpermute_qk(w, n_head)
                elif arch == "llama" and t.name.endswith(("attn_k.weight", "attn_k.bias")):
                    w = archs.unpermute_qk(w, n_head_kv)
                f.write(_encode(w, dtype))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = {"bos_token_id": tok.bos_id, "eos_token_id": sorted(tok.eog_ids) if len(tok.eog_ids) > 1 else tok.eos_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        tok.to_hf(tmp)
    return Path(out_dir)
