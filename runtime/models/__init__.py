"""Model definitions keyed by GGUF `general.architecture`. Each entry is a module with `ModelArgs` (built by
`ModelArgs.from_metadata(meta)`) and `Model(args, weights)`."""

from __future__ import annotations

from types import ModuleType

from llmq.errors import LlmqError

from . import llama

# Mistral checkpoints are written as llama GGUFs by convert_hf_to_gguf; "mistral" is accepted for hand-made files.
ARCHITECTURES: dict[str, ModuleType] = {"llama": llama, "mistral": llama, "qwen2": llama, "qwen3": llama}


def model_module(arch: str) -> ModuleType:
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise LlmqError(f"architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})") from None
