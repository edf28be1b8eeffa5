"""llmq: Hugging Face checkpoints to llama.cpp-compatible GGUF files."""

__version__ = "0.1.0"
