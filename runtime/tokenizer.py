"""The tokenizer stored in a GGUF file, rebuilt to give exactly the ids llama.cpp gives.

Two kinds of tokenizer, as llama.cpp's src/llama-vocab.cpp has them:

- `gpt2` (byte-level BPE): special tokens are cut out first, the remaining text is split by the regex list that
  llama.cpp associates with `tokenizer.ggml.pre` (each regex splits the pieces of the previous one, keeping the
  unmatched gaps), every piece is mapped to GPT-2 byte characters and merged by rank with `tokenizer.ggml.merges`.
  The splitting and merging are done by the `tokenizers` library, configured to do what llama.cpp does.
- `llama` (SentencePiece): spaces become U+2581, a space is prepended to each text fragment that starts the input
  or follows a special token (`add_space_prefix`), and the fragment is merged bottom-up: the adjacent pair whose
  concatenation is a vocabulary token of highest score goes first (ties: leftmost). This is not merges-list BPE,
  so it is done here, in `_spm_merge`, exactly like llama.cpp's llm_tokenizer_spm_session. Characters that end up
  in no token fall back to their UTF-8 bytes as <0xXX> tokens.

Token attributes, the end-of-generation set and decoding follow llama.cpp's loader (`llama_vocab::impl::load`,
`token_to_piece`, `detokenize`) including its name-based detection of end-of-turn and FIM tokens.
"""

from __future__ import annotations

import heapq
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from llmq.errors import LlmqError
from llmq.gguf_check import StringArray

# tokenizer.ggml.token_type values (gguf.TokenType)
TYPE_UNDEFINED, TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL, TYPE_USER_DEFINED, TYPE_UNUSED, TYPE_BYTE = range(7)

# llama_token_attr bits
ATTR_UNKNOWN, ATTR_UNUSED, ATTR_NORMAL, ATTR_CONTROL, ATTR_USER_DEFINED, ATTR_BYTE = (1 << i for i in range(6))
_TYPE_TO_ATTR = {TYPE_NORMAL: ATTR_NORMAL, TYPE_UNKNOWN: ATTR_UNKNOWN, TYPE_CONTROL: ATTR_CONTROL,
                 TYPE_USER_DEFINED: ATTR_USER_DEFINED, TYPE_UNUSED: ATTR_UNUSED, TYPE_BYTE: ATTR_BYTE}
_SPECIAL_ATTRS = ATTR_UNKNOWN | ATTR_CONTROL

SPM_SPACE = "\u2581"  # SentencePiece's visible space

# ---------------------------------------------------------------------------------------------------------------
# Pre-tokenizers: llama.cpp's regex list per tokenizer.ggml.pre (llm_tokenizer_bpe), with the per-type flags its
# loader sets. Contractions are spelled out case by case where llama.cpp does so instead of (?i:...).
# ---------------------------------------------------------------------------------------------------------------
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
HF_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"  # how tokenizer.json files write the same group

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_REGEX = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
QWEN2_REGEX = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
QWEN35_REGEX = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
MINICPM5_REGEX = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                  r"|\s+(?!\S)|\s+")
SEED_CODER_REGEX = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
                    r"|\s+(?!\S)|\s+")
UFAKZEKA_REGEX = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
EXAONE_MOE_REGEX = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
                    r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+")
JAIS2_REGEX = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)"
               r"|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}")
# Upper/lower-case-aware word regexes: llama.cpp rewrites \p{Lu}... into lookaheads for std::regex; Oniguruma
# takes the original property classes, which is what those rewrites emulate.
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
TEKKEN_REGEX = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*|\p{{N}}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT4O_REGEX = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
               rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?|\p{{N}}{{1,3}}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DEEPSEEK3_REGEXES = (
    r"\p{N}{1,3}",
    r"[一-龥\u3040-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
)
DEEPSEEK_CODER_REGEXES = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥\u0800-一가-\ud7ff]+", r"\p{N}")
BLOOM_REGEX = r" ?[^(\s|.,!?…。，、।۔،)]+"
DEFAULT_REGEXES = (r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]")


@dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp pre-tokenizes for one tokenizer.ggml.pre value."""
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is a whole vocabulary token is emitted without merging
    clean_spaces: bool = True    # detokenize removes " ." " ," " 's"-style spaces
    add_bos: bool = False        # default when the file has no tokenizer.ggml.add_bos_token


def _group(names: str, spec: PreTokenizer) -> dict[str, PreTokenizer]:
    return {name: spec for name in names.split()}


PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": PreTokenizer(DEFAULT_REGEXES),
    **_group("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
             PreTokenizer((LLAMA3_REGEX,), ignore_merges=True, add_bos=True)),
    **_group("dbrx smaug-bpe", PreTokenizer((LLAMA3_REGEX,))),
    **_group("qwen2 deepseek-r1-qwen kormo f2llmv2 hunyuan solar-open grok-2",
             PreTokenizer((QWEN2_REGEX,), clean_spaces=False)),
    **_group("stablelm2 megrez", PreTokenizer((QWEN2_REGEX,))),
    "qwen35": PreTokenizer((QWEN35_REGEX,), clean_spaces=False),
    **_group("gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert exaone4 mpt olmo "
             "jais", PreTokenizer((GPT2_REGEX,))),
    **_group("trillion granite-docling", PreTokenizer((GPT2_REGEX,), clean_spaces=False)),
    **_group("starcoder refact codeshell exaone minerva-7b mellum2", PreTokenizer((r"\p{N}", GPT2_REGEX))),
    **_group("smollm command-r", PreTokenizer((r"\p{N}", GPT2_REGEX), clean_spaces=False)),
    "falcon": PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", GPT2_REGEX, r"[0-9][0-9][0-9]")),
    "deepseek-coder": PreTokenizer(DEEPSEEK_CODER_REGEXES, clean_spaces=False),
    **_group("deepseek-v3 hunyuan-dense joyai-llm hy_v4", PreTokenizer(DEEPSEEK3_REGEXES, clean_spaces=False)),
    **_group("bloom gpt3-finnish", PreTokenizer((BLOOM_REGEX,))),
    "poro-chat": PreTokenizer((BLOOM_REGEX,), clean_spaces=False),
    "viking": PreTokenizer((BLOOM_REGEX, r"\p{N}"), clean_spaces=False),
    "tekken": PreTokenizer((TEKKEN_REGEX,), ignore_merges=True, clean_spaces=False, add_bos=True),
    **_group("gpt-4o llama4 kanana2 talkie minimax-m2", PreTokenizer((GPT4O_REGEX,), clean_spaces=False)),
    "seed-coder": PreTokenizer((SEED_CODER_REGEX,), clean_spaces=False),
    "ufakzeka": PreTokenizer((UFAKZEKA_REGEX,), clean_spaces=False),
    "exaone-moe": PreTokenizer((EXAONE_MOE_REGEX,)),
    "minicpm5": PreTokenizer((r"\p{N}{1,3}", MINICPM5_REGEX), ignore_merges=True),
    "jais-2": PreTokenizer((JAIS2_REGEX,)),
    "laguna": PreTokenizer((r"[^\n]+|[\n]+", QWEN2_REGEX), clean_spaces=False),
}

# ---------------------------------------------------------------------------------------------------------------
# Name-based special-token detection of llama.cpp's loader.
# ---------------------------------------------------------------------------------------------------------------
_EOT_TEXTS = frozenset(["<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
                        "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>"])
_EOM_TEXTS = frozenset(["<|eom_id|>"])
_FIM_TEXTS = {
    "fim_pre": frozenset(["<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                          "<|code_prefix|>", "<|prefix|>"]),
    "fim_suf": frozenset(["<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                          "<|code_suffix|>", "<|suffix|>"]),
    "fim_mid": frozenset(["<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                          "<|code_middle|>", "<|middle|>"]),
    "fim_pad": frozenset(["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"]),
    "fim_rep": frozenset(["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"]),
    "fim_sep": frozenset(["<|file_sep|>"]),
}
EOG_TEXTS = frozenset(["<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
                       "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
                       "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
                       "<｜end▁of▁sentence｜>", "[e~["])
_FORCED_USER_DEFINED = frozenset(["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"])

_SPECIAL_ID_KEYS = {  # our name -> GGUF keys (later keys are llama.cpp's deprecated aliases)
    "bos": ("tokenizer.ggml.bos_token_id",), "eos": ("tokenizer.ggml.eos_token_id",),
    "eot": ("tokenizer.ggml.eot_token_id",), "eom": ("tokenizer.ggml.eom_token_id",),
    "unk": ("tokenizer.ggml.unknown_token_id",), "sep": ("tokenizer.ggml.seperator_token_id",),
    "pad": ("tokenizer.ggml.padding_token_id",), "mask": ("tokenizer.ggml.mask_token_id",),
    "fim_pre": ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.prefix_token_id"),
    "fim_suf": ("tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.suffix_token_id"),
    "fim_mid": ("tokenizer.ggml.fim_mid_token_id", "tokenizer.ggml.middle_token_id"),
    "fim_pad": ("tokenizer.ggml.fim_pad_token_id",), "fim_rep": ("tokenizer.ggml.fim_rep_token_id",),
    "fim_sep": ("tokenizer.ggml.fim_sep_token_id",),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE stores tokens in these characters)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_decode(text: str) -> bytes:
    """llama_decode_text: GPT-2 characters back to bytes; a character outside the map is spelled out as llama.cpp
    does ("[UNK_BYTE_0x<hex><token text>]")."""
    out = bytearray()
    for ch in text:
        b = _UNICODE_TO_BYTE.get(ch)
        if b is not None:
            out.append(b)
        else:
            out += b"[UNK_BYTE_0x" + ch.encode().hex().encode() + text.encode() + b"]"
    return bytes(out)


def _clean_spaces(text: bytes) -> bytes:
    """llama.cpp detokenize's clean_spaces passes, on the byte buffer exactly as its in-place C loops do."""
    buf = bytearray(text)
    # " ?" " !" " ." " ,"  -> drop the space
    total = 1 if buf else 0
    for i in range(1, len(buf)):
        x = buf[i]
        if buf[i - 1] == 0x20 and x in b"?!.,":
            total -= 1
        buf[total] = x
        total += 1
    del buf[total:]
    # " ' "  -> "'"
    total = 1 if buf else 0
    n, i = len(buf), 1
    while i < n:
        x = buf[i]
        if x == 0x27 and i + 1 < n and buf[i - 1] == 0x20 and buf[i + 1] == 0x20:
            total -= 1
            i += 1
            buf[i] = 0
        buf[total] = x
        total += 1
        i += 1
    del buf[total:]
    # " 's" " 'm" " 're" " 've" -> drop the space (" 't" " 'd" " 'll" keep it)
    total = 1 if buf else 0
    n = len(buf)
    for i in range(1, n):
        x = buf[i]
        if buf[i - 1] == 0x20 and x == 0x27 and i + 1 < n:
            x1 = buf[i + 1]
            if x1 in b"sm":
                total -= 1
            elif x1 not in b"td" and i + 2 < n and (x1, buf[i + 2]) in ((0x72, 0x65), (0x76, 0x65)):
                total -= 1
        buf[total] = x
        total += 1
    del buf[total:]
    return bytes(buf)


