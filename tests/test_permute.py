"""bench/permute.py: the permuted checkpoint computes the same logits as the original, with different weights.

Bounds. Permuting the residual and hidden dimensions reorders the sums inside every matrix product, so the logits
match up to float rounding only. The tiny model runs in float32 (logits of size ~10, sums of <= 160 products):
reassociation moves logits by up to ~1e-5 (measured), so 1e-4 leaves a 10x margin while a wrong map (one swapped rotary pair,
checked below) moves logits by ~1. SmolLM2 is run in float32 on its exact bf16 weights; its activations reach ~1e4,
so its logits carry more rounding noise (measured 8e-5 max over 64 tokens, logits up to 36); 1e-3 is the bound,
still 100x below what one swapped rotary pair in a single layer does there (~0.1)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from permute import permute_checkpoint  # noqa: E402
from tiny_models import make_tiny_checkpoint  # noqa: E402


def logits(model_dir: Path, tokens: list[int]) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v.float().numpy() for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


def swap_rotary_pairs(model_dir: Path, layer: int = 0) -> None:
    """Move rotary pair 0 of every q and k head to slot 1 and back: a shuffle permute.py must NOT do."""
    import json

    from safetensors.torch import load_file, save_file

    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    path = model_dir / "model.safetensors"
    w = load_file(path)
    for proj in ("q_proj", "k_proj"):
        t = w[f"model.layers.{layer}.self_attn.{proj}.weight"]
        for head in range(t.shape[0] // head_dim):
            for half in (0, head_dim // 2):
                a, b = head * head_dim + half, head * head_dim + half + 1
                t[[a, b]] = t[[b, a]]
    save_file(w, path, metadata={"format": "pt"})


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_tiny_permuted_logits_match(tmp_path, arch, tied):
    src = make_tiny_checkpoint(arch, tmp_path / "src", tie_embeddings=tied)
    dst = permute_checkpoint(src, tmp_path / "dst", seed=3)
    tokens = list(range(3, 43))
    ref, got = logits(src, tokens), logits(dst, tokens)
    assert np.abs(ref).max() > 1.0  # logits far from zero, so a small difference means something
    assert np.abs(got - ref).max() < 1e-4, np.abs(got - ref).max()

    w0, w1 = weights(src), weights(dst)
    assert w0.keys() == w1.keys()
    for name in w0:
        assert w0[name].shape == w1[name].shape
        if w0[name].ndim == 2:  # every matrix is shuffled, and holds the same multiset of magnitudes
            assert not np.array_equal(w0[name], w1[name]), name
            assert np.array_equal(np.sort(np.abs(w0[name]), axis=None), np.sort(np.abs(w1[name]), axis=None)), name
    assert (tmp_path / "dst" / "tokenizer.json").is_file()

    # the check has teeth: a rotary-pair swap (not an equivalence: each pair has its own frequency) is caught
    swap_rotary_pairs(dst)
    assert np.abs(logits(dst, tokens) - ref).max() > 100 * 1e-4


def test_same_dtype_bitwise_in_bf16(tmp_path):
    """bf16 in, bf16 out, bit exact: the embedding's columns are the old columns, moved (only moves and sign flips)."""
    import torch
    from safetensors.torch import load_file

    src = make_tiny_checkpoint("llama", tmp_path / "src", dtype="bfloat16")
    dst = permute_checkpoint(src, tmp_path / "dst", seed=1)
    w0, w1 = load_file(src / "model.safetensors"), load_file(dst / "model.safetensors")
    for name, t in w1.items():
        assert t.dtype == w0[name].dtype
    emb0, emb1 = w0["model.embed_tokens.weight"], w1["model.embed_tokens.weight"]
    # the embedding is a pure column permutation: every column of the new one is a column of the old one, bit exact
    bits = lambda emb: {emb[:, j].contiguous().view(torch.int16).numpy().tobytes() for j in range(emb.shape[1])}  # noqa: E731
    assert bits(emb1) == bits(emb0)


def test_rejects_unsupported(tmp_path):
    from llmq.errors import LlmqError

    src = make_tiny_checkpoint("qwen3", tmp_path / "src")  # per-head q/k norms do not commute with pair turns
    with pytest.raises(LlmqError):
        permute_checkpoint(src, tmp_path / "dst")


@pytest.mark.slow
def test_smollm2_permuted_logits_match(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from common import smollm2_hf_dir, text_file  # noqa: E402
    from tokenizers import Tokenizer

    src = smollm2_hf_dir()
    dst = permute_checkpoint(src, tmp_path / "perm", seed=0)
    tokens = Tokenizer.from_file(str(src / "tokenizer.json")).encode(text_file("eval").read_text()[:2000]).ids[:64]
    ref, got = logits(src, tokens), logits(dst, tokens)
    diff = np.abs(got - ref).max()
    print(f"\nSmolLM2 permuted vs original: max |logit diff| {diff:.2e} (max |logit| {np.abs(ref).max():.1f})")
    assert diff < 1e-3, diff
    assert (ref.argmax(-1) == got.argmax(-1)).all()
    w0, w1 = weights(src), weights(dst)
    assert not np.array_equal(w0["model.layers.0.mlp.down_proj.weight"], w1["model.layers.0.mlp.down_proj.weight"])
    swap_rotary_pairs(dst, layer=15)
    assert np.abs(logits(dst, tokens) - ref).max() > 20 * 1e-3  # the same control as the tiny test
