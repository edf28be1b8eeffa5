"""Shared pytest setup.

- The helpers in this directory (tiny_models, tiny_tokenizers) import as top-level modules.
- `tiny_gguf(arch, tied=False)`: a session-cached F32 GGUF of a tiny random checkpoint, written here by a minimal
  writer that follows llama.cpp's convert_hf_to_gguf conventions independently of llmq's converter (so the runtime
  tests check the runtime, and a converter bug cannot hide a runtime bug that mirrors it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

# tiny_tokenizers flavour -> tokenizer.ggml.pre name llama.cpp knows the split regex by
PRE_TOKENIZER = {"llama": "llama-bpe", "mistral": "gpt-2", "qwen2": "qwen2", "qwen3": "qwen2"}
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def _permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half rows -> ggml interleaved rope pairs (convert_hf_to_gguf LlamaModel.permute)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_f32_gguf(model_dir: Path, out: Path, arch: str) -> Path:
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    gguf_arch = GGUF_ARCH[arch]
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    w = gguf.GGUFWriter(str(out), gguf_arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    rope = cfg.get("rope_parameters") or {"rope_theta": cfg.get("rope_theta"), **(cfg.get("rope_scaling") or {})}
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if "head_dim" in cfg and cfg["head_dim"] is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if gguf_arch == "llama":
        w.add_vocab_size(cfg["vocab_size"])
        w.add_rope_dimension_count(head_dim)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["id"] for t in tok["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRE_TOKENIZER[arch])
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for _, i in vocab])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    w.add_bos_token_id(ids[tok_cfg["bos_token"]])
    w.add_eos_token_id(ids[tok_cfg["eos_token"]])
    w.add_add_bos_token(False)
    w.add_chat_template(tok_cfg["chat_template"])

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[gguf_arch.upper()], cfg["num_hidden_layers"])
    for hf_name, data in load_file(model_dir / "model.safetensors").items():
        name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        data = data.astype(np.float32)
        if gguf_arch == "llama" and ".attn_q." in name:
            data = _permute_qk(data, n_head)
        if gguf_arch == "llama" and ".attn_k." in name:
            data = _permute_qk(data, n_kv)
        w.add_tensor(name, data)
    if (rope.get("rope_type") or "") == "llama3":
        from llmq.arch import llama3_rope_factors, read_hparams  # the formula only; checked against HF logits

        w.add_tensor("rope_freqs.weight", llama3_rope_factors(read_hparams(cfg)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def make_wide_head_llama(out_dir: Path, head_dim: int = 32) -> Path:
    """A tiny llama with 2 query heads of head_dim 32 or 64 and 1 kv head: 32 is the smallest head llama.cpp accepts
    a quantised KV cache for (the tiny_models checkpoints have head_dim 16), 64 the smallest it rotates such a cache
    for (kvcache.rotation_chunks)."""
    import torch
    import transformers
    from tiny_tokenizers import save_hf_tokenizer, train_bpe_tokenizer

    tok = train_bpe_tokenizer("llama3")
    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=2 * head_dim, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=10000.0, bos_token_id=tok.token_to_id("<|im_start|>"), eos_token_id=tok.token_to_id("<|im_end|>"))
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    model.save_pretrained(out_dir, safe_serialization=True)
    save_hf_tokenizer(tok, out_dir)
    return Path(out_dir)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """tiny_gguf(arch, tied=False, rope_scaling=None) -> (gguf path, HF checkpoint dir), cached per session.
    arch "llama-head32" / "llama-head64" is make_wide_head_llama."""
    from tiny_models import make_tiny_checkpoint

    made: dict = {}

    def make(arch: str, tied: bool = False, rope_scaling: dict | None = None):
        key = (arch, tied, json.dumps(rope_scaling, sort_keys=True))
        if key not in made:
            d = tmp_path_factory.mktemp(f"{arch}{'-tied' if tied else ''}")
            if arch in ("llama-head32", "llama-head64"):
                hf = make_wide_head_llama(d / "hf", int(arch.removeprefix("llama-head")))
                made[key] = (write_f32_gguf(hf, d / "model.gguf", "llama"), hf)
            else:
                ckpt = make_tiny_checkpoint(arch, d / "hf", tie_embeddings=tied, rope_scaling=rope_scaling)
                made[key] = (write_f32_gguf(ckpt, d / "model.gguf", arch), ckpt)
        return made[key]

    return make