def hf_pre_tokenizer_json(pre: PreTokenizer, *, as_published: bool) -> dict:
    """The tokenizer.json `pre_tokenizer` doing this pre-tokenization.

    as_published=False: one isolated Split per llama.cpp regex, then byte-level mapping (what the runtime runs).
    as_published=True: the form model repositories use - contractions as (?i:...), a trailing GPT-2 regex as
    ByteLevel(use_regex), single digits as Digits - so that llmq.vocab recognises it and llama.cpp's converter hashes
    it to the same tokenizer.ggml.pre."""
    regexes = list(pre.regexes)
    use_regex = as_published and bool(regexes) and regexes[-1] == GPT2_REGEX
    if use_regex:
        regexes.pop()
    steps = []
    for r in regexes:
        if as_published and r == r"\p{N}":
            steps.append({"type": "Digits", "individual_digits": True})
            continue
        if as_published:
            r = r.replace(_CONTRACTIONS, HF_CONTRACTIONS)
        steps.append({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False})
    steps.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": use_regex, "use_regex": use_regex})
    return steps[0] if len(steps) == 1 else {"type": "Sequence", "pretokenizers": steps}


def split_merge(merge: str) -> tuple[str, str]:
    """A tokenizer.ggml.merges entry -> (left, right): split at the first space after the first character."""
    pos = merge.find(" ", 1)
    if pos < 0:
        return ("", "")
    return merge[:pos], merge[pos + 1:]


