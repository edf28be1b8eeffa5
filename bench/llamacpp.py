"""llama.cpp, the baseline every benchmark compares against: re-exported from the installed package
(`llmq.llamacpp_tools`), which fetches llama.cpp's tree from the llama-cpp-python sdist and builds its tools on
first use."""

from llmq.llamacpp_tools import (  # noqa: F401
    CACHE, TOOLS, convert_hf, imatrix_cmd, measure, parse_perplexity_output, perplexity, quantize_cmd, source_tree,
    tool, version,
)
