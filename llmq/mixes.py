"""Per-tensor type choice for a file type ("mix"), following llama.cpp's `llama_tensor_get_type`
(src/llama-quant.cpp) for the dense architectures we convert, so a `--type Q4_K_M` file from llmq holds the same
types per tensor as llama-quantize's and the two can be compared at equal size.

A mix maps each GGUF tensor to a ggml type given its name, layer and shape. 1-D tensors and norms stay F32.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, LlamaFileType as FT

from .errors import LlmqError

# file type name -> (llama ftype, default ggml type for quantisable tensors)
FILE_TYPES: dict[str, tuple[FT, QT]] = {
    "F32": (FT.ALL_F32, QT.F32),
    "F16": (FT.MOSTLY_F16, QT.F16),
    "BF16": (FT.MOSTLY_BF16, QT.BF16),
    "Q8_0": (FT.MOSTLY_Q8_0, QT.Q8_0),
    "Q4_0": (FT.MOSTLY_Q4_0, QT.Q4_0),
    "Q4_1": (FT.MOSTLY_Q4_1, QT.Q4_1),
    "Q5_0": (FT.MOSTLY_Q5_0, QT.Q5_0),
    "Q5_1": (FT.MOSTLY_Q5_1, QT.Q5_1),
    "Q2_K": (FT.MOSTLY_Q2_K, QT.Q2_K),
    "Q3_K_S": (FT.MOSTLY_Q3_K_S, QT.Q3_K),
    "Q3_K_M": (FT.MOSTLY_Q3_K_M, QT.Q3_K),
    "Q3_K_L": (FT.MOSTLY_Q3_K_L, QT.Q3_K),
    "Q4_K_S": (FT.MOSTLY_Q4_K_S, QT.Q4_K),
    "Q4_K_M": (FT.MOSTLY_Q4_K_M, QT.Q4_K),
    "Q5_K_S": (FT.MOSTLY_Q5_K_S, QT.Q5_K),
    "Q5_K_M": (FT.MOSTLY_Q5_K_M, QT.Q5_K),
    "Q6_K": (FT.MOSTLY_Q6_K, QT.Q6_K),
    # FP4 (llmq/fp4.py): every linear in the FP4 type, embeddings/output as in the Q4_0 mix (Q6_K, or Q8_0 when
    # the rows do not divide into 256). llama.cpp has no dense MXFP4 file type; its MXFP4_MOE id is the nearest.
    "NVFP4": (FT.MOSTLY_NVFP4, QT.NVFP4),
    "MXFP4": (FT.MOSTLY_MXFP4_MOE, QT.MXFP4),
}

# A 256-block type whose row length does not divide falls back to a 32-block type of similar quality.
_FALLBACK = {QT.Q2_K: QT.Q4_0, QT.Q3_K: QT.Q4_0, QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0,
             QT.NVFP4: QT.MXFP4}

_FLOAT = (QT.F32, QT.F16, QT.BF16)


def parse_file_type(name: str) -> str:
    key = name.upper()
    if key not in FILE_TYPES:
        raise LlmqError(f"unknown --type {name!r}; choose one of {', '.join(FILE_TYPES)}")
    return key


def _use_more_bits(i_layer: int, n_layer: int) -> bool:
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def is_quantizable(name: str, n_dims: int) -> bool:
    """llama.cpp's tensor_allows_quantization for dense decoder models."""
    return n_dims >= 2 and name.endswith("weight") and "_norm.weight" not in name


def block_size(qtype: QT) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def fallback_type(qtype: QT, n_cols: int) -> QT:
    """The type actually usable for rows of n_cols values (ggml needs whole blocks per row)."""
    if n_cols % block_size(qtype) == 0:
        return qtype
    qtype = _FALLBACK.get(qtype, qtype)
    return qtype if n_cols % block_size(qtype) == 0 else QT.F16


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    n_head: int
    n_head_kv: int
    tied_embeddings: bool


def tensor_type(ftype_name: str, name: str, shape: tuple[int, ...], model: ModelShape,
                has_imatrix: bool = False, overrides: list[tuple[re.Pattern, QT]] = ()) -> QT:
    """The ggml type of tensor `name` (GGUF name, numpy shape = (rows, cols)) in file type `ftype_name`."""
    ftype, default = FILE_TYPES[ftype_name]
    if not is_quantizable(name, len(shape)):
        return QT.F32
    n_cols = shape[-1]
    for pattern, qtype in overrides:
        if pattern.search(name):
            return fallback_type(qtype, n_cols)
    if default in _FLOAT:
        return default
    new = default
    m = re.match(r"blk\.(\d+)\.", name)
    i_layer, n_layer = (int(m.group(1)) if m else 0), model.n_layer
    n_gqa = model.n_head // max(1, model.n_head_kv)
    if name == "output.weight" or (model.tied_embeddings and name == "token_embd.weight"):
        if n_cols % block_size(new) != 0:
            new = QT.Q8_0
        elif new != QT.Q8_0:
            new = QT.Q6_K
    elif name == "token_embd.weight":
        pass
    elif "attn_v.weight" in name:
        if ftype == FT.MOSTLY_Q2_K:
            new = QT.Q4_K if n_gqa >= 4 else QT.Q3_K
        elif ftype == FT.MOSTLY_Q3_K_M:
            new = QT.Q5_K if i_layer < 2 else QT.Q4_K
        elif ftype == FT.MOSTLY_Q3_K_L:
            new = QT.Q5_K
        elif ftype in (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M) and _use_more_bits(i_layer, n_layer):
            new = QT.Q6_K
        elif ftype == FT.MOSTLY_Q4_K_S and i_layer < 4:
            new = QT.Q5_K
    elif "ffn_down" in name:
        if ftype == FT.MOSTLY_Q2_K:
            new = QT.Q3_K
        elif ftype == FT.MOSTLY_Q3_K_M:
            # llama.cpp: Q5_K for the first 1/16 of layers, else Q4_K (its falcon test is inverted for others)
            new = QT.Q5_K if i_layer < n_layer // 16 else QT.Q4_K
        elif ftype == FT.MOSTLY_Q3_K_L:
            new = QT.Q5_K
        elif ftype == FT.MOSTLY_Q4_K_M:
            if _use_more_bits(i_layer, n_layer):
                new = QT.Q6_K
        elif ftype == FT.MOSTLY_Q5_K_M and _use_more_bits(i_layer, n_layer):
            new = QT.Q6_K
        elif ftype == FT.MOSTLY_Q4_K_S and i_layer < n_layer // 8:
            new = QT.Q5_K
        elif ftype in (FT.MOSTLY_Q4_0, FT.MOSTLY_Q5_0) and has_imatrix and i_layer < n_layer // 8:
            new = QT.Q4_1 if ftype == FT.MOSTLY_Q4_0 else QT.Q5_1
    elif "attn_output.weight" in name:
        if ftype == FT.MOSTLY_Q2_K:
            new = QT.Q3_K
        elif ftype == FT.MOSTLY_Q3_K_M:
            new = QT.Q4_K
        elif ftype == FT.MOSTLY_Q3_K_L:
            new = QT.Q5_K
    return fallback_type(new, n_cols)


def file_type_id(ftype_name: str) -> int:
    return int(FILE_TYPES[ftype_name][0])