def _template_processing(bos: str | None, eos: str | None, token_to_id: Mapping[str, int]) -> dict | None:
    """tokenizer.json post-processor adding BOS and/or EOS around each sequence (None if it adds neither)."""
    if bos is None and eos is None:
        return None

    def around(seq: str, type_id: int) -> list[dict]:
        return ([{"SpecialToken": {"id": bos, "type_id": type_id}}] if bos else []) + \
            [{"Sequence": {"id": seq, "type_id": type_id}}] + \
            ([{"SpecialToken": {"id": eos, "type_id": type_id}}] if eos else [])

    specials = {t: {"id": t, "ids": [token_to_id[t]], "tokens": [t]} for t in (bos, eos) if t}
    return {"type": "TemplateProcessing", "single": around("A", 0), "pair": around("A", 0) + around("B", 1),
            "special_tokens": specials}


class GGUFTokenizer:
    """Text <-> token ids as llama.cpp does it for the tokenizer described by GGUF metadata."""

    def __init__(self, *, model: str, pre: str, tokens: list[str], types: list[int], scores: list[float] | None,
                 merges: list[str] | None, special_ids: Mapping[str, int | None], add_bos: bool | None = None,
                 add_eos: bool | None = None, add_space_prefix: bool | None = None,
                 chat_template: str | None = None, named_chat_templates: Mapping[str, str] | None = None):
        if model not in ("gpt2", "llama"):
            raise LlmqError(f"tokenizer model {model!r} is not supported (only 'gpt2' byte-level BPE and 'llama' "
                            "SentencePiece)")
        self.model = model
        # a StringArray (runtime.load_gguf's metadata) is kept as it is: decoded when read, ~6 MB less resident
        self.tokens = tokens if isinstance(tokens, StringArray) else list(tokens)
        self.vocab_size = len(self.tokens)
        self.types = list(types) if types else [TYPE_NORMAL] * self.vocab_size
        self.scores = list(scores) if scores else [0.0] * self.vocab_size
        self.merges = merges if isinstance(merges, StringArray) else list(merges or [])
        self.chat_template = chat_template
        self._add_space_prefix_in_file = add_space_prefix
        self.named_chat_templates = dict(named_chat_templates or {})
        self._token_to_id: dict[str, int] | None = {t: i for i, t in enumerate(self.tokens)}
        if len(self._token_to_id) != self.vocab_size:
            raise LlmqError("tokenizer.ggml.tokens has duplicate entries")
        if model == "llama":
            self.pre_name, self.pre = "default", None
            self.add_space_prefix = True if add_space_prefix is None else bool(add_space_prefix)
            self.clean_spaces = False
            default_add_bos = True
            defaults = {"bos": 1, "eos": 2, "unk": 0}
        else:
            if pre not in PRE_TOKENIZERS:
                raise LlmqError(f"tokenizer.ggml.pre {pre!r} is not supported by the runtime tokenizer; known: "
                                f"{', '.join(sorted(PRE_TOKENIZERS))}")
            self.pre_name, self.pre = pre, PRE_TOKENIZERS[pre]
            self.add_space_prefix = bool(add_space_prefix) if add_space_prefix is not None else False
            self.clean_spaces = self.pre.clean_spaces
            default_add_bos = self.pre.add_bos
            defaults = {"bos": 11, "eos": 11}
        self.add_bos = default_add_bos if add_bos is None else bool(add_bos)
        self.add_eos = False if add_eos is None else bool(add_eos)
        self.special_ids_in_file = {k: v for k, v in special_ids.items() if v is not None}

        ids: dict[str, int | None] = {k: None for k in _SPECIAL_ID_KEYS}
        for k, v in defaults.items():
            ids[k] = v if v < self.vocab_size else None
        for k, v in special_ids.items():
            if v is not None and 0 <= int(v) < self.vocab_size:
                ids[k] = int(v)
        self.attrs = [_TYPE_TO_ATTR.get(t, 0) for t in self.types]
        self.eog_ids = self._detect_special(ids)
        self.special = ids
        self.bos_id, self.eos_id, self.eot_id, self.unk_id = ids["bos"], ids["eos"], ids["eot"], ids["unk"]
        self.pad_id = ids["pad"]

        # llama.cpp's cache_special_tokens: cut out longest first
        self._special_order = sorted(
            (i for i, a in enumerate(self.attrs) if a & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)),
            key=lambda i: (-len(self.tokens[i].encode()), i))
        self._hf = self._build_bpe() if model == "gpt2" else None
        if self._hf is not None:
            self._token_to_id = None  # the `tokenizers` BPE holds the vocabulary now (~3 MB for 49k tokens)
        if model == "llama":
            self._byte_ids = [self._byte_token(b) for b in range(256)]
            # Adjacent code-point pairs found inside some token: a text boundary between two characters that are
            # not such a pair is never merged across, so the text can be merged piece by piece (and pieces cached)
            # with exactly the result of merging it whole.
            self._inner_pairs = {t[k:k + 2] for t in self.tokens for k in range(len(t) - 1)}
            self._chunk_cache: dict[str, list[int]] = {}

    @property
    def token_to_id(self) -> dict[str, int]:
        """Token text -> id (byte-level BPE: rebuilt when asked, for exporting; encoding uses the BPE's own)."""
        if self._token_to_id is not None:
            return self._token_to_id
        return {t: i for i, t in enumerate(self.tokens)}

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> "GGUFTokenizer":
        """Build from GGUF metadata (key -> Python value, arrays as lists)."""
        model = meta.get("tokenizer.ggml.model")
        if model is None or "tokenizer.ggml.tokens" not in meta:
            raise LlmqError("GGUF has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
        special = {}
        for name, keys in _SPECIAL_ID_KEYS.items():
            for key in keys:
                if key in meta and special.get(name) is None:
                    special[name] = int(meta[key])
        named = {}
        for name in meta.get("tokenizer.chat_templates") or []:
            if f"tokenizer.chat_template.{name}" in meta:
                named[name] = meta[f"tokenizer.chat_template.{name}"]
        if model == "gpt2" and "tokenizer.ggml.merges" not in meta:
            raise LlmqError("GGUF gpt2 tokenizer has no tokenizer.ggml.merges")
        return cls(
            model=model, pre=meta.get("tokenizer.ggml.pre") or "default",
            tokens=meta["tokenizer.ggml.tokens"], types=list(meta.get("tokenizer.ggml.token_type") or []),
            scores=meta.get("tokenizer.ggml.scores"), merges=meta.get("tokenizer.ggml.merges"),
            special_ids=special, add_bos=meta.get("tokenizer.ggml.add_bos_token"),
            add_eos=meta.get("tokenizer.ggml.add_eos_token"),
            add_space_prefix=meta.get("tokenizer.ggml.add_space_prefix"),
            chat_template=meta.get("tokenizer.chat_template"), named_chat_templates=named)

    def _detect_special(self, ids: dict[str, int | None]) -> set[int]:
        """llama.cpp's name-based EOT/EOM/FIM detection and end-of-generation set; upgrades attributes like it."""
        attrs, tokens = self.attrs, self.tokens

        def force_control(i: int) -> None:
            attrs[i] |= ATTR_CONTROL

        for i, text in enumerate(tokens):
            if ids["eot"] is None and text in _EOT_TEXTS:
                ids["eot"] = i
                force_control(i)
            if ids["eom"] is None and text in _EOM_TEXTS:
                ids["eom"] = i
                force_control(i)
            for name, texts in _FIM_TEXTS.items():
                if ids[name] is None and text in texts:
                    ids[name] = i
                    force_control(i)
        for i, text in enumerate(tokens):
            if attrs[i] & ATTR_CONTROL and not attrs[i] & ATTR_UNUSED and "unused" in text:
                attrs[i] |= ATTR_UNUSED
        eog = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids[k] is not None}
        for i, text in enumerate(tokens):
            if text in EOG_TEXTS:
                eog.add(i)
                force_control(i)
        for i, text in enumerate(tokens):
            if text in _FORCED_USER_DEFINED:
                attrs[i] = ATTR_USER_DEFINED
        eog |= {ids[k] for k in ("eos", "eot", "eom") if ids[k] is not None}
        texts = {tokens[i]: i for i in eog}
        if "<|end|>" in texts and (({"<|return|>", "<|call|>"} <= texts.keys()) or
                                   (texts.keys() & {"<|call|>", "<|calls|>"} and "<|flush|>" in texts)):
            eog.discard(texts["<|end|>"])  # gpt-oss / solar-open: <|end|> ends a message, not the generation
            attrs[texts["<|end|>"]] = ATTR_USER_DEFINED
        if "</s>" in texts and texts.keys() & {"<|tool_response>", "<|plamo:eos|>"}:
            eog.discard(texts["</s>"])
            attrs[texts["</s>"]] = ATTR_NORMAL
        return eog

    def _build_bpe(self):
        """The `tokenizers` pipeline: the pre-tokenizer from its tokenizer.json form, the BPE model read by
        `tokenizers` itself from a vocab.json and a merges.txt written to a temporary directory. Handing the merges
        over as Python tuples instead left ~9 MB more at peak for SmolLM2's 49k merges, one JSON document with
        vocabulary and merges ~33 MB more (the parsed tree)."""
        from tokenizers import Tokenizer
        from tokenizers.models import BPE

        spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
                "pre_tokenizer": hf_pre_tokenizer_json(self.pre, as_published=False),
                "post_processor": None, "decoder": None,
                "model": {"type": "BPE", "vocab": {}, "merges": []}}
        options = dict(fuse_unk=False, byte_fallback=False, ignore_merges=self.pre.ignore_merges)
        try:
            tokenizer = Tokenizer.from_str(json.dumps(spec))
            with tempfile.TemporaryDirectory(prefix="llmq-bpe-") as tmp:
                vocab_path, merges_path = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
                if self._write_merges_txt(merges_path):
                    with open(vocab_path, "w", encoding="utf-8") as f:
                        json.dump(self.token_to_id, f, ensure_ascii=False)
                    tokenizer.model = BPE.from_file(vocab_path, merges_path, **options)
                    return tokenizer
            tokenizer.model = BPE(self.token_to_id, [split_merge(m) for m in self.merges], **options)
        except Exception as e:  # a merge naming a token missing from the vocabulary
            raise LlmqError(f"GGUF BPE tokenizer is inconsistent: {e}") from e
        return tokenizer

    def _write_merges_txt(self, path: str) -> bool:
        """The merges as a merges.txt (rank order, one "left right" per line); False if one cannot be written so."""
        with open(path, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            for merge in self.merges:
                left, right = split_merge(merge)
                if " " in left or " " in right or "\n" in merge or "\r" in merge or left.startswith("#version"):
                    return False  # a line the merges.txt reader would split, strip or skip
                f.write(f"{left} {right}\n")
        return True

    def _byte_token(self, b: int) -> int | None:
        i = self.token_to_id.get(f"<0x{b:02X}>")
        if i is None:
            i = self.token_to_id.get(chr(b)) if b < 0x80 else None
        return i

    # -- encoding ----------------------------------------------------------------------------------------------
    def _partition(self, text: str, parse_special: bool) -> list:
        """llama.cpp tokenizer_st_partition: cut special tokens (longest first) out of the raw text. User-defined
        tokens are always cut; control and unknown ones only with parse_special."""
        fragments: list = [text] if text else []
        for tid in self._special_order:
            if not parse_special and self.attrs[tid] & _SPECIAL_ATTRS:
                continue
            tok = self.tokens[tid]
            if not any(isinstance(f, str) and tok in f for f in fragments):
                continue
            out: list = []
            for f in fragments:
                if not isinstance(f, str) or tok not in f:
                    out.append(f)
                    continue
                for k, part in enumerate(f.split(tok)):
                    if k:
                        out.append(tid)
                    if part:
                        out.append(part)
            fragments = out
        return fragments

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`, as llama_tokenize(text, add_special, parse_special)."""
        fragments = self._partition(text, parse_special)
        out: list[int] = []
        if add_special and self.add_bos:
            if self.bos_id is None:
                raise LlmqError("tokenizer wants a BOS token but has none")
            out.append(self.bos_id)
        if self.model == "llama":
            prev_special = True
            for f in fragments:
                if isinstance(f, str):
                    if self.add_space_prefix and prev_special:
                        f = " " + f
                    self._spm_tokenize(f.replace(" ", SPM_SPACE), out)
                    prev_special = False
                else:
                    out.append(f)
                    prev_special = True
        else:
            raw = [f for f in fragments if isinstance(f, str)]
            encoded = iter(self._hf.encode_batch(raw, add_special_tokens=False) if raw else [])
            for f in fragments:
                if isinstance(f, str):
                    out.extend(next(encoded).ids)
                else:
                    out.append(f)
        if add_special and self.add_eos:
            if self.eos_id is None:
                raise LlmqError("tokenizer wants an EOS token but has none")
            out.append(self.eos_id)
        return out

    def _spm_tokenize(self, text: str, out: list[int]) -> None:
        """_spm_merge over the pieces of `text` no token spans (same ids, a cache for repeated words)."""
        pairs, cache = self._inner_pairs, self._chunk_cache
        if len(cache) > 200_000:
            cache.clear()
        start = 0
        for i in range(1, len(text) + 1):
            if i < len(text) and text[i - 1:i + 1] in pairs:
                continue
            chunk = text[start:i]
            ids = cache.get(chunk)
            if ids is None:
                ids = cache[chunk] = []
                self._spm_merge(chunk, ids)
            out.extend(ids)
            start = i

    def _spm_merge(self, text: str, out: list[int]) -> None:
        """llm_tokenizer_spm_session::tokenize: bottom-up bigram merging by token score."""
        n = len(text)
        if n == 0:
            return
        lookup, scores = self.token_to_id, self.scores
        start = list(range(n))  # symbols are code points; merged symbols stay contiguous
        length = [1] * n
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap: list[tuple[float, int, int, int]] = []

        def add_bigram(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            size = length[left] + length[right]
            tid = lookup.get(text[start[left]:start[left] + size])
            if tid is not None:
                heapq.heappush(heap, (-scores[tid], left, right, size))  # highest score, then leftmost

        for i in range(1, n):
            add_bigram(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            if length[left] == 0 or length[right] == 0 or length[left] + length[right] != size:
                continue  # stale: one side was merged since
            length[left] = size
            length[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add_bigram(prev[left], left)
            add_bigram(left, nxt[left])
        i = 0
        while i != -1:
            piece = text[start[i]:start[i] + length[i]]
            tid = lookup.get(piece)
            if tid is not None:
                out.append(tid)
            else:
                for b in piece.encode():
                    if self._byte_ids[b] is None:
                        raise LlmqError(f"SentencePiece vocabulary has no byte token for 0x{b:02X}")
                    out.append(self._byte_ids[b])
            i = nxt[i]

    # -- decoding ----------------------------------------------------------------------------------------------
    def _piece(self, tid: int) -> bytes:
        """llama.cpp's cached token_to_piece(special=true). Made when asked: a table of them all held ~2 MB for a
        49k vocabulary, and decoding a token costs a few microseconds."""
        attr, text = self.attrs[tid], self.tokens[tid]
        if attr & (_SPECIAL_ATTRS | ATTR_USER_DEFINED):
            return text.encode()
        if attr & ATTR_NORMAL:
            if self.model == "llama":
                return text.replace(SPM_SPACE, " ").encode()
            return _byte_level_decode(text)
        if attr & ATTR_BYTE:
            m = _BYTE_TOKEN.fullmatch(text)
            return bytes([int(m.group(1), 16)]) if m else b""
        return b""

    def _check_id(self, tid: int) -> int:
        tid = int(tid)
        if not 0 <= tid < self.vocab_size:
            raise LlmqError(f"token id {tid} is out of range (vocabulary has {self.vocab_size} tokens)")
        return tid

    def token_to_piece(self, id: int, special: bool = True) -> bytes:
        """The bytes of one token (control tokens render as their text only with special=True)."""
        tid = self._check_id(id)
        if not special and self.attrs[tid] & _SPECIAL_ATTRS:
            return b""
        return self._piece(tid)

    def detokenize(self, ids: Iterable[int], remove_special: bool = False, unparse_special: bool = True) -> bytes:
        """llama_detokenize: pieces joined, the SentencePiece leading space dropped, llama.cpp's space cleaning."""
        ids = [self._check_id(i) for i in ids]
        remove_space = self.add_space_prefix
        if remove_special and self.add_bos and ids and ids[0] == self.bos_id:
            remove_space = False
            ids = ids[1:]
        if remove_special and self.add_eos and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        parts = []
        for tid in ids:
            piece = self.token_to_piece(tid, special=unparse_special)
            if remove_space and piece.startswith(b" "):
                piece = piece[1:]
            remove_space = False
            parts.append(piece)
        text = b"".join(parts)
        return _clean_spaces(text) if self.clean_spaces else text

    def decode(self, ids, skip_special: bool = False) -> str:
        """Text of `ids`; skip_special drops control tokens (and a leading BOS / trailing EOS the tokenizer adds)."""
        return self.detokenize(ids, remove_special=skip_special, unparse_special=not skip_special).decode(
            "utf-8", errors="replace")

    def is_eog(self, tid: int) -> bool:
        return tid in self.eog_ids

    # -- back to Hugging Face files ----------------------------------------------------------------------------
    def to_hf(self, out_dir: Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and chat_template.jinja (transformers 5 layout) so that
        transformers loads a tokenizer giving the same ids, and llmq's converter turns them back into this GGUF
        tokenizer."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        text_of = lambda i: None if i is None else self.tokens[i]  # noqa: E731
        specials = [i for i, t in enumerate(self.types) if t in (TYPE_CONTROL, TYPE_USER_DEFINED, TYPE_UNKNOWN)]
        added = [{"id": i, "content": self.tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": self.types[i] != TYPE_USER_DEFINED} for i in specials]
        bos = text_of(self.bos_id) if self.add_bos else None
        eos = text_of(self.eos_id) if self.add_eos else None
        template = _template_processing(bos, eos, self.token_to_id)
        # the [PAD<id>] fillers of a vocabulary padded to the embedding size are not tokens of the HF tokenizer
        vocab = {t: i for i, t in enumerate(self.tokens)
                 if not (self.types[i] == TYPE_UNUSED and re.fullmatch(r"\[PAD\d+\]", t))}
        if self.model == "gpt2":
            model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                     "ignore_merges": self.pre.ignore_merges, "vocab": vocab,
                     "merges": [list(split_merge(m)) for m in self.merges]}
            tokenizer = {
                "normalizer": None, "pre_tokenizer": hf_pre_tokenizer_json(self.pre, as_published=True),
                "post_processor": template or
                {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
                "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
                "model": model}
            tokenizer_class = "PreTrainedTokenizerFast"
        else:
            normalizers = [{"type": "Replace", "pattern": {"String": " "}, "content": SPM_SPACE}]
            decoders = [{"type": "Replace", "pattern": {"String": SPM_SPACE}, "content": " "},
                        {"type": "ByteFallback"}, {"type": "Fuse"}]
            if self.add_space_prefix:
                normalizers.insert(0, {"type": "Prepend", "prepend": SPM_SPACE})
                decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
            model = {"type": "BPE", "dropout": None, "unk_token": text_of(self.unk_id),
                     "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                     "vocab": vocab, "merges": [list(m) for m in self._merges_from_scores()]}
            tokenizer = {"normalizer": {"type": "Sequence", "normalizers": normalizers}, "pre_tokenizer": None,
                         "post_processor": template, "decoder": {"type": "Sequence", "decoders": decoders},
                         "model": model}
            tokenizer_class = "LlamaTokenizerFast"
        tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, **tokenizer}
        (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False, indent=1))

        config: dict[str, Any] = {"tokenizer_class": tokenizer_class, "add_bos_token": self.add_bos,
                                  "add_eos_token": self.add_eos, "clean_up_tokenization_spaces": self.clean_spaces}
        if self.model == "llama" or self._add_space_prefix_in_file is not None:
            config["add_prefix_space"] = self.add_space_prefix
        # SentencePiece files may rely on llama.cpp's default ids (bos 1, eos 2, unk 0); GPT-2 ones' default (11)
        # is no real token, so only ids written in the file are named there
        named = self.special if self.model == "llama" else self.special_ids_in_file
        for name in ("bos", "eos", "unk", "pad", "sep", "mask"):
            if named.get(name) is not None:
                config[f"{name}_token"] = self.tokens[named[name]]
        config["added_tokens_decoder"] = {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added}
        config["model_max_length"] = 1 << 30
        (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
        if self.chat_template is not None:
            (out / "chat_template.jinja").write_text(self.chat_template)
        if self.named_chat_templates:
            extra = out / "additional_chat_templates"
            extra.mkdir(exist_ok=True)
            for name, tmpl in self.named_chat_templates.items():
                (extra / f"{name}.jinja").write_text(tmpl)

    def _merges_from_scores(self) -> list[tuple[str, str]]:
        """Every split of every multi-character token into two tokens, highest-scoring result first: BPE merges
        that make Hugging Face's BPE (which merges by rank) follow SentencePiece's score order."""
        merges = []
        for i, t in enumerate(self.tokens):
            if self.types[i] != TYPE_NORMAL or len(t) < 2:
                continue
            for k in range(1, len(t)):
                a, b = t[:k], t[k:]
                ia, ib = self.token_to_id.get(a), self.token_to_id.get(b)
                if ia is not None and ib is not None and self.types[ia] == TYPE_NORMAL == self.types[ib]:
                    merges.append((-self.scores[i], i, ia, ib, a, b))
        merges.sort()
        return [(a, b) for *_, a, b in merges]
